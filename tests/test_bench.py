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


def test_tiny_benchmark_writes_table_json_and_plot(small_checkpoint, tmp_path, capsys):
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
    shape = LLMShape(**results["meta"]["llm_shape"])
    for row in rows.values():
        for key in ("vision_ms", "prefill_ms", "decode_ms_per_token", "end_to_end_ms"):
            assert row[key] > 0, key
        assert row["decode_matches_generate"], row["method"]
        assert row["kv_cache_bytes"] == kv_cache_bytes(row["seq_len"], shape, torch.float32)
        assert row["flops"]["fastv"] == fastv_prefill_flops(row["seq_len"], shape.hidden_size,
                                                            shape.intermediate_size, shape.num_layers)
        assert row["flops"]["exact"] == exact_prefill_flops(row["seq_len"], shape)
    # Stages exist only where the configuration has them.
    assert rows["full"]["selection_ms"] is None and rows["full"]["bias_ms"] is None
    assert rows["HoloV"]["selection_ms"] > 0 and rows["HoloV"]["merging_ms"] is None and rows["HoloV"]["bias_ms"] is None
    assert rows["HoloV+RESTORE"]["merging_ms"] > 0 and rows["HoloV+RESTORE"]["bias_ms"] > 0
    assert rows["full"]["flops"]["exact"] > rows["HoloV"]["flops"]["exact"]

    targets = results["targets"]
    assert [o["base"] for o in targets["overhead"]] == ["HoloV"]
    overhead = targets["overhead"][0]
    restored = rows["HoloV+RESTORE"]
    assert overhead["ratio"] == pytest.approx(
        (restored["selection_ms"] + restored["merging_ms"] + restored["bias_ms"]) / restored["prefill_ms"])
    assert sorted(s["n_keep"] for s in targets["selector_speedup"]) == [32, 64]  # RESTORE keeps n_vis // 2
    assert "selector HoloV" in printed and "overhead HoloV+RESTORE" in printed
    assert ("PASS" in printed) or ("MISS" in printed)

    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "HoloV+RESTORE" in (out / "bench.txt").read_text()


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--bases", "NoSuchMethod"])
    assert "unknown selector" in capsys.readouterr().err
    assert bench.main(["--new-tokens", "1"]) == 2
    assert "--new-tokens" in capsys.readouterr().err
