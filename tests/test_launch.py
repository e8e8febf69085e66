"""restore.eval.launch (what scripts/llava1_5/<bench>.sh run): options, names, GPUs, shard commands, failures,
interrupts, several nodes, progress (a sweep end to end: tests/test_eval_scripts.py).

The shards are tests/launch_fake_shard.py, which plans and writes answers files as an entry point does but
answers without a model; tests/test_eval_scripts.py runs the real entry points through the scripts.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from restore.eval import launch, naming, shards, supervise
from restore.eval.answer_files import write_meta
from restore.eval.fixtures import make_fixtures
from restore.settings import parse_run_tag, resolve_settings, run_tag

FAKE_SHARD = Path(__file__).with_name("launch_fake_shard.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("launch-data")
    make_fixtures(root, n=2, seed=2, benchmarks=["pope"])
    return root


@pytest.fixture
def fake_shards(monkeypatch):
    monkeypatch.setattr(launch, "shard_program", lambda entry: [sys.executable, str(FAKE_SHARD), entry])
    for name in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "FAKE_FAIL_CHUNK", "FAKE_STALL"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def argv(data: Path, out: Path, checkpoint: Path, *extra: str) -> list:
    return ["pope", "--model-path", str(checkpoint), "--data-root", str(data), "--answers-root", str(out / "answers"),
            "--results-dir", str(out / "results"), "--device", "cpu", *extra]


def answers_dir(out: Path, checkpoint: Path, tag: str) -> Path:
    return out / "answers" / "pope" / checkpoint.name / tag


# --------------------------------------------------------------------------------------------------
# Options


def test_own_options_both_spellings_and_refused_flags():
    own, passed = launch.split_arguments(["--shards=2", "--base=HoloV", "--n_vis", "64", "--restore", "--nodes", "2"])
    assert own == ["--shards", "2", "--nodes", "2"]
    assert passed == ["--base", "HoloV", "--n_vis", "64", "--restore"]
    for flag in launch.SET_BY_LAUNCHER:
        with pytest.raises(supervise.LaunchError, match=f"{flag} is set by this script"):
            launch.split_arguments([f"{flag}=1"])
    with pytest.raises(supervise.LaunchError, match="--run-name needs a value"):
        launch.split_arguments(["--run-name"])
    for bad, message in ((["--shards", "0"], "--shards must be a positive integer, got '0'"),
                         (["--nodes", "x"], "--nodes must be a positive integer"),
                         (["--nodes", "2", "--node-rank", "2"], r"--node-rank must be in 0\.\.1, got '2'")):
        with pytest.raises(supervise.LaunchError, match=message):
            launch.parse_options("gqa", bad)


def test_abbreviations_are_never_the_launchers_options():
    # a prefix of an option is passed on, and the entry point refuses it (tests/test_eval_scripts.py)
    options = launch.parse_options("gqa", ["--shard", "2", "--model-pat", "x"])
    assert options.shards is None and options.model_path == launch.DEFAULT_MODEL_PATH
    assert options.passthrough == ["--shard", "2", "--model-pat", "x"]


def test_configs_exclude_the_flags_that_name_a_configuration():
    options = launch.parse_options("gqa", ["--configs", "full, HoloV-64,HoloV-64-restore", "--max_new_tokens=4"])
    assert options.configs == ["full", "HoloV-64", "HoloV-64-restore"]
    for clash in (["--base", "HoloV"], ["--n-vis=64"], ["--restore"], ["--prune-ratio", "0.5"],
                  ["--calibration_c=3"], ["--run-name", "x"]):
        with pytest.raises(supervise.LaunchError, match="cannot be combined with " + clash[0].split("=")[0]):
            launch.parse_options("gqa", ["--configs", "full", *clash])
    with pytest.raises(supervise.LaunchError, match="at least one configuration"):
        launch.parse_options("gqa", ["--configs", ","])


def test_help_is_built_from_the_benchmark(capsys):
    with pytest.raises(SystemExit) as done:
        launch.main(["seed", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert "bash scripts/llava1_5/seed.sh" in shown and "SEED-Bench" in shown and "--only-images-under" in shown
    for option in launch.OWN_OPTIONS:
        assert option in shown
    assert launch.main(["nope"]) == 2 and "unknown benchmark" in capsys.readouterr().err


def test_bad_configs_are_refused_before_any_shard(data, small_checkpoint, tmp_path, fake_shards, capsys):
    for specs, message in (("full,HoloV-x", "configuration 'HoloV-x'"),
                           ("full,Nope-64", "configuration 'Nope-64': unknown --base 'Nope'"),
                           ("HoloV-64-restore,holov-64-restore-g0.5", "'HoloV-64-restore' and "
                                                                      "'holov-64-restore-g0.5' are one configuration")):
        assert launch.main(argv(data, tmp_path, small_checkpoint, "--configs", specs)) == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert not (tmp_path / "answers").exists()


# --------------------------------------------------------------------------------------------------
# Names


def test_one_model_name_and_one_configuration_name():
    assert naming.model_name_of("liuhaotian/llava-v1.5-7b") == "llava-v1.5-7b"
    assert naming.model_name_of("/ckpt/llava-lora/checkpoint-500/") == "llava-lora_checkpoint-500"
    assert naming.config_tag(None) == "full" == naming.plain_tag("none", 576, False)
    for base, n_vis, use_restore in (("HoloV", 64, True), ("ToMe", 64, True), ("DivPrune", 128, False)):
        assert naming.plain_tag(base, n_vis, use_restore) == naming.config_tag(base, n_vis, use_restore)
    for tag in ("full", "holov-64", "holov-64-restore-g0.75", "visionzip-64-restore-anchors_uniform",
                "holov-64-pos_retained", "holov-64-restore-mpos_first"):
        flags = naming.spec_flags(tag)
        config = parse_run_tag(tag)
        assert ("--restore" in flags) == bool(config and config["restore"])
        if config is not None:
            assert run_tag(resolve_settings(num_patches=576, **config)) == tag
    settings = {"base": "HoloV", "n_vis": 64, "restore": True, "reduction_settings": {"prune_ratio": 0.75}}
    assert naming.recorded_tag(settings) == "holov-64-restore-g0.75"
    assert naming.record_run_name({"base": "none", "n_vis": 576}) == "full"


# --------------------------------------------------------------------------------------------------
# GPUs and threads


def test_gpus_from_the_environment_or_nvidia_smi(tmp_path, monkeypatch):
    assert supervise.discover_gpus("auto", {"CUDA_VISIBLE_DEVICES": " 0, 2 ,"}) == ["0", "2"]
    assert supervise.discover_gpus("auto", {"CUDA_VISIBLE_DEVICES": ""}) == []
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\nprintf '0\\n1\\n 3\\n'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    assert supervise.discover_gpus("auto", {}) == ["0", "1", "3"]
    assert supervise.discover_gpus("cpu", {}) == []  # a CPU run does not ask
    smi.write_text("#!/bin/sh\nexit 9\n")
    assert supervise.discover_gpus("cuda", {}) == []
    assert supervise.cpu_threads_per_shard({}) == 1 and supervise.cpu_threads_per_shard({"OMP_NUM_THREADS": "4"}) == 4
    for bad in ("0", "two", "-1"):
        with pytest.raises(supervise.LaunchError, match="OMP_NUM_THREADS must be a positive integer"):
            supervise.cpu_threads_per_shard({"OMP_NUM_THREADS": bad})


# --------------------------------------------------------------------------------------------------
# Shard commands


def test_shard_commands_of_one_configuration_and_of_a_sweep(data, small_checkpoint, tmp_path, fake_shards):
    fake_shards.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    one = launch.prepare(launch.parse_options("pope", argv(data, tmp_path, small_checkpoint, "--base", "HoloV",
                                                            "--n_vis=64", "--restore")[1:]))
    assert [c.tag for c in one.configs] == ["holov-64-restore"] and one.shards == 2 and not one.sweeps
    built = launch.build_shards(one, one.configs)
    folder = answers_dir(tmp_path, small_checkpoint, "holov-64-restore")
    for i, shard in enumerate(built):
        command = shard.command
        assert command[command.index("--answers-file") + 1] == str(folder / "chunks" / f"2_{i}.jsonl")
        assert command[command.index("--num-chunks") + 1:command.index("--num-chunks") + 4] == ["2", "--chunk-idx",
                                                                                                 str(i)]
        assert command[-5:] == ["--base", "HoloV", "--n_vis", "64", "--restore"]
        assert shard.log == str(folder / "logs" / f"2_{i}.log")
        assert shard.env["CUDA_VISIBLE_DEVICES"] == str(i) and shard.env["OMP_NUM_THREADS"] == "1"

    sweep = launch.prepare(launch.parse_options("pope", argv(data, tmp_path, small_checkpoint, "--shards", "3",
                                                              "--configs", "full,HoloV-64,holov-64-restore")[1:]))
    assert sweep.sweeps and [c.tag for c in sweep.configs] == ["full", "holov-64", "holov-64-restore"]
    built = launch.build_shards(sweep, sweep.configs)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in built] == ["0", "1", "0"]  # round-robin
    model_dir = tmp_path / "answers" / "pope" / small_checkpoint.name
    for i, shard in enumerate(built):
        command = shard.command
        assert command[command.index("--configs") + 1] == "full,holov-64,holov-64-restore"
        assert command[command.index("--answers-file") + 1] == str(model_dir / "{config}" / "chunks" / f"3_{i}.jsonl")
        assert "--base" not in command
        assert shard.answers_files == [str(model_dir / tag / "chunks" / f"3_{i}.jsonl")
                                       for tag in ("full", "holov-64", "holov-64-restore")]
        assert Path(shard.log).parent.parent.name.startswith("_sweep-") and Path(shard.log).name == f"3_{i}.log"
    # the same configurations in another order share the sweep's log folder
    again = launch.prepare(launch.parse_options("pope", argv(data, tmp_path, small_checkpoint, "--configs",
                                                              "holov-64-restore,full,HoloV-64")[1:]))
    assert launch.sweep_dir(again) == launch.sweep_dir(sweep)


# --------------------------------------------------------------------------------------------------
# Running: success, failure, interrupt


def test_a_failing_shard_fails_the_run_with_its_log(data, small_checkpoint, tmp_path, fake_shards, capsys):
    fake_shards.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    fake_shards.setenv("FAKE_FAIL_CHUNK", "1")
    assert launch.main(argv(data, tmp_path, small_checkpoint, "--base", "HoloV", "--n_vis", "64")) == 1
    captured = capsys.readouterr()
    assert "shard 0 done" in captured.out
    assert "shard 1 FAILED with exit code 3" in captured.err and "| error: this chunk was told to fail" in captured.err
    assert "1 of 2 shard(s) failed (1); nothing merged or scored" in captured.err
    folder = answers_dir(tmp_path, small_checkpoint, "holov-64")
    assert not (folder / "merge.jsonl").exists() and not list((tmp_path / "results").glob("*.json"))
    assert json.loads((folder / "chunks/2_0.jsonl.meta.json").read_text())["complete"]


def test_an_interrupt_stops_the_shards_and_keeps_their_answers(data, small_checkpoint, tmp_path, fake_shards, capsys):
    fake_shards.setenv("FAKE_STALL", "1")
    options = launch.parse_options("pope", argv(data, tmp_path, small_checkpoint)[1:])
    prepared = launch.prepare(options)
    answers = answers_dir(tmp_path, small_checkpoint, "full") / "chunks" / "1_0.jsonl"

    def interrupt_after_the_first_answer():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "progress: shard 0 1/" not in capsys.readouterr().out:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    watcher = threading.Thread(target=interrupt_after_the_first_answer)
    watcher.start()
    started = time.monotonic()
    try:
        status = launch.run(prepared, progress_interval=0.2)
    finally:
        watcher.join()
    assert status == 130 and time.monotonic() - started < 100
    assert "interrupted; answers written so far are kept" in capsys.readouterr().err
    assert len(answers.read_text().splitlines()) == 1  # kept for the rerun to resume
    assert not (answers.parent.parent / "merge.jsonl").exists()


def test_progress_is_read_from_the_answers_files(tmp_path):
    chunk = tmp_path / "4_1.jsonl"
    assert supervise.shard_progress([str(chunk)], 4, 1) == "starting"
    chunk.write_text('{"a": 1}\n{"a": 2}\n')
    write_meta(str(chunk), {"num_chunks": 4, "chunk_idx": 1, "n_items": 5, "complete": False})
    assert supervise.shard_progress([str(chunk)], 4, 1) == "2/5"
    assert supervise.shard_progress([str(chunk)], 2, 1) == "starting"  # an earlier layout's record
    other = tmp_path / "other" / "4_1.jsonl"
    other.parent.mkdir()
    other.write_text('{"a": 1}\n')
    write_meta(str(other), {"num_chunks": 4, "chunk_idx": 1, "n_items": 5, "complete": False})
    assert supervise.shard_progress([str(chunk), str(other)], 4, 1) == "3/10"  # a sweep's shard


def test_fresh_logs_keep_the_previous_attempt(tmp_path):
    log = tmp_path / "logs" / "2_0.log"
    supervise.start_fresh_log(str(log), "== first")
    log.write_text(log.read_text() + "attempt 1\n")
    supervise.start_fresh_log(str(log), "== second")
    supervise.start_fresh_log(str(log), "== third")
    assert log.read_text() == "== third\n"
    kept = sorted(p.name for p in log.parent.glob("2_0.log.*"))
    assert len(kept) == 2 and kept[1] == kept[0] + "_"
    assert supervise.log_tail(str(log.parent / kept[0])) == ["== first", "attempt 1"]


# --------------------------------------------------------------------------------------------------
# Several nodes


def test_nodes_wait_for_each_other_and_the_last_one_merges_once(data, small_checkpoint, tmp_path, fake_shards,
                                                               capsys):
    nodes = ["--base", "HoloV", "--n_vis", "64", "--nodes", "2"]
    folder = answers_dir(tmp_path, small_checkpoint, "holov-64")
    assert launch.main(argv(data, tmp_path, small_checkpoint, *nodes, "--node-rank", "0")) == 0
    assert "other nodes' chunks are not complete yet" in capsys.readouterr().out
    assert (folder / "nodes" / "0.json").exists() and not list((tmp_path / "results").glob("*.json"))

    # a node with another layout (two GPUs, so two shards) is refused before its shards start
    fake_shards.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert launch.main(argv(data, tmp_path, small_checkpoint, *nodes, "--node-rank", "1")) == 2
    refused = capsys.readouterr()
    assert "--nodes 2 --shards 1 (chunks 0..0 of 2)" in refused.err and "shard 0:" not in refused.out
    fake_shards.delenv("CUDA_VISIBLE_DEVICES")

    assert launch.main(argv(data, tmp_path, small_checkpoint, *nodes, "--node-rank", "1")) == 0
    assert "result:" in capsys.readouterr().out
    assert len(list((tmp_path / "results").glob("pope__*.json"))) == 1 and not list((folder / "nodes").glob("*"))

    # another node finishing the same chunks afterwards (or at the same time, behind the lock) does not
    # merge again, whatever the files' times say
    for chunk in (folder / "chunks").glob("2_*.jsonl"):
        os.utime(chunk, (time.time() + 100, time.time() + 100))
    node0 = launch.prepare(launch.parse_options("pope", argv(data, tmp_path, small_checkpoint, *nodes,
                                                             "--node-rank", "0")[1:]))
    assert launch.finish(node0, node0.configs[0], 1.0, named=False).status == "merged elsewhere"
    assert "another node has merged and scored these chunks already" in capsys.readouterr().out
    assert len(list((tmp_path / "results").glob("pope__*.json"))) == 1 and not list((folder / "nodes").glob("*"))

    # changed answers are merged again
    merged = str(folder / "merge.jsonl")
    chunks = [str(folder / "chunks" / f"2_{i}.jsonl") for i in range(2)]
    assert shards.already_merged(merged, chunks)
    with open(chunks[1], "a") as f:
        f.write("\n")
    assert shards.already_merged(merged, chunks) is None
