"""restore.throughput (``python -m restore.bench throughput``): data, counts and the report, never times."""
import json

import pytest

from restore import bench, throughput


def test_bench_dispatches_the_throughput_subcommand(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["throughput", "-h"])
    assert stop.value.code == 0
    assert "restore.bench throughput" in capsys.readouterr().out
    # the stage bench keeps its flags
    assert bench.build_parser().parse_args(["--n-vis", "64"]).n_vis == [64]


def test_config_flags_name_the_entry_point_flags():
    assert throughput.config_flags("full") == []
    assert throughput.config_flags("holov-64") == ["--base", "holov", "--n_vis", "64"]
    assert throughput.config_flags("VisPruner-64-restore") == ["--base", "VisPruner", "--n_vis", "64", "--restore"]
    with pytest.raises(ValueError):
        throughput.config_flags("holov-64-restore-g0.75")  # settings are not the bench's to sweep
    with pytest.raises(ValueError):
        throughput.config_flags("holov")


def test_prepare_data_writes_exactly_the_items_asked(tmp_path):
    data, warm = throughput.prepare_data(tmp_path, {"short": 5, "letter": 7, "long": 3})
    assert {name: d.n_items for name, d in data.items()} == {"short": 5, "letter": 7, "long": 3}
    assert warm.n_items == 2
    short = [json.loads(line) for line in open(data["short"].question_file)]
    long = [json.loads(line) for line in open(data["long"].question_file)]
    assert len(short) == 5 and data["short"].n_images == 3  # GQA fixtures ask two questions per image
    assert {q["text"] for q in long} == {throughput.LONG_PROMPT}
    assert len(open(data["letter"].question_file).read().splitlines()) == 1 + 7  # header and rows


def _row(workload, batch, items_per_s):
    return {"workload": workload, "batch_size": batch, "items_per_s": items_per_s}


def test_targets_say_pass_or_miss_and_by_how_much():
    rows = [_row("short", 1, 10.0), _row("short", 16, 25.0), _row("letter", 1, 5.0), _row("letter", 16, 50.0)]
    speedups = throughput.batch_speedups(rows)
    assert speedups["short"] == {"1": 1.0, "16": 2.5}
    sweep = {"ratio": 0.4, "configs": list(throughput.SWEEP_CONFIGS)}
    batch, swept = throughput.target_lines(rows, speedups, sweep, "")
    assert not batch["passed"] and batch["line"].startswith("MISS") and "38% short" in batch["line"]
    assert swept["passed"] and swept["line"].startswith("PASS")
    late = throughput.target_lines(rows, speedups, {**sweep, "ratio": 0.6}, "")[1]
    assert not late["passed"] and "1.20x the allowed time" in late["line"]


def test_instrument_substitutes_the_loader_and_counts(tmp_path, small_checkpoint):
    from llava_patches.loading import load_model

    built = []

    def build(device, dtype):
        built.append((device, dtype))
        return load_model(small_checkpoint, device=device, dtype=dtype)

    data, warm = throughput.prepare_data(tmp_path, {"short": 3})
    execution = throughput.Execution(str(small_checkpoint), "cpu", "float32")
    instrument = throughput.Instrument(build)
    with instrument.active():
        argv = throughput.workload_argv(data["short"], str(tmp_path / "a.jsonl"), 2, 2, execution)
        result = throughput.run_entry("vqa_loader", argv, instrument)
    assert built == [("cpu", "float32")]
    assert (result.model_loads, result.vision_forwards) == (1, 3)  # every item's image, once
    assert result.tokens == 3 * 2  # a random model rarely ends early
    from llava_patches.family import FAMILY, LlavaFamily

    assert "load" not in vars(FAMILY) and FAMILY.load.__func__ is LlavaFamily.load  # given back


def test_quick_run_end_to_end(tmp_path, small_checkpoint, capsys):
    out = tmp_path / "out"
    status = throughput.main(["--quick", "--model-path", str(small_checkpoint), "--device", "cpu",
                              "--dtype", "float32", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    assert status == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "throughput.json").read_text())
    assert set(results) == {"meta", "workloads", "batch", "speedup_over_batch_1", "sweep", "targets"}
    assert (out / "throughput.png").stat().st_size > 0 and (out / "throughput.txt").is_file()
    rows = results["batch"]
    assert [(r["workload"], r["batch_size"]) for r in rows] == [
        (w, b) for w in ("short", "letter", "long") for b in (1, 2)]
    for r in rows:
        items = results["workloads"][r["workload"]]["items"]
        assert r["items"] == items == 4
        assert r["vision_forwards"] == items  # full: every item's image through CLIP once
        assert items <= r["tokens"] <= items * r["max_new_tokens"]
        assert r["items_per_s"] > 0
    assert set(results["speedup_over_batch_1"]) == {"short", "letter", "long"}

    sweep = results["sweep"]
    per_config = sweep["separate"]["per_config"]
    assert list(per_config) == list(throughput.SWEEP_CONFIGS)
    assert all(c["model_loads"] == 1 and c["vision_forwards"] == sweep["items"] for c in per_config.values())
    assert sweep["separate"]["model_loads"] == 7
    assert sweep["separate"]["vision_forwards"] == 7 * sweep["items"]
    # one load, and each batch's images encoded once for all seven (none of them changes the encoder)
    assert (sweep["sweep"]["model_loads"], sweep["sweep"]["vision_forwards"]) == (1, sweep["items"])
    assert sweep["answers_equal"] is True and sweep["differing"] == []
    assert sweep["ratio"] == pytest.approx(sweep["sweep"]["wall_s"] / sweep["separate"]["wall_s"])
    assert [t["name"] for t in results["targets"]] == ["batch", "sweep"]
    assert "answers of the sweep and of the separate runs (answer_id aside): equal" in printed


def test_answers_compare_without_their_random_ids(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"question_id": 1, "text": "red", "answer_id": "x1"}\n')
    b.write_text('{"question_id": 1, "text": "red", "answer_id": "y2"}\n\n')
    assert throughput.read_answers(str(a)) == throughput.read_answers(str(b)) == [{"question_id": 1, "text": "red"}]
    b.write_text('{"question_id": 1, "text": "blue", "answer_id": "y2"}\n')
    assert throughput.read_answers(str(a)) != throughput.read_answers(str(b))
