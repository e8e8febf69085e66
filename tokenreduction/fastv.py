"""FastV (ECCV 2024): after decoder layer K, keep the visual tokens the last prompt token attends to most.

The official code (pkunlp-icler/FastV, its in-place variant) scores with the attention weights layer K - 1
produced (softmax in float32 cast back to the model dtype, then the mean over heads), takes the last
token's row over the image, keeps the top R image tokens in their original order and gives every kept
token its original position id. The paper's rows use K = 2 and R = n_vis.
"""
from __future__ import annotations

from typing import List

import torch

from .inllm import InLLMMethod, Stage, StageView, fit_layers, register_llm_method

FASTV_LAYER = 2  # K: the first layer that sees the reduced tokens (FastV's default and the paper's setting)


class FastV(InLLMMethod):
    name = "FastV"
    query_rows = "last"
    plain_positions = "retained"

    def __init__(self, layer: int = FASTV_LAYER):
        self.layer = layer

    def stages(self, n_vis: int, num_patches: int, num_layers: int) -> List[Stage]:
        (layer,) = fit_layers([self.layer], num_layers)
        return [Stage(layer=layer, budget=n_vis, score_layer=layer - 1)]

    def scores(self, view: StageView) -> torch.Tensor:
        return view.visual_attention[-1]


register_llm_method(FastV())
