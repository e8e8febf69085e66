"""One MMBench TSV reader for the entry point, the scorer and the reference answers.

Before it, the scorer let pandas type the columns (an option column of numbers with one empty cell
became float: option "8" was "8.0" and an answer "8" matched no option; " none" was an empty option),
and the reference answers took any non-text cell for the end of the options (numeric options vanished
from their prompts). The prompts here are the ones LLaVA's model_vqa_mmbench builds from cells as written.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from restore.eval import mmbench, mmbench_tsv
from restore.eval.fixtures import reference_answers
from restore.eval.scoring import score

COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category")
IMAGE = "aGVsbG8="  # never decoded here
# A, B, C: every cell a number; D: numbers and one empty cell (pandas alone would make it float).
NUMERIC_ROWS = [
    (0, "How many apples?", "", "1", "2", "3", "8", "D", "count", IMAGE, "Counting"),
    (1, "How many pears?", "Count carefully.", "4", "5", "6", "", "B", "count", IMAGE, "Counting"),
]
PROMPTS = ["How many apples?\nA. 1\nB. 2\nC. 3\nD. 8", "Count carefully.\nHow many pears?\nA. 4\nB. 5\nC. 6"]


def write_tsv(root: Path, rows) -> Path:
    path = root / "mmbench" / "mmbench_dev_20230712.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(COLUMNS) + "\n" + "".join("\t".join(map(str, row)) + "\n" for row in rows))
    return path


def entry_prompts(path: Path) -> list[str]:
    items = mmbench.build_items({"question_file": str(path), "single_pred_prompt": False, "all_rounds": False,
                                 "lang": "en"})
    return [item.text for item in items]


@pytest.mark.parametrize("with_empty_cell", [True, False])
def test_numeric_options_read_as_written_everywhere(tmp_path, with_empty_cell):
    rows = [list(row) for row in NUMERIC_ROWS]
    if not with_empty_cell:
        rows[1][6] = "9"
    path = write_tsv(tmp_path, rows)
    prompts = PROMPTS if with_empty_cell else [PROMPTS[0], PROMPTS[1] + "\nD. 9"]
    assert entry_prompts(path) == prompts
    assert [line["prompt"] for line in reference_answers(tmp_path, "mmbench")] == prompts
    assert mmbench_tsv.row_options(mmbench_tsv.read_rows(path)[0]) == {"A": "1", "B": "2", "C": "3", "D": "8"}

    # The model answers with the option's text: the scorer must find the option it names.
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "round_id": 0, "prompt": p, "text": text}) + "\n"
                               for i, (p, text) in enumerate(zip(prompts, ["8", "5"]))))
    summary = score("mmbench", answers, tmp_path, tmp_path / "out")
    assert summary["metrics"]["unparsed"] == 0
    assert summary["metrics"]["row_accuracy"] == 100.0


def test_empty_cells_follow_llavas_rule(tmp_path):
    # "none"/"NaN" in any case are empty, " none" (with a space) is an option, as in LLaVA's reader.
    rows = [(0, "Which color?", "none", "red", "blue", " none", "NONE", "C", "c", IMAGE, "Colors"),
            (1, "Which shape?", "NaN", "round", "square", "nan", "x", "A", "c", IMAGE, "Shapes")]
    path = write_tsv(tmp_path, rows)
    prompts = ["Which color?\nA. red\nB. blue\nC.  none", "Which shape?\nA. round\nB. square"]
    assert entry_prompts(path) == prompts
    assert [line["prompt"] for line in reference_answers(tmp_path, "mmbench")] == prompts
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "round_id": 0, "text": t}) + "\n"
                               for i, t in enumerate(["C", "A"])))
    assert score("mmbench", answers, tmp_path, tmp_path / "out")["metrics"]["row_accuracy"] == 100.0


def test_text_prompts_equal_the_official_readers(tmp_path):
    """On text columns LLaVA's own reader (pandas' types, its emptiness rule) gives the same prompts."""
    official = pytest.importorskip("llava.eval.model_vqa_mmbench")
    import pandas as pd

    rows = [(0, "Which color?", "none", "red", "blue", " none", "NONE", "C", "c", IMAGE, "Colors"),
            (1, "Which one?", "A hint.", "1.50", "two", "3", "", "A", "c", IMAGE, "Mixed"),
            (2, "Which shape?", "", "round", "0", "x", "y", "B", "c", IMAGE, "Shapes")]
    path = write_tsv(tmp_path, rows)
    expected = []
    for _, row in pd.read_table(path).iterrows():
        question = row["question"] if official.is_none(row["hint"]) else row["hint"] + "\n" + row["question"]
        for letter, option in zip("ABCD", official.get_options(row, official.all_options)):
            question += "\n" + letter + ". " + option
        expected.append(question)
    assert entry_prompts(path) == expected
    assert [line["prompt"] for line in reference_answers(tmp_path, "mmbench")] == expected


def test_unreadable_and_incomplete_tables_name_the_file(tmp_path):
    from restore.eval.entry_point import SetupError
    from restore.eval.scoring import DataError, check_data

    path = write_tsv(tmp_path, [])
    path.write_text("index\tquestion\n0\tq\n")
    with pytest.raises(SetupError, match="lacks the column"):
        mmbench.read_rows(str(path))
    with pytest.raises(DataError, match="has no column"):
        check_data("mmbench", tmp_path)
    path.write_bytes(b"index\tquestion\n\xff\xfe\x00\"unclosed\n")
    with pytest.raises(SetupError, match="cannot read as a TSV"):
        mmbench.read_rows(str(path))
    with pytest.raises(DataError, match="not a readable TSV"):
        check_data("mmbench", tmp_path)
