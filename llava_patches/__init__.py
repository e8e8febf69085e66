"""The few places where stock LLaVA-1.5 (and LLaVA-NeXT) must change for token reduction.

vision.py          the select layer's features and CLS attention, without every layer's attention maps
assembly.py        one multimodal input assembly for every method, with per-token positions and sizes
loading.py         device- and dtype-agnostic loading through LLaVA's own builder
next_layout.py     NeXT's reduced rows: the fixed 2x2 grid and its 2880-token order
next_reduce.py     NeXT's views encoded and reduced, per view or over the whole image by method
next_visionzip.py  plain VisionZip in its official NeXT order
"""
from .loading import load_model, make_inputs

__all__ = ["load_model", "make_inputs"]
