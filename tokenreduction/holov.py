"""HoloV (Zou et al., NeurIPS 2025), vectorized over crops and the batch."""
from __future__ import annotations

from typing import List, Tuple

import torch

from .registry import register_selector
from .tokens import VisualTokens

N_CROPS = 16
ATTENTION_SCALE = 1e3
SPREAD_WEIGHT = 0.09
EPS = 1e-6


@register_selector("HoloV")
@torch.no_grad()
def holov(tokens: VisualTokens, n_keep: int) -> torch.Tensor:
    """HoloV (Zou et al., NeurIPS 2025, "HoloV: Holistic Visual Token Pruning for Efficient LVLMs").

    Splits the tokens into 16 consecutive crops, shares the budget between crops by their
    attention and similarity-spread scores, and keeps the highest-attention tokens of each crop.

    Works on the projected features and the CLS attention. Returns indices crop by crop: a partly
    kept crop in descending attention order, a fully kept crop in its own order.
    """
    tokens.require("HoloV", "cls_attention")
    features, attention = tokens.features, tokens.cls_attention
    n_tokens = features.shape[1]
    groups = _crop_groups(n_tokens)

    unit = features / (features.norm(dim=-1, keepdim=True) + EPS)
    scores = torch.cat(
        [_crop_scores(unit[:, lo:hi], attention[:, lo:hi], n, size) for lo, hi, n, size in groups], dim=1
    )
    sizes = torch.cat(
        [torch.full((n,), size, dtype=torch.long, device=features.device) for _, _, n, size in groups]
    )
    allocation = _allocate(scores, sizes, n_keep)
    return _take_per_crop(attention, groups, allocation)


def _crop_groups(n_tokens: int, n_crops: int = N_CROPS) -> List[Tuple[int, int, int, int]]:
    """Crops of equal size as (start, end, number of crops, crop size), in crop order.

    The official code splits N tokens into 16 consecutive crops (its Qwen port: ``n_crops``), the first
    N % n_crops of them one token longer, and drops empty crops; that gives at most two groups of
    equal-size crops.
    """
    n_crops = min(n_crops, n_tokens)
    base, extra = divmod(n_tokens, n_crops)
    groups = []
    if extra:
        groups.append((0, extra * (base + 1), extra, base + 1))
    groups.append((extra * (base + 1), n_tokens, n_crops - extra, base))
    return groups


def _crop_scores(unit: torch.Tensor, attention: torch.Tensor, n_crops: int, size: int) -> torch.Tensor:
    """Scores [B, n_crops] of consecutive equal-size crops of normalized tokens [B, n_crops * size, D]."""
    batch_size = unit.shape[0]
    attention = attention.reshape(batch_size, n_crops, size)
    if size == 1:
        return attention[..., 0]
    unit = unit.reshape(batch_size, n_crops, size, -1)
    # The float32 off-diagonal mask promotes half-precision similarities, as in the official code.
    off_diagonal = 1 - torch.eye(size, device=unit.device)
    similarity = (unit @ unit.transpose(-1, -2)) * off_diagonal
    mean_similarity = similarity.sum(dim=-1) / (size - 1)
    # The zeroed diagonal takes part in the spread, as in the official code.
    spread = ((similarity - mean_similarity[..., None]) ** 2).sum(dim=-1) / (size - 1)
    scaled_attention = attention * ATTENTION_SCALE
    balance = scaled_attention.abs().mean(dim=-1, keepdim=True) / (spread.abs().mean(dim=-1, keepdim=True) + EPS)
    # The official balance is a 0-dim tensor, so the product is taken in the spread's dtype.
    token_scores = scaled_attention + SPREAD_WEIGHT * (spread * balance.to(spread.dtype))
    return token_scores.mean(dim=-1)


def _allocate(scores: torch.Tensor, sizes: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Tokens kept per crop [B, n_crops]: proportional to the scores, capped by the crop sizes.

    A loop over redistribution rounds (a few), batched across samples.
    """
    weights = scores / (scores.sum(dim=-1, keepdim=True) + EPS)
    allocation = (weights * n_keep).floor().long()
    _add_one_to_top(allocation, weights, n_keep - allocation.sum(dim=-1))
    for _ in range(n_keep):
        allocation = torch.minimum(allocation, sizes)
        deficit = n_keep - allocation.sum(dim=-1)
        has_room = allocation < sizes
        extra = torch.minimum(deficit, has_room.sum(dim=-1)).clamp(min=0)
        if not bool(extra.any()):
            break
        _add_one_to_top(allocation, weights.masked_fill(~has_room, float("-inf")), extra)
    return allocation


def _add_one_to_top(allocation: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor) -> None:
    """Add 1 (in place) to the counts[b] highest-weight crops of every sample b.

    One top-k call per distinct count, with that k, as the official code calls it per sample:
    which of two exactly tied weights top-k prefers depends on k.
    """
    counts = counts.clamp(0, weights.shape[-1])
    for count in counts[counts > 0].unique().tolist():
        rows = (counts == count).nonzero()[:, 0]
        top = torch.topk(weights[rows], k=count, dim=-1).indices
        allocation[rows[:, None], top] += 1


def _take_per_crop(attention: torch.Tensor, groups: List[Tuple[int, int, int, int]], allocation: torch.Tensor) -> torch.Tensor:
    """Indices [B, n_keep], crop by crop: the `allocation` highest-attention tokens of each crop.

    A fully kept crop keeps its own order, a partly kept one descending attention order.
    """
    batch_size, device = attention.shape[0], attention.device
    width = max(size for _, _, _, size in groups)
    orders = []
    first_crop = 0
    for lo, hi, n_crops, size in groups:
        counts = allocation[:, first_crop : first_crop + n_crops]
        crop_attention = attention[:, lo:hi].reshape(batch_size, n_crops, size)
        order = torch.arange(size, device=device).repeat(batch_size, n_crops, 1)
        partly_kept = (counts > 0) & (counts < size)
        # One top-k per distinct count (a few), not one full sort: top-k orders tied attention
        # values differently for different k, and ties are common in half-precision attention.
        for count in counts[partly_kept].unique().tolist():
            chosen = partly_kept & (counts == count)
            order[..., :count][chosen] = torch.topk(crop_attention[chosen], k=count, dim=-1).indices
        order += (lo + size * torch.arange(n_crops, device=device))[:, None]
        orders.append(torch.nn.functional.pad(order, (0, width - size)))
        first_crop += n_crops
    order = torch.cat(orders, dim=1)  # [B, n_crops, width]; the padding is never taken
    taken = torch.arange(width, device=device) < allocation[..., None]
    return order[taken].view(batch_size, -1)
