"""--batch-size: answers of batched generation equal batch 1's exactly (fp32, CPU, greedy).

Every benchmark's fixtures, run in-process with the session's small model as its script runs them (entry
point, question file, image folder and fixed flags from restore.eval.benchmarks), without
reduction and with every base, with and without RESTORE. Also: a killed batched run resumed with another
batch size, refused values before the model loads, beams, and the script passing the flag through.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import restore
from restore.eval import answer_files, arguments, runner
from restore.eval.fixtures import BENCHMARKS, make_fixtures

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "llava1_5"
MAX_NEW_TOKENS = "3"
N_VIS = "16"
BASES = ["HoloV", "DivPrune", "VisPruner", "VisionZip"]
CONFIGS: List[List[str]] = [[]] + [["--base", b, "--n_vis", N_VIS, *r] for b in BASES for r in ([], ["--restore"])]
# Benchmarks whose fixture prompts all tokenize to one length (the small checkpoint's tokenizer): no padding.
ONE_PROMPT_LENGTH = ("pope", "mme")
# Fields that differ between two runs of the same answers: LLaVA's answer_id is a fresh random uuid.
RANDOM_FIELDS = ("answer_id",)


def script_layout(bench: str) -> Tuple[str, str, str, List[str]]:
    """(entry module, question file, image folder or "", fixed entry flags) as scripts/llava1_5/<bench>.sh
    runs them (the launcher reads them from the benchmark's module)."""
    from restore.eval.benchmarks import get_benchmark

    b = get_benchmark(bench)
    return b.entry, b.question_file, b.image_folder or "", list(b.entry_args)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch-data")
    # 5 items: a full batch of 4 and a partial one. POPE and MMBench ask several questions per n (6 and 8
    # at n=2); MME asks 28 whatever n, of which the first 8 (4 images, two questions each) are kept.
    many = ("pope", "mmbench", "mme")
    make_fixtures(root, n=5, seed=3, benchmarks=[b for b in BENCHMARKS if b not in many])
    make_fixtures(root, n=2, seed=3, benchmarks=list(many))
    mme = root / "MME" / "llava_mme.jsonl"
    mme.write_text("".join(mme.read_text().splitlines(keepends=True)[:8]))
    return root


@pytest.fixture
def in_process(small_model, monkeypatch):
    """Entry points use the session's small model instead of loading one; records every batch's shape."""
    batches: List[Tuple[int, bool, int]] = []  # (rows, padded, distinct prompt lengths)

    def fake_load(args, base):
        model = runner.apply_reduction(small_model.model, args, base)
        return small_model.tokenizer, model, small_model.image_processor, "llava-small-test"

    pad_left = runner.pad_left

    def recording_pad_left(rows, pad_id):
        ids, mask = pad_left(rows, pad_id)
        batches.append((int(ids.shape[0]), mask is not None, len({int(r.shape[-1]) for r in rows})))
        return ids, mask

    monkeypatch.setattr(runner, "load_model_for_eval", fake_load)
    monkeypatch.setattr(runner, "pad_left", recording_pad_left)
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)
    try:
        yield batches
    finally:
        restore.remove(small_model.model)


def bench_argv(bench: str, data: Path, answers: Path, *extra: str) -> Tuple[str, List[str]]:
    entry, question_file, image_folder, flags = script_layout(bench)
    argv = ["--model-path", "llava-small-test", "--question-file", str(data / question_file),
            *(["--image-folder", str(data / image_folder)] if image_folder else []),
            "--answers-file", str(answers), "--max_new_tokens", MAX_NEW_TOKENS, "--device", "cpu",
            "--no-image-check", *flags, *extra]
    return entry, argv


def run_entry(entry: str, argv: List[str]) -> int:
    module = importlib.import_module(f"restore.eval.{entry}")
    return module.main(["infer", *argv] if entry == "ocrbench" else argv)


def answers_of(path: Path) -> List[Dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in RANDOM_FIELDS}
            for line in path.read_text().splitlines()]


def batched_runs(bench: str, data: Path, tmp_path: Path, batches: list, config: List[str],
                 sizes: Tuple[int, ...]) -> Dict[int, Tuple[List[Dict], list]]:
    """batch size -> (answers without their random fields, (rows, padded, distinct lengths) of each batch)."""
    runs = {}
    for batch_size in sizes:
        answers = tmp_path / f"{'_'.join(config) or 'full'}-{batch_size}.jsonl"
        entry, argv = bench_argv(bench, data, answers, *config, "--batch-size", str(batch_size))
        del batches[:]
        assert run_entry(entry, argv) == 0, (config, batch_size)
        runs[batch_size] = (answers_of(answers), list(batches))
        meta = answer_files.read_meta(str(answers))
        assert meta["complete"] and meta["batch_size"] == batch_size and "batch_size" not in meta["settings"]
    return runs


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_batch_of_four_answers_as_batch_one(bench, data, tmp_path, in_process, small_model):
    padded = False
    for config in CONFIGS:
        runs = batched_runs(bench, data, tmp_path, in_process, config, (1, 4))
        (one, one_batches), (four, four_batches) = runs[1], runs[4]
        assert four == one, (bench, config)
        assert one_batches == [(1, False, 1)] * len(one)
        assert sum(b[0] for b in four_batches) == len(one) and max(b[0] for b in four_batches) == 4
        padded = padded or any(b[1] for b in four_batches)
        # left padding is set only while a batch generates: the model's config is given back as it was
        assert small_model.model.config.tokenizer_padding_side == "right"
    if bench in ONE_PROMPT_LENGTH:
        assert not padded and all(b[2] == 1 for b in four_batches)  # nothing to pad, as said
    elif not padded:
        # Sorted by length, every batch of 4 may hold prompts of one length (MMBench's do): then one batch
        # of everything checks the padding on this benchmark too.
        for config in (CONFIGS[0], CONFIGS[2]):
            one, _ = batched_runs(bench, data, tmp_path, in_process, config, (1,))[1]
            everything, batches = batched_runs(bench, data, tmp_path, in_process, config, (len(one),))[len(one)]
            assert everything == one, (bench, config)
            assert [b[:2] for b in batches] == [(len(one), True)]


@pytest.mark.parametrize("bench", ["gqa", "mmbench", "ocrbench"])
def test_tome_batches_answer_as_batch_one(bench, data, tmp_path, in_process):
    """ToMe merges inside the vision encoder, per image whatever the batch: with and without RESTORE
    (144: within reach of the small tower, whose layers before the select layer each halve at most)."""
    for config in (["--base", "ToMe", "--n_vis", "144"], ["--base", "ToMe", "--n_vis", "144", "--restore"]):
        runs = batched_runs(bench, data, tmp_path, in_process, config, (1, 4))
        assert runs[4][0] == runs[1][0], (bench, config)
        assert max(b[0] for b in runs[4][1]) == 4


def test_batches_are_built_from_similar_prompt_lengths():
    from restore.eval.entry_point import ImageRef, Item

    image = ImageRef(label="x.png", path="x.png")
    items = [Item(key=f"{i}#0", text="", image=None if i in (2, 5) else image) for i in range(8)]
    lengths = {0: 10, 1: 30, 2: 12, 3: 11, 4: 29, 5: 40, 6: 10, 7: 31}
    assert runner.plan_batches(items, 1, lengths.__getitem__) == [[i] for i in range(8)]  # question order
    # longest first; items with and without an image never share a batch
    assert runner.plan_batches(items, 3, lengths.__getitem__) == [[7, 1, 4], [3, 0, 6], [5, 2]]
    assert runner.plan_batches(items, 100, lengths.__getitem__) == [[7, 1, 4, 3, 0, 6], [5, 2]]


def test_text_only_and_image_questions_batched_apart(data, tmp_path, in_process):
    """ScienceQA with its text-only questions: batches of text alone (no image) give batch 1's answers."""
    runs = {}
    for batch_size in (1, 4):
        answers = tmp_path / f"sqa-{batch_size}.jsonl"
        entry, argv = bench_argv("sqa", data, answers, "--answer-text-only", "--base", "HoloV", "--n_vis", N_VIS,
                                 "--restore", "--batch-size", str(batch_size))
        assert run_entry(entry, argv) == 0
        runs[batch_size] = answers_of(answers)
    problems = json.loads((data / "scienceqa/llava_test_CQM-A.json").read_text())
    assert any("image" not in p for p in problems) and len(runs[1]) == len(problems)
    assert runs[4] == runs[1]


@pytest.mark.parametrize("config", [[], ["--base", "HoloV", "--n_vis", N_VIS, "--restore"]])
def test_beam_search_in_a_batch_answers_as_alone(config, data, tmp_path, in_process):
    runs = {}
    for batch_size in (1, 3):
        answers = tmp_path / f"beams-{batch_size}.jsonl"
        entry, argv = bench_argv("textvqa", data, answers, *config, "--num_beams", "2", "--batch-size", str(batch_size))
        assert run_entry(entry, argv) == 0
        runs[batch_size] = answers_of(answers)
    assert runs[3] == runs[1]


def test_killed_batched_run_resumes_with_another_batch_size(data, tmp_path, in_process, small_model, monkeypatch):
    """A kill loses only the batch being generated; a resume with another batch size answers the rest once."""
    reference = tmp_path / "reference.jsonl"
    entry, argv = bench_argv("gqa", data, reference, "--base", "DivPrune", "--n_vis", N_VIS)
    assert run_entry(entry, argv) == 0
    expected = answers_of(reference)

    answers = tmp_path / "answers.jsonl"
    entry, argv = bench_argv("gqa", data, answers, "--base", "DivPrune", "--n_vis", N_VIS)
    from llava.model import LlavaLlamaForCausalLM

    generate = LlavaLlamaForCausalLM.generate  # what the reduced model's generate calls, stock or not
    on_disk = []  # what the answers file holds when each batch starts

    def killed_on_the_second_batch(self, *args, **kwargs):
        on_disk.append(answers.read_text().splitlines())
        if len(on_disk) == 2:
            raise KeyboardInterrupt  # as a kill would, in the middle of the second batch
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LlavaLlamaForCausalLM, "generate", killed_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_entry(entry, [*argv, "--batch-size", "2"])
    monkeypatch.setattr(LlavaLlamaForCausalLM, "generate", generate)
    first_batch = answers.read_text().splitlines()
    assert on_disk == [[], first_batch]  # the first batch's answers were written before the second began
    assert len(first_batch) == 2 and not answer_files.read_meta(str(answers))["complete"]

    assert run_entry(entry, [*argv, "--batch-size", "3"]) == 0
    lines = answers.read_text().splitlines()
    assert [{k: v for k, v in json.loads(line).items() if k not in RANDOM_FIELDS} for line in lines] == expected
    assert set(first_batch) <= set(lines)  # the answers of the finished batch were kept, not redone
    meta = answer_files.read_meta(str(answers))
    assert meta["complete"] and meta["batch_size"] == 3


def test_bad_batch_sizes_are_refused_before_the_model_loads(data, tmp_path, monkeypatch, capsys):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --batch-size was checked")

    monkeypatch.setattr(runner, "load_model_for_eval", must_not_load)
    monkeypatch.setattr(arguments, "check_model_path", lambda path: None)
    answers = tmp_path / "a.jsonl"
    cases = {("--batch-size", "0"): "--batch-size must be at least 1, got 0",
             ("--batch-size", "-2"): "--batch-size must be at least 1, got -2",
             ("--batch-size", "2", "--temperature", "0.2"): "cannot reproduce the per-question random draws"}
    for extra, message in cases.items():
        for check_only in ([], ["--check-only"]):
            entry, argv = bench_argv("gqa", data, answers, *extra, *check_only)
            assert run_entry(entry, argv) == 2
            assert message in capsys.readouterr().err
            assert not answers.exists()
    with pytest.raises(SystemExit):  # not a number: argparse's own error
        run_entry(*bench_argv("gqa", data, answers, "--batch-size", "four"))
    # sampling at batch 1 stays allowed (the official VQAv2 setting)
    arguments.check_batch_size(1, 0.2)


def test_script_passes_batch_size_through(data, small_checkpoint, tmp_path, in_process):
    """scripts/llava1_5/pope.sh --batch-size 3 answers as the entry point at batch 1 (a refused value is
    refused by the script's --check-only, tested in-process above)."""
    entry, argv = bench_argv("pope", data, tmp_path / "one.jsonl")
    assert run_entry(entry, argv) == 0
    expected = answers_of(tmp_path / "one.jsonl")

    def script(*extra):
        env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
        return subprocess.run(["bash", str(SCRIPTS / "pope.sh"), "--model-path", str(small_checkpoint),
                               "--data-root", str(data), "--answers-root", str(tmp_path / "answers"),
                               "--results-dir", str(tmp_path / "results"), "--device", "cpu",
                               "--max_new_tokens", MAX_NEW_TOKENS, *extra], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)

    done = script("--batch-size", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    merged = next((tmp_path / "answers").rglob("merge.jsonl"))
    got = [{k: v for k, v in line.items() if k != "model_id"} for line in answers_of(merged)]
    assert got == [{k: v for k, v in line.items() if k != "model_id"} for line in expected]


def test_rows_that_end_early_answer_as_alone(data, tmp_path, in_process, small_model, monkeypatch, capsys):
    """Stopping is per row: a row that reaches its end-of-sequence token before the others of its batch
    gives what it gives alone, and only its own tokens are counted (not the filling that follows it)."""
    from llava.model import LlavaLlamaForCausalLM

    generate, outputs = LlavaLlamaForCausalLM.generate, []

    def recording(self, *args, **kwargs):
        outputs.append(generate(self, *args, **kwargs))
        return outputs[-1]

    def run(batch_size: int) -> Tuple[List[Dict], int]:
        answers = tmp_path / f"eos-{batch_size}.jsonl"
        entry, argv = bench_argv("gqa", data, answers, "--base", "VisPruner", "--n_vis", N_VIS, "--overwrite",
                                 "--batch-size", str(batch_size))
        capsys.readouterr()
        del outputs[:]
        assert run_entry(entry, argv) == 0
        return answers_of(answers), int(re.search(r"(\d+) tokens generated", capsys.readouterr().out).group(1))

    monkeypatch.setattr(LlavaLlamaForCausalLM, "generate", recording)
    run(1)
    first_tokens = [int(out[0, 1]) for out in outputs]
    # An ordinary token that an answer generates first becomes the end of sequence, one whose row then
    # stops while another row of its batch goes on (its place filled with padding).
    for stop in dict.fromkeys(first_tokens):
        monkeypatch.setattr(small_model.model.generation_config, "eos_token_id", stop)
        batched = run(4)
        if any(row[1] == stop and row.shape[0] > 2 for out in outputs for row in out):
            break
    else:
        pytest.fail(f"no row ended before the others of its batch (first tokens {first_tokens})")
    assert run(1) == batched
    assert batched[1] < len(first_tokens) * (1 + int(MAX_NEW_TOKENS))  # bos and 3 tokens unless stopped


def test_until_eos_keeps_the_row_as_generated_alone():
    import torch

    assert runner.until_eos(torch.tensor([1, 5, 2, 0, 0]), (2,)).tolist() == [1, 5, 2]
    assert runner.until_eos(torch.tensor([1, 5, 6]), (2,)).tolist() == [1, 5, 6]
    assert runner.until_eos(torch.tensor([1, 7, 5, 2]), (2, 7)).tolist() == [1, 7]
    assert runner.until_eos(torch.tensor([1, 5, 2]), ()).tolist() == [1, 5, 2]
