"""Deterministic small LLaVA-NeXT-shaped (llava-v1.6) checkpoints with random weights, for CPU tests.

Same tiny widths and the same recipe as ``restore.small_checkpoint`` (LLaVA-1.5 shaped), with the
settings that make stock llava-torch run its LLaVA-NeXT path: ``image_aspect_ratio="anyres"``,
``mm_patch_merge_type="spatial_unpad"``, llava-v1.6's ``image_grid_pinpoints`` and a learned
``image_newline`` vector. An image then becomes a 336 px base view plus a grid of 336 px crops (576
patches each), the grid is unpadded and every row of it is closed by the newline token; the count
per image is :func:`next_visual_token_count` (docs/llava_next.md derives it).

    path = build_small_next_checkpoint("playground/checkpoints/llava-v1.6-small-random", seed=0)
    python -m restore.small_next_checkpoint --out playground/checkpoints/llava-v1.6-small-random --seed 0

Every tensor the 1.5 small checkpoint also has is drawn from the same (seed, tensor name) generator,
so for one seed the CLIP, projector and LLM are those of the 1.5 small checkpoint; only the newline
vector is new. Same seed -> byte-identical weight files; the global RNG is never touched.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from restore.small_checkpoint import (
    SmallShapes,
    _llava_config,
    build_atomically,
    checkpoint_size_bytes,
    manifest_is_current,
    write_checkpoint,
)

DEFAULT_NEXT_CHECKPOINT_DIR = Path("playground/checkpoints/llava-v1.6-small-random")
# Its own manifest name: restore.small_checkpoint.checkpoint_is_current must never take this folder
# for a current LLaVA-1.5 small checkpoint (and rebuild it as one) or the other way round.
NEXT_MANIFEST_NAME = "small_next_checkpoint.json"
# Bump when the recipe changes, so that cached checkpoints from an older recipe get rebuilt.
NEXT_RECIPE_VERSION = 1

# llava-v1.6's candidate grids, as [width, height] in pixels (LLaVA's select_best_resolution reads
# them in that order): 1x2, 2x1, 2x2, 3x1 and 1x3 crops of 336 px.
NEXT_GRID_PINPOINTS: list[list[int]] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# llava-v1.6 configs say 4096 (LLaVA-1.5: 2048). It matters: prepare_inputs_labels_for_multimodal
# cuts every sequence to tokenizer_model_max_length, and a NeXT image alone can take 2928 tokens.
NEXT_MAX_LENGTH = 4096


# --------------------------------------------------------------------------------------------------
# The visual-token count of stock llava-torch's anyres / spatial_unpad path
# --------------------------------------------------------------------------------------------------

def best_grid_resolution(image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (width, height) in pixels of the candidate grid LLaVA picks for an image of (width, height).

    The rule (llava.mm_utils.select_best_resolution): fit the image into each candidate keeping its
    aspect ratio; prefer the candidate that keeps the most of the image's own pixels (a candidate
    larger than the image gains nothing from upscaling), then the one with the least empty area;
    on a full tie the earlier candidate wins. Written independently so that tests check LLaVA.
    """
    width, height = image_size
    best: tuple[int, int] | None = None
    best_kept, best_waste = -1, math.inf
    for cand_w, cand_h in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (int(cand_w), int(cand_h)), kept, waste
    assert best is not None, "no grid pinpoints"
    return best


def unpadded_grid_shape(image_size: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """(rows, cols) of the patch grid that survive llava's unpad_image for a (width, height) image.

    ``rows`` x ``cols`` is the full patch grid of the crops (24 patches per 336 px crop side). The
    image was letterboxed into the grid keeping its aspect ratio; unpadding drops, on the padded axis,
    the same number of patch rows (or columns) from both ends, computed on the patch grid with the
    image's own size: floor of the image's extent in patches, padding = half the rest, rounded down.
    """
    width, height = image_size
    if width / height > cols / rows:  # wider than the grid: padding above and below
        content = int(height * (cols / width))
        pad = (rows - content) // 2
        return rows - 2 * pad, cols
    content = int(width * (rows / height))
    pad = (cols - content) // 2
    return rows, cols - 2 * pad


def next_visual_token_count(
    image_size: tuple[int, int],
    pinpoints: Sequence[Sequence[int]] = NEXT_GRID_PINPOINTS,
    crop_size: int = 336,
    patch_size: int = 14,
    *,
    unpad: bool = True,
    newline: bool = True,
) -> int:
    """Visual tokens stock llava-torch feeds the LLM for one image of (width, height) pixels.

    base view (P*P) + grid (after unpadding when ``unpad``) + one newline token per grid row when
    ``newline``; P = crop_size // patch_size = 24. ``unpad=False, newline=False`` gives the count the
    papers quote, (1 + crops) * 576, which is 2880 for the 2x2 grid.
    """
    per_side = crop_size // patch_size
    grid_w, grid_h = best_grid_resolution(image_size, pinpoints)
    rows, cols = (grid_h // crop_size) * per_side, (grid_w // crop_size) * per_side
    if unpad:
        rows, cols = unpadded_grid_shape(image_size, rows, cols)
    return per_side * per_side + rows * (cols + (1 if newline else 0))


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------

def _next_config(shapes: SmallShapes, vocab_size: int, vision_tower: str):
    """The 1.5 small config with llava-v1.6's multimodal settings on top."""
    config = _llava_config(shapes, vocab_size, vision_tower)
    config.image_aspect_ratio = "anyres"
    config.mm_patch_merge_type = "spatial_unpad"  # 'unpad' in it: LlavaMetaModel creates image_newline
    config.image_grid_pinpoints = [list(p) for p in NEXT_GRID_PINPOINTS]
    config.tokenizer_model_max_length = NEXT_MAX_LENGTH
    # The released llava-v1.6 checkpoints trained the CLIP tower and store it inside their own shards
    # (with unfreeze_mm_vision_tower set). Here the tower stays a separate folder, as in the 1.5 small
    # checkpoint: the builder then loads it from mm_vision_tower without any network access.
    config.unfreeze_mm_vision_tower = False
    return config


def build_small_next_checkpoint(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    num_layers: int = 4,
    vision_layers: int = 3,
    overwrite: bool = False,
) -> Path:
    """Build a small LLaVA-NeXT-shaped checkpoint with random weights into ``out_dir``; returns its path.

    The folder name must contain "llava" (LLaVA's builder loads a LLaVA model only then) and "v1.6"
    (scripts that infer the family or prompt from the name, LLaVA's and its peers', then see NeXT).
    The config stores the vision tower as an absolute path, so a moved checkpoint must be rebuilt.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    name = out_dir.name.lower()
    if "llava" not in name or "v1.6" not in name:
        raise ValueError(
            f"checkpoint folder name {out_dir.name!r} must contain 'llava' and 'v1.6': LLaVA's "
            f"load_pretrained_model loads a LLaVA model only when the name says 'llava', and tools pick "
            f"the NeXT family from 'v1.6' (e.g. use 'llava-v1.6-small-random')."
        )
    manifest = {"recipe_version": NEXT_RECIPE_VERSION, "family": "llava-v1.6", "seed": seed,
                "shapes": asdict(SmallShapes(num_layers=num_layers, vision_layers=vision_layers))}
    return build_atomically(out_dir, num_layers, vision_layers, overwrite,
                            lambda staging, shapes: write_checkpoint(
                                staging, out_dir, seed, shapes, make_config=_next_config, max_length=NEXT_MAX_LENGTH,
                                manifest=manifest, manifest_name=NEXT_MANIFEST_NAME,
                                check_llm_state=_require_image_newline))


def _require_image_newline(state) -> None:
    if "model.image_newline" not in state:  # the whole point of the NeXT checkpoint; fail loudly
        raise RuntimeError("LlavaLlamaForCausalLM did not create model.image_newline; llava-torch changed")


def next_checkpoint_is_current(path: str | os.PathLike, seed: int = 0, *, num_layers: int = 4,
                               vision_layers: int = 3) -> bool:
    """True when ``path`` holds a complete small NeXT checkpoint of this recipe, seed and size, usable where it is."""
    expected = {"recipe_version": NEXT_RECIPE_VERSION, "family": "llava-v1.6", "seed": seed,
                "shapes": asdict(SmallShapes(num_layers=num_layers, vision_layers=vision_layers))}
    return manifest_is_current(path, NEXT_MANIFEST_NAME, expected)


def ensure_small_next_checkpoint(path: str | os.PathLike = DEFAULT_NEXT_CHECKPOINT_DIR, seed: int = 0, *,
                                 num_layers: int = 4, vision_layers: int = 3) -> Path:
    """Reuse the NeXT checkpoint at ``path`` if it is current, otherwise (re)build it."""
    if next_checkpoint_is_current(path, seed, num_layers=num_layers, vision_layers=vision_layers):
        return Path(path).expanduser().resolve()
    return build_small_next_checkpoint(path, seed, num_layers=num_layers, vision_layers=vision_layers, overwrite=True)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # a prefix of a flag is not that flag
        prog="python -m restore.small_next_checkpoint",
        description="Build a small LLaVA-NeXT-shaped (llava-v1.6) checkpoint with deterministic random weights.",
    )
    parser.add_argument("--out", default=str(DEFAULT_NEXT_CHECKPOINT_DIR),
                        help="output folder (name must contain 'llava' and 'v1.6')")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, default=4, help="LLM decoder layers")
    parser.add_argument("--vision-layers", type=int, default=3,
                        help="CLIP layers (the select layer is the 2nd to last)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:
        path = build_small_next_checkpoint(args.out, args.seed, num_layers=args.num_layers,
                                           vision_layers=args.vision_layers, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    size_mib = checkpoint_size_bytes(path) / 2**20
    print(f"built {path} (seed {args.seed}) in {seconds:.1f} s, {size_mib:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
