"""ScienceQA (test split): IMG-Accuracy (main metric, "img_accuracy") and overall accuracy, as
LLaVA's `eval_science_qa.py`.

Parsing of an output into an option letter (letters A-E): the output is exactly one letter; or
it is at least 3 characters and starts with a letter followed by ". " ("B. cat"); or the
pattern "The answer is X" followed by any one character occurs exactly once; otherwise FAILED
(so "A." alone is FAILED). The letter counts only if it is within the problem's choices.
A missing prediction is FAILED.

IMG-Accuracy is over the test problems that have an image (problems.json `image` not null).
Image-only runs (RESTORE's entry point answers only image problems): when no text-only problem
is answered, only the image problems are expected and the overall accuracy is None; otherwise
every test problem is expected and "accuracy" is the official overall number.

Difference from the official scorer: eval_science_qa.py takes the IMG denominator from the
predictions whose prompt contains "<image>", so a missing image prediction silently leaves
the denominator. Here it stays in (as FAILED) and is listed in missing_ids; on complete
inputs the numbers are identical.
"""
from __future__ import annotations

import re
from pathlib import Path

from .common import AnswerFile, BenchResult, load_json, make_result, match_answers, percent, require_file

NAME = "sqa"
LETTERS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: str) -> str:
    if text in LETTERS:
        return text
    if len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def choice_index(letter: str, n_choices: int) -> int:
    return LETTERS.index(letter) if letter in LETTERS[:n_choices] else -1


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist (cheap: nothing is parsed); raises DataFilesMissing."""
    require_file(data_root / "scienceqa" / "problems.json", "ScienceQA problems.json")
    require_file(data_root / "scienceqa" / "pid_splits.json", "ScienceQA pid_splits.json")


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    check_data(data_root)
    folder = data_root / "scienceqa"
    problems = load_json(require_file(folder / "problems.json", "ScienceQA problems.json"))
    test_ids = [str(pid) for pid in load_json(require_file(folder / "pid_splits.json", "ScienceQA pid_splits.json"))["test"]]
    has_image = {pid: bool(problems[pid].get("image")) for pid in test_ids}

    answered = {str(r.get("question_id")) for r in answers.records}
    text_only_answered = any(not has_image[pid] and pid in answered for pid in test_ids)
    expected = test_ids if text_only_answered else [pid for pid in test_ids if has_image[pid]]
    notes = [] if text_only_answered else ["no text-only problem answered: scored as ScienceQA-IMG only"]
    matched = match_answers(answers.records, lambda r: str(r["question_id"]), expected)

    correct = {"all": 0, "img": 0}
    count = {"all": 0, "img": 0}
    failed = 0
    for pid in expected:
        problem = problems[pid]
        record = matched.by_key.get(pid)
        letter = parse_letter(record.get("text", "")) if record is not None else FAILED
        failed += letter == FAILED
        hit = choice_index(letter, len(problem["choices"])) == problem["answer"]
        for group in ("all", "img") if has_image[pid] else ("all",):
            count[group] += 1
            correct[group] += hit
    metrics = {
        "img_accuracy": percent(correct["img"], count["img"]),
        "accuracy": percent(correct["all"], count["all"]) if text_only_answered else None,
        "failed": failed,
    }
    return make_result(NAME, answers, matched, metrics, "img_accuracy", len(expected), notes=notes)
