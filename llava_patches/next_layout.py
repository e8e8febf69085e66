"""The fixed layout in which reduced LLaVA-NeXT (anyres) rows see an image (docs/llava_next.md, part 3).

Stock NeXT picks a grid per image, unpads it and closes every row with a newline token, so an image
gives 1176 to 2928 tokens. Reduced rows instead put every image through one 2x2 grid (the 672x672
letterbox VisPruner's NeXT code fixes): a squashed 336 px base view plus four 336 px crops, 5 x 576
tokens, with no unpadding and no newline tokens. The visual sequence is the base view's 576 tokens, then
the 48x48 stitched canvas in raster order across crops (stock's own reading of the grid), so N = 2880
for every image and a token's position is its index in that sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, List, Mapping, Sequence, Union

import torch

import tokenreduction as tr

GRID_COLUMNS = GRID_ROWS = 2
GRID_RESOLUTION = (336 * GRID_COLUMNS, 336 * GRID_ROWS)  # (width, height) of the letterbox canvas
VIEWS = 1 + GRID_COLUMNS * GRID_ROWS  # base view first, then the crops in raster order
NATIVE_KEY = "native"
GRID_KEY = "grid2x2"


def is_next(config: Union[Mapping[str, Any], Any]) -> bool:
    """Whether a LLaVA config (a loaded model's, or a config.json mapping) runs stock's anyres (NeXT) path."""
    value = config.get("image_aspect_ratio") if isinstance(config, Mapping) else getattr(config, "image_aspect_ratio", None)
    return value == "anyres"


def grid_pixels(image: Any, image_processor: Any) -> torch.Tensor:
    """[5, 3, 336, 336]: the image as stock anyres preprocesses it when its only candidate grid is 2x2.

    Going through stock's own anyres function with one pinpoint keeps its letterbox (black bars, bicubic
    resize rounded up), crop order and base-view squash, without patching llava's grid choice globally.
    """
    from llava.mm_utils import process_anyres_image

    return process_anyres_image(image, image_processor, [list(GRID_RESOLUTION)])


@lru_cache(maxsize=None)
def _sequence_order(side: int) -> torch.Tensor:
    positions = torch.arange(VIEWS * side * side)
    grid = positions[side * side:] - side * side
    row, column = grid // (GRID_COLUMNS * side), grid % (GRID_COLUMNS * side)
    view = 1 + (row // side) * GRID_COLUMNS + column // side
    local = (row % side) * side + column % side
    return torch.cat([positions[:side * side], view * side * side + local])


def sequence_order(side: int = 24) -> torch.Tensor:
    """[5 * side^2] long: for each position of the visual sequence, its token's index in the views
    concatenated view after view (what the tower returns for ``[5, 3, 336, 336]``)."""
    return _sequence_order(side).clone()


def view_positions(side: int = 24) -> List[torch.Tensor]:
    """For each view, the sequence positions [side^2] of its tokens, in the view's own raster order."""
    inverse = _sequence_order(side).argsort()
    return [inverse[v * side * side:(v + 1) * side * side] for v in range(VIEWS)]


def to_sequence(per_view: torch.Tensor) -> torch.Tensor:
    """[I, 5, side^2, ...] per-view tokens -> [I, 5 * side^2, ...] in the visual-sequence order."""
    side = int(round(per_view.shape[2] ** 0.5))
    flat = per_view.flatten(1, 2)
    return flat.index_select(1, _sequence_order(side).to(flat.device))


def split_views(images: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
    """The images of a reduced NeXT batch as one [I, 5, 3, H, W] tensor.

    Stock anyres pixels of a non-2x2 grid have another view count; they cannot be mapped onto the fixed
    layout (the crops cover other parts of the image), so they are refused rather than misread.
    """
    if torch.is_tensor(images):
        images = list(images) if images.dim() == 5 else [images]
    counts = [x.shape[0] if x.dim() == 4 else 1 for x in images]
    if any(count != VIEWS for count in counts):
        raise ValueError(
            f"reduced LLaVA-NeXT rows take every image as the fixed 2x2 grid ({VIEWS} views of 336 px), got "
            f"images with {sorted(set(counts))} views; preprocess with "
            "llava_patches.family.FAMILY.preprocess_image(image, image_processor, model.config, settings)")
    return torch.stack(list(images))


def preprocessing_key(settings: Any) -> str:
    """Which pixels a NeXT configuration reads: stock's native grid unreduced, the fixed grid reduced."""
    return NATIVE_KEY if settings is None else GRID_KEY


@dataclass
class NextTokens:
    """The visual tokens of I NeXT images, whole and per view."""

    whole: tr.VisualTokens  # [I, 2880] in sequence order (no CLS feature: there are five)
    views: List[tr.VisualTokens]  # one [I, 576] per view, in the view's own raster order
    positions: List[torch.Tensor]  # per view, the sequence positions [576] of its tokens

    @property
    def num_images(self) -> int:
        return self.whole.batch_size


def view_budgets(n: int, views: int = VIEWS) -> List[int]:
    """``n`` tokens split evenly over the views; a remainder goes to the first views (base view first)."""
    return [n // views + (1 if v < n % views else 0) for v in range(views)]
