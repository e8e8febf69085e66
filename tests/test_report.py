"""Results table from hand-written run records: latest run wins, averages worked out by hand."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from restore.report import Config, build_table, load_runs, main, render_markdown


def record(bench, base, n_vis, restore, metrics, main_metric, timestamp, **extra) -> dict:
    return {"benchmark": bench, "base": base, "n_vis": n_vis, "restore": restore, "model": "llava-v1.5-7b",
            "metrics": metrics, "main_metric": main_metric, "n_items": 10, "wall_time_s": 1.0,
            "timestamp": timestamp, **extra}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    t0, t1 = "2026-01-01T10:00:00+00:00", "2026-01-02T10:00:00Z"
    runs = [
        record("gqa", None, None, False, {"accuracy": 62.0}, "accuracy", t0),
        record("mme", "none", 576, False, {"total": 1862.0, "perception": 1510.0}, "total", t0),
        record("pope", None, None, False, {"f1_mean": 85.9}, "f1_mean", t0),
        record("vqav2", None, None, False, {"answered": 100.0}, None, t0),
        record("gqa", "HoloV", 64, False, {"accuracy": 55.0}, "accuracy", t0),
        record("mme", "HoloV", 64, False, {"total": 1600.0, "perception": 1300.0}, "total", t0),
        record("pope", "HoloV", 64, False, {"f1_mean": 80.0}, "f1_mean", t0),
        record("gqa", "HoloV", 64, True, {"accuracy": 58.0}, "accuracy", t1),   # later: wins
        record("gqa", "HoloV", 64, True, {"accuracy": 60.0}, "accuracy", t0),   # earlier, written last
        record("mme", "HoloV", 64, True, {"total": 1700.0, "perception": 1400.0}, "total", t0, n_missing=3),
    ]
    for i, run in enumerate(runs[:-2]):
        write(root / f"run{i}.json", run)
    (root / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs[-2:]))
    write(root / "gqa_out" / "metrics.json", {"benchmark": "gqa", "metrics": {"accuracy": 1.0}})  # not a run record
    return root


def test_latest_wins_and_averages(results):
    runs, skipped = load_runs(results)
    assert len(runs) == 10 and len(skipped) == 1
    table = build_table(runs)
    base = Config("llava-v1.5-7b", "none", 576, False)
    holo = Config("llava-v1.5-7b", "HoloV", 64, False)
    holo_r = Config("llava-v1.5-7b", "HoloV", 64, True)
    assert table.configs == [base, holo, holo_r]
    assert table.values[(holo_r, "gqa")] == 58.0
    assert table.benchmarks == ["gqa", "mme", "pope", "vqav2"]
    # MME on a 0-100 scale is total / 2800: 1862 -> 66.5, 1600 -> 57.142857, 1700 -> 60.714286
    assert table.mean[base] == (pytest.approx((62.0 + 66.5 + 85.9) / 3), 3)
    assert table.mean[holo] == (pytest.approx((55.0 + 1600 / 28 + 80.0) / 3), 3)
    assert table.mean[holo_r] == (pytest.approx((58.0 + 1700 / 28) / 2), 2)
    assert table.rel[base] == (pytest.approx(100.0), 3)
    assert table.rel[holo] == (pytest.approx(100 * (55 / 62 + 1600 / 1862 + 80 / 85.9) / 3), 3)
    assert table.rel[holo_r] == (pytest.approx(100 * (58 / 62 + 1700 / 1862) / 2), 2)


def test_markdown_marks_partial_average_incomplete_runs_and_online_vqav2(results):
    runs, _ = load_runs(results)
    text = render_markdown(build_table(runs))
    rows = text.splitlines()
    # Avg is the paper's Avg (% of the unreduced model); Mean the 0-100 mean.
    assert rows[0].startswith("| Model | Base | Tokens | RESTORE | GQA | MME | POPE | VQAv2 | Avg | Mean |")
    assert rows[2] == "| llava-v1.5-7b | none | 576 | – | 62.0 | 1862.0 | 85.9 | online | 100.0% | 71.5 |"
    last = rows[4].split(" | ")
    assert last[5] == "1700.0*"          # the MME run left items unanswered
    assert last[6] == "–"                # no POPE run for this configuration
    assert last[8].endswith("%†") and last[9] == "59.4† |"  # averages over 2 of the 3 scored benchmarks


def test_metric_override_changes_value_and_scale(results):
    runs, _ = load_runs(results)
    table = build_table(runs, {"mme": "perception"})
    base = Config("llava-v1.5-7b", "none", 576, False)
    assert table.values[(base, "mme")] == 1510.0
    assert table.mean[base][0] == pytest.approx((62.0 + 1510 / 20 + 85.9) / 3)  # perception max 2000
    assert "| MME-P |" in render_markdown(table)  # the column says it is not the paper's MME


def test_cli_writes_report_files(results, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["--results", str(results), "--out", str(out)]) == 0
    assert "| llava-v1.5-7b | HoloV | 64 | yes |" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [r["restore"] for r in rows] == ["False", "False", "True"]
    assert float(rows[2]["gqa"]) == 58.0 and rows[2]["pope"] == "" and rows[0]["vqav2"] == ""
    report = (out / "report.md").read_text()
    assert "MME is divided by its maximum" in report and "more.jsonl" in report


def test_a_run_with_another_run_name_gets_its_own_row(tmp_path):
    t0, t1 = "2026-01-01T10:00:00+00:00", "2026-01-02T10:00:00+00:00"
    write(tmp_path / "greedy.json", record("vqav2", "none", 576, False, {"answered": 100.0}, None, t0,
                                           run_name="full"))
    write(tmp_path / "sampled.json", record("vqav2", "none", 576, False, {"answered": 99.0}, None, t1,
                                            run_name="full-t0.2"))
    write(tmp_path / "holov.json", record("gqa", "HoloV", 64, True, {"accuracy": 50.0}, "accuracy", t0,
                                          run_name="holov-64-restore"))
    table = build_table(load_runs(tmp_path)[0])
    greedy = Config("llava-v1.5-7b", "none", 576, False)
    assert table.configs == [greedy, Config("llava-v1.5-7b", "none", 576, False, "full-t0.2"),
                             Config("llava-v1.5-7b", "HoloV", 64, True)]
    assert table.cells[(greedy, "vqav2")].record["metrics"]["answered"] == 100.0  # not replaced by the later run
    assert "| llava-v1.5-7b (full-t0.2) | none | 576 |" in render_markdown(table)


def test_missing_results_folder(tmp_path):
    assert main(["--results", str(tmp_path / "absent")]) == 2


def test_cells_show_the_papers_column_metric_whatever_the_main_metric(tmp_path):
    t0 = "2026-01-01T10:00:00+00:00"
    # A scorer's main metric that is not the paper's column (older SEED records: image accuracy).
    write(tmp_path / "seed.json", record("seed", "none", 576, False,
                                         {"total_accuracy": 58.6, "image_accuracy": 66.1}, "image_accuracy", t0))
    write(tmp_path / "mme.json", record("mme", "none", 576, False,
                                        {"total": 1862.0, "perception": 1510.7}, "perception", t0))
    table = build_table(load_runs(tmp_path)[0])
    base = Config("llava-v1.5-7b", "none", 576, False)
    assert table.values[(base, "seed")] == 58.6 and table.values[(base, "mme")] == 1862.0
    assert "| MME | SEED |" in render_markdown(table)


def test_image_only_seed_is_labelled_seed_img_and_not_compared_with_seed(tmp_path):
    t0 = "2026-01-01T10:00:00+00:00"
    write(tmp_path / "full.json", record("seed", "none", 576, False,
                                         {"total_accuracy": 58.6, "image_accuracy": 66.1}, "total_accuracy", t0))
    write(tmp_path / "img.json", record("seed", "HoloV", 64, True,
                                        {"total_accuracy": None, "image_accuracy": 60.0}, "image_accuracy", t0))
    table = build_table(load_runs(tmp_path)[0])
    text = render_markdown(table)
    assert "| 60.0 (SEED-IMG) |" in text and "| 58.6 |" in text
    assert table.rel[Config("llava-v1.5-7b", "HoloV", 64, True)] == (None, 0)  # 60.0 / 58.6 would be a lie
    only_img = tmp_path / "only"
    write(only_img / "img.json", record("seed", "HoloV", 64, True,
                                        {"total_accuracy": None, "image_accuracy": 60.0}, "image_accuracy", t0))
    assert "| SEED-IMG |" in render_markdown(build_table(load_runs(only_img)[0]))


def test_the_unreduced_run_of_each_model_is_the_reference_whatever_its_token_count(tmp_path):
    """LLaVA-NeXT's unreduced run counts 2880 visual tokens, LLaVA-1.5's 576: Avg compares each model
    with its own."""
    t0 = "2026-01-01T10:00:00+00:00"
    runs = [record("gqa", "none", 2880, False, {"accuracy": 64.0}, "accuracy", t0, model="llava-v1.6-vicuna-7b"),
            record("gqa", "HoloV", 320, True, {"accuracy": 48.0}, "accuracy", t0, model="llava-v1.6-vicuna-7b"),
            record("gqa", "none", 576, False, {"accuracy": 60.0}, "accuracy", t0),
            record("gqa", "HoloV", 64, True, {"accuracy": 45.0}, "accuracy", t0)]
    for i, run in enumerate(runs):
        write(tmp_path / f"run{i}.json", run)
    table = build_table(load_runs(tmp_path)[0])
    next_r = Config("llava-v1.6-vicuna-7b", "HoloV", 320, True)
    v15_r = Config("llava-v1.5-7b", "HoloV", 64, True)
    assert table.rel[next_r] == (pytest.approx(75.0), 1) and table.rel[v15_r] == (pytest.approx(75.0), 1)


def test_a_full_record_counts_the_checkpoints_visual_tokens(small_checkpoint, tmp_path):
    from restore.eval.shards import unreduced_tokens
    from restore.small_next_checkpoint import build_small_next_checkpoint

    next_checkpoint = build_small_next_checkpoint(tmp_path / "llava-v1.6-small-random", seed=0)
    assert unreduced_tokens(str(small_checkpoint)) == 576
    assert unreduced_tokens(str(next_checkpoint)) == 2880
    assert unreduced_tokens(str(tmp_path / "missing")) == 576 and unreduced_tokens(None) == 576
