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


@torch.no_grad()
def visionzip_reference(
    raw_features: torch.Tensor,
    cls_attention: torch.Tensor,
    keys: torch.Tensor,
    n_dominant: int,
    n_contextual: int,
    cls_feature: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """VisionZip (restated; not in the three above nor in REFERENCES: it is more than a selection),
    one sample, one remaining token and one group at a time.

    ``n_dominant`` counts the dominant patches (the CLS token, when ``cls_feature`` [B, C] is given,
    comes on top of them). Returns (dominant [B, n_dominant] ascending, sequence [B, n, C] =
    [cls, dominant patches, contextual tokens], groups [B, M], sizes [B, n_contextual]), where groups
    gives the contextual token of each non-dominant patch (ascending patch order) and sizes counts
    each group's tokens, its target included.

    The similarities are one matrix product per sample and the group sums one batched product (of
    one-hot matrices built here from the assignment), the shapes of the official products, so that
    their rounding is the same; the ranking, the split, the choice of targets and the assignment
    (first maximum on ties) are spelled out. Bit-equal to the batched code with one BLAS thread (the
    tests use one).
    """
    dominant_per_sample, sequences, groups_per_sample, sizes_per_sample = [], [], [], []
    pending = []  # per sample: what the loop decided, for the batched group sums
    for b in range(raw_features.shape[0]):
        features, attention, sample_keys = raw_features[b], cls_attention[b], keys[b]
        dtype, device = features.dtype, features.device
        n_tokens = features.shape[0]
        # The same single top-k call as the official code, so that a tie at the cut goes the same way.
        dominant = sorted(attention.topk(n_dominant).indices.tolist())
        dominant_set = set(dominant)
        remaining = [i for i in range(n_tokens) if i not in dominant_set]

        step = max(1, len(remaining) // n_contextual)
        targets = list(range(0, len(remaining), step))[:n_contextual]
        assert len(targets) == n_contextual
        target_set = set(targets)
        others = [p for p in range(len(remaining)) if p not in target_set]

        remaining_keys = sample_keys[remaining]
        unit = remaining_keys / remaining_keys.norm(dim=-1, keepdim=True)
        similarity = (unit[others] @ unit[targets].t()).tolist()  # exact: fp16/bf16/fp32 -> float
        members = [[] for _ in targets]
        group_of = [0] * len(remaining)
        for g, p in enumerate(targets):
            group_of[p] = g
        for row, p in enumerate(others):
            best = 0
            for g in range(1, n_contextual):
                if similarity[row][g] > similarity[row][best]:
                    best = g
            members[best].append(row)
            group_of[p] = best

        # Built token-major and used transposed, the layout of the official product: a BLAS call
        # on a transposed operand may sum in another order than one on a contiguous one.
        one_hot = torch.zeros(len(others), n_contextual, dtype=dtype, device=device)
        for g, rows in enumerate(members):
            one_hot[rows, g] = 1
        pending.append((b, dominant, remaining, targets, others, members, group_of, one_hot))

    # The group sums of all samples in one batched product, as the official code takes them: on some
    # CPUs a batched product rounds differently from one sample's, even with one BLAS thread.
    sums = torch.bmm(torch.stack([p[-1] for p in pending]).transpose(1, 2),
                     torch.stack([raw_features[b][remaining][others] for b, _, remaining, _, others, *_ in pending]))
    for (b, dominant, remaining, targets, others, members, group_of, _), group_sums in zip(pending, sums):
        features = raw_features[b]
        dtype, device = features.dtype, features.device
        contextual = []
        for g, p in enumerate(targets):
            # The divisor is a count held in the features' dtype (bf16 rounds counts above 256).
            count = torch.tensor(float(max(1, len(members[g]))), dtype=dtype, device=device)
            contextual.append(features[remaining[p]] + group_sums[g] / count)

        parts = ([cls_feature[b][None].to(dtype)] if cls_feature is not None else []) + [
            features[dominant],
            torch.stack(contextual),
        ]
        dominant_per_sample.append(torch.tensor(dominant, dtype=torch.long, device=device))
        sequences.append(torch.cat(parts))
        groups_per_sample.append(torch.tensor(group_of, dtype=torch.long, device=device))
        sizes_per_sample.append(torch.tensor([1 + len(m) for m in members], dtype=torch.long, device=device))
    return (
        torch.stack(dominant_per_sample),
        torch.stack(sequences),
        torch.stack(groups_per_sample),
        torch.stack(sizes_per_sample),
    )


# Name -> restatement, for tests and benchmarks that compare every built-in selector with its reference.
# Each takes (VisualTokens, n_keep) like a registered selector.
REFERENCES = {
    "DivPrune": lambda tokens, n_keep: divprune_reference(tokens.features, n_keep),
    "HoloV": lambda tokens, n_keep: holov_reference(tokens.features, tokens.cls_attention, n_keep),
    "VisPruner": lambda tokens, n_keep: vispruner_reference(tokens.raw_features, tokens.cls_attention, n_keep),
}
