"""What an evaluation entry point provides, and the helpers it builds its items with.

An entry point (``vqa_loader``, ``mmbench``, ``science``, ``ocrbench``) only says how its question file
becomes a list of :class:`Item` and how an answer line looks; :mod:`restore.eval.runner` does the rest.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from .. import jsonio

SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."
OPTION_LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
MAX_VISUAL_TOKENS = 576  # 24 x 24 patches of CLIP ViT-L/14 at 336 px, LLaVA-1.5's vision tower
ENTRY_MODULES = ("vqa_loader", "mmbench", "science", "ocrbench")


class SetupError(Exception):
    """A problem with the arguments or the data, found before the model is loaded."""


@dataclass(frozen=True)
class ImageRef:
    """Where an item's image comes from. ``label`` names it in error messages."""

    label: str
    path: Optional[str] = None
    base64: Optional[str] = None
    # The official vqa_loader/ocrbench convert to RGB before padding; model_vqa_mmbench and
    # model_vqa_science pad the image in the mode it was stored in. Kept as they do it.
    convert_rgb: bool = True

    def open(self):
        """Open and fully decode the image (a truncated file fails here, not in the middle of a run)."""
        from PIL import Image

        if self.base64 is not None:
            import base64
            import io

            image = Image.open(io.BytesIO(base64.b64decode(self.base64)))
        else:
            image = Image.open(self.path)
        image.load()
        return image.convert("RGB") if self.convert_rgb else image


@dataclass(frozen=True)
class Item:
    """One generation: the user's text (after the image placeholder) and its image, if any."""

    key: str  # identifies the item in its answers file; see restore.eval.answer_files.answer_keys()
    text: str
    image: Optional[ImageRef]
    fields: Mapping[str, Any] = field(default_factory=dict)  # what the answer line copies from the question


@dataclass(frozen=True)
class EntryPoint:
    name: str
    description: str
    max_new_tokens: int
    needs_image_folder: bool
    add_arguments: Callable[[argparse.ArgumentParser], None]
    settings: Callable[[argparse.Namespace], Dict[str, Any]]  # bench-specific settings that change answers
    build_items: Callable[[Mapping[str, Any]], List[Item]]  # from the full settings dict; pure
    answer_line: Callable[[Item, str, str], Dict[str, Any]]  # (item, generated text, model_id)
    answer_key: Callable[[Mapping[str, Any]], str]  # base key of a written answer line
    ensure_ascii: bool = True
    single_pred_prompt: bool = False  # whether --single-pred-prompt exists


def entry_by_name(name: str) -> EntryPoint:
    import importlib

    if name not in ENTRY_MODULES:
        raise SetupError(f"unknown entry point {name!r}; known: {', '.join(ENTRY_MODULES)}")
    return importlib.import_module(f"restore.eval.{name}").ENTRY


# --------------------------------------------------------------------------------------------------
# Reading question files


def read_jsonl(path: str) -> List[Dict[str, Any]]:
    try:
        return jsonio.read_jsonl(path)
    except jsonio.InvalidJson as e:
        raise SetupError(f"{path}, line {e.line}: not valid JSON ({e.error.msg})") from None


def read_json(path: str) -> Any:
    try:
        return jsonio.read_json(path)
    except jsonio.InvalidJson as e:
        raise SetupError(f"{path}: not valid JSON ({e.error})") from None


def read_question_list(path: str, expected_file: str) -> List[Any]:
    """A question file that is one JSON list; ``expected_file`` names the official file in the error."""
    questions = read_json(path)
    if not isinstance(questions, list):
        raise SetupError(f"{path}: expected a JSON list of questions ({expected_file})")
    return questions


def require_fields(row: Mapping[str, Any], names: Iterable[str], where: str) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise SetupError(f"{where} lacks the field(s) {', '.join(missing)}; is this the right question file?")


def require_questions(questions: Sequence[Any], path: str) -> None:
    """A question file without questions is a mistake (an interrupted download, the wrong file), not a run
    that scores nothing."""
    if not questions:
        raise SetupError(f"{path} holds no questions; is it the right question file, and complete?")


def require_unique(items: Sequence[Item], path: str, describe: Callable[[Item], str]) -> None:
    """Each question once: a repeat would be answered twice and counted twice. ``describe`` names an item
    as the question file identifies it (e.g. "question_id 7")."""
    counts = Counter(item.key for item in items)
    repeated = list(dict.fromkeys(describe(item) for item in items if counts[item.key] > 1))
    if repeated:
        shown = "; ".join(repeated[:5]) + (f"; ... and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        raise SetupError(f"{path}: {len(repeated)} question(s) appear more than once ({shown}); each question "
                         "must be asked once: remove the repeats from the question file")


def model_vqa_answer_line(item: Item, text: str, model_id: str) -> Dict[str, Any]:
    """The answer line of LLaVA's model_vqa scripts, from an item whose fields hold question_id and prompt."""
    import shortuuid

    return {"question_id": item.fields["question_id"], "prompt": item.fields["prompt"], "text": text,
            "answer_id": shortuuid.uuid(), "model_id": model_id, "metadata": {}}
