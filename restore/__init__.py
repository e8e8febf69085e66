"""RESTORE for LLaVA-1.5: visual token reduction with its distortions rectified.

    import restore
    model = restore.apply(model, base="HoloV", n_vis=64, restore=True)
"""
from .apply import apply, is_applied, remove, settings_of
from .merge import anchor_merge, anchor_scores, group_medians
from .reduce import ReducedImages, reduce_visual_tokens, retained_budget

__all__ = [
    "apply", "remove", "is_applied", "settings_of",
    "anchor_merge", "anchor_scores", "group_medians",
    "ReducedImages", "reduce_visual_tokens", "retained_budget",
]
