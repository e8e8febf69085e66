"""Run records: what one scored run says, how records are read, and which metric a paper column shows.

Shared by the results table (restore.report) and the paper tables (restore.paper.layout).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from restore.eval.naming import plain_tag

from .jsonio import InvalidJson, read_json, read_jsonl

BENCH_ORDER = ("gqa", "mmbench", "mme", "pope", "sqa", "vqav2", "textvqa", "seed", "ocrbench")
TITLES = {"gqa": "GQA", "mmbench": "MMB", "mme": "MME", "pope": "POPE", "sqa": "SQA-IMG", "vqav2": "VQAv2",
          "textvqa": "TextVQA", "seed": "SEED", "ocrbench": "OCRBench"}
# The metric of each column of the paper's tables (shared/paper_tables.md); None: scored online.
PAPER_METRIC = {"gqa": "accuracy", "mmbench": "circular_accuracy", "mme": "total", "pope": "f1_mean",
                "sqa": "img_accuracy", "vqav2": None, "textvqa": "accuracy", "seed": "total_accuracy",
                "ocrbench": "final_score"}
# What a cell is when it shows another metric than the paper's column.
SUBSET_TITLES = {("seed", "image_accuracy"): "SEED-IMG", ("mme", "perception"): "MME-P",
                 ("mme", "cognition"): "MME-C"}
METRIC_MAX = {("mme", "total"): 2800.0, ("mme", "perception"): 2000.0, ("mme", "cognition"): 800.0}
FULL_TOKENS = 576
NO_REDUCTION = "none"


@dataclass(frozen=True, order=True)
class Config:
    model: str
    base: str
    n_vis: int
    restore: bool
    variant: str = ""  # a non-default run name: other answer-changing settings
    keep: float = 0.0  # a budget given as a share of each image's tokens (n_vis is then 0); 0: n_vis counts

    @property
    def is_baseline(self) -> bool:
        return self.base == NO_REDUCTION

    @property
    def budget(self) -> str:
        """The budget as the tables show it: a count, or a share of each image's tokens (``11.1%``)."""
        return f"{100 * self.keep:.1f}%" if self.keep else str(self.n_vis)

    def sort_key(self) -> tuple:
        return (self.model, not self.is_baseline, self.base.lower(), -self.keep, -self.n_vis, self.restore,
                self.variant)


@dataclass
class Run:
    config: Config
    benchmark: str
    record: dict
    source: str
    order: tuple  # (timestamp, file) for "latest wins"


def _timestamp(value, fallback: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return fallback
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return moment.timestamp()
    return fallback


def config_of(record: dict) -> Config:
    base = record.get("base")
    base = NO_REDUCTION if base in (None, "", "none", "None") else str(base)
    keep = float(record.get("keep") or 0.0) if base != NO_REDUCTION else 0.0
    n_vis = record.get("n_vis")
    n_vis = FULL_TOKENS if base == NO_REDUCTION and n_vis in (None, 0) else 0 if keep else int(n_vis)
    restore = bool(record.get("restore")) and base != NO_REDUCTION
    run_name = str(record.get("run_name") or "")
    variant = "" if run_name.lower() in ("", default_run_name(base, n_vis, restore, keep or None)) else run_name
    return Config(str(record.get("model") or "?"), base, n_vis, restore, variant, keep)


def default_run_name(base: str, n_vis: int, restore: bool, keep: float | None = None) -> str:
    """The answers subfolder the launcher picks without --run-name or setting overrides (lower case)."""
    return plain_tag(None if base == NO_REDUCTION else base, n_vis, restore, keep)


def is_run_record(obj) -> bool:
    return isinstance(obj, dict) and {"benchmark", "metrics", "base"} <= set(obj)


def load_runs(results_dir: Path) -> tuple[list[Run], list[str]]:
    """All run records under results_dir, and the files skipped (not records / unreadable)."""
    runs, skipped = [], []
    for path in sorted(list(results_dir.rglob("*.json")) + list(results_dir.rglob("*.jsonl"))):
        try:
            objects = read_jsonl(path) if path.suffix == ".jsonl" else [read_json(path)]
        except (OSError, InvalidJson):
            skipped.append(str(path))
            continue
        records = [o for o in objects if is_run_record(o)]
        if not records:
            skipped.append(str(path))
        mtime = path.stat().st_mtime
        for line_number, record in enumerate(records):
            runs.append(Run(config_of(record), str(record["benchmark"]), record, str(path),
                            (_timestamp(record.get("timestamp"), mtime), str(path), line_number)))
    return runs, skipped


def latest_runs(runs: list[Run]) -> dict[tuple[Config, str], Run]:
    chosen: dict[tuple[Config, str], Run] = {}
    for run in runs:
        key = (run.config, run.benchmark)
        if key not in chosen or run.order > chosen[key].order:
            chosen[key] = run
    return chosen


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def metric_name(run: Run, overrides: dict[str, str]) -> str | None:
    """--metric if given, else the paper's metric for the column when the run has it, else the run's own
    main metric (e.g. image_accuracy for a SEED-IMG run)."""
    if run.benchmark in overrides:
        return overrides[run.benchmark]
    paper = PAPER_METRIC.get(run.benchmark)
    if paper and _number(run.record.get("metrics", {}).get(paper)) is not None:
        return paper
    return run.record.get("main_metric")


def metric_value(run: Run, overrides: dict[str, str]) -> float | None:
    name = metric_name(run, overrides)
    return _number(run.record.get("metrics", {}).get(name)) if name else None


def subset_title(bench: str, name: str) -> str:
    """What a cell of `bench` showing metric `name` is, e.g. SEED-IMG."""
    return SUBSET_TITLES.get((bench, name), f"{TITLES.get(bench, bench)} {name}")


def on_percent_scale(benchmark: str, name: str, value: float, metrics: dict) -> float:
    """The metric on a 0-100 scale (see the module docstring)."""
    if (benchmark, name) in METRIC_MAX:
        return 100.0 * value / METRIC_MAX[(benchmark, name)]
    if benchmark == "ocrbench" and name == "final_score":
        return 100.0 * value / float(metrics.get("max_score") or 1000)
    return value
