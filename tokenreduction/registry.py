"""Name -> selector registry. Adding a baseline is one new module with one decorated function."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch

from .tokens import VisualTokens

Selector = Callable[[VisualTokens, int], torch.Tensor]
_SELECTORS: Dict[str, Selector] = {}
_NAMES: Dict[str, str] = {}  # lower-case key -> registered spelling


def register_selector(name: str) -> Callable[[Selector], Selector]:
    """Decorator: ``@register_selector("MyMethod")`` on ``fn(tokens, n_keep) -> LongTensor [B, n_keep]``.

    The returned indices are into the N visual tokens, in the order the method feeds them to the LLM.
    The wrapper validates ``n_keep`` and the output, so a selector only implements its algorithm.
    """

    def decorator(fn: Selector) -> Selector:
        key = name.lower()
        if key in _SELECTORS and _SELECTORS[key].__wrapped__ is not fn:
            raise ValueError(f"a selector named {name!r} is already registered")

        def checked(tokens: VisualTokens, n_keep: int) -> torch.Tensor:
            if not isinstance(tokens, VisualTokens):
                raise TypeError(f"{name} expects a tokenreduction.VisualTokens, got {type(tokens).__name__}")
            N = tokens.num_tokens
            if isinstance(n_keep, bool) or not isinstance(n_keep, int) or not 1 <= n_keep <= N:
                raise ValueError(f"{name}: n_keep must be an integer in 1..{N} (the number of visual tokens), got {n_keep!r}")
            keep = fn(tokens, n_keep)
            if tuple(keep.shape) != (tokens.batch_size, n_keep):
                raise RuntimeError(f"{name} returned shape {tuple(keep.shape)}, expected {(tokens.batch_size, n_keep)}")
            keep = keep.long()
            if bool((keep < 0).any() | (keep >= N).any() | (keep.sort(dim=-1).values.diff(dim=-1) == 0).any()):
                raise RuntimeError(f"{name} must return {n_keep} distinct indices in 0..{N - 1} per sample")
            return keep

        checked.__wrapped__ = fn  # type: ignore[attr-defined]
        checked.__doc__ = fn.__doc__
        checked.__name__ = name
        _SELECTORS[key] = checked
        fn.selector_name = name  # type: ignore[attr-defined]
        _NAMES[key] = name
        return fn

    return decorator



def get_selector(name: str) -> Selector:
    """The selector registered under ``name`` (case-insensitive)."""
    try:
        return _SELECTORS[str(name).lower()]
    except KeyError:
        raise ValueError(
            f"unknown selector {name!r}; available: {', '.join(available_selectors())}"
        ) from None


def canonical_name(name: str) -> str:
    """The spelling a selector was registered with (``"holov"`` -> ``"HoloV"``)."""
    get_selector(name)
    return _NAMES[str(name).lower()]


def available_selectors() -> List[str]:
    return sorted(_NAMES.values(), key=str.lower)
