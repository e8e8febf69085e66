"""Reproduce one of the paper's tables: run what is missing, then print it beside the published values.

    python -m restore.paper list
    python -m restore.paper table4 [--dry-run] [--benchmarks gqa,pope] [--model-path P] [--data-root D]
    python -m restore.paper table1 --slurm table1.sbatch [--nodes 2]      # a Slurm array instead of local runs
    python -m restore.paper table4 --report-only                          # print what has been run

Each benchmark runs once through scripts/llava1_5/<bench>.sh (Table 3: scripts/qwen2_5_vl/) with ``--configs`` naming every configuration
of the table it still misses (one shard per GPU, resumable; a configuration x benchmark whose result record
exists under --results-dir is not run again). Extra flags after ``--`` go to every script (e.g.
``-- --device cpu --max_new_tokens 16``).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import (BENCHMARK_ITEMS, DEFAULT_SCRIPT_FOLDER, HUB_NAMES, SCRIPT_FOLDERS, PaperConfig, PaperTable, get_table,
               table_names, why_not_runnable)
from restore.eval.naming import model_name_of

from .layout import existing_results, print_paper_table

REPO_ROOT = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m restore.paper", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", help=f"'list', or one of: {', '.join(table_names())}")
    p.add_argument("--model-path", default=None,
                   help="checkpoint (default: the table's model, e.g. liuhaotian/llava-v1.5-7b; Table 2: "
                        "liuhaotian/llava-v1.6-vicuna-7b; Table 3: Qwen/Qwen2.5-VL-7B-Instruct)")
    p.add_argument("--data-root", default=str(REPO_ROOT / "playground" / "data" / "eval"))
    p.add_argument("--answers-root", default=str(REPO_ROOT / "playground" / "answers"))
    p.add_argument("--results-dir", default=str(REPO_ROOT / "playground" / "results"))
    p.add_argument("--out", default=None, help="where paper_<table>.md / .csv go (default: --results-dir)")
    p.add_argument("--benchmarks", default=None, help="comma-separated subset of the table's benchmarks")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    p.add_argument("--report-only", action="store_true", help="run nothing; print the table from existing results")
    p.add_argument("--slurm", default=None, metavar="FILE", help="write a Slurm array job (one task per "
                   "benchmark [x node], all its missing configurations in one pass) instead of running locally")
    p.add_argument("--nodes", type=int, default=1, help="with --slurm: nodes per benchmark")
    return p


def _benchmarks(table: PaperTable, wanted: Optional[str]) -> List[str]:
    if not wanted:
        return list(table.benchmarks)
    chosen = [b.strip() for b in wanted.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in table.benchmarks]
    if unknown:
        raise SystemExit(f"error: {table.name} has no benchmark {', '.join(unknown)}; "
                         f"its benchmarks: {', '.join(table.benchmarks)}")
    return [b for b in table.benchmarks if b in chosen]  # the table's column order


def plan(table: PaperTable, benchmarks: Sequence[str], available: Sequence[str], done: set,
         model: str) -> Tuple[List[Tuple[PaperConfig, str]], List[Tuple[PaperConfig, str]]]:
    """(pairs to run, configurations that cannot run yet with the reason): missing results only."""
    todo, blocked = [], []
    for config in table.configs():
        reason = why_not_runnable(table, config, available)
        if reason:
            blocked.append((config, reason))
            continue
        for bench in benchmarks:
            if (model, config.tag(), bench) not in done:
                todo.append((config, bench))
    return todo, blocked


def by_benchmark(todo: Sequence[Tuple[PaperConfig, str]]) -> List[Tuple[str, List[PaperConfig]]]:
    """The missing configurations of each benchmark, benchmarks in the table's order."""
    grouped: Dict[str, List[PaperConfig]] = {}
    for config, bench in todo:
        grouped.setdefault(bench, []).append(config)
    return list(grouped.items())


def script_command(configs: Sequence[PaperConfig], bench: str, args: argparse.Namespace,
                   extra: Sequence[str], folder: str = DEFAULT_SCRIPT_FOLDER) -> List[str]:
    """One launch of ``bench`` answering every configuration in ``configs`` (one pass over its questions),
    by the script of ``folder`` (the table's model family: its environment and defaults)."""
    return (["bash", str(REPO_ROOT / "scripts" / folder / f"{bench}.sh"), "--model-path", args.model_path,
             "--data-root", args.data_root, "--answers-root", args.answers_root, "--results-dir", args.results_dir,
             "--configs", ",".join(c.tag() for c in configs)] + list(extra))


def write_slurm(path: str, commands: Sequence[List[str]], nodes: int, table: str) -> None:
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name=restore-{table}",
             f"#SBATCH --array=0-{len(commands) * nodes - 1}",
             "#SBATCH --output=restore-%x-%A_%a.log",
             "# One array task per benchmark (all its configurations)"
             + (f" x node ({nodes} nodes each)" if nodes > 1 else "")
             + "; set --gres / --partition for your cluster.",
             "set -euo pipefail", "COMMANDS=("]
    lines += [f"  {shlex.quote(shlex.join(c))}" for c in commands]
    lines += [")", f"NODES={nodes}", "task=$((SLURM_ARRAY_TASK_ID / NODES))",
              "rank=$((SLURM_ARRAY_TASK_ID % NODES))"]
    if nodes > 1:
        lines.append('eval "${COMMANDS[$task]} --nodes $NODES --node-rank $rank"')
    else:
        lines.append('eval "${COMMANDS[$task]}"')
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = _parser().parse_args(argv)
    if args.table == "list":
        from . import load_tables
        for name in table_names():
            t = load_tables()[name]
            print(f"{name:8s} {t.title} ({len(t.configs())} configurations x {len(t.benchmarks)} benchmarks)")
        return 0
    try:
        table = get_table(args.table)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.nodes < 1:
        print("error: --nodes must be at least 1", file=sys.stderr)
        return 2
    benchmarks = _benchmarks(table, args.benchmarks)
    if args.model_path is None:
        args.model_path = HUB_NAMES.get(table.model, f"liuhaotian/{table.model}")
    model = model_name_of(args.model_path)
    if table.kind == "analysis":
        print(f"{table.title}\n  computed by: python -m restore.analyze hausdorff --model-path {args.model_path}"
              f" --images <folder of GQA images> (see README, Reproduce the paper)")
        return 0

    import tokenreduction as tr

    done = existing_results(Path(args.results_dir))
    todo, blocked = plan(table, benchmarks, tr.available_selectors(), done, model)
    answers = sum(BENCHMARK_ITEMS.get(bench, 0) for _, bench in todo)
    print(f"{table.title}: {len(table.configs())} configurations x {len(benchmarks)} benchmarks; "
          f"{len(todo)} runs missing ({answers:,} model answers on the full benchmarks)")
    for config, reason in blocked:
        print(f"  cannot run yet: {config.describe()}: {reason}")
    launches = by_benchmark(todo)
    folder = SCRIPT_FOLDERS.get(table.model, DEFAULT_SCRIPT_FOLDER)
    commands = [script_command(configs, bench, args, extra, folder) for bench, configs in launches]
    if args.slurm:
        write_slurm(args.slurm, commands, args.nodes, table.name)
        print(f"wrote {args.slurm}: {len(commands) * args.nodes} array tasks; submit it with sbatch, then run "
              f"python -m restore.paper {table.name} --report-only")
        return 0
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    failed = []
    if not args.report_only:
        for index, (command, (bench, configs)) in enumerate(zip(commands, launches), 1):
            print(f"[{index}/{len(commands)}] {bench}: {len(configs)} configuration(s): "
                  f"{'; '.join(c.describe() for c in configs)}", flush=True)
            if subprocess.run(command).returncode != 0:
                failed.append(f"{bench}: {', '.join(c.tag() for c in configs)}")
    print_paper_table(table, Path(args.results_dir), model, benchmarks,
                      out=Path(args.out) if args.out else Path(args.results_dir))
    if failed:
        print(f"{len(failed)} run(s) failed (rerun the same command to resume them):", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
