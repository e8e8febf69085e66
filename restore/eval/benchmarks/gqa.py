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

Fixture (`write_fixture`, few items in the official formats): GQA:
data/testdev_balanced_questions.json (official), llava_gqa_testdev_balanced.jsonl, data/images/.
"""
from __future__ import annotations

import random
from pathlib import Path

from ...jsonio import read_json, read_jsonl, write_json, write_jsonl
from ..fixtures import SHORT_ANSWER, Info, SHAPES, draw_scene, other_colors, plural, random_scene, reference_line, save_image
from ..scoring.common import (AnswerFile, BenchResult, DataError, first_duplicate, load_json, load_jsonl, make_result,
                              match_answers, percent, require_fields, require_file)
from . import Benchmark

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


# ----------------------------------------------------------------------------------------------
# GQA: data/testdev_balanced_questions.json (official), llava_gqa_testdev_balanced.jsonl, data/images/


def write_fixture(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "gqa"
    questions, lines = {}, []
    qids = rng.sample(range(20_000_000, 21_000_000), n)
    first = None
    for i in range(n):
        if i % 2 == 0:  # two questions per image
            scene = random_scene(rng)
            image_id = f"n{rng.randint(100000, 999999)}"
            path = save_image(draw_scene(scene, rng), folder / "data" / "images" / f"{image_id}.jpg")
            first = first or {"first_image": path, "first_ids": []}
        shape, color = scene["shape"], scene["color"]
        kind = ("query", "verify", "logical", "choose", "compare")[i % 5]
        if kind == "query":
            q, a, full, semantic = f"What color is the {shape}?", color, f"The {shape} is {color}.", "attr"
        elif kind == "verify":
            q, a, full, semantic = f"Is there a {shape} in the picture?", "yes", f"Yes, there is a {shape}.", "obj"
        elif kind == "logical":
            absent = rng.choice([s for s in SHAPES if s != shape])
            q, a, full, semantic = (f"Are there both a {shape} and a {absent} in the picture?", "no",
                                    f"No, there is a {shape} but no {absent}.", "obj")
        elif kind == "choose":
            wrong = other_colors(rng, color, 1)[0]
            pair = [color, wrong] if rng.random() < 0.5 else [wrong, color]
            q, a, full, semantic = f"Is the {shape} {pair[0]} or {pair[1]}?", color, f"The {shape} is {color}.", "attr"
        else:
            q, a, full, semantic = (f"Do all the {plural(shape)} have the same color?", "yes",
                                    f"Yes, all the {plural(shape)} are {color}.", "attr")
        qid = str(qids[i])
        questions[qid] = {
            "semantic": [{"operation": "select", "dependencies": [], "argument": f"{shape} (0)"}],
            "entailed": [], "equivalent": [qid], "question": q, "imageId": image_id, "isBalanced": True,
            "groups": {"global": None, "local": f"{kind}-{shape}"}, "answer": a,
            "semanticStr": f"select: {shape} (0)", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "types": {"detailed": f"{kind}Attr", "semantic": semantic, "structural": kind}, "fullAnswer": full,
        }
        lines.append({"question_id": qid, "image": f"{image_id}.jpg", "text": f"{q}\n{SHORT_ANSWER}", "category": "default"})
        if i < 2:
            first["first_ids"].append(qid)
    write_json(folder / "data" / "testdev_balanced_questions.json", questions)
    write_jsonl(folder / "llava_gqa_testdev_balanced.jsonl", lines)
    return first


def reference_answers(data_root: Path, model_id: str = "reference") -> list[dict]:
    truth = read_json(annotation_path(data_root))
    return [reference_line(q["question_id"], q["text"], truth[q["question_id"]]["answer"], model_id)
            for q in read_jsonl(data_root / "gqa" / QUESTION_FILE)]


BENCHMARK = Benchmark(
    name="gqa",
    title="GQA test-dev balanced (accuracy).",
    entry="vqa_loader",
    question_file="gqa/llava_gqa_testdev_balanced.jsonl",
    image_folder="gqa/data/images",
    entry_args=(),
    evaluate=evaluate,
    check_data=check_data,
    data_files=("gqa/" + QUESTION_FILE, "gqa/data/testdev_balanced_questions.json"),
    write_fixture=write_fixture,
    reference_answers=reference_answers,
)
