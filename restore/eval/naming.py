"""Where a run's answers go: the model's name and the configuration's name, built here and only here.

The launcher, ``restore.eval.shards``, ``restore.report`` and ``restore.paper`` all find runs by these
names, so a second spelling anywhere would make one of them look in the wrong folder. Torch-free.
"""
from __future__ import annotations

from typing import Any, List, Mapping, Optional

from restore.settings import SETTING_NAMES, parse_run_tag, resolve_settings, run_tag, settings_tag, share_name

FULL = "full"  # the run name of the unreduced model
FULL_VISUAL_TOKENS = 576  # LLaVA-1.5's visual tokens per image, the num_patches every name is built with


def model_name_of(model_path: str) -> str:
    """LLaVA's ``get_model_name_from_path``: the last path component, or ``<parent>_<checkpoint-N>`` for
    a training checkpoint (whose last component alone would name every run of every training the same)."""
    parts = [p for p in str(model_path).strip("/").split("/") if p]
    if not parts:
        return str(model_path)
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return f"{parts[-2]}_{parts[-1]}"
    return parts[-1]


def config_tag(base: Optional[str], n_vis: Optional[int] = None, restore: bool = False,
               acts: Optional[str] = None, num_patches: int = FULL_VISUAL_TOKENS, keep: Optional[float] = None,
               **overrides: Any) -> str:
    """The answers-folder name of a configuration (``full``, ``holov-64-restore-g0.75``, with a share of each
    image's tokens as the budget ``divprune-k0.111-restore``).

    ``acts`` (where the method acts) is looked up in the method registry when not given, which imports
    torch; pass it to stay torch-free."""
    if base is None:
        return FULL
    return run_tag(resolve_settings(base, None if n_vis is None else int(n_vis), bool(restore), num_patches,
                                    acts=acts, keep=keep, **overrides))


def plain_tag(base: Optional[str], n_vis: Optional[int], restore: bool, keep: Optional[float] = None) -> str:
    """The name of a configuration without setting overrides; equal to :func:`config_tag` of it for every
    method (a method merging inside the vision encoder has nothing more to name), without a registry."""
    if base in (None, "", "none", "None"):
        return FULL
    budget = n_vis if keep is None else share_name(keep)
    return f"{str(base).lower()}-{budget}" + ("-restore" if restore else "")


def recorded_tag(settings: Mapping[str, Any]) -> str:
    """The name of the configuration an answers file's settings record holds (its reduction is recorded
    by name already: base, n_vis, restore and the overrides from that side's defaults)."""
    base = settings.get("base")
    if not base:
        return FULL
    overrides = settings.get("reduction_settings") or {}
    return plain_tag(base, settings.get("n_vis"), bool(settings.get("restore")), settings.get("keep")) \
        + settings_tag(overrides)


def spec_flags(spec: str) -> List[str]:
    """The entry-point flags of one configuration as a person names it (``HoloV-64-restore-g0.75``);
    ValueError naming the spec when it cannot be read."""
    config = parse_run_tag(spec)
    if config is None:
        return []
    flags = ["--base", str(config["base"])]
    flags += ["--keep", repr(config["keep"])] if "keep" in config else ["--n_vis", str(config["n_vis"])]
    if config["restore"]:
        flags.append("--restore")
    for name in SETTING_NAMES:
        if name in config:
            value = config[name]
            flags += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
    return flags


def record_run_name(record: Mapping[str, Any]) -> str:
    """The run name of a result record (lower case), the default one for records that lack it."""
    name = record.get("run_name")
    if name:
        return str(name).lower()
    base = record.get("base")
    return plain_tag(None if base in (None, "", "none", "None") else str(base), record.get("n_vis"),
                     bool(record.get("restore")), record.get("keep"))
