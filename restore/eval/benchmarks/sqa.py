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

Data checks (also by check_data, before inference): every test problem of pid_splits.json is in
problems.json with its answer among its choices, and LLaVA's question file `llava_test_CQM-A.json`
holds exactly the test problems, with an image exactly where problems.json has one; otherwise a
DataError names the first problem that differs.

Fixture (`write_fixture`, few items in the official formats): ScienceQA: problems.json,
pid_splits.json, llava_test_CQM-A.json, images/test/<pid>/image.png.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from ...jsonio import read_json, write_json
from ..fixtures import (LETTER_ANSWER, Info, draw_scene, options_text, other_colors, plural, random_scene,
                        reference_line, save_image)
from ..scoring.common import (AnswerFile, BenchResult, DataError, first_duplicate, load_json, make_result,
                              match_answers, percent, require_fields, require_file)
from . import Benchmark

NAME = "sqa"
LETTERS = ("A", "B", "C", "D", "E")
FAILED = "FAILED"
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
QUESTION_FILE = "llava_test_CQM-A.json"


def parse_letter(text: str) -> str:
    if text in LETTERS:
        return text
    if len(text) >= 3 and text[0] in LETTERS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else FAILED


def choice_index(letter: str, n_choices: int) -> int:
    return LETTERS.index(letter) if letter in LETTERS[:n_choices] else -1


@dataclass
class SqaData:
    problems: dict[str, dict]
    test_ids: list[str]
    has_image: dict[str, bool]


def _check_question_file(path: Path, test_ids: list[str], has_image: dict[str, bool]) -> None:
    items = load_json(path)
    if not isinstance(items, list):
        raise DataError(f"{path} is not LLaVA's ScienceQA question file (a JSON list)")
    ids = [str(require_fields(item, ("id",), f"{path} item {n}")["id"]) for n, item in enumerate(items, start=1)]
    for number, (pid, item) in enumerate(zip(ids, items), start=1):
        if pid not in has_image:
            raise DataError(f"{path} item {number}: problem {pid} is not a test problem of pid_splits.json")
        if ("image" in item) != has_image[pid]:
            raise DataError(f"{path} item {number}: problem {pid} {'has' if 'image' in item else 'lacks'} an image, "
                            "problems.json says the opposite: the files are from different releases")
    repeated = first_duplicate(ids)
    if repeated:
        raise DataError(f"{path} item {repeated[0] + 1} repeats problem {repeated[1]}")
    if len(ids) != len(test_ids):
        asked = set(ids)
        unasked = next(pid for pid in test_ids if pid not in asked)
        raise DataError(f"pid_splits.json has {len(test_ids)} test problems, {path} {len(ids)} (e.g. {unasked} is not "
                        "asked): question file and ScienceQA release do not match")


def load_data(data_root: Path) -> SqaData:
    """problems.json, the test split and LLaVA's question file, checked as the module docstring says."""
    folder = data_root / "scienceqa"
    problems_file = require_file(folder / "problems.json", "ScienceQA problems.json")
    splits_file = require_file(folder / "pid_splits.json", "ScienceQA pid_splits.json")
    question_file = require_file(folder / QUESTION_FILE, "LLaVA's ScienceQA question file (eval.zip)")
    problems = {str(pid): problem for pid, problem in load_json(problems_file).items()}
    test_ids = [str(pid) for pid in require_fields(load_json(splits_file), ("test",), str(splits_file))["test"]]
    for pid in test_ids:
        if pid not in problems:
            raise DataError(f"test problem {pid} of {splits_file} is not in {problems_file}")
        problem = require_fields(problems[pid], ("choices", "answer"), f"{problems_file}, problem {pid}")
        if not 0 <= int(problem["answer"]) < len(problem["choices"]):
            raise DataError(f"{problems_file}, problem {pid}: answer {problem['answer']} is not one of its "
                            f"{len(problem['choices'])} choices")
    has_image = {pid: bool(problems[pid].get("image")) for pid in test_ids}
    _check_question_file(question_file, test_ids, has_image)
    return SqaData(problems, test_ids, has_image)


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist and agree (see the module docstring); raises DataError."""
    load_data(data_root)


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    data = load_data(data_root)
    problems, test_ids, has_image = data.problems, data.test_ids, data.has_image

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


# ----------------------------------------------------------------------------------------------
# ScienceQA: problems.json, pid_splits.json, llava_test_CQM-A.json, images/test/<pid>/image.png


def write_fixture(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "scienceqa"
    pids = [str(p) for p in rng.sample(range(1, 21_000), n + 1)]
    problems, llava_items, first = {}, [], None
    for i, pid in enumerate(pids):
        split = "train" if i == n else "test"  # one training problem, which scoring must ignore
        with_image = i % 3 != 2
        scene = random_scene(rng)
        k = 2 + i % 4  # 2 to 5 choices
        if with_image:
            question = f"Which color are the {plural(scene['shape'])} in the picture?"
            right, wrong = scene["color"], other_colors(rng, scene["color"], k - 1)
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            question = f"What is {a} times {b}?"
            right = str(a * b)
            wrong = [str(v) for v in rng.sample([v for v in range(4, 82) if v != a * b], k - 1)]
        choices = wrong[:]
        answer = rng.randrange(k)
        choices.insert(answer, right)
        hint = "Look at the picture." if i % 2 == 0 else ""
        problems[pid] = {"question": question, "choices": choices, "answer": answer, "hint": hint,
                         "image": "image.png" if with_image else None, "task": "closed choice", "grade": "grade3",
                         "subject": "natural science", "topic": "fixtures", "category": "Colors" if with_image else "Math",
                         "skill": "Identify colors" if with_image else "Multiply", "lecture": "", "solution": "",
                         "split": split}
        if split != "test":
            continue
        prompt = (f"Context: {hint}\n" if hint else "") + f"{question}\n{options_text(choices)}"
        item = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if with_image else "") + prompt},
                                             {"from": "gpt", "value": "ABCDE"[answer]}]}
        if with_image:
            item["image"] = f"{pid}/image.png"
            path = save_image(draw_scene(scene, rng), folder / "images" / "test" / pid / "image.png")
            first = first or {"first_image": path, "first_ids": [pid]}
        llava_items.append(item)
    test_ids = [pid for pid in pids if problems[pid]["split"] == "test"]
    splits = {"train": [pids[n]], "val": [], "test": test_ids, "minival": [], "minitest": test_ids[:2]}
    write_json(folder / "problems.json", problems)
    write_json(folder / "pid_splits.json", splits)
    write_json(folder / "llava_test_CQM-A.json", llava_items, indent=2)
    return first


def reference_answers(data_root: Path, model_id: str = "reference") -> list[dict]:
    """Image problems only, as RESTORE's entry point answers."""
    lines = []
    for item in read_json(data_root / "scienceqa" / QUESTION_FILE):
        if "image" not in item:
            continue
        question = item["conversations"][0]["value"].replace("<image>", "").strip()
        prompt = f"<image>\n{question}\n{LETTER_ANSWER}"
        lines.append(reference_line(item["id"], prompt, item["conversations"][1]["value"], model_id))
    return lines


BENCHMARK = Benchmark(
    name="sqa",
    title="ScienceQA-IMG (image questions only, as RESTORE).",
    entry="science",
    question_file="scienceqa/llava_test_CQM-A.json",
    image_folder="scienceqa/images/test",
    entry_args=("--single-pred-prompt",),
    evaluate=evaluate,
    check_data=check_data,
    data_files=("scienceqa/" + QUESTION_FILE, "scienceqa/problems.json", "scienceqa/pid_splits.json"),
    write_fixture=write_fixture,
    reference_answers=reference_answers,
)
