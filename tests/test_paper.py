"""python -m restore.paper and restore.report --paper: the tables' configurations, the commands, the layout."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from restore import paper
from restore.paper import __main__ as paper_cli
from restore.eval.naming import model_name_of
from restore.paper.layout import MeasuredTable, latest_by_name, render
from restore.settings import parse_run_tag, resolve_settings, run_tag

REPO = Path(__file__).resolve().parents[1]

# Rows the paper prints per table (the full model counted where the table shows it), by hand from the paper.
ROWS = {"table1": 1 + 3 * 15, "table4": 1 + 8, "table5": 1 + 4 * 3, "table6": 1 + 3 * 3 + 2, "table7": 1 + 4,
        "table11": 3 * 4 * 2, "table12": 4 * 6, "table13": 1 + 8, "table19": 1 + 6, "table2": 1 + 16,
        "table3": 1 + 18, "table10": 1 + 18, "table18": 12}


def test_every_table_has_its_rows_and_a_published_value_per_cell():
    tables = paper.load_tables()
    assert set(ROWS) == set(tables)
    for name, table in tables.items():
        assert len(table.rows) == ROWS[name], name
        for row in table.rows:
            assert set(table.benchmarks) <= set(row.published), (name, row.label)
    t1 = tables["table1"]
    assert t1.rows[0].published["mme"] == 1862 and t1.rows[0].published["seed"] == 58.6
    holov64 = [r for r in t1.rows if r.config == paper.PaperConfig("HoloV", 64, True)]
    assert len(holov64) == 1 and holov64[0].published["gqa"] == 59.0 and holov64[0].published["avg"] == 96.5


def test_ablation_rows_are_the_documented_settings():
    t4 = paper.get_table("table4")
    tags = [r.config.tag() for r in t4.rows]
    assert tags == ["full", "holov-64", "holov-64-cal_size_distance", "holov-64-pos_retained", "holov-64-restore-g1",
                    "holov-64-restore-pos_reindexed-cal_none", "holov-64-restore-pos_reindexed",
                    "holov-64-restore-cal_none", "holov-64-restore"]
    # Table 19's gamma = 1 and Table 4's row 4 are one configuration, so they share answers
    t19 = paper.get_table("table19")
    assert t19.rows[-1].config.tag() == "holov-64-restore-g1"
    t7 = [r.config.tag() for r in paper.get_table("table7").rows]
    assert t7[1:] == ["holov-64-restore-mpos_first", "holov-64-restore", "holov-64-restore-mpos_mean",
                      "holov-64-restore-mpos_last"]
    t6 = {r.label: r.config.tag() for r in paper.get_table("table6").rows}
    assert t6["VisionZip, P + M (uniform anchors)"] == "visionzip-64-restore-anchors_uniform"
    assert "VisionZip, P (prune only)" not in t6  # "-" in the paper
    for table in paper.load_tables().values():
        for row in table.rows:
            if row.config.base is not None and row.config.n_vis is not None:
                # the run name the sweep is given reads back as this configuration
                config = parse_run_tag(row.config.tag())
                assert (config["base"], config["n_vis"]) == (row.config.base.lower(), row.config.n_vis)


def _dry_run(capsys, *argv):
    assert paper_cli.main([*argv, "--dry-run", "--results-dir", "/nonexistent-results"]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("name", ["table4", "table5", "table6", "table7", "table11", "table12", "table19", "table1"])
def test_dry_run_lists_exactly_the_tables_configurations(capsys, name):
    import tokenreduction as tr

    table = paper.get_table(name)
    lines = _dry_run(capsys, name)
    commands = [line for line in lines if line.startswith("bash ")]
    runnable = [c for c in table.configs() if paper.why_not_runnable(table, c, tr.available_methods()) is None]
    assert len(commands) == len(table.benchmarks)  # one pass per benchmark, every configuration in it
    listed = {c.split("/llava1_5/")[1].split(".sh")[0]: c.split(" --configs ")[1].split(",") for c in commands}
    assert list(listed) == list(table.benchmarks)
    assert all(tags == [config.tag() for config in runnable] for tags in listed.values())
    blocked = [line for line in lines if line.startswith("  cannot run yet")]
    assert len(blocked) == len(table.configs()) - len(runnable)
    if name == "table1":  # the text-aware rows run too (their methods act inside the LLM)
        assert not blocked


def test_dry_run_restricts_benchmarks_and_skips_what_exists(capsys, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.json").write_text(json.dumps({"benchmark": "pope", "base": "HoloV", "n_vis": 64, "restore": True,
                                                "model": "llava-v1.5-7b", "run_name": "holov-64-restore",
                                                "metrics": {"f1_mean": 84.0}, "main_metric": "f1_mean"}))
    assert paper_cli.main(["table7", "--benchmarks", "pope,gqa", "--dry-run", "--results-dir", str(results)]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bash ")]
    assert len(commands) == 2 and "gqa.sh" in commands[0] and "pope.sh" in commands[1]
    assert len(commands[0].split(" --configs ")[1].split(",")) == 5
    pope = commands[1].split(" --configs ")[1].split(",")
    assert len(pope) == 4 and "holov-64-restore" not in pope
    with pytest.raises(SystemExit, match="has no benchmark ocrbench"):
        paper_cli.main(["table7", "--benchmarks", "ocrbench", "--dry-run"])
    assert paper_cli.main(["table99", "--dry-run"]) == 2


def test_slurm_array_has_one_task_per_run_and_node(tmp_path, capsys):
    job = tmp_path / "t4.sbatch"
    assert paper_cli.main(["table4", "--slurm", str(job), "--nodes", "2", "--results-dir", str(tmp_path)]) == 0
    text = job.read_text()
    assert "#SBATCH --array=0-15" in text  # 8 benchmarks (9 configurations each, one pass) x 2 nodes
    assert '--nodes $NODES --node-rank $rank' in text and text.count("scripts/llava1_5/") == 8
    assert text.count("--configs full,holov-64,") == 8
    bash = subprocess.run(["bash", "-n", str(job)], capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr


def _record(results: Path, bench: str, tag: str, metric: str, value: float, model="m") -> None:
    payload = {"benchmark": bench, "base": "x", "n_vis": 64, "restore": False, "model": model, "run_name": tag,
               "metrics": {metric: value}, "main_metric": metric, "timestamp": "2026-01-01T00:00:00+00:00"}
    (results / f"{bench}-{tag}.json").write_text(json.dumps(payload))


def test_layout_puts_measured_beside_published_with_the_papers_avg(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _record(results, "gqa", "full", "accuracy", 60.0)
    _record(results, "pope", "full", "f1_mean", 80.0)
    _record(results, "gqa", "holov-64-restore", "accuracy", 57.0)
    _record(results, "pope", "holov-64-restore", "f1_mean", 84.0)
    _record(results, "gqa", "holov-64-restore-mpos_first", "accuracy", 54.0)
    table = paper.get_table("table7")
    measured = MeasuredTable(table, latest_by_name(results), "m", ["gqa", "pope"])
    median = next(i for i, r in enumerate(table.rows) if r.label == "merged position: median")
    first = next(i for i, r in enumerate(table.rows) if r.label == "merged position: first")
    average, count = measured.average(median)
    assert count == 2 and average == pytest.approx((100 * 57 / 60 + 100 * 84 / 80) / 2)
    assert measured.average(first) == (pytest.approx(90.0), 1)
    text = render(measured)
    assert "| 57.0 / 59.0 (-2.0) | 84.0 / 84.9 (-0.9) |" in text
    assert "| 54.0 / 58.6 (-4.6) |  / 85.6 |" in text  # not run: blank, never 0
    last = next(line for line in text.splitlines() if "merged position: last" in line)
    assert last.count(" / ") == 3 and "(" not in last  # nothing measured: published values only


def test_report_paper_flag_prints_tables(tmp_path, capsys):
    from restore import report

    results = tmp_path / "results"
    results.mkdir()
    _record(results, "textvqa", "holov-192-restore-g0.25", "accuracy", 50.0)
    assert report.main(["--results", str(results), "--paper", "table12", "--model", "m"]) == 0
    out = capsys.readouterr().out
    assert "| 192 | + ours, gamma 0.25 | 50.0 / 56.9 (-6.9) |" in out
    assert (results / "paper_table12.csv").read_text().count("\n") == 1 + 24


def test_model_name_is_llavas():
    from llava.mm_utils import get_model_name_from_path

    for path in ("liuhaotian/llava-v1.5-7b", "/ckpt/llava-lora/checkpoint-500/", "llava-v1.5-7b", "/a/b/"):
        assert model_name_of(path) == get_model_name_from_path(path), path
    assert model_name_of("/ckpt/llava-lora/checkpoint-500/") == "llava-lora_checkpoint-500"


def test_run_names_from_the_script_and_python_agree():
    cases = [(["--base", "HoloV", "--n_vis", "64", "--restore", "--prune_ratio", "0.75"], ("HoloV", 64, True,
                                                                                        dict(prune_ratio=0.75))),
             (["--base", "ToMe", "--n_vis", "64", "--calibration", "size_distance"], ("ToMe", 64, False,
                                                                                       dict(calibration="size_distance"))),
             (["--base", "DivPrune", "--n_vis", "128", "--positions", "retained", "--device", "cpu"],
              ("DivPrune", 128, False, dict(positions="retained")))]
    for argv, (base, n_vis, use_restore, kw) in cases:
        out = subprocess.run([sys.executable, "-m", "restore.settings", "tag", *argv], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == run_tag(resolve_settings(base, n_vis, use_restore, 576, **kw))


def test_paper_command_runs_a_table_on_the_fixtures_and_resumes(tmp_path, small_checkpoint):
    from restore.eval.fixtures import make_fixtures

    data = tmp_path / "data"
    make_fixtures(data, n=2, seed=3, benchmarks=["pope"])
    common = [sys.executable, "-m", "restore.paper", "table7", "--benchmarks", "pope", "--model-path",
              str(small_checkpoint), "--data-root", str(data), "--answers-root", str(tmp_path / "answers"),
              "--results-dir", str(tmp_path / "results")]
    extra = ["--", "--device", "cpu", "--max_new_tokens", "2"]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    first = subprocess.run(common + extra, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "5 runs missing" in first.stdout
    table = (tmp_path / "results" / "paper_table7.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 576") or line.startswith("| 64")]
    assert len(rows) == 5 and all(" / " in row.split("|")[-2] and "(" in row.split("|")[-2] for row in rows)
    folders = sorted(p.name for p in (tmp_path / "answers" / "pope" / small_checkpoint.name).iterdir())
    # one sweep ran the five configurations: its shard logs lie beside their answers folders
    assert len([f for f in folders if f.startswith("_sweep-")]) == 1
    tags = [f for f in folders if not f.startswith("_sweep-")]
    assert tags == sorted(["full", "holov-64-restore", "holov-64-restore-mpos_first", "holov-64-restore-mpos_last",
                           "holov-64-restore-mpos_mean"])
    again = subprocess.run(common + ["--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert "0 runs missing" in again.stdout and "bash " not in again.stdout


def test_hausdorff_and_decay_commands(tmp_path, small_checkpoint, synthetic_image):
    from restore import analyze

    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        synthetic_image(i, (360 + 40 * i, 300)).save(images / f"{i}.png")
    out = tmp_path / "out"
    assert analyze.main(["hausdorff", "--model-path", str(small_checkpoint), "--images", str(images), "--bases",
                         "DivPrune", "--n-vis", "32", "--out", str(out)]) == 0
    rows = (out / "hausdorff_32.csv").read_text().splitlines()
    assert rows[0].startswith("base,reduction") and len(rows) == 4 and all(",2" in r for r in rows[1:])
    assert analyze.main(["decay", "--c", "3", "--max-distance", "50", "--out", str(out)]) == 0
    assert (out / "decay_hd128_c3.png").read_bytes()[:4] == b"\x89PNG"
    assert analyze.main(["decay", "--c", "1"]) == 2


def test_tag_command_loads_plugins_so_a_plugins_place_counts(tmp_path):
    (tmp_path / "encoder_plugin.py").write_text(
        "import tokenreduction as tr\ntr.register_method('MyEncoderMerge', acts='vision_encoder')\n")
    argv = [sys.executable, "-m", "restore.settings", "tag", "--base", "MyEncoderMerge", "--n_vis", "64", "--restore",
            "--positions", "reindexed", "--calibration", "none"]
    env = {**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{REPO}"}
    with_plugin = subprocess.run(argv + ["--plugin", "encoder_plugin"], capture_output=True, text=True, env=env)
    assert with_plugin.returncode == 0, with_plugin.stderr
    assert with_plugin.stdout.strip() == "myencodermerge-64"  # merges itself: no gamma, no anchors to name
    bad = subprocess.run(argv + ["--plugin", "no_such_module_xyz"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "cannot import the plugin module" in bad.stderr


def test_table3_runs_the_qwen_scripts_with_share_budgets(capsys, tmp_path):
    table3 = paper.get_table("table3")  # Qwen2.5-VL: budgets as shares of each image's tokens
    lines = _dry_run(capsys, "table3")
    commands = [line for line in lines if line.startswith("bash ")]
    assert len(commands) == len(table3.benchmarks) and not [l for l in lines if "cannot run yet" in l]
    for command, bench in zip(commands, table3.benchmarks):
        assert f"/scripts/qwen2_5_vl/{bench}.sh --model-path Qwen/Qwen2.5-VL-7B-Instruct" in command
        tags = command.split(" --configs ")[1].split()[0].split(",")
        assert tags[:3] == ["full", "divprune-k0.333", "divprune-k0.333-restore"] and len(tags) == 19
    # a run record of a share budget lands in its row; another model's record does not
    results = tmp_path / "results"
    results.mkdir()
    _record(results, "pope", "divprune-k0.111-restore", "f1_mean", 82.0, model="Qwen2.5-VL-7B-Instruct")
    _record(results, "pope", "full", "f1_mean", 61.5, model="llava-v1.5-7b")
    measured = MeasuredTable(table3, latest_by_name(results), "Qwen2.5-VL-7B-Instruct", table3.benchmarks)
    row = next(i for i, r in enumerate(table3.rows) if r.config == paper.PaperConfig.from_dict(
        {"base": "DivPrune", "keep": 0.111, "restore": True}))
    assert measured.values[row, "pope"] == 82.0
    assert [k for k, v in measured.values.items() if v is not None] == [(row, "pope")]
    assert "82.0 / 82.3 (-0.3)" in render(measured)


def test_published_values_equal_the_shared_paper_tables():
    source = REPO.parent / "shared" / "paper_tables.md"
    if not source.is_file():
        pytest.skip("the shared paper_tables.md is not beside this checkout")
    text = source.read_text()
    t1 = {(r.tokens, r.label, r.config.base): r.published for r in paper.get_table("table1").rows}
    for line in text.split("## Table 1 / Table 10")[1].split("##")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 11 or not cells[0].isdigit():
            continue
        matches = [pub for (tokens, label, _), pub in t1.items() if tokens == cells[0] and label == cells[1]]
        assert matches, cells
        values = [float(c) for c in cells[3:]]
        assert any([pub[b] for b in ("gqa", "mmbench", "mme", "pope", "sqa", "vqav2", "textvqa", "seed")] == values
                   for pub in matches), cells


def test_table2_runs_on_a_llava_next_checkpoint(tmp_path):
    """Table 2 (LLaVA-NeXT, 2880 visual tokens, 320 and 160 kept): every row runs in one sweep per benchmark."""
    from restore.eval.fixtures import make_fixtures
    from restore.small_next_checkpoint import build_small_next_checkpoint

    checkpoint = build_small_next_checkpoint(tmp_path / "llava-v1.6-small-random", seed=0)
    make_fixtures(tmp_path / "data", n=1, seed=3, benchmarks=["gqa"])
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "restore.paper", "table2", "--benchmarks", "gqa", "--model-path",
                           str(checkpoint), "--data-root", str(tmp_path / "data"), "--answers-root",
                           str(tmp_path / "answers"), "--results-dir", str(tmp_path / "results"), "--", "--device",
                           "cpu", "--max_new_tokens", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").glob("gqa__*.json")]
    assert len(records) == 17
    assert {r["n_vis"] for r in records} == {2880, 320, 160}
    rows = [line for line in (tmp_path / "results" / "paper_table2.md").read_text().splitlines()
            if line.startswith(("| 2880", "| 320", "| 160"))]
    assert len(rows) == 17 and all(" / " in row for row in rows)
