"""VisPruner (Zhang et al., ICCV 2025), vectorized over the batch."""
from __future__ import annotations

import torch

from .registry import register_selector
from .tokens import VisualTokens

IMPORTANT_SHARE = 0.5  # share of the budget picked by CLS attention alone
MAX_REMOVED_PER_ROUND = 8


@register_selector("VisPruner", budget_scope="per_view")  # its NeXT code selects on every crop
@torch.no_grad()
def vispruner(tokens: VisualTokens, n_keep: int) -> torch.Tensor:
    """VisPruner (Zhang et al., ICCV 2025, "Beyond Text-Visual Attention: Exploiting Visual Cues
    for Effective Token Pruning in VLMs").

    Keeps the half of the budget with the highest CLS attention, then fills the rest with diverse
    tokens by repeatedly dropping (up to 8 at a time) the most redundant of the remaining ones.

    Works on the vision encoder's raw features; returns indices in ascending order. Every
    round's similarities are entries of one [B, N, N] cosine-similarity matrix, computed once.
    The official code fails with an indexing error for about half of all budgets (at N = 576:
    n_keep = 1, 4, 8 and every n_keep = 4m + 2 or 4m + 3), when the remaining list has odd
    length or fewer even-position tokens than a round drops. Here a round then drops what it
    can from the even-position half and the next rounds go on; elsewhere the picks are the same.
    """
    tokens.require("VisPruner", "raw_features", "cls_attention")
    raw, attention = tokens.raw_features, tokens.cls_attention
    batch_size = raw.shape[0]
    n_important = int(n_keep * IMPORTANT_SHARE)
    n_diverse = n_keep - n_important

    by_attention = attention.argsort(dim=-1, descending=True)
    important = by_attention[:, :n_important]
    remaining = by_attention[:, n_important:]

    unit = raw / raw.norm(dim=-1, keepdim=True)
    similarity = unit @ unit.transpose(1, 2)  # [B, N, N], in the raw features' dtype
    rows = torch.arange(batch_size, device=raw.device)[:, None]
    while True:
        n_removed = min(MAX_REMOVED_PER_ROUND, remaining.shape[1] - n_diverse)
        if n_removed <= 0:
            break
        even, odd = remaining[:, ::2], remaining[:, 1::2]
        # Redundancy of an even-position token: its highest similarity to an odd-position one.
        # Whole rows with the other columns at -inf: faster than gathering the even x odd block.
        only_odd = torch.full_like(similarity[:, 0], float("-inf")).scatter_(1, odd, 0.0)
        redundancy = (similarity[rows, even] + only_odd[:, None, :]).amax(dim=-1)
        survivors = redundancy.argsort(dim=-1, descending=True)[:, n_removed:]
        remaining = torch.cat([even.gather(1, survivors), odd], dim=1)

    return torch.cat([important, remaining], dim=1).sort(dim=1).values
