"""Visual token selectors: which visual tokens a base reduction method keeps.

Pure torch, no llava import.

    import tokenreduction as tr
    keep = tr.get_selector("HoloV")(tr.VisualTokens(features=F, cls_attention=A), 64)

A method is one module: a new file in this folder is found on its own (see registry.discover_selectors);
one outside the repository is named with ``load_plugins`` (``--plugin`` on the command line) or installed
under the ``restore.methods`` entry-point group.
"""
from .registry import (BUDGET_SCOPES, ENTRY_POINT_GROUP, PLACES, acts_in, available_methods, available_selectors,
                       budget_scope, canonical_name, discover_selectors, get_selector, load_plugins, method_needs,
                       plain_reduction, register_method, restore_per_stage, register_plain_reduction, register_selector)
from .inllm import InLLMMethod, Stage, StageChoice, StageView, llm_method, register_llm_method
from .tokens import OwnReduction, VisualTokens

__all__ = ["BUDGET_SCOPES", "ENTRY_POINT_GROUP", "InLLMMethod", "OwnReduction", "Stage", "StageChoice", "StageView", "llm_method", "register_llm_method", "PLACES", "VisualTokens", "acts_in",
           "available_methods", "available_selectors", "budget_scope", "canonical_name", "discover_selectors",
           "get_selector", "load_plugins", "method_needs", "plain_reduction", "register_method",
           "register_plain_reduction", "register_selector", "restore_per_stage"]
