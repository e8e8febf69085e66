"""TextVQA val: VQA soft accuracy, as LLaVA's `eval_textvqa.py` with the m4c TextVQAAccuracyEvaluator.

An answer line is tied to its annotation by (image id = answer's question_id, question recovered
from the prompt, lower-cased). The question is the prompt's first line for LLaVA's three-line
prompt (question / "Reference OCR token: ..." / suffix) and two-line prompt, the second line when
the prompt starts with the OCR line, and the text between "Question: " and " Short answer:" for
the "OCR tokens: " prompt. Prediction and the 10 human answers are normalized with the EvalAI
processor (`vqa_normalize`); a prediction scores the leave-one-out soft score of the human answer
it equals, 0 otherwise. Accuracy = mean x 100 (main metric "accuracy").

Differences from the official scorer: eval_textvqa.py scores the answer lines it finds and
crashes on a line whose (image, question) is unknown; an unanswered question is simply not in
its mean. Here every annotation question is expected; an unanswered one scores 0 (it stays in
the denominator) and is listed in missing_ids as "image :: question (question_id N)"; unknown lines are
reported as unexpected. Two questions with the same image and text are answered in order and
both scored against the annotation entry the official dict keeps (the last one). On complete
inputs the numbers are identical.

Data checks (also by check_data, before inference): LLaVA's question file
`llava_textvqa_val_v051_ocr.jsonl` asks exactly the annotation's questions (same image id and
question, as often), so the accuracy is over the questions that were asked; otherwise a DataError
names the first line that differs.

Fixture (`write_fixture`, few items in the official formats): TextVQA: TextVQA_0.5.1_val.json
(official), llava_textvqa_val_v051_ocr.jsonl, train_images/.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

from ...jsonio import read_json, read_jsonl, write_json, write_jsonl
from ..fixtures import SHORT_ANSWER, WORDS, Info, draw_scene, random_scene, reference_line, save_image
from ..scoring.common import (AnswerFile, BenchResult, DataError, Matched, load_json, load_jsonl, make_result,
                              percent, require_fields, require_file)
from ..scoring.vqa_normalize import normalize_answer, soft_scores
from . import Benchmark

NAME = "textvqa"
ANNOTATION = "TextVQA_0.5.1_val.json"
QUESTION_FILE = "llava_textvqa_val_v051_ocr.jsonl"
_OCR_TOKENS_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)


def prompt_question(prompt: str) -> str:
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        match = _OCR_TOKENS_QUESTION.search(prompt)
        if match:
            return match.group(1).lower()
    if "Reference OCR token: " in prompt and len(lines) == 3 and prompt.startswith("Reference OCR token:"):
        return lines[1].lower()
    return lines[0].lower()


def load_entries(data_root: Path) -> list[dict]:
    """The annotation's entries, checked against the question file (module docstring)."""
    path = require_file(data_root / "textvqa" / ANNOTATION, "official TextVQA val annotation")
    question_file = require_file(data_root / "textvqa" / QUESTION_FILE, "LLaVA's TextVQA question file (eval.zip)")
    annotation = load_json(path)
    if not isinstance(annotation, dict):
        raise DataError(f"{path} is not the TextVQA annotation (a JSON object with 'data')")
    entries = [require_fields(e, ("image_id", "question", "question_id", "answers"), f"{path}, entry {i + 1}")
               for i, e in enumerate(require_fields(annotation, ("data",), str(path))["data"])]
    unasked = Counter((str(e["image_id"]), e["question"].lower()) for e in entries)
    for number, line in enumerate(load_jsonl(question_file), start=1):
        require_fields(line, ("question_id", "text"), f"{question_file} line {number}")
        key = (str(line["question_id"]), prompt_question(line["text"]))
        if not unasked[key]:
            raise DataError(f"{question_file} line {number}: image {key[0]}, question {key[1]!r} is not "
                            f"{'in' if key not in unasked else 'that often in'} {path}: question file and annotation "
                            "do not match")
        unasked[key] -= 1
    left = [key for key, n in unasked.items() if n]
    if left:
        raise DataError(f"{sum(unasked.values())} questions of {path} are not in {question_file}, e.g. image "
                        f"{left[0][0]}: {left[0][1]!r}: question file and annotation do not match")
    return entries


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist and agree (see the module docstring); raises DataError."""
    load_entries(data_root)


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    entries = load_entries(data_root)
    waiting: dict[tuple[str, str], list[str]] = {}  # key -> question ids not answered yet, in order
    truth: dict[tuple[str, str], list[str]] = {}
    for entry in entries:
        key = (str(entry["image_id"]), entry["question"].lower())
        waiting.setdefault(key, []).append(str(entry["question_id"]))
        truth[key] = entry["answers"]  # the last entry wins, as in the official dict

    score_cache: dict[tuple[str, str], dict[str, float]] = {}
    scores: dict[str, float] = {}
    by_key: dict[str, dict] = {}
    unexpected, duplicates = [], []
    for record in answers.records:
        try:
            key = (str(record["question_id"]), prompt_question(record["prompt"]))
        except (KeyError, AttributeError):
            unexpected.append(str(record.get("question_id")))
            continue
        if key not in waiting:
            unexpected.append(f"{key[0]}: {key[1]}")
            continue
        if not waiting[key]:
            duplicates.append(f"{key[0]}: {key[1]}")
            continue
        qid = waiting[key].pop(0)
        if key not in score_cache:
            score_cache[key] = soft_scores(truth[key])
        scores[qid] = score_cache[key].get(normalize_answer(record.get("text", "")), 0.0)
        by_key[qid] = record

    all_ids = [str(e["question_id"]) for e in entries]
    # Answer files name an item by image id and question, so missing items are shown that way.
    missing = [f"{e['image_id']} :: {e['question']} (question_id {e['question_id']})"
               for e in entries if str(e["question_id"]) not in scores]
    matched = Matched(by_key, duplicates, unexpected, missing)
    metrics = {"accuracy": percent(sum(scores.values()), len(all_ids))}
    return make_result(NAME, answers, matched, metrics, "accuracy", len(all_ids))


# ----------------------------------------------------------------------------------------------
# TextVQA: TextVQA_0.5.1_val.json (official), llava_textvqa_val_v051_ocr.jsonl, train_images/


def _human_answers(word: str, rng: random.Random) -> list[str]:
    """Ten answers as annotators write them: case, punctuation, articles and a few outliers."""
    variants = [word, word.upper(), f"{word}.", f"the {word}", word.capitalize()]
    answers = [rng.choice(variants) for _ in range(rng.randint(6, 9))]
    answers += [rng.choice(WORDS) for _ in range(10 - len(answers))]
    rng.shuffle(answers)
    return answers


def write_fixture(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "textvqa"
    data, lines, first = [], [], None
    qids = rng.sample(range(34_602, 39_602), n)
    for i in range(n):
        if i % 3 != 1:  # every third question shares the previous image
            scene = random_scene(rng)
            image_id = "".join(rng.choice("0123456789abcdef") for _ in range(16))
            width, height = scene["size"]
            path = save_image(draw_scene(scene, rng, with_word=True), folder / "train_images" / f"{image_id}.jpg")
            first = first or {"first_image": path, "first_ids": []}
            question = "what word is written on the sign?"
        else:
            question = "what is the word at the top left?"
        data.append({"question": question, "image_id": image_id, "image_classes": ["Sign"],
                     "flickr_original_url": f"https://example.invalid/{image_id}.jpg",
                     "flickr_300k_url": f"https://example.invalid/{image_id}_z.jpg", "image_width": width,
                     "image_height": height, "answers": _human_answers(scene["word"], rng),
                     "question_tokens": question.rstrip("?").split(), "question_id": qids[i], "set_name": "val"})
        ocr = ", ".join([scene["word"], rng.choice(WORDS)])
        lines.append({"question_id": image_id, "image": f"{image_id}.jpg",
                      "text": f"{question}\nReference OCR token: {ocr}\n{SHORT_ANSWER}", "category": "default"})
        if Path(first["first_image"]).stem == image_id:
            first["first_ids"].append(image_id)
    write_json(folder / "TextVQA_0.5.1_val.json",
               {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    write_jsonl(folder / "llava_textvqa_val_v051_ocr.jsonl", lines)
    return first


def reference_answers(data_root: Path, model_id: str = "reference") -> list[dict]:
    data = read_json(data_root / "textvqa" / ANNOTATION)["data"]
    truth = {(d["image_id"], d["question"].lower()): d["answers"] for d in data}
    lines = []
    for q in read_jsonl(data_root / "textvqa" / QUESTION_FILE):
        answers = truth[(q["question_id"], q["text"].split("\n")[0].lower())]
        # The most frequent answer, ties to the first written (a set's order changes with the hash seed).
        best = Counter(answers).most_common(1)[0][0]
        lines.append(reference_line(q["question_id"], q["text"], best, model_id))
    return lines


BENCHMARK = Benchmark(
    name="textvqa",
    title="TextVQA val, with LLaVA's OCR-token prompt.",
    entry="vqa_loader",
    question_file="textvqa/llava_textvqa_val_v051_ocr.jsonl",
    image_folder="textvqa/train_images",
    entry_args=(),
    evaluate=evaluate,
    check_data=check_data,
    data_files=("textvqa/" + QUESTION_FILE, "textvqa/" + ANNOTATION),
    write_fixture=write_fixture,
    reference_answers=reference_answers,
)
