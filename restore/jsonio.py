"""The package's one JSON / JSON-lines reader and its atomic writers.

Readers raise :class:`InvalidJson` (a ValueError) naming the file and, for JSON lines, the line; each
caller turns it into its own error (SetupError before inference, DataError in scoring) with its own
advice, so that the parsing rules are written once and the messages stay where the context is.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]


class InvalidJson(ValueError):
    """A file (or one line of it) is not valid JSON, or a line is not the JSON object it must be."""

    def __init__(self, path: PathLike, line: Optional[int], reason: str, error: Optional[Exception] = None):
        self.path, self.line, self.reason, self.error = str(path), line, reason, error
        where = f"{path} line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {reason}")


def read_json(path: PathLike) -> Any:
    """The file's JSON value (UTF-8)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidJson(path, None, f"not valid JSON ({error})", error) from None


def read_jsonl(path: PathLike, objects_only: bool = False, bad_lines: Optional[List[int]] = None) -> List[Any]:
    """The values of a JSON-lines file, blank lines skipped.

    ``objects_only``: a line whose value is not a JSON object is invalid too. ``bad_lines``: given a list,
    invalid lines are recorded there (1-based) and skipped instead of raising, for files a killed writer
    may have cut short (answer files)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                if bad_lines is None:
                    raise InvalidJson(path, number, f"not valid JSON ({error})", error) from None
                bad_lines.append(number)
                continue
            if objects_only and not isinstance(row, dict):
                if bad_lines is None:
                    raise InvalidJson(path, number, "not a JSON object")
                bad_lines.append(number)
                continue
            rows.append(row)
    return rows


def write_text(path: PathLike, text: str) -> str:
    """Replace ``path`` atomically (folders created): a writer killed midway never leaves a truncated file
    that a later reader would take for a result."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)


def write_json(path: PathLike, obj: Any, indent: Optional[int] = None, ensure_ascii: bool = False) -> str:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii))


def write_jsonl(path: PathLike, rows: Iterable[Dict[str, Any]], ensure_ascii: bool = False) -> str:
    return write_text(path, "".join(json.dumps(row, ensure_ascii=ensure_ascii) + "\n" for row in rows))


__all__ = ["InvalidJson", "read_json", "read_jsonl", "write_json", "write_jsonl", "write_text"]
