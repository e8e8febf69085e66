"""RESTORE for LLaVA-1.5: visual token reduction with its distortions rectified.

    import restore
    model = restore.apply(model, base="HoloV", n_vis=64, restore=True)

Attributes load lazily, so ``python -m restore.report`` and the scorers start without torch or llava.
"""
from importlib import import_module

_EXPORTS = {
    "apply": "api", "remove": "api", "is_applied": "api", "settings_of": "api",
    "anchor_merge": "merge", "anchor_scores": "merge", "group_medians": "merge",
    "uniform_anchors": "merge", "group_positions": "merge",
    "ReducedImages": "reduce", "reduce_visual_tokens": "reduce", "retained_budget": "reduce",
    "ReductionSettings": "settings", "resolve_settings": "settings", "run_tag": "settings",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'restore' has no attribute {name!r}")
