"""POPE (COCO): accuracy, precision, recall, F1 and yes-ratio per split, as LLaVA's `eval_pope.py`,
and the mean F1 over the splits (the reported POPE number, main metric "f1_mean").

Each split's labels come from `coco/coco_pope_<split>.json` (JSON lines with label yes/no).
Parsing: text before the first period, commas removed, split on single spaces; the answer is
"no" if a word is exactly "No", "no" or "not", otherwise "yes" (so "NO", "Not" and an empty
output count as yes). "yes" is the positive class. All values are percentages.

Differences from the official scorer: eval_pope.py pairs the answers of a split with the label
lines by position, so one missing answer shifts every label after it. Here the k-th question of
a split in `llava_pope_test.jsonl` is tied to the k-th label line of that split (which is what
the positional pairing means on complete, ordered inputs) and answers are matched by question_id.
A question without a prediction is left out of that split's counts (a confusion matrix has no
cell for "no answer") and listed in missing_ids. Precision/recall/F1 with a zero denominator are
0 here instead of a ZeroDivisionError.
"""
from __future__ import annotations

from pathlib import Path

from .common import (AnswerFile, BenchResult, DataFilesMissing, load_jsonl, make_result, match_answers,
                     require_dir, require_file)

NAME = "pope"
LABEL_PREFIX = "coco_pope_"


def parse_yes_no(text: str) -> str:
    first_sentence = text.split(".")[0] if "." in text else text
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


def split_metrics(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Metrics in percent for aligned yes/no predictions and labels ("yes" positive)."""
    tp = sum(p == "yes" and l == "yes" for p, l in zip(predictions, labels))
    fp = sum(p == "yes" and l == "no" for p, l in zip(predictions, labels))
    tn = sum(p == "no" and l == "no" for p, l in zip(predictions, labels))
    fn = sum(p == "no" and l == "yes" for p, l in zip(predictions, labels))
    n = tp + fp + tn + fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": 100.0 * (tp + tn) / n if n else 0.0,
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "f1": 100.0 * f1,
        "yes_ratio": 100.0 * sum(p == "yes" for p in predictions) / len(predictions) if predictions else 0.0,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist (cheap: nothing is parsed); raises DataFilesMissing."""
    require_file(data_root / "pope" / "llava_pope_test.jsonl", "LLaVA's POPE question file (eval.zip)")
    label_dir = require_dir(data_root / "pope" / "coco", "POPE's coco_pope_*.json label files")
    if not any(label_dir.glob(f"{LABEL_PREFIX}*.json")):
        raise DataFilesMissing(f"no {LABEL_PREFIX}*.json label files in {label_dir} (see docs/data.md)")


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    check_data(data_root)
    folder = data_root / "pope"
    questions = load_jsonl(require_file(folder / "llava_pope_test.jsonl", "LLaVA's POPE question file (eval.zip)"))
    label_dir = require_dir(folder / "coco", "POPE's coco_pope_*.json label files")
    label_files = sorted(label_dir.glob(f"{LABEL_PREFIX}*.json"))
    if not label_files:
        raise DataFilesMissing(f"no {LABEL_PREFIX}*.json label files in {label_dir} (see docs/data.md)")
    notes = []
    others = sorted(p.name for p in label_dir.iterdir() if p not in label_files)
    if others:
        notes.append(f"ignored files in {label_dir.name}/ (the official scorer asserts there are none): {others}")

    labels_by_split = {p.name[len(LABEL_PREFIX):-len(".json")]: load_jsonl(p) for p in label_files}
    label_of: dict[str, str] = {}  # question_id -> label
    position = {split: 0 for split in labels_by_split}
    mismatched_text = 0
    for q in questions:
        split = q.get("category")
        if split not in labels_by_split:
            continue
        k = position[split]
        position[split] += 1
        if k >= len(labels_by_split[split]):
            continue
        label_line = labels_by_split[split][k]
        label_of[str(q["question_id"])] = label_line["label"]
        mismatched_text += not q.get("text", "").startswith(label_line.get("text", ""))
    for split, labels in labels_by_split.items():
        if position[split] != len(labels):
            notes.append(f"split {split}: {position[split]} questions in the question file, {len(labels)} labels")
    if mismatched_text:
        notes.append(f"{mismatched_text} questions do not start with the text of the label line they are paired "
                     "with: question file and label files may be from different POPE versions")

    expected = [str(q["question_id"]) for q in questions if str(q["question_id"]) in label_of]
    split_of = {str(q["question_id"]): q["category"] for q in questions}
    matched = match_answers(answers.records, lambda r: str(r["question_id"]), expected)

    metrics: dict[str, float] = {}
    f1s, accs = [], []
    for split in labels_by_split:
        ids = [i for i in expected if split_of[i] == split and i in matched.by_key]
        predictions = [parse_yes_no(matched.by_key[i].get("text", "")) for i in ids]
        values = split_metrics(predictions, [label_of[i] for i in ids])
        for name, value in values.items():
            metrics[f"{split}/{name}"] = value
        f1s.append(values["f1"])
        accs.append(values["accuracy"])
    metrics = {"f1_mean": sum(f1s) / len(f1s), "accuracy_mean": sum(accs) / len(accs), **metrics}
    return make_result(NAME, answers, matched, metrics, "f1_mean", len(expected), notes=notes)
