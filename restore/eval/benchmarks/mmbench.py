"""MMBench dev (English): CircularEval accuracy computed locally, plus the official submission xlsx.

The dev TSV holds every question several times with its options rotated; copy k of question
b has index b + k * 1,000,000 and its own `answer` letter. A question counts as correct only
if every copy in the TSV is answered correctly ("circular_accuracy", the main metric, the
number the MMBench server reports). "vanilla_accuracy" scores the unrotated copies only
(index < 1,000,000); "row_accuracy" every row on its own. A copy without a prediction is
wrong and listed in missing_ids.

Letter extraction (rule based, in this order; letters outside the row's options do not count):
  1. the whole output is a letter, optionally in parentheses and/or followed by ".", ":" or ")":
     "B", "B.", "(B)", "B)";
  2. the output starts with such a letter followed by a space and more text: "B. cat", "(B) cat",
     "B) cat", "B: cat" (not "A cat": a capital word is not taken for an option);
  3. "answer is X" / "answer: X" (any case for "answer", X a capital letter, optionally in
     parentheses), if all such phrases name the same letter;
  4. the output, without a trailing period and ignoring case, equals exactly one option's text.
Anything else is unparsed and wrong (count in "unparsed"). The official server applies a
similar matcher and then asks an LLM (ChatGPT) to map unparsed outputs to an option, so a model
that answers in free text can score higher there; LLaVA-1.5 with the single-letter prompt
answers with a bare letter, where both agree.

Submission (LLaVA's MMBench converter): the TSV without hint/category/source/image/comment/
l2-category, a `prediction` column (raw output text) inserted at position 6, written as
`mmbench_dev_20230712_<model>.xlsx` (pandas + openpyxl).

Data checks (also by check_data, before inference, with the check that openpyxl is installed): the
TSV has the columns index, question, A, B and answer, no index twice, every copy's base question
has its unrotated row (index < 1,000,000), and every answer is one of its row's option letters.

Fixture (`write_fixture`, few items in the official formats): MMBench: mmbench_dev_20230712.tsv with
base64 images and circular copies.
"""
from __future__ import annotations

import base64
import random
import re
from pathlib import Path

from .. import mmbench_tsv
from ..fixtures import CORRUPT_BYTES, Info, draw_scene, image_base64, other_colors, plural, random_scene, reference_line
from ..mmbench_tsv import row_options
from ..scoring.common import (AnswerFile, BenchResult, DataError, atomic_path, first_duplicate, make_result,
                              match_answers, percent, require_file)
from . import Benchmark

NAME = "mmbench"
SPLIT = "mmbench_dev_20230712"
COPY_STRIDE = 1_000_000
DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")
REQUIRED_COLUMNS = ("index", "question", "A", "B", "answer")

_BARE_LETTER = re.compile(r"\(?([A-Z])\)?[.:)]?")
_LEADING_LETTER = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.:)])\s+\S")
_ANSWER_PHRASE = re.compile(r"(?i:answer)(?:\s+is|\s*:)\s*\(?([A-Z])(?=$|[\s.,:;)!])")


def extract_letter(text: str, options: dict[str, str]) -> str | None:
    """The option letter a free-form output names, or None (rules in the module docstring)."""
    text = text.strip()
    match = _BARE_LETTER.fullmatch(text)
    if match:
        return match.group(1) if match.group(1) in options else None
    match = _LEADING_LETTER.match(text)
    if match:
        letter = match.group(1) or match.group(2)
        return letter if letter in options else None
    named = {m.group(1) for m in _ANSWER_PHRASE.finditer(text)}
    if len(named) == 1:
        letter = named.pop()
        return letter if letter in options else None
    plain = text.rstrip(".").strip().lower()
    same = [letter for letter, option in options.items() if option.strip().rstrip(".").lower() == plain]
    return same[0] if len(same) == 1 else None


def _illegal_characters():
    """openpyxl's pattern of characters Excel cannot store (openpyxl also writes the xlsx)."""
    try:
        from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
    except ImportError:
        raise DataError("writing the MMBench submission xlsx needs openpyxl: pip install openpyxl") from None
    return ILLEGAL_CHARACTERS_RE


def load_table(data_root: Path):
    """The dev TSV and its rows by index, checked as the module docstring says."""
    tsv = require_file(data_root / "mmbench" / f"{SPLIT}.tsv", "official MMBench dev TSV")
    try:
        table = mmbench_tsv.read_table(tsv)
    except mmbench_tsv.UnreadableTsv as unreadable:
        raise DataError(f"{tsv} is not a readable TSV ({unreadable.error}): re-download the MMBench dev TSV") from None
    absent = mmbench_tsv.absent_columns(table.columns, REQUIRED_COLUMNS)
    if absent:
        raise DataError(f"{tsv} has no column(s) {absent}: not the MMBench dev TSV (the test TSV has no answers)")
    records = table.to_dict("records")
    repeated = first_duplicate(int(row["index"]) for row in records)
    if repeated:
        raise DataError(f"{tsv} row {repeated[0] + 1} repeats index {repeated[1]}: the circular copies would merge")
    rows = {int(row["index"]): row for row in records}
    for number, (index, row) in enumerate(rows.items(), start=1):
        if index % COPY_STRIDE not in rows:
            raise DataError(f"{tsv} row {number}: index {index} is a circular copy of question {index % COPY_STRIDE}, "
                            "which the TSV lacks")
        answer = str(row["answer"]).strip()
        if answer not in row_options(row):
            raise DataError(f"{tsv} row {number} (index {index}): answer {answer!r} is not one of its options "
                            f"{list(row_options(row))}")
    return table, rows


def _write_submission(table, predictions: dict[int, str], path: Path) -> str:
    illegal_characters = _illegal_characters()
    sheet = table.drop(columns=[c for c in DROPPED_COLUMNS if c in table.columns])
    # The reader keeps cells as text; the index is the number the server matches predictions by.
    sheet["index"] = [int(i) for i in sheet["index"]]
    column = [predictions.get(int(i)) for i in sheet["index"]]
    # Excel cannot store control characters; they are removed from the uploaded text only.
    column = [illegal_characters.sub("", t) if isinstance(t, str) else t for t in column]
    sheet.insert(min(6, len(sheet.columns)), "prediction", column)
    with atomic_path(path) as partial:
        sheet.to_excel(partial, index=False, engine="openpyxl")
    return str(path)


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist and agree, and the xlsx can be written; raises DataError."""
    load_table(data_root)
    _illegal_characters()


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    table, rows = load_table(data_root)

    # Only the first round counts (entry points run with a single prediction per row).
    first_round = [r for r in answers.records if int(r.get("round_id", 0) or 0) == 0]
    matched = match_answers(first_round, lambda r: int(r["question_id"]), rows)
    predictions = {index: r.get("text", "") for index, r in matched.by_key.items()}
    files = [_write_submission(table, predictions, out_dir / f"{SPLIT}_{model_id}.xlsx")]

    row_correct: dict[int, bool] = {}
    unparsed = 0
    for index, row in rows.items():
        record = matched.by_key.get(index)
        if record is None:
            row_correct[index] = False
            continue
        letter = extract_letter(record.get("text", ""), row_options(row))
        unparsed += letter is None
        row_correct[index] = letter is not None and letter == str(row["answer"]).strip()

    questions: dict[int, list[int]] = {}
    for index in rows:
        questions.setdefault(index % COPY_STRIDE, []).append(index)
    question_correct = {base: all(row_correct[i] for i in copies) for base, copies in questions.items()}

    metrics = {
        "circular_accuracy": percent(sum(question_correct.values()), len(questions)),
        "vanilla_accuracy": percent(sum(row_correct[i] for i in rows if i < COPY_STRIDE),
                                    sum(1 for i in rows if i < COPY_STRIDE)),
        "row_accuracy": percent(sum(row_correct.values()), len(rows)),
        "unparsed": unparsed,
    }
    if "l2-category" in table.columns:
        groups: dict[str, list[bool]] = {}
        for base, copies in questions.items():
            name = str(rows[copies[0]]["l2-category"])
            groups.setdefault(name, []).append(question_correct[base])
        for name in sorted(groups):
            metrics[f"l2/{name}"] = percent(sum(groups[name]), len(groups[name]))
    notes = [f"{len(questions)} questions in {len(rows)} circular copies"]
    return make_result(NAME, answers, matched, metrics, "circular_accuracy", len(rows), notes=notes, files=files)


# ----------------------------------------------------------------------------------------------
# MMBench: mmbench_dev_20230712.tsv with base64 images and circular copies

MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")
MMBENCH_CATEGORIES = (("attribute_recognition", "Fine-grained Single-instance Perception"),
                      ("image_scene", "Coarse Perception"), ("object_localization", "Fine-grained Single-instance Perception"),
                      ("spatial_relationship", "Relation Reasoning"), ("physical_property_reasoning", "Attribute Reasoning"))


def _tsv_cell(value) -> str:
    return "" if value is None else str(value)


def write_fixture(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "mmbench"
    rows = []
    bases = sorted(rng.sample(range(1, 5000), n))
    for i, base in enumerate(bases):
        scene = random_scene(rng)
        k = (4, 3, 2)[i % 3]  # number of options, hence of circular copies
        options = other_colors(rng, scene["color"], k - 1)
        right = rng.randrange(k)
        options.insert(right, scene["color"])
        hint = None if i % 2 else f"The picture shows {plural(scene['shape'])}."
        category, l2 = MMBENCH_CATEGORIES[i % len(MMBENCH_CATEGORIES)]
        encoded = image_base64(draw_scene(scene, rng))
        for shift in range(k):
            rotated = options[shift:] + options[:shift]
            padded = rotated + [None] * (4 - k)
            rows.append({"index": base + shift * 1_000_000, "question": f"What color are the {plural(scene['shape'])}?",
                         "hint": hint, "A": padded[0], "B": padded[1], "C": padded[2], "D": padded[3],
                         "answer": "ABCD"[(right - shift) % k], "category": category, "image": encoded,
                         "source": "restore-fixture", "l2-category": l2, "comment": None, "split": "dev"})
    rows.sort(key=lambda r: r["index"])
    text = "\t".join(MMBENCH_COLUMNS) + "\n"
    text += "".join("\t".join(_tsv_cell(r[c]) for c in MMBENCH_COLUMNS) + "\n" for r in rows)
    path = folder / "mmbench_dev_20230712.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return {"first_image": None, "first_ids": [rows[0]["index"]]}


def reference_answers(data_root: Path, model_id: str = "reference") -> list[dict]:
    """Read with the entry point's TSV reader, so the prompts are the entry point's (numeric options included)."""
    lines = []
    for row in mmbench_tsv.read_rows(data_root / "mmbench" / f"{SPLIT}.tsv"):
        options = row_options(row)
        prompt = mmbench_tsv.question_text(row, list(options.values()))
        lines.append(reference_line(int(row["index"]), prompt, str(row["answer"]), model_id, round_id=0,
                                    options=list(options.values()), option_char=list(options)))
    return lines


def corrupt_fixture(root: Path, info: Info) -> dict:
    """The images live inside the TSV: the first row's base64 cell is replaced by bytes that are no image."""
    path = root / "mmbench" / f"{SPLIT}.tsv"
    header, *rows = path.read_text(encoding="utf-8").split("\n")
    column = header.split("\t").index("image")
    cells = rows[0].split("\t")
    cells[column] = base64.b64encode(CORRUPT_BYTES).decode("ascii")
    rows[0] = "\t".join(cells)
    path.write_text("\n".join([header, *rows]), encoding="utf-8")
    return {"benchmark": NAME, "file": str(path), "question_ids": info["first_ids"]}


BENCHMARK = Benchmark(
    name="mmbench",
    title="MMBench dev (English), one answer per row; local CircularEval score and the upload xlsx.",
    entry="mmbench",
    question_file="mmbench/mmbench_dev_20230712.tsv",
    image_folder=None,
    entry_args=("--single-pred-prompt",),
    evaluate=evaluate,
    check_data=check_data,
    data_files=(f"mmbench/{SPLIT}.tsv",),
    write_fixture=write_fixture,
    reference_answers=reference_answers,
    corrupt_fixture=corrupt_fixture,
)
