"""scripts/qwen2_5_vl/<bench>.sh end to end in the Qwen environment: Table 3's five benchmarks on their fixtures
and the small Qwen2.5-VL checkpoint, each launch answering the unreduced model and a share budget with RESTORE
in one pass (--configs), then merging, scoring and writing result records that the paper table reads."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "qwen2_5_vl"
BENCHMARKS = ("mmbench", "mme", "pope", "sqa", "textvqa")
CONFIGS = "full,HoloV-k0.333-restore"
TAGS = ["full", "holov-k0.333-restore"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from restore.eval.fixtures import make_fixtures

    root = tmp_path_factory.mktemp("data")
    make_fixtures(root, n=2, seed=0, benchmarks=list(BENCHMARKS))
    return root


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}
    # the scripts take .venv-qwen's Python when the checkout has one; this interpreter's otherwise
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]))
    return env


@pytest.fixture(scope="module")
def launches(qwen_checkpoint, data, tmp_path_factory):
    """All five scripts, started together (each is one shard on the CPU)."""
    out = tmp_path_factory.mktemp("runs")
    running = {}
    for bench in BENCHMARKS:
        command = ["bash", str(SCRIPTS / f"{bench}.sh"), "--model-path", str(qwen_checkpoint), "--data-root", str(data),
                   "--answers-root", str(out / "answers"), "--results-dir", str(out / "results"),
                   "--device", "cpu", "--max_new_tokens", "3", "--configs", CONFIGS]
        running[bench] = subprocess.Popen(command, cwd=out, env=_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
    done = {bench: (process.wait(timeout=900), process.stdout.read()) for bench, process in running.items()}
    return out, done


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_script_answers_scores_and_records_each_configuration(launches, qwen_checkpoint, bench):
    out, done = launches
    status, log = done[bench]
    assert status == 0, log
    model = qwen_checkpoint.name
    records = [json.loads(p.read_text()) for p in (out / "results").glob(f"{bench}__{model}__*.json")]
    assert sorted(r["run_name"] for r in records) == TAGS
    for record in records:
        settings = record["settings"]
        assert settings["conv_mode"] == "qwen2_5_vl" and settings["prompt_style"] == "lmms_eval"
        assert settings["image_protocol"] == {"min_pixels": 200704, "max_pixels": 12845056, "jpeg_quality": 75}
        assert record["n_items"] > 0 and record["main_metric"] and record["metrics"]
        if record["run_name"] != "full":
            assert (record["base"], record["keep"], record["n_vis"], record["restore"]) == ("HoloV", 0.333, None, True)
        answers = out / "answers" / bench / model / record["run_name"] / "merge.jsonl"
        assert len(answers.read_text().splitlines()) == record["n_items"]


def test_paper_table3_reads_the_records(launches, qwen_checkpoint):
    from restore.paper import PaperConfig, get_table
    from restore.paper.layout import MeasuredTable, latest_by_name

    out, _ = launches
    table = get_table("table3")
    measured = MeasuredTable(table, latest_by_name(out / "results"), qwen_checkpoint.name, table.benchmarks)
    full = next(i for i, r in enumerate(table.rows) if r.config.base is None)
    holov = next(i for i, r in enumerate(table.rows)
                 if r.config == PaperConfig.from_dict({"base": "HoloV", "keep": 0.333, "restore": True}))
    for bench in table.benchmarks:
        assert measured.values[full, bench] is not None and measured.values[holov, bench] is not None


def test_script_help_and_refusals(data, qwen_checkpoint, tmp_path):
    def script(*argv):
        return subprocess.run(["bash", str(SCRIPTS / "pope.sh"), *argv], cwd=tmp_path, env=_env(),
                              capture_output=True, text=True, timeout=300)

    shown = script("--help")
    assert shown.returncode == 0
    assert "bash scripts/qwen2_5_vl/pope.sh" in shown.stdout and "default Qwen/Qwen2.5-VL-7B-Instruct" in shown.stdout
    common = ["--model-path", str(qwen_checkpoint), "--data-root", str(data), "--answers-root", str(tmp_path / "a"),
              "--results-dir", str(tmp_path / "r"), "--device", "cpu"]
    for extra, message in ((["--base", "HoloV", "--keep", "1.5"], "share of each image's visual tokens"),
                           (["--base", "FastV", "--keep", "0.111"], "FastV on Qwen2.5-VL is not implemented"),
                           (["--min-pixels", "5000", "--max-pixels", "4000"], "min_pixels <= max_pixels"),
                           (["--base", "HoloV", "--keep", "0.111", "--n_vis", "8"], "not both")):
        refused = script(*common, *extra)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert not (tmp_path / "a").exists() or not any((tmp_path / "a").rglob("*.jsonl"))
