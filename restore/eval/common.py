"""Machinery shared by the evaluation entry points.

An entry point (``vqa_loader``, ``mmbench``, ``science``, ``ocrbench``) only says how its question file
becomes a list of :class:`Item` and how an answer line looks. This module does the rest, in this order:
parse and validate every argument, read the questions, take this process's chunk, reconcile with an
existing answers file (resume), open and decode every image still to be answered, and only then load
the model, apply the token reduction and generate, appending one flushed answer line per item.

Next to every answers file ``X.jsonl`` lies ``X.jsonl.meta.json``: the settings that produced it, the
chunk it covers and whether it is complete. A resume with other settings is refused, and
``python -m restore.eval.common merge`` uses it to check every chunk before concatenating them.

Heavy imports (torch, PIL, llava) happen inside functions so that argument errors come back at once.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

DEFAULT_MODEL_PATH = "liuhaotian/llava-v1.5-7b"
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
MAX_VISUAL_TOKENS = 576  # 24 x 24 patches of CLIP ViT-L/14 at 336 px, LLaVA-1.5's vision tower
META_SUFFIX = ".meta.json"
ENTRY_MODULES = ("vqa_loader", "mmbench", "science", "ocrbench")


class SetupError(Exception):
    """A problem with the arguments or the data, found before the model is loaded."""


# --------------------------------------------------------------------------------------------------
# What an entry point provides


@dataclass(frozen=True)
class ImageRef:
    """Where an item's image comes from. ``label`` names it in error messages."""

    label: str
    path: Optional[str] = None
    base64: Optional[str] = None
    # The official vqa_loader/ocrbench convert to RGB before padding; model_vqa_mmbench and
    # model_vqa_science pad the image in the mode it was stored in. Kept as they do it.
    convert_rgb: bool = True

    def open(self):
        """Open and fully decode the image (a truncated file fails here, not in the middle of a run)."""
        from PIL import Image

        if self.base64 is not None:
            import base64
            import io

            image = Image.open(io.BytesIO(base64.b64decode(self.base64)))
        else:
            image = Image.open(self.path)
        image.load()
        return image.convert("RGB") if self.convert_rgb else image


@dataclass(frozen=True)
class Item:
    """One generation: the user's text (after the image placeholder) and its image, if any."""

    key: str  # identifies the item in its answers file; see answer_keys()
    text: str
    image: Optional[ImageRef]
    fields: Mapping[str, Any] = field(default_factory=dict)  # what the answer line copies from the question


@dataclass(frozen=True)
class EntryPoint:
    name: str
    description: str
    max_new_tokens: int
    needs_image_folder: bool
    add_arguments: Callable[[argparse.ArgumentParser], None]
    settings: Callable[[argparse.Namespace], Dict[str, Any]]  # bench-specific settings that change answers
    build_items: Callable[[Mapping[str, Any]], List[Item]]  # from the full settings dict; pure
    answer_line: Callable[[Item, str, str], Dict[str, Any]]  # (item, generated text, model_id)
    answer_key: Callable[[Mapping[str, Any]], str]  # base key of a written answer line
    ensure_ascii: bool = True
    single_pred_prompt: bool = False  # whether --single-pred-prompt exists


# --------------------------------------------------------------------------------------------------
# Arguments


def build_parser(entry: EntryPoint) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m restore.eval.{entry.name}",
        description=entry.description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("LLaVA evaluation arguments")
    g.add_argument("--model-path", default=DEFAULT_MODEL_PATH)
    g.add_argument("--model-base", default=None, help="base LLM for LoRA / projector-only checkpoints")
    g.add_argument("--question-file", required=True)
    g.add_argument("--image-folder", default=None, help="folder the question file's image paths are relative to")
    g.add_argument("--answers-file", required=True)
    g.add_argument("--conv-mode", default="vicuna_v1")
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
    r.add_argument("--restore", action="store_true", help="apply RESTORE on top of --base (needs --n_vis >= 2)")

    x = p.add_argument_group("execution")
    x.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    x.add_argument("--dtype", choices=["auto", "float16", "bfloat16", "float32"], default="auto",
                   help="auto = float16 on cuda, float32 on cpu")
    x.add_argument("--num-workers", type=int, default=None,
                   help="image preprocessing workers (default 4 on cuda, 0 on cpu)")
    x.add_argument("--overwrite", action="store_true",
                   help="discard an existing answers file instead of resuming it")
    x.add_argument("--no-image-check", action="store_true",
                   help="skip decoding every image up front (a corrupt image then fails mid-run)")
    return p


def validate_reduction(base: Optional[str], n_vis: Optional[int], restore: bool) -> Optional[str]:
    """Canonical selector name (or None for no reduction); raises SetupError on impossible settings."""
    if base is None:
        if n_vis is not None:
            raise SetupError("--n_vis needs --base: name the selector that keeps the tokens "
                             "(leave both out to run without reduction)")
        if restore:
            raise SetupError("--restore needs --base and --n_vis, e.g. --base HoloV --n_vis 64 --restore")
        return None
    import tokenreduction

    available = tokenreduction.available_selectors()
    if str(base).lower() not in {name.lower() for name in available}:
        raise SetupError(f"unknown --base {base!r}; available: {', '.join(available)}")
    if n_vis is None:
        raise SetupError(f"--base {base} needs --n_vis (visual tokens to keep, 1..{MAX_VISUAL_TOKENS})")
    if not 1 <= n_vis <= MAX_VISUAL_TOKENS:
        raise SetupError(f"--n_vis must be in 1..{MAX_VISUAL_TOKENS} (LLaVA-1.5 has {MAX_VISUAL_TOKENS} "
                         f"visual tokens), got {n_vis}")
    if restore and n_vis < 2:
        raise SetupError("--restore needs --n_vis >= 2 (half of the budget is kept, the rest merged)")
    return tokenreduction.canonical_name(base)


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


def chunk_bounds(total: int, num_chunks: int, chunk_idx: int) -> Tuple[int, int]:
    """[start, stop) of a chunk: contiguous slices of ceil(total / num_chunks), as LLaVA's get_chunk."""
    size = math.ceil(total / num_chunks) if total else 0
    start = min(chunk_idx * size, total)
    return start, min(start + size, total)


# --------------------------------------------------------------------------------------------------
# Reading inputs


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SetupError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
    return rows


def read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise SetupError(f"{path}: not valid JSON ({e})") from None


def require_fields(row: Mapping[str, Any], names: Iterable[str], where: str) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise SetupError(f"{where} lacks the field(s) {', '.join(missing)}; is this the right question file?")


def numbered_keys(base_keys: Iterable[str]) -> List[str]:
    """Make keys unique by counting repeats: MME asks two questions per image under one question_id."""
    seen: Dict[str, int] = {}
    out = []
    for key in base_keys:
        n = seen.get(key, 0)
        seen[key] = n + 1
        out.append(f"{key}#{n}")
    return out


# --------------------------------------------------------------------------------------------------
# Answers files: resume, meta, order


def meta_path(answers_file: str) -> str:
    return answers_file + META_SUFFIX


def read_meta(answers_file: str) -> Optional[Dict[str, Any]]:
    path = meta_path(answers_file)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_meta(answers_file: str, meta: Mapping[str, Any]) -> None:
    write_atomic(meta_path(answers_file), json.dumps(meta, indent=1, sort_keys=True) + "\n")


def read_answer_lines(path: str) -> Tuple[List[Dict[str, Any]], bool]:
    """Parsed answer lines, and whether the file needs rewriting before appending to it: a cut-off last
    line (a killed run) was left out, or the last line lacks its newline."""
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    segments = raw.split("\n")
    lines: List[Dict[str, Any]] = []
    dropped = False
    for number, segment in enumerate(segments, 1):
        if not segment.strip():
            continue
        try:
            lines.append(json.loads(segment))
        except json.JSONDecodeError:
            if number == len(segments):  # last segment, no newline after it: an interrupted write
                dropped = True
                continue
            raise SetupError(f"{path}, line {number} is not valid JSON: the file is damaged; "
                             "delete it or pass --overwrite") from None
    return lines, dropped or (raw.strip() != "" and not raw.endswith("\n"))


def answer_keys(entry: EntryPoint, lines: Iterable[Mapping[str, Any]]) -> List[str]:
    return numbered_keys(entry.answer_key(line) for line in lines)


def dumps_line(entry: EntryPoint, line: Mapping[str, Any]) -> str:
    return json.dumps(line, ensure_ascii=entry.ensure_ascii) + "\n"


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class Plan:
    """Everything decided before the model loads."""

    entry: EntryPoint
    args: argparse.Namespace
    settings: Dict[str, Any]
    num_chunks: int
    chunk_idx: int
    items: List[Item]  # this chunk, question order (keys numbered)
    done: Dict[str, Dict[str, Any]]  # key -> existing answer line
    pending: List[Item]
    repaired: bool  # the answers file must be rewritten (cut-off line, overwrite)


def local_or_hub(path: str) -> str:
    """An existing local path made absolute (resume works from any directory); a hub name as it is."""
    expanded = os.path.expanduser(path)
    return os.path.abspath(expanded) if os.path.exists(expanded) else path


def common_settings(args: argparse.Namespace, base: Optional[str]) -> Dict[str, Any]:
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
        "base": base,
        "n_vis": args.n_vis,
        "restore": bool(args.restore),
        "dtype": args.dtype,
    }


def chunk_items(entry: EntryPoint, settings: Mapping[str, Any], num_chunks: int, chunk_idx: int) -> List[Item]:
    items = entry.build_items(settings)
    keys = numbered_keys(item.key for item in items)
    items = [Item(key=k, text=it.text, image=it.image, fields=it.fields) for k, it in zip(keys, items)]
    start, stop = chunk_bounds(len(items), num_chunks, chunk_idx)
    return items[start:stop]


def plan_run(entry: EntryPoint, args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Plan:
    """Validate everything that can be checked without the model."""
    base = validate_reduction(args.base, args.n_vis, args.restore)
    num_chunks, chunk_idx = resolve_chunk(args.num_chunks, args.chunk_idx, env)
    if args.max_new_tokens < 1:
        raise SetupError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.num_beams < 1:
        raise SetupError(f"--num_beams must be at least 1, got {args.num_beams}")
    if args.temperature < 0:
        raise SetupError(f"--temperature must be >= 0, got {args.temperature}")

    question_file = os.path.expanduser(args.question_file)
    if not os.path.isfile(question_file):
        raise SetupError(f"question file not found: {question_file} (see docs/evaluation.md for the data layout)")
    if entry.needs_image_folder:
        if not args.image_folder:
            raise SetupError("--image-folder is required: the folder the question file's image paths are relative to")
        if not os.path.isdir(os.path.expanduser(args.image_folder)):
            raise SetupError(f"image folder not found: {args.image_folder}")

    if args.model_base is None:
        check_model_path(args.model_path)
    from llava.conversation import conv_templates

    if args.conv_mode not in conv_templates:
        raise SetupError(f"unknown --conv-mode {args.conv_mode!r}; available: {', '.join(sorted(conv_templates))}")
    settings = {**common_settings(args, base), **entry.settings(args)}
    items = chunk_items(entry, settings, num_chunks, chunk_idx)

    answers_file = os.path.expanduser(args.answers_file)
    done: Dict[str, Dict[str, Any]] = {}
    repaired = False
    if os.path.exists(answers_file) and args.overwrite:
        repaired = True
    elif os.path.exists(answers_file):
        lines, repaired = read_answer_lines(answers_file)
        if lines:
            check_resumable(entry, answers_file, settings, num_chunks, chunk_idx)
            wanted = {item.key for item in items}
            for key, line in zip(answer_keys(entry, lines), lines):
                if key not in wanted:
                    raise SetupError(f"{answers_file} holds an answer ({key.rsplit('#', 1)[0]}) to a question that is "
                                     "not in this chunk: it belongs to another run; delete it or pass --overwrite")
                done[key] = line
    pending = [item for item in items if item.key not in done]
    return Plan(entry, args, settings, num_chunks, chunk_idx, items, done, pending, repaired)


def check_model_path(model_path: str) -> None:
    """The checkpoint exists and LLaVA can load it (from its config alone; no weights are read)."""
    from llava_patches.loading import CheckpointError, check_checkpoint

    try:
        check_checkpoint(os.path.expanduser(model_path))
    except (FileNotFoundError, CheckpointError) as e:
        raise SetupError(f"--model-path: {e}") from None


def check_resumable(entry: EntryPoint, answers_file: str, settings: Mapping[str, Any],
                    num_chunks: int, chunk_idx: int) -> None:
    meta = read_meta(answers_file)
    if meta is None:
        raise SetupError(f"{answers_file} already holds answers but no record of the settings that produced them "
                         f"({meta_path(answers_file)} is missing); pass --overwrite to start over")
    ours = {"entry": entry.name, "num_chunks": num_chunks, "chunk_idx": chunk_idx, **settings}
    theirs = {"entry": meta.get("entry"), "num_chunks": meta.get("num_chunks"),
              "chunk_idx": meta.get("chunk_idx"), **meta.get("settings", {})}
    changed = [f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(ours) | set(theirs))
               if ours.get(k) != theirs.get(k)]
    if changed:
        raise SetupError(f"{answers_file} was produced with other settings ({'; '.join(changed)}); "
                         "pass --overwrite to discard it, or write to another --answers-file")


def check_images(items: Sequence[Item], decode: bool = True) -> None:
    """Every pending image exists and decodes; lists the first few that do not."""
    missing = [it.image.path for it in items if it.image and it.image.path and not os.path.isfile(it.image.path)]
    missing = list(dict.fromkeys(missing))
    if missing:
        shown = "\n  ".join(missing[:5])
        more = f"\n  ... and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise SetupError(f"{len(missing)} image(s) of this chunk not found:\n  {shown}{more}")
    if not decode:
        return
    refs = list(dict.fromkeys(it.image for it in items if it.image is not None))
    if not refs:
        return
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    def try_open(ref: ImageRef) -> Optional[str]:
        try:
            ref.open()
            return None
        except Exception as e:  # PIL raises many types for bad files
            return f"{ref.path or ref.label}: {type(e).__name__}: {e}"

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # decoding releases the GIL
        problems = [p for p in tqdm(pool.map(try_open, refs), total=len(refs), desc="checking images",
                                    disable=len(refs) < 50, mininterval=_tqdm_interval()) if p]
    if problems:
        shown = "\n  ".join(problems[:5])
        more = f"\n  ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise SetupError(f"{len(problems)} image(s) of this chunk cannot be decoded:\n  {shown}{more}")


def _tqdm_interval() -> float:
    return 0.1 if sys.stderr.isatty() else 30.0  # a log file gets a line every 30 s, not a flood


def run(entry: EntryPoint, argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser(entry).parse_args(argv)
    try:
        plan = plan_run(entry, args)
        source = chunk_source(args.num_chunks, args.chunk_idx, os.environ)
        print(f"[{entry.name}] chunk {plan.chunk_idx + 1}/{plan.num_chunks}"
              f"{f' (from {source})' if source else ''}: {len(plan.items)} items, "
              f"{len(plan.items) - len(plan.pending)} already answered; reduction: "
              f"{describe_reduction(plan.settings['base'], args.n_vis, args.restore)}", flush=True)
        if not args.no_image_check:
            check_images(plan.pending)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    generate_answers(plan)
    return 0


def generate_answers(plan: Plan) -> None:
    args, entry = plan.args, plan.entry
    answers_file = os.path.expanduser(args.answers_file)
    meta = {"entry": entry.name, "settings": plan.settings, "num_chunks": plan.num_chunks,
            "chunk_idx": plan.chunk_idx, "n_items": len(plan.items), "complete": False}
    write_meta(answers_file, meta)
    if plan.repaired or not os.path.exists(answers_file):
        write_atomic(answers_file, "".join(dumps_line(entry, plan.done[i.key]) for i in plan.items if i.key in plan.done))

    start = time.perf_counter()
    n_tokens, generation_s = _generate(plan, answers_file) if plan.pending else (0, 0.0)
    wall = time.perf_counter() - start

    # Resumed answers may have come from runs in another order: store them in question order.
    lines, _ = read_answer_lines(answers_file)
    by_key = dict(zip(answer_keys(entry, lines), lines))
    missing = [i.key for i in plan.items if i.key not in by_key]
    if missing:  # cannot happen unless someone wrote to the file meanwhile
        raise RuntimeError(f"{answers_file}: {len(missing)} answers missing after the run, e.g. {missing[0]}")
    write_atomic(answers_file, "".join(dumps_line(entry, by_key[i.key]) for i in plan.items))
    write_meta(answers_file, {**meta, "complete": True})

    n_new = len(plan.pending)
    rate = (f"{n_tokens} tokens generated in {generation_s:.1f} s, {n_tokens / max(generation_s, 1e-9):.1f} tokens/s"
            if n_new else "nothing to generate")
    print(f"[{entry.name}] chunk {plan.chunk_idx + 1}/{plan.num_chunks}: {len(plan.items)} items "
          f"({n_new} answered now, {len(plan.items) - n_new} kept from an earlier run) in {wall:.1f} s, {rate}; "
          f"answers: {answers_file}", flush=True)


def _generate(plan: Plan, answers_file: str) -> Tuple[int, float]:
    """Load the model and answer the pending items; (generated tokens, seconds spent generating)."""
    import torch
    from tqdm import tqdm

    args, entry = plan.args, plan.entry
    tokenizer, model, image_processor, model_name = load_model_for_eval(args, plan.settings["base"])
    conv_mode = args.conv_mode
    if "plain" in model_name and "finetune" not in model_name.lower() and "mmtag" not in conv_mode:
        conv_mode += "_mmtag"  # as LLaVA's scripts: a pretrain-only checkpoint needs the mmtag template
        print(f"{model_name} looks like a plain (pretrain-only) model: using conv mode {conv_mode}")

    device = next(model.parameters()).device
    dtype = next(model.get_model().mm_projector.parameters()).dtype
    dataset = PreparedItems(plan.pending, tokenizer, image_processor, model.config, conv_mode)
    workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=_identity)
    # Sampling parameters only when sampling: greedy decoding ignores them (and transformers warns).
    sampling: Dict[str, Any] = {"do_sample": False}
    if args.temperature > 0:
        sampling = {"do_sample": True, "temperature": args.temperature}
        if args.top_p is not None:
            sampling["top_p"] = args.top_p
    n_tokens = 0
    started = time.perf_counter()
    with open(answers_file, "a", encoding="utf-8") as out:
        for item, (input_ids, pixels, size) in tqdm(zip(plan.pending, loader), total=len(plan.pending),
                                                    desc=f"{entry.name} chunk {plan.chunk_idx + 1}/{plan.num_chunks}",
                                                    mininterval=_tqdm_interval()):
            with torch.inference_mode():
                output_ids = model.generate(
                    input_ids.unsqueeze(0).to(device),
                    images=None if pixels is None else pixels.unsqueeze(0).to(device=device, dtype=dtype),
                    image_sizes=None if size is None else [size],
                    num_beams=args.num_beams,
                    max_new_tokens=args.max_new_tokens,
                    use_cache=True,
                    **sampling,
                )
            n_tokens += int(output_ids.shape[-1])
            text = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
            out.write(dumps_line(entry, entry.answer_line(item, text, model_name)))
            out.flush()
    return n_tokens, time.perf_counter() - started


def _identity(x):
    return x


class PreparedItems:
    """Map-style dataset: prompt ids, preprocessed image and original size of each pending item."""

    def __init__(self, items: Sequence[Item], tokenizer, image_processor, model_config, conv_mode: str):
        self.items, self.tokenizer, self.image_processor = items, tokenizer, image_processor
        self.model_config, self.conv_mode = model_config, conv_mode

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import tokenizer_image_token

        item = self.items[index]
        prompt = build_prompt(item.text, item.image is not None, self.conv_mode,
                              getattr(self.model_config, "mm_use_im_start_end", False))
        input_ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        if item.image is None:
            return input_ids, None, None
        image = item.image.open()
        return input_ids, preprocess_image(image, self.image_processor, self.model_config), image.size


def build_prompt(text: str, has_image: bool, conv_mode: str, im_start_end: bool) -> str:
    """The full conversation prompt: the image placeholder, a newline, the question; then the assistant turn."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    from llava.conversation import conv_templates

    if has_image:
        placeholder = (DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
                       if im_start_end else DEFAULT_IMAGE_TOKEN)
        text = placeholder + "\n" + text
    conv = conv_templates[conv_mode].copy()
    conv.append_message(conv.roles[0], text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def preprocess_image(image, image_processor, model_config):
    from llava.mm_utils import process_images

    try:
        return process_images([image], image_processor, model_config)[0]
    except TypeError:
        # Padding an image whose mode takes no RGB fill colour (L, LA, I;16...) fails inside LLaVA, which
        # would stop the official scripts; converting such an image to RGB first is the only way on.
        return process_images([image.convert("RGB")], image_processor, model_config)[0]


def load_model_for_eval(args: argparse.Namespace, base: Optional[str]):
    """(tokenizer, model with the reduction applied, image processor, model_name)."""
    import restore
    from llava.mm_utils import get_model_name_from_path

    model_path = os.path.expanduser(args.model_path)
    model_name = get_model_name_from_path(model_path)
    print(f"loading model {model_path} (device {args.device}, dtype {args.dtype})", flush=True)
    if args.model_base is None:
        from llava_patches.loading import load_model

        tokenizer, model, image_processor, _ = load_model(model_path, device=args.device, dtype=args.dtype)
    else:
        tokenizer, model, image_processor = _load_with_base(model_path, args.model_base, model_name, args)
    if base is None:
        model = restore.apply(model, base=None)
    else:
        model = restore.apply(model, base=base, n_vis=args.n_vis, restore=args.restore)
    print(f"model loaded; reduction: {describe_reduction(base, args.n_vis, args.restore)}", flush=True)
    return tokenizer, model, image_processor, model_name


def _load_with_base(model_path: str, model_base: str, model_name: str, args: argparse.Namespace):
    """LoRA / projector-only checkpoints on top of --model-base: LLaVA's builder, then one device and dtype."""
    from llava.model.builder import load_pretrained_model
    from llava_patches.loading import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        model_path, model_base, model_name, device_map=str(device), device=str(device))
    model.to(device=device, dtype=dtype).eval()
    return tokenizer, model, image_processor


def describe_reduction(base: Optional[str], n_vis: Optional[int], restore: bool) -> str:
    if base is None:
        return "none (all visual tokens)"
    return f"{base}, {n_vis} visual tokens" + (", RESTORE" if restore else "")


# --------------------------------------------------------------------------------------------------
# Tools for scripts/llava1_5/*.sh: merge shard files, record a result


def entry_by_name(name: str) -> EntryPoint:
    import importlib

    if name not in ENTRY_MODULES:
        raise SetupError(f"unknown entry point {name!r}; known: {', '.join(ENTRY_MODULES)}")
    return importlib.import_module(f"restore.eval.{name}").ENTRY


def chunk_problems(chunk_files: Sequence[str]) -> Tuple[List[str], Optional[Dict[str, Any]]]:
    """What keeps these chunk files (given in chunk order) from being one complete answer set."""
    problems: List[str] = []
    reference: Optional[Dict[str, Any]] = None
    for position, path in enumerate(chunk_files):
        meta = read_meta(path)
        if meta is None or not os.path.exists(path):
            problems.append(f"{path}: missing (its shard has not run or died before writing)")
            continue
        if reference is None:
            reference = meta
        if meta.get("entry") != reference.get("entry") or meta.get("settings") != reference.get("settings"):
            problems.append(f"{path}: produced with other settings than {chunk_files[0]}")
            continue
        if meta.get("num_chunks") != len(chunk_files) or meta.get("chunk_idx") != position:
            problems.append(f"{path}: holds chunk {meta.get('chunk_idx')} of {meta.get('num_chunks')}, "
                            f"expected chunk {position} of {len(chunk_files)}")
            continue
        if not meta.get("complete"):
            problems.append(f"{path}: incomplete (its shard was interrupted or is still running)")
            continue
        entry = entry_by_name(meta["entry"])
        expected = [i.key for i in chunk_items(entry, meta["settings"], len(chunk_files), position)]
        lines, cut = read_answer_lines(path)
        found = answer_keys(entry, lines)
        if cut or found != expected:
            problems.append(f"{path}: {len(found)} answers, expected {len(expected)} in question order")
    return problems, reference


def merge_chunks(chunk_files: Sequence[str], out: str) -> int:
    """Concatenate complete chunk files in order into ``out`` (atomically); returns the number of answers."""
    problems, meta = chunk_problems(chunk_files)
    if problems:
        raise SetupError("cannot merge:\n  " + "\n  ".join(problems))
    assert meta is not None
    parts = []
    for path in chunk_files:
        with open(path, encoding="utf-8") as f:
            parts.append(f.read())
    text = "".join(parts)
    write_atomic(out, text)
    n = text.count("\n")
    write_meta(out, {"entry": meta["entry"], "settings": meta["settings"], "num_chunks": 1, "chunk_idx": 0,
                     "n_items": n, "complete": True, "merged_from": list(chunk_files)})
    return n


def write_result_record(results_dir: str, benchmark: str, answers_file: str, metrics_file: str,
                        model: str, wall_time_s: float) -> Tuple[str, Dict[str, Any]]:
    """One JSON file per run under results_dir, as restore.report reads them; (path, record)."""
    import datetime

    meta = read_meta(answers_file) or {}
    settings = meta.get("settings", {})
    scored = read_json(metrics_file)
    with open(answers_file, encoding="utf-8") as f:
        n_items = sum(1 for line in f if line.strip())
    now = datetime.datetime.now(datetime.timezone.utc)
    base = settings.get("base")
    record = {
        "benchmark": benchmark,
        # restore.report's convention for "no reduction"
        "base": base if base else "none",
        "n_vis": settings.get("n_vis") if base else MAX_VISUAL_TOKENS,
        "restore": bool(settings.get("restore", False)),
        "model": model,
        "metrics": scored.get("metrics", {}),
        "main_metric": scored.get("main_metric"),
        "n_items": n_items,
        "n_missing": scored.get("n_missing", 0),
        "wall_time_s": round(float(wall_time_s), 3),
        "timestamp": now.isoformat(timespec="seconds"),
        "settings": settings,
        "answers_file": os.path.abspath(answers_file),
    }
    tag = run_tag(base, record["n_vis"], record["restore"])
    path = os.path.join(results_dir, f"{benchmark}__{model}__{tag}__{now:%Y%m%dT%H%M%S}-{os.getpid()}.json")
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return path, record


def finish_run(benchmark: str, chunk_files: Sequence[str], answers_dir: str, data_root: str, results_dir: str,
               model: str, wall_time_s: float) -> int:
    """Merge the chunks, score with restore.eval.scoring, write the result record; an exit status."""
    from restore.eval.scoring.__main__ import main as score_main

    merged = os.path.join(answers_dir, "merge.jsonl")
    n = merge_chunks(chunk_files, merged)
    print(f"merged {len(chunk_files)} chunk file(s), {n} answers -> {merged}")
    scores = os.path.join(answers_dir, "scores")
    status = score_main([benchmark, "--answers", merged, "--data-root", data_root, "--out-dir", scores,
                         "--model-id", model])
    if status:
        return status
    path, record = write_result_record(results_dir, benchmark, merged, os.path.join(scores, "metrics.json"),
                                       model, wall_time_s)
    main_metric = record["main_metric"]
    value = record["metrics"].get(main_metric) if main_metric else None
    shown = f"{main_metric} = {value:.2f}" if isinstance(value, (int, float)) else "no local score"
    print(f"[{benchmark}] {model}, {describe_reduction(record['settings'].get('base'), record['n_vis'], record['restore'])}: "
          f"{shown} ({record['n_items']} answers, inference {wall_time_s:.0f} s); result: {path}")
    return 0


def run_tag(base: Optional[str], n_vis: Optional[int], restore: bool) -> str:
    if base is None:
        return "full"
    return f"{base}-{n_vis}" + ("-restore" if restore else "")


def _tools_main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m restore.eval.common",
                                description="helpers of scripts/llava1_5/*.sh")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="check chunk files (given in chunk order) and concatenate them")
    m.add_argument("--out", required=True)
    m.add_argument("--check", action="store_true", help="only check; exit 3 if some chunk is not complete yet")
    m.add_argument("chunks", nargs="+")
    f = sub.add_parser("finish", help="merge chunk files, score them, write a result record")
    f.add_argument("--benchmark", required=True)
    f.add_argument("--answers-dir", required=True)
    f.add_argument("--data-root", required=True)
    f.add_argument("--results-dir", required=True)
    f.add_argument("--model", required=True)
    f.add_argument("--wall-time", type=float, required=True)
    f.add_argument("chunks", nargs="+")
    a = p.parse_args(argv)
    try:
        if a.command == "merge":
            if a.check:
                problems, _ = chunk_problems(a.chunks)
                for problem in problems:
                    print(problem)
                return 3 if problems else 0
            n = merge_chunks(a.chunks, a.out)
            print(f"merged {len(a.chunks)} chunk file(s), {n} answers -> {a.out}")
            return 0
        return finish_run(a.benchmark, a.chunks, a.answers_dir, a.data_root, a.results_dir, a.model, a.wall_time)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_tools_main())
