"""GQA test-dev balanced: exact-match accuracy, as the official GQA `eval.py --tier testdev_balanced`.

Conversion (LLaVA's GQA converter): prediction = answer text with trailing periods removed,
lower-cased; written to `testdev_balanced_predictions.json` as [{questionId, prediction}]
(the official eval.py reads that file). Score: 1 if the prediction equals the gold `answer`
string exactly, over the questions flagged `isBalanced`; Binary/Open split by the question's
structural type ("query" is open, every other type binary).

Difference from the official scorer: eval.py raises KeyError on a question without a
prediction. Here a missing question scores 0 (it stays in the denominator) and is listed in
missing_ids, so the accuracy of an incomplete run is a lower bound; on complete inputs the
numbers are identical.

Data checks (also by check_data, before inference): the questions of LLaVA's question file
`llava_gqa_testdev_balanced.jsonl` are exactly the balanced questions of the annotation, so the
accuracy is over the questions that were asked; otherwise a DataError names the first difference.
"""
from __future__ import annotations

from pathlib import Path

from .common import (AnswerFile, BenchResult, DataError, first_duplicate, load_json, load_jsonl, make_result,
                     match_answers, percent, require_fields, require_file, write_json)

NAME = "gqa"
QUESTION_FILE = "llava_gqa_testdev_balanced.jsonl"


def convert_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def annotation_path(data_root: Path) -> Path:
    return data_root / "gqa" / "data" / "testdev_balanced_questions.json"


def load_balanced(data_root: Path) -> dict[str, dict]:
    """The balanced annotation questions by id, checked against the question file (module docstring)."""
    path = require_file(annotation_path(data_root), "official GQA testdev_balanced_questions.json")
    question_file = require_file(data_root / "gqa" / QUESTION_FILE, "LLaVA's GQA question file (eval.zip)")
    questions = load_json(path)
    if not isinstance(questions, dict):
        raise DataError(f"{path} is not a GQA questions file (a JSON object keyed by question id)")
    balanced = {}
    for qid, question in questions.items():
        if question.get("isBalanced", True):
            balanced[str(qid)] = require_fields(question, ("answer",), f"{path}, question {qid}")
    asked = [str(require_fields(q, ("question_id",), f"{question_file} line {n}")["question_id"])
             for n, q in enumerate(load_jsonl(question_file), start=1)]
    for number, qid in enumerate(asked, start=1):
        if qid not in balanced:
            raise DataError(f"{question_file} line {number}: question {qid} is not a balanced question of {path}: "
                            "question file and annotation do not match")
    repeated = first_duplicate(asked)
    if repeated:
        raise DataError(f"{question_file} line {repeated[0] + 1} repeats question {repeated[1]}")
    if len(asked) != len(balanced):
        asked_set = set(asked)
        unasked = next(qid for qid in balanced if qid not in asked_set)
        raise DataError(f"{path} has {len(balanced)} balanced questions, {question_file} {len(asked)} "
                        f"(e.g. {unasked} is not asked): question file and annotation do not match")
    return balanced


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist and agree (see the module docstring); raises DataError."""
    load_balanced(data_root)


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    balanced = load_balanced(data_root)
    matched = match_answers(answers.records, lambda r: str(r["question_id"]), balanced)

    predictions = [
        {"questionId": str(r["question_id"]), "prediction": convert_prediction(r.get("text", ""))}
        for r in answers.records
        if str(r.get("question_id")) in balanced
    ]
    files = [write_json(out_dir / "testdev_balanced_predictions.json", predictions)]
    predicted = {p["questionId"]: p["prediction"] for p in predictions}

    correct = {"all": 0, "binary": 0, "open": 0}
    count = {"all": 0, "binary": 0, "open": 0}
    for qid, question in balanced.items():
        kind = "open" if question.get("types", {}).get("structural") == "query" else "binary"
        hit = int(qid in predicted and predicted[qid] == question["answer"])
        for group in ("all", kind):
            count[group] += 1
            correct[group] += hit
    metrics = {
        "accuracy": percent(correct["all"], count["all"]),
        "binary": percent(correct["binary"], count["binary"]),
        "open": percent(correct["open"], count["open"]),
    }
    return make_result(NAME, answers, matched, metrics, "accuracy", len(balanced), files=files)
