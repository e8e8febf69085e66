"""scripts/llava1_5/<bench>.sh end to end on the CPU: few-item fixtures, the small checkpoint, 2 new tokens.

The nine scripts run concurrently (one module fixture) to keep the file's wall time down; the sharding
tests fake two GPUs with CUDA_VISIBLE_DEVICES="0,1" and --device cpu.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from restore.eval.fixtures import make_fixtures

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "llava1_5"
MAX_NEW_TOKENS = "2"

# benchmark -> reduction flags it runs with, and the answers subfolder they give
CONFIGS = {
    "gqa": (["--base", "FastV", "--n_vis", "64", "--restore"], "fastv-64-restore"),  # in-LLM methods, too
    "vqav2": (["--base", "PDrop", "--n_vis", "64"], "pdrop-64"),
    "seed": (["--base", "SparseVLM", "--n_vis", "64", "--restore"], "sparsevlm-64-restore"),
    "mmbench": (["--base", "VisPruner", "--n_vis", "32", "--restore"], "vispruner-32-restore"),
    "mme": (["--base", "DivPrune", "--n_vis", "8"], "divprune-8"),  # 28 questions: few tokens keep it fast
    "pope": (["--base=holov", "--n_vis=64"], "holov-64"),
    "sqa": ([], "full"),
    "textvqa": (["--base", "DivPrune", "--n_vis", "24", "--restore"], "divprune-24-restore"),
    "ocrbench": ([], "full"),
}


def script_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **extra)
    return env


def script_command(bench: str, checkpoint: Path, data: Path, out: Path, *extra: str) -> list:
    return ["bash", str(SCRIPTS / f"{bench}.sh"), "--model-path", str(checkpoint), "--data-root", str(data),
            "--answers-root", str(out / "answers"), "--results-dir", str(out / "results"),
            "--device", "cpu", "--max_new_tokens", MAX_NEW_TOKENS, *extra]


def run_script(bench, checkpoint, data, out, *extra, cwd=None, **env) -> subprocess.CompletedProcess:
    return subprocess.run(script_command(bench, checkpoint, data, out, *extra), cwd=cwd or out,
                          env=script_env(**env), capture_output=True, text=True, timeout=600)


def read_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def answer_texts(path: Path) -> list:
    return [(line.get("question_id", line.get("id")), line.get("prompt", line.get("question")),
             line.get("text", line.get("predict"))) for line in read_lines(path)]


def expected_ids(bench: str, data: Path) -> list:
    """Question ids in question-file order, read straight from the fixture files."""
    def jsonl(path):
        return [json.loads(line)["question_id"] for line in (data / path).read_text().splitlines() if line.strip()]

    files = {"gqa": "gqa/llava_gqa_testdev_balanced.jsonl", "vqav2": "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
             "seed": "seed_bench/llava-seed-bench.jsonl", "mme": "MME/llava_mme.jsonl",
             "pope": "pope/llava_pope_test.jsonl", "textvqa": "textvqa/llava_textvqa_val_v051_ocr.jsonl"}
    if bench in files:
        return jsonl(files[bench])
    if bench == "mmbench":
        rows = (data / "mmbench/mmbench_dev_20230712.tsv").read_text().splitlines()[1:]
        return [int(row.split("\t")[0]) for row in rows if row.strip()]
    if bench == "sqa":
        return [p["id"] for p in json.loads((data / "scienceqa/llava_test_CQM-A.json").read_text()) if "image" in p]
    return [q["id"] for q in json.loads((data / "ocrbench/OCRBench.json").read_text())]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    make_fixtures(root, n=2, seed=1)
    return root


@pytest.fixture(scope="module")
def all_runs(data, small_checkpoint, tmp_path_factory):
    """Every script once, all at the same time, from a directory outside the repository."""
    out = tmp_path_factory.mktemp("runs")
    procs = {}
    for bench, (flags, _) in CONFIGS.items():
        log = open(out / f"{bench}.out", "w+")
        procs[bench] = (subprocess.Popen(script_command(bench, small_checkpoint, data, out, *flags), cwd=out,
                                         env=script_env(OMP_NUM_THREADS="1"), stdout=log, stderr=subprocess.STDOUT,
                                         text=True), log)
    results = {}
    for bench, (proc, log) in procs.items():
        rc = proc.wait(timeout=900)
        log.seek(0)
        results[bench] = (rc, log.read())
        log.close()
    return out, results


@pytest.mark.parametrize("bench", list(CONFIGS))
def test_script_end_to_end(bench, all_runs, data, small_checkpoint):
    out, results = all_runs
    rc, output = results[bench]
    assert rc == 0, output
    flags, tag = CONFIGS[bench]
    answers_dir = out / "answers" / bench / small_checkpoint.name / tag
    merged = read_lines(answers_dir / "merge.jsonl")
    assert [line.get("question_id", line.get("id")) for line in merged] == expected_ids(bench, data)

    records = [json.loads(p.read_text()) for p in (out / "results").glob(f"{bench}__*.json")]
    assert len(records) == 1
    record = records[0]
    metrics = json.loads((answers_dir / "scores" / "metrics.json").read_text())
    assert record["benchmark"] == bench and record["model"] == small_checkpoint.name
    assert record["n_items"] == len(merged)
    assert record["metrics"] == metrics["metrics"] and record["main_metric"] == metrics["main_metric"]
    assert record["wall_time_s"] > 0 and record["timestamp"]
    expected_base = {"full": "none", "holov": "HoloV", "divprune": "DivPrune", "vispruner": "VisPruner",
                     "fastv": "FastV", "pdrop": "PDrop", "sparsevlm": "SparseVLM"}[
        tag.split("-")[0]]
    assert (record["base"], record["restore"]) == (expected_base, tag.endswith("-restore"))
    assert record["n_vis"] == (int(tag.split("-")[1]) if tag != "full" else 576)
    assert record["settings"]["max_new_tokens"] == int(MAX_NEW_TOKENS)
    assert record["run_name"] == tag
    assert f"[{bench}] {small_checkpoint.name}" in output and "result:" in output


def copy_benchmark(data: Path, folder: str, dest: Path) -> Path:
    shutil.copytree(data / folder, dest / folder)
    return dest


def test_two_shards_give_the_single_run_answers_and_a_failing_shard_fails(all_runs, data, small_checkpoint, tmp_path):
    out, results = all_runs
    assert results["mme"][0] == 0
    flags, tag = CONFIGS["mme"]
    reference = answer_texts(out / "answers/mme" / small_checkpoint.name / tag / "merge.jsonl")
    root = copy_benchmark(data, "MME", tmp_path / "data")
    questions = [json.loads(x) for x in (root / "MME/llava_mme.jsonl").read_text().splitlines()]
    last_image = root / "MME/MME_Benchmark_release_version" / questions[-1]["image"]
    half = len(questions) // 2 + len(questions) % 2
    assert all(q["image"] != questions[-1]["image"] for q in questions[:half]), "needs an image only chunk 1 uses"
    good = last_image.read_bytes()
    last_image.write_bytes(good[: len(good) // 3])  # truncated: fails when chunk 1 checks its images

    failed = run_script("mme", small_checkpoint, root, tmp_path, *flags, CUDA_VISIBLE_DEVICES="0,1")
    assert failed.returncode == 1
    assert "2 shard(s)" in failed.stdout and "CUDA_VISIBLE_DEVICES=1" in failed.stdout
    assert "shard 1 FAILED" in failed.stderr and last_image.name in failed.stderr and "truncated" in failed.stderr
    answers_dir = tmp_path / "answers/mme" / small_checkpoint.name / tag
    assert not (answers_dir / "merge.jsonl").exists() and not list((tmp_path / "results").glob("*.json"))
    chunk0 = json.loads((answers_dir / "chunks/2_0.jsonl.meta.json").read_text())
    assert chunk0["complete"] and chunk0["n_items"] == half

    # Fixed and rerun: chunk 0 is kept, chunk 1 answered, and the merge equals the single-process run.
    last_image.write_bytes(good)
    fixed = run_script("mme", small_checkpoint, root, tmp_path, *flags, CUDA_VISIBLE_DEVICES="0,1")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"{half} already answered" in (answers_dir / "logs/2_0.log").read_text()
    # each attempt's log starts empty; the failed attempt's log is kept beside it
    assert "truncated" not in (answers_dir / "logs/2_1.log").read_text()
    kept = list((answers_dir / "logs").glob("2_1.log.*"))
    assert len(kept) == 1 and "truncated" in kept[0].read_text()
    assert answer_texts(answers_dir / "merge.jsonl") == reference
    assert len(list((tmp_path / "results").glob("mme__*.json"))) == 1


def test_nodes_share_a_benchmark_and_the_last_one_scores(all_runs, data, small_checkpoint, tmp_path):
    out, results = all_runs
    reference = answer_texts(out / "answers/pope" / small_checkpoint.name / "holov-64/merge.jsonl")
    root = copy_benchmark(data, "pope", tmp_path / "data")
    flags = [*CONFIGS["pope"][0], "--nodes", "2"]
    first = run_script("pope", small_checkpoint, root, tmp_path, *flags, "--node-rank", "0")
    assert first.returncode == 0, first.stderr
    assert "other nodes' chunks are not complete yet" in first.stdout
    assert not list((tmp_path / "results").glob("*.json"))
    assert list((tmp_path / "answers/pope" / small_checkpoint.name / "holov-64/nodes").glob("0.json"))
    second = run_script("pope", small_checkpoint, root, tmp_path, *flags, "--node-rank", "1")
    assert second.returncode == 0, second.stderr
    assert answer_texts(tmp_path / "answers/pope" / small_checkpoint.name / "holov-64/merge.jsonl") == reference
    assert len(list((tmp_path / "results").glob("pope__*.json"))) == 1
    # the run is over: a later run may use another layout
    assert not list((tmp_path / "answers/pope" / small_checkpoint.name / "holov-64/nodes").glob("*.json"))


def test_nodes_with_conflicting_settings_fail_loudly(data, small_checkpoint, tmp_path):
    root = copy_benchmark(data, "pope", tmp_path / "data")
    flags = [*CONFIGS["pope"][0], "--nodes", "2"]
    first = run_script("pope", small_checkpoint, root, tmp_path, *flags, "--node-rank", "0")
    assert first.returncode == 0, first.stderr
    # the second node has two GPUs, so two shards by default: its chunks and node 0's never add up
    other_layout = run_script("pope", small_checkpoint, root, tmp_path, *flags, "--node-rank", "1",
                              CUDA_VISIBLE_DEVICES="0,1")
    assert other_layout.returncode == 2, other_layout.stdout + other_layout.stderr
    assert "--nodes 2 --shards 1 (chunks 0..0 of 2)" in other_layout.stderr
    assert "--nodes 2 --shards 2 (chunks 2..3 of 4)" in other_layout.stderr
    assert "shard 0:" not in other_layout.stdout  # refused before inference
    # the second node was started with another answer-changing setting: waiting would never help
    second = run_script("pope", small_checkpoint, root, tmp_path, *flags, "--node-rank", "1", "--max_new_tokens", "3")
    assert second.returncode == 1, second.stdout + second.stderr
    assert "cannot be merged" in second.stderr and "max_new_tokens: 2 vs 3" in second.stderr
    assert not (tmp_path / "answers/pope" / small_checkpoint.name / "holov-64/merge.jsonl").exists()
    assert not list((tmp_path / "results").glob("*.json"))


def test_another_shard_count_reuses_every_finished_answer(all_runs, data, small_checkpoint, tmp_path):
    out, results = all_runs
    assert results["pope"][0] == 0
    config = Path("pope") / small_checkpoint.name / CONFIGS["pope"][1]
    reference = answer_texts(out / "answers" / config / "merge.jsonl")
    shutil.copytree(out / "answers" / config, tmp_path / "answers" / config)  # a finished run, one shard
    outputs = {}
    for n in ("2", "1"):
        rerun = run_script("pope", small_checkpoint, data, tmp_path, *CONFIGS["pope"][0], "--shards", n)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        outputs[n] = rerun.stdout
        assert answer_texts(tmp_path / "answers" / config / "merge.jsonl") == reference
    for k in range(2):
        log = (tmp_path / "answers" / config / f"logs/2_{k}.log").read_text()
        assert "(0 answered now" in log and "loading model" not in log
    assert [line["question_id"] for line in read_lines(tmp_path / "answers" / config / "merge.jsonl")] == \
        expected_ids("pope", data)
    # a CPU shard's thread count does not depend on how many shards there are
    threads = {n: re.findall(r"OMP_NUM_THREADS=(\d+)", shown) for n, shown in outputs.items()}
    assert threads["2"] == threads["1"] * 2 and threads["1"] == ["1"], threads


def test_script_rejects_bad_usage_before_starting_shards(data, small_checkpoint, tmp_path):
    # (an entry point's own errors reach the user through the failing shard's log, see above)
    chunks = run_script("gqa", small_checkpoint, data, tmp_path, "--num-chunks", "2")
    assert chunks.returncode == 2 and "--num-chunks is set by this script" in chunks.stderr
    missing = run_script("gqa", small_checkpoint, tmp_path / "nowhere", tmp_path)
    assert missing.returncode == 2 and "data root" in missing.stderr and "not found" in missing.stderr
    # the scorer's annotation is checked before inference, not found missing after it
    root = copy_benchmark(data, "seed_bench", tmp_path / "data")
    (root / "seed_bench/SEED-Bench.json").unlink()
    no_annotation = run_script("seed", small_checkpoint, root, tmp_path)
    assert no_annotation.returncode == 2 and "SEED-Bench.json" in no_annotation.stderr, no_annotation.stderr
    assert "shard" not in no_annotation.stdout
    assert not (tmp_path / "answers").exists()
    # folders that cannot be written are found before inference, not when the results are written
    (tmp_path / "a-file").write_text("")
    for option, what in (("--results-dir", "results folder"), ("--answers-root", "answers folder")):
        unwritable = run_script("pope", small_checkpoint, data, tmp_path, option, str(tmp_path / "a-file/below"))
        assert unwritable.returncode == 2 and what in unwritable.stderr, unwritable.stderr
        assert "a-file/below" in unwritable.stderr and "shard" not in unwritable.stdout


def test_help_lists_the_options():
    shown = subprocess.run(["bash", str(SCRIPTS / "ocrbench.sh"), "--help"], capture_output=True, text=True)
    assert shown.returncode == 0
    for option in ("--model-path", "--data-root", "--shards", "--nodes", "--node-rank", "--run-name"):
        assert option in shown.stdout


def test_a_sweep_answers_each_configuration_as_its_separate_run(all_runs, data, small_checkpoint, tmp_path):
    """--configs: one pass, two shards, two configurations; each answers folder equals a separate run's."""
    out, results = all_runs
    assert results["pope"][0] == 0
    holov = out / "answers/pope" / small_checkpoint.name / CONFIGS["pope"][1]
    separate = subprocess.Popen(script_command("pope", small_checkpoint, data, tmp_path / "separate", "--base",
                                               "DivPrune", "--n_vis", "8", "--restore"),
                                cwd=tmp_path, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    sweep = run_script("pope", small_checkpoint, data, tmp_path, "--configs", "HoloV-64,divprune-8-restore",
                       CUDA_VISIBLE_DEVICES="0,1")
    alone = separate.communicate(timeout=600)[0]
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    assert separate.returncode == 0, alone
    model_dir = tmp_path / "answers/pope" / small_checkpoint.name
    references = {"holov-64": holov, "divprune-8-restore": tmp_path / "separate/answers/pope" /
                  small_checkpoint.name / "divprune-8-restore"}

    def without_ids(path):
        return [{k: v for k, v in line.items() if k != "answer_id"} for line in read_lines(path)]

    for tag, reference in references.items():
        assert sorted(p.name for p in (model_dir / tag / "chunks").glob("*.jsonl")) == ["2_0.jsonl", "2_1.jsonl"]
        assert without_ids(model_dir / tag / "merge.jsonl") == without_ids(reference / "merge.jsonl")
        ours = json.loads((model_dir / tag / "merge.jsonl.meta.json").read_text())
        theirs = json.loads((reference / "merge.jsonl.meta.json").read_text())
        assert ours["settings"] == theirs["settings"]
        assert (model_dir / tag / "merge.jsonl.sources.json").exists()
    # one record per configuration, one log per shard in the sweep's folder, and the summary table
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("pope__*.json")]
    assert sorted(r["run_name"] for r in records) == ["divprune-8-restore", "holov-64"]
    logs = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.glob("_sweep-*/logs/*.log"))
    assert [log.split("/", 1)[1] for log in logs] == ["logs/2_0.log", "logs/2_1.log"]
    summary = sweep.stdout.split("summary:")[1]
    assert "holov-64" in summary and "divprune-8-restore" in summary and "f1_mean" in summary
