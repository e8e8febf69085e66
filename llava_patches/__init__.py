"""The few places where stock LLaVA-1.5 must change for token reduction.

vision.py    the select layer's features and CLS attention, without every layer's attention maps
assembly.py  one multimodal input assembly for every method, with per-token positions and sizes
loading.py   device- and dtype-agnostic loading through LLaVA's own builder
"""
from .loading import load_model, make_inputs

__all__ = ["load_model", "make_inputs"]
