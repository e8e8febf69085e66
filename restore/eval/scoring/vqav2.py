"""VQAv2 test-dev: submission file only; the accuracy is computed by the EvalAI server.

Conversion (LLaVA's VQAv2 converter): every question of the full test2015 list gets an entry
{question_id, answer}, the answer being the EvalAI-normalized model output, or "" for a question
without a prediction (the server expects all test2015 questions, also for the test-dev phase).
Upload `vqav2_test-dev2015_<model>.json` to the VQA challenge on EvalAI (test-dev phase).

Here the metrics only count what was answered (`answered`: percent of the test-dev questions);
main_metric is None. Test-dev questions without a prediction are listed in missing_ids; the
official converter fills them with "" silently (this file does the same, and says how many).
"""
from __future__ import annotations

from pathlib import Path

from .common import AnswerFile, BenchResult, load_jsonl, make_result, match_answers, percent, require_file, write_json
from .vqa_normalize import normalize_answer

NAME = "vqav2"
TEST_DEV_FILE = "llava_vqav2_mscoco_test-dev2015.jsonl"
TEST_ALL_FILE = "llava_vqav2_mscoco_test2015.jsonl"


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist (cheap: nothing is parsed); raises DataFilesMissing."""
    require_file(data_root / "vqav2" / TEST_DEV_FILE, "LLaVA's VQAv2 test-dev question file (eval.zip)")
    require_file(data_root / "vqav2" / TEST_ALL_FILE, "LLaVA's full test2015 question list (eval.zip)")


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    check_data(data_root)
    folder = data_root / "vqav2"
    test_dev = load_jsonl(require_file(folder / TEST_DEV_FILE, "LLaVA's VQAv2 test-dev question file (eval.zip)"))
    test_all = load_jsonl(require_file(folder / TEST_ALL_FILE, "LLaVA's full test2015 question list (eval.zip)"))
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

    all_ids = {str(q["question_id"]) for q in test_all}
    not_in_full = [qid for qid in dev_ids if qid not in all_ids]
    notes = [
        "online scoring only: upload the submission file to EvalAI (VQA challenge, test-dev phase); "
        "no local accuracy exists because test answers are hidden",
        f"submission covers {len(submission)} test2015 questions; "
        f"{sum(1 for s in submission if str(s['question_id']) not in text_by_id)} of them have an empty answer",
    ]
    if not_in_full:
        notes.append(f"{len(not_in_full)} test-dev questions are absent from {TEST_ALL_FILE}; they cannot be uploaded")
    answered = len(dev_ids) - len(matched.missing)
    metrics = {"answered": percent(answered, len(dev_ids)), "submission_questions": len(submission)}
    return make_result(NAME, answers, matched, metrics, None, len(dev_ids), notes=notes, files=files)
