"""Results table across runs: configurations (rows) x benchmarks (columns), like the paper's main table.

    python -m restore.report [--results playground/results] [--out DIR] [--metric mme=perception ...]

Reads every run record under --results: one JSON object per `.json` file (JSONL files with one
record per line are read too), with the fields benchmark, base, n_vis, restore, model, metrics,
main_metric, n_items, wall_time_s, timestamp, and run_name (the answers subfolder). Files without
benchmark/metrics/base (for example a scorer's own metrics.json) are skipped. A configuration is
(model, base, n_vis, restore, variant); no reduction is base "none" with 576 tokens. The variant is the
run name when it is not the default one (<base>-<n_vis>[-restore] or "full"), e.g. "full-t0.2" for a
sampled VQAv2 run: such a run gets its own row instead of replacing the greedy one. When a configuration ran a benchmark several times,
the record with the latest timestamp wins.

Cells show by default what the paper's column shows (PAPER_METRIC: GQA accuracy, MMB MMBench-dev
CircularEval accuracy, MME perception + cognition, POPE mean F1 of the three splits, SQA-IMG image
accuracy, TextVQA accuracy, SEED accuracy over all questions, image and video, OCRBench final
score), or the metric chosen with --metric BENCH=NAME. A run without the paper's metric shows its
own main metric and says so: a SEED run over image questions only is "SEED-IMG" (in the column
title when every SEED cell is, else next to the cell). Two averages:
  Avg   the paper's Avg: mean over benchmarks of 100 x value / value of the same model without
        reduction ("none"/576, same metric), when that run exists ("% of the unreduced model").
  Mean  mean over the configuration's benchmarks of the shown metric on a 0-100 scale:
        percentages as they are, MME divided by its maximum (2800 for perception+cognition, 2000
        perception, 800 cognition), OCRBench final score divided by its maximum (1000).
VQAv2 has no local score and is in neither. "†" marks an average over fewer benchmarks than the
table has.
Writes report.md (table, footnotes, the runs used) and report.csv (raw values) into --out
(default: the results folder) and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

from .results import (BENCH_ORDER, TITLES, PAPER_METRIC, FULL_TOKENS, NO_REDUCTION, Config, Run, load_runs, latest_runs,
                      metric_name, metric_value, subset_title, on_percent_scale)

@dataclass
class Table:
    benchmarks: list[str]
    configs: list[Config]
    cells: dict[tuple[Config, str], Run]
    values: dict[tuple[Config, str], float | None]
    mean: dict[Config, tuple[float | None, int]]  # (mean on a 0-100 scale, number of benchmarks in it)
    rel: dict[Config, tuple[float | None, int]]  # (the paper's Avg: % of the unreduced model, benchmarks)
    scored: list[str]  # benchmarks that enter the averages
    metric_names: dict[str, set[str]]
    shown_metric: dict[tuple[Config, str], str | None]

    def marked(self, bench: str) -> bool:
        """Whether the cells of `bench` say which metric they show (several metrics in one column)."""
        names = {n for n in self.metric_names.get(bench, set()) if n != "None"}
        return len(names) > 1

    def title(self, bench: str) -> str:
        names = {n for n in self.metric_names.get(bench, set()) if n != "None"}
        if len(names) == 1 and names != {PAPER_METRIC.get(bench)} and bench in PAPER_METRIC:
            return subset_title(bench, names.pop())
        return TITLES.get(bench, bench)


def build_table(runs: list[Run], overrides: dict[str, str] | None = None) -> Table:
    overrides = overrides or {}
    cells = latest_runs(runs)
    present = {b for _, b in cells}
    benchmarks = [b for b in BENCH_ORDER if b in present] + sorted(present - set(BENCH_ORDER))
    configs = sorted({c for c, _ in cells}, key=Config.sort_key)
    values = {key: metric_value(run, overrides) for key, run in cells.items()}
    shown = {key: metric_name(run, overrides) for key, run in cells.items()}
    metric_names: dict[str, set[str]] = {}
    for (config, bench), name in shown.items():
        metric_names.setdefault(bench, set()).add(str(name))
    scored = [b for b in benchmarks if any(values.get((c, b)) is not None for c in configs)]

    mean, rel = {}, {}
    for config in configs:
        normalized = [on_percent_scale(b, shown[(config, b)], values[(config, b)],
                                       cells[(config, b)].record.get("metrics", {}))
                      for b in scored if values.get((config, b)) is not None]
        mean[config] = (sum(normalized) / len(normalized), len(normalized)) if normalized else (None, 0)
        # the unreduced run of the same model, whatever its token count (LLaVA-1.5 576, LLaVA-NeXT 2880)
        baseline = next((c for c in configs if c.model == config.model and c.base == NO_REDUCTION and not c.variant),
                        Config(config.model, NO_REDUCTION, FULL_TOKENS, False))
        # A ratio only between the same metric: SEED-IMG over SEED would not be "% of the full model".
        ratios = [100.0 * values[(config, b)] / values[(baseline, b)] for b in scored
                  if values.get((config, b)) is not None and values.get((baseline, b))
                  and shown[(config, b)] == shown[(baseline, b)]]
        rel[config] = (sum(ratios) / len(ratios), len(ratios)) if ratios else (None, 0)
    return Table(benchmarks, configs, cells, values, mean, rel, scored, metric_names, shown)


def _format_value(bench: str, value: float | None, run: Run | None, subset: str | None = None) -> str:
    if run is None:
        return "–"
    if value is None:
        return "online" if bench == "vqav2" else "n/a"
    shown = f"{value:.0f}" if bench == "ocrbench" and float(value).is_integer() else f"{value:.1f}"
    incomplete = (run.record.get("n_missing") or 0) > 0
    return shown + ("*" if incomplete else "") + (f" ({subset})" if subset else "")


def _cell(table: "Table", config: Config, bench: str) -> str:
    key = (config, bench)
    name = table.shown_metric.get(key)
    subset = subset_title(bench, name) if name and table.marked(bench) and name != PAPER_METRIC.get(bench) else None
    return _format_value(bench, table.values.get(key), table.cells.get(key), subset)


def _average(average: float | None, count: int, total: int, unit: str = "") -> str:
    return "–" if average is None else f"{average:.1f}{unit}" + ("†" if count < total else "")


def _config_cells(config: Config) -> list[str]:
    model = config.model + (f" ({config.variant})" if config.variant else "")
    if config.is_baseline:
        return [model, "none", str(config.n_vis), "–"]
    return [model, config.base, config.budget, "yes" if config.restore else "no"]


def render_markdown(table: Table) -> str:
    header = ["Model", "Base", "Tokens", "RESTORE"] + [table.title(b) for b in table.benchmarks] + ["Avg", "Mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config in table.configs:
        row = _config_cells(config)
        row += [_cell(table, config, b) for b in table.benchmarks]
        row.append(_average(*table.rel[config], len(table.scored), "%"))
        row.append(_average(*table.mean[config], len(table.scored)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def footnotes(table: Table) -> list[str]:
    def shown(bench: str) -> str:
        names = sorted(n for n in table.metric_names[bench] if n != "None")
        return "/".join(names) if names else "submission only (scored online)"

    notes = [
        "Metrics: " + ", ".join(f"{table.title(b)}: {shown(b)}" for b in table.benchmarks) + ".",
        "Avg (as in the paper): mean over benchmarks of the score relative to the same model without reduction "
        "(none/576, same metric), in percent.",
        "Mean: mean of the scored benchmarks on a 0-100 scale; MME is divided by its maximum (2800 for "
        "perception+cognition, 2000 perception, 800 cognition) and OCRBench's final score by 1000.",
        "VQAv2 (online scoring only) is in neither average.",
    ]
    subsets = sorted({subset_title(b, n) for (_, b), n in table.shown_metric.items()
                      if n and b in PAPER_METRIC and n != PAPER_METRIC[b]})
    if subsets:
        notes.append(f"Not the paper's column metric: {', '.join(subsets)} (e.g. SEED-IMG: image questions only; "
                     "the paper's SEED is over all questions, image and video).")
    if any(count < len(table.scored) for _, count in list(table.mean.values()) + list(table.rel.values())
           if count):
        notes.append(f"†: average over fewer benchmarks than the table's {len(table.scored)}.")
    if any(_format_value(key[1], table.values.get(key), run).endswith("*") for key, run in table.cells.items()):
        notes.append("*: the run left some items unanswered (its score counts them as wrong; see its metrics.json).")
    return notes


def render_report(table: Table, skipped: list[str]) -> str:
    parts = ["# Results", "", render_markdown(table), ""]
    parts += [f"- {note}" for note in footnotes(table)]
    parts += ["", "## Runs used (latest per configuration and benchmark)", "",
              "| Benchmark | Configuration | Items | Wall time (s) | Timestamp | File |", "|---|---|---|---|---|---|"]
    for config in table.configs:
        for bench in table.benchmarks:
            run = table.cells.get((config, bench))
            if run is None:
                continue
            r = run.record
            label = "/".join(_config_cells(config)[1:3]) + (" +RESTORE" if config.restore else "")
            parts.append(f"| {bench} | {_config_cells(config)[0]} {label} | {r.get('n_items', '')} | {r.get('wall_time_s', '')} | "
                         f"{r.get('timestamp', '')} | {run.source} |")
    if skipped:
        parts += ["", f"{len(skipped)} files under the results folder are not run records and were skipped."]
    return "\n".join(parts) + "\n"


def write_csv(table: Table, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "base", "n_vis", "restore", "variant"] + list(table.benchmarks)
                        + ["avg_rel", "avg_rel_n", "mean", "mean_n", "keep"])
        for config in table.configs:
            (rel, rel_n), (mean, mean_n) = table.rel[config], table.mean[config]
            values = [table.values.get((config, b)) for b in table.benchmarks]
            writer.writerow([config.model, config.base, config.n_vis, config.restore, config.variant]
                            + ["" if v is None else v for v in values]
                            + ["" if rel is None else rel, rel_n, "" if mean is None else mean, mean_n,
                               config.keep or ""])


def paper_report(tables: str, results: Path, model: str, out: Path) -> int:
    """The paper's tables beside the measured values (restore.paper.layout)."""
    from restore.paper import get_table, table_names
    from restore.paper.layout import print_paper_table

    names = table_names() if tables == "all" else [t.strip() for t in tables.split(",") if t.strip()]
    try:
        chosen = [get_table(name) for name in names]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for table in chosen:
        if table.kind == "analysis":
            print(f"## {table.title}\n(computed by python -m restore.analyze hausdorff, not from run records)\n")
            continue
        print_paper_table(table, results, model, table.benchmarks, out=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m restore.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="playground/results", help="folder with the run records")
    parser.add_argument("--out", default=None, help="where report.md and report.csv go (default: --results)")
    parser.add_argument("--metric", action="append", default=[], metavar="BENCH=NAME",
                        help="show this metric instead of the main one, e.g. mme=perception, seed=total_accuracy")
    parser.add_argument("--paper", nargs="?", const="all", default=None, metavar="TABLES",
                        help="print the paper's tables (all, or e.g. table1,table4) with each measured cell beside the "
                             "published value, in the paper's layout; writes paper_<table>.md/.csv")
    parser.add_argument("--model", default="llava-v1.5-7b",
                        help="with --paper: the model name the runs recorded (the checkpoint folder's name)")
    args = parser.parse_args(argv)
    results = Path(args.results)
    if not results.is_dir():
        print(f"error: results folder {results} does not exist", file=sys.stderr)
        return 2
    if args.paper:
        return paper_report(args.paper, results, args.model, Path(args.out) if args.out else results)
    overrides = {}
    for item in args.metric:
        bench, _, name = item.partition("=")
        if not name:
            parser.error(f"--metric expects BENCH=NAME, got {item!r}")
        overrides[bench] = name
    runs, skipped = load_runs(results)
    if not runs:
        print(f"no run records under {results}")
        return 0
    table = build_table(runs, overrides)
    out = Path(args.out) if args.out else results
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render_report(table, skipped), encoding="utf-8")
    write_csv(table, out / "report.csv")
    print(render_markdown(table))
    for note in footnotes(table):
        print(f"  {note}")
    print(f"written: {out / 'report.md'}, {out / 'report.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
