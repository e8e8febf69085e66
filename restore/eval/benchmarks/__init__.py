"""The benchmarks, one module each, behind one registry.

A benchmark module defines ``BENCHMARK``: a :class:`Benchmark` that says where its files lie under the
data root, which entry point reads its questions (and with which fixed flags), how its answers are
scored (``evaluate``, ``check_data``) and how its few-item fixture and correct answers are written
(``write_fixture``, ``reference_answers``). ``restore.eval.scoring`` and ``restore.eval.fixtures``
dispatch through this registry. Adding a benchmark is its module plus its name in
:data:`BENCHMARK_MODULES` (or a call of :func:`register_benchmark` from a plugin); see
docs/evaluation.md, "Adding a benchmark".
"""
from __future__ import annotations

import importlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from ..scoring.common import AnswerFile, BenchResult

# Registration: one line per benchmark, in the paper's column order.
BENCHMARK_MODULES = ("gqa", "vqav2", "seed", "mmbench", "mme", "pope", "sqa", "textvqa", "ocrbench")


@dataclass(frozen=True)
class Benchmark:
    """Everything the scripts need to run one benchmark."""

    name: str  # the scorer's and the report's name, the script's file name
    title: str  # one line for --help and logs
    entry: str  # entry point module, restore.eval.<entry>
    question_file: str  # relative to --data-root
    image_folder: Optional[str]  # relative to --data-root; None: images come inside the question file
    entry_args: Tuple[str, ...] = ()  # fixed entry-point flags of the official script
    usage_note: str = ""  # extra lines for --help
    # Scoring: (answers, data root, output folder, model id) -> result; raise DataError / AnswersError.
    evaluate: Optional[Callable[["AnswerFile", Path, Path, str], "BenchResult"]] = None
    check_data: Optional[Callable[[Path], None]] = None  # the scorer's data files exist and agree, or DataError
    data_files: Tuple[str, ...] = ()  # relative to --data-root: what the scorer reads besides the answers
    # Fixtures: (data root, items, rng) -> {"first_image": path, "first_ids": ids that use it}.
    write_fixture: Optional[Callable[[Path, int, random.Random], Dict[str, Any]]] = None
    # (data root, model id) -> answer lines in the entry point's format that the scorer rates 100%.
    reference_answers: Optional[Callable[[Path, str], List[Dict[str, Any]]]] = None
    # (data root, fixture info) -> manifest entry; None: the first image file is overwritten.
    corrupt_fixture: Optional[Callable[[Path, Dict[str, Any]], Dict[str, Any]]] = None

    @property
    def folder(self) -> str:
        """The benchmark's folder under the data root (LLaVA's playground layout)."""
        return self.question_file.split("/")[0]


_REGISTRY: Dict[str, Benchmark] = {}


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Make ``benchmark`` known under its name; a second benchmark of the same name is refused."""
    known = _REGISTRY.get(benchmark.name)
    if known is not None and known != benchmark:
        raise ValueError(f"a benchmark named {benchmark.name!r} is registered already; choose another name")
    _REGISTRY[benchmark.name] = benchmark
    return benchmark


def _load_builtin() -> None:
    for module in BENCHMARK_MODULES:
        if module not in _REGISTRY:
            register_benchmark(importlib.import_module(f"{__name__}.{module}").BENCHMARK)


def get_benchmark(name: str) -> Benchmark:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(benchmark_names())}") from None


def benchmark_names() -> List[str]:
    _load_builtin()
    return list(_REGISTRY)
