"""SEED-Bench (v1): exact-letter accuracy, as LLaVA's SEED converter computes it.

A prediction is correct only if the output text equals the answer letter exactly ("A." and
"a" are wrong). Accuracy per evaluation dimension (question_type_id, named from the
annotation's `question_type` map), over all questions ("total_accuracy": the SEED number of
LLaVA's model zoo and of the paper, 58.6 for LLaVA-1.5-7B, the main metric), over image questions
("image_accuracy", SEED-IMG) and over video questions.

Which questions are expected: all of them, unless the run answered image questions only. That is
known from the answers' settings (`--only-images-under SEED-Bench-image`, recorded in
`<answers>.meta.json`) or, for an answer file without settings, from there being no answer to any
video question. An image-only run is SEED-IMG: video questions are not expected, total and video
accuracy are None and main_metric is "image_accuracy", so that no report shows it as SEED.
Missing predictions count as wrong, as in the official converter (which then crashes writing
the upload file; here the upload file lists the answered questions only, in annotation order).
The official converter also raises KeyError when every question of a dimension is answered and
none correctly; here that dimension scores 0.

Data checks (also by check_data, before inference): the questions of LLaVA's question file
`llava-seed-bench.jsonl` are exactly the annotation's questions, with the same question text
(LLaVA issue #1207: the current SEED-Bench.json release does not match that question file);
otherwise a DataError names the first line that differs.

Fixture (`write_fixture`, few items in the official formats): SEED-Bench: SEED-Bench.json
(official), llava-seed-bench.jsonl, SEED-Bench-image/, SEED-Bench-video-image/.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ...jsonio import read_json, read_jsonl, write_json, write_jsonl
from ..answer_files import read_meta
from ..fixtures import (LETTER_ANSWER, Info, draw_scene, options_text, other_colors, plural, random_scene,
                        reference_line, save_image)
from ..scoring.common import (AnswerFile, BenchResult, DataError, first_duplicate, load_json, load_jsonl, make_result,
                              match_answers, percent, require_fields, require_file)
from . import Benchmark

NAME = "seed"
ANNOTATION = "SEED-Bench.json"
QUESTION_FILE = "llava-seed-bench.jsonl"


@dataclass
class SeedData:
    questions: list[dict]  # annotation questions, annotation order
    dimension_name: dict[int, str]
    image_of: dict[str, str]  # question_id -> image path in the question file


def load_data(data_root: Path) -> SeedData:
    """Read the annotation and the question file and check that they hold the same questions."""
    folder = data_root / "seed_bench"
    path = require_file(folder / ANNOTATION, "official SEED-Bench.json annotation")
    question_file = require_file(folder / QUESTION_FILE, "LLaVA's SEED question file (eval.zip)")
    annotation = load_json(path)
    if not isinstance(annotation, dict):
        raise DataError(f"{path} is not the SEED-Bench annotation (a JSON object with questions, question_type)")
    require_fields(annotation, ("questions", "question_type"), str(path))
    questions = [require_fields(q, ("question_id", "data_type", "answer", "question_type_id", "question"),
                                f"{path}, question {i + 1}") for i, q in enumerate(annotation["questions"])]
    by_id = {str(q["question_id"]): q for q in questions}
    lines = load_jsonl(question_file)
    image_of = {}
    for number, line in enumerate(lines, start=1):
        require_fields(line, ("question_id", "image", "text"), f"{question_file} line {number}")
        qid = str(line["question_id"])
        question = by_id.get(qid)
        if question is None or not line["text"].startswith(str(question["question"])):
            found = "is not in" if question is None else "has another question text than"
            raise DataError(f"{question_file} line {number}: question {qid} {found} {path}: question file and "
                            "annotation are from different SEED-Bench releases (LLaVA issue #1207)")
        image_of[qid] = line["image"]
    repeated = first_duplicate(str(line["question_id"]) for line in lines)
    if repeated:
        raise DataError(f"{question_file} line {repeated[0] + 1} repeats question {repeated[1]}")
    if len(image_of) != len(by_id):
        unasked = next(qid for qid in by_id if qid not in image_of)
        raise DataError(f"{path} has {len(by_id)} questions, {question_file} {len(image_of)} (e.g. {unasked} is not "
                        "asked): question file and annotation do not match")
    dimension_name = {type_id: name for name, type_id in annotation["question_type"].items()}
    return SeedData(questions, dimension_name, image_of)


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist and agree (see the module docstring); raises DataError."""
    load_data(data_root)


def image_only_run(answers: AnswerFile, data: SeedData) -> tuple[bool, str]:
    """(whether the run answered image questions only, how that is known)."""
    settings = (read_meta(str(answers.path)) or {}).get("settings") or {}
    under = settings.get("only_images_under")
    if under:
        video_asked = any(q["data_type"] == "video" and data.image_of[str(q["question_id"])].startswith(under)
                          for q in data.questions)
        return not video_asked, f"the run's settings (only_images_under={under!r})"
    if settings:
        return False, "the run's settings (all questions)"
    answered = {str(r.get("question_id")) for r in answers.records}
    videos = any(q["data_type"] == "video" and str(q["question_id"]) in answered for q in data.questions)
    return not videos, "the answers (no settings file; no video question answered)"


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    data = load_data(data_root)
    questions = data.questions
    images_only, known_from = image_only_run(answers, data)
    notes = []
    if images_only:
        n_video = sum(q["data_type"] == "video" for q in questions)
        questions = [q for q in questions if q["data_type"] != "video"]
        notes.append(f"SEED-IMG: image questions only, known from {known_from}; {n_video} video questions not "
                     "expected, so there is no SEED (all questions) accuracy")

    matched = match_answers(answers.records, lambda r: str(r["question_id"]), [str(q["question_id"]) for q in questions])
    correct: dict[str, int] = {}
    count: dict[str, int] = {}

    def add(group: str, hit: bool) -> None:
        count[group] = count.get(group, 0) + 1
        correct[group] = correct.get(group, 0) + int(hit)

    upload = []
    for q in questions:
        record = matched.by_key.get(str(q["question_id"]))
        hit = record is not None and record.get("text") == q["answer"]
        add("total", hit)
        add(q["data_type"], hit)
        add(data.dimension_name.get(q["question_type_id"], str(q["question_type_id"])), hit)
        if record is not None:
            upload.append({"question_id": q["question_id"], "prediction": record.get("text", "")})

    metrics = {
        "total_accuracy": None if images_only else percent(correct["total"], count["total"]),
        "image_accuracy": percent(correct.get("image", 0), count.get("image", 0)),
        "video_accuracy": None if images_only else percent(correct.get("video", 0), count.get("video", 0)),
    }
    for type_id in sorted(data.dimension_name):
        name = data.dimension_name[type_id]
        if name in count:
            metrics[name] = percent(correct[name], count[name])
    files = [write_jsonl(out_dir / f"seed_bench_{model_id}.jsonl", upload)]
    main_metric = "image_accuracy" if images_only else "total_accuracy"
    return make_result(NAME, answers, matched, metrics, main_metric, len(questions), notes=notes, files=files)


# ----------------------------------------------------------------------------------------------
# SEED-Bench: SEED-Bench.json (official), llava-seed-bench.jsonl, SEED-Bench-image/, SEED-Bench-video-image/

SEED_DIMENSIONS = ("Scene Understanding", "Instance Identity", "Instance Attributes", "Instance Location",
                   "Instances Counting", "Spatial Relation", "Instance Interaction", "Visual Reasoning",
                   "Text Understanding", "Action Recognition", "Action Prediction", "Procedure Understanding")


def _seed_question(scene: dict, rng: random.Random) -> tuple[str, list[str], int, int]:
    """(question, four choices, index of the right one, question_type_id) for an image question."""
    if rng.random() < 0.5:
        right = str(scene["count"])
        wrong = [str(c) for c in rng.sample([c for c in range(1, 8) if c != scene["count"]], 3)]
        question, type_id = f"How many {plural(scene['shape'])} are in the image?", 5
    else:
        right, wrong = scene["color"], other_colors(rng, scene["color"], 3)
        question, type_id = f"What is the color of the {plural(scene['shape'])}?", 3
    choices = wrong[:]
    answer = rng.randrange(4)
    choices.insert(answer, right)
    return question, choices, answer, type_id


def write_fixture(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "seed_bench"
    entries, lines, first = [], [], None
    image_qids = rng.sample(range(100_000, 110_000), n)
    n_video = max(2, n // 3)
    for i in range(n + n_video):
        scene = random_scene(rng)
        video = i >= n
        question, choices, answer, type_id = _seed_question(scene, rng)
        if video:
            qid = f"v{rng.randint(1000, 9999)}{i}"
            type_id = 10 + i % 3
            question = f"What happens to the {plural(scene['shape'])} in the video?"
            data_id = f"{rng.randint(10000, 99999)}.mp4"
            image_rel = f"SEED-Bench-video-image/{type_id}_{qid}.png"
        else:
            qid = str(image_qids[i])
            data_id = f"{rng.randint(1_000_000, 9_999_999)}_{rng.randint(1_000_000_000, 9_999_999_999)}.jpg"
            image_rel = f"SEED-Bench-image/{data_id}"
        path = save_image(draw_scene(scene, rng), folder / image_rel)
        entry = {"answer": "ABCD"[answer], "choice_a": choices[0], "choice_b": choices[1], "choice_c": choices[2],
                 "choice_d": choices[3], "data_id": data_id, "data_type": "video" if video else "image",
                 "question": question, "question_id": qid, "question_type_id": type_id}
        entries.append(entry)
        lines.append({"image": image_rel, "text": f"{question}\n{options_text(choices)}\n{LETTER_ANSWER}",
                      "category": SEED_DIMENSIONS[type_id - 1], "question_id": qid if video else int(qid)})
        first = first or {"first_image": path, "first_ids": [lines[-1]["question_id"]]}
    annotation = {"question_type": {name: i + 1 for i, name in enumerate(SEED_DIMENSIONS)}, "questions": entries}
    write_json(folder / "SEED-Bench.json", annotation)
    write_jsonl(folder / "llava-seed-bench.jsonl", lines)
    (folder / "answers_upload").mkdir(parents=True, exist_ok=True)
    return first


def reference_answers(data_root: Path, model_id: str = "reference") -> list[dict]:
    truth = {str(q["question_id"]): q["answer"] for q in read_json(data_root / "seed_bench" / ANNOTATION)["questions"]}
    return [reference_line(q["question_id"], q["text"], truth[str(q["question_id"])], model_id)
            for q in read_jsonl(data_root / "seed_bench" / QUESTION_FILE)]


BENCHMARK = Benchmark(
    name="seed",
    title="SEED-Bench (image + video-frame questions).",
    entry="vqa_loader",
    question_file="seed_bench/llava-seed-bench.jsonl",
    image_folder="seed_bench",
    entry_args=(),
    usage_note="Without the video frames (docs/data.md), answer the image questions only: --only-images-under SEED-Bench-image",
    evaluate=evaluate,
    check_data=check_data,
    data_files=("seed_bench/" + QUESTION_FILE, "seed_bench/" + ANNOTATION),
    write_fixture=write_fixture,
    reference_answers=reference_answers,
)
