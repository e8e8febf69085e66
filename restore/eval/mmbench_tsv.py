"""The one reader of MMBench's TSV, used by the entry point, the scorer and the fixtures' reference answers.

Which cells count as empty follows LLaVA's ``model_vqa_mmbench``: pandas' missing-value rules (empty cell,
"NA", "None", ...) and then the text "nan" / "none" in any case, not stripped (" none" is an option).
Cells are kept as the text written in the file. LLaVA's script lets pandas type each column, so a column
whose cells are all numbers becomes int (float if one cell is empty) and its string concatenation fails;
any column that is text there reads as written, which is what this reader gives for every column, so an
option "8" is "8" in the prompt, in the scorer's option list and in the reference answers, never "8.0".
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Union

OPTION_LETTERS = ("A", "B", "C", "D")


class UnreadableTsv(ValueError):
    """pandas cannot parse the file; ``error`` is its exception."""

    def __init__(self, path: Union[str, Path], error: Exception):
        self.path, self.error = str(path), error
        super().__init__(f"{path}: cannot read as a TSV ({type(error).__name__}: {error})")


def read_table(path: Union[str, Path]):
    """The TSV as a pandas DataFrame of text cells (missing cells NaN); raises UnreadableTsv."""
    import pandas as pd

    try:
        return pd.read_table(path, dtype=str)
    except Exception as error:  # pandas raises several parser and decoding error types
        raise UnreadableTsv(path, error) from None


def read_rows(path: Union[str, Path]) -> List[Dict[str, Any]]:
    return read_table(path).to_dict("records")


def absent_columns(columns: Sequence[str], required: Sequence[str]) -> List[str]:
    return [name for name in required if name not in columns]


def is_empty(value: Any) -> bool:
    """An absent hint or option, by LLaVA's rule (module docstring)."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.lower() in ("nan", "none")


def row_options(row: Mapping[str, Any]) -> Dict[str, str]:
    """Options by letter, A onwards up to the first empty one."""
    options = {}
    for letter in OPTION_LETTERS:
        if letter not in row or is_empty(row[letter]):
            break
        options[letter] = row[letter]
    return options


def question_text(row: Mapping[str, Any], options: Sequence[str]) -> str:
    """The prompt before any answer instruction: hint (if any), question, one "X. option" line per option
    in the order given (a rotation for --all-rounds)."""
    question = row["question"] if is_empty(row.get("hint")) else row["hint"] + "\n" + row["question"]
    for letter, option in zip(OPTION_LETTERS, options):
        question += "\n" + letter + ". " + option
    return question
