"""FlowCut (Tong et al., NeurIPS 2025) as pure, batched torch functions.

FlowCut is not a selector: it prunes patch tokens inside the vision encoder, in stages, so that
``n_vis`` patches (and CLS) reach LLaVA's select layer. ``llava_patches.encoder_reduce`` runs these
functions inside LLaVA's CLIP; with RESTORE it merges, at every stage, what FlowCut would drop.

What the official LLaVA-1.5 code does (github TungChintao/FlowCut, ``flowcut/``), restated:

* Budget. ``flowcut(model, target_num=n_vis)`` sets the encoder's target to n_vis + 1 tokens (CLS
  counted; LLaVA's ``patch`` feature then drops CLS), so n_vis is FlowCut's own parameter as it is.
* Layers. With H the number of CLIP layers LLaVA runs to reach its select layer (23 of 24 for
  select layer -2), the layer at index i has ``remaining = H - 2 - i`` (the official
  ``select_layer - idx - 1`` with ``select_layer = len(layers) - 2``). A layer prunes, after its
  MLP, when ``remaining`` is even and >= 0: for LLaVA-1.5 the layers 1, 3, ..., 21 (11 stages); the
  select layer (22) runs on the pruned tokens. Nothing happens once only n_vis patches are left.
* Score, at every layer while more than n_vis patches remain, on the patches t of that layer:
  ``a`` = CLS->patch attention averaged over heads (the CLS column itself left out), ``s`` = the
  softmax over all tokens of CLS's value dotted with every token's value (per head, unscaled),
  averaged over heads, ``v`` = the values averaged over heads; score = (a / sum a + s / sum s) x
  L1 norm of v. The running score is the first layer's score, then 0.5 x running + 0.5 x the
  layer's score; pruning gathers it with the tokens it keeps.
* Prune count at a stage, from the CLS attention a over the t patches: entropy ratio
  e = H(a / sum a) / log t, r = (t - n_vis) / sqrt(remaining) x (1 - e^2), over a batch the largest
  r, rounded half to even; the layer keeps max(t - r, n_vis) patches (at remaining = 0: n_vis).
  Kept: the top patches of the running score, put back in ascending sequence order.

One deviation: a CLS attention of exactly 0 (possible only by underflow) contributes 0 to the entropy
here; the official code would produce NaN there and fail.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from .registry import register_method

__all__ = [
    "flowcut_stages",
    "head_mean_values",
    "semantic_attention",
    "flowcut_scores",
    "accumulate_scores",
    "stage_prune_count",
    "stage_keep_count",
    "top_tokens",
]

RUNNING_WEIGHT = 0.5  # running score = 0.5 * running + 0.5 * this layer's score


def flowcut_stages(num_layers: int) -> Dict[int, int]:
    """{layer index: remaining} of the layers that prune, for ``num_layers`` CLIP layers run up to the
    select layer (H). LLaVA-1.5 (H = 23): {1: 20, 3: 18, ..., 21: 0}."""
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    return {index: num_layers - 2 - index for index in range(num_layers)
            if num_layers - 2 - index >= 0 and (num_layers - 2 - index) % 2 == 0}


def head_mean_values(values: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H * d] value projection -> [B, H, T, d] per head (contiguous, as CLIP's attention lays it out)."""
    batch, length, _ = values.shape
    return values.view(batch, length, num_heads, -1).transpose(1, 2).contiguous()


def semantic_attention(values_per_head: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] values -> [B, T]: per head, softmax over the T tokens of CLS's value dotted with each
    token's value (no scaling), then the mean over heads. Token 0 is CLS."""
    cls_value = values_per_head[:, :, :1]
    logits = cls_value @ values_per_head.transpose(-1, -2)  # [B, H, 1, T]
    return torch.softmax(logits, dim=-1)[:, :, 0].mean(dim=1)


def flowcut_scores(cls_attention: torch.Tensor, semantic: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One layer's FlowCut score of t patches: cls_attention [B, t] (CLS->patch, head mean), semantic
    [B, t] (:func:`semantic_attention` at the patches), values [B, t, d] (head mean) -> [B, t]."""
    relation = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
    semantic = semantic / semantic.sum(dim=-1, keepdim=True)
    return (relation + semantic) * torch.linalg.vector_norm(values, ord=1, dim=-1)


def accumulate_scores(running: Optional[torch.Tensor], scores: torch.Tensor) -> torch.Tensor:
    """The running score after a layer: the layer's score at the first one, then the equal-weight mix."""
    if running is None:
        return scores.clone()
    return RUNNING_WEIGHT * running + (1 - RUNNING_WEIGHT) * scores


def stage_prune_count(cls_attention: torch.Tensor, remaining: int, n_vis: int) -> int:
    """Patches a stage with ``remaining`` > 0 prunes (before the n_vis floor), from cls_attention [B, t].

    The share of (t - n_vis) taken now shrinks with the stages left (1 / sqrt(remaining)) and with how
    flat CLS's attention is (1 - e^2, e its entropy over the maximal log t). For a batch, the largest
    sample's count (one count keeps the batch rectangular, as in the official code)."""
    if remaining <= 0:
        raise ValueError(f"remaining must be > 0 (the last stage keeps n_vis), got {remaining}")
    t = cls_attention.shape[-1]
    share = cls_attention / cls_attention.sum(dim=-1, keepdim=True)
    terms = (share * torch.log(share)).masked_fill(share == 0, 0)
    entropy = -terms.sum(dim=-1)
    # log t as float32 on the CPU, the way the official code takes it
    max_entropy = torch.log(torch.tensor(t, dtype=torch.float32))
    ratio = entropy / max_entropy
    count = (t - n_vis) / remaining ** 0.5 * (1 - ratio ** 2)
    if count.shape[0] > 1:
        count = count.max(dim=0).values
    return int(count.round())


def stage_keep_count(cls_attention: torch.Tensor, remaining: int, n_vis: int) -> int:
    """Patches left after a stage (at least n_vis; exactly n_vis at the last one, remaining = 0)."""
    t = cls_attention.shape[-1]
    if remaining == 0:
        return min(n_vis, t)
    return max(t - stage_prune_count(cls_attention, remaining, n_vis), n_vis)


def top_tokens(running: torch.Tensor, n_keep: int) -> torch.Tensor:
    """[B, t] running scores -> [B, n_keep] the highest-scoring tokens, ascending (their sequence order)."""
    return torch.topk(running, n_keep, dim=1).indices.sort(dim=1).values


# Where FlowCut acts: the vision-encoder mechanism runs it (llava_patches.encoder_reduce). It prunes, so
# RESTORE's gamma and anchors apply at each of its stages.
register_method("FlowCut", acts="vision_encoder", restore_per_stage=True)
