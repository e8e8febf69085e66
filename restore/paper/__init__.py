"""The paper's tables as data: the configurations x benchmarks each one needs, and the published values.

``published.json`` beside this file holds every number of the paper's tables (from the shared
``paper_tables.md``), each row with the configuration that produces it. This module reads it, names each
configuration's answers folder the way the benchmark scripts do, and says which rows can run today.
Torch-free: planning and printing a table never load a model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from restore.eval.naming import config_tag
from restore.settings import SETTING_NAMES

PUBLISHED = Path(__file__).with_name("published.json")
LLAVA_15 = "llava-v1.5-7b"
FULL_VISUAL_TOKENS = {LLAVA_15: 576, "llava-v1.6-vicuna-7b": 2880}
# The checkpoint each table's model is run from (the paper command's default --model-path).
HUB_NAMES = {LLAVA_15: "liuhaotian/llava-v1.5-7b", "llava-v1.6-vicuna-7b": "liuhaotian/llava-v1.6-vicuna-7b",
             "Qwen2.5-VL-7B-Instruct": "Qwen/Qwen2.5-VL-7B-Instruct"}
# Benchmark items per run (the question files the scripts read; SQA: image items only, as RESTORE runs it).
BENCHMARK_ITEMS = {"gqa": 12578, "mmbench": 4377, "mme": 2374, "pope": 8910, "sqa": 2017, "vqav2": 107394,
                   "textvqa": 5000, "seed": 19242, "ocrbench": 1000}
# What is still missing for rows the repository cannot run yet, by method.
NOT_YET = {
}
# The benchmark scripts of each table's model (scripts/<folder>/<bench>.sh): they pick its environment.
SCRIPT_FOLDERS = {"Qwen2.5-VL-7B-Instruct": "qwen2_5_vl"}
DEFAULT_SCRIPT_FOLDER = "llava1_5"


@dataclass(frozen=True)
class PaperConfig:
    """One configuration of a paper row: the base method, its budget and the settings that differ."""

    base: Optional[str]  # None: the unreduced model
    n_vis: Optional[int] = None
    restore: bool = False
    settings: Tuple[Tuple[str, Any], ...] = ()  # (name, value) overrides of restore.apply
    keep: Optional[float] = None  # a budget given as a share of the visual tokens (Qwen2.5-VL)

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> "PaperConfig":
        unknown = set(spec) - {"base", "n_vis", "restore", "keep"} - set(SETTING_NAMES)
        if unknown:
            raise ValueError(f"unknown configuration fields {sorted(unknown)} in {PUBLISHED.name}")
        settings = tuple((k, spec[k]) for k in SETTING_NAMES if k in spec)
        return cls(spec.get("base"), spec.get("n_vis"), bool(spec.get("restore", False)), settings, spec.get("keep"))

    def tag(self, num_patches: int = 576) -> str:
        """The answers-folder / run name the benchmark scripts give this configuration."""
        if self.base is None:
            return "full"
        return config_tag(self.base, self.n_vis, self.restore, num_patches=num_patches, keep=self.keep,
                          **dict(self.settings))

    def describe(self) -> str:
        if self.base is None:
            return "no reduction"
        extra = "".join(f", {k}={v}" for k, v in self.settings)
        budget = f"{self.n_vis}" if self.n_vis is not None else f"{100 * self.keep:.1f}%"
        return f"{self.base} {budget}{' + RESTORE' if self.restore else ''}{extra}"


@dataclass(frozen=True)
class PaperRow:
    label: str
    tokens: str
    config: PaperConfig
    published: Mapping[str, Optional[float]]


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    model: str
    benchmarks: Tuple[str, ...]
    rows: Tuple[PaperRow, ...]
    kind: str = "benchmarks"  # or "analysis" (computed by restore.analyze, not by the benchmark scripts)
    notes: Tuple[str, ...] = field(default=())

    @property
    def full_row(self) -> Optional[PaperRow]:
        return next((r for r in self.rows if r.config.base is None), None)

    def configs(self) -> List[PaperConfig]:
        """Distinct configurations in row order."""
        seen: Dict[PaperConfig, None] = {}
        for row in self.rows:
            seen.setdefault(row.config, None)
        return list(seen)


@lru_cache(maxsize=1)
def load_tables() -> Dict[str, PaperTable]:
    """Every table of ``published.json`` by name (``table1``, ``table4``, ...)."""
    data = json.loads(PUBLISHED.read_text(encoding="utf-8"))
    tables = {}
    for name, spec in data["tables"].items():
        rows = tuple(PaperRow(r["label"], str(r["tokens"]), PaperConfig.from_dict(r["config"]),
                              {k: v for k, v in r["published"].items()}) for r in spec["rows"])
        tables[name] = PaperTable(name, spec["title"], spec["model"], tuple(spec["benchmarks"]), rows,
                                  spec.get("kind", "benchmarks"), tuple(spec.get("notes", ())))
    return tables


def table_names() -> List[str]:
    return sorted(load_tables(), key=lambda n: int(n.removeprefix("table")))


def get_table(name: str) -> PaperTable:
    tables = load_tables()
    key = name.lower().replace(" ", "")
    key = key if key.startswith("table") else f"table{key}"
    if key not in tables:
        raise ValueError(f"unknown table {name!r}; the paper's tables here: {', '.join(table_names())}")
    return tables[key]


def why_not_runnable(table: PaperTable, config: PaperConfig, available: Sequence[str]) -> Optional[str]:
    """None when the repository can run ``config`` of ``table`` today, else what is missing."""
    if config.base is None:
        return None
    known = {a.lower() for a in available}
    if config.base.lower() not in known:
        return NOT_YET.get(config.base, f"method {config.base} is not registered")
    return None


def run_cost(table: PaperTable, configs: Sequence[PaperConfig], benchmarks: Optional[Sequence[str]] = None) -> int:
    """Benchmark items the configurations need (what a reproduction of the table costs, in model answers)."""
    benches = benchmarks or table.benchmarks
    return len(configs) * sum(BENCHMARK_ITEMS.get(b, 0) for b in benches)
