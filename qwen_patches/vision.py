"""The vision encoder's importance signal for bases that rank tokens by attention (VisPruner, HoloV on Qwen2.5-VL).

Qwen2.5-VL's encoder has no CLS token. LightCompress's Qwen2.5-VL port of VisPruner
(llmc/compression/token_reduction/vispruner.py) ranks the visual tokens by the attention their patches
receive in the encoder's last block: the block's softmax weights, averaged over heads, summed over the
queries, averaged over the 4 patches of each 2 x 2 merge group (consecutive in the encoder's window order),
and put back in raster order, the order of the merged tokens. This computes that signal from the inputs of
the last block's attention, captured while the encoder runs as stock (its outputs are unchanged).
HoloV's Qwen port ranks by the same block's attention averaged over the queries instead of summed (the
mean is this divided by the image's patch count; qwen_patches/patch.py does that for HoloV).
"""
from __future__ import annotations

from typing import List, Tuple

import torch


def encode_with_received_attention(model, pixel_values: torch.Tensor,
                                   grid_thw: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(visual tokens of each image [N_k, D], as ``get_image_features``; received attention of each [N_k]).

    ``model`` is the Qwen2_5_VLModel. Attention is computed in float32 within the segments the last block
    attends over (the whole image for a full-attention block, as the last block of the released models).
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    visual = model.visual
    attn = visual.blocks[-1].attn
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["cu_seqlens"] = kwargs["cu_seqlens"]
        captured["position_embeddings"] = kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        images = model.get_image_features(pixel_values, grid_thw)
    finally:
        handle.remove()
    hidden = captured["hidden"]
    seq = hidden.shape[0]
    with torch.no_grad():
        q, k, _ = attn.qkv(hidden).reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = captured["position_embeddings"]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k = q.transpose(0, 1).float(), k.transpose(0, 1).float()  # [heads, seq, d]
        bounds = captured["cu_seqlens"].tolist()
        received = []
        for start, stop in zip(bounds[:-1], bounds[1:]):
            weights = torch.softmax(q[:, start:stop] @ k[:, start:stop].transpose(1, 2) * attn.scaling, dim=-1)
            received.append(weights.mean(dim=0).sum(dim=0))  # [stop - start]: what each patch receives
        received = torch.cat(received)
        unit = visual.spatial_merge_unit
        per_token = received.view(seq // unit, unit).mean(dim=-1)  # window order of the merged tokens
        window_index, _ = visual.get_window_index(grid_thw)
        per_token = per_token[torch.argsort(window_index)]  # raster order, as the merged tokens
    counts = [image.shape[0] for image in images]
    return list(images), list(torch.split(per_token, counts))
