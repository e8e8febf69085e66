"""restore.bench and restore.flops: FLOPs against hand counts, the timer, and a tiny benchmark run."""
import json

import pytest
import torch

from restore import bench
from restore.analysis import timing
from restore.analysis.timing import PeakMemory, Timer
from restore.flops import (
    LLAVA_7B, LLMShape, exact_layer_flops, exact_prefill_flops, fastv_prefill_flops, kv_cache_bytes,
)

# n = 100 tokens, d = 8, m = 16, 2 layers; 2 heads of width 4, one KV head (grouped-query attention).
TOY = LLMShape(num_layers=2, hidden_size=8, num_heads=2, num_kv_heads=1, intermediate_size=16, vocab_size=50)


def test_fastv_formula_by_hand():
    # Per layer: 4*100*8^2 = 25,600; 2*100^2*8 = 160,000; 2*100*8*16 = 25,600 -> 211,200; two layers.
    assert fastv_prefill_flops(100, 8, 16, 2) == 422_400


def test_exact_count_by_hand():
    parts = exact_layer_flops(100, TOY)
    assert parts == {
        "q_proj": 2 * 100 * 8 * 8,  # 12,800
        "k_proj": 2 * 100 * 8 * 4,  # 6,400: one KV head of width 4
        "v_proj": 2 * 100 * 8 * 4,  # 6,400
        "o_proj": 2 * 100 * 8 * 8,  # 12,800
        "scores": 2 * 100 * 100 * 8,  # 160,000
        "weighted_sum": 2 * 100 * 100 * 8,  # 160,000
        "ffn": 6 * 100 * 8 * 16,  # 76,800
    }
    assert exact_prefill_flops(100, TOY) == 2 * 435_200
    # LM head on one position: 2 * 8 * 50 = 800 more.
    assert exact_prefill_flops(100, TOY, lm_head_tokens=1) == 870_400 + 800
    # With full-width K/V the projections are FastV's 4nd^2 multiply-adds counted as 2 FLOPs each.
    mha = LLMShape(2, 8, 2, 2, 16, 50)
    assert exact_prefill_flops(100, mha) == 2 * (8 * 100 * 64 + 4 * 100 * 100 * 8 + 6 * 100 * 8 * 16)


def test_kv_cache_bytes_by_hand():
    # K and V x 2 layers x 1 KV head x head dim 4 x 10 tokens x 2 bytes.
    assert kv_cache_bytes(10, TOY, torch.float16) == 2 * 2 * 1 * 4 * 10 * 2
    # LLaVA-1.5-7B in fp16 stores 0.5 MiB per token.
    assert kv_cache_bytes(1, LLAVA_7B, torch.float16) == 2 * 32 * 4096 * 2 == 512 * 1024


def test_timer_warms_up_sets_up_and_takes_the_median(monkeypatch):
    clock = {"now": 0.0}
    durations = iter([5.0, 0.03, 0.01, 0.02])  # the first call is the warm-up and is discarded
    calls, setups = [], []

    def fn():
        calls.append(1)
        clock["now"] += next(durations)
        return len(calls)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    result = Timer(torch.device("cpu"), repeats=3, warmup=1).measure(fn, setup=lambda: setups.append(1))
    assert len(calls) == 4 and len(setups) == 4
    assert result.samples == pytest.approx([0.03, 0.01, 0.02])
    assert result.median == pytest.approx(0.02)
    assert result.last == 4
    with pytest.raises(ValueError):
        Timer(torch.device("cpu"), repeats=0)


def test_peak_memory_sees_a_large_allocation():
    with PeakMemory(torch.device("cpu")) as meter:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if meter.bytes is None:
        pytest.skip("peak RSS cannot be measured on this platform")
    assert 60 * 2**20 <= meter.bytes <= 200 * 2**20


def _bench_row(base, restore, n_vis, prefill_ms, selection=None, merging=None, bias=None, reduce=None, seq_len=100):
    return {"base": base, "restore": restore, "n_vis": n_vis, "prefill_ms": prefill_ms, "selection_ms": selection,
            "merging_ms": merging, "bias_ms": bias, "reduce_ms": reduce, "seq_len": seq_len}


def test_overhead_target_uses_the_restore_row_at_the_budget():
    rows = [
        _bench_row(None, False, 576, 900.0),
        _bench_row("HoloV", False, 64, 50.0, selection=1.0, reduce=1.5),
        _bench_row("HoloV", True, 64, 70.0, selection=1.0, merging=2.0, bias=0.5, reduce=4.0),
        _bench_row("HoloV", True, 128, 10.0, selection=9.0, merging=9.0, bias=9.0, reduce=9.0, seq_len=164),
    ]
    [target] = bench.overhead_targets(rows, TOY, 64)
    assert (target["base"], target["n_vis"], target["layers"]) == ("HoloV", 64, 2)
    assert target["overhead_ms"] == pytest.approx(3.5) and target["prefill_ms"] == 70.0
    assert target["ratio"] == pytest.approx(3.5 / 70)
    assert target["ratio_reduce_call"] == pytest.approx(4.5 / 70)
    assert "ratio_32_layers_extrapolated" not in target  # TOY is not the 7B shape


def test_overhead_target_extrapolates_a_two_layer_7b_prefill_by_flops():
    two_layers = LLMShape(num_layers=2, hidden_size=4096, num_heads=32, num_kv_heads=32, intermediate_size=11008,
                          vocab_size=32000)
    rows = [_bench_row("DivPrune", True, 64, 1600.0, selection=30.0, merging=30.0, bias=0.4, reduce=61.0)]
    [target] = bench.overhead_targets(rows, two_layers, 64)
    # By hand, n = 100: per layer 8nd^2 + 4n^2 d + 6ndm, plus the LM head on every position 2ndV.
    n, d, m, vocab = 100, 4096, 11008, 32000
    layer, head = 8 * n * d * d + 4 * n * n * d + 6 * n * d * m, 2 * n * d * vocab
    prefill_32 = 1600.0 * (32 * layer + head) / (2 * layer + head)
    assert target["prefill_ms_32_layers_extrapolated"] == pytest.approx(prefill_32)
    assert target["ratio_32_layers_extrapolated"] == pytest.approx(60.4 / prefill_32)
    assert target["ratio"] == pytest.approx(60.4 / 1600.0)


def _overhead(base, ratio, **extra):
    return {"base": base, "n_vis": 64, "overhead_ms": 100 * ratio, "prefill_ms": 100.0, "ratio": ratio,
            "ratio_reduce_call": ratio, "layers": 2, **extra}


def _speedup(base, n_keep, speedup):
    return {"base": base, "n_keep": n_keep, "selector_ms": 1.0, "reference_ms": speedup, "speedup": speedup,
            "same_picks": True}


def test_target_verdicts_follow_the_documented_thresholds():
    overheads = [_overhead("HoloV", 0.049), _overhead("DivPrune", 0.05),  # the target is strictly below 5%
                 _overhead("VisPruner", 0.2, ratio_32_layers_extrapolated=0.01, prefill_ms_32_layers_extrapolated=2e3)]
    speedups = [_speedup("HoloV", 32, 10.0), _speedup("HoloV", 64, 2.9),  # the worst budget decides
                _speedup("VisPruner", 32, 3.0), _speedup("VisPruner", 64, 4.0)]
    lines = bench.format_targets(overheads, speedups, on_7b_shape=True, device=torch.device("cpu"))
    verdicts = [line.split()[0] for line in "\n".join(lines).splitlines()]
    assert verdicts == ["PASS", "MISS", "MISS", "PASS", "MISS", "PASS"]
    assert "extrapolated to 32 layers" in lines[2].splitlines()[1]
    assert lines[3].startswith("MISS selector HoloV") and "worst 2.9x" in lines[3]
    assert lines[4].startswith("PASS selector VisPruner")


def _real_kv_cache_bytes_per_token(model) -> int:
    """Bytes per token of the K/V cache the model returns after a short text-only prefill."""
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    total = sum(t.numel() * t.element_size() for layer in cache for t in layer[:2])
    return total // ids.shape[1]


def _fastv_flops_by_hand(n: int, config: dict) -> int:
    d, m = config["hidden_size"], config["intermediate_size"]
    return config["num_hidden_layers"] * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def _exact_flops_by_hand(n: int, config: dict) -> int:
    """Per layer: q and o (d -> d), k and v (d -> kv heads x head dim), Q K^T and P V, three SwiGLU matmuls."""
    d, m = config["hidden_size"], config["intermediate_size"]
    kv_width = config["num_key_value_heads"] * d // config["num_attention_heads"]
    per_layer = 2 * 2 * n * d * d + 2 * 2 * n * d * kv_width + 2 * 2 * n * n * d + 3 * 2 * n * d * m
    return config["num_hidden_layers"] * per_layer


def _verdict(printed: str, subject: str) -> str:
    """PASS or MISS, from the one printed target line about ``subject``."""
    lines = [line.split()[0] for line in printed.splitlines() if subject in line and line.split()[0] in ("PASS", "MISS")]
    assert len(lines) == 1, (subject, printed)
    return lines[0]


def test_tiny_benchmark_writes_table_json_and_plot(small_checkpoint, small_model, tmp_path, capsys):
    out = tmp_path / "bench"
    code = bench.main(["--model-path", str(small_checkpoint), "--bases", "holov", "--n-vis", "64", "--repeats", "1",
                       "--warmup", "0", "--new-tokens", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "bench.json").read_text())
    rows = {row["method"]: row for row in results["rows"]}
    assert list(rows) == ["full", "HoloV", "HoloV+RESTORE"]

    prompt = results["meta"]["prompt_tokens"]  # with one <image> placeholder
    assert rows["full"]["seq_len"] == prompt - 1 + 576
    assert rows["HoloV"]["seq_len"] == rows["HoloV+RESTORE"]["seq_len"] == prompt - 1 + 64
    # Sizes and FLOPs from sources outside the benchmark: the cache the model really builds, and the
    # widths in the checkpoint's config.json, counted by hand.
    cache_bytes_per_token = _real_kv_cache_bytes_per_token(small_model.model)
    config = json.loads((small_checkpoint / "config.json").read_text())
    for row in rows.values():
        for key in ("vision_ms", "prefill_ms", "decode_ms_per_token", "end_to_end_ms"):
            assert row[key] > 0, key
        assert row["decode_matches_generate"], row["method"]
        assert row["kv_cache_bytes"] == cache_bytes_per_token * row["seq_len"], row["method"]
        assert row["flops"]["fastv"] == _fastv_flops_by_hand(row["seq_len"], config), row["method"]
        assert row["flops"]["exact"] == _exact_flops_by_hand(row["seq_len"], config), row["method"]
    # Stages exist only where the configuration has them.
    assert rows["full"]["selection_ms"] is None and rows["full"]["bias_ms"] is None
    assert rows["HoloV"]["selection_ms"] > 0 and rows["HoloV"]["merging_ms"] is None and rows["HoloV"]["bias_ms"] is None
    assert rows["HoloV+RESTORE"]["merging_ms"] > 0 and rows["HoloV+RESTORE"]["bias_ms"] > 0
    assert rows["full"]["flops"]["exact"] > rows["HoloV"]["flops"]["exact"]

    targets = results["targets"]
    assert [o["base"] for o in targets["overhead"]] == ["HoloV"]
    overhead = targets["overhead"][0]
    assert overhead["prefill_ms"] == rows["HoloV+RESTORE"]["prefill_ms"]  # the RESTORE row's own prefill
    assert sorted(s["n_keep"] for s in targets["selector_speedup"]) == [32, 64]  # RESTORE keeps n_vis // 2
    # The printed verdicts follow the documented targets (docs/efficiency.md: < 5%, >= 3x, worst budget).
    assert _verdict(printed, "overhead HoloV+RESTORE") == ("PASS" if overhead["ratio"] < 0.05 else "MISS")
    worst = min(s["speedup"] for s in targets["selector_speedup"])
    assert _verdict(printed, "selector HoloV") == ("PASS" if worst >= 3 else "MISS")

    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "HoloV+RESTORE" in (out / "bench.txt").read_text()


def test_an_in_llm_method_counts_what_each_layer_sees(small_checkpoint, small_model, tmp_path):
    from tokenreduction.pdrop import PDrop

    out = tmp_path / "bench"
    code = bench.main(["--model-path", str(small_checkpoint), "--bases", "pdrop", "--n-vis", "64", "--repeats", "1",
                       "--warmup", "0", "--new-tokens", "2", "--device", "cpu", "--out", str(out)])
    assert code == 0
    rows = {row["method"]: row for row in json.loads((out / "bench.json").read_text())["rows"]}
    config = json.loads((small_checkpoint / "config.json").read_text())
    layers = config["num_hidden_layers"]
    per_token_per_layer = _real_kv_cache_bytes_per_token(small_model.model) // layers
    full = rows["full"]["seq_len"]
    for name in ("PDrop", "PDrop+RESTORE"):
        row = rows[name]
        assert row["seq_len"] == full  # every visual token enters the LLM
        # the 4-layer checkpoint cuts before layers 1, 2 and 3 (the 32-layer schedule's cuts, scaled)
        assert row["tokens_per_layer"] == [full] + [full - 576 + b for b in PDrop().budgets(64, 576)]
        assert row["flops"]["exact"] == sum(_exact_flops_by_hand(n, config) for n in row["tokens_per_layer"]) // layers
        assert row["kv_cache_bytes"] == per_token_per_layer * sum(row["tokens_per_layer"])
        assert row["decode_matches_generate"] and row["selection_ms"] is None and row["bias_ms"] is None
        assert row["flops"]["exact"] < rows["full"]["flops"]["exact"]


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--bases", "NoSuchMethod"])
    assert "unknown selector" in capsys.readouterr().err
    assert bench.main(["--new-tokens", "1"]) == 2
    assert "--new-tokens" in capsys.readouterr().err
