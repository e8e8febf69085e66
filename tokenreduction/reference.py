"""Slow, loop-based restatements of the three official selection algorithms.

FOR TESTING AND BENCHMARKING ONLY: these are not registered selectors. Each function restates,
in this project's own words, what the official DivPrune, VisPruner and HoloV code computes, and
with the same structure (one sample at a time, one crop at a time, the DivPrune minimum
recomputed over every picked row at every step). The tests use them as oracles for the
vectorized selectors, and ``benchmarks/bench_selectors.py`` uses them as the "official-style"
baseline the selectors' speed is compared with.

Every function takes batched tensors, loops over the samples and returns a LongTensor
[B, n_keep] in the order the official code feeds the kept tokens to the LLM.
"""
from __future__ import annotations

import torch

__all__ = ["divprune_reference", "holov_reference", "vispruner_reference"]


@torch.no_grad()
def divprune_reference(features: torch.Tensor, n_keep: int) -> torch.Tensor:
    """DivPrune picks, one sample at a time, in selection order.

    Like the official code, a token can be picked twice when distances tie (identical tokens);
    the vectorized selector masks picked tokens instead.
    """
    picks_per_sample = []
    for sample in features:
        unit = sample / sample.norm(dim=1, keepdim=True)
        distance = 1.0 - unit @ unit.t()
        picks = torch.empty(n_keep, dtype=torch.long, device=sample.device)
        for step in range(n_keep):
            if step == 0:
                # Nearest-neighbour distance of every token: the second smallest in its column
                # (the smallest is the token's distance to itself).
                score = torch.topk(distance, 2, dim=0, largest=False).values[1]
            else:
                score = distance[picks[:step]].min(dim=0).values
            picks[step] = torch.argmax(score)
        picks_per_sample.append(picks)
    return torch.stack(picks_per_sample)


@torch.no_grad()
def vispruner_reference(raw_features: torch.Tensor, cls_attention: torch.Tensor, n_keep: int) -> torch.Tensor:
    """VisPruner picks, one sample at a time, in ascending index order.

    Where the official code fails with an indexing error (a remaining list of odd length, or
    fewer even-position tokens than a round drops), a round drops what it can from the
    even-position half and the next rounds go on.
    """
    n_important = int(n_keep * 0.5)
    n_diverse = n_keep - n_important
    picks_per_sample = []
    for sample, attention in zip(raw_features, cls_attention):
        by_attention = attention.argsort(descending=True)
        important = by_attention[:n_important]
        residual = by_attention[n_important:]
        unit = sample / sample.norm(dim=-1, keepdim=True)
        while n_diverse > 0:
            remove = min(8, len(residual) - n_diverse)
            if remove <= 0:
                break
            candidates = unit[residual]
            even, odd = candidates[::2], candidates[1::2]
            redundancy = (even @ odd.t()).max(dim=-1).values
            survivors = redundancy.argsort(descending=True)[remove:]
            residual = torch.cat([residual[::2][survivors], residual[1::2]])
        kept = torch.cat([important, residual])
        picks_per_sample.append(kept.sort().values)
    return torch.stack(picks_per_sample)


@torch.no_grad()
def holov_reference(
    features: torch.Tensor, cls_attention: torch.Tensor, n_keep: int, n_crops: int = 16
) -> torch.Tensor:
    """HoloV picks, one sample and one crop at a time, crop by crop."""
    eps = 1e-6
    picks_per_sample = []
    for sample, attention in zip(features, cls_attention):
        n_tokens = sample.shape[0]
        base, extra = divmod(n_tokens, n_crops)

        # Consecutive crops of the flattened grid; the first `extra` crops hold one more token.
        crops = []
        start = 0
        for crop in range(n_crops):
            size = base + (1 if crop < extra else 0)
            if size > 0:
                crops.append((start, start + size))
            start += size

        scores = []
        for lo, hi in crops:
            crop_tokens, crop_attention = sample[lo:hi], attention[lo:hi]
            size = hi - lo
            if size == 1:
                scores.append(crop_attention.mean())
                continue
            unit = crop_tokens / (crop_tokens.norm(dim=1, keepdim=True) + eps)
            similarity = (unit @ unit.t()) * (1 - torch.eye(size, device=sample.device))
            mean_similarity = similarity.sum(dim=1) / (size - 1)
            # The zeroed diagonal takes part in the spread, as in the official code.
            spread = ((similarity - mean_similarity.unsqueeze(1)) ** 2).sum(dim=1) / (size - 1)
            scaled_attention = crop_attention * 1e3
            balance = scaled_attention.abs().mean() / (spread.abs().mean() + eps)
            token_scores = scaled_attention + 0.09 * (spread * balance)
            scores.append(token_scores.mean())
        scores = torch.stack(scores)
        sizes = torch.tensor([hi - lo for lo, hi in crops], device=sample.device)

        # Budget proportional to the crop scores, leftovers to the highest weights.
        weights = scores / (scores.sum() + eps)
        allocation = (weights * n_keep).floor().long()
        leftover = n_keep - int(allocation.sum())
        if leftover > 0:
            for crop in torch.topk(weights, k=min(leftover, len(weights))).indices[:leftover]:
                allocation[crop] += 1
        # Crops cannot give more than they hold: move the overflow to crops with room.
        for _ in range(n_keep):
            allocation = torch.minimum(allocation, sizes)
            deficit = n_keep - int(allocation.sum())
            if deficit <= 0:
                break
            has_room = allocation < sizes
            if not bool(has_room.any()):
                break
            eligible = weights.masked_fill(~has_room, float("-inf"))
            allocation[torch.topk(eligible, k=min(deficit, int(has_room.sum()))).indices] += 1

        kept = []
        for (lo, hi), count in zip(crops, allocation.tolist()):
            if count == 0:
                continue
            if count == hi - lo:
                kept.append(torch.arange(lo, hi, device=sample.device))
            else:
                kept.append(lo + torch.topk(attention[lo:hi], k=count).indices)
        picks_per_sample.append(torch.cat(kept))
    return torch.stack(picks_per_sample)


# Name -> restatement, for tests and benchmarks that compare every built-in selector with its reference.
# Each takes (VisualTokens, n_keep) like a registered selector.
REFERENCES = {
    "DivPrune": lambda tokens, n_keep: divprune_reference(tokens.features, n_keep),
    "HoloV": lambda tokens, n_keep: holov_reference(tokens.features, tokens.cls_attention, n_keep),
    "VisPruner": lambda tokens, n_keep: vispruner_reference(tokens.raw_features, tokens.cls_attention, n_keep),
}
