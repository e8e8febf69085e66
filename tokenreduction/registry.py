"""Name -> selector registry. Adding a baseline is one new module with one decorated function.

The registry fills itself on first use: every module of this package, then every module installed under
the ``restore.methods`` entry-point group, is imported once, and each registers its selectors on import.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict, List, Sequence

import torch

from .tokens import VisualTokens

Selector = Callable[[VisualTokens, int], torch.Tensor]
_SELECTORS: Dict[str, Selector] = {}
_NAMES: Dict[str, str] = {}  # lower-case key -> registered spelling
ENTRY_POINT_GROUP = "restore.methods"
_discovery = {"done": False}


def register_selector(name: str) -> Callable[[Selector], Selector]:
    """Decorator: ``@register_selector("MyMethod")`` on ``fn(tokens, n_keep) -> LongTensor [B, n_keep]``.

    The returned indices are into the N visual tokens, in the order the method feeds them to the LLM.
    The wrapper validates ``n_keep`` and the output, so a selector only implements its algorithm.
    """

    def decorator(fn: Selector) -> Selector:
        key = name.lower()
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


def get_selector(name: str) -> Selector:
    """The selector registered under ``name`` (case-insensitive)."""
    discover_selectors()
    try:
        return _SELECTORS[str(name).lower()]
    except KeyError:
        raise ValueError(
            f"unknown selector {name!r}; available: {', '.join(available_selectors())}"
        ) from None


def canonical_name(name: str) -> str:
    """The spelling a selector was registered with (``"holov"`` -> ``"HoloV"``)."""
    get_selector(name)
    return _NAMES[str(name).lower()]


def available_selectors() -> List[str]:
    discover_selectors()
    return sorted(_NAMES.values(), key=str.lower)
