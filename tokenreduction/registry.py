"""Name -> method registry. Adding a baseline is one new module with one decorated function.

Each method says where it acts: ``before_llm`` (a selector on the vision tower's outputs: HoloV,
DivPrune, VisPruner, VisionZip), ``vision_encoder`` (reduces inside CLIP: ToMe merges, FlowCut prunes in
stages), or ``llm`` (inside the language model). A method may also name the vision-tower outputs it needs beyond the features and the
CLS attention (``needs=("keys",)``), and give its own plain-row reduction when its official pipeline is
more than keeping n_vis tokens (VisionZip's contextual tokens).

The registry fills itself on first use: every module of this package, then every module installed under
the ``restore.methods`` entry-point group, is imported once, and each registers its selectors on import.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .tokens import OwnReduction, VisualTokens

Selector = Callable[[VisualTokens, int], torch.Tensor]
PlainReduction = Callable[[VisualTokens, int], OwnReduction]
PLACES = ("before_llm", "vision_encoder", "llm")
_SELECTORS: Dict[str, Selector] = {}
_NAMES: Dict[str, str] = {}  # lower-case key -> registered spelling
_PLACES: Dict[str, str] = {}  # lower-case key -> where the method acts (default before_llm)
_NEEDS: Dict[str, Tuple[str, ...]] = {}  # lower-case key -> extra VisualTokens fields it reads
_PLAIN: Dict[str, PlainReduction] = {}  # lower-case key -> its own reduction for the plain (baseline) row
_PLAIN_NEEDS: Dict[str, Tuple[str, ...]] = {}
# Where a selector's budget applies when an image reaches the encoder as several views (LLaVA-NeXT's base
# view + crops): "image" (one budget over all of the image's tokens) or "per_view" (the budget split
# evenly over the views, each selected on its own), as the method's official multi-view code does.
BUDGET_SCOPES = ("image", "per_view")
_SCOPES: Dict[str, str] = {}
# vision_encoder methods that prune in stages (FlowCut): RESTORE's keep-gamma-and-merge applies at each stage.
# The others (ToMe) merge by their own rule, which replaces RESTORE's.
_PER_STAGE: Dict[str, bool] = {}
ENTRY_POINT_GROUP = "restore.methods"
_discovery = {"done": False}


def register_selector(name: str, *, needs: Sequence[str] = (), budget_scope: str = "image"
                      ) -> Callable[[Selector], Selector]:
    """Decorator: ``@register_selector("MyMethod")`` on ``fn(tokens, n_keep) -> LongTensor [B, n_keep]``.

    The returned indices are into the N visual tokens, in the order the method feeds them to the LLM.
    The wrapper validates ``n_keep`` and the output, so a selector only implements its algorithm.
    ``needs``: VisualTokens fields computed only on request (``"keys"``, ``"cls_raw_feature"``).
    ``budget_scope``: see :data:`BUDGET_SCOPES`; single-view images (LLaVA-1.5) are unaffected.
    """
    _check_needs(name, needs)
    if budget_scope not in BUDGET_SCOPES:
        raise ValueError(f"{name}: budget_scope must be one of {', '.join(BUDGET_SCOPES)}, got {budget_scope!r}")

    def decorator(fn: Selector) -> Selector:
        key = name.lower()
        if _PLACES.get(key, "before_llm") != "before_llm":
            raise ValueError(f"{name!r} is registered as a method acting in the {_PLACES[key]}, not as a selector")
        _NEEDS[key] = tuple(dict.fromkeys((*_NEEDS.get(key, ()), *needs)))
        _PLACES[key] = "before_llm"
        _SCOPES[key] = budget_scope
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

def discover_selectors() -> None:
    """Import, once, every module of the tokenreduction package and every ``restore.methods`` entry point,
    so that a method needs nothing but its own file (or its installed package) to be found by name."""
    if _discovery["done"]:
        return
    _discovery["done"] = True  # first: a module that looks up selectors while importing must not recurse
    try:
        _import_package_modules()
        _import_entry_points()
    except BaseException:
        _discovery["done"] = False
        raise


def _import_package_modules() -> None:
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")


def _import_entry_points() -> None:
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as e:
            where = f" (from the installed package {entry.dist.name})" if entry.dist is not None else ""
            raise ImportError(f"the {ENTRY_POINT_GROUP} entry point {entry.name} = {entry.value}{where} cannot be "
                              f"imported: {type(e).__name__}: {e}; fix or uninstall that package") from e


def load_plugins(modules: Sequence[str]) -> None:
    """Import modules that register selectors from outside this package (``mylab.my_method``)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # a plugin can fail in any way while it runs its module code
            hint = " (name the module, e.g. mylab.my_method, not its file)" if name.endswith(".py") else ""
            raise ImportError(f"cannot import the plugin module {name!r}{hint}: {type(e).__name__}: {e}; "
                              "is its folder on PYTHONPATH?") from e


def register_method(name: str, acts: str, *, restore_per_stage: bool = False) -> None:
    """Register a method that is not a selector: it reduces tokens where it acts (``vision_encoder``:
    inside CLIP; ``llm``: inside the language model), and the reduction machinery of that place runs it.
    ``restore_per_stage`` (vision_encoder only): the method prunes in stages and RESTORE's gamma and anchors
    apply at each of them (FlowCut); otherwise its own merging replaces them (ToMe)."""
    if acts not in PLACES or acts == "before_llm":
        raise ValueError(f"acts must be 'vision_encoder' or 'llm' (a before_llm method registers a selector), got {acts!r}")
    if restore_per_stage and acts != "vision_encoder":
        raise ValueError(f"{name}: restore_per_stage applies to methods acting in the vision_encoder only")
    key = name.lower()
    if key in _NAMES and _PLACES.get(key) != acts:
        raise ValueError(f"a method named {name!r} is already registered")
    _NAMES[key], _PLACES[key] = name, acts
    _PER_STAGE[key] = bool(restore_per_stage)


def register_plain_reduction(name: str, *, needs: Sequence[str] = ()) -> Callable[[PlainReduction], PlainReduction]:
    """Decorator: ``fn(tokens, n_vis) -> OwnReduction`` is the method's plain (baseline) row, used instead
    of "keep n_vis tokens with the selector" when every setting is the baseline's. ``needs`` as for
    :func:`register_selector`, for that path only."""
    _check_needs(name, needs)

    def decorator(fn: PlainReduction) -> PlainReduction:
        _PLAIN[name.lower()] = fn
        _PLAIN_NEEDS[name.lower()] = tuple(needs)
        return fn

    return decorator


def _check_needs(name: str, needs: Sequence[str]) -> None:
    known = {"keys", "cls_raw_feature"}
    unknown = sorted(set(needs) - known)
    if unknown:
        raise ValueError(f"{name}: unknown needs {unknown}; VisualTokens computes on request: {sorted(known)}")


def _key(name: str) -> str:
    discover_selectors()
    key = str(name).lower()
    if key not in _NAMES:
        raise ValueError(f"unknown selector {name!r}; available: {', '.join(available_selectors())}")
    return key


def get_selector(name: str) -> Selector:
    """The selector registered under ``name`` (case-insensitive)."""
    key = _key(name)
    if key not in _SELECTORS:
        raise ValueError(f"{_NAMES[key]} acts in the {_PLACES[key].replace('_', ' ')} and has no selector")
    return _SELECTORS[key]


def acts_in(name: str) -> str:
    """Where the method acts: 'before_llm', 'vision_encoder' or 'llm'."""
    return _PLACES.get(_key(name), "before_llm")


def restore_per_stage(name: str) -> bool:
    """Whether RESTORE's gamma and anchors apply at each stage of a method inside the vision encoder (FlowCut)."""
    return _PER_STAGE.get(_key(name), False)


def method_needs(name: str, plain: bool = False) -> Tuple[str, ...]:
    """The VisualTokens fields the method reads that are only computed on request (``plain``: for its
    own plain-row reduction)."""
    key = _key(name)
    return (_PLAIN_NEEDS.get(key, ()) if plain and key in _PLAIN else _NEEDS.get(key, ()))


def budget_scope(name: str) -> str:
    """Where the method's budget applies on a multi-view image: 'image' or 'per_view' (:data:`BUDGET_SCOPES`)."""
    return _SCOPES.get(_key(name), "image")


def plain_reduction(name: str) -> Optional[PlainReduction]:
    """The method's own reduction for its plain row, or None (then: keep n_vis tokens with its selector)."""
    return _PLAIN.get(_key(name))


def canonical_name(name: str) -> str:
    """The spelling a method was registered with (``"holov"`` -> ``"HoloV"``)."""
    return _NAMES[_key(name)]


def available_selectors() -> List[str]:
    """Every registered method name (selectors and methods acting elsewhere), sorted."""
    discover_selectors()
    return sorted(_NAMES.values(), key=str.lower)


available_methods = available_selectors
