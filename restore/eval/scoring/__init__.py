"""Scoring of the nine LLaVA-1.5 benchmarks (and any registered one), each giving the official scorer's number.

    python -m restore.eval.scoring BENCH --answers ANSWERS.jsonl --data-root DATA_ROOT --out-dir OUT_DIR

or `score(bench, answers_path, data_root, out_dir)`. Each scorer writes `metrics.json` and the
benchmark's conversion/submission files into the output folder. The scorers themselves are the
``evaluate``/``check_data`` hooks of the benchmarks' modules (restore.eval.benchmarks). Missing
predictions never crash a scorer and are never filled in silently: they are counted, listed, and scored
as each benchmark module's docstring says.
"""
from __future__ import annotations

from pathlib import Path

from ...jsonio import write_json
from ..benchmarks import BENCHMARK_MODULES, Benchmark, benchmark_names, get_benchmark
from .common import AnswerFile, AnswersError, BenchResult, DataError, DataFilesMissing

BENCHMARKS = BENCHMARK_MODULES  # the built-in ones; scorer_names() adds registered plugins
DEFAULT_DATA_ROOT = Path("playground/data/eval")

__all__ = ["BENCHMARKS", "DEFAULT_DATA_ROOT", "AnswersError", "DataError", "DataFilesMissing", "check_data", "score",
           "evaluate", "scorer_names"]


def scorer_names() -> list[str]:
    """Registered benchmarks that have a scorer, in registration order."""
    return [name for name in benchmark_names() if get_benchmark(name).evaluate is not None]


def _scored(bench: str) -> Benchmark:
    if bench not in scorer_names():
        raise ValueError(f"unknown benchmark {bench!r}; choose one of {', '.join(scorer_names())}")
    return get_benchmark(bench)


def evaluate(bench: str, answers_path: str | Path, data_root: str | Path, out_dir: str | Path,
             model_id: str | None = None) -> BenchResult:
    """Score one answer file; returns the BenchResult (metrics.json is written by `score`)."""
    benchmark = _scored(bench)
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DataFilesMissing(f"data root {data_root} does not exist (see docs/data.md)")
    answers = AnswerFile.read(Path(answers_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return benchmark.evaluate(answers, data_root, out_dir, model_id or answers.model_id())


def check_data(bench: str, data_root: str | Path) -> None:
    """Raise DataError (DataFilesMissing for an absent file) unless every data file the scorer of ``bench``
    reads exists, parses and agrees with the others (question file vs ground truth), exactly as scoring
    reads them; no answers needed: run before inference so that a problem is found in seconds, not after it."""
    benchmark = _scored(bench)
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DataFilesMissing(f"data root {data_root} does not exist (see docs/data.md)")
    if benchmark.check_data is not None:
        benchmark.check_data(data_root)


def score(bench: str, answers_path: str | Path, data_root: str | Path = DEFAULT_DATA_ROOT,
          out_dir: str | Path = ".", model_id: str | None = None) -> dict:
    """Score one answer file, write OUT_DIR/metrics.json and return its content."""
    result = evaluate(bench, answers_path, data_root, out_dir, model_id)
    summary = result.to_dict()
    summary["files"] = summary["files"] + [str(Path(out_dir) / "metrics.json")]
    write_json(Path(out_dir) / "metrics.json", summary, indent=2)
    return summary
