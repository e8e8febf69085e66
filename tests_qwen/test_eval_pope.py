"""POPE's entry point (restore.eval.vqa_loader, as scripts/llava1_5/pope.sh runs it) on the small Qwen2.5-VL
checkpoint and the POPE fixture: the runner generates through the family seam (QwenFamily.generate), stock and
with DivPrune + RESTORE, and its answers are those of generating each question on its own with the family's
inputs (qwen_patches.inputs.build_inputs); the answer file scores."""
from __future__ import annotations

import json

import pytest
import torch

N_VIS = 8
MAX_NEW = 4


@pytest.fixture(scope="module")
def pope_data(tmp_path_factory):
    from restore.eval.fixtures import make_fixtures

    root = tmp_path_factory.mktemp("data")
    make_fixtures(root, n=2, seed=0, benchmarks=["pope"])
    return root


def _run(checkpoint, data, answers, *extra):
    from restore.eval import vqa_loader

    argv = ["--model-path", str(checkpoint), "--question-file", str(data / "pope/llava_pope_test.jsonl"),
            "--image-folder", str(data / "pope/val2014"), "--answers-file", str(answers),
            "--device", "cpu", "--dtype", "float32", "--max_new_tokens", str(MAX_NEW), *extra]
    assert vqa_loader.main(argv) == 0
    return [json.loads(line) for line in answers.read_text().splitlines()]


def _expected(checkpoint, data, lines, base=None):
    """Each question generated alone, as qwen_patches' own inputs build it, at the evaluation protocol's
    pixel range (the entry point's default)."""
    from PIL import Image

    import restore
    from qwen_patches.family import FAMILY
    from qwen_patches.inputs import build_inputs

    questions = {q["question_id"]: q for q in map(json.loads, (data / "pope/llava_pope_test.jsonl").read_text().splitlines())}
    tokenizer, model, image_processor, _ = FAMILY.load(str(checkpoint), device="cpu", dtype="fp32",
                                                       image_protocol=FAMILY.image_protocol(None, None))
    if base is not None:
        restore.apply(model, base=base, n_vis=N_VIS, restore=True)
    texts = []
    for line in lines:
        question = questions[line["question_id"]]
        image = Image.open(data / "pope/val2014" / question["image"]).convert("RGB")
        batch = build_inputs(tokenizer, image_processor, model.config, [question["text"]], [image])
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1, use_cache=True)
        texts.append(tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return texts


@pytest.mark.parametrize("base", [None, "DivPrune"])
def test_pope_entry_point_on_qwen(qwen_checkpoint, pope_data, tmp_path, base):
    from restore.eval.scoring import score

    extra = [] if base is None else ["--base", base, "--n_vis", str(N_VIS), "--restore"]
    lines = _run(qwen_checkpoint, pope_data, tmp_path / "answers.jsonl", *extra)
    assert len(lines) == 6  # three splits, two questions each
    assert {line["model_id"] for line in lines} == {qwen_checkpoint.name}
    meta = json.loads((tmp_path / "answers.jsonl.meta.json").read_text())
    assert meta["complete"] and meta["settings"]["conv_mode"] == "qwen2_5_vl"
    assert meta["settings"]["prompt_style"] == "lmms_eval"
    assert meta["settings"]["image_protocol"] == {"min_pixels": 200704, "max_pixels": 12845056, "jpeg_quality": 75}
    assert [line["text"] for line in lines] == _expected(qwen_checkpoint, pope_data, lines, base)
    summary = score("pope", tmp_path / "answers.jsonl", pope_data, tmp_path / "scores")
    assert summary["n_answers"] == 6 and "f1_mean" in summary["metrics"]


def test_pope_entry_point_on_qwen_batched(qwen_checkpoint, pope_data, tmp_path):
    """--batch-size 4 (rows of different image sizes, left-padded together) runs and answers every question."""
    lines = _run(qwen_checkpoint, pope_data, tmp_path / "answers.jsonl", "--base", "DivPrune", "--n_vis", str(N_VIS),
                 "--restore", "--batch-size", "4")
    assert sorted(line["question_id"] for line in lines) == sorted(
        json.loads(q)["question_id"] for q in (pope_data / "pope/llava_pope_test.jsonl").read_text().splitlines())
