"""Calibrated attention: the additive pre-softmax bias RESTORE puts on every allowed query/key pair.

    bias[i, j] = log(size_j) + log(c - rho(p_i - p_j))     (prefill; c = 2)
    bias[i, j] = log(size_j)                              (decoding)

``rho(d)`` is the mean over the RoPE frequencies of cos(d * theta_k): how much RoPE itself already
decays attention at distance d. Merged tokens stand for ``size_j`` patches, so they get the attention
mass of all of them.
"""
from __future__ import annotations

from typing import Tuple

import torch


def rope_decay(distances: torch.Tensor, head_dim: int = 128, rope_base: float = 10000.0) -> torch.Tensor:
    """rho(d) = mean_k cos(d * base^(-2k/head_dim)) for integer distances, computed in float32."""
    inv_freq = 1.0 / (rope_base ** (torch.arange(0, head_dim, 2, device=distances.device).float() / head_dim))
    return torch.cos(torch.outer(distances.float().flatten(), inv_freq)).mean(dim=-1).view(distances.shape)


def distance_bias(
    positions: torch.Tensor, dtype: torch.dtype, head_dim: int = 128, rope_base: float = 10000.0,
    max_distance: int | None = None, c: float = 2.0,
) -> torch.Tensor:
    """log(c - rho(p_i - p_j)) for positions [B, L] -> [B, L, L] in ``dtype`` (c = 2 in the paper).

    Only pairs with p_i >= p_j are meaningful (the causal ones); others are clamped to distance 0.
    rho is looked up in a table over the distances that occur, so memory stays O(L^2), not O(L^2 * head_dim).
    The subtraction and log run in ``dtype``, as the official implementation does. ``max_distance``
    (an upper bound of the distances, e.g. the largest position) saves reading it from the device.
    """
    distances = (positions.unsqueeze(-1) - positions.unsqueeze(-2)).clamp_(min=0)
    if max_distance is None:
        max_distance = int(distances.max())
    table = rope_decay(torch.arange(max_distance + 1, device=positions.device), head_dim, rope_base)
    return torch.log(c - table.to(dtype)[distances])


def prefill_bias(
    positions: torch.Tensor,
    log_sizes: torch.Tensor,
    key_valid: torch.Tensor,
    dtype: torch.dtype,
    head_dim: int = 128,
    rope_base: float = 10000.0,
    dist: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive attention mask [B, 1, L, L] for a prefill of L tokens.

    positions [B, L], log_sizes [B, L] (float32), key_valid [B, L] bool (False on padding).
    Disallowed pairs (future keys, padding) get the dtype's minimum; every query keeps at least its
    own key so that padded rows stay finite. ``dist`` may pass a precomputed :func:`distance_bias`.
    """
    B, L = positions.shape
    if dist is None:
        dist = distance_bias(positions, dtype, head_dim, rope_base)
    causal = torch.ones(L, L, dtype=torch.bool, device=positions.device).tril()
    allowed = (causal & key_valid.unsqueeze(1)) | torch.eye(L, dtype=torch.bool, device=positions.device)
    bias = log_sizes.unsqueeze(1) + dist.float()
    bias = bias.masked_fill(~allowed, torch.finfo(torch.float32).min)
    return bias.to(dtype).clamp(min=torch.finfo(dtype).min).unsqueeze(1)


def decode_bias(log_sizes: torch.Tensor, key_valid: torch.Tensor, dtype: torch.dtype, q_len: int = 1) -> torch.Tensor:
    """Additive attention mask [B, 1, q_len, K] for ``q_len`` new tokens over K cached + new keys.

    log_sizes [B, K] float32 (prefill sizes, 0 for generated tokens), key_valid [B, K] bool.
    No distance term: in decoding the official implementation calibrates by size only.
    """
    K = log_sizes.shape[1]
    keys = torch.arange(K, device=log_sizes.device)
    causal = keys.unsqueeze(0) <= (keys[K - q_len:]).unsqueeze(1)  # [q_len, K]
    allowed = key_valid.unsqueeze(1) & causal
    bias = log_sizes.unsqueeze(1).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return bias.to(dtype).clamp(min=torch.finfo(dtype).min).unsqueeze(1)


def layer_log_sizes(sizes: torch.Tensor, is_visual: torch.Tensor, num_patches: int, n_vis: int,
                    uniform_first_layer: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """log token sizes (first decoder layer, later layers) for tokens [B, L].

    With ``uniform_first_layer`` the first layer sees every visual token as ``num_patches / n_vis``
    patches (the official choice, closer to the full model's attention there); later layers see the
    real group sizes. Without merging every size is 1, and so is every layer's.
    """
    real = sizes.log()
    if not uniform_first_layer:
        return real, real
    uniform = torch.full_like(sizes, num_patches / n_vis).log() * is_visual
    return uniform, real


def calibrated_prefill_masks(
    positions: torch.Tensor, sizes: torch.Tensor, is_visual: torch.Tensor, valid: torch.Tensor,
    num_patches: int, n_vis: int, dtype: torch.dtype, head_dim: int = 128, rope_base: float = 10000.0,
    max_position: int | None = None, use_distance: bool = True, c: float = 2.0, uniform_first_layer: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The additive masks [B, 1, L, L] of a RESTORE prefill: (first decoder layer, later layers).

    ``use_distance=False`` is the size-only calibration (log s); ``c`` the constant of log(c - D).
    """
    if use_distance:
        dist = distance_bias(positions, dtype, head_dim, rope_base, max_distance=max_position, c=c)
        # A prompt without an image in a batch with images runs as stock LLaVA would run it alone.
        dist = dist.masked_fill(~is_visual.any(dim=-1)[:, None, None], 0.0)
    else:
        L = positions.shape[1]
        dist = torch.zeros(positions.shape[0], L, L, dtype=dtype, device=positions.device)
    first, later = layer_log_sizes(sizes, is_visual, num_patches, n_vis, uniform_first_layer)
    return prefill_bias(positions, first, valid, dtype, dist=dist), prefill_bias(positions, later, valid, dtype, dist=dist)


def calibrated_decode_masks(
    sizes: torch.Tensor, is_visual: torch.Tensor, key_valid: torch.Tensor,
    num_patches: int, n_vis: int, dtype: torch.dtype, q_len: int = 1, uniform_first_layer: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The additive masks [B, 1, q_len, K] of a decoding step: prompt sizes [B, L] then size-1 new keys."""
    first, later = layer_log_sizes(sizes, is_visual, num_patches, n_vis, uniform_first_layer)
    new_keys = sizes.new_zeros(sizes.shape[0], key_valid.shape[1] - sizes.shape[1])
    return tuple(decode_bias(torch.cat([s, new_keys], dim=1), key_valid, dtype, q_len=q_len) for s in (first, later))
