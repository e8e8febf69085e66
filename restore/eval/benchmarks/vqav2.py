"""VQAv2 test-dev: submission file only; the accuracy is computed by the EvalAI server.

Conversion (LLaVA's VQAv2 converter): every question of the full test2015 list gets an entry
{question_id, answer}, the answer being the EvalAI-normalized model output, or "" for a question
without a prediction (the server expects all test2015 questions, also for the test-dev phase).
Upload `vqav2_test-dev2015_<model>.json` to the VQA challenge on EvalAI (test-dev phase).

Here the metrics only count what was answered (`answered`: percent of the test-dev questions);
main_metric is None. Test-dev questions without a prediction are listed in missing_ids; the
official converter fills them with "" silently (this file does the same, and says how many).
Data checks (also by check_data, before inference): every test-dev question is in the full test2015
list (else it could not be uploaded) and no question id repeats; otherwise a DataError.

Fixture (`write_fixture`, few items in the official formats): VQAv2:
llava_vqav2_mscoco_test-dev2015.jsonl, llava_vqav2_mscoco_test2015.jsonl, test2015/.
"""
from __future__ import annotations

import random
from pathlib import Path

from ...jsonio import read_jsonl, write_json, write_jsonl
from ..fixtures import SHORT_ANSWER, Info, draw_scene, plural, random_scene, reference_line, save_image
from ..scoring.common import (AnswerFile, BenchResult, DataError, first_duplicate, load_jsonl, make_result,
                              match_answers, percent, require_fields, require_file)
from ..scoring.vqa_normalize import normalize_answer
from . import Benchmark

NAME = "vqav2"
TEST_DEV_FILE = "llava_vqav2_mscoco_test-dev2015.jsonl"
TEST_ALL_FILE = "llava_vqav2_mscoco_test2015.jsonl"


def _question_ids(path: Path, questions: list[dict]) -> list[str]:
    ids = [str(require_fields(q, ("question_id",), f"{path} line {n}")["question_id"])
           for n, q in enumerate(questions, start=1)]
    repeated = first_duplicate(ids)
    if repeated:
        raise DataError(f"{path} line {repeated[0] + 1} repeats question {repeated[1]}")
    return ids


def load_data(data_root: Path) -> tuple[list[dict], list[dict]]:
    """(test-dev questions, all test2015 questions), checked as the module docstring says."""
    folder = data_root / "vqav2"
    dev_file = require_file(folder / TEST_DEV_FILE, "LLaVA's VQAv2 test-dev question file (eval.zip)")
    all_file = require_file(folder / TEST_ALL_FILE, "LLaVA's full test2015 question list (eval.zip)")
    test_dev, test_all = load_jsonl(dev_file), load_jsonl(all_file)
    dev_ids, all_ids = _question_ids(dev_file, test_dev), set(_question_ids(all_file, test_all))
    for number, qid in enumerate(dev_ids, start=1):
        if qid not in all_ids:
            raise DataError(f"{dev_file} line {number}: question {qid} is not in {all_file}, so it could not be "
                            "uploaded: the two files are not from the same eval.zip")
    return test_dev, test_all


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist and agree (see the module docstring); raises DataError."""
    load_data(data_root)


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    test_dev, test_all = load_data(data_root)
    dev_ids = [str(q["question_id"]) for q in test_dev]
    matched = match_answers(answers.records, lambda r: str(r["question_id"]), dev_ids)

    # All answers are used for the upload, as the official converter does (not only test-dev ones).
    text_by_id = {str(r["question_id"]): r.get("text", "") for r in answers.records if "question_id" in r}
    submission = [
        {"question_id": q["question_id"], "answer": normalize_answer(text_by_id[str(q["question_id"])])
         if str(q["question_id"]) in text_by_id else ""}
        for q in test_all
    ]
    out_file = out_dir / f"vqav2_test-dev2015_{model_id}.json"
    files = [write_json(out_file, submission)]

    notes = [
        "online scoring only: upload the submission file to EvalAI (VQA challenge, test-dev phase); "
        "no local accuracy exists because test answers are hidden",
        f"submission covers {len(submission)} test2015 questions; "
        f"{sum(1 for s in submission if str(s['question_id']) not in text_by_id)} of them have an empty answer",
    ]
    answered = len(dev_ids) - len(matched.missing)
    metrics = {"answered": percent(answered, len(dev_ids)), "submission_questions": len(submission)}
    return make_result(NAME, answers, matched, metrics, None, len(dev_ids), notes=notes, files=files)


# ----------------------------------------------------------------------------------------------
# VQAv2: llava_vqav2_mscoco_test-dev2015.jsonl, llava_vqav2_mscoco_test2015.jsonl, test2015/


def write_fixture(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "vqav2"
    image_ids = rng.sample(range(1, 581_000), n + max(1, n // 2))
    dev, full, first = [], [], None
    for i, image_id in enumerate(image_ids):
        scene = random_scene(rng)
        name = f"COCO_test2015_{image_id:012d}.jpg"
        path = save_image(draw_scene(scene, rng), folder / "test2015" / name)
        q = rng.choice([f"What color are the {plural(scene['shape'])}?", f"How many {plural(scene['shape'])} are there?",
                        f"Is there a {scene['shape']}?"])
        line = {"question_id": image_id * 1000 + rng.randint(0, 2), "image": name, "text": f"{q}\n{SHORT_ANSWER}",
                "category": "default"}
        full.append(line)
        if i < n:  # the first n images form test-dev; the rest are test2015 only
            dev.append(line)
            first = first or {"first_image": path, "first_ids": [line["question_id"]]}
    full.sort(key=lambda x: x["question_id"])
    write_jsonl(folder / "llava_vqav2_mscoco_test-dev2015.jsonl", dev)
    write_jsonl(folder / "llava_vqav2_mscoco_test2015.jsonl", full)
    return first


def reference_answers(data_root: Path, model_id: str = "reference") -> list[dict]:
    """"yes" everywhere: the test answers are hidden."""
    return [reference_line(q["question_id"], q["text"], "yes", model_id)
            for q in read_jsonl(data_root / "vqav2" / TEST_DEV_FILE)]


BENCHMARK = Benchmark(
    name="vqav2",
    title="VQAv2 test-dev: writes the EvalAI upload file (scored online).",
    entry="vqa_loader",
    question_file="vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
    image_folder="vqav2/test2015",
    entry_args=(),
    usage_note="Greedy by default; the official script samples at 0.2 (pass --temperature 0.2 to reproduce it).",
    evaluate=evaluate,
    check_data=check_data,
    data_files=("vqav2/" + TEST_DEV_FILE, "vqav2/" + TEST_ALL_FILE),
    write_fixture=write_fixture,
    reference_answers=reference_answers,
)
