"""OCRBench: Final Score (correct answers out of 1000, main metric "final_score") with the sums
per question type, as RESTORE's `model_vqa_ocrbench eval` and the official OCRBench example.

Answer lines use OCRBench's own schema: the six fields of the OCRBench.json item (dataset_name,
id, image_path, question, answers, type) plus `predict`. An item is correct if one of its answers
is a substring of the prediction, after: HME100k: strip, newlines to spaces, all spaces removed
(case kept); other datasets: lower-case, strip, newlines to spaces. "text_recognition" sums the
six recognition types (max 300); "dataset/<name>" gives each source dataset's accuracy in percent
(what the official script prints when there are not exactly 1000 results); "accuracy" is
final_score / max_score in percent.

Differences from the official scorer: it reads the answers' own copies of the annotation fields,
and prints a Final Score only when exactly 1000 lines were scored. Here answers are matched to
OCRBench.json items by (dataset_name, id, image_path, question); an unanswered item scores 0
and is listed in missing_ids, so final_score is always defined (a lower bound when incomplete).

Data checks (also by check_data, before inference): every item has the six fields and one of the
ten OCRBench types, and no item (dataset_name, id, image_path, question) repeats.

Fixture (`write_fixture`, few items in the official formats): OCRBench: OCRBench.json (official
list), data/<image_path>.
"""
from __future__ import annotations

import random
from pathlib import Path

from ...jsonio import read_json, write_json
from ..fixtures import Info, draw_scene, random_scene, save_image
from ..scoring.common import (AnswerFile, BenchResult, DataError, first_duplicate, load_json, make_result,
                              match_answers, percent, require_fields, require_file)
from . import Benchmark

NAME = "ocrbench"
RECOGNITION_TYPES = (
    "Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
)
OTHER_TYPES = (
    "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
    "Handwritten Mathematical Expression Recognition",
)
MATH_DATASET = "HME100k"


def _clean(text: str, dataset: str) -> str:
    if dataset == MATH_DATASET:
        return text.strip().replace("\n", " ").replace(" ", "")
    return text.lower().strip().replace("\n", " ")


def is_correct(prediction: str, answers: str | list[str], dataset: str) -> bool:
    candidates = answers if isinstance(answers, list) else [answers]
    pred = _clean(prediction, dataset)
    return any(_clean(answer, dataset) in pred for answer in candidates)


def item_key(item: dict) -> tuple[str, str, str, str]:
    return str(item["dataset_name"]), str(item["id"]), str(item["image_path"]), str(item["question"])


ITEM_FIELDS = ("dataset_name", "id", "image_path", "question", "answers", "type")


def load_items(data_root: Path) -> list[dict]:
    """OCRBench.json's items, checked as the module docstring says."""
    path = require_file(data_root / "ocrbench" / "OCRBench.json", "official OCRBench.json")
    items = load_json(path)
    if not isinstance(items, list):
        raise DataError(f"{path} is not OCRBench.json (a JSON list of items)")
    for number, item in enumerate(items, start=1):
        require_fields(item, ITEM_FIELDS, f"{path} item {number}")
        if item["type"] not in RECOGNITION_TYPES + OTHER_TYPES:
            raise DataError(f"{path} item {number}: type {item['type']!r} is not an OCRBench question type")
    repeated = first_duplicate(item_key(item) for item in items)
    if repeated:
        raise DataError(f"{path} item {repeated[0] + 1} repeats item {repeated[1][:2]}: answers could not be told apart")
    return items


def check_data(data_root: Path) -> None:
    """The data file the scorer reads exists and is consistent; raises DataError."""
    load_items(data_root)


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    items = load_items(data_root)
    keys = [item_key(item) for item in items]
    matched = match_answers(answers.records, item_key, keys)

    per_type: dict[str, int] = {t: 0 for t in RECOGNITION_TYPES + OTHER_TYPES}
    per_dataset: dict[str, list[int]] = {}
    total = 0
    for key, item in zip(keys, items):
        record = matched.by_key.get(key)
        hit = int(record is not None and is_correct(str(record.get("predict", "")), item["answers"], item["dataset_name"]))
        total += hit
        per_type[item["type"]] = per_type.get(item["type"], 0) + hit
        per_dataset.setdefault(item["dataset_name"], []).append(hit)

    metrics: dict[str, float | int | None] = {
        "final_score": total,
        "max_score": len(items),
        "accuracy": percent(total, len(items)),
        "text_recognition": sum(per_type[t] for t in RECOGNITION_TYPES),
    }
    metrics.update(per_type)
    for name in sorted(per_dataset):
        metrics[f"dataset/{name}"] = percent(sum(per_dataset[name]), len(per_dataset[name]))
    matched.missing = [f"{dataset}/{item_id} ({image_path})" for dataset, item_id, image_path, _ in matched.missing]
    notes = [] if len(items) == 1000 else [f"OCRBench.json has {len(items)} items, not 1000: final_score is out of {len(items)}"]
    return make_result(NAME, answers, matched, metrics, "final_score", len(items), notes=notes)


# ----------------------------------------------------------------------------------------------
# OCRBench: OCRBench.json (official list), data/<image_path>

OCRBENCH_SOURCES = (  # dataset_name, type, question
    ("IIIT5K", "Regular Text Recognition", "what is written in the image?"),
    ("ct80", "Irregular Text Recognition", "what is written in the image?"),
    ("WordArt", "Artistic Text Recognition", "what is written in the image?"),
    ("IAM", "Handwriting Recognition", "what is written in the image?"),
    ("ORAND", "Digit String Recognition", "what is the number in the image?"),
    ("NonSemanticText", "Non-Semantic Text Recognition", "what are the characters in the image?"),
    ("STVQA", "Scene Text-centric VQA", "What does the sign say?"),
    ("docVQA", "Doc-oriented VQA", "What is the title of the document?"),
    ("FUNSD", "Key Information Extraction", "What is the company name?"),
    ("HME100k", "Handwritten Mathematical Expression Recognition",
     "Please write out the expression of the formula in the image using LaTeX format."),
)


def write_fixture(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "ocrbench"
    items, first = [], None
    # HME100k (scored without spaces, case kept) first, then the other sources in a seeded order.
    order = [OCRBENCH_SOURCES[-1]] + rng.sample(OCRBENCH_SOURCES[:-1], len(OCRBENCH_SOURCES) - 1)
    for i in range(n):
        dataset, kind, question = order[i % len(order)]
        scene = random_scene(rng)
        if dataset == "HME100k":
            answers = f"{rng.randint(2, 9)} x ^ {{ 2 }} + {rng.randint(1, 9)}"
        elif dataset == "ORAND":
            answers = [str(rng.randint(100, 99999))]
        else:
            answers = [scene["word"], scene["word"].upper()] if i % 2 else [scene["word"]]
        scene["word"] = answers if isinstance(answers, str) else answers[0]
        image_path = f"{dataset}/test/{i}_{rng.randint(1, 9)}.png"
        path = save_image(draw_scene(scene, rng, with_word=True), folder / "data" / image_path)
        items.append({"dataset_name": dataset, "id": i, "image_path": image_path, "question": question,
                      "answers": answers, "type": kind})
        first = first or {"first_image": path, "first_ids": [i]}
    write_json(folder / "OCRBench.json", items, indent=1)
    return first


def reference_answers(data_root: Path, model_id: str = "reference") -> list[dict]:
    """OCRBench's own answer schema: the item's fields plus `predict`."""
    return [{**item, "predict": item["answers"] if isinstance(item["answers"], str) else item["answers"][0]}
            for item in read_json(data_root / "ocrbench" / "OCRBench.json")]


BENCHMARK = Benchmark(
    name="ocrbench",
    title="OCRBench (final score out of 1000).",
    entry="ocrbench",
    question_file="ocrbench/OCRBench.json",
    image_folder="ocrbench/data",
    entry_args=(),
    evaluate=evaluate,
    check_data=check_data,
    data_files=("ocrbench/OCRBench.json",),
    write_fixture=write_fixture,
    reference_answers=reference_answers,
)
