"""ScienceQA: multiple choice from LLaVA's ``llava_test_CQM-A.json`` (a JSON list of conversations).

Behaves as RESTORE's ``model_vqa_science``: the ``<image>`` tag is taken out of the human turn and the
image placed before the text; with ``--single-pred-prompt`` the option-letter instruction is appended;
``max_new_tokens`` 1024; greedy by default. Questions without an image are skipped, as RESTORE does
(the paper reports IMG accuracy); ``--answer-text-only`` answers them too, as stock LLaVA does.

    python -m restore.eval.science --question-file playground/data/eval/scienceqa/llava_test_CQM-A.json \\
        --image-folder playground/data/eval/scienceqa/images/test --answers-file answers.jsonl \\
        --single-pred-prompt --base HoloV --n_vis 64 --restore
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Mapping

from .entry_point import (OPTION_LETTER_SUFFIX, EntryPoint, ImageRef, Item, SetupError, model_vqa_answer_line,
                          read_question_list, require_fields, require_questions, require_unique)
from .runner import run


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--answer-text-only", action="store_true",
                       help="also answer the questions that have no image (stock LLaVA does; RESTORE does not)")


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    return {"single_pred_prompt": args.single_pred_prompt, "answer_text_only": args.answer_text_only}


def build_items(settings: Mapping[str, Any]) -> List[Item]:
    path, folder = settings["question_file"], settings["image_folder"]
    problems = read_question_list(path, "llava_test_CQM-A.json")
    require_questions(problems, path)
    items = []
    for number, q in enumerate(problems, 1):
        require_fields(q, ("id", "conversations"), f"{path}, question {number}")
        question = q["conversations"][0]["value"].replace("<image>", "").strip()
        if "image" in q:
            # ScienceQA PNGs are padded in their stored mode, as the official script does (no RGB conversion).
            image = ImageRef(label=q["image"], path=os.path.join(folder, q["image"]), convert_rgb=False)
            prompt = "<image>\n" + question
        elif settings["answer_text_only"]:
            image, prompt = None, question
        else:
            continue
        text = question  # the same in both prompt styles (restore.eval.prompt_styles)
        if settings["single_pred_prompt"]:
            text += "\n" + OPTION_LETTER_SUFFIX
            prompt += "\n" + OPTION_LETTER_SUFFIX
        items.append(Item(key=json.dumps([q["id"]]), text=text, image=image,
                          fields={"question_id": q["id"], "prompt": prompt}))
    if not items:
        raise SetupError(f"none of the {len(problems)} questions of {path} has an image; pass --answer-text-only "
                         "to answer questions without one")
    require_unique(items, path, lambda item: f"id {item.fields['question_id']!r}")
    return items


def answer_key(line: Mapping[str, Any]) -> str:
    return json.dumps([line["question_id"]])


ENTRY = EntryPoint(
    name="science",
    description="Answer ScienceQA (LLaVA's llava_test_CQM-A.json) with LLaVA-1.5, optionally with visual token "
                "reduction (--base/--n_vis) and RESTORE (--restore).",
    max_new_tokens=1024,
    needs_image_folder=True,
    add_arguments=_add_arguments,
    settings=_settings,
    build_items=build_items,
    answer_line=model_vqa_answer_line,
    answer_key=answer_key,
    single_pred_prompt=True,
)


def main(argv=None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
