"""One benchmark, one or several configurations, one shard per GPU: inference, merge, score, result record.

    python -m restore.eval.launch BENCH [options] [entry-point flags]
    bash scripts/llava1_5/BENCH.sh [options] [entry-point flags]          (the same, from any directory)

Everything that can be refused is refused before any shard starts (exit 2): the options, the data files,
the entry point's own checks of its flags and question file, the scorer's data files, the folders. Then
each shard is one process of the entry point (``python -m restore.eval.<entry>``) answering its chunk of
the questions for every configuration; when all have ended, each configuration's chunks are merged and
scored (exit 1 when something failed, 130 on an interrupt, 0 otherwise). See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import shards as shard_files
from .benchmarks import Benchmark, benchmark_names, get_benchmark
from .naming import model_name_of, spec_flags
from .supervise import (PROGRESS_INTERVAL_S, LaunchError, Shard, cpu_threads_per_shard, discover_gpus,
                        require_writable_dir, run_shards, start_fresh_log)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_PATH = "liuhaotian/llava-v1.5-7b"
# A model family's scripts (scripts/<family>/) say which script runs and which checkpoint is its default.
SCRIPT_FOLDER_ENV, DEFAULT_MODEL_ENV = "RESTORE_SCRIPT_FOLDER", "RESTORE_DEFAULT_MODEL"

# The launcher's own options (each takes a value), and the entry-point flags it sets itself.
OWN_OPTIONS = ("--model-path", "--data-root", "--shards", "--nodes", "--node-rank", "--answers-root",
               "--results-dir", "--run-name", "--configs")
SET_BY_LAUNCHER = ("--question-file", "--image-folder", "--answers-file", "--num-chunks", "--chunk-idx",
                   "--check-only")
# Entry-point flags that name a configuration: --configs names each configuration whole instead.
CONFIG_FLAGS = ("--base", "--n_vis", "--n-vis", "--keep", "--restore", "--prune_ratio", "--prune-ratio",
                "--anchors", "--positions", "--calibration", "--calibration_c", "--calibration-c",
                "--merged_position", "--merged-position")
CONFIG_PLACEHOLDER = "{config}"  # in a sweep's --answers-file, replaced by the entry point per configuration
EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


# --------------------------------------------------------------------------------------------------
# Command line


@dataclass
class Options:
    benchmark: Benchmark
    model_path: str = DEFAULT_MODEL_PATH
    data_root: str = str(REPO_ROOT / "playground" / "data" / "eval")
    shards: Optional[int] = None  # default: one per GPU
    nodes: int = 1
    node_rank: int = 0
    answers_root: str = str(REPO_ROOT / "playground" / "answers")
    results_dir: str = str(REPO_ROOT / "playground" / "results")
    run_name: Optional[str] = None
    configs: Optional[List[str]] = None  # --configs specs as given
    passthrough: List[str] = field(default_factory=list)  # entry-point flags


def split_equals(argv: Sequence[str]) -> List[str]:
    """``--flag=value`` -> ``--flag value``, so that both spellings are recognised below (as the entry
    point's argparse would accept them)."""
    out: List[str] = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            out += arg.split("=", 1)
        else:
            out.append(arg)
    return out


def split_arguments(argv: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the launcher's own options, the entry-point flags passed through), refusing what the launcher sets."""
    own: List[str] = []
    passthrough: List[str] = []
    args = split_equals(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            own.append(arg)
        elif arg in OWN_OPTIONS:
            if i + 1 >= len(args):
                raise LaunchError(f"{arg} needs a value")
            own += [arg, args[i + 1]]
            i += 1
        elif arg in SET_BY_LAUNCHER:
            raise LaunchError(f"{arg} is set by this script (use --data-root, --answers-root, --shards, "
                              "--nodes/--node-rank)")
        else:
            passthrough.append(arg)
        i += 1
    return own, passthrough


def build_parser(benchmark: Benchmark) -> argparse.ArgumentParser:
    """The launcher's own options; the text of --help."""
    note = f"\n\n{benchmark.usage_note}" if benchmark.usage_note else ""
    script = f"scripts/{os.environ.get(SCRIPT_FOLDER_ENV) or 'llava1_5'}/{benchmark.name}.sh"
    default_model = os.environ.get(DEFAULT_MODEL_ENV) or DEFAULT_MODEL_PATH
    p = argparse.ArgumentParser(
        prog=f"bash {script}", allow_abbrev=False, add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=(f"bash {script} [options] [entry-point flags]\n"
               f"   or: python -m restore.eval.launch {benchmark.name} [options] [entry-point flags]"),
        description=(f"{benchmark.title}\n\nRuns {benchmark.name} inference (python -m restore.eval."
                     f"{benchmark.entry}), one shard per GPU, then scores it and writes a result record for "
                     f"python -m restore.report.{note}"),
        epilog=("CPU shards run OMP_NUM_THREADS threads each (default 1, whatever --shards is).\n\n"
                "entry-point flags are passed through, e.g. --base HoloV --n_vis 64 --restore, RESTORE's settings\n"
                "(--prune_ratio 0.75 --anchors uniform --positions reindexed --calibration size --calibration_c 2\n"
                "--merged_position mean; docs/settings.md, each named in the run name), --device cpu,\n"
                "--dtype bfloat16, --temperature 0.2, --max_new_tokens 16, --overwrite "
                f"(see python -m restore.eval.{benchmark.entry} -h)."))
    g = p.add_argument_group("options of this script")
    g.add_argument("--model-path", metavar="PATH", default=default_model,
                   help=f"checkpoint (default {default_model})")
    g.add_argument("--data-root", metavar="DIR", default=Options.data_root,
                   help="LLaVA's playground/data/eval layout (default playground/data/eval in the repo)")
    g.add_argument("--shards", metavar="N", help="inference processes on this machine (default: one per GPU in "
                   "CUDA_VISIBLE_DEVICES, else one per visible GPU, else 1); shards beyond the GPU count share "
                   "GPUs round-robin")
    g.add_argument("--nodes", metavar="N", default="1", help="machines sharing this benchmark (default 1); each "
                   "runs this script with its own")
    g.add_argument("--node-rank", metavar="K", default="0", help="0..N-1 (e.g. --node-rank $SLURM_ARRAY_TASK_ID); "
                   "every node needs the same --shards, and the node that finishes last merges and scores; a node "
                   "whose layout differs from another's is refused")
    g.add_argument("--answers-root", metavar="DIR", default=Options.answers_root,
                   help="default playground/answers in the repo")
    g.add_argument("--results-dir", metavar="DIR", default=Options.results_dir,
                   help="default playground/results in the repo")
    g.add_argument("--run-name", metavar="NAME", help="answers subfolder (default <base>-<n_vis>[-restore] and the "
                   "settings, or \"full\" without --base)")
    g.add_argument("--configs", metavar="SPEC[,SPEC...]", help="several configurations in one pass, each named as "
                   "its answers folder (full, HoloV-64, HoloV-64-restore, HoloV-64-restore-g0.75, ...); instead of "
                   "--base/--n_vis/--restore, the settings flags and --run-name")
    g.add_argument("-h", "--help", action="help", help="this text")
    return p


def _positive(value: Optional[str], name: str) -> Optional[int]:
    if value is None:
        return None
    if not (value.isdigit() and value[0] != "0"):
        raise LaunchError(f"{name} must be a positive integer, got '{value}'")
    return int(value)


def parse_options(bench: str, argv: Sequence[str]) -> Options:
    """The launch asked for; LaunchError for what is wrong with the command itself."""
    benchmark = get_benchmark(bench)
    own, passthrough = split_arguments(argv)
    a = build_parser(benchmark).parse_args(own)
    nodes = _positive(a.nodes, "--nodes")
    assert nodes is not None
    if not (a.node_rank.isdigit() and int(a.node_rank) < nodes):
        raise LaunchError(f"--node-rank must be in 0..{nodes - 1}, got '{a.node_rank}'")
    configs = None
    if a.configs is not None:
        clashing = [x for x in passthrough if x in CONFIG_FLAGS] + (["--run-name"] if a.run_name is not None else [])
        if clashing:
            raise LaunchError(f"--configs names every configuration whole: it cannot be combined with "
                              f"{', '.join(dict.fromkeys(clashing))}")
        configs = [spec.strip() for spec in a.configs.split(",") if spec.strip()]
        if not configs:
            raise LaunchError("--configs needs at least one configuration, e.g. --configs full,HoloV-64-restore")
    return Options(benchmark, a.model_path, a.data_root, _positive(a.shards, "--shards"), nodes, int(a.node_rank),
                   a.answers_root, a.results_dir, a.run_name, configs, passthrough)


# --------------------------------------------------------------------------------------------------
# Everything checked before the shards


@dataclass
class Config:
    """One configuration of the launch: its name, its flags and its answers folder."""

    tag: str  # the answers subfolder (the run name)
    flags: List[str]  # entry-point flags that select it (empty: in the pass-through flags)
    answers_dir: str
    spec: str = ""  # as given to --configs

    def chunk_files(self, num_chunks: int) -> List[str]:
        return [os.path.join(self.answers_dir, "chunks", f"{num_chunks}_{i}.jsonl") for i in range(num_chunks)]


@dataclass
class Launch:
    options: Options
    model_name: str
    configs: List[Config]
    gpus: List[str]
    shards: int
    cpu_threads: Optional[int]  # set for CPU shards
    sweeps: bool  # several configurations: each shard answers all of them (the entry point's --configs)

    @property
    def label(self) -> str:
        return self.options.benchmark.name

    @property
    def num_chunks(self) -> int:
        return self.options.nodes * self.shards

    @property
    def first_chunk(self) -> int:
        return self.options.node_rank * self.shards


def data_paths(options: Options) -> Tuple[str, Optional[str]]:
    """(question file, image folder or None), after checking they exist."""
    b = options.benchmark
    if not os.path.isdir(options.data_root):
        raise LaunchError(f"data root {options.data_root} not found (see docs/evaluation.md; pass --data-root)")
    question_file = os.path.join(options.data_root, b.question_file)
    if not os.path.isfile(question_file):
        raise LaunchError(f"question file {question_file} not found (see docs/evaluation.md)")
    image_folder = os.path.join(options.data_root, b.image_folder) if b.image_folder else None
    if image_folder is not None and not os.path.isdir(image_folder):
        raise LaunchError(f"image folder {image_folder} not found (see docs/evaluation.md)")
    return question_file, image_folder


def entry_flags(options: Options, answers_file: str, num_chunks: int, chunk_idx: int) -> List[str]:
    """The entry-point flags every process of this launch gets, before its configuration's."""
    question_file, image_folder = data_paths(options)
    return (["--model-path", options.model_path, "--question-file", question_file]
            + (["--image-folder", image_folder] if image_folder else [])
            + ["--answers-file", answers_file, "--num-chunks", str(num_chunks), "--chunk-idx", str(chunk_idx)]
            + list(options.benchmark.entry_args) + split_equals(options.passthrough))


def check_entry(options: Options, config_flags: Sequence[str]) -> argparse.Namespace:
    """The entry point's own checks, in this process, exactly as each shard will make them (flags, plugins,
    the question file); its parsed arguments, the resolved reduction among them."""
    from .arguments import build_parser as entry_parser
    from .entry_point import SetupError, entry_by_name
    from .plan import check_only

    entry = entry_by_name(options.benchmark.entry)
    argv = ["--check-only", *entry_flags(options, os.devnull, 1, 0), *config_flags]
    try:
        args = entry_parser(entry).parse_args(argv)
    except SystemExit as e:  # argparse has said what is wrong
        raise LaunchError("") from e
    try:
        check_only(entry, args)
    except SetupError as e:
        raise LaunchError(str(e)) from None
    return args


def resolve_configs(options: Options, model_name: str) -> List[Config]:
    """Every configuration checked by the entry point and named by the reduction it resolves to."""
    from restore.settings import run_tag

    root = os.path.join(options.answers_root, options.benchmark.name, model_name)
    if options.configs is None:
        args = check_entry(options, [])
        tag = options.run_name or run_tag(args.reduction)
        return [Config(tag, [], os.path.join(root, tag))]
    configs: Dict[str, Config] = {}
    for spec in options.configs:
        try:
            flags = spec_flags(spec)
        except ValueError as e:
            raise LaunchError(f"--configs: {e}") from None
        try:
            args = check_entry(options, flags)
        except LaunchError as e:
            raise LaunchError(f"--configs: configuration {spec!r}: {e}" if str(e) else "") from None
        tag = run_tag(args.reduction)
        if tag in configs:
            raise LaunchError(f"--configs: {configs[tag].spec!r} and {spec!r} are one configuration ({tag}); "
                              "name each once")
        configs[tag] = Config(tag, flags, os.path.join(root, tag), spec)
    return list(configs.values())


def sweep_dir(launch: Launch) -> str:
    """Where a sweep's shard logs go: one folder per set of configurations, beside their answers folders."""
    tags = sorted(c.tag for c in launch.configs)
    digest = hashlib.sha256(",".join(tags).encode()).hexdigest()[:10]
    root = os.path.join(launch.options.answers_root, launch.label, launch.model_name)
    return os.path.join(root, f"_sweep-{digest}")


def prepare(options: Options) -> Launch:
    """Every check that can be made before a shard starts; LaunchError names the first problem."""
    from .scoring import DataError, check_data

    data_paths(options)
    model_name = model_name_of(options.model_path)
    configs = resolve_configs(options, model_name)
    # The scorer's own files (annotations, labels) are first read after inference: check them now.
    try:
        check_data(options.benchmark.name, options.data_root)
    except DataError as e:
        raise LaunchError(f"cannot score {options.benchmark.name} later: {e}") from None
    sweeps = len(configs) > 1
    for config in configs:
        require_writable_dir(os.path.join(config.answers_dir, "chunks"), "answers folder")
        if not sweeps:
            require_writable_dir(os.path.join(config.answers_dir, "logs"), "log folder")
    require_writable_dir(options.results_dir, "results folder")
    device = _passed_value(options.passthrough, "--device") or "auto"
    gpus = discover_gpus(device)
    shards = options.shards or max(len(gpus), 1)
    cpu_threads = cpu_threads_per_shard() if device == "cpu" or not gpus else None
    launch = Launch(options, model_name, configs, gpus, shards, cpu_threads, sweeps)
    if sweeps:
        require_writable_dir(os.path.join(sweep_dir(launch), "logs"), "log folder")
    if options.nodes > 1:
        from .entry_point import SetupError

        for config in configs:
            try:
                shard_files.check_node_layout(config.answers_dir, options.nodes, options.node_rank, shards, record=True)
            except SetupError as e:
                raise LaunchError(str(e)) from None
    return launch


def _passed_value(passthrough: Sequence[str], flag: str) -> Optional[str]:
    args = split_equals(passthrough)
    found = None
    for i, arg in enumerate(args[:-1]):
        if arg == flag:
            found = args[i + 1]
    return found


# --------------------------------------------------------------------------------------------------
# Shards


def shard_program(entry: str) -> List[str]:
    """The command of an entry-point process (tests put a stand-in here)."""
    return [sys.executable, "-m", f"restore.eval.{entry}"]


def build_shards(launch: Launch, configs: Sequence[Config]) -> List[Shard]:
    """This node's shard processes for ``configs``."""
    total, first = launch.options.nodes * launch.shards, launch.first_chunk
    sweep = len(configs) > 1
    root = os.path.join(launch.options.answers_root, launch.label, launch.model_name)
    shards = []
    for i in range(launch.shards):
        chunk = first + i
        if sweep:
            answers_file = os.path.join(root, CONFIG_PLACEHOLDER, "chunks", f"{total}_{chunk}.jsonl")
            selection = ["--configs", ",".join(c.tag for c in configs)]
            log = os.path.join(sweep_dir(launch), "logs", f"{total}_{chunk}.log")
        else:
            answers_file = configs[0].chunk_files(total)[chunk]
            selection = list(configs[0].flags)
            log = os.path.join(configs[0].answers_dir, "logs", f"{total}_{chunk}.log")
        env: Dict[str, str] = {}
        if launch.gpus:
            env["CUDA_VISIBLE_DEVICES"] = launch.gpus[i % len(launch.gpus)]
        if launch.cpu_threads is not None:
            env["OMP_NUM_THREADS"] = str(launch.cpu_threads)
        # the shards import this checkout, whichever directory the launcher was started from
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(REPO_ROOT), *paths]))
        command = (shard_program(launch.options.benchmark.entry)
                   + entry_flags(launch.options, answers_file, total, chunk) + selection)
        shards.append(Shard(i, chunk, total, command, log, [c.chunk_files(total)[chunk] for c in configs], env))
    return shards


# --------------------------------------------------------------------------------------------------
# The whole launch


@dataclass
class Finished:
    config: Config
    status: str  # "scored", "waiting" (other nodes), "merged elsewhere", "failed"
    record: Optional[Dict[str, Any]] = None
    wall_s: float = 0.0


def run(launch: Launch, progress_interval: float = PROGRESS_INTERVAL_S) -> int:
    total = launch.num_chunks
    where = f"GPU(s) {' '.join(launch.gpus)}" if launch.gpus else "no GPU pinning"
    group = launch.configs
    names = ", ".join(c.tag for c in group)
    folders = group[0].answers_dir if len(group) == 1 else os.path.dirname(group[0].answers_dir)
    print(f"[{launch.label}] {launch.model_name}, {names}: {launch.shards} shard(s) on this node, chunks "
          f"{launch.first_chunk}..{launch.first_chunk + launch.shards - 1} of {total}, {where}; answers in "
          f"{folders}", flush=True)
    shards = build_shards(launch, group)
    for shard in shards:
        start_fresh_log(shard.log, f"===== {_now()} {launch.label} chunk {shard.chunk} of {total}"
                        + (f" ({names})" if len(group) > 1 else "") + " =====")
    outcome = run_shards(shards, launch.label, progress_interval)
    if outcome.interrupted:
        print(f"[{launch.label}] interrupted; answers written so far are kept and a rerun resumes",
              file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    if outcome.failed:
        print(f"[{launch.label}] {len(outcome.failed)} of {launch.shards} shard(s) failed "
              f"({' '.join(map(str, outcome.failed))}); nothing merged or scored. Fix the cause and rerun the "
              "same command: finished answers are kept and resumed.", file=sys.stderr, flush=True)
        return EXIT_FAILED
    finished = [finish(launch, config, outcome.wall_s, named=len(group) > 1) for config in group]
    if len(finished) > 1:
        print_summary(launch.label, finished)
    return EXIT_FAILED if any(f.status == "failed" for f in finished) else 0


def finish(launch: Launch, config: Config, wall_s: float, named: bool) -> Finished:
    """Merge and score one configuration once all its chunks exist (with --nodes, the last node does)."""
    from .entry_point import SetupError

    opts, label = launch.options, launch.label
    prefix = f"[{label}] {config.tag}:" if named else f"[{label}]"
    chunk_files = config.chunk_files(launch.num_chunks)
    if opts.nodes > 1:
        try:  # a node started with another layout after this one began: its chunks and ours never add up
            shard_files.check_node_layout(config.answers_dir, opts.nodes, opts.node_rank, launch.shards, record=False)
        except SetupError as e:
            print(f"{prefix} this node's chunks are done, but {e}", file=sys.stderr, flush=True)
            return Finished(config, "failed", wall_s=wall_s)
        not_ready, conflicts, _ = shard_files.chunk_problems(chunk_files)
        if conflicts:  # other settings or damage: waiting cannot fix it
            print(f"{prefix} this node's chunks are done, but the chunks of all nodes cannot be merged:",
                  file=sys.stderr)
            for problem in conflicts + not_ready:
                print(f"    | {problem}", file=sys.stderr)
            sys.stderr.flush()
            return Finished(config, "failed", wall_s=wall_s)
        if not_ready:
            print(f"{prefix} this node's chunks are done; other nodes' chunks are not complete yet. The last "
                  "node to finish merges and scores (or rerun any node when all are done).", flush=True)
            return Finished(config, "waiting", wall_s=wall_s)
    # Several nodes may finish together: one merges and scores, under a lock; the others see its record.
    with open(os.path.join(config.answers_dir, ".merge.lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        merged = os.path.join(config.answers_dir, "merge.jsonl")
        if opts.nodes > 1:
            earlier = shard_files.already_merged(merged, chunk_files)
            if earlier is not None:
                print(f"{prefix} another node has merged and scored these chunks already"
                      + (f" ({earlier})" if earlier else ""), flush=True)
                shard_files.forget_node_layouts(config.answers_dir)  # the run is over for this node too
                return Finished(config, "merged elsewhere", wall_s=wall_s)
        try:
            status, record = shard_files.finish_config(label, chunk_files, config.answers_dir, opts.data_root,
                                                       opts.results_dir, launch.model_name, wall_s, config.tag)
        except SetupError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return Finished(config, "failed", wall_s=wall_s)
    return Finished(config, "scored" if status == 0 else "failed", record, wall_s)


def print_summary(label: str, finished: Sequence[Finished]) -> None:
    """One line per configuration: its main metric and the inference wall time of its pass."""
    rows = []
    for f in finished:
        value = "-"
        if f.record is not None:
            metric = f.record.get("main_metric")
            number = f.record.get("metrics", {}).get(metric) if metric else None
            value = f"{metric} = {number:.2f}" if isinstance(number, (int, float)) else "no local score"
        elif f.status != "scored":
            value = f.status
        rows.append((f.config.tag, value, f"{f.wall_s:.0f} s"))
    widths = [max(len(r[k]) for r in rows + [("configuration", "main metric", "wall time")]) for k in range(3)]
    print(f"[{label}] summary:")
    for row in [("configuration", "main metric", "wall time")] + rows:
        print("    " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    sys.stdout.flush()


def _now() -> str:
    import datetime

    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: python -m restore.eval.launch BENCH [options] [entry-point flags]\n\nBENCH: one of "
                  f"{', '.join(benchmark_names())}; python -m restore.eval.launch BENCH --help for the options.")
            return 0
        print(f"error: name a benchmark first: one of {', '.join(benchmark_names())}", file=sys.stderr)
        return EXIT_USAGE
    try:
        get_benchmark(argv[0])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        options = parse_options(argv[0], argv[1:])
        launch = prepare(options)
    except LaunchError as e:
        if str(e):
            print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    try:
        return run(launch)
    except KeyboardInterrupt:  # while merging or scoring: the answers are kept
        print(f"[{launch.label}] interrupted; answers written so far are kept and a rerun resumes", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
