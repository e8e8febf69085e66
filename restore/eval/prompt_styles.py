"""The text a model is asked, by prompt style: LLaVA's evaluation prompts, or lmms-eval's.

``llava`` is the text of LLaVA's question files and scripts, which the paper's LLaVA tables use. ``lmms_eval``
is the text lmms-eval's tasks give a model without prompts of its own (their ``default`` prompt kwargs), the
protocol behind the paper's Qwen2.5-VL numbers (its unreduced MME, 2323, is lmms-eval's qwen2_5_vl score):

- POPE, MME, GQA, VQAv2: the same text as LLaVA's (the question, a newline, "Answer the question using a
  single word or phrase."; MME's "Please answer yes or no." replaced by that instruction);
- TextVQA: no OCR tokens, and the question through ``str.capitalize`` (lmms-eval's ``textvqa_val``);
- MMBench: hint, question and "There are several options:" joined by spaces, the options, a blank line,
  the option-letter instruction (``mmbench_en_dev``);
- ScienceQA: the same text (LLaVA's released llava_test_CQM-A.json already has lmms-eval's layout:
  "Context: {hint}" only when there is a hint, the question, one "A. ..." line per choice).

Only the model's input changes: an answer line's ``prompt`` stays the question file's, which the scorers
read. The family's chat template wraps the text (docs/qwen2_5_vl.md gives each benchmark's whole prompt).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from .entry_point import SHORT_ANSWER_SUFFIX

PROMPT_STYLES = ("llava", "lmms_eval")
DEFAULT_STYLE = "llava"
OCR_LINE = "Reference OCR token:"


def style_of(settings: Mapping[str, Any]) -> str:
    """The prompt style an answers file's settings record (absent: LLaVA's, as every earlier record)."""
    return settings.get("prompt_style") or DEFAULT_STYLE


def vqa_text(text: str, style: str) -> str:
    """A question line's text (LLaVA's question files) in ``style``."""
    if style == DEFAULT_STYLE:
        return text
    lines = text.split("\n")
    if len(lines) == 3 and lines[1].startswith(OCR_LINE) and lines[2] == SHORT_ANSWER_SUFFIX:
        return f"{lines[0].capitalize()}\n{SHORT_ANSWER_SUFFIX}"  # TextVQA: no OCR tokens
    return text


def mmbench_text(question: str, hint: Any, options: Sequence[str], letters: Sequence[str], suffix: str,
                 has_hint: bool) -> str:
    """lmms-eval's MMBench prompt of one row (options in the order shown)."""
    listed = "There are several options:\n" + "\n".join(f"{k}. {v}" for k, v in zip(letters, options))
    text = f"{hint} {question} {listed}" if has_hint else f"{question} {listed}"
    return f"{text}\n\n{suffix}"
