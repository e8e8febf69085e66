"""The inference entry points (restore.eval.vqa_loader, mmbench, science, ocrbench) on few-item fixtures.

Most tests run an entry point in-process with the session's small model (``loaded_model`` stands in for
loading it from disk); ``test_*_loads_checkpoint`` and the subprocess test use the real loading path.
"""
from __future__ import annotations

import base64
import io
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

import restore
from restore.eval import (answer_files, arguments, entry_point, mmbench, ocrbench, plan, runner, science, shards,
                         vqa_loader)
from restore.eval.fixtures import make_fixtures

REPO = Path(__file__).resolve().parents[1]
SHORT = entry_point.SHORT_ANSWER_SUFFIX
LETTER = entry_point.OPTION_LETTER_SUFFIX


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    make_fixtures(root, n=3, seed=0)
    return root


def gqa_args(data: Path, answers: Path, *extra: str, model: Path | str = "unused-llava") -> list:
    return ["--model-path", str(model), "--question-file", str(data / "gqa/llava_gqa_testdev_balanced.jsonl"),
            "--image-folder", str(data / "gqa/data/images"), "--answers-file", str(answers),
            "--max_new_tokens", "3", "--device", "cpu", *extra]


def read_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def texts(lines: list) -> list:
    return [(line.get("question_id", line.get("id")), line.get("text", line.get("predict"))) for line in lines]


def check_images_with(monkeypatch, checkpoint: Path) -> None:
    """The up-front image check preprocesses with ``checkpoint``'s processor, whatever --model-path says."""
    build = runner.image_preprocessing_for_check
    monkeypatch.setattr(runner, "image_preprocessing_for_check", lambda model_path, settings=None: build(str(checkpoint), settings))


@pytest.fixture
def loaded_model(small_model, small_checkpoint, monkeypatch):
    """Entry points use the session's small model instead of loading one, and never check the model path."""
    calls = []
    check_images_with(monkeypatch, small_checkpoint)

    def fake_load(args, base):
        calls.append((base, args.n_vis, args.restore))
        model = runner.apply_reduction(small_model.model, args, base)
        return small_model.tokenizer, model, small_model.image_processor, "llava-small-test"

    monkeypatch.setattr(runner, "load_model_for_eval", fake_load)
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)
    try:
        yield calls
    finally:
        restore.remove(small_model.model)


# --------------------------------------------------------------------------------------------------
# Chunking and argument validation (no model)


def llava_chunk(items: list, n: int, k: int) -> list:
    """LLaVA's get_chunk, restated: slices of ceil(len/n), chunk k (empty when there are fewer slices)."""
    size = math.ceil(len(items) / n)
    slices = [items[i:i + size] for i in range(0, len(items), size)] if items else []
    return slices[k] if k < len(slices) else []


def test_chunks_are_llava_slices_and_cover_everything_once():
    for total in range(0, 14):
        items = list(range(total))
        for n in range(1, 7):
            chunks = []
            for k in range(n):
                start, stop = answer_files.chunk_bounds(total, n, k)
                assert items[start:stop] == llava_chunk(items, n, k)
                chunks += items[start:stop]
            assert chunks == items


def test_chunk_comes_from_flags_then_slurm_then_torchrun():
    slurm = {"SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    torchrun = {"WORLD_SIZE": "8", "RANK": "5"}
    assert arguments.resolve_chunk(None, None, {}) == (1, 0)
    assert arguments.resolve_chunk(None, None, slurm) == (4, 2)
    assert arguments.resolve_chunk(None, None, torchrun) == (8, 5)
    assert arguments.resolve_chunk(None, None, {**torchrun, **slurm}) == (4, 2)
    assert arguments.resolve_chunk(3, 1, {**torchrun, **slurm}) == (3, 1)
    for bad in [(2, 2, {}), (0, 0, {}), (None, 1, {}), (None, None, {"WORLD_SIZE": "2", "RANK": "2"})]:
        with pytest.raises(entry_point.SetupError):
            arguments.resolve_chunk(*bad)


def test_reduction_arguments_are_checked_and_canonicalised():
    assert arguments.validate_reduction(None, None, False) is None
    assert arguments.validate_reduction("holov", 64, True) == "HoloV"
    cases = {
        ("NoSuchMethod", 64, False): "available: DivPrune, FastV, FlowCut, HoloV",
        ("HoloV", None, False): "needs --n_vis",
        ("HoloV", 0, False): "1..576",
        ("HoloV", 577, False): "1..576",
        (None, None, True): "--restore needs --base",
        (None, 64, False): "--n_vis needs --base",
    }
    for (base, n_vis, use_restore), message in cases.items():
        with pytest.raises(entry_point.SetupError, match=message.replace("(", r"\(").replace(".", r"\.")):
            arguments.validate_reduction(base, n_vis, use_restore)


# --------------------------------------------------------------------------------------------------
# Prompts: what each entry point feeds the model, against the official scripts' rules


def settings_for(data: Path, question_file: str, image_folder: str | None, **extra) -> dict:
    return {"question_file": str(data / question_file), "image_folder": str(data / image_folder) if image_folder else None,
            **extra}


def test_vqa_loader_uses_question_text_as_is(data):
    items = vqa_loader.build_items(settings_for(data, "MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version"))
    questions = entry_point.read_jsonl(str(data / "MME/llava_mme.jsonl"))
    assert [i.text for i in items] == [q["text"] for q in questions]
    assert [i.image.path for i in items] == [str(data / "MME/MME_Benchmark_release_version" / q["image"]) for q in questions]
    assert all(i.image.convert_rgb for i in items)
    # MME repeats a question_id for the two questions of an image: keys still tell them apart.
    assert len({q["question_id"] for q in questions}) < len(questions)
    assert len(set(answer_files.numbered_keys(i.key for i in items))) == len(items)


def test_seed_image_questions_alone(data):
    s = settings_for(data, "seed_bench/llava-seed-bench.jsonl", "seed_bench")
    everything = vqa_loader.build_items(s)
    images_only = vqa_loader.build_items({**s, "only_images_under": "SEED-Bench-image/"})
    assert 0 < len(images_only) < len(everything)
    assert [i.fields for i in images_only] == [i.fields for i in everything
                                               if "/SEED-Bench-image/" in i.image.path]


def test_mmbench_prompt_has_hint_question_options_and_letter_instruction(tmp_path):
    tsv = tmp_path / "mm.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "image"]
    rows = [["7", "What is it?", "A hint.", "cat", "dog", "None", "", "A", "aW1n"],
            ["1000007", "What is it?", "", "dog", "cat", "", "", "B", "aW1n"],
            ["8", "Count?", "nan", "1", "2.50", "NA", "x", "B", "aW1n"]]
    tsv.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    s = {"question_file": str(tsv), "image_folder": None, "single_pred_prompt": True, "all_rounds": False, "lang": "en"}
    items = mmbench.build_items(s)
    assert [i.text for i in items] == [
        f"A hint.\nWhat is it?\nA. cat\nB. dog\n{LETTER}",  # 'None' ends the options, as in pandas + is_none
        f"What is it?\nA. dog\nB. cat\n{LETTER}",
        f"Count?\nA. 1\nB. 2.50\n{LETTER}",  # numeric options keep their spelling; 'NA' is missing
    ]
    assert [i.fields["question_id"] for i in items] == [7, 1000007, 8]
    assert items[0].fields["prompt"] == "A hint.\nWhat is it?\nA. cat\nB. dog"
    assert not items[0].image.convert_rgb and items[0].image.base64 == "aW1n"

    rounds = mmbench.build_items({**s, "all_rounds": True, "single_pred_prompt": False})
    first = [i for i in rounds if i.fields["question_id"] == 7]
    assert [i.fields["round_id"] for i in first] == [0, 1]
    assert first[1].text == "A hint.\nWhat is it?\nA. dog\nB. cat"
    assert first[1].fields["options"] == ["dog", "cat"] and first[1].fields["option_char"] == ["B", "A"]


def test_science_moves_the_image_tag_and_skips_text_only_questions(data):
    problems = json.loads((data / "scienceqa/llava_test_CQM-A.json").read_text())
    with_image = [p for p in problems if "image" in p]
    assert 0 < len(with_image) < len(problems)
    s = settings_for(data, "scienceqa/llava_test_CQM-A.json", "scienceqa/images/test",
                     single_pred_prompt=True, answer_text_only=False)
    items = science.build_items(s)
    assert [i.fields["question_id"] for i in items] == [p["id"] for p in with_image]
    for item, p in zip(items, with_image):
        question = p["conversations"][0]["value"].replace("<image>", "").strip()
        assert item.text == question + "\n" + LETTER
        assert item.fields["prompt"] == "<image>\n" + question + "\n" + LETTER
        assert not item.image.convert_rgb  # the official script pads the PNG in its stored mode
    everything = science.build_items({**s, "answer_text_only": True})
    assert len(everything) == len(problems)
    assert [i.image is None for i in everything] == ["image" not in p for p in problems]


def test_ocrbench_appends_short_answer_instruction_unless_bare(data):
    s = settings_for(data, "ocrbench/OCRBench.json", "ocrbench/data", bare_question=False)
    questions = json.loads((data / "ocrbench/OCRBench.json").read_text())
    assert [i.text for i in ocrbench.build_items(s)] == [q["question"] + "\n" + SHORT for q in questions]
    assert [i.text for i in ocrbench.build_items({**s, "bare_question": True})] == [q["question"] for q in questions]


# --------------------------------------------------------------------------------------------------
# Generation against a plain restatement of the official loop


def official_style_answer(loaded, question: str, image, max_new_tokens: int) -> str:
    """What LLaVA's model_vqa_* scripts do for one item: vicuna_v1 prompt, padded image, greedy decoding."""
    import torch
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), loaded.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    pixels = process_images([image], loaded.image_processor, loaded.model.config)
    with torch.inference_mode():
        out = loaded.model.generate(ids.unsqueeze(0), images=pixels, image_sizes=[image.size], do_sample=False,
                                    max_new_tokens=max_new_tokens, use_cache=True)
    return loaded.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()


def test_answers_match_the_official_loop_and_formats(data, tmp_path, small_model, loaded_model, capsys):
    from PIL import Image

    gqa = tmp_path / "gqa.jsonl"
    assert vqa_loader.main(gqa_args(data, gqa, "--base", "DivPrune", "--n_vis", "32")) == 0
    lines = read_lines(gqa)
    questions = entry_point.read_jsonl(str(data / "gqa/llava_gqa_testdev_balanced.jsonl"))
    assert [list(line) for line in lines] == [["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]] * len(questions)
    assert [line["question_id"] for line in lines] == [q["question_id"] for q in questions]
    assert {line["model_id"] for line in lines} == {"llava-small-test"}
    assert loaded_model == [("DivPrune", 32, False)]
    restore.apply(small_model.model, base="DivPrune", n_vis=32)
    for q, line in zip(questions, lines):
        image = Image.open(data / "gqa/data/images" / q["image"]).convert("RGB")
        assert line["text"] == official_style_answer(small_model, q["text"], image, 3)

    restore.remove(small_model.model)
    sqa = tmp_path / "sqa.jsonl"
    assert science.main(["--model-path", "x", "--question-file", str(data / "scienceqa/llava_test_CQM-A.json"),
                         "--image-folder", str(data / "scienceqa/images/test"), "--answers-file", str(sqa),
                         "--single-pred-prompt", "--max_new_tokens", "3"]) == 0
    problems = {p["id"]: p for p in json.loads((data / "scienceqa/llava_test_CQM-A.json").read_text())}
    for line in read_lines(sqa):
        p = problems[line["question_id"]]
        image = Image.open(data / "scienceqa/images/test" / p["image"])
        question = p["conversations"][0]["value"].replace("<image>", "").strip() + "\n" + LETTER
        assert line["text"] == official_style_answer(small_model, question, image, 3)

    ocr = tmp_path / "ocr.jsonl"
    assert ocrbench.main(["infer", "--model-path", "x", "--question-file", str(data / "ocrbench/OCRBench.json"),
                          "--image-folder", str(data / "ocrbench/data"), "--answers-file", str(ocr),
                          "--max_new_tokens", "2"]) == 0
    questions = json.loads((data / "ocrbench/OCRBench.json").read_text())
    ocr_lines = read_lines(ocr)
    assert [list(line) for line in ocr_lines] == [["dataset_name", "id", "image_path", "question", "answers", "type",
                                                   "predict"]] * len(questions)
    assert [{k: v for k, v in line.items() if k != "predict"} for line in ocr_lines] == questions
    for q, line in zip(questions, ocr_lines):
        image = Image.open(data / "ocrbench/data" / q["image_path"]).convert("RGB")
        assert line["predict"] == official_style_answer(small_model, q["question"] + "\n" + SHORT, image, 2)

    mmb = tmp_path / "mmb.jsonl"
    assert mmbench.main(["--model-path", "x", "--question-file", str(data / "mmbench/mmbench_dev_20230712.tsv"),
                         "--answers-file", str(mmb), "--single-pred-prompt", "--max_new_tokens", "2"]) == 0
    mmb_lines = read_lines(mmb)
    assert [list(line) for line in mmb_lines] == [["question_id", "round_id", "prompt", "text", "options",
                                                   "option_char", "answer_id", "model_id", "metadata"]] * len(mmb_lines)
    rows = mmbench.read_rows(str(data / "mmbench/mmbench_dev_20230712.tsv"))
    assert [line["question_id"] for line in mmb_lines] == [int(row["index"]) for row in rows]
    for row, line in zip(rows, mmb_lines):
        options = [row[c] for c in "ABCD" if c in row and not mmbench.is_empty(row[c])]
        question = row["question"] if mmbench.is_empty(row["hint"]) else row["hint"] + "\n" + row["question"]
        prompt = question + "".join(f"\n{c}. {o}" for c, o in zip("ABCD", options))
        assert (line["prompt"], line["options"], line["round_id"]) == (prompt, options, 0)
        image = Image.open(io.BytesIO(base64.b64decode(row["image"])))  # padded in its stored mode
        assert line["text"] == official_style_answer(small_model, prompt + "\n" + LETTER, image, 2)
    assert "[mmbench] chunk 1/1" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Failing before the model loads


def test_bad_inputs_fail_before_the_model_is_loaded(data, tmp_path, monkeypatch, capsys, small_checkpoint):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were validated")

    monkeypatch.setattr(runner, "load_model_for_eval", must_not_load)
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)
    check_images_with(monkeypatch, small_checkpoint)
    images = tmp_path / "images"
    images.mkdir()
    questions = entry_point.read_jsonl(str(data / "gqa/llava_gqa_testdev_balanced.jsonl"))
    names = sorted({q["image"] for q in questions})
    for name in names:
        (images / name).write_bytes((data / "gqa/data/images" / name).read_bytes())
    answers = tmp_path / "a.jsonl"

    def fails(argv, *messages):
        assert vqa_loader.main(argv) == 2
        err = capsys.readouterr().err
        for message in messages:
            assert message in err
        assert not answers.exists()

    args = gqa_args(data, answers)
    fails([*args, "--base", "Nope", "--n_vis", "64"], "unknown --base 'Nope'", "DivPrune, FastV, FlowCut, HoloV")
    fails([*args, "--base", "HoloV", "--n_vis", "600"], "1..576")
    fails([*args, "--base", "FastV", "--n_vis", "64", "--restore"], "FastV acts inside the LLM")
    fails([*args, "--base", "HoloV", "--n_vis", "1", "--restore"], "use n_vis >= 2, or prune_ratio=0")
    fails([*args, "--restore"], "--restore needs --base")
    # a pretrain-only checkpoint switches to <conv>_mmtag, which vicuna_v1 lacks: found before loading
    plain = [*args[:1], str(tmp_path / "llava-v1.5-7b-pretrain-plain"), *args[2:]]
    fails([*plain, "--conv-mode", "vicuna_v1"], "'vicuna_v1_mmtag' would be used, but it does not exist")
    question_file = args.index("--question-file") + 1
    fails([*args[:question_file], str(tmp_path / "missing.jsonl"), *args[question_file + 1:]],
          f"question file not found: {tmp_path / 'missing.jsonl'}")
    folder = args.index("--image-folder") + 1
    fails([*args[:folder], str(tmp_path / "nowhere"), *args[folder + 1:]], "image folder not found")
    with_images = [*args[:folder], str(images), *args[folder + 1:]]

    (images / names[-1]).unlink()
    fails(with_images, "1 image(s) of this chunk not found", str(images / names[-1]))
    # --no-image-check skips decoding, never the existence check
    fails([*with_images, "--no-image-check"], "1 image(s) of this chunk not found", str(images / names[-1]))
    (images / names[-1]).write_bytes(b"this is not an image file\n")
    fails(with_images, "1 image(s) of this chunk cannot be decoded", str(images / names[-1]))
    whole = (data / "gqa/data/images" / names[-1]).read_bytes()
    (images / names[-1]).write_bytes(whole[: len(whole) // 2])  # a truncated JPEG opens but does not decode
    fails(with_images, "cannot be decoded", str(images / names[-1]), "truncated")
    # decodes, but CLIP's processor cannot tell a 1x1 image's channel axis: found up front, named
    from PIL import Image

    Image.new("RGB", (1, 1), (9, 9, 9)).save(images / names[-1], format="JPEG")
    fails(with_images, "1 image(s) of this chunk cannot be decoded or preprocessed", str(images / names[-1]),
          "1x1 pixels", "mean must have 1 elements")


# benchmark -> (entry point, question file, image folder, fixed flags), as scripts/llava1_5/*.sh run them
BENCHMARKS = {
    "gqa": (vqa_loader, "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images", []),
    "vqav2": (vqa_loader, "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015", []),
    "seed": (vqa_loader, "seed_bench/llava-seed-bench.jsonl", "seed_bench", []),
    "pope": (vqa_loader, "pope/llava_pope_test.jsonl", "pope/val2014", []),
    "textvqa": (vqa_loader, "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images", []),
    "mme": (vqa_loader, "MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version", []),
    "mmbench": (mmbench, "mmbench/mmbench_dev_20230712.tsv", None, ["--single-pred-prompt"]),
    "sqa": (science, "scienceqa/llava_test_CQM-A.json", "scienceqa/images/test", ["--single-pred-prompt"]),
    "ocrbench": (ocrbench, "ocrbench/OCRBench.json", "ocrbench/data", []),
}


def without_questions(original: Path) -> str:
    """The question file's format with no question in it: a TSV keeps its header, a JSON list is []."""
    if original.suffix == ".tsv":
        return original.read_text().splitlines(keepends=True)[0]
    return "[]\n" if original.suffix == ".json" else "\n"


def with_first_question_twice(original: Path) -> str:
    if original.suffix == ".json":
        questions = json.loads(original.read_text())
        return json.dumps(questions + [questions[0]])
    lines = original.read_text().splitlines(keepends=True)
    first_question = lines[1] if original.suffix == ".tsv" else lines[0]
    return "".join(lines) + first_question


@pytest.mark.parametrize("bench", sorted(BENCHMARKS))
def test_empty_and_repeating_question_files_fail_before_the_model_loads(bench, data, tmp_path, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a question file that cannot be run")

    monkeypatch.setattr(runner, "load_model_for_eval", must_not_load)
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)
    module, question_file, image_folder, flags = BENCHMARKS[bench]
    original = data / question_file
    questions = tmp_path / original.name
    answers = tmp_path / "answers.jsonl"
    argv = ["--model-path", "x", "--question-file", str(questions), "--answers-file", str(answers),
            "--device", "cpu", *flags, *(["--image-folder", str(data / image_folder)] if image_folder else [])]

    questions.write_text(without_questions(original))
    assert module.main(argv) == 2
    assert f"{questions} holds no questions" in capsys.readouterr().err
    assert not answers.exists()

    questions.write_text(with_first_question_twice(original))
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert "1 question(s) appear more than once" in err and "remove the repeats" in err
    assert not answers.exists()


def test_filters_that_leave_no_question_are_errors(data, tmp_path, loaded_model, capsys):
    seed = ["--model-path", "x", "--question-file", str(data / "seed_bench/llava-seed-bench.jsonl"),
            "--image-folder", str(data / "seed_bench"), "--answers-file", str(tmp_path / "a.jsonl")]
    assert vqa_loader.main([*seed, "--only-images-under", "no-such-folder"]) == 2
    assert "--only-images-under no-such-folder/: none of the" in capsys.readouterr().err
    problems = json.loads((data / "scienceqa/llava_test_CQM-A.json").read_text())
    text_only = tmp_path / "text_only.json"
    text_only.write_text(json.dumps([p for p in problems if "image" not in p]))
    sqa = ["--model-path", "x", "--question-file", str(text_only), "--image-folder", str(data / "scienceqa/images/test"),
           "--answers-file", str(tmp_path / "s.jsonl")]
    assert science.main(sqa) == 2
    assert "has an image; pass --answer-text-only" in capsys.readouterr().err
    assert loaded_model == [] and not (tmp_path / "a.jsonl").exists() and not (tmp_path / "s.jsonl").exists()


def test_mme_asks_two_questions_under_one_question_id(data):
    questions = entry_point.read_jsonl(str(data / "MME/llava_mme.jsonl"))
    assert len({q["question_id"] for q in questions}) < len(questions)  # the fixture has the MME case
    items = vqa_loader.build_items(settings_for(data, "MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version"))
    assert [(i.fields["question_id"], i.text) for i in items] == [(q["question_id"], q["text"]) for q in questions]


def test_failing_fast_from_the_command_line(data, tmp_path, small_checkpoint):
    answers = tmp_path / "a.jsonl"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "restore.eval.vqa_loader",
                          *gqa_args(data, answers, "--base", "Nope", "--n_vis", "8", model=small_checkpoint)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert run.returncode == 2
    import tokenreduction

    assert f"error: unknown --base 'Nope'; available: {', '.join(tokenreduction.available_selectors())}" in run.stderr
    assert "HoloV" in run.stderr and "DivPrune" in run.stderr and "VisPruner" in run.stderr
    assert "loading model" not in run.stdout + run.stderr
    assert not answers.exists()
    assert elapsed < 60  # the model is never loaded; the bound only guards against hangs


# --------------------------------------------------------------------------------------------------
# Resume, settings record, chunks and merging


def test_resume_neither_repeats_nor_loses_answers(data, tmp_path, loaded_model, capsys):
    answers = tmp_path / "a.jsonl"
    assert vqa_loader.main(gqa_args(data, answers)) == 0
    full = answers.read_text().splitlines(keepends=True)
    assert len(full) >= 3

    # A killed run: two complete lines and half of the third.
    answers.write_text(full[0] + full[1] + full[2][: len(full[2]) // 2])
    capsys.readouterr()
    assert vqa_loader.main(gqa_args(data, answers)) == 0
    out = capsys.readouterr().out
    assert f"({len(full) - 2} answered now, 2 kept from an earlier run)" in out
    again = answers.read_text().splitlines(keepends=True)
    assert again[:2] == full[:2]  # same answer_id: not regenerated
    assert texts(read_lines(answers)) == texts([json.loads(line) for line in full])

    # Answers out of order (e.g. appended by an older run) come back in question order, with nothing to generate.
    shuffled = full[:]
    random.Random(0).shuffle(shuffled)
    answers.write_text("".join(shuffled))
    calls_before = len(loaded_model)
    assert vqa_loader.main(gqa_args(data, answers)) == 0
    assert answers.read_text().splitlines(keepends=True) == full
    assert len(loaded_model) == calls_before  # no model needed
    assert json.loads(Path(str(answers) + ".meta.json").read_text())["complete"] is True


def test_resume_refuses_other_settings_and_foreign_answers(data, tmp_path, loaded_model, capsys):
    answers = tmp_path / "a.jsonl"
    assert vqa_loader.main(gqa_args(data, answers, "--num-chunks", "2", "--chunk-idx", "0")) == 0
    before = answers.read_text()
    capsys.readouterr()
    assert vqa_loader.main(gqa_args(data, answers, "--num-chunks", "2", "--chunk-idx", "0", "--base", "HoloV",
                                    "--n_vis", "16")) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "base: None -> 'HoloV'" in err and "--overwrite" in err
    assert answers.read_text() == before

    Path(str(answers) + ".meta.json").unlink()
    assert vqa_loader.main(gqa_args(data, answers, "--num-chunks", "2", "--chunk-idx", "1")) == 2
    assert "no record of the settings" in capsys.readouterr().err

    assert vqa_loader.main(gqa_args(data, answers, "--num-chunks", "2", "--chunk-idx", "1", "--overwrite")) == 0
    questions = entry_point.read_jsonl(str(data / "gqa/llava_gqa_testdev_balanced.jsonl"))
    start, stop = answer_files.chunk_bounds(len(questions), 2, 1)
    assert [line["question_id"] for line in read_lines(answers)] == [q["question_id"] for q in questions[start:stop]]

    # An answer to a question outside the chunk means the file belongs to another run.
    foreign = json.loads(before.splitlines()[0])
    with open(answers, "a") as f:
        f.write(json.dumps(foreign) + "\n")
    assert vqa_loader.main(gqa_args(data, answers, "--num-chunks", "2", "--chunk-idx", "1")) == 2
    assert "not in this chunk" in capsys.readouterr().err


def test_resume_compares_the_resolved_device_and_dtype(data, tmp_path, loaded_model, capsys):
    answers = tmp_path / "a.jsonl"
    assert vqa_loader.main(gqa_args(data, answers, "--dtype", "auto")) == 0
    meta_file = Path(str(answers) + ".meta.json")
    settings = json.loads(meta_file.read_text())["settings"]
    assert (settings["device"], settings["dtype"]) == ("cpu", "float32")
    calls = len(loaded_model)
    # "auto" on a CPU is float32: the same precision, so the finished file is accepted as it is
    assert vqa_loader.main(gqa_args(data, answers, "--dtype", "float32")) == 0
    assert len(loaded_model) == calls
    capsys.readouterr()
    assert vqa_loader.main(gqa_args(data, answers, "--dtype", "bfloat16")) == 2
    assert "dtype: 'float32' -> 'bfloat16'" in capsys.readouterr().err

    # a file begun on a GPU in float16 (both "auto") is not resumed on a CPU in float32
    meta = json.loads(meta_file.read_text())
    meta["settings"].update(device="cuda", dtype="float16")
    meta_file.write_text(json.dumps(meta))
    assert vqa_loader.main(gqa_args(data, answers, "--device", "auto", "--dtype", "auto")) == 2
    err = capsys.readouterr().err
    assert "device: 'cuda' -> 'cpu'" in err and "dtype: 'float16' -> 'float32'" in err


def test_cuda_requested_without_cuda_fails_before_loading(data, tmp_path, loaded_model, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vqa_loader.main(gqa_args(data, tmp_path / "a.jsonl", "--device", "cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert loaded_model == [] and not (tmp_path / "a.jsonl").exists()


def test_a_second_writer_of_an_answers_file_is_refused(data, tmp_path, loaded_model, capsys):
    answers = tmp_path / "a.jsonl"
    other = answer_files.lock_answers_file(str(answers))  # another process writing the same chunk
    try:
        assert vqa_loader.main(gqa_args(data, answers)) == 2
        assert "being written by another process" in capsys.readouterr().err
        assert loaded_model == [] and not answers.exists()
    finally:
        other.close()
    assert vqa_loader.main(gqa_args(data, answers)) == 0
    # released at the end of the run (and after a refused one): the next writer gets it
    answer_files.lock_answers_file(str(answers)).close()
    assert vqa_loader.main(gqa_args(data, answers, "--base", "HoloV", "--n_vis", "8")) == 2
    answer_files.lock_answers_file(str(answers)).close()


def test_chunks_merge_into_the_single_run_answers(data, tmp_path, loaded_model, monkeypatch):
    whole = tmp_path / "whole.jsonl"
    # MME's first images: two questions each under one question_id, the case that needs numbered keys
    questions = tmp_path / "mme.jsonl"
    questions.write_text("".join((data / "MME/llava_mme.jsonl").read_text().splitlines(keepends=True)[:7]))
    mme = ["--model-path", "x", "--question-file", str(questions),
           "--image-folder", str(data / "MME/MME_Benchmark_release_version"), "--max_new_tokens", "2"]
    assert vqa_loader.main([*mme, "--answers-file", str(whole)]) == 0
    n = len(read_lines(whole))

    chunks = [tmp_path / f"3_{k}.jsonl" for k in range(3)]
    for k, path in enumerate(chunks):
        # the chunk comes from torchrun's variables when no flag is given
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(k))
        assert vqa_loader.main([*mme, "--answers-file", str(path)]) == 0
    assert [len(read_lines(p)) for p in chunks] == [len(range(*answer_files.chunk_bounds(n, 3, k))) for k in range(3)]
    merged = tmp_path / "merge.jsonl"
    assert shards.merge_chunks([str(p) for p in chunks], str(merged)) == n
    assert texts(read_lines(merged)) == texts(read_lines(whole))

    # Refused: chunks out of order, a missing chunk, an incomplete chunk, a chunk of another chunking.
    for bad, message in [
        ([chunks[1], chunks[0], chunks[2]], "expected chunk 0 of 3"),
        ([chunks[0], chunks[1], tmp_path / "3_9.jsonl"], "missing"),
        ([chunks[0], chunks[1]], "expected chunk 0 of 2"),
    ]:
        with pytest.raises(entry_point.SetupError, match=message):
            shards.merge_chunks([str(p) for p in bad], str(tmp_path / "bad.jsonl"))
    # merge --check: 0 mergeable, 3 only when waiting can help (missing, incomplete), 1 for conflicts.
    def check(paths) -> int:
        return shards.main(["merge", "--check", "--out", str(tmp_path / "c.jsonl"), *map(str, paths)])

    assert check(chunks) == 0
    assert check([chunks[0], chunks[1], tmp_path / "3_9.jsonl"]) == 3
    assert check([chunks[1], chunks[0], chunks[2]]) == 1  # another chunking / order
    assert check([chunks[0], chunks[1]]) == 1
    other = tmp_path / "other.jsonl"
    other.write_text(chunks[2].read_text())
    other_meta = json.loads(Path(str(chunks[2]) + ".meta.json").read_text())
    other_meta["settings"]["max_new_tokens"] = 7
    Path(str(other) + ".meta.json").write_text(json.dumps(other_meta))
    assert check([chunks[0], chunks[1], other]) == 1
    Path(str(other) + ".meta.json").write_text("{not json")
    assert check([chunks[0], chunks[1], other]) == 1

    lines = chunks[2].read_text().splitlines(keepends=True)
    chunks[2].write_text("".join(lines[:-1]))
    with pytest.raises(entry_point.SetupError, match=r"3_2.jsonl: marked complete but holds \d+ answers, expected"):
        shards.merge_chunks([str(p) for p in chunks], str(tmp_path / "bad.jsonl"))
    assert check(chunks) == 1
    chunks[2].write_text("".join(lines[:-2]) + "{broken\n" + lines[-1])
    assert check(chunks) == 1
    chunks[2].write_text("".join(lines[:-1]))
    meta = Path(str(chunks[2]) + ".meta.json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "complete": False}))
    with pytest.raises(entry_point.SetupError, match="incomplete"):
        shards.merge_chunks([str(p) for p in chunks], str(tmp_path / "bad.jsonl"))
    assert check(chunks) == 3


def test_an_empty_chunk_writes_an_empty_complete_file(data, tmp_path, loaded_model):
    answers = tmp_path / "empty.jsonl"
    assert vqa_loader.main(gqa_args(data, answers, "--num-chunks", "50", "--chunk-idx", "49")) == 0
    assert answers.read_text() == ""
    meta = json.loads(Path(str(answers) + ".meta.json").read_text())
    assert (meta["complete"], meta["n_items"], meta["num_chunks"], meta["chunk_idx"]) == (True, 0, 50, 49)
    assert loaded_model == []  # nothing to answer, no model


def test_images_in_modes_llava_cannot_pad_are_converted(small_model):
    from PIL import Image

    from llava_patches.family import FAMILY

    grey = Image.new("L", (60, 30), 128)
    pixels = FAMILY.preprocess_image(grey, small_model.image_processor, small_model.model.config)
    from llava.mm_utils import process_images

    assert (pixels == process_images([grey.convert("RGB")], small_model.image_processor,
                                     small_model.model.config)[0]).all()
    palette = Image.new("RGB", (60, 30), (200, 10, 30)).convert("P")
    # a palette image is padded in its own mode, as the official ScienceQA script does
    assert (FAMILY.preprocess_image(palette, small_model.image_processor, small_model.model.config)
            == process_images([palette], small_model.image_processor, small_model.model.config)[0]).all()


ODD_IMAGES = {  # name -> (mode, size)
    "grey": ("L", (40, 30)), "grey-alpha": ("LA", (30, 40)), "rgba": ("RGBA", (40, 30)), "cmyk": ("CMYK", (40, 30)),
    "palette": ("P", (40, 30)), "16-bit": ("I;16", (40, 30)), "float": ("F", (30, 40)), "bilevel": ("1", (40, 30)),
    "one-pixel": ("RGB", (1, 1)), "one-grey-pixel": ("L", (1, 1)), "one-column": ("RGB", (1, 50)),
    "one-row": ("RGB", (50, 1)), "2x2": ("RGB", (2, 2)), "very-wide": ("RGB", (4000, 2)),
    "very-tall": ("L", (3, 3000)),
}


@pytest.mark.parametrize("convert_rgb", [True, False])
def test_every_image_either_preprocesses_in_inference_or_fails_the_check(small_model, small_checkpoint, tmp_path,
                                                                         convert_rgb):
    from PIL import Image

    check = runner.image_preprocessing_for_check(str(small_checkpoint))
    failed_up_front = set()
    for name, (mode, size) in ODD_IMAGES.items():
        path = tmp_path / f"{name}.tiff"
        Image.new(mode, size).save(path)
        ref = entry_point.ImageRef(label=name, path=str(path), convert_rgb=convert_rgb)
        item = entry_point.Item(key=name, text="q", image=ref)
        try:
            plan.check_images([item], preprocess=check)
        except entry_point.SetupError as e:
            assert str(path) in str(e) and f"{size[0]}x{size[1]} pixels" in str(e)
            failed_up_front.add(name)
            continue
        # what the DataLoader does with the loaded model's processor and config
        dataset = runner.PreparedItems([item], small_model.tokenizer, small_model.image_processor,
                                       small_model.model.config, "vicuna_v1")
        _, pixels, image_size = dataset[0]
        assert tuple(pixels.shape) == (3, 336, 336) and image_size == size
        # the check's processor, built from the config alone, is the loaded model's
        assert (check(ref.open()) == pixels).all()
    assert {"one-pixel", "one-grey-pixel"} <= failed_up_front


def test_the_image_check_preprocesses_once_per_mode_and_size(tmp_path):
    from PIL import Image

    seen = []

    def preprocess(image):
        seen.append((image.mode, image.size))
        if image.size == (1, 1):
            raise ValueError("too small")

    items = []
    for k, (mode, size) in enumerate([("RGB", (8, 6))] * 3 + [("L", (8, 6)), ("RGB", (1, 1)), ("RGB", (1, 1))]):
        Image.new(mode, size, k).save(tmp_path / f"{k}.png")
        ref = entry_point.ImageRef(label=str(k), path=str(tmp_path / f"{k}.png"), convert_rgb=False)
        items.append(entry_point.Item(key=str(k), text="q", image=ref))
    with pytest.raises(entry_point.SetupError, match=r"2 image\(s\)") as error:
        plan.check_images(items, preprocess=preprocess)
    assert str(tmp_path / "4.png") in str(error.value) and str(tmp_path / "5.png") in str(error.value)
    assert sorted(seen) == [("L", (8, 6)), ("RGB", (1, 1)), ("RGB", (8, 6))]


def test_text_only_science_questions_are_answered_on_request(data, tmp_path, loaded_model):
    answers = tmp_path / "sqa.jsonl"
    argv = ["--model-path", "x", "--question-file", str(data / "scienceqa/llava_test_CQM-A.json"),
            "--image-folder", str(data / "scienceqa/images/test"), "--answers-file", str(answers),
            "--single-pred-prompt", "--max_new_tokens", "2", "--answer-text-only"]
    assert science.main(argv) == 0
    problems = json.loads((data / "scienceqa/llava_test_CQM-A.json").read_text())
    lines = read_lines(answers)
    assert [line["question_id"] for line in lines] == [p["id"] for p in problems]
    assert [line["prompt"].startswith("<image>\n") for line in lines] == ["image" in p for p in problems]


def test_entry_point_loads_checkpoint_and_applies_reduction(data, tmp_path, small_checkpoint, capsys):
    answers = tmp_path / "a.jsonl"
    argv = gqa_args(data, answers, "--base", "holov", "--n_vis", "16", "--restore", "--dtype", "float32",
                    model=small_checkpoint)
    assert vqa_loader.main(argv) == 0
    out = capsys.readouterr().out
    assert f"loading model {small_checkpoint}" in out and "reduction: HoloV, 16 visual tokens, RESTORE" in out
    lines = read_lines(answers)
    assert {line["model_id"] for line in lines} == {small_checkpoint.name}
    meta = json.loads(Path(str(answers) + ".meta.json").read_text())
    assert meta["settings"]["base"] == "HoloV" and meta["settings"]["restore"] is True
    assert f"{len(lines)} answered now" in out and "tokens/s" in out
