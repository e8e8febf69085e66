"""Which image patches each reduced visual token stands for, drawn over the image the model sees.

The picture is LLaVA-1.5's input (padded to a square with the mean colour, resized to 336 px,
a 24 x 24 grid of 14 px patches). Kept tokens are outlined; with RESTORE every merged group is
a coloured region (a source map, as ToMe draws one); patches the base method drops are greyed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch

import tokenreduction as tr
from llava_patches.patch import reduce_images
from restore.settings import resolve_settings

from .models import BenchModel, visual_tokens


@dataclass
class TokenMap:
    image: np.ndarray  # [H, W, 3] uint8, the pixels the vision tower sees
    source: np.ndarray  # [N] reduced token each patch went into, -1 if dropped
    kept: np.ndarray  # [n_keep] patch indices the base selector kept
    grid: int  # patches per side
    n_vis: int
    label: str

    @property
    def patch_size(self) -> int:
        return self.image.shape[0] // self.grid

    def group_sizes(self) -> np.ndarray:
        """[n_vis] number of patches in each reduced token."""
        return np.bincount(self.source[self.source >= 0], minlength=self.n_vis)


def model_view(images: torch.Tensor, image_processor) -> np.ndarray:
    """Undo the CLIP normalisation of one preprocessed image [1, 3, H, W] -> [H, W, 3] uint8."""
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    pixels = images[0].float().cpu() * std + mean
    return (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@torch.inference_mode()
def build_token_map(bench: BenchModel, images: torch.Tensor, base: str, n_vis: int, restore: bool) -> TokenMap:
    """Reduce one image's visual tokens as the patched model would and record where every patch went."""
    if images.shape[0] != 1:
        raise ValueError("token maps are drawn one image at a time")
    name = tr.canonical_name(base)
    if tr.acts_in(name) == "llm":
        raise ValueError(f"{name} cuts tokens inside the LLM, stage by stage: use build_stage_token_maps")
    tokens = visual_tokens(bench, images)
    n_patches = tokens.num_tokens
    grid = int(round(n_patches ** 0.5))
    if grid * grid != n_patches:
        raise ValueError(f"{n_patches} visual tokens do not form a square grid")
    if not (2 if restore else 1) <= n_vis <= n_patches:
        raise ValueError(f"n_vis must be in {2 if restore else 1}..{n_patches}, got {n_vis}")
    settings = resolve_settings(name, n_vis, restore, n_patches)
    reduced = reduce_images(bench.model, images, settings)
    if settings.merges_itself or (settings.is_plain_base and tr.plain_reduction(name) is not None) \
            or settings.n_keep == 0:
        # no selector picks: the kept patches are those that stand alone in a reduced token
        source = reduced.source[0]
        alone = (source >= 0) & (reduced.sizes[0].gather(0, source.clamp(min=0)) == 1)
        kept = alone.nonzero().flatten()
    else:
        kept = tr.get_selector(name)(tokens, settings.n_keep)[0]
    return TokenMap(
        image=model_view(images, bench.image_processor),
        source=reduced.source[0].cpu().numpy(),
        kept=kept.cpu().numpy(),
        grid=grid,
        n_vis=n_vis,
        label=f"{name}{'+RESTORE' if restore else ''}, {n_vis} visual tokens",
    )


@torch.inference_mode()
def build_stage_token_maps(bench: BenchModel, input_ids: torch.Tensor, images: torch.Tensor, base: str, n_vis: int,
                           restore: bool) -> List[TokenMap]:
    """A method cutting inside the LLM: one map per stage of what survived it, from one prefill of the prompt
    (the text matters: the method scores with the prompt's attention). Patches standing alone in a token are
    drawn as kept; with RESTORE every other patch is in a merged group."""
    import restore as restore_lib

    if images.shape[0] != 1 or input_ids.shape[0] != 1:
        raise ValueError("token maps are drawn one image at a time")
    name = tr.canonical_name(base)
    try:
        restore_lib.apply(bench.model, base=name, n_vis=n_vis, restore=restore)
        bench.model(input_ids=input_ids, images=images)
        run = bench.model.get_model()._restore_ctx.run
    finally:
        restore_lib.remove(bench.model)
    n_patches = run.tracks[0].source.shape[0]
    grid = int(round(n_patches ** 0.5))
    image = model_view(images, bench.image_processor)
    maps = []
    for number, record in enumerate(run.records, start=1):
        track = record.tracks[0]
        source = track.source
        alone = (source >= 0) & (track.sizes.gather(0, source.clamp(min=0)) == 1)
        maps.append(TokenMap(
            image=image, source=source.cpu().numpy(), kept=alone.nonzero().flatten().cpu().numpy(), grid=grid,
            n_vis=track.num_tokens,
            label=f"{name}{'+RESTORE' if restore else ''}, stage {number}: {track.num_tokens} visual tokens "
                  f"from layer {record.stage.layer}"))
    return maps


def _group_colors(n: int, seed: int = 0) -> np.ndarray:
    """``n`` distinguishable RGB colours in [0, 1], shuffled so neighbouring groups differ."""
    import matplotlib

    hues = np.random.default_rng(seed).permutation(n) / max(n, 1)
    saturation = np.where(np.arange(n) % 2 == 0, 0.85, 0.6)
    value = np.where(np.arange(n) % 3 == 0, 0.95, 0.8)
    return matplotlib.colors.hsv_to_rgb(np.stack([hues, saturation, value], axis=1))


def _boundaries(labels: np.ndarray, patch: int):
    """Line segments (in pixels) between 4-neighbouring patches with different labels."""
    segments = []
    rows, cols = labels.shape
    for r in range(rows):
        for c in range(cols):
            if c + 1 < cols and labels[r, c] != labels[r, c + 1]:
                segments.append([((c + 1) * patch, r * patch), ((c + 1) * patch, (r + 1) * patch)])
            if r + 1 < rows and labels[r, c] != labels[r + 1, c]:
                segments.append([(c * patch, (r + 1) * patch), ((c + 1) * patch, (r + 1) * patch)])
    return segments


def _expand(values: np.ndarray, patch: int) -> np.ndarray:
    """[g, g, ...] per patch -> [g * patch, g * patch, ...] per pixel."""
    return np.repeat(np.repeat(values, patch, axis=0), patch, axis=1)


def draw_token_map(token_map: TokenMap, path, title: str = "") -> None:
    """Three panels: the model's input, kept tokens and merged groups over it, each token's mean colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    g, p = token_map.grid, token_map.patch_size
    image = token_map.image[: g * p, : g * p].astype(np.float64) / 255
    labels = token_map.source.reshape(g, g)
    kept_tokens = set(int(token_map.source[i]) for i in token_map.kept)
    dropped = labels < 0
    merged = ~dropped & ~np.isin(labels, list(kept_tokens))

    # Panel 2: merged groups tinted with their colour, dropped patches greyed, kept ones as they are.
    colors = _group_colors(token_map.n_vis)
    tint = colors[np.clip(labels, 0, None)]
    overlay = image.copy()
    pixel_merged, pixel_dropped = _expand(merged, p), _expand(dropped, p)
    overlay[pixel_merged] = 0.45 * image[pixel_merged] + 0.55 * _expand(tint, p)[pixel_merged]
    grey = image.mean(axis=-1, keepdims=True) * 0.35 + 0.15
    overlay[pixel_dropped] = np.broadcast_to(grey, image.shape)[pixel_dropped]

    # Panel 3: what each token carries, roughly: the mean colour of its patches.
    flat = image.reshape(g, p, g, p, 3).mean(axis=(1, 3)).reshape(-1, 3)
    mean_color = np.zeros((token_map.n_vis, 3))
    counts = np.bincount(token_map.source[token_map.source >= 0], minlength=token_map.n_vis)
    for channel in range(3):
        mean_color[:, channel] = np.bincount(token_map.source[token_map.source >= 0],
                                             weights=flat[token_map.source >= 0, channel], minlength=token_map.n_vis)
    mean_color /= np.maximum(counts, 1)[:, None]
    painted = np.where(dropped[..., None], 0.0, mean_color[np.clip(labels, 0, None)])

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    axes[0].imshow(image)
    axes[0].set_title("model input (padded, 336 px, 24 x 24 patches)")
    axes[1].imshow(overlay)
    axes[1].add_collection(LineCollection(_boundaries(labels, p), colors="white", linewidths=0.6))
    for index in token_map.kept:
        r, c = divmod(int(index), g)
        axes[1].add_patch(Rectangle((c * p, r * p), p, p, fill=False, edgecolor="black", linewidth=2.2))
        axes[1].add_patch(Rectangle((c * p + 1, r * p + 1), p - 2, p - 2, fill=False, edgecolor="yellow", linewidth=1.4))
    n_kept, n_merged = len(token_map.kept), int(token_map.n_vis - len(token_map.kept))
    detail = f"{n_kept} kept (outlined)"
    detail += f", {n_merged} merged groups (coloured)" if merged.any() else f", {int(dropped.sum())} patches dropped (grey)"
    axes[1].set_title(detail)
    axes[2].imshow(_expand(painted, p))
    axes[2].add_collection(LineCollection(_boundaries(labels, p), colors="white", linewidths=0.4))
    axes[2].set_title("each token's patches in its mean colour")
    for ax in axes:
        ax.set_xlim(-0.5, g * p - 0.5)  # the boundary lines would otherwise widen the limits
        ax.set_ylim(g * p - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or token_map.label, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
