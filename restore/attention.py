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


# ---- M-RoPE (Qwen2-VL / Qwen2.5-VL): positions with three axes --------------------------------------
#
# M-RoPE splits the head_dim / 2 rotary frequencies theta_j = base^(-2j / head_dim) into consecutive
# sections, one per axis (temporal, height, width: ``mrope_section``, e.g. [16, 24, 24] for head dim 128);
# frequency j rotates by the position on its section's axis. RoPE's decay between two tokens whose
# positions differ by (dt, dh, dw) is then (Appendix A of the paper)
#     D = sum_g w_g * D_g(delta_g),   D_g(d) = mean over the frequencies j of section g of cos(d * theta_j),
#     w_g = 2 d_g / d_h               (d_g = mrope_section[g]: the share of the head's dimensions on axis g)
# which is the mean of cos(delta_g(j) * theta_j) over all head_dim / 2 frequencies.


def _mrope_frequencies(mrope_section, head_dim: int, rope_base: float, device=None):
    """The rotary frequencies [head_dim / 2] in float32 and the section (axis) of each, as a list of slices."""
    sections = [int(s) for s in mrope_section]
    if 2 * sum(sections) != head_dim:
        raise ValueError(f"mrope_section {list(sections)} must cover head_dim / 2 = {head_dim // 2} frequencies, "
                         f"it covers {sum(sections)}")
    inv_freq = 1.0 / (rope_base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    bounds, start = [], 0
    for size in sections:
        bounds.append(slice(start, start + size))
        start += size
    return inv_freq, bounds


def mrope_axis_decay(distances: torch.Tensor, axis: int, mrope_section, head_dim: int = 128,
                     rope_base: float = 1000000.0) -> torch.Tensor:
    """D_g(d): the mean over the frequencies of axis ``axis`` of cos(d * theta_j), float32, distances' shape."""
    inv_freq, bounds = _mrope_frequencies(mrope_section, head_dim, rope_base, distances.device)
    freqs = inv_freq[bounds[axis]]
    return torch.cos(torch.outer(distances.float().flatten(), freqs)).mean(dim=-1).view(distances.shape)


def mrope_axis_weights(mrope_section, head_dim: int = 128):
    """w_g = 2 d_g / d_h for each axis (they add up to 1)."""
    _mrope_frequencies(mrope_section, head_dim, 1.0)  # validates the sections
    return [2.0 * int(s) / head_dim for s in mrope_section]


def mrope_decay(deltas: torch.Tensor, mrope_section, head_dim: int = 128, rope_base: float = 1000000.0) -> torch.Tensor:
    """D(delta) = sum_g w_g D_g(delta_g) for position differences ``deltas`` [..., 3] (t, h, w) -> [...] float32."""
    if deltas.shape[-1] != len(mrope_section):
        raise ValueError(f"deltas need one entry per M-RoPE axis ({len(mrope_section)}), got shape {tuple(deltas.shape)}")
    weights = mrope_axis_weights(mrope_section, head_dim)
    total = torch.zeros(deltas.shape[:-1], dtype=torch.float32, device=deltas.device)
    for axis, weight in enumerate(weights):
        total = total + weight * mrope_axis_decay(deltas[..., axis], axis, mrope_section, head_dim, rope_base)
    return total


def mrope_distance_bias(
    positions: torch.Tensor, dtype: torch.dtype, mrope_section, head_dim: int = 128,
    rope_base: float = 1000000.0, c: float = 2.0,
) -> torch.Tensor:
    """log(c - D(p_i - p_j)) for M-RoPE positions [3, B, L] (the layout of Qwen2.5-VL's position_ids) -> [B, L, L].

    Each axis's decay is looked up in a table over the distances |delta_g| that occur (cos is even, so the
    sign of a per-axis difference does not matter: a later token may sit on an earlier row), so memory stays
    O(L^2) per axis. As :func:`distance_bias`, the subtraction and log run in ``dtype``; every pair is
    filled, the causal mask decides which are used.
    """
    if positions.dim() != 3 or positions.shape[0] != len(mrope_section):
        raise ValueError(f"positions must be [{len(mrope_section)}, B, L], got shape {tuple(positions.shape)}")
    weights = mrope_axis_weights(mrope_section, head_dim)
    decay = None
    for axis, weight in enumerate(weights):
        p = positions[axis]
        distances = (p.unsqueeze(-1) - p.unsqueeze(-2)).abs()
        table = mrope_axis_decay(torch.arange(int(distances.max()) + 1, device=p.device), axis, mrope_section,
                                 head_dim, rope_base)
        term = weight * table[distances]
        decay = term if decay is None else decay + term
    return torch.log(c - decay.to(dtype))
