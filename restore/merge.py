"""Distinctive anchor merging and position retention: pure tensor functions, no model state.

All functions are batched over the first dimension; every sample is independent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch


@dataclass
class MergedGroups:
    """Result of :func:`anchor_merge` on M tokens merged into K groups."""

    features: torch.Tensor  # [B, K, D] mean feature of each group
    group_of: torch.Tensor  # [B, M]    group index (0..K-1) of every input token
    sizes: torch.Tensor  # [B, K]    number of input tokens in each group
    anchors: torch.Tensor  # [B, K]    index (into M) of each group's anchor, ascending


def complement(indices: torch.Tensor, n: int) -> torch.Tensor:
    """The indices in 0..n-1 that are not in ``indices`` [B, k], ascending -> [B, n - k] (rows distinct)."""
    B, k = indices.shape
    absent = torch.ones(B, n, dtype=torch.bool, device=indices.device)
    absent.scatter_(1, indices, False)
    return absent.nonzero()[:, 1].view(B, n - k)


def anchor_scores(features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity [B, M, M] and distinctiveness score [B, M] of every token.

    density_i = sum_j S_ij (self included); delta_i = max S_ij over the tokens j that are strictly
    less dense than i (0 for the least dense token); score_i = density_i * (1 - delta_i).
    A dense token that is unlike every sparser token scores high: a good cluster centre.
    Computed in the features' dtype, as the official implementation does.
    """
    unit = features / features.norm(dim=-1, keepdim=True)
    sim = unit @ unit.transpose(-1, -2)
    density = sim.sum(dim=-1)
    sparser = density.unsqueeze(1) < density.unsqueeze(2)  # [b, i, j]: density_j < density_i
    # -1 is the floor of a cosine, so a row with no sparser token keeps -1 and is set to 0 below.
    delta = sim.masked_fill(~sparser, -1.0).amax(dim=-1)
    delta = delta.masked_fill(delta == -1.0, 0.0)
    return sim, density * (1.0 - delta)


def uniform_anchors(batch: int, M: int, n_groups: int, device: torch.device | str | None = None) -> torch.Tensor:
    """VisionZip's anchors: every ``max(1, M // n_groups)``-th of the M tokens, the first ``n_groups`` -> [B, K]."""
    step = max(1, M // n_groups)
    return torch.arange(0, M, step, device=device)[:n_groups].expand(batch, n_groups)


def anchor_merge(features: torch.Tensor, n_groups: int, anchor_rule: str = "distinctive") -> MergedGroups:
    """Merge M tokens into ``n_groups`` groups around anchors.

    ``anchor_rule="distinctive"`` (RESTORE): the ``n_groups`` highest-scoring tokens of
    :func:`anchor_scores`; ``"uniform"``: evenly spaced tokens (:func:`uniform_anchors`). Every other
    token joins its most similar anchor. A group's feature is the mean of its members, anchor included.
    """
    B, M, D = features.shape
    if not 1 <= n_groups <= M:
        raise ValueError(f"n_groups must be in 1..{M}, got {n_groups}")
    if anchor_rule == "distinctive":
        sim, scores = anchor_scores(features)
        anchors = scores.topk(n_groups, dim=-1).indices.sort(dim=-1).values  # [B, K]
    elif anchor_rule == "uniform":
        unit = features / features.norm(dim=-1, keepdim=True)
        sim = unit @ unit.transpose(-1, -2)
        anchors = uniform_anchors(B, M, n_groups, features.device)
    else:
        raise ValueError(f"anchor_rule must be 'distinctive' or 'uniform', got {anchor_rule!r}")

    members = complement(anchors, M)

    to_anchor = sim.gather(1, members.unsqueeze(-1).expand(B, M - n_groups, M))
    to_anchor = to_anchor.gather(2, anchors.unsqueeze(1).expand(B, M - n_groups, n_groups))
    member_group = to_anchor.argmax(dim=-1)  # [B, M-K]

    # One-hot matmul rather than scatter_add: deterministic on every device.
    assign = torch.nn.functional.one_hot(member_group, n_groups).to(features.dtype)  # [B, M-K, K]
    anchor_feats = features.gather(1, anchors.unsqueeze(-1).expand(B, n_groups, D))
    member_feats = features.gather(1, members.unsqueeze(-1).expand(B, M - n_groups, D))
    sums = anchor_feats + assign.transpose(1, 2) @ member_feats
    sizes = 1.0 + assign.transpose(1, 2).sum(dim=-1, dtype=torch.float32)  # [B, K]

    group_of = torch.empty(B, M, dtype=torch.long, device=features.device)
    group_of.scatter_(1, anchors, torch.arange(n_groups, device=features.device).expand(B, n_groups))
    group_of.scatter_(1, members, member_group)
    return MergedGroups(
        features=sums / sizes.unsqueeze(-1).to(features.dtype),
        group_of=group_of,
        sizes=sizes,
        anchors=anchors,
    )


def group_medians(positions: torch.Tensor, group_of: torch.Tensor, n_groups: int, span: int | None = None) -> torch.Tensor:
    """Lower median of the ``positions`` [B, M] (non-negative) of each group's members -> [B, n_groups].

    With a group's member positions sorted ascending, the median is the one at index (count - 1) // 2,
    so it is always one of the members' own positions. ``span``: any bound above every position.
    """
    B, M = positions.shape
    if span is None:
        span = int(positions.max().item()) + 1 if positions.numel() else 1
    order = (group_of * span + positions).argsort(dim=-1)  # group-major, then ascending position
    sorted_pos = positions.gather(1, order)
    counts = torch.zeros(B, n_groups, dtype=torch.long, device=positions.device)
    counts.scatter_add_(1, group_of, torch.ones_like(group_of))
    starts = counts.cumsum(dim=-1) - counts
    return sorted_pos.gather(1, starts + (counts - 1) // 2)


def group_positions(positions: torch.Tensor, group_of: torch.Tensor, n_groups: int, rule: str = "median",
                    span: int | None = None) -> torch.Tensor:
    """The position id each group takes from its members' ``positions`` [B, M] -> [B, n_groups].

    ``median``: the lower median (:func:`group_medians`); ``first`` / ``last``: the smallest / largest
    member position; ``mean``: the members' mean rounded half up to an integer id (RoPE ids are integers),
    the only rule whose result need not be a member's own position.
    """
    if rule == "median":
        return group_medians(positions, group_of, n_groups, span=span)
    B, _ = positions.shape
    if rule in ("first", "last"):
        reduce = "amin" if rule == "first" else "amax"
        start = positions.new_full((B, n_groups), 0)
        return start.scatter_reduce(1, group_of, positions, reduce=reduce, include_self=False)
    if rule == "mean":
        totals = torch.zeros(B, n_groups, dtype=torch.float64, device=positions.device)
        totals.scatter_add_(1, group_of, positions.double())
        counts = torch.zeros_like(totals).scatter_add_(1, group_of, torch.ones_like(totals[:, :1]).expand_as(group_of))
        return torch.floor(totals / counts + 0.5).long()
    raise ValueError(f"merged position rule must be 'median', 'first', 'mean' or 'last', got {rule!r}")
