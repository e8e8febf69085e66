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
"""
from __future__ import annotations

from pathlib import Path

from .common import AnswerFile, BenchResult, load_json, make_result, match_answers, percent, require_file, write_json

NAME = "gqa"


def convert_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def annotation_path(data_root: Path) -> Path:
    return data_root / "gqa" / "data" / "testdev_balanced_questions.json"


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist (cheap: nothing is parsed); raises DataFilesMissing."""
    require_file(annotation_path(data_root), "official GQA testdev_balanced_questions.json")


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    check_data(data_root)
    questions = load_json(require_file(annotation_path(data_root), "official GQA testdev_balanced_questions.json"))
    balanced = {qid: q for qid, q in questions.items() if q.get("isBalanced", True)}
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
