"""SEED-Bench (v1): exact-letter accuracy, as LLaVA's SEED converter computes it.

A prediction is correct only if the output text equals the answer letter exactly ("A." and
"a" are wrong). Accuracy per evaluation dimension (question_type_id, named from the
annotation's `question_type` map), over all questions ("total_accuracy", LLaVA's "SEED"),
over image questions ("image_accuracy", SEED-IMG, the main metric here) and over video questions.

Image-only runs: when no video question was answered at all, the video questions are not
expected (the run evaluated SEED-IMG only); total and video accuracy are then None and a note
says so. As soon as one video question is answered, every annotation question is expected.
Missing predictions count as wrong, as in the official converter (which then crashes writing
the upload file; here the upload file lists the answered questions only, in annotation order).
The official converter also raises KeyError when every question of a dimension is answered and
none correctly; here that dimension scores 0.
"""
from __future__ import annotations

from pathlib import Path

from .common import AnswerFile, BenchResult, load_json, make_result, match_answers, percent, require_file, write_jsonl

NAME = "seed"


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist (cheap: nothing is parsed); raises DataFilesMissing."""
    require_file(data_root / "seed_bench" / "SEED-Bench.json", "official SEED-Bench.json annotation")


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    check_data(data_root)
    annotation = load_json(require_file(data_root / "seed_bench" / "SEED-Bench.json", "official SEED-Bench.json annotation"))
    dimension_name = {type_id: name for name, type_id in annotation["question_type"].items()}
    questions = annotation["questions"]

    answered_ids = {str(r.get("question_id")) for r in answers.records}
    videos_answered = any(q["data_type"] == "video" and str(q["question_id"]) in answered_ids for q in questions)
    notes = []
    if not videos_answered:
        n_video = sum(q["data_type"] == "video" for q in questions)
        questions = [q for q in questions if q["data_type"] != "video"]
        if n_video:
            notes.append(f"no video question answered: scored as SEED-IMG only ({n_video} video questions not expected)")

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
        add(dimension_name.get(q["question_type_id"], str(q["question_type_id"])), hit)
        if record is not None:
            upload.append({"question_id": q["question_id"], "prediction": record.get("text", "")})

    metrics = {
        "image_accuracy": percent(correct.get("image", 0), count.get("image", 0)),
        "total_accuracy": percent(correct["total"], count["total"]) if videos_answered else None,
        "video_accuracy": percent(correct.get("video", 0), count.get("video", 0)) if videos_answered else None,
    }
    for type_id in sorted(dimension_name):
        name = dimension_name[type_id]
        if name in count:
            metrics[name] = percent(correct[name], count[name])
    files = [write_jsonl(out_dir / f"seed_bench_{model_id}.jsonl", upload)]
    return make_result(NAME, answers, matched, metrics, "image_accuracy", len(questions), notes=notes, files=files)
