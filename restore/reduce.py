"""Reduce one batch of images' visual tokens: the base selects, RESTORE merges the rest."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

import tokenreduction as tr

from .merge import anchor_merge, complement, group_positions
from .settings import ReductionSettings, resolve_settings


@dataclass
class ReducedImages:
    """The visual tokens an image contributes to the LLM, in the order they are fed to it."""

    features: torch.Tensor  # [B, n_vis, D]
    positions: torch.Tensor  # [B, n_vis] retained patch position (0..N-1) of each token
    sizes: torch.Tensor  # [B, n_vis] float32, number of original patches in each token
    source: torch.Tensor  # [B, N] index of the token each patch ended up in, -1 if dropped (a source map)


def retained_budget(n_vis: int, restore: bool) -> int:
    """Tokens the base selector keeps at the paper's defaults; with RESTORE the other half is merged."""
    return int(n_vis * 0.5) if restore else n_vis


def reduce_visual_tokens(tokens: tr.VisualTokens, settings: Union[ReductionSettings, str], n_vis: Optional[int] = None,
                         restore: bool = False, *, project: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                         select: Optional[Callable[[tr.VisualTokens, int], torch.Tensor]] = None,
                         **overrides: Any) -> ReducedImages:
    """Keep ``settings.n_keep`` tokens with the base method, merge the others into the rest of the budget.

    ``settings`` is a :class:`ReductionSettings`, or a base name followed by ``n_vis``, ``restore`` and
    any keyword setting of :func:`restore.apply`. A method with its own plain-row reduction (VisionZip's
    contextual tokens) gives the plain row itself; ``project`` (the mm_projector) then maps raw features.
    ``select(tokens, n_keep)`` replaces the base's registered selector: a model whose images are several
    views uses it to apply the base per view (its indices are still into the N tokens of ``tokens``);
    such a caller builds a method's own plain row itself.

    Tokens stay in the order the base method feeds them to the LLM when nothing is merged and
    positions are re-indexed (the paper's baseline rows); otherwise they are ordered by position
    (a merged group's from :func:`group_positions`), as RESTORE orders them.
    """
    if not isinstance(settings, ReductionSettings):
        settings = resolve_settings(tr.canonical_name(settings), n_vis, restore, tokens.num_tokens, **overrides)
    B, N, D = tokens.features.shape
    device = tokens.features.device
    own = tr.plain_reduction(settings.base) if settings.is_plain_base and select is None else None
    if own is not None:
        return own_plain_row(own(tokens, settings.n_vis), project)
    if settings.n_keep > 0:
        keep = (select or tr.get_selector(settings.base))(tokens, settings.n_keep)
    else:  # gamma = 0: merge only
        keep = torch.empty(B, 0, dtype=torch.long, device=device)
    kept = tokens.features.gather(1, keep.unsqueeze(-1).expand(-1, -1, D))
    slots = torch.arange(keep.shape[1], device=device).expand_as(keep)
    source = torch.full((B, N), -1, dtype=torch.long, device=device).scatter(1, keep, slots)
    ones = torch.ones(keep.shape, device=device)
    if settings.in_base_order:
        return ReducedImages(kept, keep, ones, source)

    features, positions, sizes = kept, keep, ones
    if settings.merges:
        n_keep, n_merged = keep.shape[1], settings.n_merged
        unselected = complement(keep, N)
        rest = tokens.features.gather(1, unselected.unsqueeze(-1).expand(-1, -1, D))
        groups = anchor_merge(rest, n_merged, anchor_rule=settings.anchors)
        merged_positions = group_positions(unselected, groups.group_of, n_merged, settings.merged_position, span=N)
        features = torch.cat([kept, groups.features], dim=1)
        positions = torch.cat([keep, merged_positions], dim=1)
        sizes = torch.cat([ones, groups.sizes], dim=1)
        source = source.scatter(1, unselected, groups.group_of + n_keep)  # slots before sorting
    # Stable, so that a mean-positioned group sharing a kept token's id comes after it.
    order = positions.sort(dim=-1, stable=True).indices
    return ReducedImages(
        features=features.gather(1, order.unsqueeze(-1).expand(-1, -1, D)),
        positions=positions.gather(1, order),
        sizes=sizes.gather(1, order),
        source=order.argsort(dim=-1).gather(1, source.clamp(min=0)).masked_fill(source < 0, -1),
    )


def own_plain_row(own: tr.OwnReduction, project: Optional[Callable[[torch.Tensor], torch.Tensor]]) -> ReducedImages:
    """A method's own plain row as the LLM gets it (raw features through ``project``, the mm_projector)."""
    features = own.features
    if own.space == "raw":
        if project is None:
            raise ValueError("this method merges raw vision features: pass project= (the model's mm_projector)")
        features = project(features)
    return ReducedImages(features, own.positions, own.sizes.float(), own.source)


def arrange_merged_tokens(features: torch.Tensor, sizes: torch.Tensor, source: torch.Tensor,
                          settings: ReductionSettings) -> ReducedImages:
    """Tokens reduced by the base method itself (ToMe, FlowCut): features [B, n, D] in its order, sizes [B, n],
    source [B, N] (the token of every patch, -1 for a patch the method dropped). Each token's position comes
    from its patches (``merged_position``); with retained positions the tokens are ordered by it, re-indexed
    they keep the method's order."""
    B, N = source.shape
    n = features.shape[1]
    dropped = source < 0
    patches = torch.arange(N, device=source.device).expand(B, N)
    # dropped patches form an extra group n, left out
    positions = group_positions(patches, source.masked_fill(dropped, n), n + 1, settings.merged_position,
                                span=N)[:, :n]
    if settings.in_base_order:
        return ReducedImages(features, positions, sizes.float(), source)
    order = positions.sort(dim=-1, stable=True).indices
    return ReducedImages(
        features=features.gather(1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1])),
        positions=positions.gather(1, order),
        sizes=sizes.float().gather(1, order),
        source=order.argsort(dim=-1).gather(1, source.clamp(min=0)).masked_fill(dropped, -1),
    )
