"""Reduce LLaVA-NeXT images in the fixed 2880-token layout of llava_patches/next_layout.py.

Each image's five views go through the tower as rows of one batch (as stock NeXT encodes them); their
features, CLS attention and keys are then read in the visual-sequence order, so that a method whose
budget covers the whole image (HoloV, DivPrune) sees one 2880-token image, with the CLS attention of
every view side by side. A method whose official NeXT code selects on every crop (VisPruner, VisionZip:
``tokenreduction.budget_scope``) is run on each view's 576 tokens alone with a fifth of the budget.
RESTORE's merging, positions and sizes then work on the 2880 sequence as on 1.5's 576 patches.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch

import tokenreduction as tr
from restore.reduce import ReducedImages, own_plain_row, reduce_visual_tokens
from restore.settings import ReductionSettings

from .next_layout import VIEWS, NextTokens, to_sequence, view_budgets, view_positions
from .next_visionzip import visionzip_next_plain
from .vision import encode_visual_tokens


def encode_next_tokens(model, views: torch.Tensor, *, with_keys: bool = False, with_cls: bool = False) -> NextTokens:
    """Encode ``views`` [I, 5, 3, H, W] (the fixed 2x2 grid of every image)."""
    count = views.shape[0]
    flat = encode_visual_tokens(model, views.flatten(0, 1), with_keys=with_keys, with_cls=with_cls)

    def per_view(x):
        return None if x is None else x.view(count, VIEWS, *x.shape[1:])

    fields = ("features", "raw_features", "cls_attention", "keys")
    grouped = {name: per_view(getattr(flat, name)) for name in fields}
    cls = per_view(flat.cls_raw_feature)
    whole = tr.VisualTokens(**{name: None if x is None else to_sequence(x) for name, x in grouped.items()})
    # Contiguous copies: a selector then sees the same memory layout as for a 1.5 image of its own.
    view_tokens = [
        tr.VisualTokens(**{name: None if x is None else x[:, v].contiguous() for name, x in grouped.items()},
                        cls_raw_feature=None if cls is None else cls[:, v].contiguous())
        for v in range(VIEWS)
    ]
    side = int(round(flat.num_tokens ** 0.5))
    device = flat.features.device
    return NextTokens(whole, view_tokens, [p.to(device) for p in view_positions(side)])


def per_view_selector(base: str, tokens: NextTokens) -> Callable[[tr.VisualTokens, int], torch.Tensor]:
    """``select(whole, n_keep)``: the base's selector on every view with its share of ``n_keep``, as
    sequence positions: the base view's picks in the method's order, then the crops' picks read off the
    stitched canvas (in sequence order), the order in which the per-crop peers feed NeXT's tokens."""
    selector = tr.get_selector(base)

    def select(_whole: tr.VisualTokens, n_keep: int) -> torch.Tensor:
        picks = []
        for view, positions, budget in zip(tokens.views, tokens.positions, view_budgets(n_keep)):
            local = selector(view, budget) if budget else positions.new_zeros(view.batch_size, 0)
            picks.append(positions[local])
        grid = torch.cat(picks[1:], dim=1).sort(dim=1).values
        return torch.cat([picks[0], grid], dim=1)

    return select


def next_plain_rows() -> Dict[str, Callable[[NextTokens, int], tr.OwnReduction]]:
    """Own plain rows of per-view methods on NeXT, by canonical name (each peer assembles its crops its own way)."""
    return {"VisionZip": visionzip_next_plain}


def min_views_budget(settings: ReductionSettings) -> int:
    """The smallest per-view budget a per-view method gets under ``settings`` (its plain row: n_vis)."""
    return (settings.n_vis if settings.is_plain_base else settings.n_keep) // VIEWS


def reduce_next_images(model, views: torch.Tensor, settings: ReductionSettings) -> ReducedImages:
    """The visual tokens of NeXT images ``views`` [I, 5, 3, H, W] after the reduction (N = settings.num_patches)."""
    base = settings.base
    per_view = tr.budget_scope(base) == "per_view"
    plain = tr.plain_reduction(base) if settings.is_plain_base else None
    needs = tr.method_needs(base, plain=settings.is_plain_base)
    tokens = encode_next_tokens(model, views, with_keys="keys" in needs, with_cls="cls_raw_feature" in needs)
    project = model.get_model().mm_projector
    if plain is not None:
        assemble = next_plain_rows().get(base)
        if assemble is None or not per_view:
            raise NotImplementedError(f"{base}'s own plain row has no LLaVA-NeXT assembly in "
                                      "llava_patches/next_reduce.py (next_plain_rows)")
        return own_plain_row(assemble(tokens, settings.n_vis), project)
    select = per_view_selector(base, tokens) if per_view else None
    return reduce_visual_tokens(tokens.whole, settings, project=project, select=select)
