"""Token Merging (ToMe, Bolya et al., ICLR 2023) as pure, batched torch functions.

ToMe is not a selector: it merges tokens inside the vision encoder, between the attention and
the MLP of every layer, instead of choosing tokens from the encoder's output. This module holds
the parts that do not depend on any model; ``llava_patches.tome`` runs them inside LLaVA's CLIP.

Per layer, on a sequence of t tokens [B, t, C] (token 0 being CLS when ``protect_cls``):

1. ``bipartite_soft_matching(metric, r)``: tokens at even positions form set A, odd positions
   set B. Each A token is paired with its most similar B token (cosine similarity of the metric,
   in ToMe the attention keys averaged over heads); the r A tokens with the most similar partners
   are merged into them. CLS, at position 0, is in A and never merged, and since B holds only odd
   positions nothing is ever merged into it.
2. ``merge_weighted(x, size, matching)``: every merged token is the size-weighted mean of the
   tokens it absorbs, and sizes (how many original tokens a token stands for) add up.
3. ``merge_assignment`` / ``merge_source``: which original tokens each token now stands for.

Token order after a merge, as in the official code: the A tokens that stay (in their original
order when CLS is protected, so CLS stays first), then every B token in its original order.

``tome_schedule`` spreads the total reduction over the layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .registry import register_method

__all__ = [
    "Matching",
    "bipartite_soft_matching",
    "merge_weighted",
    "merge_source",
    "merge_assignment",
    "tome_schedule",
    "max_reduction",
]


@dataclass(frozen=True)
class Matching:
    """The outcome of one bipartite soft matching on a batch of t-token sequences.

    Indices are positions *within* set A (even positions) or set B (odd positions), as in the
    official code: A position i is sequence position 2i, B position j is sequence position 2j + 1.

    unmerged: [B, |A| - r] long, A tokens that stay (ascending when CLS is protected).
    src:      [B, r] long, A tokens merged away, most similar first.
    dst:      [B, r] long, the B token each ``src`` token is merged into.

    With r = 0 the matching is the identity: ``merge`` returns its input unchanged and in order
    (the official code skips merging; it does not reorder into A then B).
    """

    num_tokens: int
    unmerged: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor

    @property
    def r(self) -> int:
        return self.src.shape[-1]

    @property
    def is_identity(self) -> bool:
        return self.r == 0

    @property
    def num_out(self) -> int:
        """Tokens after the merge."""
        return self.num_tokens - self.r

    def merge(self, x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        """[B, t, C] -> [B, t - r, C]: kept A tokens then B tokens, each B token reduced (``mode``
        of torch.scatter_reduce: "mean", "sum", "amax", ...) with the A tokens merged into it,
        itself included."""
        if self.is_identity:
            return x
        self._check(x)
        a, b = x[:, ::2, :], x[:, 1::2, :]
        batch, _, channels = a.shape
        kept = a.gather(1, self.unmerged[..., None].expand(batch, self.unmerged.shape[1], channels))
        moved = a.gather(1, self.src[..., None].expand(batch, self.r, channels))
        b = b.scatter_reduce(1, self.dst[..., None].expand(batch, self.r, channels), moved, reduce=mode)
        return torch.cat([kept, b], dim=1)

    def token_map(self) -> torch.Tensor:
        """[B, t] long: the index, after the merge, of the token each token before it ends up in."""
        batch = self.src.shape[0]
        device = self.src.device
        if self.is_identity:
            return torch.arange(self.num_tokens, device=device).expand(batch, -1)
        n_kept = self.unmerged.shape[1]
        n_b = self.num_tokens // 2
        out = torch.empty(batch, self.num_tokens, dtype=torch.long, device=device)
        out[:, 1::2] = n_kept + torch.arange(n_b, device=device)
        out.scatter_(1, 2 * self.unmerged, torch.arange(n_kept, device=device).expand(batch, -1))
        out.scatter_(1, 2 * self.src, n_kept + self.dst)
        return out

    def unmerge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, t - r, C] -> [B, t, C]: every token before the merge gets the value of the token it
        ended up in (what the official ``unmerge`` computes)."""
        if self.is_identity:
            return x
        index = self.token_map()
        return x.gather(1, index[..., None].expand(*index.shape, x.shape[-1]))

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != self.num_tokens or x.shape[0] != self.src.shape[0]:
            raise ValueError(
                f"expected [B={self.src.shape[0]}, t={self.num_tokens}, C], got {tuple(x.shape)}"
            )


def _identity(metric: torch.Tensor) -> Matching:
    batch, t = metric.shape[0], metric.shape[1]
    empty = torch.empty(batch, 0, dtype=torch.long, device=metric.device)
    kept = torch.arange((t + 1) // 2, device=metric.device).expand(batch, -1)
    return Matching(num_tokens=t, unmerged=kept, src=empty, dst=empty)


def max_reduction(num_tokens: int, protect_cls: bool = True) -> int:
    """The most tokens one matching can remove from a t-token sequence: half the mergeable ones."""
    return max(num_tokens - int(protect_cls), 0) // 2


@torch.no_grad()
def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_cls: bool = True) -> Matching:
    """Match ``metric`` [B, t, D] (t tokens, CLS first when ``protect_cls``) and pick r merges.

    r is clipped to half the mergeable tokens (``max_reduction``), as the official code does.
    Scores are computed in ``metric``'s dtype, like the official code; each sample is matched on
    its own (batch rows never interact).
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, t, D], got shape {tuple(metric.shape)}")
    t = metric.shape[1]
    r = min(int(r), max_reduction(t, protect_cls))
    if r <= 0:
        return _identity(metric)

    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2, :], metric[:, 1::2, :]
    scores = a @ b.transpose(-1, -2)
    if protect_cls:
        # CLS (A position 0) gets the lowest possible best score, so it is always kept.
        scores[:, 0, :] = -math.inf
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :r]
    unmerged = order[:, r:]
    dst = best_b.gather(1, src)
    if protect_cls:
        # Kept tokens in their original order: CLS stays at index 0 and spatial order inside A
        # is preserved.
        unmerged = unmerged.sort(dim=-1).values
    return Matching(num_tokens=t, unmerged=unmerged, src=src, dst=dst)


def merge_weighted(
    x: torch.Tensor, size: Optional[torch.Tensor], matching: Matching
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge. x [B, t, C], size [B, t] (None: all ones).

    Returns (x [B, t - r, C] in x's dtype, size [B, t - r] float32). The weighted sums are taken in
    float32 for half-precision x (in fp16, x * size can overflow: a token standing for hundreds
    of patches times a CLIP outlier channel), otherwise in x's dtype, which for fp32 gives the
    official code's values bit for bit.
    """
    if size is None:
        size = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
    if matching.is_identity:
        return x, size.float()
    work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    weight = size.to(work)[..., None]
    total = matching.merge(weight, mode="sum")
    merged = matching.merge(x.to(work) * weight, mode="sum") / total
    return merged.to(x.dtype), total[..., 0].float()


def merge_source(source: Optional[torch.Tensor], matching: Matching) -> torch.Tensor:
    """Source tracking in the official code's form: source [B, t, N0], source[b, i, p] nonzero when
    token i stands for original token p (None: the identity, N0 = t). Returns [B, t - r, N0]."""
    if source is None:
        batch = matching.src.shape[0]
        eye = torch.eye(matching.num_tokens, device=matching.src.device)
        source = eye[None].expand(batch, -1, -1)
    return matching.merge(source, mode="amax")


def merge_assignment(assignment: Optional[torch.Tensor], matching: Matching) -> torch.Tensor:
    """Source tracking as indices: assignment [B, N0] long, the current token of each original
    token (None: the identity, N0 = t). Returns [B, N0] indexing the merged sequence. The same
    information as ``merge_source`` at N0 integers per sample instead of t x N0."""
    token_map = matching.token_map()
    if assignment is None:
        return token_map.clone()
    return token_map.gather(1, assignment)


def tome_schedule(num_tokens: int, n_vis: int, num_layers: int) -> List[int]:
    """Tokens to merge in each of ``num_layers`` layers, taking ``num_tokens`` mergeable tokens (CLS
    not counted) to exactly ``n_vis``.

    The schedule is ToMe's constant one: the paper's default (an int r in the official code means
    the same r in every layer) and what LLaVA ToMe baselines run (e.g. ModelTC/llmc's ToMe for
    LLaVA's CLIPEncoderLayer: one r for every layer). A constant r cannot land on an arbitrary
    n_vis, so: r = (num_tokens - n_vis) // num_layers per layer, the remainder one extra token in
    each of the first layers (most tokens there, so one more merge costs least). A layer never merges more than
    half of its mergeable tokens (a bipartite matching cannot); where the constant share would make
    a later layer exceed that, earlier layers merge more: each layer merges at least what the
    remaining layers could not reach by halving. Feasible iff num_tokens <= n_vis * 2**num_layers.

    LLaVA-1.5 (576 patches, 23 layers up to the select layer):
        64  -> 23 x 6, 22 x 17;  128 -> 20 x 11, 19 x 12;  192 -> 17 x 16, 16 x 7.
    """
    if num_layers < 0 or num_tokens < 0:
        raise ValueError(f"num_tokens and num_layers must be >= 0, got {num_tokens}, {num_layers}")
    if not 0 < n_vis <= num_tokens:
        raise ValueError(f"n_vis must be in [1, {num_tokens}], got {n_vis}")
    if num_tokens > n_vis * 2 ** num_layers:
        reachable = -(-num_tokens // 2 ** num_layers)
        raise ValueError(
            f"ToMe cannot take {num_tokens} tokens to {n_vis} in {num_layers} layers: each layer merges "
            f"at most half of its tokens, so at least {reachable} remain"
        )
    schedule: List[int] = []
    remaining_tokens = num_tokens
    for layer in range(num_layers):
        layers_left = num_layers - layer
        to_remove = remaining_tokens - n_vis
        share = -(-to_remove // layers_left)  # ceil: the remainder goes to the first layers
        needed = remaining_tokens - n_vis * 2 ** (layers_left - 1)
        r = min(max(share, needed), remaining_tokens // 2)
        schedule.append(r)
        remaining_tokens -= r
    assert remaining_tokens == n_vis, (schedule, num_tokens, n_vis)
    return schedule


# Where ToMe acts: the vision-encoder reduction of restore runs it (llava_patches.tome).
register_method("ToMe", acts="vision_encoder")
