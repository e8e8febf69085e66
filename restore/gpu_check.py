"""``python -m restore.gpu_check``: does our unreduced path compute what stock LLaVA computes, on this GPU?

What a lent GPU runs first (a few minutes on one H200). For the small random checkpoint and a
LLaVA-1.5-7B-shaped random model (saved to a temporary folder so that both sides load it from disk):

1. stock: llava-torch's own ``load_pretrained_model`` as LLaVA's evaluation calls it, then ``generate``;
2. ours: ``llava_patches.load_model`` + ``restore.apply(base=None)``, the same ``generate``;
3. printed: whether the greedy tokens agree, the first step where they do not, and the largest
   absolute and relative logit differences over all steps.

Then, on our model with a reduction applied, the two decisions the official RESTORE model makes on
the device: the mask object SDPA receives (boolean causal mask without RESTORE, an additive one with
it), and how far the per-call cos/sin (official arithmetic) are from stock's stored table; and how many
greedy answers a batch of 8 changes against one at a time (--batch-size), without and with RESTORE, and
for the methods cutting inside the LLM (FastV, PDrop, SparseVLM).

Without CUDA the default run prints why it skips and exits 0. ``--device cpu`` runs the same
comparison on the CPU (fp32 by default; the stock side is then cast with ``.float()``, which keeps
its fp16-rounded RoPE table, so logits differ by ~1e-3 there while tokens should agree).
Exit status: 0 when every comparison is within tolerance, 1 otherwise.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

SKIP_MESSAGE = ("gpu_check: SKIPPED, no CUDA device is available. Run it on a machine with a GPU, or pass "
                "--device cpu to run the same comparison on the CPU.")
QUESTIONS = ("What is in the image?", "Is there a red circle?\nAnswer the question using a single word or phrase.")
SHAPE_CHOICES = ("small", "7b")
HALF_TOLERANCE = 0.0  # same dtype and kernels as stock: the logits must be bit for bit equal
CAST_TOLERANCE = 1e-2  # stock cast to another dtype keeps fp16-rounded RoPE tables


@dataclass
class Comparison:
    """Greedy generations of stock LLaVA and of ours on one prompt."""

    label: str
    tokens_equal: bool
    first_difference: Optional[int]  # generated-token index, None when equal
    max_abs: float
    max_rel: float

    def passed(self, tolerance: float) -> bool:
        return self.tokens_equal and self.max_rel <= tolerance

    def line(self, tolerance: float) -> str:
        verdict = "ok  " if self.passed(tolerance) else "FAIL"
        where = "" if self.first_difference is None else f", first differing token {self.first_difference}"
        return (f"{verdict} {self.label}: tokens {'equal' if self.tokens_equal else 'DIFFER'}{where}; "
                f"logits max |diff| {self.max_abs:.3g}, max relative {self.max_rel:.3g}")


def compare_generations(label: str, stock: Tuple[torch.Tensor, torch.Tensor],
                        ours: Tuple[torch.Tensor, torch.Tensor]) -> Comparison:
    """Compare (sequences [1, T], scores [1, T, V]) of two greedy generations."""
    stock_tokens, stock_scores = stock
    our_tokens, our_scores = ours
    steps = min(stock_tokens.shape[1], our_tokens.shape[1])
    differing = (stock_tokens[:, :steps] != our_tokens[:, :steps]).any(dim=0).nonzero().flatten().tolist()
    equal = not differing and stock_tokens.shape == our_tokens.shape
    first = differing[0] if differing else (None if equal else steps)
    common = min(stock_scores.shape[1], our_scores.shape[1])
    stock_scores, our_scores = stock_scores[:, :common].float(), our_scores[:, :common].float()
    finite = torch.isfinite(stock_scores) & torch.isfinite(our_scores)
    diff = (stock_scores - our_scores).abs().where(finite, torch.zeros_like(stock_scores))
    scale = stock_scores.abs().where(finite, torch.zeros_like(stock_scores)).max().clamp(min=1e-30)
    return Comparison(label, equal, first, float(diff.max()), float(diff.max() / scale))


def greedy(model, input_ids: torch.Tensor, images: torch.Tensor, image_size, new_tokens: int):
    """(sequences, scores [1, T, V]) of a greedy generation of exactly ``new_tokens`` tokens."""
    with torch.inference_mode():
        out = model.generate(input_ids, images=images, image_sizes=[image_size], do_sample=False, num_beams=1,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences.cpu(), torch.stack(out.scores, dim=1).cpu()


# --------------------------------------------------------------------------------------------------
# Checkpoints and the two loaders
# --------------------------------------------------------------------------------------------------

def save_7b_shaped(folder: Path, num_layers: int, device: torch.device) -> Path:
    """A LLaVA-1.5-7B-shaped random checkpoint (restore.analysis.models.build_7b_shaped) saved in fp16."""
    from restore.analysis.models import build_7b_shaped

    bench = build_7b_shaped(num_layers, device=device, dtype=torch.float16)
    path = folder / "llava-v1.5-7b-shaped-random"
    vision = path / "vision_tower"
    clip = bench.model.get_vision_tower().vision_tower
    clip.save_pretrained(str(vision))
    bench.image_processor.save_pretrained(str(vision))
    bench.model.config.mm_vision_tower = str(vision)
    bench.model.get_model().vision_tower = None  # the tower lives in its own folder, as in LLaVA's
    bench.model.save_pretrained(str(path))
    bench.tokenizer.save_pretrained(str(path))
    del bench, clip
    _free()
    return path


def load_stock(path: Path, device: torch.device, dtype: torch.dtype):
    """LLaVA's builder as its evaluation calls it; on the CPU cast afterwards if ``dtype`` is not fp16."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    builder_device = "cuda" if device.type == "cuda" else str(device)
    tokenizer, model, processor, _ = load_pretrained_model(str(path), None, get_model_name_from_path(str(path)),
                                                           device=builder_device)
    if dtype != torch.float16:
        model.to(dtype=dtype)
    return tokenizer, model.eval(), processor


def load_ours(path: Path, device: torch.device, dtype: torch.dtype):
    import restore
    from llava_patches.loading import load_model

    tokenizer, model, processor, _ = load_model(path, device=device, dtype=dtype)
    return tokenizer, restore.apply(model, base=None), processor


def prompts(tokenizer, processor, model, device: torch.device, dtype: torch.dtype):
    from llava_patches.loading import make_inputs
    from restore.small_checkpoint import synthetic_image

    for index, question in enumerate(QUESTIONS):
        image = synthetic_image(index, (400 + 60 * index, 300))
        ids, images = make_inputs(tokenizer, processor, question, image, model_config=model.config,
                                  device=device, dtype=dtype)
        yield f"prompt {index}", ids, images, image.size


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare_unreduced(name: str, path: Path, device: torch.device, dtype: torch.dtype,
                      new_tokens: int) -> Tuple[List[Comparison], object]:
    """Stock vs ours on ``path``; returns the comparisons and our loaded model (for the reduced checks)."""
    tokenizer, stock, processor = load_stock(path, device, dtype)
    stock_runs = [(label, greedy(stock, ids, images, size, new_tokens))
                  for label, ids, images, size in prompts(tokenizer, processor, stock, device, dtype)]
    del stock
    _free()
    tokenizer, ours, processor = load_ours(path, device, dtype)
    results = []
    for (label, ids, images, size), (_, stock_run) in zip(prompts(tokenizer, processor, ours, device, dtype),
                                                          stock_runs):
        results.append(compare_generations(f"{name} unreduced, {label}", stock_run,
                                           greedy(ours, ids, images, size, new_tokens)))
    return results, (tokenizer, ours, processor)


# --------------------------------------------------------------------------------------------------
# Reduced path: the device-side decisions of the official model
# --------------------------------------------------------------------------------------------------

@contextmanager
def recorded_sdpa_masks() -> Iterator[list]:
    """Every (attn_mask dtype or None, is_causal) SDPA receives while active."""
    calls: list = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        calls.append((None if attn_mask is None else attn_mask.dtype, bool(is_causal)))
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def check_reduced(name: str, loaded, device: torch.device, dtype: torch.dtype) -> List[Tuple[bool, str]]:
    """(passed, line) for the SDPA mask of base-only and RESTORE runs, and the RoPE table difference."""
    import restore
    from llava_patches.patch import official_rope_tables

    tokenizer, model, processor = loaded
    label, ids, images, size = next(prompts(tokenizer, processor, model, device, dtype))
    lines = []
    sdpa = model.config._attn_implementation == "sdpa"
    for use_restore in (False, True):
        restore.apply(model, base="HoloV", n_vis=64, restore=use_restore)
        with recorded_sdpa_masks() as calls:
            greedy(model, ids, images, size, 2)
        # RESTORE: the additive calibrated bias in the model dtype; base only: the boolean causal mask.
        expected = model.dtype if use_restore else torch.bool
        kinds = sorted({str(kind) for kind, _ in calls})
        ok = (not sdpa) or all(kind == expected and not causal for kind, causal in calls)
        lines.append((ok, f"{'ok  ' if ok else 'FAIL'} {name} HoloV-64 restore={use_restore}: SDPA masks {kinds}, "
                          f"is_causal {sorted({c for _, c in calls})} (official: {expected}, never is_causal)"))
    rope = model.get_model().layers[0].self_attn.rotary_emb
    length = rope.cos_cached.shape[0]
    cos, _ = official_rope_tables(rope.inv_freq, length, rope.cos_cached)
    differing = int((cos != rope.cos_cached).sum())
    lines.append((True, f"info {name}: official per-call cos vs stock table ({rope.cos_cached.dtype}, on the "
                        f"CPU at init): {differing} of {cos.numel()} entries differ"))
    restore.remove(model)
    return lines


# --------------------------------------------------------------------------------------------------
# Batched generation: how many answers a batch changes on this device
# --------------------------------------------------------------------------------------------------

BATCH_QUESTIONS = ("What is in the image?", "Is there a red circle?", "What color is the largest shape?",
                   "How many shapes are there? Answer the question using a single word or phrase.",
                   "Describe the image in one sentence.", "Is the background white?",
                   "Which shape is on the left?", "What is written in the image?")


def batch_agreement(name: str, loaded, device: torch.device, dtype: torch.dtype, new_tokens: int,
                    batch_size: int = 8) -> List[Tuple[bool, str]]:
    """(passed, line) per configuration: greedy answers of ``batch_size`` questions generated together
    (left padding, as the entry points batch) against each generated alone. In fp32 every answer must be
    equal; in fp16/bf16 the count of changed answers is what --batch-size costs in rounding (information)."""
    import restore
    from llava_patches.family import FAMILY
    from restore.eval.runner import _eos_ids, _padded_on_the_left, pad_left, until_eos
    from restore.small_checkpoint import synthetic_image

    tokenizer, model, processor = loaded
    questions = [BATCH_QUESTIONS[i % len(BATCH_QUESTIONS)] for i in range(batch_size)]
    images = [synthetic_image(100 + i, (320 + 40 * (i % 4), 240 + 30 * (i % 3))) for i in range(batch_size)]
    ids = [FAMILY.prompt_ids(tokenizer, q, True, "vicuna_v1", model.config) for q in questions]
    pixels = torch.stack([FAMILY.preprocess_image(im, processor, model.config) for im in images]).to(device, dtype)
    sizes = [im.size for im in images]
    eos = _eos_ids(model)
    common = dict(do_sample=False, num_beams=1, max_new_tokens=new_tokens, use_cache=True)
    lines = []
    configs = {"no reduction": dict(base=None), "HoloV-64 restore": dict(base="HoloV", n_vis=64, restore=True),
               # methods cutting inside the LLM: per-sample cuts, re-padding and per-layer caches on the device
               "FastV-64 restore": dict(base="FastV", n_vis=64, restore=True), "PDrop-64": dict(base="PDrop", n_vis=64),
               "SparseVLM-64 restore": dict(base="SparseVLM", n_vis=64, restore=True)}
    for label, config in configs.items():
        restore.apply(model, **config)
        with torch.inference_mode():
            alone = [until_eos(model.generate(row[None].to(device), images=pixels[i:i + 1], image_sizes=[sizes[i]],
                                              **common)[0], eos).tolist() for i, row in enumerate(ids)]
            batch_ids, mask = pad_left(ids, tokenizer.pad_token_id or 0)
            with _padded_on_the_left(model, True):
                out = model.generate(batch_ids.to(device), images=pixels, image_sizes=sizes,
                                     **({} if mask is None else {"attention_mask": mask.to(device)}), **common)
        together = [until_eos(row, eos).tolist() for row in out]
        changed = sum(a != b for a, b in zip(alone, together))
        exact = dtype == torch.float32
        ok = changed == 0 or not exact
        lines.append((ok, f"{('ok  ' if ok else 'FAIL') if exact else 'info'} {name} {label}: batch of {batch_size} "
                          f"vs one at a time: {changed} of {batch_size} answers differ"
                          + ("" if exact else " (fp16/bf16 rounding; fp32 must give 0)")))
    restore.remove(model)
    return lines


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m restore.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default; skips without CUDA) or cpu")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on the CPU), float16, float32, bfloat16")
    p.add_argument("--shapes", default="small,7b", help=f"comma-separated, from {SHAPE_CHOICES}")
    p.add_argument("--layers", type=int, default=8, help="LLM layers of the 7B-shaped model (32 = full depth)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--small-checkpoint", default=None, help="small checkpoint folder (default: built once)")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"max relative logit difference (default {HALF_TOLERANCE} in fp16, {CAST_TOLERANCE} otherwise)")
    args = p.parse_args(argv)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPE_CHOICES]
    if unknown or not shapes:
        p.error(f"--shapes: unknown {unknown}; choose from {SHAPE_CHOICES}")
    if args.device.split(":")[0] not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.new_tokens < 1 or args.layers < 1:
        p.error("--new-tokens and --layers must be >= 1")
    args.shapes = shapes
    return args


def _small_checkpoint(path: Optional[str]) -> Path:
    from restore.analysis.models import small_checkpoint_path
    from restore.small_checkpoint import ensure_small_checkpoint

    return Path(path) if path is not None else ensure_small_checkpoint(small_checkpoint_path(4))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    from llava_patches.loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tolerance = args.tolerance if args.tolerance is not None else (
        HALF_TOLERANCE if dtype == torch.float16 else CAST_TOLERANCE)
    print(f"gpu_check on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} in {dtype}, "
          f"tolerance {tolerance}, torch {torch.__version__}", flush=True)
    verdicts: List[bool] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        for shape in args.shapes:
            if shape == "small":
                name, path = "small", _small_checkpoint(args.small_checkpoint)
            else:
                name, path = f"7b-shaped ({args.layers} layers)", save_7b_shaped(Path(folder), args.layers, device)
            results, loaded = compare_unreduced(name, path, device, dtype, args.new_tokens)
            for result in results:
                verdicts.append(result.passed(tolerance))
                print(result.line(tolerance), flush=True)
            for ok, line in check_reduced(name, loaded, device, dtype) + batch_agreement(
                    name, loaded, device, dtype, args.new_tokens):
                verdicts.append(ok)
                print(line, flush=True)
            del loaded
            _free()
    passed = all(verdicts)
    print(f"gpu_check: {'PASSED' if passed else 'FAILED'} ({sum(verdicts)} of {len(verdicts)} checks)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
