"""FLOPs of an LLM prefill and the size of its KV cache, from the model's shape alone.

Two counts, side by side:

- ``fastv_prefill_flops``: the formula FastV introduced and VisionZip/DivPrune report,
  per layer ``4 n d^2 + 2 n^2 d + 2 n d m`` (n tokens, d hidden width, m FFN width). It assumes
  full-width K/V and a two-matrix FFN and counts a multiply-add as one operation in places,
  so it is a convention for comparing methods, not a count of arithmetic.
- ``exact_prefill_flops``: the matrix multiplications a LLaMA decoder layer performs, a
  multiply-add counted as 2 FLOPs: q/k/v/o projections at their real widths (grouped-query K/V
  included), attention scores Q K^T and the weighted sum P V over the full n x n matrix (what
  eager and SDPA math kernels compute; a causal flash kernel skips about half), and the three
  SwiGLU matmuls. Norms, RoPE, softmax, activations and masks (O(n d) or O(n^2) elementwise
  work) are not counted; the LM head is counted only when asked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch


@dataclass(frozen=True)
class LLMShape:
    """Widths of a LLaMA-style decoder."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_config(cls, config) -> "LLMShape":
        """From a transformers LlamaConfig (or LLaVA's LlavaConfig)."""
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
        )

    def with_layers(self, num_layers: int) -> "LLMShape":
        return LLMShape(num_layers, self.hidden_size, self.num_heads, self.num_kv_heads,
                        self.intermediate_size, self.vocab_size)


# LLaVA-1.5-7B's language model (Vicuna-7B v1.5).
LLAVA_7B = LLMShape(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                    intermediate_size=11008, vocab_size=32000)


def fastv_prefill_flops(n: int, d: int, m: int, num_layers: int) -> int:
    """FastV's prefill FLOPs: ``num_layers * (4 n d^2 + 2 n^2 d + 2 n d m)``."""
    return num_layers * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def exact_layer_flops(n: int, shape: LLMShape) -> Dict[str, int]:
    """Matmul FLOPs of one decoder layer on a prefill of ``n`` tokens, by part."""
    d, m = shape.hidden_size, shape.intermediate_size
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    return {
        "q_proj": 2 * n * d * q_width,
        "k_proj": 2 * n * d * kv_width,
        "v_proj": 2 * n * d * kv_width,
        "o_proj": 2 * n * q_width * d,
        "scores": 2 * n * n * q_width,  # Q K^T for every head
        "weighted_sum": 2 * n * n * q_width,  # P V for every head
        "ffn": 3 * 2 * n * d * m,  # gate, up, down
    }


def exact_prefill_flops(n: int, shape: LLMShape, *, lm_head_tokens: int = 0) -> int:
    """Matmul FLOPs of a prefill of ``n`` tokens through all layers.

    ``lm_head_tokens``: how many positions get logits (0: none counted; transformers 4.37 computes
    them for all ``n`` positions in a prefill, generation needs only the last one).
    """
    per_layer = sum(exact_layer_flops(n, shape).values())
    return shape.num_layers * per_layer + 2 * lm_head_tokens * shape.hidden_size * shape.vocab_size


def kv_cache_bytes(seq_len: int, shape: LLMShape, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of the K and V caches of every layer for ``seq_len`` tokens."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * seq_len * element * batch


def layered_prefill_flops(tokens_per_layer: Sequence[int], shape: LLMShape, *, lm_head_tokens: int = 0) -> Dict[str, int]:
    """Prefill FLOPs when layers see different numbers of tokens (a method cutting inside the LLM):
    FastV's formula and the exact matmul count, summed layer by layer (``len(tokens_per_layer)`` layers)."""
    d, m = shape.hidden_size, shape.intermediate_size
    one = shape.with_layers(1)
    return {
        "fastv": sum(fastv_prefill_flops(n, d, m, 1) for n in tokens_per_layer),
        "exact": sum(exact_prefill_flops(n, one) for n in tokens_per_layer)
        + 2 * lm_head_tokens * shape.hidden_size * shape.vocab_size,
    }


def layered_kv_cache_bytes(tokens_per_layer: Sequence[int], shape: LLMShape, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of the K and V caches when each layer caches its own sequence length."""
    one = shape.with_layers(1)
    return sum(kv_cache_bytes(n, one, dtype, batch) for n in tokens_per_layer)
