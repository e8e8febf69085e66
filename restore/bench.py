"""Efficiency benchmark: ``python -m restore.bench``.

For the full 576 visual tokens (stock LLaVA) and every base x n_vis x RESTORE on/off, on one prompt
(batch 1) on the current device:

- time of each stage, each timed on its own on the same inputs: vision encoder (+ projector),
  selection, merging, bias construction, LLM prefill (from the assembled embeddings), per-token
  decode (explicit loop over the KV cache), and end to end (``generate`` of --new-tokens tokens
  from the pixel tensor);
- peak memory of one end-to-end sample, the KV-cache size, and the prefill FLOPs of the LLM by
  FastV's formula and by an exact SwiGLU matmul count (:mod:`restore.flops`);
- the reduction-path targets, as ratios measured in the same run.

Outputs: a table on stdout, ``bench.json`` and ``bench.png`` in --out. See docs/efficiency.md.

``python -m restore.bench throughput [...]`` measures instead the evaluation entry points' items per
second by batch size, and a sweep of configurations against separate runs (:mod:`restore.throughput`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

import restore
import tokenreduction as tr
from restore.analysis.models import (
    DEFAULT_QUESTION, SHAPES, BenchModel, load_bench_model, load_image, prompt_inputs, visual_tokens,
)
from restore.analysis.timing import PeakMemory, Timer, Timing
from restore.attention import calibrated_prefill_masks
from restore.flops import (
    LLAVA_7B, LLMShape, exact_prefill_flops, fastv_prefill_flops, kv_cache_bytes, layered_kv_cache_bytes,
    layered_prefill_flops,
)
from restore.merge import anchor_merge, complement, group_medians
from restore.reduce import reduce_visual_tokens, retained_budget
from restore.settings import resolve_settings
from tokenreduction.reference import REFERENCES

DEFAULT_OUT = Path("playground/bench")
OVERHEAD_TARGET = 0.05  # selection + merging + bias < 5% of the reduced prefill (7B shape, n_vis 64)
SPEEDUP_TARGET = 3.0  # each selector >= 3x faster than its loop-based restatement (CPU)



@dataclass(frozen=True)
class Config:
    """One row of the benchmark: ``base=None`` is stock LLaVA with all N visual tokens."""

    base: Optional[str]
    n_vis: int
    restore: bool = False

    @property
    def label(self) -> str:
        if self.base is None:
            return "full"
        return f"{self.base}+RESTORE" if self.restore else self.base


def make_configs(bases: Sequence[str], n_vis: Sequence[int], num_patches: int) -> List[Config]:
    rows = [Config(None, num_patches)]
    for base in bases:
        for n in n_vis:
            rows += [Config(tr.canonical_name(base), n, False), Config(tr.canonical_name(base), n, True)]
    return rows


def apply_config(model, config: Config):
    if config.base is None:
        return restore.remove(model)
    return restore.apply(model, base=config.base, n_vis=config.n_vis, restore=config.restore)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    input_ids: torch.Tensor
    images: torch.Tensor
    image_sizes: list


def time_vision(bench: BenchModel, prompt: Prompt, timer: Timer) -> Dict[str, float]:
    """Vision encoder + projector, stock (every CLIP layer, all hidden states) and the reduced path's."""
    return {
        "stock": timer.measure(lambda: bench.model.encode_images(prompt.images)).ms,
        "reduced": timer.measure(lambda: visual_tokens(bench, prompt.images)).ms,
    }


def _unselected(tokens: tr.VisualTokens, keep: torch.Tensor):
    B, N, D = tokens.features.shape
    indices = complement(keep, N)
    return indices, tokens.features.gather(1, indices.unsqueeze(-1).expand(-1, -1, D))


def time_vision_encoder_method(bench: BenchModel, prompt: Prompt, config: Config, timer: Timer) -> float:
    """Vision encoder + projector of a method that reduces inside CLIP (ToMe, FlowCut), in ms."""
    from llava_patches.encoder_reduce import encode_in_encoder, encoder_method

    tower, projector = bench.model.get_vision_tower(), bench.model.get_model().mm_projector
    method = encoder_method(resolve_settings(config.base, config.n_vis, config.restore, tower.num_patches))
    return timer.measure(lambda: projector(encode_in_encoder(tower, prompt.images, method, config.n_vis).features)).ms


def time_reduction(tokens: tr.VisualTokens, config: Config, timer: Timer, bench: Optional[BenchModel] = None,
                   prompt: Optional[Prompt] = None) -> Dict[str, Optional[float]]:
    """Selection, merging (anchor_merge + group medians) and reduce_visual_tokens as one call, in ms.
    A method's own plain row (VisionZip) is timed as one call; a method inside CLIP has no stage here."""
    settings = resolve_settings(config.base, config.n_vis, config.restore, tokens.num_tokens)
    if settings.merges_itself or settings.acts == "llm":  # reduced inside a network: part of its own time
        return {"selection_ms": None, "merging_ms": None, "reduce_ms": None}
    if settings.is_plain_base and tr.plain_reduction(config.base) is not None:
        from llava_patches.vision import encode_visual_tokens

        needs = tr.method_needs(config.base, plain=True)
        full = encode_visual_tokens(bench.model, prompt.images, with_keys="keys" in needs,
                                    with_cls="cls_raw_feature" in needs)
        projector = bench.model.get_model().mm_projector
        own = timer.measure(lambda: reduce_visual_tokens(full, settings, project=projector)).ms
        return {"selection_ms": None, "merging_ms": None, "reduce_ms": own}
    selector = tr.get_selector(config.base)
    n_keep = retained_budget(config.n_vis, config.restore)
    result: Dict[str, Optional[float]] = {"selection_ms": timer.measure(lambda: selector(tokens, n_keep)).ms}
    if config.restore:
        positions, rest = _unselected(tokens, selector(tokens, n_keep))
        n_groups = config.n_vis - n_keep

        def merge():
            groups = anchor_merge(rest, n_groups)
            return group_medians(positions, groups.group_of, n_groups)

        result["merging_ms"] = timer.measure(merge).ms
    else:
        result["merging_ms"] = None
    result["reduce_ms"] = timer.measure(lambda: reduce_visual_tokens(tokens, settings)).ms
    return result


def time_bias(model, config: Config, timer: Timer) -> Optional[float]:
    """The two prefill masks RESTORE builds (first layer: uniform sizes; later layers: real sizes), in ms.
    An in-LLM method builds its masks at each cut, inside the prefill it is timed with."""
    if not config.restore or tr.acts_in(config.base) == "llm":
        return None
    layout = model._restore_ctx.layout
    llm_config = model.config
    dtype = next(model.parameters()).dtype
    head_dim = llm_config.hidden_size // llm_config.num_attention_heads

    def build():
        return calibrated_prefill_masks(layout.positions, layout.sizes, layout.is_visual, layout.valid,
                                        config_patches(model), config.n_vis, dtype, head_dim,
                                        getattr(llm_config, "rope_theta", 10000.0))

    return timer.measure(build).ms


def config_patches(model) -> int:
    return int(model.get_vision_tower().num_patches)


def _greedy(logits: torch.Tensor, eos_id: Optional[int]) -> torch.Tensor:
    logits = logits[:, -1].float()
    if eos_id is not None:  # as generate with min_new_tokens: never stop early
        logits[:, eos_id] = float("-inf")
    return logits.argmax(dim=-1, keepdim=True)


def time_llm(model, prompt: Prompt, timer: Timer, new_tokens: int) -> Dict[str, object]:
    """LLM prefill from the assembled embeddings, per-token decode over its KV cache, and generate."""
    eos_id = model.config.eos_token_id
    _, _, attention_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(
        prompt.input_ids, None, None, None, None, prompt.images, prompt.image_sizes)
    ctx = getattr(model, "_restore_ctx", None)

    def rearm():  # the patched LLM consumes the prompt's layout once per prefill; replay the same prompt
        if ctx is not None:
            ctx.layout.fresh = True

    prefill = timer.measure(lambda: model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True),
                            setup=rearm)
    rearm()
    first = model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True)

    decode_samples: List[float] = []
    loop_tokens: List[int] = []
    for repeat in range(timer.warmup + timer.repeats):
        past, token, produced = first.past_key_values, _greedy(first.logits, eos_id), []
        for _ in range(new_tokens - 1):
            produced.append(int(token))
            seconds, out = timer.once(lambda: model(input_ids=token, past_key_values=past, use_cache=True))
            if repeat >= timer.warmup:
                decode_samples.append(seconds)
            past, token = out.past_key_values, _greedy(out.logits, eos_id)
        loop_tokens = produced + [int(token)]

    def generate():
        return model.generate(prompt.input_ids, images=prompt.images, image_sizes=prompt.image_sizes,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                              use_cache=True, pad_token_id=model.config.pad_token_id or 0)

    end_to_end = timer.measure(generate)
    generated = end_to_end.last[0].tolist()[-new_tokens:]  # LLaVA's generate may put a BOS id first
    return {
        "seq_len": int(embeds.shape[1]),
        "prefill_ms": prefill.ms,
        "decode_ms_per_token": Timing(decode_samples).ms if decode_samples else None,
        "end_to_end_ms": end_to_end.ms,
        # The explicit decode loop must follow generate's path, or its times would not be generate's.
        "decode_matches_generate": generated == loop_tokens,
    }


def measure_peak_memory(model, prompt: Prompt, device: torch.device, new_tokens: int) -> Optional[int]:
    with PeakMemory(device) as meter:
        model.generate(prompt.input_ids, images=prompt.images, image_sizes=prompt.image_sizes,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                       use_cache=True, pad_token_id=model.config.pad_token_id or 0)
    return meter.bytes


def layer_tokens(model, num_layers: int) -> Optional[List[int]]:
    """Tokens each decoder layer saw in the last prefill of an in-LLM method (longest sample); None otherwise."""
    run = getattr(getattr(model, "_restore_ctx", None), "run", None)
    if run is None:
        return None
    lengths = [int(layout.valid.sum(dim=1).max()) for layout in run.layouts]
    return [lengths[run.layout_index(i)] for i in range(num_layers)]


def layer_tokens_at_depth(config: Config, seq_len: int, num_patches: int, num_layers: int) -> Optional[List[int]]:
    """Tokens per layer of a one-image prompt of ``seq_len`` tokens for an in-LLM method at another depth
    (its schedule for that many layers)."""
    if config.base is None or tr.acts_in(config.base) != "llm":
        return None
    stages = tr.llm_method(config.base).stages(config.n_vis, num_patches, num_layers)
    text = seq_len - num_patches
    return [text + next((s.budget for s in reversed(stages) if s.layer <= i), num_patches) for i in range(num_layers)]


def flop_counts(seq_len: int, shape: LLMShape, tokens_per_layer: Optional[Sequence[int]] = None) -> Dict[str, int]:
    """Prefill FLOPs of the LLM: FastV's formula, the exact matmul count, and the LM head on all positions.
    ``tokens_per_layer``: what each layer saw, when a method cuts inside the LLM."""
    if tokens_per_layer is not None:
        last = tokens_per_layer[-1]
        return {**layered_prefill_flops(tokens_per_layer, shape),
                "lm_head_all_positions": exact_prefill_flops(last, shape.with_layers(0), lm_head_tokens=last)}
    return {
        "fastv": fastv_prefill_flops(seq_len, shape.hidden_size, shape.intermediate_size, shape.num_layers),
        "exact": exact_prefill_flops(seq_len, shape),
        "lm_head_all_positions": exact_prefill_flops(seq_len, shape.with_layers(0), lm_head_tokens=seq_len),
    }


def is_7b_shaped(shape: LLMShape) -> bool:
    return shape.with_layers(LLAVA_7B.num_layers) == LLAVA_7B


# --------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------

def selector_speedups(tokens: tr.VisualTokens, bases: Sequence[str], budgets: Sequence[int], timer: Timer) -> List[dict]:
    """Each selector against its loop-based restatement in tokenreduction/reference.py, same inputs."""
    rows = []
    for base in bases:
        name = tr.canonical_name(base)
        selector, reference = tr.get_selector(name), REFERENCES.get(name)
        if reference is None:
            continue
        for budget in sorted(set(budgets)):
            fast = timer.measure(lambda: selector(tokens, budget)).ms
            slow = timer.measure(lambda: reference(tokens, budget)).ms
            rows.append({"base": name, "n_keep": budget, "selector_ms": fast, "reference_ms": slow,
                         "speedup": slow / fast,
                         "same_picks": bool(torch.equal(selector(tokens, budget), reference(tokens, budget)))})
    return rows


def overhead_targets(rows: List[dict], shape: LLMShape, n_vis: int) -> List[dict]:
    """(selection + merging + bias) / reduced LLM prefill, RESTORE on, at ``n_vis``; extrapolated to 32 layers."""
    results = []
    for row in rows:
        if not row["restore"] or row["n_vis"] != n_vis or row["selection_ms"] is None:
            continue  # the overhead target is about RESTORE's own stages after a selector
        pieces = row["selection_ms"] + row["merging_ms"] + row["bias_ms"]
        whole_call = row["reduce_ms"] + row["bias_ms"]
        result = {"base": row["base"], "n_vis": n_vis, "overhead_ms": pieces, "reduce_call_plus_bias_ms": whole_call,
                  "prefill_ms": row["prefill_ms"], "ratio": pieces / row["prefill_ms"],
                  "ratio_reduce_call": whole_call / row["prefill_ms"], "layers": shape.num_layers}
        if is_7b_shaped(shape) and shape.num_layers != LLAVA_7B.num_layers:
            # Prefill is compute-bound: scale its time by the FLOPs of 32 layers over those measured
            # (LM head on every position included in both), the overhead does not depend on depth.
            n = row["seq_len"]
            measured = exact_prefill_flops(n, shape, lm_head_tokens=n)
            full_depth = exact_prefill_flops(n, LLAVA_7B, lm_head_tokens=n)
            prefill_32 = row["prefill_ms"] * full_depth / measured
            result["prefill_ms_32_layers_extrapolated"] = prefill_32
            result["ratio_32_layers_extrapolated"] = pieces / prefill_32
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "nan"
    return f"{value:.{digits}f}"


def format_table(rows: List[dict]) -> str:
    header = ["method", "n_vis", "seq", "vision ms", "select ms", "merge ms", "bias ms", "prefill ms",
              "decode ms/tok", "e2e ms", "peak MiB", "KV MiB", "FastV GFLOP", "exact GFLOP"]
    lines = [header]
    for r in rows:
        seq = str(r["seq_len"]) if not r.get("tokens_per_layer") else f"{r['seq_len']}>{r['tokens_per_layer'][-1]}"
        lines.append([
            r["method"], str(r["n_vis"]), seq, _fmt(r["vision_ms"]), _fmt(r["selection_ms"], 2),
            _fmt(r["merging_ms"], 2), _fmt(r["bias_ms"], 2), _fmt(r["prefill_ms"]), _fmt(r["decode_ms_per_token"]),
            _fmt(r["end_to_end_ms"]), "n/a" if r["peak_memory_bytes"] is None else _fmt(r["peak_memory_bytes"] / 2**20),
            _fmt(r["kv_cache_bytes"] / 2**20, 2), _fmt(r["flops"]["fastv"] / 1e9), _fmt(r["flops"]["exact"] / 1e9),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def format_targets(overheads: List[dict], speedups: List[dict], on_7b_shape: bool, device: torch.device) -> List[str]:
    lines = []
    scope = "" if on_7b_shape else " [not the 7B shape: informative only]"
    for o in overheads:
        verdict = "PASS" if o["ratio"] < OVERHEAD_TARGET else "MISS"
        line = (f"{verdict} overhead {o['base']}+RESTORE n_vis={o['n_vis']}: selection+merging+bias "
                f"{o['overhead_ms']:.2f} ms = {100 * o['ratio']:.2f}% of the reduced prefill {o['prefill_ms']:.1f} ms "
                f"({o['layers']} LLM layers; target < {100 * OVERHEAD_TARGET:.0f}%; reduce_visual_tokens as one call "
                f"+ bias: {100 * o['ratio_reduce_call']:.2f}%){scope}")
        if "ratio_32_layers_extrapolated" in o:
            verdict32 = "PASS" if o["ratio_32_layers_extrapolated"] < OVERHEAD_TARGET else "MISS"
            line += (f"\n     {verdict32} extrapolated to 32 layers by FLOPs: prefill ~{o['prefill_ms_32_layers_extrapolated']:.0f} ms, "
                     f"overhead {100 * o['ratio_32_layers_extrapolated']:.2f}%")
        lines.append(line)
    note = "" if device.type == "cpu" else " [target is for the CPU]"
    for base in dict.fromkeys(s["base"] for s in speedups):
        mine = [s for s in speedups if s["base"] == base]
        worst = min(mine, key=lambda s: s["speedup"])
        verdict = "PASS" if worst["speedup"] >= SPEEDUP_TARGET else "MISS"
        detail = ", ".join(f"k={s['n_keep']}: {s['reference_ms']:.1f}/{s['selector_ms']:.2f} ms = {s['speedup']:.1f}x"
                           + ("" if s["same_picks"] else " (picks differ)") for s in mine)
        lines.append(f"{verdict} selector {base} vs tokenreduction/reference.py (target >= {SPEEDUP_TARGET:.0f}x, "
                     f"worst {worst['speedup']:.1f}x): {detail}{note}")
    return lines


def plot(rows: List[dict], path: Path, title: str, full_depth_flops: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    full = next((r for r in rows if r["base"] is None), None)
    reduced = [r for r in rows if r["base"] is not None]
    methods = list(dict.fromkeys((r["base"], r["restore"]) for r in reduced))
    colors = dict(zip(dict.fromkeys(b for b, _ in methods), plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, key, label in ((axes[0], "prefill_ms", "LLM prefill (ms)"), (axes[1], "end_to_end_ms", "end to end per sample (ms)")):
        for base, on in methods:
            pts = sorted((r["n_vis"], r[key]) for r in reduced if r["base"] == base and r["restore"] == on)
            ax.plot(*zip(*pts), marker="o", linestyle="-" if on else "--", color=colors[base],
                    label=f"{base}{'+RESTORE' if on else ''}")
        if full is not None:
            ax.axhline(full[key], color="black", linestyle=":", label=f"full ({full['n_vis']} tokens)")
            ax.plot([full["n_vis"]], [full[key]], marker="*", markersize=12, color="black")
        ax.set_xlabel("visual tokens fed to the LLM")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    flops_key = "flops_llava7b_32_layers" if full_depth_flops else "flops"
    # One line per method: methods cutting inside the LLM pay for their full-length early layers.
    for base in dict.fromkeys(b for b, _ in methods):
        pts = sorted({r["n_vis"]: r[flops_key]["exact"] for r in reduced if r["base"] == base}.items())
        axes[2].plot(*zip(*[(n, f / 1e12) for n, f in pts]), marker="o", color=colors[base], label=base)
    if full is not None:
        axes[2].plot([full["n_vis"]], [full[flops_key]["exact"] / 1e12], marker="*", markersize=12, color="black",
                     label="full")
    axes[2].set_xlabel("visual tokens fed to the LLM")
    axes[2].set_ylabel("LLM prefill TFLOPs, exact matmuls" + (" (LLaVA-1.5-7B, 32 layers)" if full_depth_flops else ""))
    axes[2].set_ylim(bottom=0)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

@torch.inference_mode()
def run_benchmark(bench: BenchModel, prompt: Prompt, configs: List[Config], timer: Timer, new_tokens: int,
                  log: Callable[[str], None] = print) -> dict:
    """Measure every config; returns the JSON-ready results (rows, targets, metadata)."""
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (one token comes from the prefill), got {new_tokens}")
    model, device = bench.model, bench.device
    shape = bench.shape
    num_patches = config_patches(model)
    restore.remove(model)
    vision = time_vision(bench, prompt, timer)
    tokens = visual_tokens(bench, prompt.images)
    log(f"vision encoder + projector: stock {vision['stock']:.1f} ms, reduced path {vision['reduced']:.1f} ms")

    rows: List[dict] = []
    try:
        for config in configs:
            started = time.perf_counter()
            apply_config(model, config)
            row = {"method": config.label, "base": config.base, "n_vis": config.n_vis, "restore": config.restore,
                   "vision_ms": vision["stock" if config.base is None else "reduced"],
                   "selection_ms": None, "merging_ms": None, "reduce_ms": None, "bias_ms": None}
            if config.base is not None:
                row.update(time_reduction(tokens, config, timer, bench, prompt))
                if tr.acts_in(config.base) == "vision_encoder":
                    row["vision_ms"] = time_vision_encoder_method(bench, prompt, config, timer)
            row.update(time_llm(model, prompt, timer, new_tokens))
            row["bias_ms"] = time_bias(model, config, timer) if config.base is not None else None
            per_layer = layer_tokens(model, shape.num_layers)
            row["tokens_per_layer"] = per_layer
            row["kv_cache_bytes"] = (kv_cache_bytes(row["seq_len"], shape, bench.dtype) if per_layer is None
                                     else layered_kv_cache_bytes(per_layer, shape, bench.dtype))
            row["flops"] = flop_counts(row["seq_len"], shape, per_layer)
            if is_7b_shaped(shape):
                row["flops_llava7b_32_layers"] = flop_counts(
                    row["seq_len"], LLAVA_7B,
                    layer_tokens_at_depth(config, row["seq_len"], num_patches, LLAVA_7B.num_layers))
            rows.append(row)
            if not row["decode_matches_generate"]:
                log(f"warning: {config.label} n_vis={config.n_vis}: the decode loop's tokens differ from generate's")
            log(f"  {config.label:>18} n_vis={config.n_vis:<4} seq={row['seq_len']:<4} prefill {row['prefill_ms']:8.1f} ms"
                f"  e2e {row['end_to_end_ms']:8.1f} ms  ({time.perf_counter() - started:.0f} s)")

        for config, row in zip(configs, rows):
            apply_config(model, config)
            row["peak_memory_bytes"] = measure_peak_memory(model, prompt, device, new_tokens)
    finally:
        restore.remove(model)

    budgets = [retained_budget(c.n_vis, c.restore) for c in configs if c.base is not None]
    bases = list(dict.fromkeys(c.base for c in configs if c.base is not None and tr.acts_in(c.base) == "before_llm"))
    speedups = selector_speedups(tokens, bases, budgets, timer)
    reduced_n = sorted({c.n_vis for c in configs if c.restore})
    target_n = 64 if 64 in reduced_n else (reduced_n[0] if reduced_n else None)
    overheads = overhead_targets(rows, shape, target_n) if target_n is not None else []
    return {
        "meta": {
            "model": bench.description, "device": str(device), "dtype": str(bench.dtype).replace("torch.", ""),
            "llm_shape": shape.__dict__, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "repeats": timer.repeats, "warmup": timer.warmup, "new_tokens": new_tokens,
            "prompt_tokens": int(prompt.input_ids.shape[1]), "num_patches": num_patches,
            "peak_memory_method": PeakMemory(device).method,
            "flops_note": "LLM prefill only (vision encoder excluded); exact = matmuls, 2 FLOPs per multiply-add, "
                          "full n x n attention; LM head listed apart (transformers 4.37 computes it on all positions)",
            "kv_cache_note": "K and V of every layer for the prompt after reduction (seq_len tokens), model dtype",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "rows": rows,
        "targets": {"overhead": overheads, "selector_speedup": speedups,
                    "overhead_target": OVERHEAD_TARGET, "speedup_target": SPEEDUP_TARGET},
    }


def warn_if_busy(device: torch.device) -> None:
    """CPU timings of small ops slow down many times when OpenMP threads compete with other processes."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        advice = " (--threads 1 is steadier on a shared machine)" if torch.get_num_threads() > 1 else ""
        print(f"warning: load average {load:.1f} on {cores} cores: other processes compete for the CPU and timings "
              f"will be noisy{advice}", file=sys.stderr)


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _name_list(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        try:
            tr.canonical_name(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m restore.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="python -m restore.bench throughput -h: the entry points' throughput by batch "
                                       "size and a sweep against separate runs")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model-path", help="a LLaVA-1.5 checkpoint (folder or hub name) instead of a random model")
    source.add_argument("--shape", choices=SHAPES, default="small",
                        help="random model: the small checkpoint, or LLaVA-1.5-7B's widths built in memory")
    p.add_argument("--layers", type=int, help="LLM layers of the random model (small: 4; 7b: 2 on the CPU, 32 on CUDA)")
    p.add_argument("--bases", type=_name_list, default=["HoloV", "DivPrune", "VisPruner"])
    p.add_argument("--n-vis", type=_int_list, default=[64, 128, 192])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on the CPU), float32, float16, bfloat16")
    p.add_argument("--attn-implementation", choices=["eager", "sdpa"], default=None,
                   help="LLM attention (default: transformers' choice, sdpa)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per sample (>= 2)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--image", help="image file (default: a synthetic image)")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["throughput"]:  # a subcommand word before the flags: the stage bench has no positionals
        from restore import throughput

        return throughput.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model_path is not None and args.layers is not None:
        print("error: --layers applies to random models (--shape), not to --model-path", file=sys.stderr)
        return 2
    try:
        if args.new_tokens < 2:
            raise ValueError(f"--new-tokens must be >= 2 (one token comes from the prefill), got {args.new_tokens}")
        started = time.perf_counter()
        bench = load_bench_model(args.model_path, args.shape, args.layers, args.device, args.dtype,
                                 args.attn_implementation)
        print(f"model: {bench.description} on {bench.device} in {bench.dtype} "
              f"(loaded in {time.perf_counter() - started:.0f} s, {torch.get_num_threads()} threads)")
        num_patches = config_patches(bench.model)
        bad = [n for n in args.n_vis if not 2 <= n <= num_patches]
        if bad:
            raise ValueError(f"--n-vis values must be in 2..{num_patches} (RESTORE needs >= 2), got {bad}")
        timer = Timer(bench.device, args.repeats, args.warmup)
        warn_if_busy(bench.device)
        prompt = Prompt(*prompt_inputs(bench, load_image(args.image), args.question))
        results = run_benchmark(bench, prompt, make_configs(args.bases, args.n_vis, num_patches), timer,
                                args.new_tokens)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    meta = results["meta"]
    title = (f"{meta['model']} | {meta['device']} {meta['dtype']} | {meta['threads']} threads | "
             f"median of {meta['repeats']} | {meta['new_tokens']} new tokens")
    print()
    print(title)
    print(format_table(results["rows"]))
    print(f"peak memory: {meta['peak_memory_method']}; FLOPs: {meta['flops_note']}")
    print()
    target_lines = format_targets(results["targets"]["overhead"], results["targets"]["selector_speedup"],
                                  is_7b_shaped(bench.shape), bench.device)
    print("\n".join(target_lines))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "bench.txt").write_text(title + "\n" + format_table(results["rows"]) + "\n\n" + "\n".join(target_lines) + "\n")
    plot(results["rows"], args.out / "bench.png", title, full_depth_flops=is_7b_shaped(bench.shape))
    print(f"\nwrote {args.out / 'bench.json'}, {args.out / 'bench.txt'}, {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
