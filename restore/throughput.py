"""Throughput of the evaluation entry points: ``python -m restore.bench throughput``.

Everything runs through the real entry points (``restore.eval.vqa_loader``, ``restore.eval.mmbench``),
called in-process on fixture-format data (``restore.eval.fixtures``) written to a temporary folder:

1. items per second at each ``--batch-sizes`` for three workloads: ``short`` (GQA-like questions, 3 new
   tokens), ``letter`` (MMBench-like, one option letter) and ``long`` (a description, 128 tokens);
2. seven configurations (full and HoloV, DivPrune, VisPruner at n_vis 64 with and without RESTORE) as
   seven separate runs, each loading the model as a separate script does, against one run that sweeps
   them (``--configs``): wall time, model loads and vision-encoder forwards of each, and whether the
   two give the same answers.

Time per run is the entry point's wall time minus the time spent loading the model (measured by a
wrapper around the model family's ``load``, which the entry points call): question planning, image
preprocessing, generation and writing the answers count; loading does not. Generated tokens are
counted at the LM head: one per batch row per generation step (a row that ended early still takes its
steps, as padding). Speed is reported as ratios of one run; nothing here asserts a time.

Outputs: a table on stdout, ``throughput.json``, ``throughput.txt`` and ``throughput.png`` in --out.
See docs/efficiency.md, "Throughput: batch sizes, and a sweep against separate runs".
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

DEFAULT_OUT = Path("playground/bench")
BATCH_TARGET = 4.0  # short answers: items/s at batch 16 >= 4x batch 1
SWEEP_TARGET = 0.5  # one sweep of the 7 configurations <= 0.5x the time of 7 separate runs
TARGET_BATCH = 16
SWEEP_CONFIGS = ("full", "holov-64", "holov-64-restore", "divprune-64", "divprune-64-restore",
                 "vispruner-64", "vispruner-64-restore")
LONG_PROMPT = "Describe this image in detail."


@dataclass(frozen=True)
class Workload:
    name: str
    like: str  # what kind of benchmark it stands for
    entry: str  # restore.eval.<entry>
    max_new_tokens: int
    items: int  # default number of items


WORKLOADS: Dict[str, Workload] = {w.name: w for w in (
    Workload("short", "GQA-like: a word or phrase", "vqa_loader", 3, 32),
    Workload("letter", "MMBench-like: an option letter", "mmbench", 1, 32),
    Workload("long", "a detailed description", "vqa_loader", 128, 16),
)}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

@dataclass
class WorkloadData:
    workload: Workload
    question_file: str
    image_folder: Optional[str]
    n_items: int
    n_images: int  # distinct image files (MMBench: one base64 image per row)


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


def prepare_data(root: Path, items: Dict[str, int], seed: int = 0) -> Tuple[Dict[str, WorkloadData], WorkloadData]:
    """Question files of exactly ``items[name]`` items for each workload named, under ``root``, and a
    two-item short one for a warm-up run.

    Short and long questions ask about GQA fixture images (two questions per image, nine sizes and
    aspect ratios); the long one asks for a description instead. Letter items are MMBench TSV rows."""
    from restore.eval.fixtures import make_fixtures

    gqa_n = max([items.get("short", 0), items.get("long", 0), 1])
    letter_n = items.get("letter", 0)
    benchmarks = ["gqa"] + (["mmbench"] if letter_n else [])
    # every MMBench fixture question comes as 2 to 4 circular rows: n/2 questions give at least n rows
    make_fixtures(root / "fixtures", n=max(gqa_n, (letter_n + 1) // 2), seed=seed, benchmarks=benchmarks)
    gqa = root / "fixtures" / "gqa"
    folder = str(gqa / "data" / "images")
    lines = (gqa / "llava_gqa_testdev_balanced.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    data: Dict[str, WorkloadData] = {}
    warmup = root / "warmup.jsonl"
    _write_lines(warmup, lines[:2])
    warm = WorkloadData(WORKLOADS["short"], str(warmup), folder, len(lines[:2]), 1)
    for name in ("short", "long"):
        if name not in items:
            continue
        chosen = [json.loads(line) for line in lines[:items[name]]]
        if name == "long":
            chosen = [{**q, "text": LONG_PROMPT} for q in chosen]
        path = root / f"{name}.jsonl"
        _write_lines(path, [json.dumps(q) + "\n" for q in chosen])
        data[name] = WorkloadData(WORKLOADS[name], str(path), folder, len(chosen), len({q["image"] for q in chosen}))
    if letter_n:
        rows = (root / "fixtures" / "mmbench" / "mmbench_dev_20230712.tsv").read_text(encoding="utf-8")
        header, *body = rows.splitlines(keepends=True)  # base64 cells hold no tab nor newline
        path = root / "letter.tsv"
        _write_lines(path, [header] + body[:letter_n])
        data["letter"] = WorkloadData(WORKLOADS["letter"], str(path), None, len(body[:letter_n]), len(body[:letter_n]))
    return data, warm


# --------------------------------------------------------------------------------------------------
# Instrumented entry-point runs
# --------------------------------------------------------------------------------------------------

@dataclass
class Counts:
    model_loads: int = 0
    load_s: float = 0.0
    vision_forwards: int = 0  # images through CLIP's embeddings, whichever path encodes them
    vision_calls: int = 0
    tokens: int = 0  # batch rows x generation steps, at the LM head


class Instrument:
    """While active, counts the models the entry points load and the images their vision encoders see.

    The entry points load through their model family (``args.family.load``, restore.families); the
    wrapper installed on every registered family also puts forward pre-hooks on each loaded model: on
    CLIP's embedding layer, which the stock ``encode_images``, the reduced path and a sweep's shared
    encoding (``llava_patches.vision``) each call once per batch of images, and on the LM head. With
    ``build`` the wrapper returns that model instead of reading the checkpoint (the 7B-shaped model)."""

    def __init__(self, build: Optional[Callable[[str, str], tuple]] = None):
        self.counts = Counts()
        self.build = build
        self._handles: List[Any] = []

    def _count_images(self, _module, inputs) -> None:
        self.counts.vision_calls += 1
        self.counts.vision_forwards += int(inputs[0].shape[0])

    def _count_tokens(self, _module, inputs) -> None:
        self.counts.tokens += int(inputs[0].shape[0])

    def _watch(self, model) -> None:
        try:
            clip = model.get_vision_tower().vision_tower.vision_model
        except AttributeError:
            raise ValueError(f"the throughput bench counts CLIP forwards of LLaVA models; {type(model).__name__} "
                             "has no LLaVA CLIP tower") from None
        self._handles.append(clip.embeddings.register_forward_pre_hook(self._count_images))
        # every generation step, the prefill's included, ends in the LM head: one token per row
        self._handles.append(model.lm_head.register_forward_pre_hook(self._count_tokens))

    @contextlib.contextmanager
    def active(self) -> Iterator["Instrument"]:
        from restore.families import LoadedModel, families

        def wrap(family):
            original = family.load

            def load(model_path, **kwargs):
                started = time.perf_counter()
                if self.build is not None:
                    tokenizer, model, processor, _ = self.build(kwargs.get("device", "auto"), kwargs.get("dtype", "auto"))
                    loaded = LoadedModel(tokenizer, model, processor, family.model_name(model_path))
                else:
                    loaded = original(model_path, **kwargs)
                self._watch(loaded.model)
                self.counts.model_loads += 1
                self.counts.load_s += time.perf_counter() - started
                return loaded

            return load

        wrapped = families()
        for family in wrapped:
            family.load = wrap(family)  # an instance attribute, over the class's method
        try:
            yield self
        finally:
            for family in wrapped:
                vars(family).pop("load", None)
            for handle in self._handles:
                handle.remove()
            self._handles.clear()


@dataclass
class RunResult:
    argv: List[str]
    wall_s: float
    load_s: float
    model_loads: int
    vision_forwards: int
    tokens: int
    output: str = field(repr=False, default="")

    @property
    def seconds(self) -> float:
        """Wall time without model loading."""
        return self.wall_s - self.load_s


class EntryPointFailed(RuntimeError):
    pass


def run_entry(entry: str, argv: List[str], instrument: Instrument) -> RunResult:
    """One in-process run of ``restore.eval.<entry>`` with ``argv``; its output is kept, not shown."""
    import importlib

    main = importlib.import_module(f"restore.eval.{entry}").main
    before = asdict(instrument.counts)
    buffer = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        try:
            status = main(argv)
        except SystemExit as stop:  # argparse refuses a flag by exiting
            status = stop.code
    wall = time.perf_counter() - started
    output = buffer.getvalue()
    if status not in (0, None):
        raise EntryPointFailed(f"restore.eval.{entry} {' '.join(argv)} exited with {status}:\n{output[-3000:]}")
    after = instrument.counts
    return RunResult(
        argv=list(argv), wall_s=wall, load_s=after.load_s - before["load_s"],
        model_loads=after.model_loads - before["model_loads"],
        vision_forwards=after.vision_forwards - before["vision_forwards"],
        tokens=after.tokens - before["tokens"],
        output=output,
    )


@dataclass(frozen=True)
class Execution:
    """What every run shares: the checkpoint path given to the entry point, device and dtype."""

    model_path: str
    device: str
    dtype: str

    def flags(self) -> List[str]:
        return ["--model-path", self.model_path, "--device", self.device, "--dtype", self.dtype,
                "--overwrite", "--no-image-check"]


def workload_argv(data: WorkloadData, answers_file: str, batch_size: int, max_new_tokens: int,
                  execution: Execution, extra: Sequence[str] = ()) -> List[str]:
    argv = execution.flags() + ["--question-file", data.question_file, "--answers-file", answers_file,
                                "--batch-size", str(batch_size), "--max_new_tokens", str(max_new_tokens)]
    if data.image_folder is not None:
        argv += ["--image-folder", data.image_folder]
    if data.workload.entry == "mmbench":
        argv.append("--single-pred-prompt")
    return argv + list(extra)


def config_flags(tag: str) -> List[str]:
    """Entry-point flags of one configuration named as a run (``full``, ``holov-64-restore``)."""
    from restore.eval.naming import spec_flags
    from restore.settings import parse_run_tag

    unknown = sorted(set(parse_run_tag(tag) or {}) - {"base", "n_vis", "restore"})
    if unknown:
        raise ValueError(f"configuration {tag!r}: settings {unknown} are not supported by the throughput bench")
    return spec_flags(tag)


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------

def _progress(total: int, desc: str):
    from tqdm import tqdm

    # created outside the entry points' redirected streams, so it stays on the terminal
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def measure_batches(data: Dict[str, WorkloadData], batch_sizes: Sequence[int], execution: Execution,
                    instrument: Instrument, work: Path, repeats: int = 1,
                    max_new_tokens: Optional[Dict[str, int]] = None, config: str = "full") -> List[dict]:
    """One row per (workload, batch size): items/s and tokens/s of the best of ``repeats`` runs."""
    rows = []
    with _progress(len(data) * len(batch_sizes) * repeats, "throughput: batch sizes") as progress:
        for name, wd in data.items():
            tokens = (max_new_tokens or {}).get(name, wd.workload.max_new_tokens)
            for batch in batch_sizes:
                runs = []
                for _ in range(repeats):
                    argv = workload_argv(wd, str(work / f"{name}-b{batch}.jsonl"), batch, tokens, execution,
                                         config_flags(config))
                    runs.append(run_entry(wd.workload.entry, argv, instrument))
                    progress.update(1)
                best = min(runs, key=lambda r: r.seconds)
                rows.append({
                    "workload": name, "like": wd.workload.like, "entry": wd.workload.entry, "config": config,
                    "batch_size": batch,
                    "items": wd.n_items, "max_new_tokens": tokens, "seconds": best.seconds,
                    "items_per_s": wd.n_items / best.seconds, "tokens": best.tokens,
                    "tokens_per_s": best.tokens / best.seconds, "load_s": best.load_s,
                    "vision_forwards": best.vision_forwards, "runs_s": [r.seconds for r in runs],
                })
    return rows


def batch_speedups(rows: List[dict]) -> Dict[str, dict]:
    """Per workload: items/s of each batch size over batch 1's."""
    result = {}
    for name in dict.fromkeys(r["workload"] for r in rows):
        mine = {r["batch_size"]: r["items_per_s"] for r in rows if r["workload"] == name}
        if 1 in mine:
            result[name] = {str(b): v / mine[1] for b, v in sorted(mine.items())}
    return result


def read_answers(path: str) -> List[dict]:
    """Answer lines without ``answer_id``, which is random per line."""
    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "answer_id"} for line in f if line.strip()]


def interpreter_start_s() -> float:
    """Seconds a fresh Python takes to start and import what an entry point imports before it answers
    (torch, transformers, LLaVA): what each separate script pays and an in-process run does not."""
    import subprocess

    import restore

    env = dict(os.environ)
    root = str(Path(restore.__file__).resolve().parent.parent)  # the same restore as this process's
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = ("import torch, transformers, llava.model.builder, llava_patches.loading, restore.eval.runner, "
            "restore.eval.vqa_loader, tokenreduction")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure_sweep(data: WorkloadData, configs: Sequence[str], execution: Execution, instrument: Instrument,
                  work: Path, batch_size: int = 1, max_new_tokens: Optional[int] = None,
                  start_s: Optional[float] = None) -> dict:
    """The configurations as separate runs, then as one ``--configs`` run; times, counts and agreement.

    ``start_s``, one interpreter's start and imports, gives the ratio as scripts would see it too: every
    separate script pays it, the sweep once."""
    tokens = data.workload.max_new_tokens if max_new_tokens is None else max_new_tokens
    separate_dir, sweep_dir = work / "separate", work / "sweep"
    separate_dir.mkdir(parents=True, exist_ok=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    separate: Dict[str, RunResult] = {}
    with _progress(len(configs) + 1, "throughput: sweep vs separate runs") as progress:
        for tag in configs:
            argv = workload_argv(data, str(separate_dir / f"{tag}.jsonl"), batch_size, tokens, execution,
                                 config_flags(tag))
            separate[tag] = run_entry(data.workload.entry, argv, instrument)
            progress.update(1)
        argv = workload_argv(data, str(sweep_dir / "{config}.jsonl"), batch_size, tokens, execution,
                             ["--configs", ",".join(configs)])
        sweep = run_entry(data.workload.entry, argv, instrument)
        progress.update(1)

    result: Dict[str, Any] = {
        "workload": data.workload.name, "entry": data.workload.entry, "items": data.n_items,
        "images": data.n_images, "batch_size": batch_size, "max_new_tokens": tokens, "configs": list(configs),
        "separate": {
            "wall_s": sum(r.wall_s for r in separate.values()),
            "load_s": sum(r.load_s for r in separate.values()),
            "model_loads": sum(r.model_loads for r in separate.values()),
            "vision_forwards": sum(r.vision_forwards for r in separate.values()),
            "per_config": {tag: {"wall_s": r.wall_s, "load_s": r.load_s, "model_loads": r.model_loads,
                                 "vision_forwards": r.vision_forwards, "tokens": r.tokens}
                           for tag, r in separate.items()},
        },
        "sweep": {"wall_s": sweep.wall_s, "load_s": sweep.load_s, "model_loads": sweep.model_loads,
                  "vision_forwards": sweep.vision_forwards, "tokens": sweep.tokens},
    }
    result["ratio"] = sweep.wall_s / result["separate"]["wall_s"]
    result["script_start_s"] = start_s
    result["ratio_as_scripts"] = None if start_s is None else \
        (sweep.wall_s + start_s) / (result["separate"]["wall_s"] + len(configs) * start_s)
    # the sweep names each file by the configuration's canonical run name, which these tags are
    differing = [tag for tag in configs if not (sweep_dir / f"{tag}.jsonl").is_file()
                 or read_answers(str(sweep_dir / f"{tag}.jsonl")) != read_answers(str(separate_dir / f"{tag}.jsonl"))]
    result["answers_equal"] = not differing
    result["differing"] = differing
    return result


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------

def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(lines: List[List[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
            for line in lines]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def format_batches(rows: List[dict], speedups: Dict[str, dict]) -> str:
    lines = [["workload", "batch", "items", "new tok", "seconds", "items/s", "x batch 1", "tokens", "tokens/s",
              "vision fwd"]]
    for r in rows:
        ratio = speedups.get(r["workload"], {}).get(str(r["batch_size"]))
        lines.append([r["workload"], str(r["batch_size"]), str(r["items"]), str(r["max_new_tokens"]),
                      _fmt(r["seconds"]), _fmt(r["items_per_s"]), _fmt(ratio), str(r["tokens"]),
                      _fmt(r["tokens_per_s"], 1), str(r["vision_forwards"])])
    return _table(lines)


def format_sweep(sweep: dict) -> str:
    lines = [["run", "wall s", "of which loading s", "model loads", "vision forwards (images)"]]
    for tag, r in sweep["separate"]["per_config"].items():
        lines.append([f"  separate: {tag}", _fmt(r["wall_s"]), _fmt(r["load_s"]), str(r["model_loads"]),
                      str(r["vision_forwards"])])
    s = sweep["separate"]
    lines.append([f"{len(sweep['configs'])} separate runs", _fmt(s["wall_s"]), _fmt(s["load_s"]), str(s["model_loads"]),
                  str(s["vision_forwards"])])
    w = sweep["sweep"]
    lines.append(["one --configs sweep", _fmt(w["wall_s"]), _fmt(w["load_s"]), str(w["model_loads"]),
                  str(w["vision_forwards"])])
    agree = "equal" if sweep["answers_equal"] else f"DIFFERENT for {', '.join(sweep['differing'])}"
    return _table(lines) + f"\nanswers of the sweep and of the separate runs (answer_id aside): {agree}"


def target_lines(rows: List[dict], speedups: Dict[str, dict], sweep: Optional[dict], scope: str) -> List[dict]:
    """The two targets with their verdicts; ``scope`` says what setting the targets are stated for."""
    targets = []
    short = {r["batch_size"]: r for r in rows if r["workload"] == "short"}
    if 1 in short and len(short) > 1:
        largest = TARGET_BATCH if TARGET_BATCH in short else max(short)
        ratio = short[largest]["items_per_s"] / short[1]["items_per_s"]
        targets.append({
            "name": "batch", "batch_size": largest, "ratio": ratio, "target": BATCH_TARGET,
            "passed": ratio >= BATCH_TARGET, "by": ratio / BATCH_TARGET,
            "text": (f"short answers: batch {largest} gives {ratio:.2f}x the items/s of batch 1 "
                     f"(target >= {BATCH_TARGET:.0f}x at batch {TARGET_BATCH}"
                     + ("" if largest == TARGET_BATCH else f"; batch {TARGET_BATCH} not measured: informative") + ")"),
        })
    if sweep is not None:
        ratio = sweep["ratio"]
        scripts = sweep.get("ratio_as_scripts")
        as_scripts = "" if scripts is None else (
            f"; as {len(sweep['configs'])} scripts, each paying a {sweep['script_start_s']:.1f} s interpreter start "
            f"and imports that the sweep pays once: {scripts:.2f}x")
        targets.append({
            "name": "sweep", "ratio": ratio, "target": SWEEP_TARGET, "passed": ratio <= SWEEP_TARGET,
            "by": ratio / SWEEP_TARGET,
            "text": (f"one sweep of {len(sweep['configs'])} configurations takes {ratio:.2f}x the time of "
                     f"{len(sweep['configs'])} separate in-process runs (target <= {SWEEP_TARGET}x{as_scripts})"),
        })
    for t in targets:
        if t["passed"]:
            t["line"] = f"PASS {t['text']}{scope}"
        elif t["name"] == "batch":
            t["line"] = f"MISS {t['text']}: {t['ratio']:.2f}x is {100 * (1 - t['by']):.0f}% short of the target{scope}"
        else:
            t["line"] = f"MISS {t['text']}: {t['by']:.2f}x the allowed time{scope}"
    return targets


def plot(rows: List[dict], sweep: Optional[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for name in dict.fromkeys(r["workload"] for r in rows):
        pts = sorted((r["batch_size"], r["items_per_s"]) for r in rows if r["workload"] == name)
        ax.plot(*zip(*pts), marker="o", label=f"{name} ({WORKLOADS[name].like})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["batch_size"] for r in rows}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("batch size")
    ax.set_ylabel("items per second (model load excluded)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax = axes[1]
    if sweep is not None:
        bars = [("separate runs", sweep["separate"]["wall_s"], sweep["separate"]["load_s"]),
                ("one sweep", sweep["sweep"]["wall_s"], sweep["sweep"]["load_s"])]
        labels = [b[0] for b in bars]
        ax.bar(labels, [b[1] - b[2] for b in bars], label="answering")
        ax.bar(labels, [b[2] for b in bars], bottom=[b[1] - b[2] for b in bars], label="loading the model")
        ax.set_ylabel(f"wall seconds, {len(sweep['configs'])} configurations")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _workload_list(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m restore.bench throughput",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model-path", help="a LLaVA-1.5 checkpoint instead of a random model")
    source.add_argument("--shape", choices=("small", "7b"), default="small",
                        help="random model: the small checkpoint, or LLaVA-1.5-7B's widths built in memory (the "
                             "entry points' loader is replaced by that build)")
    p.add_argument("--layers", type=int, help="LLM layers of the 7B-shaped model (default 32 on CUDA, 2 on the CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 4, 8, 16])
    p.add_argument("--workloads", type=_workload_list, default=list(WORKLOADS))
    p.add_argument("--items", type=int, help="items of the short and letter workloads and of the sweep (default 32)")
    p.add_argument("--long-items", type=int, help="items of the long workload (default 16)")
    p.add_argument("--long-tokens", type=int, default=WORKLOADS["long"].max_new_tokens,
                   help="new tokens of the long workload")
    p.add_argument("--config", default="full",
                   help="configuration of the batch-size runs, named as a run: full, holov-64, holov-64-restore, ...")
    p.add_argument("--repeats", type=int, default=1, help="runs per batch size; the fastest counts")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep against separate runs")
    p.add_argument("--sweep-batch-size", type=int, default=1)
    p.add_argument("--quick", action="store_true",
                   help="a few items, batch sizes 1 and 2, 8 long tokens: checks the bench runs, measures nothing")
    p.add_argument("--work-dir", type=Path, help="keep the questions and answers here (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p


def _load_average() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _builder_7b(layers: Optional[int]) -> Callable[[str, str], tuple]:
    def build(device: str, dtype: str) -> tuple:
        from llava_patches.loading import resolve_device, resolve_dtype
        from restore.analysis.models import build_7b_shaped

        target = resolve_device(device)
        n = (32 if target.type == "cuda" else 2) if layers is None else layers
        bench = build_7b_shaped(n, device=target, dtype=resolve_dtype(dtype, target))
        return decodes_any_id(bench.tokenizer), bench.model, bench.image_processor, 2048

    return build


def decodes_any_id(tokenizer):
    """``tokenizer`` (a slow LLaMA one) decoding ids past its vocabulary as its unknown token.

    The 7B-shaped model keeps LLaMA's 32,000-row LM head, so that its cost is the real one, but borrows
    the small checkpoint's 1,022-piece tokenizer, which cannot spell most ids a random model emits; only
    the text of the answers changes, which random weights make meaningless anyway."""
    original = type(tokenizer)

    class AnyIdTokenizer(original):
        def _convert_id_to_token(self, index):
            return super()._convert_id_to_token(index if index < self.sp_model.get_piece_size() else self.unk_token_id)

    tokenizer.__class__ = AnyIdTokenizer
    return tokenizer


def run_throughput(args: argparse.Namespace, work: Path, log: Callable[[str], None] = print) -> dict:
    """Every measurement the arguments ask for; the JSON-ready results."""
    import torch

    from llava_patches.loading import resolve_device, resolve_dtype
    from restore.analysis.models import small_checkpoint_path
    from restore.small_checkpoint import ensure_small_checkpoint

    if args.model_path is not None:
        model_path, described = args.model_path, f"checkpoint {args.model_path}"
    else:
        # the 7B-shaped build borrows the small checkpoint's tokenizer: the entry point reads its config
        model_path = str(ensure_small_checkpoint(small_checkpoint_path(4)))
        described = "small random checkpoint (4 LLM layers)"
    build = None
    if args.shape == "7b" and args.model_path is None:
        build = _builder_7b(args.layers)
        described = "LLaVA-1.5-7B-shaped random model (in memory, through the entry point's loader)"
    execution = Execution(model_path, args.device, args.dtype)
    config_flags(args.config)  # a bad name fails here, not after the first measurements
    load_before = _load_average()
    instrument = Instrument(build)

    items = args.items or (4 if args.quick else 32)
    long_items = args.long_items or (4 if args.quick else WORKLOADS["long"].items)
    long_tokens = 8 if args.quick else args.long_tokens
    batch_sizes = [1, 2] if args.quick else args.batch_sizes
    wanted = {name: (long_items if name == "long" else items) for name in args.workloads}
    if not args.no_sweep:
        wanted.setdefault("short", items)
    data, warm = prepare_data(work / "data", wanted)
    answers = work / "answers"
    answers.mkdir(parents=True, exist_ok=True)

    with instrument.active():
        # first calls pay one-time costs (imports, allocator, kernels): not batch 1's to carry
        first = run_entry(warm.workload.entry, workload_argv(warm, str(answers / "warmup.jsonl"), 1, 1, execution),
                          instrument)
        log(f"model: {described}; --device {execution.device} --dtype {execution.dtype}; {torch.get_num_threads()} threads; "
            f"warm-up run {first.wall_s:.1f} s (loading {first.load_s:.1f} s)")
        measured = {name: data[name] for name in args.workloads}
        rows = measure_batches(measured, batch_sizes, execution, instrument, answers, args.repeats,
                               {"long": long_tokens}, args.config)
        sweep = None
        if not args.no_sweep:
            sweep = measure_sweep(data["short"], SWEEP_CONFIGS, execution, instrument, answers / "configs",
                                  args.sweep_batch_size, WORKLOADS["short"].max_new_tokens,
                                  None if args.quick else interpreter_start_s())
    speedups = batch_speedups(rows)
    target = resolve_device(args.device)
    device, dtype = target.type, str(resolve_dtype(args.dtype, target)).replace("torch.", "")
    return {
        "meta": {
            "model": described, "model_path": model_path, "shape": args.shape, "device": device,
            "dtype": dtype, "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "quick": bool(args.quick), "repeats": args.repeats,
            "time_note": "entry-point wall time minus model loading; best of --repeats",
            "batch_config": args.config, "load_average_before_after": [load_before, _load_average()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "workloads": {name: {"like": d.workload.like, "entry": d.workload.entry, "items": d.n_items,
                             "images": d.n_images} for name, d in data.items()},
        "batch": rows,
        "speedup_over_batch_1": speedups,
        "sweep": sweep,
    }


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.layers is not None and args.shape != "7b":
        print("error: --layers applies to --shape 7b", file=sys.stderr)
        return 2
    if args.repeats < 1:
        print(f"error: --repeats must be at least 1, got {args.repeats}", file=sys.stderr)
        return 2
    try:
        with contextlib.ExitStack() as stack:
            if args.work_dir is not None:
                args.work_dir.mkdir(parents=True, exist_ok=True)
                work = args.work_dir
            else:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="restore-throughput-")))
            results = run_throughput(args, work)
    except (ValueError, FileNotFoundError, EntryPointFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    meta = results["meta"]
    on_target = meta["device"] == "cpu" and meta["shape"] == "small" and args.model_path is None
    scope = "" if on_target else " [targets are stated for the small checkpoint on the CPU]"
    if meta["quick"]:
        scope = " [--quick: too few items to measure anything]"
    title = (f"{meta['model']} | {meta['device']} {meta['dtype']} | {meta['threads']} threads | "
             f"batch runs: {meta['batch_config']}")
    before, after = meta["load_average_before_after"]
    if meta["device"] == "cpu" and before is not None and max(before, after) > 0.5 * (meta["cores"] or 1):
        text_load = (f"warning: load average {before:.1f} before, {after:.1f} after on {meta['cores']} cores: other "
                     "processes competed for the CPU, so the times are noisy"
                     + (" (several threads stall on a busy CPU, small calls most: --threads 1 is steadier)"
                        if meta["threads"] > 1 else ""))
        print(text_load, file=sys.stderr)
    text = [title, "", "items per second (model load excluded):",
            format_batches(results["batch"], results["speedup_over_batch_1"])]
    if results["sweep"] is not None:
        s = results["sweep"]
        text += ["", f"{len(s['configs'])} configurations on the {s['workload']} workload ({s['items']} items, "
                     f"{s['images']} images, batch {s['batch_size']}): separate runs against one sweep",
                 format_sweep(s)]
    targets = target_lines(results["batch"], results["speedup_over_batch_1"], results["sweep"], scope)
    results["targets"] = targets
    text += [""] + [t["line"] for t in targets]
    print("\n" + "\n".join(text))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "throughput.txt").write_text("\n".join(text) + "\n")
    plot(results["batch"], results["sweep"], args.out / "throughput.png", title)
    print(f"\nwrote {args.out / 'throughput.json'}, {args.out / 'throughput.txt'}, {args.out / 'throughput.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
