"""MMBench: multiple choice from the official TSV (base64 images, circular copies as separate rows).

Behaves as LLaVA's ``model_vqa_mmbench``: the prompt is the hint (if any), the question and one line per
option (``A. ...``, until the first empty option), then with ``--single-pred-prompt`` the option-letter
instruction; one answer per row (``--all-rounds`` re-asks each row once per rotation of its options);
``max_new_tokens`` 1024; greedy by default.

    python -m restore.eval.mmbench --question-file playground/data/eval/mmbench/mmbench_dev_20230712.tsv \\
        --answers-file answers.jsonl --single-pred-prompt --base HoloV --n_vis 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Mapping

from . import mmbench_tsv, prompt_styles
from .entry_point import OPTION_LETTER_SUFFIX, EntryPoint, ImageRef, Item, SetupError, require_questions, require_unique
from .mmbench_tsv import OPTION_LETTERS, is_empty, question_text, row_options
from .runner import run

LETTER_SUFFIX_CN = "请直接回答选项字母。"
REQUIRED_COLUMNS = ("index", "question", "hint", "image", "A", "B")


def read_rows(path: str) -> List[Dict[str, Any]]:
    """The TSV's rows, read as the scorer reads them (restore.eval.mmbench_tsv)."""
    try:
        table = mmbench_tsv.read_table(path)
    except mmbench_tsv.UnreadableTsv as e:
        raise SetupError(str(e)) from None
    missing = mmbench_tsv.absent_columns(table.columns, REQUIRED_COLUMNS)
    if missing:
        raise SetupError(f"{path} lacks the column(s) {', '.join(missing)}; is this the MMBench TSV?")
    return table.to_dict("records")


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--all-rounds", action="store_true",
                       help="ask each row once per rotation of its options (not used for the paper)")
    group.add_argument("--lang", choices=["en", "cn"], default="en", help="language of the option-letter instruction")


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    return {"single_pred_prompt": args.single_pred_prompt, "all_rounds": args.all_rounds, "lang": args.lang}


def _key(index: Any, round_id: int) -> str:
    return json.dumps([index, round_id])


def build_items(settings: Mapping[str, Any]) -> List[Item]:
    path = settings["question_file"]
    suffix = LETTER_SUFFIX_CN if settings["lang"] == "cn" else OPTION_LETTER_SUFFIX
    rows = read_rows(path)
    require_questions(rows, path)
    style = prompt_styles.style_of(settings)
    items = []
    for row in rows:
        try:
            index = int(row["index"])
        except (TypeError, ValueError):
            raise SetupError(f"{path}: index {row['index']!r} is not an integer") from None
        if is_empty(row["image"]):
            raise SetupError(f"{path}: row {index} has no image")
        options = list(row_options(row).values())
        letters = list(OPTION_LETTERS[: len(options)])
        image = ImageRef(label=f"{os.path.basename(path)}, row index {index} (base64 image)",
                         base64=row["image"], convert_rgb=False)
        for round_id in range(len(options) if settings["all_rounds"] else 1):
            shown = options[round_id:] + options[:round_id]
            question = question_text(row, shown)
            text = question + "\n" + suffix if settings["single_pred_prompt"] else question
            if style != prompt_styles.DEFAULT_STYLE:
                text = prompt_styles.mmbench_text(row["question"], row.get("hint"), shown, letters,
                                                  suffix, not is_empty(row.get("hint")))
            items.append(Item(
                key=_key(index, round_id), text=text, image=image,
                fields={"question_id": index, "round_id": round_id, "prompt": question, "options": shown,
                        "option_char": letters[round_id:] + letters[:round_id]},
            ))
    require_unique(items, path, lambda item: f"index {item.fields['question_id']}")
    return items


def answer_line(item: Item, text: str, model_id: str) -> Dict[str, Any]:
    import shortuuid

    f = item.fields
    return {"question_id": f["question_id"], "round_id": f["round_id"], "prompt": f["prompt"], "text": text,
            "options": f["options"], "option_char": f["option_char"], "answer_id": shortuuid.uuid(),
            "model_id": model_id, "metadata": {}}


def answer_key(line: Mapping[str, Any]) -> str:
    return _key(line["question_id"], line.get("round_id", 0))


ENTRY = EntryPoint(
    name="mmbench",
    description="Answer MMBench (official TSV) with LLaVA-1.5, optionally with visual token reduction "
                "(--base/--n_vis) and RESTORE (--restore).",
    max_new_tokens=1024,
    needs_image_folder=False,
    add_arguments=_add_arguments,
    settings=_settings,
    build_items=build_items,
    answer_line=answer_line,
    answer_key=answer_key,
    single_pred_prompt=True,
)


def main(argv=None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
