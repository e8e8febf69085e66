"""Command-line arguments of the entry points, and every check on them that needs no model.

Heavy imports (llava, tokenreduction) happen inside functions so that argument errors come back at once.
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from restore.settings import (ReductionSettings, add_setting_arguments, overrides_from,
                              resolve_settings)

from .prompt_styles import DEFAULT_STYLE, PROMPT_STYLES
from .entry_point import MAX_VISUAL_TOKENS, OPTION_LETTER_SUFFIX, EntryPoint, SetupError

DEFAULT_MODEL_PATH = "liuhaotian/llava-v1.5-7b"


def build_parser(entry: EntryPoint) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        allow_abbrev=False,  # a prefix of a flag is not that flag
        prog=f"python -m restore.eval.{entry.name}",
        description=entry.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("evaluation arguments")
    g.add_argument("--model-path", default=DEFAULT_MODEL_PATH)
    g.add_argument("--model-base", default=None, help="base LLM for LoRA / projector-only checkpoints")
    g.add_argument("--question-file", required=True)
    g.add_argument("--image-folder", default=None, help="folder the question file's image paths are relative to")
    g.add_argument("--answers-file", required=True)
    g.add_argument("--conv-mode", default=None,
                   help="conversation template (default: the checkpoint family's, vicuna_v1 for LLaVA)")
    g.add_argument("--prompt-style", choices=PROMPT_STYLES, default=None,
                   help="the benchmark text the model is asked: llava (LLaVA's question files) or lmms_eval "
                        "(lmms-eval's task prompts); default: the checkpoint family's (LLaVA: llava, "
                        "Qwen2.5-VL: lmms_eval); restore/eval/prompt_styles.py says what differs")
    g.add_argument("--min-pixels", type=int, default=None,
                   help="smallest image area (px) a Qwen2.5-VL image is resized to (default: the evaluation "
                        "protocol's 200704 = 256 visual tokens); refused for LLaVA, whose images are one size")
    g.add_argument("--max-pixels", type=int, default=None,
                   help="largest image area (px) of a Qwen2.5-VL image (default 12845056 = 16384 visual tokens)")
    g.add_argument("--jpeg-quality", type=int, default=None,
                   help="re-encode each Qwen2.5-VL image as a JPEG of this quality before preprocessing, as "
                        "lmms-eval does (default 75, lmms-eval up to 0.6; 0: the image as stored)")
    g.add_argument("--num-chunks", type=int, default=None,
                   help="split the questions into this many contiguous chunks (default: from SLURM_ARRAY_TASK_COUNT "
                        "or WORLD_SIZE when set, else 1)")
    g.add_argument("--chunk-idx", type=int, default=None,
                   help="which chunk this process answers (default: from SLURM_ARRAY_TASK_ID or RANK, else 0)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (official VQAv2 script: 0.2)")
    g.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    g.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=1)
    g.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int,
                   default=entry.max_new_tokens)
    if entry.single_pred_prompt:
        g.add_argument("--single-pred-prompt", action="store_true",
                       help=f"append {OPTION_LETTER_SUFFIX!r} (the official scripts pass it)")
    entry.add_arguments(g)

    r = p.add_argument_group("token reduction")
    r.add_argument("--base", default=None,
                   help="base selector (case-insensitive, see tokenreduction.available_selectors()); "
                        "absent = no reduction, all visual tokens")
    r.add_argument("--n_vis", "--n-vis", dest="n_vis", type=int, default=None,
                   help=f"visual tokens kept, 1..{MAX_VISUAL_TOKENS}; required with --base")
    r.add_argument("--keep", type=float, default=None, metavar="SHARE",
                   help="instead of --n_vis: the share of each image's visual tokens kept, e.g. 0.111 (Qwen2.5-VL, "
                        "whose images have different token counts: round(SHARE * N_k) per image, named k0.111 in "
                        "the run name; on a model with N tokens per image, the count round(SHARE * N))")
    r.add_argument("--restore", action="store_true",
                   help="apply RESTORE on top of --base (keeps int(n_vis * prune_ratio) tokens: n_vis >= 2 at 0.5)")
    add_setting_arguments(r)
    r.add_argument("--configs", metavar="SPEC[,SPEC...]", default=None,
                   help="several configurations in one pass: the model loads once, each image is encoded once, and "
                        "each configuration writes its own answers file, the one a separate run writes; SPEC is a "
                        "run name (full, HoloV-64, HoloV-64-restore, HoloV-64-restore-g0.75, see docs/settings.md); "
                        "--answers-file must contain {config}, replaced by each configuration's run name")
    r.add_argument("--plugin", metavar="MODULE", action="append", default=[],
                   help="import this module (e.g. mylab.my_method, importable from PYTHONPATH) before --base is "
                        "checked, so that the selectors it registers can be named; repeatable")

    x = p.add_argument_group("execution")
    x.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    x.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="auto = float16 on cuda, float32 on cpu")
    x.add_argument("--batch-size", type=int, default=1,
                   help="items generated together, grouped by prompt length (1 = the official per-question runs; "
                        "greedy answers equal batch 1's in fp32, see docs/evaluation.md)")
    x.add_argument("--num-workers", type=int, default=None,
                   help="image preprocessing workers (default 4 on cuda, 0 on cpu)")
    x.add_argument("--overwrite", action="store_true",
                   help="discard an existing answers file instead of resuming it")
    x.add_argument("--no-image-check", action="store_true",
                   help="skip decoding every image up front (missing images are still found; a corrupt one "
                        "then fails mid-run)")
    x.add_argument("--check-only", action="store_true",
                   help="check the arguments and the question file, then exit without loading the model "
                        "(0: fine, 2: a problem); the scripts run this once before starting their shards")
    return p


def check_arguments(entry: EntryPoint, args: argparse.Namespace,
                    env: Mapping[str, str] = os.environ) -> Tuple[Dict[str, Any], int, int]:
    """(settings that change the answers, number of chunks, this chunk); raises SetupError on any problem
    that can be found without the model."""
    load_plugins(args.plugin)  # before --base is checked: a plugin registers the names it may take
    family, num_patches = checkpoint_family(args)
    if args.conv_mode is None:
        args.conv_mode = family.default_conv_mode
    if args.prompt_style is None:
        args.prompt_style = family.default_prompt_style
    try:
        args.image_protocol = family.image_protocol(args.min_pixels, args.max_pixels, args.jpeg_quality)
    except ValueError as e:
        raise SetupError(f"image protocol: {e}") from None
    resolve_budget(args, family, num_patches)
    base = validate_reduction(args.base, args.n_vis, args.restore, num_patches, args.keep)
    args.reduction = reduction_settings(args, base, num_patches)
    num_chunks, chunk_idx = resolve_chunk(args.num_chunks, args.chunk_idx, env)
    if args.max_new_tokens < 1:
        raise SetupError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise SetupError(f"--num_beams must be at least 1, got {args.num_beams}")
    if args.temperature < 0:
        raise SetupError(f"--temperature must be >= 0, got {args.temperature}")
    check_batch_size(args.batch_size, args.temperature)

    question_file = os.path.expanduser(args.question_file)
    if not os.path.isfile(question_file):
        raise SetupError(f"question file not found: {question_file} (see docs/evaluation.md for the data layout)")
    if entry.needs_image_folder:
        if not args.image_folder:
            raise SetupError("--image-folder is required: the folder the question file's image paths are relative to")
        if not os.path.isdir(os.path.expanduser(args.image_folder)):
            raise SetupError(f"image folder not found: {args.image_folder}")

    device_type, dtype_name = resolve_execution(args.device, args.dtype, family)
    args.family = family
    conv_modes = family.conv_modes()
    if args.conv_mode not in conv_modes:
        raise SetupError(f"unknown --conv-mode {args.conv_mode!r}; available: {', '.join(conv_modes)}")
    if args.reduction is not None:
        try:
            family.check_budget(args.model_path, args.reduction)
        except ValueError as e:
            raise SetupError(f"reduction settings: {e}") from None
    final_mode = effective_conv_mode(args.model_path, args.conv_mode, family)
    if final_mode not in conv_modes:
        mmtag = [name for name in conv_modes if name.endswith("_mmtag")]
        raise SetupError(f"{args.model_path} looks like a plain (pretrain-only) checkpoint, so LLaVA's template "
                         f"{final_mode!r} would be used, but it does not exist; pass a --conv-mode that has an "
                         f"_mmtag variant ({', '.join(m[:-len('_mmtag')] for m in mmtag)}) or its _mmtag name")
    settings = {**common_settings(args, base), "device": device_type, "dtype": dtype_name}
    return {**settings, **entry.settings(args)}, num_chunks, chunk_idx


CONFIG_PLACEHOLDER = "{config}"


def expand_configs(args: argparse.Namespace) -> List[Tuple[str, argparse.Namespace]]:
    """(run name, the arguments of a separate run of it) for each configuration of ``--configs``, in the
    order given; without ``--configs`` the one configuration of the flags. SetupError for a bad spec, a
    configuration named twice, or reduction flags beside ``--configs``."""
    from restore.settings import SETTING_NAMES, parse_run_tag, run_tag

    if args.configs is None:
        if CONFIG_PLACEHOLDER in args.answers_file:
            raise SetupError(f"--answers-file contains {CONFIG_PLACEHOLDER} but no --configs was given: name the "
                             "configurations with --configs, or write the answers file's name out")
        return [("", args)]
    given = [flag for flag, value in (("--base", args.base), ("--n_vis", args.n_vis), ("--keep", args.keep),
                                      ("--restore", args.restore or None)) if value is not None]
    given += [f"--{name}" for name, value in overrides_from(args).items() if value is not None]
    if given:
        raise SetupError(f"--configs names every configuration; {', '.join(given)} cannot be given with it "
                         "(write the setting into the spec instead, e.g. HoloV-64-restore-g0.75)")
    if CONFIG_PLACEHOLDER not in args.answers_file:
        raise SetupError(f"--configs writes one answers file per configuration: --answers-file must contain "
                         f"{CONFIG_PLACEHOLDER} (e.g. answers/{CONFIG_PLACEHOLDER}/chunk.jsonl), got {args.answers_file}")
    specs = [spec.strip() for spec in args.configs.split(",")]
    if not any(specs) or not all(specs):
        raise SetupError(f"--configs {args.configs!r}: give comma-separated configurations without empty ones, "
                         "e.g. full,HoloV-64,HoloV-64-restore")
    load_plugins(args.plugin)  # a plugin's methods may be named in the specs
    checkpoint_family(args)  # once, for every configuration
    expanded: List[Tuple[str, argparse.Namespace]] = []
    named: Dict[str, str] = {}
    for spec in specs:
        try:
            config = parse_run_tag(spec)
        except ValueError as e:
            raise SetupError(f"--configs: {e}") from None
        one = argparse.Namespace(**vars(args))
        one.configs = None
        one.base, one.n_vis, one.keep, one.restore = None, None, None, False
        for name in SETTING_NAMES:
            setattr(one, name, None)
        if config is not None:
            for name, value in config.items():
                setattr(one, name, value)
        try:
            family, num_patches = checkpoint_family(one)
            resolve_budget(one, family, num_patches)
            base = validate_reduction(one.base, one.n_vis, one.restore, num_patches, one.keep)
            tag = run_tag(reduction_settings(one, base, num_patches))
        except SetupError as e:
            raise SetupError(f"--configs {spec}: {e}") from None
        if tag in named:
            raise SetupError(f"--configs names one configuration twice: {named[tag]!r} and {spec!r} are both {tag}")
        named[tag] = spec
        one.answers_file = args.answers_file.replace(CONFIG_PLACEHOLDER, tag)
        expanded.append((tag, one))
    return expanded


def check_batch_size(batch_size: int, temperature: float) -> None:
    """SetupError unless ``batch_size`` items can be generated together with the answers of batch 1."""
    if batch_size < 1:
        raise SetupError(f"--batch-size must be at least 1, got {batch_size}")
    if batch_size > 1 and temperature > 0:
        # Sampling draws one random stream for the whole batch, shared out over its rows in an order
        # that depends on the batch; no batch can give each item the draws it gets when run alone.
        raise SetupError(f"--batch-size {batch_size} with --temperature {temperature}: sampling with a batch "
                         "cannot reproduce the per-question random draws of batch 1 (nor of another batch "
                         "size); use --batch-size 1 to sample, or --temperature 0 (greedy) to batch")


def resolve_execution(device: str, dtype: str, family: Any = None) -> Tuple[str, str]:
    """(device type, dtype name) the checkpoint's family will run the model with: what "auto" becomes on
    this machine (LLaVA: float16 on CUDA; Qwen2.5-VL: bfloat16). Recorded instead of the flags, so that a
    resume on other hardware or in another precision is refused, and the same precision spelled differently
    ("auto" and "float32" on a CPU) is not."""
    try:
        resolved, torch_dtype = (family or default_family()).execution(device, dtype)
    except ValueError as e:
        raise SetupError(f"--device {device}: {e}") from None
    return resolved.type, str(torch_dtype).replace("torch.", "")


def effective_conv_mode(model_path: str, conv_mode: str, family=None) -> str:
    """The template a run uses for this checkpoint (LLaVA: a pretrain-only "plain" checkpoint gets the
    ``_mmtag`` variant of --conv-mode, as LLaVA's scripts)."""
    return (family or default_family()).effective_conv_mode(model_path, conv_mode)


def default_family():
    """The family of a checkpoint that cannot be inspected before loading (a --model-base checkpoint)."""
    from restore.families import families

    return families()[0]


def load_plugins(modules: Sequence[str]) -> None:
    """Import each --plugin module; SetupError naming the one that cannot be imported."""
    import tokenreduction

    try:
        tokenreduction.load_plugins(modules)
    except ImportError as e:
        raise SetupError(f"--plugin: {e}") from None


def resolve_budget(args: argparse.Namespace, family: Any, num_patches: int) -> None:
    """``args.n_vis`` / ``args.keep`` as the checkpoint's family takes a budget: a share stays a share where
    images have different token counts (Qwen2.5-VL) and becomes round(keep * N) tokens where each has N.
    A share without --base is left for :func:`validate_reduction` to refuse."""
    keep = getattr(args, "keep", None)
    if keep is None or args.base is None:
        return
    try:
        args.n_vis, args.keep = family.budget(args.n_vis, keep, num_patches)
    except ValueError as e:
        raise SetupError(f"--keep {keep}: {e}") from None


def validate_reduction(base: Optional[str], n_vis: Optional[int], restore: bool,
                       num_patches: int = MAX_VISUAL_TOKENS, keep: Optional[float] = None) -> Optional[str]:
    """Canonical selector name (or None for no reduction); raises SetupError on impossible settings.
    ``keep``: the budget is that share of each image's tokens (a family with varying counts), not n_vis."""
    if base is None:
        if n_vis is not None or keep is not None:
            raise SetupError(f"{'--n_vis' if keep is None else '--keep'} needs --base: name the selector that keeps "
                             "the tokens (leave both out to run without reduction)")
        if restore:
            raise SetupError("--restore needs --base and --n_vis, e.g. --base HoloV --n_vis 64 --restore")
        return None
    import tokenreduction

    available = tokenreduction.available_selectors()
    if str(base).lower() not in {name.lower() for name in available}:
        raise SetupError(f"unknown --base {base!r}; available: {', '.join(available)}")
    if keep is not None:
        return tokenreduction.canonical_name(base)
    if n_vis is None:
        raise SetupError(f"--base {base} needs --n_vis (visual tokens to keep, 1..{num_patches}) or --keep "
                         "(a share of them)")
    if not 1 <= n_vis <= num_patches:
        raise SetupError(f"--n_vis must be in 1..{num_patches} (the checkpoint has {num_patches} "
                         f"visual tokens per image), got {n_vis}")
    return tokenreduction.canonical_name(base)


def reduction_settings(args: argparse.Namespace, base: Optional[str],
                       num_patches: int = MAX_VISUAL_TOKENS) -> Optional[ReductionSettings]:
    """The reduction the flags ask for (None: no reduction); SetupError for impossible settings."""
    overrides = overrides_from(args)
    if base is None:
        given = [f"--{k}" for k, v in overrides.items() if v is not None]
        if given:
            raise SetupError(f"{', '.join(given)} need --base and --n_vis (no reduction has no settings)")
        return None
    try:
        settings = resolve_settings(base, args.n_vis, bool(args.restore), num_patches,
                                    keep=getattr(args, "keep", None), **overrides)
    except ValueError as e:
        raise SetupError(f"reduction settings: {e}") from None
    return settings


def describe_reduction(base: Optional[str], n_vis: Optional[int], restore: bool,
                       settings: Optional[Mapping[str, Any]] = None, keep: Optional[float] = None) -> str:
    if base is None:
        return "none (all visual tokens)"
    extra = "".join(f", {k}={v}" for k, v in (settings or {}).items())
    budget = f"{n_vis} visual tokens" if keep is None else f"{100 * keep:g}% of each image's visual tokens"
    return f"{base}, {budget}" + (", RESTORE" if restore else "") + extra


def chunk_source(num_chunks: Optional[int], chunk_idx: Optional[int], env: Mapping[str, str]) -> str:
    """Where this process's chunk comes from: flags, a SLURM array, torchrun, or nowhere ("")."""
    if num_chunks is not None or chunk_idx is not None:
        return "--num-chunks/--chunk-idx"
    if env.get("SLURM_ARRAY_TASK_COUNT") and env.get("SLURM_ARRAY_TASK_ID"):
        return "SLURM_ARRAY_TASK_COUNT/SLURM_ARRAY_TASK_ID"
    if env.get("WORLD_SIZE") and env.get("RANK"):
        return "WORLD_SIZE/RANK"
    return ""


def resolve_chunk(num_chunks: Optional[int], chunk_idx: Optional[int],
                  env: Mapping[str, str] = os.environ) -> Tuple[int, int]:
    """(number of chunks, this chunk): explicit flags, else a SLURM array, else torchrun, else (1, 0)."""
    source = chunk_source(num_chunks, chunk_idx, env)
    try:
        if source.startswith("--"):
            if num_chunks is None:
                raise SetupError("--chunk-idx needs --num-chunks")
            n, k = num_chunks, 0 if chunk_idx is None else chunk_idx
        elif source.startswith("SLURM"):
            # array indices may start anywhere (--array=1-8): count from the first
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
            k = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0") or 0)
        elif source:
            n, k = int(env["WORLD_SIZE"]), int(env["RANK"])
        else:
            return 1, 0
    except ValueError:
        raise SetupError(f"{source} must be integers") from None
    if n < 1 or not 0 <= k < n:
        raise SetupError(f"chunk {k} of {n} (from {source}) is impossible: need 0 <= chunk < number of chunks")
    return n, k


def check_model_path(model_path: str):
    """(family, config) of the checkpoint, which exists and that family can load (from its config alone;
    no weights are read)."""
    from restore.families import CheckpointError, family_of_checkpoint

    try:
        family = family_of_checkpoint(os.path.expanduser(model_path))
        config = family.check_checkpoint(model_path)
    except (FileNotFoundError, CheckpointError) as e:
        raise SetupError(f"--model-path: {e}") from None
    return family, config


def checkpoint_family(args: argparse.Namespace):
    """(family, visual tokens per image before reduction) of --model-path, checked once per arguments.

    A --model-base checkpoint (LoRA or projector-only, LLaVA's notion) is checked when it loads: it gets
    the default family and LLaVA-1.5's token count."""
    known = getattr(args, "checkpoint", None)
    if known is not None:
        return known
    found = check_model_path(args.model_path) if args.model_base is None else None
    if found is None:
        known = (default_family(), MAX_VISUAL_TOKENS)
    else:
        family, config = found
        known = (family, family.visual_tokens_per_image(config))
    args.checkpoint = known
    return known


def local_or_hub(path: str) -> str:
    """An existing local path made absolute (resume works from any directory); a hub name as it is."""
    expanded = os.path.expanduser(path)
    return os.path.abspath(expanded) if os.path.exists(expanded) else path


def reduction_record(settings: Optional[ReductionSettings], base: Optional[str], n_vis: Optional[int]) -> Dict[str, Any]:
    """How an answers file records its reduction: base, n_vis and restore as the first release did, and
    ``reduction_settings`` only for settings away from the defaults, so that older answers files resume.
    Recorded by the reduction itself, not its spelling: two spellings of one configuration share answers."""
    if settings is None:
        return {"base": base, "n_vis": n_vis, "restore": False}
    as_restore = settings.named_as_restore
    overrides = settings.overrides(as_restore)
    # a share is recorded only when given, so that the records of counted budgets stay as they were
    share = {"n_vis": None, "keep": settings.keep} if settings.keep is not None else {"n_vis": n_vis}
    return {"base": base, **share, "restore": as_restore,
            **({"reduction_settings": overrides} if overrides else {})}


def common_settings(args: argparse.Namespace, base: Optional[str]) -> Dict[str, Any]:
    """The settings every entry point records in its answers file's meta (a resume must match them);
    check_arguments adds the resolved device type and dtype."""
    return {
        "model_path": local_or_hub(args.model_path),
        "model_base": args.model_base,
        "question_file": os.path.abspath(os.path.expanduser(args.question_file)),
        "image_folder": os.path.abspath(os.path.expanduser(args.image_folder)) if args.image_folder else None,
        "conv_mode": args.conv_mode,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
        # only when not LLaVA's, so that the answers files of LLaVA runs keep their settings record
        **({"prompt_style": args.prompt_style}
           if getattr(args, "prompt_style", DEFAULT_STYLE) != DEFAULT_STYLE else {}),
        **({"image_protocol": args.image_protocol} if getattr(args, "image_protocol", None) else {}),
        **reduction_record(getattr(args, "reduction", None), base, args.n_vis),
        # only when given, so that the answers files of runs without plugins keep their settings record
        **({"plugins": list(dict.fromkeys(args.plugin))} if args.plugin else {}),
    }
