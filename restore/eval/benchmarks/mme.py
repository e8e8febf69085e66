"""MME: perception and cognition scores, as the official `eval_tool/calculation.py` computes them
from the per-category txt files that LLaVA's `convert_answer_to_mme.py` writes.

Ground truth: the release's `questions_answers_YN` txt files (question<TAB>Yes/No). An answer
is found by rebuilding the original question: the LLaVA suffix removed, " Please answer yes or
no." appended, or the same with two spaces (a few release files have that).
Parsing: lower-case; "yes"/"no" kept; otherwise the first four characters decide: contains
"yes" -> yes, else contains "no" -> no, else "other" (wrong). Per subtask: acc = correct
questions / questions, acc+ = images with all questions correct / images, score = 100 (acc +
acc+) (max 200). Perception = sum of the 10 perception subtasks (max 2000), cognition = sum of
the 4 cognition subtasks (max 800); "total" = perception + cognition (max 2800), the main
metric here (the "MME" column of most token-reduction papers, ~1862 for LLaVA-1.5-7B; LLaVA's
own model zoo reports perception, 1510.7).

Differences from the official scorer: calculation.py pairs consecutive lines of a category file,
so one missing or extra answer (or an answer containing a newline or tab) shifts every pair
after it. Here questions are grouped by their image id; a question without a prediction is
wrong (it stays in acc and acc+) and is listed in missing_ids. On complete inputs the numbers are
identical. The txt files in `mme_results/` are written like the converter's (answer-file
order), with tabs/newlines inside predictions replaced by spaces so they stay readable by
calculation.py.

Data checks (also by check_data, before inference): every question of `llava_mme.jsonl` has its
ground truth in the release, every release question is in the question file, and all 14 subtasks
(and no other category) are there; otherwise perception/cognition would be sums over another set.

Fixture (`write_fixture`, few items in the official formats): MME:
MME_Benchmark_release_version/<category>/..., llava_mme.jsonl.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from ...jsonio import read_jsonl, write_jsonl, write_text
from ..fixtures import SHORT_ANSWER, Info, draw_scene, other_colors, plural, random_scene, reference_line, save_image
from ..scoring.common import (SHORT_ANSWER_SUFFIX, AnswerFile, BenchResult, DataError, first_duplicate, load_jsonl,
                              make_result, match_answers, require_dir, require_fields, require_file)
from . import Benchmark

NAME = "mme"
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MAX_SCORE = {"perception": 200 * len(PERCEPTION), "cognition": 200 * len(COGNITION),
             "total": 200 * (len(PERCEPTION) + len(COGNITION))}
RELEASE = "MME_Benchmark_release_version"
YES_NO_SUFFIX = " Please answer yes or no."


def parse_yes_no(text: str) -> str:
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def read_ground_truth(release: Path) -> dict[tuple[str, str, str], str]:
    """(category, txt file name, question) -> "yes"/"no" from the release folder."""
    truth = {}
    # Only the 14 subtask folders: a release copy may also hold eval_tool/ or other notes.
    for category_dir in sorted(p for p in release.iterdir() if p.is_dir() and p.name in PERCEPTION + COGNITION):
        qa_dir = category_dir / "questions_answers_YN" if (category_dir / "images").is_dir() else category_dir
        for txt in sorted(qa_dir.glob("*.txt")):
            for number, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.strip().split("\t")
                if len(fields) != 2 or fields[1].strip().lower() not in ("yes", "no"):
                    raise DataError(f"{txt} line {number} is not 'question<TAB>Yes/No': {line!r} "
                                    "(re-extract the official MME release)")
                truth[(category_dir.name, txt.name, fields[0])] = fields[1].strip().lower()
    return truth


def original_question(prompt: str) -> str:
    return prompt.replace(SHORT_ANSWER_SUFFIX, "").strip() + YES_NO_SUFFIX


def lookup_truth(truth: dict, question_id: str, prompt: str) -> tuple[str, str, str]:
    category = question_id.split("/")[0]
    txt_name = Path(question_id).stem + ".txt"
    question = original_question(prompt)
    for candidate in (question, question.replace(YES_NO_SUFFIX, " " + YES_NO_SUFFIX)):
        if (category, txt_name, candidate) in truth:
            return category, txt_name, candidate
    raise DataError(f"MME question {question_id!r} {question!r} has no ground truth in "
                    f"{category}/{txt_name} of {RELEASE}: question file and release do not match")


def _one_line(text: str) -> str:
    return text.replace("\t", " ").replace("\r", " ").replace("\n", " ")


@dataclass
class MmeData:
    """Expected items (question_id, question text) in question-file order, each item's ground-truth
    key (category, txt name, release question), and the ground truth."""

    expected: list[tuple[str, str]]
    located: dict[tuple[str, str], tuple[str, str, str]]
    truth: dict[tuple[str, str, str], str]


def _check_same_set(located: dict, truth: dict, question_file: Path) -> None:
    categories = {category for category, _, _ in located.values()}
    unofficial = sorted(categories - set(PERCEPTION + COGNITION))
    if unofficial:
        raise DataError(f"{question_file} has categories {unofficial} that are not MME subtasks")
    absent = [c for c in PERCEPTION + COGNITION if c not in categories]
    if absent:
        raise DataError(f"{question_file} has no question of the MME subtask(s) {', '.join(absent)}: perception and "
                        "cognition would be sums over fewer subtasks (use LLaVA's full llava_mme.jsonl)")
    asked = set(located.values())
    unasked = [key for key in truth if key not in asked]
    if unasked:
        category, txt_name, question = unasked[0]
        raise DataError(f"{len(unasked)} questions of {RELEASE} are not in {question_file}, e.g. {category}/{txt_name}: "
                        f"{question!r}: question file and release do not match")


def load_data(data_root: Path) -> MmeData:
    """Read the question file and the release and tie every question to its ground truth; DataError
    on any mismatch (see the module docstring)."""
    folder = data_root / "MME"
    question_file = require_file(folder / "llava_mme.jsonl", "LLaVA's MME question file (eval.zip)")
    release = require_dir(folder / RELEASE, "the official MME release folder")
    questions = load_jsonl(question_file)
    for number, question in enumerate(questions, start=1):
        require_fields(question, ("question_id", "text"), f"{question_file} line {number}")
    expected = [(str(q["question_id"]), q["text"]) for q in questions]
    repeated = first_duplicate(expected)
    if repeated:
        raise DataError(f"{question_file} line {repeated[0] + 1} repeats question {repeated[1]}: answers could not "
                        "be told apart")
    truth = read_ground_truth(release)
    located = {item: lookup_truth(truth, *item) for item in expected}
    _check_same_set(located, truth, question_file)
    return MmeData(expected, located, truth)


def check_data(data_root: Path) -> None:
    """The data files the scorer reads exist and agree (see the module docstring); raises DataError."""
    load_data(data_root)


def evaluate(answers: AnswerFile, data_root: Path, out_dir: Path, model_id: str) -> BenchResult:
    data = load_data(data_root)
    expected, located, truth = data.expected, data.located, data.truth

    def key(record: dict) -> tuple[str, str]:
        return str(record["question_id"]), record["prompt"]

    matched = match_answers(answers.records, key, expected)

    # Per category: question results, and per image whether all its questions are right.
    per_category: dict[str, dict] = {}
    for item in expected:
        category, _, question = located[item]
        record = matched.by_key.get(item)
        hit = record is not None and parse_yes_no(record.get("text", "")) == truth[located[item]]
        stats = per_category.setdefault(category, {"n": 0, "correct": 0, "images": {}})
        stats["n"] += 1
        stats["correct"] += hit
        image = item[0]
        stats["images"][image] = stats["images"].get(image, True) and hit

    metrics: dict[str, float | None] = {}
    scores = {}
    for category, stats in per_category.items():
        acc = stats["correct"] / stats["n"]
        acc_plus = sum(stats["images"].values()) / len(stats["images"])
        scores[category] = 100.0 * (acc + acc_plus)
    metrics["perception"] = sum(scores[c] for c in PERCEPTION)
    metrics["cognition"] = sum(scores[c] for c in COGNITION)
    metrics["total"] = metrics["perception"] + metrics["cognition"]
    for category in PERCEPTION + COGNITION:
        metrics[category] = scores[category]

    # Result txt files in the converter's layout, answer-file order.
    lines: dict[str, list[str]] = {}
    for record in answers.records:
        try:
            item = key(record)
        except (KeyError, TypeError):
            continue
        if item not in located:
            continue
        category, txt_name, question = located[item]
        row = [txt_name, question, truth[located[item]].capitalize(), _one_line(record.get("text", ""))]
        lines.setdefault(category, []).append("\t".join(row))
    files = []
    for category, rows in lines.items():
        files.append(write_text(out_dir / "mme_results" / f"{category}.txt", "".join(r + "\n" for r in rows)))
    # Two questions share an image id: show missing items as "image id :: question".
    matched.missing = [f"{qid} :: {text.splitlines()[0]}" for qid, text in matched.missing]
    matched.unexpected = [f"{u[0]} :: {str(u[1]).splitlines()[0] if u[1] else ''}" if isinstance(u, tuple) else u
                          for u in matched.unexpected]
    return make_result(NAME, answers, matched, metrics, "total", len(expected), files=files)


# ----------------------------------------------------------------------------------------------
# MME: MME_Benchmark_release_version/<category>/..., llava_mme.jsonl

MME_CATEGORIES = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_NESTED = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/
MME_SUFFIX = "Please answer yes or no."


def write_fixture(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "MME"
    release = folder / "MME_Benchmark_release_version"
    lines, first, double_space_done = [], None, False
    per_category = max(1, math.ceil(n / 6))
    for category in MME_CATEGORIES:
        nested = category in MME_NESTED
        for j in range(per_category):
            scene = random_scene(rng)
            suffix = ".jpg" if nested or rng.random() < 0.5 else ".png"
            stem = f"{rng.randint(10000, 99999)}" if category == "artwork" else f"{j + 1:04d}"
            image_dir = release / category / "images" if nested else release / category
            txt_dir = release / category / "questions_answers_YN" if nested else release / category
            path = save_image(draw_scene(scene, rng, with_word=category == "OCR"), image_dir / f"{stem}{suffix}")
            wrong = other_colors(rng, scene["color"], 1)[0]
            pair = [(f"Are the {plural(scene['shape'])} in this image {scene['color']}?", "Yes"),
                    (f"Are the {plural(scene['shape'])} in this image {wrong}?", "No")]
            if rng.random() < 0.5:
                pair.reverse()
            txt_lines = []
            for question, answer in pair:
                # One release line with two spaces before the suffix, as a few official files have.
                gap = "  " if not double_space_done else " "
                double_space_done = True
                txt_lines.append(f"{question}{gap}{MME_SUFFIX}\t{answer}")
                qid = str(path.relative_to(release))
                lines.append({"question_id": qid, "image": qid, "text": f"{question}\n{SHORT_ANSWER}", "category": category})
            txt_dir.mkdir(parents=True, exist_ok=True)
            (txt_dir / f"{stem}.txt").write_text("\n".join(txt_lines) + "\n", encoding="utf-8")
            first = first or {"first_image": path, "first_ids": [lines[0]["question_id"]]}
    write_jsonl(folder / "llava_mme.jsonl", lines)
    (folder / "eval_tool" / "answers").mkdir(parents=True, exist_ok=True)
    return first


def _release_answer(release: Path, question_id: str, text: str) -> str:
    """The release's Yes/No for a llava_mme.jsonl question: its txt file lies next to the image, or in
    questions_answers_YN/ when the images are in images/."""
    category_dir = release / question_id.split("/")[0]
    txt_dir = category_dir / "questions_answers_YN" if (category_dir / "images").is_dir() else category_dir
    question = text.split("\n")[0].strip()
    for line in (txt_dir / (Path(question_id).stem + ".txt")).read_text(encoding="utf-8").splitlines():
        release_question, _, answer = line.partition("\t")
        if release_question.replace(MME_SUFFIX, "").strip() == question:
            return answer.strip()
    raise ValueError(f"no ground truth for MME question {question_id}: {question!r}")


def reference_answers(data_root: Path, model_id: str = "reference") -> list[dict]:
    release = data_root / "MME" / RELEASE
    return [reference_line(q["question_id"], q["text"], _release_answer(release, q["question_id"], q["text"]), model_id)
            for q in read_jsonl(data_root / "MME" / "llava_mme.jsonl")]


BENCHMARK = Benchmark(
    name="mme",
    title="MME (perception and cognition scores).",
    entry="vqa_loader",
    question_file="MME/llava_mme.jsonl",
    image_folder="MME/MME_Benchmark_release_version",
    entry_args=(),
    evaluate=evaluate,
    check_data=check_data,
    data_files=("MME/llava_mme.jsonl", "MME/" + RELEASE),
    write_fixture=write_fixture,
    reference_answers=reference_answers,
)
