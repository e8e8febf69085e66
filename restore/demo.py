"""End-to-end demo on the CPU: `python -m restore.demo` (or `make demo`).

Builds (or reuses) the small random LLaVA-1.5-shaped checkpoint, loads it, asks a question about a
synthetic image and answers it three ways: stock LLaVA (576 visual tokens), the base method alone and
the base method with RESTORE, printing the visual tokens before and after and the time of each stage.
With ``--checkpoint`` it runs a real LLaVA-1.5 checkpoint instead (e.g. liuhaotian/llava-v1.5-7b).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import restore
import tokenreduction as tr
from llava_patches.loading import load_model, make_inputs
from llava_patches.vision import encode_with_cls_attention
from restore.reduce import reduce_visual_tokens
from restore.small_checkpoint import (
    DEFAULT_CHECKPOINT_DIR,
    MANIFEST_NAME,
    checkpoint_is_current,
    checkpoint_size_bytes,
    ensure_small_checkpoint,
    synthetic_image,
)

DEFAULT_QUESTION = "Is there a red circle in the image? Answer the question using a single word or phrase."


@dataclass
class LoadedCheckpoint:
    path: str
    tokenizer: Any
    model: torch.nn.Module
    image_processor: Any
    is_small_random: bool
    build_seconds: float | None
    load_seconds: float


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    seconds: float


def prepare_checkpoint(checkpoint: str | None, seed: int) -> tuple[str, float | None]:
    """The checkpoint to run and how long building it took (None when reused or not ours to build)."""
    if checkpoint is not None:
        return checkpoint, None
    if checkpoint_is_current(DEFAULT_CHECKPOINT_DIR, seed):
        return str(DEFAULT_CHECKPOINT_DIR.resolve()), None
    print(f"building the small random checkpoint in {DEFAULT_CHECKPOINT_DIR} (seed {seed}) ...")
    started = time.perf_counter()
    path = ensure_small_checkpoint(DEFAULT_CHECKPOINT_DIR, seed)
    return str(path), time.perf_counter() - started


def load_checkpoint(path: str, device: str, dtype: str, build_seconds: float | None) -> LoadedCheckpoint:
    started = time.perf_counter()
    tokenizer, model, image_processor, _ = load_model(path, device=device, dtype=dtype)
    seconds = time.perf_counter() - started
    is_small = (Path(path) / MANIFEST_NAME).is_file()
    return LoadedCheckpoint(path, tokenizer, model, image_processor, is_small, build_seconds, seconds)


def load_image(image_path: str | None, image_seed: int) -> Image.Image:
    if image_path is None:
        return synthetic_image(image_seed)
    return Image.open(image_path).convert("RGB")


def generate_stock(loaded: LoadedCheckpoint, question: str, image: Image.Image, max_new_tokens: int,
                   conv_mode: str = "vicuna_v1") -> Generation:
    """Greedy decoding with unmodified LLaVA, as its evaluation scripts run it (temperature 0)."""
    model = loaded.model
    input_ids, images = make_inputs(loaded.tokenizer, loaded.image_processor, question, image, conv_mode,
                                    model_config=model.config, device=model.device, dtype=model.dtype)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(input_ids, images=images, image_sizes=[image.size], do_sample=False,
                                max_new_tokens=max_new_tokens, use_cache=True)
    seconds = time.perf_counter() - started
    token_ids = output[0].tolist()
    if token_ids and token_ids[0] == loaded.tokenizer.bos_token_id:  # generate() echoes the start token
        token_ids = token_ids[1:]
    text = loaded.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
    return Generation(token_ids, text, seconds)


@dataclass
class StageTimes:
    """Seconds per stage of one answer; reduction stages are 0 for stock LLaVA."""

    vision: float
    selection: float
    merging: float
    llm_prefill: float
    decode_per_token: float
    total: float
    visual_tokens: int


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - started


@torch.inference_mode()
def time_stages(loaded: LoadedCheckpoint, input_ids, images, max_new_tokens: int) -> tuple[StageTimes, list[int]]:
    """Time the vision encoder, selection and merging on their own, then a prefill and a greedy decode loop
    through the (possibly patched) model. LLM prefill = forward time minus the stages inside it."""
    model = loaded.model
    settings = restore.settings_of(model)
    tower = model.get_vision_tower()
    (raw, attention), vision = _timed(lambda: encode_with_cls_attention(tower, images))
    features, projector = _timed(lambda: model.get_model().mm_projector(raw))
    vision += projector
    selection = merging = 0.0
    if settings is not None:
        tokens = tr.VisualTokens(features=features, raw_features=raw, cls_attention=attention)
        if settings.n_keep:
            _, selection = _timed(lambda: tr.get_selector(settings.base)(tokens, settings.n_keep))
        _, reduction = _timed(lambda: reduce_visual_tokens(tokens, settings))
        merging = max(reduction - selection, 0.0)
    started = time.perf_counter()
    output, prefill = _timed(lambda: model(input_ids=input_ids, images=images, use_cache=True))
    token = output.logits[:, -1].argmax(dim=-1, keepdim=True)
    generated, past = [int(token)], output.past_key_values
    decode_started = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if generated[-1] == loaded.tokenizer.eos_token_id:
            break
        output = model(input_ids=token, past_key_values=past, use_cache=True)
        token, past = output.logits[:, -1].argmax(dim=-1, keepdim=True), output.past_key_values
        generated.append(int(token))
    decode = time.perf_counter() - decode_started
    visual = settings.n_vis if settings is not None else tower.num_patches
    times = StageTimes(vision, selection, merging, max(prefill - vision - selection - merging, 0.0),
                       decode / max(len(generated) - 1, 1), time.perf_counter() - started, visual)
    return times, generated


def compare_methods(loaded: LoadedCheckpoint, question: str, image: Image.Image, base: str, n_vis: int,
                    max_new_tokens: int, conv_mode: str = "vicuna_v1") -> None:
    """Answer with stock LLaVA, the base alone and the base with RESTORE; print a table of stages."""
    model = loaded.model
    input_ids, images = make_inputs(loaded.tokenizer, loaded.image_processor, question, image, conv_mode,
                                    model_config=model.config, device=model.device, dtype=model.dtype)
    rows = []
    for label, settings in (("stock LLaVA", None), (f"{base} only", False), (f"{base} + RESTORE", True)):
        if settings is None:
            restore.remove(model)
        else:
            restore.apply(model, base=base, n_vis=n_vis, restore=settings)
        time_stages(loaded, input_ids, images, 2)  # warm-up
        times, ids = time_stages(loaded, input_ids, images, max_new_tokens)
        rows.append((label, times, loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()))
    restore.remove(model)
    ms = lambda seconds: f"{1000 * seconds:8.1f}"  # noqa: E731
    print(f"\n{'method':22s} {'visual':>6s} {'vision':>8s} {'select':>8s} {'merge':>8s} {'prefill':>8s} "
          f"{'decode/t':>8s} {'total':>8s}   (milliseconds; tokens before -> after: {model.get_vision_tower().num_patches} -> {n_vis})")
    for label, t, _ in rows:
        print(f"{label:22s} {t.visual_tokens:6d} {ms(t.vision)} {ms(t.selection)} {ms(t.merging)} "
              f"{ms(t.llm_prefill)} {ms(t.decode_per_token)} {ms(t.total)}")
    for label, _, text in rows:
        print(f"[{label}] {text!r}")


def describe_checkpoint(loaded: LoadedCheckpoint) -> None:
    model = loaded.model
    print(f"checkpoint   {loaded.path}")
    if loaded.build_seconds is not None:
        print(f"built in     {loaded.build_seconds:.1f} s")
    if Path(loaded.path).is_dir():
        print(f"size         {checkpoint_size_bytes(loaded.path) / 2**20:.1f} MiB on disk")
    tower = model.get_vision_tower()
    print(f"loaded in    {loaded.load_seconds:.1f} s on {model.device} as {model.dtype}; "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{tower.num_patches} visual tokens per image")
    if loaded.is_small_random:
        print("NOTE: this checkpoint has RANDOM weights (built for tests and demos): the generated text is "
              "meaningless. It shows that the pipeline runs; pass --checkpoint liuhaotian/llava-v1.5-7b for a "
              "real model.")


def describe_generation(label: str, generation: Generation) -> None:
    count = len(generation.token_ids)
    rate = count / generation.seconds if generation.seconds > 0 else float("inf")
    print(f"[{label}] {count} tokens in {generation.seconds:.2f} s ({rate:.1f} tokens/s)")
    print(f"[{label}] ids  {generation.token_ids}")
    print(f"[{label}] text {generation.text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m restore.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None,
                        help=f"LLaVA-1.5 checkpoint (default: build/reuse the small random one in {DEFAULT_CHECKPOINT_DIR})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the small random checkpoint")
    parser.add_argument("--image", default=None, help="image file (default: a synthetic image)")
    parser.add_argument("--image-seed", type=int, default=0, help="seed of the synthetic image")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--conv-mode", default="vicuna_v1")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--base", default="HoloV", help=f"reduction method: {', '.join(tr.available_selectors())}")
    parser.add_argument("--n_vis", "--n-vis", dest="n_vis", type=int, default=64, help="visual tokens kept per image")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: 1 for the small checkpoint, torch's default otherwise)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The small model is too small to gain from threads, and threads fighting other processes for
    # the cores slow it down many times over.
    threads = args.threads if args.threads is not None else (1 if args.checkpoint is None else None)
    if threads is not None:
        torch.set_num_threads(threads)
    path, build_seconds = prepare_checkpoint(args.checkpoint, args.seed)
    loaded = load_checkpoint(path, args.device, args.dtype, build_seconds)
    describe_checkpoint(loaded)

    image = load_image(args.image, args.image_seed)
    print(f"image        {args.image or f'synthetic (seed {args.image_seed})'}, {image.size[0]}x{image.size[1]}")
    print(f"question     {args.question!r}")
    stock = generate_stock(loaded, args.question, image, args.max_new_tokens, args.conv_mode)
    describe_generation("stock LLaVA", stock)
    compare_methods(loaded, args.question, image, args.base, args.n_vis, args.max_new_tokens, args.conv_mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
