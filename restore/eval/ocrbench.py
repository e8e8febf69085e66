"""OCRBench: 1,000 OCR questions from the official ``OCRBench.json``.

Behaves as RESTORE's ``model_vqa_ocrbench infer``: the question, a newline and the short-answer
instruction (RESTORE's choice; ``--bare-question`` feeds the question alone, as the OCRBench authors
do); images converted to RGB; ``max_new_tokens`` 128; greedy. An answer line is the question's six
fields plus ``predict``.

    python -m restore.eval.ocrbench --question-file playground/data/eval/ocrbench/OCRBench.json \\
        --image-folder playground/data/eval/ocrbench/data --answers-file answers.jsonl --base HoloV --n_vis 64
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Mapping

from .entry_point import (SHORT_ANSWER_SUFFIX, EntryPoint, ImageRef, Item, read_question_list, require_fields,
                          require_questions, require_unique)
from .runner import run

FIELDS = ("dataset_name", "id", "image_path", "question", "answers", "type")


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--bare-question", action="store_true",
                       help="do not append the short-answer instruction (OCRBench's own protocol; RESTORE appends it)")


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    return {"bare_question": args.bare_question}


def _key(line: Mapping[str, Any]) -> str:
    return json.dumps([line["id"], line["image_path"], line["question"]], ensure_ascii=False)


def build_items(settings: Mapping[str, Any]) -> List[Item]:
    path, folder = settings["question_file"], settings["image_folder"]
    questions = read_question_list(path, "OCRBench.json")
    require_questions(questions, path)
    items = []
    for number, q in enumerate(questions, 1):
        require_fields(q, FIELDS, f"{path}, question {number}")
        text = q["question"] if settings["bare_question"] else q["question"] + "\n" + SHORT_ANSWER_SUFFIX
        items.append(Item(key=_key(q), text=text,
                          image=ImageRef(label=q["image_path"], path=os.path.join(folder, q["image_path"])),
                          fields={name: q[name] for name in FIELDS}))
    require_unique(items, path, lambda item: f"id {item.fields['id']!r} ({item.fields['image_path']}) with the "
                                             "same question")
    return items


def answer_line(item: Item, text: str, model_id: str) -> Dict[str, Any]:
    return {**{name: item.fields[name] for name in FIELDS}, "predict": text}


ENTRY = EntryPoint(
    name="ocrbench",
    description="Answer OCRBench (OCRBench.json) with LLaVA-1.5, optionally with visual token reduction "
                "(--base/--n_vis) and RESTORE (--restore).",
    max_new_tokens=128,
    needs_image_folder=True,
    add_arguments=_add_arguments,
    settings=_settings,
    build_items=build_items,
    answer_line=answer_line,
    answer_key=_key,
    ensure_ascii=False,
)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["infer"]:  # the official entry point's subcommand; scoring is restore.eval.scoring
        argv = argv[1:]
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
