"""POPE (COCO): accuracy, precision, recall, F1 and yes-ratio per split, as LLaVA's `eval_pope.py`,
and the mean F1 over the splits (the reported POPE number, main metric "f1_mean").

The benchmark is exactly three splits, adversarial, popular and random, whose labels come from
`coco/coco_pope_<split>.json` (JSON lines with label yes/no); that folder holds nothing else (the
official scorer asserts so). The k-th label line of a split must be the k-th question of that split in
`llava_pope_test.jsonl`: same image, same question text (the question file adds LLaVA's suffix on a
new line), and as many label lines as questions. Anything else (a missing or extra split, another
POPE release such as the current one, whose random split has 3,000 items instead of LLaVA's 2,910)
is a DataError naming the first line that differs, raised by check_data too, before inference.
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

Fixture (`write_fixture`, few items in the official formats): POPE:
coco/coco_pope_{adversarial,popular,random}.json, llava_pope_test.jsonl, val2014/.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from ...jsonio import read_jsonl, write_jsonl
from ..fixtures import SHORT_ANSWER, Info, draw_scene, random_scene, reference_line, save_image
from ..scoring.common import (AnswerFile, BenchResult, DataError, DataFilesMissing, load_jsonl, make_result,
                              match_answers, require_dir, require_fields, require_file)
from . import Benchmark

NAME = "pope"
LABEL_PREFIX = "coco_pope_"
SPLITS = ("adversarial", "popular", "random")
QUESTION_FILE = "llava_pope_test.jsonl"


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


def label_file_name(split: str) -> str:
    return f"{LABEL_PREFIX}{split}.json"


@dataclass
class PopeData:
    """Question ids of each split in question-file order, and the label of every question id."""

    ids_by_split: dict[str, list[str]]
    label_of: dict[str, str]


def _check_label_folder(label_dir: Path) -> None:
    expected = {label_file_name(split) for split in SPLITS}
    present = {p.name for p in label_dir.iterdir()}
    absent = sorted(expected - present)
    if absent:
        raise DataFilesMissing(f"missing {', '.join(str(label_dir / name) for name in absent)}: POPE needs exactly the "
                               f"label files {', '.join(sorted(expected))} (POPE commit e3e3926, see docs/data.md)")
    extra = sorted(present - expected)
    if extra:
        raise DataError(f"{label_dir} holds {extra} besides the three POPE label files: POPE is exactly the splits "
                        f"{', '.join(SPLITS)}; move the other files out of that folder")


def _questions_by_split(question_file: Path) -> dict[str, list[tuple[int, dict]]]:
    """(line number, question) of each split, in file order; a category outside SPLITS is a DataError."""
    by_split: dict[str, list[tuple[int, dict]]] = {split: [] for split in SPLITS}
    for number, question in enumerate(load_jsonl(question_file), start=1):
        require_fields(question, ("question_id", "image", "text", "category"), f"{question_file} line {number}")
        if question["category"] not in by_split:
            raise DataError(f"{question_file} line {number}: category {question['category']!r} is not a POPE split "
                            f"({', '.join(SPLITS)}): not LLaVA's POPE question file")
        by_split[question["category"]].append((number, question))
    return by_split


def question_matches_label(question: dict, label: dict) -> bool:
    """Same image and same question: the question file's text is the label text plus LLaVA's suffix line."""
    return (question["image"] == label["image"]
            and question["text"].split("\n")[0].strip() == str(label["text"]).strip())


def _pair_split(split: str, questions: list[tuple[int, dict]], label_file: Path,
                question_file: Path) -> dict[str, str]:
    labels = load_jsonl(label_file)
    for k, label in enumerate(labels[:len(questions)]):
        require_fields(label, ("image", "text", "label"), f"{label_file} line {k + 1}")
        number, question = questions[k]
        if not question_matches_label(question, label):
            raise DataError(
                f"{label_file} line {k + 1} ({label['image']}: {label['text']!r}) does not match the {split} "
                f"question {k + 1} of {question_file} (line {number}: {question['image']}: "
                f"{question['text'].splitlines()[0]!r}): question file and label files are from different POPE "
                "versions (LLaVA used POPE commit e3e3926, see docs/data.md)")
        if str(label["label"]).lower() not in ("yes", "no"):
            raise DataError(f"{label_file} line {k + 1}: label {label['label']!r} is not yes/no")
    if len(labels) != len(questions):
        first_unpaired = (f"label line {len(questions) + 1} has no question" if len(labels) > len(questions)
                          else f"question line {questions[len(labels)][0]} of {question_file} has no label")
        raise DataError(f"{label_file} has {len(labels)} label lines but {question_file} has {len(questions)} {split} "
                        f"questions ({first_unpaired}): question file and label files are from different POPE "
                        "versions (LLaVA used POPE commit e3e3926, whose random split has 2,910 items)")
    return {str(question["question_id"]): str(label["label"]).lower()
            for (_, question), label in zip(questions, labels)}


def load_data(data_root: Path) -> PopeData:
    """Read and cross-check the question file and the three label files; DataError on any mismatch."""
    folder = data_root / "pope"
    question_file = require_file(folder / QUESTION_FILE, "LLaVA's POPE question file (eval.zip)")
    label_dir = require_dir(folder / "coco", "POPE's coco_pope_*.json label files")
    _check_label_folder(label_dir)
    by_split = _questions_by_split(question_file)
    label_of: dict[str, str] = {}
    for split in SPLITS:
        if not by_split[split]:
            raise DataError(f"{question_file} has no {split} question: POPE needs all of {', '.join(SPLITS)}")
        label_of.update(_pair_split(split, by_split[split], label_dir / label_file_name(split), question_file))
    ids_by_split = {split: [str(q["question_id"]) for _, q in by_split[split]] for split in SPLITS}
    if len(label_of) != sum(map(len, ids_by_split.values())):
        raise DataError(f"{question_file} repeats a question_id: answers could not be told apart")
    return PopeData(ids_by_split, label_of)


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist and agree (see the module docstring); raises DataError."""
    load_data(data_root)


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    data = load_data(data_root)
    expected = [qid for split in SPLITS for qid in data.ids_by_split[split]]
    matched = match_answers(answers.records, lambda r: str(r["question_id"]), expected)

    metrics: dict[str, float] = {}
    f1s, accs = [], []
    for split in SPLITS:
        ids = [i for i in data.ids_by_split[split] if i in matched.by_key]
        predictions = [parse_yes_no(matched.by_key[i].get("text", "")) for i in ids]
        values = split_metrics(predictions, [data.label_of[i] for i in ids])
        for name, value in values.items():
            metrics[f"{split}/{name}"] = value
        f1s.append(values["f1"])
        accs.append(values["accuracy"])
    metrics = {"f1_mean": sum(f1s) / len(f1s), "accuracy_mean": sum(accs) / len(accs), **metrics}
    return make_result(NAME, answers, matched, metrics, "f1_mean", len(expected))


# ----------------------------------------------------------------------------------------------
# POPE: coco/coco_pope_{adversarial,popular,random}.json, llava_pope_test.jsonl, val2014/

POPE_SPLITS = ("adversarial", "popular", "random")
POPE_OBJECTS = ("person", "dog", "car", "chair", "bottle", "cup", "bicycle", "umbrella")


def write_fixture(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "pope"
    image_ids = rng.sample(range(1, 581_000), max(2, math.ceil(n / 2)))
    images = []
    for image_id in image_ids:
        name = f"COCO_val2014_{image_id:012d}.jpg"
        images.append((name, save_image(draw_scene(random_scene(rng), rng), folder / "val2014" / name)))
    lines, first, global_id = [], None, 0
    for split in POPE_SPLITS:
        labels = []
        for k in range(n):
            name, path = images[k % len(images)]
            text = f"Is there a {rng.choice(POPE_OBJECTS)} in the image?"
            label = "yes" if (k + rng.randint(0, 1)) % 2 else "no"
            labels.append({"question_id": k + 1, "image": name, "text": text, "label": label})
            global_id += 1
            lines.append({"question_id": global_id, "image": name, "text": f"{text}\n{SHORT_ANSWER}", "category": split})
            if k % len(images) == 0 and first is None:
                first = {"first_image": path, "first_ids": []}
            if path == first["first_image"]:
                first["first_ids"].append(global_id)
        write_jsonl(folder / "coco" / f"coco_pope_{split}.json", labels)
    write_jsonl(folder / "llava_pope_test.jsonl", lines)
    return first


def reference_answers(data_root: Path, model_id: str = "reference") -> list[dict]:
    labels = {split: read_jsonl(data_root / "pope" / "coco" / label_file_name(split)) for split in SPLITS}
    seen = {split: 0 for split in SPLITS}
    lines = []
    for q in read_jsonl(data_root / "pope" / QUESTION_FILE):
        label = labels[q["category"]][seen[q["category"]]]["label"]
        seen[q["category"]] += 1
        lines.append(reference_line(q["question_id"], q["text"], label.capitalize(), model_id))
    return lines


BENCHMARK = Benchmark(
    name="pope",
    title="POPE (COCO adversarial / popular / random; mean F1).",
    entry="vqa_loader",
    question_file="pope/llava_pope_test.jsonl",
    image_folder="pope/val2014",
    entry_args=(),
    evaluate=evaluate,
    check_data=check_data,
    data_files=("pope/" + QUESTION_FILE,) + tuple(f"pope/coco/{label_file_name(split)}" for split in SPLITS),
    write_fixture=write_fixture,
    reference_answers=reference_answers,
)
