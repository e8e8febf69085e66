"""Visual token selectors: which visual tokens a base reduction method keeps.

Pure torch, no llava import.

    import tokenreduction as tr
    keep = tr.get_selector("HoloV")(tr.VisualTokens(features=F, cls_attention=A), 64)
"""
from .registry import available_selectors, canonical_name, get_selector, register_selector
from .tokens import VisualTokens

# Built-in methods register themselves on import.
from . import divprune, holov, vispruner  # noqa: E402,F401

__all__ = ["VisualTokens", "available_selectors", "canonical_name", "get_selector", "register_selector"]
