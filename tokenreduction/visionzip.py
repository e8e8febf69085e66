"""VisionZip (Yang et al., CVPR 2025), vectorized over the batch.

VisionZip ("VisionZip: Longer is Better but Not Necessary in Vision Language Models") reduces the
visual tokens of LLaVA-1.5 in the vision tower, before the mm_projector:

* dominant tokens: the CLS token plus the patches with the highest CLS attention of the select
  layer (the attention summed over heads); they keep their patch order, the CLS token first;
* contextual tokens: the other patches are merged. Evenly spaced ones among them (in patch order)
  are targets; every other one joins the target whose key is most similar (cosine of the select
  layer's keys, averaged over heads); a contextual token is its target's feature plus the mean of
  the features that joined it.

The LLM sees [CLS, dominant patches (ascending), contextual tokens (target order)], each the
projection of a raw select-layer feature (a merged one: the projection of the merged raw feature).

Every function here works in the dtype of its inputs with the same tensor operations as the
official code (one-hot matrix products for the sums, first maximum for ties), so equal inputs give
bit-equal outputs on the same device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

from .registry import register_plain_reduction, register_selector
from .tokens import OwnReduction, VisualTokens

# The official LLaVA-1.5 settings are 54 + 10, 108 + 20 and 162 + 30 tokens (dominant + contextual,
# the CLS token counted among the dominant ones): 10 of every 64 tokens are contextual.
CONTEXTUAL_PER_64 = 10


def visionzip_split(n_vis: int) -> Tuple[int, int]:
    """(dominant, contextual) token counts for a budget of ``n_vis`` tokens, dominant + contextual = n_vis.

    The dominant count includes the CLS token, as in the official settings. 64, 128 and 192 give the
    official (54, 10), (108, 20) and (162, 30); any other budget keeps their ratio: contextual =
    n_vis * 10 / 64 rounded half up, then kept in 1..n_vis - 1 so that both parts are non-empty
    (n_vis = 1 gives (1, 0)).
    """
    if isinstance(n_vis, bool) or not isinstance(n_vis, int) or n_vis < 1:
        raise ValueError(f"n_vis must be a positive integer, got {n_vis!r}")
    if n_vis == 1:
        return 1, 0
    contextual = (n_vis * CONTEXTUAL_PER_64 + 32) // 64
    contextual = min(max(contextual, 1), n_vis - 1)
    return n_vis - contextual, contextual


def visionzip_dominant(cls_attention: torch.Tensor, n_dominant: int) -> torch.Tensor:
    """Indices [B, n_dominant] of the patches with the highest CLS attention [B, N], ascending.

    The official code ranks the attention summed over heads; the head mean used here is the same
    ranking (a positive scale). One top-k call, as there, so that ties at the cut are resolved
    alike; the ascending order is the order in which the official masked selection feeds them.
    """
    return cls_attention.topk(n_dominant, dim=1).indices.sort(dim=1).values


def visionzip_remaining(dominant: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Indices [B, n_tokens - n_dominant] of the patches that are not dominant, ascending."""
    batch_size = dominant.shape[0]
    mask = torch.ones(batch_size, n_tokens, dtype=torch.bool, device=dominant.device)
    mask.scatter_(1, dominant, False)
    # nonzero walks the mask row by row, so every row comes out ascending and equally long.
    return mask.nonzero()[:, 1].view(batch_size, -1)


def visionzip_targets(n_remaining: int, n_contextual: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Positions [n_contextual] of the targets among the remaining tokens: every (M // n)-th, from 0.

    The same for every sample, since every sample has the same number of remaining tokens.
    """
    if not 1 <= n_contextual <= n_remaining:
        raise ValueError(
            f"VisionZip needs 1 <= n_contextual <= the number of remaining tokens ({n_remaining}), got {n_contextual}"
        )
    step = max(1, n_remaining // n_contextual)
    return torch.arange(0, n_remaining, step, device=device)[:n_contextual]


class VisionZipContextual(NamedTuple):
    """The contextual tokens of a batch.

    tokens:  [B, n_contextual, C] merged features, in target order, in the features' dtype.
    groups:  [B, M] long, the contextual token (0..n_contextual - 1) each remaining token went into;
             a target is in its own group.
    sizes:   [B, n_contextual] long, tokens per group, the target included (the official divisor is
             sizes - 1, at least 1).
    targets: [B, n_contextual] long, patch indices of the targets (ascending).
    """

    tokens: torch.Tensor
    groups: torch.Tensor
    sizes: torch.Tensor
    targets: torch.Tensor


@torch.no_grad()
def visionzip_contextual(
    keys: torch.Tensor, features: torch.Tensor, remaining: torch.Tensor, n_contextual: int
) -> VisionZipContextual:
    """VisionZip's contextual tokens from the non-dominant patches.

    keys:      [B, N, Ck] the select layer's keys of the N patches, averaged over heads.
    features:  [B, N, C]  the features to merge (VisionZip: the raw select-layer features).
    remaining: [B, M]     indices of the non-dominant patches, ascending.

    Targets are every (M // n_contextual)-th remaining token; each other remaining token joins the
    target with the highest cosine similarity of keys (the first one on ties, like argmax), and a
    contextual token is target + (sum of the joined features) / max(1, number joined). Similarities
    are computed in the keys' dtype, sums and means in the features' dtype.
    """
    batch_size, n_tokens, _ = features.shape
    if keys.dim() != 3 or tuple(keys.shape[:2]) != (batch_size, n_tokens):
        raise ValueError(f"keys must be [B, N, Ck] = [{batch_size}, {n_tokens}, Ck], got {tuple(keys.shape)}")
    if remaining.dim() != 2 or remaining.shape[0] != batch_size:
        raise ValueError(f"remaining must be [B, M] with B={batch_size}, got {tuple(remaining.shape)}")
    device = features.device
    n_remaining = remaining.shape[1]
    if n_contextual == 0:
        # No contextual tokens (a budget of one token): nothing is merged, no token has a group.
        empty = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return VisionZipContextual(
            features.new_zeros(batch_size, 0, features.shape[-1]),
            torch.full((batch_size, n_remaining), -1, dtype=torch.long, device=device),
            empty,
            empty,
        )
    target_positions = visionzip_targets(n_remaining, n_contextual, device)
    is_target = torch.zeros(n_remaining, dtype=torch.bool, device=device)
    is_target[target_positions] = True
    other_positions = (~is_target).nonzero()[:, 0]

    index = remaining[..., None]
    remaining_keys = keys.gather(1, index.expand(-1, -1, keys.shape[-1]))
    remaining_features = features.gather(1, index.expand(-1, -1, features.shape[-1]))
    unit = remaining_keys / remaining_keys.norm(dim=-1, keepdim=True)

    similarity = torch.bmm(unit[:, other_positions], unit[:, target_positions].transpose(1, 2))
    assignment = similarity.argmax(dim=2)  # [B, M - n_contextual]
    # Sums as the product with a one-hot matrix in the features' dtype, and counts as the sum of
    # its columns in that dtype, as the official code does, so that the rounding is the same.
    one_hot = torch.zeros(batch_size, other_positions.numel(), n_contextual, dtype=features.dtype, device=device)
    one_hot.scatter_(2, assignment[..., None], 1)
    counts = one_hot.sum(dim=1).clamp(min=1)[..., None]
    merged = torch.bmm(one_hot.transpose(1, 2), remaining_features[:, other_positions]) / counts
    contextual = remaining_features[:, target_positions] + merged

    groups = torch.empty(batch_size, n_remaining, dtype=torch.long, device=device)
    groups[:, target_positions] = torch.arange(n_contextual, device=device)
    groups[:, other_positions] = assignment
    sizes = torch.ones(batch_size, n_contextual, dtype=torch.long, device=device)
    sizes.scatter_add_(1, assignment, torch.ones_like(assignment))
    return VisionZipContextual(contextual, groups, sizes, remaining[:, target_positions])


@dataclass
class VisionZipReduction:
    """What plain VisionZip feeds the LLM for a batch, before the mm_projector.

    cls:        [B, 1, C] the CLS token's raw feature, or None when the CLS token is not kept.
    dominant:   [B, n_dominant] long, patch indices of the dominant patches, ascending.
    contextual: [B, n_contextual, C] merged raw features (VisionZipContextual.tokens).
    remaining:  [B, M] long, the other patch indices, ascending; M = N - n_dominant.
    groups, sizes, targets: as in VisionZipContextual (groups index the contextual tokens).
    raw_sequence: [B, n_vis, C] = [cls, raw_features[dominant], contextual], the LLM's order, raw
                  (the caller applies the mm_projector, as the official code does after merging).
    """

    cls: Optional[torch.Tensor]
    dominant: torch.Tensor
    contextual: torch.Tensor
    remaining: torch.Tensor
    groups: torch.Tensor
    sizes: torch.Tensor
    targets: torch.Tensor
    raw_sequence: torch.Tensor


@torch.no_grad()
def visionzip_reduce(tokens: VisualTokens, n_vis: int, *, keep_cls: bool = True) -> VisionZipReduction:
    """Plain VisionZip with a budget of ``n_vis`` tokens, split by ``visionzip_split``.

    Works on the raw select-layer features (``tokens.raw_features``), like the official code, which
    merges before the mm_projector; project ``raw_sequence`` to get the LLM's visual tokens.

    With ``keep_cls`` (the official behaviour) the CLS token is the first token and one of the
    dominant ones (so n_dominant - 1 patches are dominant); it needs ``tokens.cls_raw_feature``.
    Without it, n_dominant patches are dominant and the sequence has no CLS token.
    """
    needed = ["raw_features", "cls_attention", "keys"] + (["cls_raw_feature"] if keep_cls else [])
    tokens.require("VisionZip", *needed)
    raw = tokens.raw_features
    n_tokens = tokens.num_tokens
    n_dominant, n_contextual = visionzip_split(n_vis)
    n_patches = n_dominant - 1 if keep_cls else n_dominant
    if n_patches + n_contextual > n_tokens:
        raise ValueError(f"VisionZip: n_vis={n_vis} leaves too few of the {n_tokens} visual tokens to merge")
    dominant = visionzip_dominant(tokens.cls_attention, n_patches)
    remaining = visionzip_remaining(dominant, n_tokens)
    contextual = visionzip_contextual(tokens.keys, raw, remaining, n_contextual)
    cls = tokens.cls_raw_feature[:, None].to(raw.dtype) if keep_cls else None
    kept = raw.gather(1, dominant[..., None].expand(-1, -1, raw.shape[-1]))
    parts = ([cls] if cls is not None else []) + [kept, contextual.tokens]
    return VisionZipReduction(
        cls=cls,
        dominant=dominant,
        contextual=contextual.tokens,
        remaining=remaining,
        groups=contextual.groups,
        sizes=contextual.sizes,
        targets=contextual.targets,
        raw_sequence=torch.cat(parts, dim=1),
    )


@register_selector("VisionZip", budget_scope="per_view")  # its tower selects on every crop
@torch.no_grad()
def visionzip(tokens: VisualTokens, n_keep: int) -> torch.Tensor:
    """VisionZip's dominant tokens (Yang et al., CVPR 2025): the ``n_keep`` patches with the highest
    CLS attention, ascending (the order VisionZip feeds them to the LLM).

    Only the selection: the CLS token and the contextual tokens of the plain method are not indices
    into the patches; ``visionzip_reduce`` builds the whole plain VisionZip sequence.
    """
    tokens.require("VisionZip", "cls_attention")
    return visionzip_dominant(tokens.cls_attention, n_keep)


@register_plain_reduction("VisionZip", needs=("keys", "cls_raw_feature"))
def visionzip_plain(tokens: VisualTokens, n_vis: int) -> OwnReduction:
    """The plain VisionZip row as the LLM gets it: [CLS, dominant patches, contextual tokens], raw.

    The CLS token stands for no patch: it takes position 0 and size 1 (re-indexed positions make both
    informative only); a contextual token's position is its target's patch.
    """
    out = visionzip_reduce(tokens, n_vis)
    B, n_dominant = out.dominant.shape
    device = out.dominant.device
    first = 1 if out.cls is not None else 0
    cls_position = torch.zeros(B, first, dtype=torch.long, device=device)
    positions = torch.cat([cls_position, out.dominant, out.targets], dim=1)
    sizes = torch.cat([torch.ones(B, first + n_dominant, device=device), out.sizes.float()], dim=1)
    source = torch.full((B, tokens.num_tokens), -1, dtype=torch.long, device=device)
    source.scatter_(1, out.dominant, first + torch.arange(n_dominant, device=device).expand(B, -1))
    # with no contextual token (n_vis = 1) the remaining patches are dropped (group -1)
    source.scatter_(1, out.remaining, (first + n_dominant + out.groups).masked_fill(out.groups < 0, -1))
    return OwnReduction(features=out.raw_sequence, space="raw", positions=positions, sizes=sizes, source=source)
