"""PyramidDrop (CVPR 2025): visual tokens cut in stages, each keeping a share ranked by the last
instruction token's attention at the cut layer.

The official code (Cooperx521/PyramidDrop) cuts after the layers of ``layer_list`` (its default
[8, 16, 24]) to ``int(N * ratio)`` tokens per image (ratios lambda, lambda^2, lambda^3; lambda = 0.5), scoring
with the cut layer's own queries and keys on its input (softmax in float32 cast to the model dtype, mean
over heads), keeps the top tokens in their original order, and re-indexes the position ids contiguously.

The authors never published the schedules of their 192 / 128 / 64-token rows (their issue tracker asks and
has no answer), and [8, 16, 24] cannot average fewer than N / 4 tokens per layer. For a budget n_vis we keep
PDrop's geometric pyramid and cut where the methods it is compared with at these budgets cut (layers 2, 6
and 15, SparseVLM's; FastV's first cut is layer 2 too), with lambda the largest value whose per-layer average
of visual tokens over the LLM's layers does not exceed n_vis. docs/inllm_methods.md lists the counts.
"""
from __future__ import annotations

from typing import List, Sequence

import torch

from .inllm import REFERENCE_DEPTH, InLLMMethod, Stage, StageView, fit_layers, register_llm_method

PDROP_LAYERS = (2, 6, 15)
OFFICIAL_LAYERS = (8, 16, 24)  # the official default, with ratios (0.5, 0.25, 0.125)


def pyramid_counts(num_patches: int, ratio: float, stages: int) -> List[int]:
    """``int(N * ratio^s)`` for s = 1..stages, as the official code rounds each stage's count."""
    return [int(num_patches * ratio ** s) for s in range(1, stages + 1)]


def average_tokens(num_patches: int, layers: Sequence[int], counts: Sequence[int], num_layers: int) -> float:
    """Visual tokens per layer averaged over the LLM's layers (the "average count" of multi-stage rows)."""
    bounds = [0, *layers, num_layers]
    per_stage = [num_patches, *counts]
    return sum(n * (bounds[i + 1] - bounds[i]) for i, n in enumerate(per_stage)) / num_layers


def pyramid_ratio(n_vis: int, num_patches: int, layers: Sequence[int], num_layers: int) -> float:
    """The largest lambda (to 2^-60) whose pyramid averages at most ``n_vis`` tokens per layer."""
    low, high = 0.0, 1.0
    if average_tokens(num_patches, layers, pyramid_counts(num_patches, high, len(layers)), num_layers) <= n_vis:
        return 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if average_tokens(num_patches, layers, pyramid_counts(num_patches, mid, len(layers)), num_layers) <= n_vis:
            low = mid
        else:
            high = mid
    return low


class PDrop(InLLMMethod):
    name = "PDrop"
    query_rows = "last"
    plain_positions = "reindexed"

    def __init__(self, layers: Sequence[int] = PDROP_LAYERS):
        self.layers = tuple(layers)

    def budgets(self, n_vis: int, num_patches: int) -> List[int]:
        """Tokens per image after each cut, for the LLaVA-1.5-7B depth the schedule is set for."""
        floor = average_tokens(num_patches, self.layers, [1] * len(self.layers), REFERENCE_DEPTH)
        if n_vis < floor:
            raise ValueError(f"PDrop's pyramid (cuts at layers {list(self.layers)}) averages at least {floor:.1f} "
                             f"visual tokens per layer; n_vis={n_vis} is below that")
        ratio = pyramid_ratio(n_vis, num_patches, self.layers, REFERENCE_DEPTH)
        return [max(1, c) for c in pyramid_counts(num_patches, ratio, len(self.layers))]

    def stages(self, n_vis: int, num_patches: int, num_layers: int) -> List[Stage]:
        layers = fit_layers(self.layers, num_layers)
        return [Stage(layer=layer, budget=count, score_layer=layer)
                for layer, count in zip(layers, self.budgets(n_vis, num_patches))]

    def scores(self, view: StageView) -> torch.Tensor:
        return view.visual_attention[-1]


register_llm_method(PDrop())
