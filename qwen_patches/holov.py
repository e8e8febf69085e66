"""HoloV's selection on Qwen2.5-VL: the registry's HoloV (tokenreduction/holov.py) with the crop count of
HoloV's own Qwen2.5-VL port (obananas/HoloV, qwen-model-HoloV/modeling_qwen2_5_vl.py).

The LLaVA code splits the 576 tokens into 16 crops. The Qwen port scales the crop count with the image and the
budget, max(1, int((1024 / 576) * N / n_keep)): 16 crops at N = 576, n_keep = 64, and 5 / 8 / 16 crops at
33.3 / 22.2 / 11.1 % of any N. Scores, allocation and the per-crop pick are the registry's HoloV helpers.
docs/qwen2_5_vl.md lists where this differs from the port: the signal is in raster order, a crop's surplus
goes to the other crops, and the image span is exact.
"""
from __future__ import annotations


import torch

from tokenreduction import holov as _holov
from tokenreduction.tokens import VisualTokens


def crop_count(n_tokens: int, n_keep: int) -> int:
    """The Qwen port's number of crops for N tokens and a budget of n_keep (its own float formula)."""
    return max(1, int(((1024 / 576) * n_tokens) / n_keep))


@torch.no_grad()
def qwen_holov(tokens: VisualTokens, n_keep: int) -> torch.Tensor:
    """Indices [B, n_keep] of the kept tokens, crop by crop (``reduce_visual_tokens(select=...)``)."""
    tokens.require("HoloV", "cls_attention")
    features, attention = tokens.features, tokens.cls_attention
    n_tokens = features.shape[1]
    groups = _holov._crop_groups(n_tokens, crop_count(n_tokens, n_keep))
    unit = features / (features.norm(dim=-1, keepdim=True) + _holov.EPS)
    scores = torch.cat([_holov._crop_scores(unit[:, lo:hi], attention[:, lo:hi], n, size)
                        for lo, hi, n, size in groups], dim=1)
    sizes = torch.cat([torch.full((n,), size, dtype=torch.long, device=features.device) for _, _, n, size in groups])
    allocation = _holov._allocate(scores, sizes, n_keep)
    return _holov._take_per_crop(attention, groups, allocation)
