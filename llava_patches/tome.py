"""ToMe inside LLaVA's CLIP tower, so that exactly ``n_vis`` patch tokens reach the select layer.

Every CLIP encoder layer up to the select layer (23 of 24 for LLaVA-1.5, select layer -2) merges
tokens between its attention and its MLP and uses proportional attention (log token size added
to the attention logits, over keys), as in ToMe. The per-layer reduction is
``tokenreduction.tome.tome_schedule`` (constant r, remainder in the first layers).

ToMe runs on the shared mechanism of ``llava_patches.encoder_reduce`` (instance-level class swap of the
layers, forward hooks on ``k_proj``/``v_proj`` handing the keys to the matching, per-forward state);
:class:`ToMeInEncoder` is ToMe's part of it. ``remove_tome`` restores the classes and drops the hooks,
giving stock behaviour back exactly. Library classes are never edited.

Entry points:
    encode_with_tome(vision_tower, images, n_vis) -> ToMeTokens   # patches for the call only
    apply_tome(vision_tower, n_vis) / remove_tome(vision_tower)      # every forward of the tower
                                                                     # (stock LLaVA included) merges

Token order of the output: the order ToMe leaves tokens in. After each layer's merge, the tokens
at even sequence positions that were not merged (CLS first, then in their previous order) come
first, followed by every token at an odd position (in its previous order). Over 23 layers this is
not spatial order; ``source`` says where each token came from.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from tokenreduction.tome import bipartite_soft_matching, merge_assignment, merge_weighted, tome_schedule

from .encoder_reduce import (EncodedTokens, EncoderMethod, EncoderRun, applied_method, apply_encoder_method,
                             check_encoder_budget, encode_in_encoder, remove_encoder_method)

__all__ = ["ToMeTokens", "ToMeRun", "ToMeInEncoder", "encode_with_tome", "apply_tome", "remove_tome",
           "is_tome_applied"]

# What encode_with_tome returns (see EncodedTokens; ToMe never drops a patch, so ``source`` has no -1) and
# the run state apply_tome returns.
ToMeTokens = EncodedTokens
ToMeRun = EncoderRun


class ToMeInEncoder(EncoderMethod):
    """ToMe between attention and MLP of every layer, and proportional attention."""

    name = "ToMe"
    captures = ("keys",)

    def check(self, num_patches: int, n_vis: int, num_layers: int) -> None:
        tome_schedule(num_patches, n_vis, num_layers)

    def start(self, run: EncoderRun, hidden_states: torch.Tensor) -> None:
        run.state["schedule"] = tome_schedule(hidden_states.shape[1] - 1, run.n_vis, run.num_layers)

    def attention_bias(self, run: EncoderRun, index: int, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        if run.size is None:
            return None  # no token merged yet: sizes all 1, nothing added (stock bits)
        # Proportional attention: a key standing for s patches counts s times in the softmax. CLIP adds
        # ``attention_mask`` to the logits, so the log sizes go in through it.
        batch, tokens, _ = hidden_states.shape
        log_size = run.size.log().to(hidden_states.dtype)[:, None, None, :]
        return log_size.expand(batch, 1, tokens, tokens)

    def after_attention(self, run: EncoderRun, index: int, hidden_states: torch.Tensor,
                        attention: Optional[torch.Tensor], captured: Dict[str, torch.Tensor]) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        keys = captured["keys"]
        heads = run.num_heads
        # The metric: keys averaged over heads, as in ToMe.
        metric = keys.view(batch, tokens, heads, keys.shape[-1] // heads).mean(dim=2)
        matching = bipartite_soft_matching(metric, run.state["schedule"][index], protect_cls=True)
        if index == run.attention_layer and run.cls_attention is not None:
            # that layer merges after its attention: a token gets the attention of all it absorbed (summed)
            run.cls_attention = matching.merge(run.cls_attention[..., None], mode="sum")[..., 0]
        if not matching.is_identity:
            hidden_states, run.size = merge_weighted(hidden_states, run.size, matching)
            run.assignment = merge_assignment(run.assignment, matching)
        return hidden_states


def is_tome_applied(vision_tower) -> bool:
    return isinstance(applied_method(vision_tower), ToMeInEncoder)


def apply_tome(vision_tower, n_vis: int) -> ToMeRun:
    """Patch the layers of LLaVA's ``CLIPVisionTower`` up to its select layer so that every forward
    merges down to ``n_vis`` patch tokens there; returns the shared run state. Calling it again on
    a patched tower only changes ``n_vis``. Undo with ``remove_tome``."""
    return apply_encoder_method(vision_tower, ToMeInEncoder(), n_vis)


def remove_tome(vision_tower):
    """Give the tower back its stock layers (classes, no hooks, no ToMe attributes)."""
    return remove_encoder_method(vision_tower)


@torch.no_grad()
def encode_with_tome(vision_tower, images: torch.Tensor, n_vis: int) -> ToMeTokens:
    """Run LLaVA's ``CLIPVisionTower`` on ``images`` [B, 3, H, W] with ToMe up to the select layer
    only (later layers are not run), ``n_vis`` patch tokens coming out. n_vis = N0 (576) gives the
    stock select-layer features exactly. Each image is merged on its own; the batch only batches.
    """
    return encode_in_encoder(vision_tower, images, ToMeInEncoder(), n_vis)


def check_tome_budget(model_path: str, n_vis: int) -> None:
    """Raise ValueError, before any weight is loaded, when ToMe cannot take a checkpoint's CLIP tower to
    ``n_vis`` tokens at its select layer (a bipartite merge at most halves a layer's tokens); see
    ``encoder_reduce.check_encoder_budget``."""
    check_encoder_budget(model_path, ToMeInEncoder(), n_vis)
