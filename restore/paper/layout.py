"""A paper table with the measured values beside the published ones, in the paper's row and column layout.

Each cell is ``measured / published (difference)``; a configuration x benchmark that has not run is
blank, never zero. Avg is computed as the paper computes it: the mean over the table's benchmarks of
100 x score / the unreduced model's score (the measured one for measured rows), over the benchmarks
where both are known ("†" when that is fewer than the table's).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from restore.results import PAPER_METRIC, TITLES, Run, load_runs, metric_name, metric_value, subset_title

from . import PaperTable

Key = Tuple[str, str, str]  # (model, run name, benchmark)


def latest_by_name(results_dir: Path) -> Dict[Key, Run]:
    """The newest run record of every (model, run name, benchmark) under ``results_dir``."""
    if not results_dir.is_dir():
        return {}
    runs, _ = load_runs(results_dir)
    chosen: Dict[Key, Run] = {}
    for run in runs:
        key = (str(run.record.get("model")), str(run.record.get("run_name") or "").lower(), run.benchmark)
        if key not in chosen or run.order > chosen[key].order:
            chosen[key] = run
    return chosen


def existing_results(results_dir: Path) -> set:
    return set(latest_by_name(results_dir))


def _paper_value(run: Optional[Run], bench: str) -> Tuple[Optional[float], Optional[str]]:
    """(value comparable with the paper's column, or None; a label when the run shows another metric)."""
    if run is None:
        return None, None
    name = metric_name(run, {})
    value = metric_value(run, {})
    if value is None:
        return None, "online" if bench == "vqav2" else "n/a"
    if name != PAPER_METRIC.get(bench, name):
        return None, f"{value:.1f} ({subset_title(bench, str(name))})"
    return value, None


def _fmt(bench: str, value: Optional[float]) -> str:
    if value is None:
        return ""
    if bench in ("mme", "ocrbench"):
        return f"{value:.0f}"
    if bench == "hausdorff":
        return f"{value:.4f}"
    return f"{value:.1f}"


class MeasuredTable:
    """The measured values of a paper table, read from the run records."""

    def __init__(self, table: PaperTable, results: Dict[Key, Run], model: str, benchmarks: Sequence[str]):
        self.table, self.model, self.benchmarks = table, model, list(benchmarks)
        self.values: Dict[Tuple[int, str], Optional[float]] = {}
        self.labels: Dict[Tuple[int, str], Optional[str]] = {}
        for index, row in enumerate(table.rows):
            for bench in self.benchmarks:
                run = results.get((model, row.config.tag(), bench))
                self.values[index, bench], self.labels[index, bench] = _paper_value(run, bench)
        full = [i for i, r in enumerate(table.rows) if r.config.base is None]
        self.full_values = {b: (self.values[full[0], b] if full else
                                _paper_value(results.get((model, "full", b)), b)[0]) for b in self.benchmarks}

    def average(self, index: int) -> Tuple[Optional[float], int]:
        ratios = [100.0 * self.values[index, b] / self.full_values[b] for b in self.benchmarks
                  if self.values[index, b] is not None and self.full_values.get(b)]
        return (sum(ratios) / len(ratios), len(ratios)) if ratios else (None, 0)


def render(measured: MeasuredTable) -> str:
    table, benches = measured.table, measured.benchmarks
    with_avg = len(benches) > 1
    header = ["tokens", "method"] + (["Avg"] if with_avg else []) + [TITLES.get(b, b) for b in benches]
    lines = [f"## {table.title}", "", f"model: {measured.model}; each cell: measured / published (difference)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    partial = False
    for index, row in enumerate(table.rows):
        cells = [row.tokens, row.label]
        if with_avg:
            average, count = measured.average(index)
            published = row.published.get("avg")
            mark = "†" if average is not None and count < len(benches) else ""
            partial = partial or bool(mark)
            cells.append(_pair(f"{average:.1f}%{mark}" if average is not None else "", average,
                               None if published is None else f"{published:.1f}%", published))
        for bench in benches:
            value, label = measured.values[index, bench], measured.labels[index, bench]
            published = row.published.get(bench)
            shown = label if label else _fmt(bench, value)
            cells.append(_pair(shown, value, _fmt(bench, published) if published is not None else None, published,
                               digits=4 if bench == "hausdorff" else 1))
        lines.append("| " + " | ".join(cells) + " |")
    notes = ["", "Blank: not run yet. Avg as the paper's: mean over the benchmarks of 100 x score / the "
             "unreduced model's score (measured rows against the measured unreduced model)."]
    if partial:
        notes.append("†: over fewer benchmarks than the table has (some cells not run, or no unreduced run).")
    return "\n".join(lines + notes) + "\n"


def _pair(shown: str, value: Optional[float], paper: Optional[str], published: Optional[float],
          digits: int = 1) -> str:
    """``measured / published (difference)``; `` / published`` when not run; the measured value alone
    when the paper has no number there."""
    if paper is None:
        return shown
    diff = f" ({value - published:+.{digits}f})" if value is not None and published is not None else ""
    return f"{shown} / {paper}{diff}"


def write_csv(measured: MeasuredTable, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["table", "row", "tokens", "label", "configuration", "benchmark", "measured", "published",
                         "difference"])
        for index, row in enumerate(measured.table.rows):
            columns: List[Tuple[str, Optional[float], Optional[float]]] = []
            if len(measured.benchmarks) > 1:
                columns.append(("avg", measured.average(index)[0], row.published.get("avg")))
            columns += [(b, measured.values[index, b], row.published.get(b)) for b in measured.benchmarks]
            for bench, value, published in columns:
                diff = value - published if value is not None and published is not None else None
                writer.writerow([measured.table.name, index, row.tokens, row.label, row.config.describe(), bench,
                                 "" if value is None else value, "" if published is None else published,
                                 "" if diff is None else diff])


def print_paper_table(table: PaperTable, results_dir: Path, model: str, benchmarks: Sequence[str],
                      out: Optional[Path] = None) -> MeasuredTable:
    """Print the table beside the paper and write paper_<table>.md / .csv into ``out``."""
    measured = MeasuredTable(table, latest_by_name(results_dir), model, benchmarks)
    text = render(measured)
    print(text)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"paper_{table.name}.md").write_text(text, encoding="utf-8")
        write_csv(measured, out / f"paper_{table.name}.csv")
        print(f"written: {out / f'paper_{table.name}.md'}, {out / f'paper_{table.name}.csv'}")
    return measured
