"""Run LLaVA's CLIP tower up to the select layer and return that layer's CLS->patch attention too.

Stock LLaVA asks CLIP for every layer's hidden states and runs layers it never uses; the official
RESTORE code also asks for every layer's attention maps. Here the encoder stops at the select layer,
and only the layer whose attention is wanted is called with ``output_attentions=True``.
"""
from __future__ import annotations

from typing import Tuple

import torch

import tokenreduction as tr


def _layer_indices(select_layer: int, num_layers: int) -> Tuple[int, int]:
    """(hidden-state index, attention-layer index) that LLaVA's ``select_layer`` picks.

    ``hidden_states`` has num_layers + 1 entries (the embeddings first), ``attentions`` num_layers;
    both are indexed with the same ``select_layer`` (for -2: the output of, and the attention inside,
    the second-to-last layer).
    """
    hidden_index = select_layer % (num_layers + 1)
    attention_index = select_layer % num_layers
    return hidden_index, attention_index


@torch.no_grad()
def encode_with_cls_attention(vision_tower, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Patch features [B, N, C] of the select layer and head-averaged CLS->patch attention [B, N].

    ``vision_tower`` is LLaVA's ``CLIPVisionTower``. Features come back in ``images.dtype`` like
    stock LLaVA; the attention is averaged over heads in that dtype and returned as float32.
    """
    if getattr(vision_tower, "select_feature", "patch") != "patch":
        raise NotImplementedError("token reduction needs mm_vision_select_feature='patch'")
    clip = vision_tower.vision_tower.vision_model
    layers = clip.encoder.layers
    hidden_index, attention_index = _layer_indices(vision_tower.select_layer, len(layers))

    hidden = clip.embeddings(images.to(device=vision_tower.device, dtype=vision_tower.dtype))
    hidden = clip.pre_layrnorm(hidden)
    selected = hidden if hidden_index == 0 else None
    cls_attention = None
    for index in range(max(hidden_index, attention_index + 1)):
        wants_attention = index == attention_index
        outputs = layers[index](hidden, None, None, output_attentions=wants_attention)
        hidden = outputs[0]
        if wants_attention:
            cls_attention = outputs[1][:, :, 0, 1:]
        if index + 1 == hidden_index:
            selected = hidden
    features = selected[:, 1:].to(images.dtype)
    cls_attention = cls_attention.to(images.dtype).mean(dim=1).float()
    return features, cls_attention


def encode_visual_tokens(model, images: torch.Tensor) -> tr.VisualTokens:
    """What every selector sees for ``images`` [I, 3, H, W] on a LLaVA model: projected features,
    the select layer's features and its CLS attention."""
    llm = model.get_model()
    raw, cls_attention = encode_with_cls_attention(llm.get_vision_tower(), images)
    return tr.VisualTokens(features=llm.mm_projector(raw), raw_features=raw, cls_attention=cls_attention)
