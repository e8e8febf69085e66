"""Visual token selectors: which visual tokens a base reduction method keeps.

Pure torch, no llava import.

    import tokenreduction as tr
    keep = tr.get_selector("HoloV")(tr.VisualTokens(features=F, cls_attention=A), 64)

A method is one module: a new file in this folder is found on its own (see registry.discover_selectors);
one outside the repository is named with ``load_plugins`` (``--plugin`` on the command line) or installed
under the ``restore.methods`` entry-point group.
"""
from .registry import (ENTRY_POINT_GROUP, available_selectors, canonical_name, discover_selectors, get_selector,
                       load_plugins, register_selector)
from .tokens import VisualTokens

__all__ = ["ENTRY_POINT_GROUP", "VisualTokens", "available_selectors", "canonical_name", "discover_selectors",
           "get_selector", "load_plugins", "register_selector"]
