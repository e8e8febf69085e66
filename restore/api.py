"""``restore.apply`` / ``restore.remove``: put a reduction method (and RESTORE) on one loaded LLaVA model."""
from __future__ import annotations

from typing import Dict, Optional, Type

import torch

import tokenreduction as tr

from .patch import (
    CalibratedAttentionMixin,
    CalibratedLlamaModelMixin,
    ReducedLlavaMixin,
    RestoreContext,
    RetainedRopeMixin,
)
from .settings import ReductionSettings, resolve_settings

_ORIGINAL_CLASS = "_restore_original_class"
_SUBCLASSES: Dict[tuple, Type] = {}


def _patched_class(mixin: Type, cls: Type) -> Type:
    key = (mixin, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"{mixin.__name__.replace('Mixin', '')}_{cls.__name__}", (mixin, cls), {})
    return _SUBCLASSES[key]


def _swap(module: torch.nn.Module, mixin: Type, ctx: RestoreContext) -> None:
    setattr(module, _ORIGINAL_CLASS, module.__class__)
    module.__class__ = _patched_class(mixin, module.__class__)
    module._restore_ctx = ctx


def _targets(model):
    """(module, mixin) pairs that RESTORE patches on a LLaVA-Llama model."""
    llm = model.get_model()
    yield model, ReducedLlavaMixin
    yield llm, CalibratedLlamaModelMixin
    for layer in llm.layers:
        yield layer.self_attn, CalibratedAttentionMixin
        yield layer.self_attn.rotary_emb, RetainedRopeMixin


def is_applied(model) -> bool:
    return hasattr(model, _ORIGINAL_CLASS)


def settings_of(model) -> Optional[ReductionSettings]:
    """The settings applied to ``model``, or None when it is stock."""
    return model._restore_ctx.settings if is_applied(model) else None


def remove(model):
    """Give ``model`` back its stock classes and behaviour. A stock model is returned unchanged."""
    for module in model.modules():
        original = module.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("_restore_ctx", None)
    return model


def _check_model(model) -> int:
    """Raise unless ``model`` is a LLaVA-Llama model we can patch; return N, its visual tokens per image."""
    try:
        from llava.model import LlavaLlamaForCausalLM
    except ImportError as error:  # pragma: no cover - llava is a hard dependency
        raise ImportError("restore needs llava-torch: pip install --no-deps llava-torch==1.2.2.post1") from error
    if not isinstance(model, LlavaLlamaForCausalLM):
        raise TypeError(
            f"restore.apply expects a llava LlavaLlamaForCausalLM (LLaVA-1.5), got {type(model).__name__}; "
            "load one with llava_patches.load_model or llava.model.builder.load_pretrained_model"
        )
    tower = model.get_vision_tower()
    if tower is None or not getattr(tower, "is_loaded", False):
        raise ValueError("the model has no loaded vision tower; load the checkpoint with its CLIP tower first")
    attention = getattr(model.config, "_attn_implementation", "eager")
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"restore supports eager and sdpa attention, the model uses {attention!r}; "
                         "load it with attn_implementation='sdpa'")
    if getattr(model.config, "rope_scaling", None):
        raise ValueError("restore supports plain RoPE only (config.rope_scaling must be unset, as in LLaVA-1.5)")
    return int(tower.num_patches)


def _check_tome_reachable(model, num_patches: int, n_vis: int) -> None:
    """ToMe halves a layer's tokens at most: refuse a budget the tower's depth cannot reach, before any forward."""
    from llava_patches.vision import _layer_indices
    from tokenreduction.tome import tome_schedule

    tower = model.get_vision_tower()
    hidden_index, _ = _layer_indices(tower.select_layer, len(tower.vision_tower.vision_model.encoder.layers))
    tome_schedule(num_patches, n_vis, hidden_index)


def apply(
    model,
    base: Optional[str] = None,
    n_vis: Optional[int] = None,
    restore: bool = False,
    *,
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

    The keyword settings move one coordinate away from the defaults of ``restore`` (None keeps it):
    ``prune_ratio`` (gamma, share of n_vis kept by the base; 0.5 with RESTORE), ``anchors``
    ('distinctive', 'uniform' or 'none'), ``positions`` ('retained' or 'reindexed'), ``calibration``
    ('size_distance', 'size' or 'none'), ``calibration_c`` (c in log(c - D), 2) and ``merged_position``
    ('median', 'first', 'mean', 'last'). See docs/settings.md for every combination.
    """
    num_patches = _check_model(model)
    overrides = dict(prune_ratio=prune_ratio, anchors=anchors, positions=positions, calibration=calibration,
                     calibration_c=calibration_c, merged_position=merged_position)
    if base is None:
        if restore:
            raise ValueError("restore=True needs a base method to select the kept tokens, e.g. base='HoloV'")
        given = sorted(k for k, v in overrides.items() if v is not None)
        if given:
            raise ValueError(f"{', '.join(given)} need a base method (no reduction has no settings)")
        if n_vis not in (None, num_patches):
            raise ValueError(f"n_vis={n_vis} needs a base method; available: {', '.join(tr.available_selectors())}")
        return remove(model)
    name = tr.canonical_name(base)
    if isinstance(n_vis, bool) or not isinstance(n_vis, int) or not 1 <= n_vis <= num_patches:
        raise ValueError(f"n_vis must be an integer in 1..{num_patches} (visual tokens per image), got {n_vis!r}")
    if tr.acts_in(name) == "llm":
        raise NotImplementedError(f"{name} acts inside the LLM, which restore.apply does not support yet")
    settings = resolve_settings(name, n_vis, bool(restore), num_patches, acts=tr.acts_in(name), **overrides)
    if settings.merges_itself:
        _check_tome_reachable(model, num_patches, n_vis)

    remove(model)
    ctx = RestoreContext(settings)
    for module, mixin in _targets(model):
        _swap(module, mixin, ctx)
    return model
