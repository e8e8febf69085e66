"""MME: perception and cognition scores, as the official `eval_tool/calculation.py` computes them
from the per-category txt files that LLaVA's `convert_answer_to_mme.py` writes.

Ground truth: the release's `questions_answers_YN` txt files (question<TAB>Yes/No). An answer
is found by rebuilding the original question: the LLaVA suffix removed, " Please answer yes or
no." appended, or the same with two spaces (a few release files have that).
Parsing: lower-case; "yes"/"no" kept; otherwise the first four characters decide: contains
"yes" -> yes, else contains "no" -> no, else "other" (wrong). Per subtask: acc = correct
questions / questions, acc+ = images with all questions correct / images, score = 100 (acc +
acc+) (max 200). Perception = sum of the 10 perception subtasks (max 2000), cognition = sum of
the 4 cognition subtasks (max 800); "total" = perception + cognition (max 2800), the main
metric here (the "MME" column of most token-reduction papers, ~1862 for LLaVA-1.5-7B; LLaVA's
own model zoo reports perception, 1510.7).

Differences from the official scorer: calculation.py pairs consecutive lines of a category file,
so one missing or extra answer (or an answer containing a newline or tab) shifts every pair
after it. Here questions are grouped by their image id; a question without a prediction is
wrong (it stays in acc and acc+) and is listed in missing_ids. On complete inputs the numbers are
identical. The txt files in `mme_results/` are written like the converter's (answer-file
order), with tabs/newlines inside predictions replaced by spaces so they stay readable by
calculation.py.
"""
from __future__ import annotations

from pathlib import Path

from .common import (SHORT_ANSWER_SUFFIX, AnswerFile, BenchResult, DataError, load_jsonl, make_result,
                     match_answers, require_dir, require_file)

NAME = "mme"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MAX_SCORE = {"perception": 200 * len(PERCEPTION), "cognition": 200 * len(COGNITION),
             "total": 200 * (len(PERCEPTION) + len(COGNITION))}
RELEASE = "MME_Benchmark_release_version"
YES_NO_SUFFIX = " Please answer yes or no."


def parse_yes_no(text: str) -> str:
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def read_ground_truth(release: Path) -> dict[tuple[str, str, str], str]:
    """(category, txt file name, question) -> "yes"/"no" from the release folder."""
    truth = {}
    # Only the 14 subtask folders: a release copy may also hold eval_tool/ or other notes.
    for category_dir in sorted(p for p in release.iterdir() if p.is_dir() and p.name in PERCEPTION + COGNITION):
        qa_dir = category_dir / "questions_answers_YN" if (category_dir / "images").is_dir() else category_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for line in txt.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                question, answer = line.strip().split("\t")
                truth[(category_dir.name, txt.name, question)] = answer.strip().lower()
    return truth


def original_question(prompt: str) -> str:
    return prompt.replace(SHORT_ANSWER_SUFFIX, "").strip() + YES_NO_SUFFIX


def lookup_truth(truth: dict, question_id: str, prompt: str) -> tuple[str, str, str]:
    category = question_id.split("/")[0]
    txt_name = Path(question_id).stem + ".txt"
    question = original_question(prompt)
    for candidate in (question, question.replace(YES_NO_SUFFIX, " " + YES_NO_SUFFIX)):
        if (category, txt_name, candidate) in truth:
            return category, txt_name, candidate
    raise DataError(f"MME question {question_id!r} {question!r} has no ground truth in "
                    f"{category}/{txt_name} of {RELEASE}: question file and release do not match")


def _one_line(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist (cheap: nothing is parsed); raises DataFilesMissing."""
    require_file(data_root / "MME" / "llava_mme.jsonl", "LLaVA's MME question file (eval.zip)")
    require_dir(data_root / "MME" / RELEASE, "the official MME release folder")


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    check_data(data_root)
    folder = data_root / "MME"
    questions = load_jsonl(require_file(folder / "llava_mme.jsonl", "LLaVA's MME question file (eval.zip)"))
    truth = read_ground_truth(require_dir(folder / RELEASE, "the official MME release folder"))

    def key(record: dict) -> tuple[str, str]:
        return str(record["question_id"]), record["prompt"]

    expected = [(str(q["question_id"]), q["text"]) for q in questions]
    located = {item: lookup_truth(truth, *item) for item in expected}
    matched = match_answers(answers.records, key, expected)

    # Per category: question results, and per image whether all its questions are right.
    per_category: dict[str, dict] = {}
    for item in expected:
        category, _, question = located[item]
        record = matched.by_key.get(item)
        hit = record is not None and parse_yes_no(record.get("text", "")) == truth[located[item]]
        stats = per_category.setdefault(category, {"n": 0, "correct": 0, "images": {}})
        stats["n"] += 1
        stats["correct"] += hit
        image = item[0]
        stats["images"][image] = stats["images"].get(image, True) and hit

    metrics: dict[str, float | None] = {}
    scores = {}
    for category, stats in per_category.items():
        acc = stats["correct"] / stats["n"]
        acc_plus = sum(stats["images"].values()) / len(stats["images"])
        scores[category] = 100.0 * (acc + acc_plus)
    notes = []
    absent = [c for c in PERCEPTION + COGNITION if c not in scores]
    if absent:
        notes.append(f"subtasks absent from the question file (not in the sums): {', '.join(absent)}")
    metrics["perception"] = sum(scores[c] for c in PERCEPTION if c in scores)
    metrics["cognition"] = sum(scores[c] for c in COGNITION if c in scores)
    metrics["total"] = metrics["perception"] + metrics["cognition"]
    for category in PERCEPTION + COGNITION:
        if category in scores:
            metrics[category] = scores[category]
    for category in sorted(set(scores) - set(PERCEPTION + COGNITION)):
        metrics[category] = scores[category]
        notes.append(f"category {category!r} is not an official subtask: reported, not summed")

    # Result txt files in the converter's layout, answer-file order.
    lines: dict[str, list[str]] = {}
    for record in answers.records:
        try:
            item = key(record)
        except (KeyError, TypeError):
            continue
        if item not in located:
            continue
        category, txt_name, question = located[item]
        row = [txt_name, question, truth[located[item]].capitalize(), _one_line(record.get("text", ""))]
        lines.setdefault(category, []).append("\t".join(row))
    files = []
    for category, rows in lines.items():
        path = out_dir / "mme_results" / f"{category}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
        files.append(str(path))
    # Two questions share an image id: show missing items as "image id :: question".
    matched.missing = [f"{qid} :: {text.splitlines()[0]}" for qid, text in matched.missing]
    matched.unexpected = [f"{u[0]} :: {str(u[1]).splitlines()[0] if u[1] else ''}" if isinstance(u, tuple) else u
                          for u in matched.unexpected]
    return make_result(NAME, answers, matched, metrics, "total", len(expected), notes=notes, files=files)
