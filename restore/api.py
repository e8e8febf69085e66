"""``restore.apply`` / ``restore.remove``: put a reduction method (and RESTORE) on one loaded model.

What to patch and how comes from the model's family (restore.families); this module only swaps classes.
"""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch

import tokenreduction as tr

from .families import family_of_model
from .settings import ReductionSettings, resolve_settings

_ORIGINAL_CLASS = "_restore_original_class"
_SUBCLASSES: Dict[tuple, Type] = {}


def _patched_class(mixin: Type, cls: Type) -> Type:
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{mixin.__name__.replace('Mixin', '')}_{cls.__name__}", (mixin, cls), {})
    return _SUBCLASSES[key]


def _swap(module: torch.nn.Module, mixin: Type, ctx) -> None:
    setattr(module, _ORIGINAL_CLASS, module.__class__)
    module.__class__ = _patched_class(mixin, module.__class__)
    module._restore_ctx = ctx


def _patched_modules(model):
    return (module for module in model.modules() if _ORIGINAL_CLASS in module.__dict__)


def is_applied(model) -> bool:
    return next(_patched_modules(model), None) is not None


def settings_of(model) -> Optional[ReductionSettings]:
    """The settings applied to ``model``, or None when it is stock."""
    patched = next(_patched_modules(model), None)
    return None if patched is None else patched._restore_ctx.settings


def remove(model):
    """Give ``model`` back its stock classes and behaviour. A stock model is returned unchanged."""
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_restore_ctx", None)
    return model


def apply(
    model,
    base: Optional[str] = None,
    n_vis: Optional[int] = None,
    restore: bool = False,
    *,
    keep: Optional[float] = None,
    prune_ratio: Optional[float] = None,
    anchors: Optional[str] = None,
    positions: Optional[str] = None,
    calibration: Optional[str] = None,
    calibration_c: Optional[float] = None,
    merged_position: Optional[str] = None,
):
    """Reduce ``model``'s visual tokens with ``base`` to ``n_vis`` per image, with RESTORE if ``restore``.

    ``base=None`` means no reduction: the model behaves exactly as stock LLaVA. Calling ``apply``
    again reconfigures the model; :func:`remove` undoes it. Only this model instance is changed.
    Returns the model, so ``model = restore.apply(model, ...)`` reads naturally.

    ``keep`` gives the budget as a share of each image's visual tokens instead of ``n_vis`` (the paper's
    Qwen2.5-VL budgets, ``keep=0.111``: image k keeps round(0.111 * N_k)). On a model whose images all have
    N tokens it is the count round(keep * N) (0.111 on LLaVA-1.5 is n_vis=64).

    The keyword settings move one coordinate away from the defaults of ``restore`` (None keeps it):
    ``prune_ratio`` (gamma, share of n_vis kept by the base; 0.5 with RESTORE), ``anchors``
    ('distinctive', 'uniform' or 'none'), ``positions`` ('retained' or 'reindexed'), ``calibration``
    ('size_distance', 'size' or 'none'), ``calibration_c`` (c in log(c - D), 2) and ``merged_position``
    ('median', 'first', 'mean', 'last'). See docs/settings.md for every combination.
    """
    family = family_of_model(model)
    num_patches = family.check_model(model)
    overrides = dict(prune_ratio=prune_ratio, anchors=anchors, positions=positions, calibration=calibration,
                     calibration_c=calibration_c, merged_position=merged_position)
    if base is None:
        if restore:
            raise ValueError("restore=True needs a base method to select the kept tokens, e.g. base='HoloV'")
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)} need a base method (no reduction has no settings)")
        if n_vis not in (None, num_patches) or keep not in (None, 1, 1.0):
            budget = f"n_vis={n_vis}" if keep is None else f"keep={keep}"
            raise ValueError(f"{budget} needs a base method; available: {', '.join(tr.available_selectors())}")
        return remove(model)
    name = tr.canonical_name(base)
    n_vis, keep = family.budget(n_vis, keep, num_patches)
    if keep is None and (isinstance(n_vis, bool) or not isinstance(n_vis, int) or not 1 <= n_vis <= num_patches):
        raise ValueError(f"n_vis must be an integer in 1..{num_patches} (visual tokens per image), got {n_vis!r}")
    settings = resolve_settings(name, n_vis, bool(restore), num_patches, acts=tr.acts_in(name), keep=keep,
                                **overrides)
    family.check_settings(model, settings)

    remove(model)
    ctx = family.new_context(settings)
    for module, mixin in family.patch_targets(model):
        _swap(module, mixin, ctx)
    return model
