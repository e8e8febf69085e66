"""Short-answer and multiple-choice VQA from a LLaVA question file (JSON lines).

Used for GQA, VQAv2, SEED-Bench, MME, POPE and TextVQA; behaves as LLaVA's ``model_vqa_loader``
(same prompt, image preprocessing, decoding and answer lines) with greedy decoding by default.

    python -m restore.eval.vqa_loader --question-file playground/data/eval/pope/llava_pope_test.jsonl \\
        --image-folder playground/data/eval/pope/val2014 --answers-file answers.jsonl \\
        --base HoloV --n_vis 64 --restore

Each question line needs ``question_id``, ``image`` (relative to --image-folder) and ``text`` (the
question with its answer-format suffix already in it, as LLaVA's question files have it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Mapping

from .entry_point import (EntryPoint, ImageRef, Item, SetupError, model_vqa_answer_line, read_jsonl, require_fields,
                          require_questions, require_unique)
from . import prompt_styles
from .runner import run


def _add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--only-images-under", metavar="DIR", default=None,
                       help="answer only the questions whose image lies under DIR (relative to --image-folder); "
                            "SEED-Bench without its video frames: --only-images-under SEED-Bench-image")


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    under = args.only_images_under
    return {"only_images_under": under.strip("/") + "/" if under else None}


def _key(question_id: Any, prompt: str) -> str:
    # MME asks two questions per image under one question_id: the prompt tells them apart.
    return json.dumps([question_id, prompt], ensure_ascii=False)


def build_items(settings: Mapping[str, Any]) -> List[Item]:
    path, folder = settings["question_file"], settings["image_folder"]
    under = settings.get("only_images_under")
    style = prompt_styles.style_of(settings)
    questions = read_jsonl(path)
    require_questions(questions, path)
    items = []
    for number, q in enumerate(questions, 1):
        require_fields(q, ("question_id", "image", "text"), f"{path}, question {number}")
        if not isinstance(q["text"], str) or not isinstance(q["image"], str):
            raise SetupError(f"{path}, question {number}: 'text' and 'image' must be strings")
        if under and not q["image"].startswith(under):
            continue
        items.append(Item(
            key=_key(q["question_id"], q["text"]),
            text=prompt_styles.vqa_text(q["text"], style),
            image=ImageRef(label=q["image"], path=os.path.join(folder, q["image"]), convert_rgb=True),
            fields={"question_id": q["question_id"], "prompt": q["text"]},
        ))
    if not items:
        raise SetupError(f"--only-images-under {under}: none of the {len(questions)} questions of {path} has its "
                         "image there (the folder is relative to --image-folder)")
    # MME asks two questions of one image under one question_id: only the same id with the same text repeats.
    require_unique(items, path, lambda item: f"question_id {item.fields['question_id']!r} with the same text")
    return items


def answer_key(line: Mapping[str, Any]) -> str:
    return _key(line["question_id"], line["prompt"])


ENTRY = EntryPoint(
    name="vqa_loader",
    description="Answer a LLaVA question file (JSON lines) with LLaVA-1.5, optionally with visual token "
                "reduction (--base/--n_vis) and RESTORE (--restore).",
    max_new_tokens=128,
    needs_image_folder=True,
    add_arguments=_add_arguments,
    settings=_settings,
    build_items=build_items,
    answer_line=model_vqa_answer_line,
    answer_key=answer_key,
)


def main(argv=None) -> int:
    return run(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())
