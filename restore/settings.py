"""One point in the space of reductions the paper studies, and the names that identify it.

A reduction keeps ``n_keep = int(n_vis * prune_ratio)`` tokens by the base method's own criterion,
merges the other tokens into ``n_vis - n_keep`` groups around anchors, gives the reduced tokens
position ids, and may calibrate attention. ``restore=True`` is the paper's default point of that space,
``restore=False`` the plain base method; every keyword setting overrides one coordinate.

Torch-free to import; resolving the settings of a method name looks up where it acts in the registry.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional

ANCHORS = ("distinctive", "uniform", "none")
POSITIONS = ("retained", "reindexed")
CALIBRATIONS = ("size_distance", "size", "none")
MERGED_POSITIONS = ("median", "first", "mean", "last")

# The coordinates a user may set, with the value each takes under restore=True / restore=False.
RESTORE_DEFAULTS: Dict[str, Any] = dict(prune_ratio=0.5, anchors="distinctive", positions="retained",
                                        calibration="size_distance", calibration_c=2.0, merged_position="median")
BASELINE_DEFAULTS: Dict[str, Any] = dict(prune_ratio=1.0, anchors="none", positions="reindexed",
                                         calibration="none", calibration_c=2.0, merged_position="median")
SETTING_NAMES = tuple(RESTORE_DEFAULTS)


@dataclass(frozen=True)
class ReductionSettings:
    """Everything that decides which tokens reach the LLM and how it attends to them."""

    base: str  # canonical method name
    n_vis: int  # visual tokens per image fed to the LLM (with ``keep``: the most any image can have)
    # Which defaults the other fields started from (the paper's "+ ours" or the plain method). Not part of
    # equality: two spellings of one reduction are one configuration, with one run name.
    restore: bool = field(compare=False)
    num_patches: int  # N, visual tokens per image before reduction
    prune_ratio: float = 1.0  # gamma: share of n_vis kept by the base method's criterion
    anchors: str = "none"  # how the merged groups are seeded: distinctive (RESTORE), uniform (VisionZip), none
    positions: str = "reindexed"  # retained: original patch positions; reindexed: contiguous
    calibration: str = "none"  # size_distance: log s + log(c - D); size: log s; none: plain causal attention
    calibration_c: float = 2.0  # c in log(c - D)
    merged_position: str = "median"  # which member position a merged group takes
    acts: str = "before_llm"  # where the base method acts: before_llm, vision_encoder (merges itself), llm
    # The position ids of the method's own plain row: FastV (inside the LLM) keeps the original ones. Set by
    # the method, so not a coordinate of its own.
    plain_positions: str = field(default="reindexed", compare=False)
    # A method inside the vision encoder that prunes in stages (FlowCut): gamma and anchors apply at each stage.
    # Set by the method (tokenreduction.restore_per_stage), so not a coordinate of its own.
    restore_per_stage: bool = field(default=False, compare=False)
    # The budget as a share of each image's visual tokens (a family whose images have different token
    # counts, Qwen2.5-VL): image k gets round(keep * N_k); None: n_vis tokens per image.
    keep: Optional[float] = None

    @property
    def budget_name(self) -> str:
        """The budget as run names spell it: ``64`` (n_vis) or ``k0.111`` (a share)."""
        return str(self.n_vis) if self.keep is None else share_name(self.keep)

    @property
    def n_keep(self) -> int:
        """Tokens the base method keeps (the official code's int(n_vis * 0.5) at the default)."""
        return self.n_vis if self.anchors == "none" else int(self.n_vis * self.prune_ratio)

    @property
    def merges_itself(self) -> bool:
        """The base method reduces tokens on its own inside the vision encoder (ToMe merges there; FlowCut
        prunes there in stages, and with ``restore_per_stage`` RESTORE's gamma and anchors act at each)."""
        return self.acts == "vision_encoder"

    @property
    def own_merging(self) -> bool:
        """The method's own merging replaces RESTORE's (ToMe): gamma and anchors do not apply."""
        return self.merges_itself and not self.restore_per_stage

    @property
    def n_merged(self) -> int:
        return self.n_vis - self.n_keep

    @property
    def merges(self) -> bool:
        """Some reduced token stands for several patches."""
        return self.own_merging or self.n_merged > 0

    @property
    def retains_positions(self) -> bool:
        return self.positions == "retained"

    @property
    def calibrates(self) -> bool:
        return self.calibration != "none"

    @property
    def uses_distance(self) -> bool:
        return self.calibration == "size_distance"

    @property
    def in_base_order(self) -> bool:
        """Tokens reach the LLM in the base method's own order only when nothing is merged and positions
        are re-indexed (the paper's baseline layout); otherwise they are ordered by position."""
        return not self.retains_positions and (self.merges_itself or not self.merges)

    @property
    def baseline_defaults(self) -> Dict[str, Any]:
        """The coordinates of this method's plain row (:data:`BASELINE_DEFAULTS`, with its own position ids)."""
        return {**BASELINE_DEFAULTS, "positions": self.plain_positions}

    @property
    def is_plain_base(self) -> bool:
        """The plain method of the paper's baseline rows."""
        return all(getattr(self, k) == v for k, v in self.baseline_defaults.items())

    @property
    def named_as_restore(self) -> bool:
        """Whether the shortest name of this reduction starts from RESTORE's defaults (ties: yes)."""
        return len(self.overrides(True)) <= len(self.overrides(False))

    def overrides(self, relative_to_restore: Optional[bool] = None) -> Dict[str, Any]:
        """The settings that differ from the defaults of ``restore`` (or of the given side): what a run
        name must mention."""
        side = self.restore if relative_to_restore is None else relative_to_restore
        defaults = RESTORE_DEFAULTS if side else self.baseline_defaults
        changed = {k: getattr(self, k) for k in SETTING_NAMES if getattr(self, k) != defaults[k]}
        # c only matters with the distance term; gamma only matters when something is merged.
        if not self.uses_distance:
            changed.pop("calibration_c", None)
        if self.own_merging:  # the method's own merging: gamma and anchors do not apply
            changed.pop("anchors", None)
            changed.pop("prune_ratio", None)
        elif not self.merges:  # prune only is named by gamma = 1 alone
            changed.pop("anchors", None)
            changed.pop("merged_position", None)
        return changed

    def as_dict(self) -> Dict[str, Any]:
        """Every coordinate of the reduction (not how it was spelled), e.g. for an answers file's settings."""
        skipped = ("restore", "plain_positions", "restore_per_stage") + (("keep",) if self.keep is None else ())
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}


def acts_of(base: str) -> str:
    """Where a registered method acts (imports the registry, hence torch); before_llm for unknown names."""
    import tokenreduction

    try:
        return tokenreduction.acts_in(base)
    except ValueError:
        return "before_llm"


def check_share(keep: Any) -> float:
    """``keep`` as a float in (0, 1]; ValueError saying what a share is otherwise."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep must be a share of each image's visual tokens in (0, 1] (e.g. 0.111 for 11.1%), "
                         f"got {keep!r}")
    return float(keep)


def count_of_share(keep: float, num_patches: int) -> int:
    """The token count a share of ``num_patches`` tokens is, for a model whose images all have that many:
    round(keep * N), at least 1 (0.111 of LLaVA-1.5's 576 is 64)."""
    return max(1, int(round(check_share(keep) * num_patches)))


def resolve_settings(base: str, n_vis: Optional[int], restore: bool, num_patches: int, acts: Optional[str] = None,
                     keep: Optional[float] = None, **overrides: Optional[Any]) -> ReductionSettings:
    """Settings for ``base`` at ``n_vis``: the defaults of ``restore``, then every override that is not None.

    ``keep`` (instead of ``n_vis``): the budget is that share of each image's tokens, for a family whose
    token count differs between images; n_vis is then ``num_patches``, the most an image can have, and every
    check on the budget is made per image when the image is reduced.

    ``acts``: where the base acts (``tokenreduction.acts_in``); a method that merges on its own inside
    the vision encoder takes no pruning ratio or anchors. Raises ValueError with what to change for a
    setting outside its range or a combination that cannot be built (e.g. a pruning ratio below 1
    without anchors to merge the rest around).
    """
    unknown = sorted(set(overrides) - set(SETTING_NAMES))
    if unknown:
        raise TypeError(f"unknown reduction setting(s) {', '.join(unknown)}; known: {', '.join(SETTING_NAMES)}")
    if keep is not None:
        if n_vis not in (None, num_patches):
            raise ValueError(f"give the budget as keep (a share of each image's tokens) or n_vis (a count), "
                             f"not both (keep={keep!r}, n_vis={n_vis!r})")
        keep, n_vis = check_share(keep), num_patches
    elif n_vis is None:
        raise ValueError(f"{base} needs a budget: n_vis (visual tokens per image) or keep (a share of them)")
    if acts is None:
        acts = acts_of(base)
    plain_positions = _in_llm_plain_positions(base, n_vis, num_patches) if acts == "llm" \
        else BASELINE_DEFAULTS["positions"]
    per_stage = acts == "vision_encoder" and _restore_per_stage(base)
    values = dict(RESTORE_DEFAULTS if restore else {**BASELINE_DEFAULTS, "positions": plain_positions})
    values.update({k: v for k, v in overrides.items() if v is not None})
    if acts == "vision_encoder" and not per_stage:
        given = [k for k in ("prune_ratio", "anchors") if overrides.get(k) is not None]
        if given:
            raise ValueError(f"{base} merges tokens itself inside the vision encoder: {' and '.join(given)} "
                             f"{'does' if len(given) == 1 else 'do'} not apply (positions, calibration and "
                             "merged_position do)")
        values.update(prune_ratio=1.0, anchors="none")
    if values["anchors"] == "none" and overrides.get("prune_ratio") is None:
        values["prune_ratio"] = 1.0  # no anchors means prune only, unless a ratio was asked for explicitly
    _check_choice("anchors", values["anchors"], ANCHORS)
    _check_choice("positions", values["positions"], POSITIONS)
    _check_choice("calibration", values["calibration"], CALIBRATIONS)
    _check_choice("merged_position", values["merged_position"], MERGED_POSITIONS)
    gamma = values["prune_ratio"]
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0.0 <= float(gamma) <= 1.0:
        raise ValueError(f"prune_ratio (gamma) must be a number in [0, 1], got {gamma!r}")
    values["prune_ratio"] = float(gamma)
    c = values["calibration_c"]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 1.0:
        # D(0) = 1, so log(c - D) needs c > 1 for every distance.
        raise ValueError(f"calibration_c must be a finite number above 1 (log(c - D) with D(0) = 1), got {c!r}")
    values["calibration_c"] = float(c)
    if values["anchors"] == "none" and values["prune_ratio"] < 1.0:
        raise ValueError(f"prune_ratio={values['prune_ratio']} leaves {1 - values['prune_ratio']:g} of the budget to "
                         "merging, but anchors='none' merges nothing; choose anchors='distinctive' or 'uniform', "
                         "or prune_ratio=1")
    settings = ReductionSettings(base=base, n_vis=n_vis, restore=bool(restore), num_patches=num_patches, acts=acts,
                                 plain_positions=plain_positions, restore_per_stage=per_stage, keep=keep, **values)
    # One reduction, one spelling: a coordinate without effect takes its default, so that the run name,
    # the answers-file record and a method's own plain row all see the same configuration.
    if not settings.uses_distance:
        settings = replace(settings, calibration_c=RESTORE_DEFAULTS["calibration_c"])
    if settings.merges_itself and not settings.retains_positions:
        settings = replace(settings, merged_position="median")  # re-indexed: the method's own order
    if not settings.merges:
        if overrides.get("anchors") not in (None, "none"):
            raise ValueError(f"anchors={overrides['anchors']!r} merges nothing at prune_ratio=1 (every token of the "
                             "budget is kept); give a prune_ratio below 1")
        # Prune only, however it was asked for (gamma = 1, or no anchors): one spelling, one run name.
        return replace(settings, anchors="none", prune_ratio=1.0, merged_position="median")
    if settings.prune_ratio > 0 and settings.n_keep == 0:
        need = math.ceil(1 / settings.prune_ratio)
        raise ValueError(f"prune_ratio={settings.prune_ratio:g} keeps int(n_vis * prune_ratio) = 0 of n_vis={n_vis} "
                         f"tokens: use n_vis >= {need}, or prune_ratio=0 to merge every token")
    if num_patches - settings.n_keep < settings.n_merged:
        raise ValueError(f"n_vis={n_vis} with prune_ratio={settings.prune_ratio:g} would merge "
                         f"{num_patches - settings.n_keep} tokens into {settings.n_merged} groups; lower n_vis")
    return settings


def _in_llm_plain_positions(base: str, n_vis: int, num_patches: int) -> str:
    """The plain row's positions of a method acting in the LLM, after checking that its stages exist for
    ``n_vis`` (a budget without a schedule is refused here, before any model is loaded)."""
    from tokenreduction.inllm import REFERENCE_DEPTH, check_stages, llm_method

    method = llm_method(base)
    check_stages(method.name, method.stages(n_vis, num_patches, REFERENCE_DEPTH), num_patches, REFERENCE_DEPTH)
    return method.plain_positions


def _restore_per_stage(base: str) -> bool:
    import tokenreduction

    try:
        return tokenreduction.restore_per_stage(base)
    except ValueError:
        return False


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


_SHORT = {"prune_ratio": "g", "anchors": "anchors", "positions": "pos", "calibration": "cal",
          "calibration_c": "c", "merged_position": "mpos"}


def _format(value: Any) -> str:
    """Floats in their shortest exact spelling (0.75, 1, 0.2656249): two values never share a name."""
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def share_name(keep: float) -> str:
    """A share budget as run names spell it: ``k0.111`` (the share's shortest exact spelling)."""
    return f"k{_format(float(keep))}"


def settings_tag(overrides: Mapping[str, Any]) -> str:
    """``-g0.75-anchors_uniform``: the part of a run name that names non-default settings, in a fixed order."""
    parts = []
    for name in SETTING_NAMES:
        if name in overrides:
            sep = "" if name in ("prune_ratio", "calibration_c") else "_"
            parts.append(f"{_SHORT[name]}{sep}{_format(overrides[name])}")
    return "".join(f"-{p}" for p in parts)


def run_tag(settings: Optional[ReductionSettings]) -> str:
    """The answers-folder name of a configuration: ``full``, ``holov-64``, ``holov-64-restore-g0.75``.

    Built from the reduction itself, not from how it was asked for: of the two ways to name it (from
    RESTORE's defaults or from the plain method's) the one with fewer overrides, so that e.g.
    ``restore=True, prune_ratio=1`` and ``positions="retained", calibration="size_distance"`` share answers.
    """
    if settings is None:
        return "full"
    as_restore = settings.named_as_restore
    tag = f"{settings.base.lower()}-{settings.budget_name}" + ("-restore" if as_restore else "")
    return tag + settings_tag(settings.overrides(as_restore))


_LONG = {short: name for name, short in _SHORT.items()}
_FLOAT_SETTINGS = ("prune_ratio", "calibration_c")


def parse_run_tag(tag: str) -> Optional[Dict[str, Any]]:
    """The configuration a run name names, as ``restore.apply``'s arguments (``base``, ``n_vis``,
    ``restore`` and the overrides it mentions); None for ``full`` (no reduction).

    The inverse of :func:`run_tag`, and lenient where a person types it: the base in any case
    (``HoloV-64-restore``), settings in any order. ValueError with the expected form otherwise.
    """
    text = tag.strip()
    if text.lower() == "full":
        return None
    parts = text.split("-")
    budget = next((i for i, part in enumerate(parts) if i > 0 and (part.isdigit() or _share(part) is not None)), None)
    if budget is None:
        raise ValueError(f"configuration {tag!r}: expected 'full' or <base>-<n_vis>[-restore][-<setting>...], "
                         "e.g. HoloV-64, HoloV-64-restore, HoloV-64-restore-g0.75-anchors_uniform "
                         "(or a share of each image's tokens as the budget: DivPrune-k0.111-restore)")
    config: Dict[str, Any] = {"base": "-".join(parts[:budget]), "restore": False}
    if parts[budget].isdigit():
        config["n_vis"] = int(parts[budget])
    else:
        config["keep"] = _share(parts[budget])
    rest = parts[budget + 1:]
    if rest and rest[0].lower() == "restore":
        config["restore"] = True
        rest = rest[1:]
    for part in rest:
        name, value = _parse_setting(part, tag)
        if name in config:
            raise ValueError(f"configuration {tag!r} sets {name} twice")
        config[name] = value
    return config


def _share(part: str) -> Optional[float]:
    """The share a budget part ``k0.111`` names, None when ``part`` is not one."""
    if not part.lower().startswith("k"):
        return None
    try:
        return check_share(float(part[1:]))
    except ValueError:
        return None


def _parse_setting(part: str, tag: str) -> tuple:
    if "_" in part:
        short, value = part.split("_", 1)
        name = _LONG.get(short)
        if name is not None and name not in _FLOAT_SETTINGS:
            return name, value
    else:
        for short in ("g", "c"):
            name = _LONG[short]
            if part.startswith(short):
                try:
                    return name, float(part[len(short):])
                except ValueError:
                    break
    known = ", ".join(f"{short}{'' if name in _FLOAT_SETTINGS else '_'}<{name}>" for name, short in _SHORT.items())
    raise ValueError(f"configuration {tag!r}: cannot read the setting {part!r}; settings are {known}")


def add_setting_arguments(group) -> None:
    """The reduction settings as command-line flags (both spellings: --prune_ratio and --prune-ratio)."""
    group.add_argument("--prune_ratio", "--prune-ratio", dest="prune_ratio", type=float, default=None,
                       help="gamma: share of --n_vis kept by the base method (RESTORE: 0.5; 1 = prune only, "
                            "0 = merge only)")
    group.add_argument("--anchors", choices=ANCHORS, default=None,
                       help="anchors of the merged groups (RESTORE: distinctive; uniform = VisionZip's)")
    group.add_argument("--positions", choices=POSITIONS, default=None,
                       help="position ids of the reduced tokens (RESTORE: retained; baseline: reindexed)")
    group.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                       help="attention calibration (RESTORE: size_distance = log s + log(c - D); size = log s)")
    group.add_argument("--calibration_c", "--calibration-c", dest="calibration_c", type=float, default=None,
                       help="c in log(c - D) (RESTORE: 2)")
    group.add_argument("--merged_position", "--merged-position", dest="merged_position", choices=MERGED_POSITIONS,
                       default=None, help="position id of a merged token (RESTORE: median)")


def overrides_from(args: Any) -> Dict[str, Any]:
    """The reduction settings given on the command line (None: not given)."""
    return {name: getattr(args, name, None) for name in SETTING_NAMES}


def main(argv: Optional[list] = None) -> int:
    """``python -m restore.settings tag --base HoloV --n_vis 64 --restore [settings]``: print the run name.

    Other flags are ignored, so a script can pass its whole argument list.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m restore.settings", allow_abbrev=False,
                                     description="Print the run name of a reduction configuration.")
    parser.add_argument("command", choices=["tag"])
    parser.add_argument("--base", default=None)
    parser.add_argument("--n_vis", "--n-vis", dest="n_vis", type=int, default=None)
    parser.add_argument("--keep", type=float, default=None, help="the budget as a share of each image's tokens")
    parser.add_argument("--restore", action="store_true")
    parser.add_argument("--num-patches", type=int, default=576, help="visual tokens per image before reduction")
    parser.add_argument("--plugin", action="append", default=[], help="modules that register methods (as the scripts)")
    add_setting_arguments(parser)
    args, _ = parser.parse_known_args(argv)
    if args.plugin:  # a plugin's method may act elsewhere than before the LLM, which changes its name
        import tokenreduction

        try:
            tokenreduction.load_plugins(args.plugin)
        except ImportError as error:
            print(f"error: --plugin: {error}", file=sys.stderr)
            return 2
    if args.base is None:
        print("full")
        return 0
    if args.n_vis is None and args.keep is None:
        print("error: --base needs --n_vis (or --keep)", file=sys.stderr)
        return 2
    try:
        print(run_tag(resolve_settings(args.base, args.n_vis, args.restore, args.num_patches, keep=args.keep,
                                       **overrides_from(args))))
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
