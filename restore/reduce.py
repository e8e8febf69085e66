"""Reduce one batch of images' visual tokens: the base selects, RESTORE merges the rest."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import tokenreduction as tr

from .merge import anchor_merge, complement, group_medians


@dataclass
class ReducedImages:
    """The visual tokens an image contributes to the LLM, in the order they are fed to it."""

    features: torch.Tensor  # [B, n_vis, D]
    positions: torch.Tensor  # [B, n_vis] retained patch position (0..N-1) of each token
    sizes: torch.Tensor  # [B, n_vis] float32, number of original patches in each token
    source: torch.Tensor  # [B, N] index of the token each patch ended up in, -1 if dropped (a source map)


def retained_budget(n_vis: int, restore: bool) -> int:
    """Tokens the base selector keeps; with RESTORE the other half of the budget comes from merging."""
    return int(n_vis * 0.5) if restore else n_vis


def reduce_visual_tokens(tokens: tr.VisualTokens, base: str, n_vis: int, restore: bool) -> ReducedImages:
    """Select with ``base``; with ``restore``, merge the unselected tokens and order everything by position.

    Without ``restore`` the kept tokens stay in the order the base method feeds them to the LLM
    (the paper's baseline rows); their positions are only informative.
    """
    B, N, D = tokens.features.shape
    keep = tr.get_selector(base)(tokens, retained_budget(n_vis, restore))
    kept = tokens.features.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))
    slots = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
    source = torch.full((B, N), -1, dtype=torch.long, device=keep.device).scatter(1, keep, slots)
    if not restore:
        return ReducedImages(kept, keep, torch.ones(keep.shape, device=keep.device), source)

    n_keep = keep.shape[1]
    unselected = complement(keep, N)
    rest = tokens.features.gather(1, unselected.unsqueeze(-1).expand(-1, -1, D))
    groups = anchor_merge(rest, n_vis - n_keep)
    merged_positions = group_medians(unselected, groups.group_of, n_vis - n_keep, span=N)

    features = torch.cat([kept, groups.features], dim=1)
    positions = torch.cat([keep, merged_positions], dim=1)
    sizes = torch.cat([torch.ones(keep.shape, device=keep.device), groups.sizes], dim=1)
    order = positions.argsort(dim=-1)
    source = source.scatter(1, unselected, groups.group_of + n_keep)  # slots before sorting
    return ReducedImages(
        features=features.gather(1, order.unsqueeze(-1).expand(-1, -1, D)),
        positions=positions.gather(1, order),
        sizes=sizes.gather(1, order),
        source=order.argsort(dim=-1).gather(1, source),
    )
