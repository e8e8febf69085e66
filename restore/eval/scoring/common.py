"""Shared pieces of the scorers: reading answer files, matching answers to the expected items,
the result record, atomic output files, and the errors raised when data files or answers are unusable."""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Iterator

from ... import jsonio
from ..entry_point import SHORT_ANSWER_SUFFIX  # noqa: F401  (re-exported for the scorers)

MAX_LISTED_IDS = 20


class DataError(Exception):
    """The benchmark's data files are absent or inconsistent: scoring is not possible."""


class DataFilesMissing(DataError, FileNotFoundError):
    """A file the scorer needs (annotation, question file, answers) does not exist."""


class AnswersError(Exception):
    """The answer file cannot be scored at all (e.g. not one answer matches an item of the benchmark)."""


def require_file(path: Path, what: str) -> Path:
    """Return `path` if it is a file, else raise DataFilesMissing naming it and what it is."""
    if not path.is_file():
        raise DataFilesMissing(f"missing {path}: {what} (see docs/data.md)")
    return path


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataFilesMissing(f"missing folder {path}: {what} (see docs/data.md)")
    return path


def load_json(path: Path) -> Any:
    """A data file's JSON; a broken file is a DataError naming it (not a traceback after inference)."""
    try:
        return jsonio.read_json(path)
    except jsonio.InvalidJson as invalid:
        raise DataError(f"{path} is not valid JSON ({invalid.error}): re-download it (see docs/data.md)") from None


def load_jsonl(path: Path) -> list[dict]:
    """Strict JSONL reader for data files (question files, POPE labels): blank lines skipped, any
    other line that is not a JSON object is a DataError naming the line."""
    try:
        return jsonio.read_jsonl(path, objects_only=True)
    except jsonio.InvalidJson as invalid:
        if invalid.error is None:
            raise DataError(f"{path} line {invalid.line} is not a JSON object: not a question/label file") from None
        raise DataError(f"{path} line {invalid.line} is not valid JSON ({invalid.error}): re-download it "
                        "(see docs/data.md)") from None


def require_fields(row: dict, fields: Iterable[str], where: str) -> dict:
    """`row` if it has every field, else a DataError saying which one `where` lacks."""
    absent = [name for name in fields if name not in row]
    if absent:
        raise DataError(f"{where} has no {', '.join(map(repr, absent))} field: not the official file (see docs/data.md)")
    return row


def first_duplicate(values: Iterable[Hashable]) -> tuple[int, Hashable] | None:
    """(0-based position, value) of the first value seen before, or None."""
    seen: set = set()
    for position, value in enumerate(values):
        if value in seen:
            return position, value
        seen.add(value)
    return None


@dataclass
class AnswerFile:
    """Records of an answer file; lines that are not valid JSON are counted, not fatal
    (a shard killed mid-write leaves a truncated last line)."""

    path: Path
    records: list[dict]
    bad_lines: list[int] = field(default_factory=list)  # 1-based line numbers

    @classmethod
    def read(cls, path: Path) -> "AnswerFile":
        path = Path(path)
        require_file(path, "the answer file to score")
        bad: list[int] = []
        records = jsonio.read_jsonl(path, objects_only=True, bad_lines=bad)
        return cls(path, records, bad)

    def model_id(self, default: str = "model") -> str:
        for record in self.records:
            if record.get("model_id"):
                return str(record["model_id"])
        return default


@dataclass
class Matched:
    """Answers indexed by item key; later duplicates replace earlier ones, as the official
    dict-based scorers do."""

    by_key: dict[Hashable, dict]
    duplicates: list[Hashable]
    unexpected: list[Hashable]
    missing: list[Hashable]


def match_answers(
    records: Iterable[dict],
    key_of: Callable[[dict], Hashable],
    expected: Iterable[Hashable],
) -> Matched:
    """Index `records` by `key_of`, split off keys outside `expected`, list expected keys
    without an answer (in expected order)."""
    expected = list(expected)
    expected_set = set(expected)
    by_key: dict[Hashable, dict] = {}
    duplicates, unexpected = [], []
    for record in records:
        try:
            key = key_of(record)
        except (KeyError, TypeError, ValueError):
            unexpected.append(repr({k: record.get(k) for k in list(record)[:3]}))
            continue
        if key not in expected_set:
            unexpected.append(key)
            continue
        if key in by_key:
            duplicates.append(key)
        by_key[key] = record
    missing = [key for key in expected if key not in by_key]
    return Matched(by_key, duplicates, unexpected, missing)


def id_key(record: dict, field_name: str = "question_id") -> str:
    """Question ids compared as strings: answer files may carry "123" where annotations have 123."""
    return str(record[field_name])


def percent(numerator: float, denominator: int) -> float | None:
    return 100.0 * numerator / denominator if denominator else None


@dataclass
class BenchResult:
    """What one scorer returns; `to_dict` is the metrics.json content."""

    benchmark: str
    metrics: dict[str, float | int | None]
    main_metric: str | None
    n_answers: int
    n_expected: int
    missing: list[Hashable] = field(default_factory=list)
    unexpected: list[Hashable] = field(default_factory=list)
    duplicates: list[Hashable] = field(default_factory=list)
    bad_lines: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @staticmethod
    def _show(keys: list[Hashable]) -> list:
        return [k if isinstance(k, (str, int)) else str(k) for k in keys[:MAX_LISTED_IDS]]

    def to_dict(self) -> dict:
        return {
            "benchmark": self.benchmark,
            "metrics": self.metrics,
            "main_metric": self.main_metric,
            "n_answers": self.n_answers,
            "n_expected": self.n_expected,
            "missing_ids": self._show(self.missing),
            "n_missing": len(self.missing),
            "complete": not self.missing,
            "unexpected_ids": self._show(self.unexpected),
            "n_unexpected": len(self.unexpected),
            "n_duplicates": len(self.duplicates),
            "bad_answer_lines": self.bad_lines[:MAX_LISTED_IDS],
            "n_bad_answer_lines": len(self.bad_lines),
            "notes": self.notes,
            "files": self.files,
        }


def make_result(
    benchmark: str,
    answers: AnswerFile,
    matched: Matched,
    metrics: dict,
    main_metric: str | None,
    n_expected: int,
    notes: list[str] | None = None,
    files: list[str] | None = None,
) -> BenchResult:
    notes = list(notes or [])
    if n_expected and not matched.by_key:
        # A 0.00 here would read as a score; it is a wrong file, benchmark or data root.
        raise AnswersError(
            f"none of the {len(answers.records)} answers in {answers.path} matches one of the {n_expected} "
            f"{benchmark} items in the data files (e.g. unknown ids {[str(k) for k in matched.unexpected[:3]]}): "
            "wrong answer file, benchmark or --data-root?")
    if matched.missing:
        notes.append(
            f"{len(matched.missing)} of {n_expected} expected items have no prediction; "
            "they are listed in missing_ids and scored as described in the scorer's docstring"
        )
    if matched.unexpected:
        notes.append(f"{len(matched.unexpected)} answers match no expected item and were ignored")
    if matched.duplicates:
        notes.append(f"{len(matched.duplicates)} items were answered more than once; the last answer counts")
    if answers.bad_lines:
        notes.append(f"{len(answers.bad_lines)} answer-file lines are not valid JSON and were skipped")
    return BenchResult(
        benchmark=benchmark,
        metrics=metrics,
        main_metric=main_metric,
        n_answers=len(answers.records),
        n_expected=n_expected,
        missing=matched.missing,
        unexpected=matched.unexpected,
        duplicates=matched.duplicates,
        bad_lines=answers.bad_lines,
        notes=notes,
        files=list(files or []),
    )


# Output files are replaced atomically (restore.jsonio): a scorer killed mid-write never leaves a
# truncated metrics.json or submission file that a later report or upload would take for a result.


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder for a writer that needs a file name (pandas' to_excel);
    moved onto `path` when the block succeeds, removed when it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
