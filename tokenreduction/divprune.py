"""DivPrune (Alvar et al., CVPR 2025), vectorized over the batch."""
from __future__ import annotations

import torch

from .registry import register_selector
from .tokens import VisualTokens


@register_selector("DivPrune")
@torch.no_grad()
def divprune(tokens: VisualTokens, n_keep: int) -> torch.Tensor:
    """DivPrune (Alvar et al., CVPR 2025, "DivPrune: Diversity-based Visual Token Pruning").

    Keeps a maximally diverse subset of the projected tokens: max-min selection over the cosine
    distance 1 - cos, starting from the token farthest from its nearest neighbour.

    Returns indices in selection order. Each sample is independent. One deliberate difference
    from the official code: a picked token is never picked again. The official code can repeat
    an index when distances tie at about zero (identical tokens, e.g. padded patches); whenever
    its picks are distinct, the result here is the same.
    """
    features = tokens.features
    batch_size = features.shape[0]
    unit = features / features.norm(dim=-1, keepdim=True)
    distance = 1.0 - unit @ unit.transpose(1, 2)  # [B, N, N], in the features' dtype
    rows = torch.arange(batch_size, device=features.device)

    # First pick: the token whose nearest neighbour is farthest. The smallest entry of a column
    # is the token's distance to itself, so its nearest neighbour is the second smallest.
    nearest = torch.topk(distance, 2, dim=1, largest=False).values[:, 1]
    pick = nearest.argmax(dim=1)
    picks = [pick]
    # Distance of every token to the picked set; picked tokens are set to -inf so that they
    # are never chosen again.
    to_picked = distance[rows, pick].clone()
    to_picked[rows, pick] = float("-inf")
    for _ in range(n_keep - 1):
        pick = to_picked.argmax(dim=1)
        picks.append(pick)
        torch.minimum(to_picked, distance[rows, pick], out=to_picked)
        to_picked[rows, pick] = float("-inf")
    return torch.stack(picks, dim=1)
