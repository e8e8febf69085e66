"""Few-item versions of the nine benchmarks in their official file formats and LLaVA's folder layout.

    python -m restore.eval.fixtures --out DATA_ROOT [--n 6] [--seed 0] [--benchmarks gqa pope ...]
                                    [--corrupt BENCH] [--answers-out DIR]

writes DATA_ROOT/gqa/, vqav2/, seed_bench/, mmbench/, MME/, pope/, scienceqa/, textvqa/, ocrbench/
with question files, annotation files and synthetic images (shapes and words drawn with PIL, sizes
and aspect ratios varied because LLaVA pads to square), plus `fixture_manifest.json`. Everything is
a function of (n, seed). Questions are consistent with the drawings (colors, shapes, counts, words),
so the answers are not arbitrary. `--corrupt BENCH` overwrites one image of BENCH with bytes that
are not an image (for MMBench: one row's base64 image); the manifest names the file and the
question ids that use it. `--answers-out DIR` also writes DIR/<bench>.jsonl with correct answers in
the entry points' answer formats (`reference_answers`), which every scorer rates 100%.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import random
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

from .entry_point import OPTION_LETTER_SUFFIX, SHORT_ANSWER_SUFFIX

BENCHMARKS = ("gqa", "vqav2", "seed", "mmbench", "mme", "pope", "sqa", "textvqa", "ocrbench")
FOLDERS = {"gqa": "gqa", "vqav2": "vqav2", "seed": "seed_bench", "mmbench": "mmbench", "mme": "MME",
           "pope": "pope", "sqa": "scienceqa", "textvqa": "textvqa", "ocrbench": "ocrbench"}
SHORT_ANSWER, LETTER_ANSWER = SHORT_ANSWER_SUFFIX, OPTION_LETTER_SUFFIX
CORRUPT_BYTES = b"this is not an image file\n"

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 30),
          "purple": (140, 60, 170), "orange": (240, 140, 20), "black": (20, 20, 20), "white": (250, 250, 250)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("stop", "coffee", "exit", "park", "hotel", "bus", "pizza", "open", "sale", "taxi", "bank", "library")
# (width, height): landscape, portrait, square, very wide and very tall images.
SIZES = ((320, 240), (240, 320), (256, 256), (480, 160), (150, 420), (400, 300), (200, 120), (96, 288), (512, 384))


# ----------------------------------------------------------------------------------------------
# Synthetic scenes and images


def random_scene(rng: random.Random) -> dict:
    """What an image shows: `count` shapes of one kind and color, and maybe a word."""
    return {"shape": rng.choice(SHAPES), "color": rng.choice([c for c in COLORS if c != "white"]),
            "count": rng.randint(1, 4), "word": rng.choice(WORDS), "size": rng.choice(SIZES)}


def draw_scene(scene: dict, rng: random.Random, with_word: bool = False) -> Image.Image:
    width, height = scene["size"]
    background = tuple(rng.randint(200, 245) for _ in range(3))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    radius = max(6, min(width, height) // 8)
    fill = COLORS[scene["color"]]
    for _ in range(scene["count"]):
        x = rng.randint(radius, width - radius)
        y = rng.randint(radius, height - radius)
        box = (x - radius, y - radius, x + radius, y + radius)
        if scene["shape"] == "circle":
            draw.ellipse(box, fill=fill, outline=(0, 0, 0))
        elif scene["shape"] == "square":
            draw.rectangle(box, fill=fill, outline=(0, 0, 0))
        else:
            draw.polygon([(x, y - radius), (x - radius, y + radius), (x + radius, y + radius)], fill=fill, outline=(0, 0, 0))
    if with_word:
        draw.rectangle((4, 4, 8 + 7 * len(scene["word"]), 20), fill=(255, 255, 255))
        draw.text((6, 6), scene["word"].upper(), fill=(0, 0, 0))
    return image


def save_image(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")
    return path


def image_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plural(shape: str) -> str:
    return shape + "s"


def other_colors(rng: random.Random, color: str, k: int) -> list[str]:
    return rng.sample([c for c in COLORS if c != color], k)


def write_json(path: Path, obj, indent: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def options_text(options: list[str]) -> str:
    return "\n".join(f"{'ABCDE'[i]}. {o}" for i, o in enumerate(options))


# Every writer returns {"first_image": path of an image file, "first_ids": question ids using it}.
Info = dict


# ----------------------------------------------------------------------------------------------
# GQA: data/testdev_balanced_questions.json (official), llava_gqa_testdev_balanced.jsonl, data/images/


def write_gqa(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "gqa"
    questions, lines = {}, []
    qids = rng.sample(range(20_000_000, 21_000_000), n)
    first = None
    for i in range(n):
        if i % 2 == 0:  # two questions per image
            scene = random_scene(rng)
            image_id = f"n{rng.randint(100000, 999999)}"
            path = save_image(draw_scene(scene, rng), folder / "data" / "images" / f"{image_id}.jpg")
            first = first or {"first_image": path, "first_ids": []}
        shape, color = scene["shape"], scene["color"]
        kind = ("query", "verify", "logical", "choose", "compare")[i % 5]
        if kind == "query":
            q, a, full, semantic = f"What color is the {shape}?", color, f"The {shape} is {color}.", "attr"
        elif kind == "verify":
            q, a, full, semantic = f"Is there a {shape} in the picture?", "yes", f"Yes, there is a {shape}.", "obj"
        elif kind == "logical":
            absent = rng.choice([s for s in SHAPES if s != shape])
            q, a, full, semantic = (f"Are there both a {shape} and a {absent} in the picture?", "no",
                                    f"No, there is a {shape} but no {absent}.", "obj")
        elif kind == "choose":
            wrong = other_colors(rng, color, 1)[0]
            pair = [color, wrong] if rng.random() < 0.5 else [wrong, color]
            q, a, full, semantic = f"Is the {shape} {pair[0]} or {pair[1]}?", color, f"The {shape} is {color}.", "attr"
        else:
            q, a, full, semantic = (f"Do all the {plural(shape)} have the same color?", "yes",
                                    f"Yes, all the {plural(shape)} are {color}.", "attr")
        qid = str(qids[i])
        questions[qid] = {
            "semantic": [{"operation": "select", "dependencies": [], "argument": f"{shape} (0)"}],
            "entailed": [], "equivalent": [qid], "question": q, "imageId": image_id, "isBalanced": True,
            "groups": {"global": None, "local": f"{kind}-{shape}"}, "answer": a,
            "semanticStr": f"select: {shape} (0)", "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
            "types": {"detailed": f"{kind}Attr", "semantic": semantic, "structural": kind}, "fullAnswer": full,
        }
        lines.append({"question_id": qid, "image": f"{image_id}.jpg", "text": f"{q}\n{SHORT_ANSWER}", "category": "default"})
        if i < 2:
            first["first_ids"].append(qid)
    write_json(folder / "data" / "testdev_balanced_questions.json", questions)
    write_jsonl(folder / "llava_gqa_testdev_balanced.jsonl", lines)
    return first


# ----------------------------------------------------------------------------------------------
# VQAv2: llava_vqav2_mscoco_test-dev2015.jsonl, llava_vqav2_mscoco_test2015.jsonl, test2015/


def write_vqav2(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "vqav2"
    image_ids = rng.sample(range(1, 581_000), n + max(1, n // 2))
    dev, full, first = [], [], None
    for i, image_id in enumerate(image_ids):
        scene = random_scene(rng)
        name = f"COCO_test2015_{image_id:012d}.jpg"
        path = save_image(draw_scene(scene, rng), folder / "test2015" / name)
        q = rng.choice([f"What color are the {plural(scene['shape'])}?", f"How many {plural(scene['shape'])} are there?",
                        f"Is there a {scene['shape']}?"])
        line = {"question_id": image_id * 1000 + rng.randint(0, 2), "image": name, "text": f"{q}\n{SHORT_ANSWER}",
                "category": "default"}
        full.append(line)
        if i < n:  # the first n images form test-dev; the rest are test2015 only
            dev.append(line)
            first = first or {"first_image": path, "first_ids": [line["question_id"]]}
    full.sort(key=lambda x: x["question_id"])
    write_jsonl(folder / "llava_vqav2_mscoco_test-dev2015.jsonl", dev)
    write_jsonl(folder / "llava_vqav2_mscoco_test2015.jsonl", full)
    return first


# ----------------------------------------------------------------------------------------------
# SEED-Bench: SEED-Bench.json (official), llava-seed-bench.jsonl, SEED-Bench-image/, SEED-Bench-video-image/

SEED_DIMENSIONS = ("Scene Understanding", "Instance Identity", "Instance Attributes", "Instance Location",
                   "Instances Counting", "Spatial Relation", "Instance Interaction", "Visual Reasoning",
                   "Text Understanding", "Action Recognition", "Action Prediction", "Procedure Understanding")


def _seed_question(scene: dict, rng: random.Random) -> tuple[str, list[str], int, int]:
    """(question, four choices, index of the right one, question_type_id) for an image question."""
    if rng.random() < 0.5:
        right = str(scene["count"])
        wrong = [str(c) for c in rng.sample([c for c in range(1, 8) if c != scene["count"]], 3)]
        question, type_id = f"How many {plural(scene['shape'])} are in the image?", 5
    else:
        right, wrong = scene["color"], other_colors(rng, scene["color"], 3)
        question, type_id = f"What is the color of the {plural(scene['shape'])}?", 3
    choices = wrong[:]
    answer = rng.randrange(4)
    choices.insert(answer, right)
    return question, choices, answer, type_id


def write_seed(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "seed_bench"
    entries, lines, first = [], [], None
    image_qids = rng.sample(range(100_000, 110_000), n)
    n_video = max(2, n // 3)
    for i in range(n + n_video):
        scene = random_scene(rng)
        video = i >= n
        question, choices, answer, type_id = _seed_question(scene, rng)
        if video:
            qid = f"v{rng.randint(1000, 9999)}{i}"
            type_id = 10 + i % 3
            question = f"What happens to the {plural(scene['shape'])} in the video?"
            data_id = f"{rng.randint(10000, 99999)}.mp4"
            image_rel = f"SEED-Bench-video-image/{type_id}_{qid}.png"
        else:
            qid = str(image_qids[i])
            data_id = f"{rng.randint(1_000_000, 9_999_999)}_{rng.randint(1_000_000_000, 9_999_999_999)}.jpg"
            image_rel = f"SEED-Bench-image/{data_id}"
        path = save_image(draw_scene(scene, rng), folder / image_rel)
        entry = {"answer": "ABCD"[answer], "choice_a": choices[0], "choice_b": choices[1], "choice_c": choices[2],
                 "choice_d": choices[3], "data_id": data_id, "data_type": "video" if video else "image",
                 "question": question, "question_id": qid, "question_type_id": type_id}
        entries.append(entry)
        lines.append({"image": image_rel, "text": f"{question}\n{options_text(choices)}\n{LETTER_ANSWER}",
                      "category": SEED_DIMENSIONS[type_id - 1], "question_id": qid if video else int(qid)})
        first = first or {"first_image": path, "first_ids": [lines[-1]["question_id"]]}
    annotation = {"question_type": {name: i + 1 for i, name in enumerate(SEED_DIMENSIONS)}, "questions": entries}
    write_json(folder / "SEED-Bench.json", annotation)
    write_jsonl(folder / "llava-seed-bench.jsonl", lines)
    (folder / "answers_upload").mkdir(parents=True, exist_ok=True)
    return first


# ----------------------------------------------------------------------------------------------
# MMBench: mmbench_dev_20230712.tsv with base64 images and circular copies

MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")
MMBENCH_CATEGORIES = (("attribute_recognition", "Fine-grained Single-instance Perception"),
                      ("image_scene", "Coarse Perception"), ("object_localization", "Fine-grained Single-instance Perception"),
                      ("spatial_relationship", "Relation Reasoning"), ("physical_property_reasoning", "Attribute Reasoning"))


def _tsv_cell(value) -> str:
    return "" if value is None else str(value)


def write_mmbench(root: Path, n: int, rng: random.Random) -> Info:
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


# ----------------------------------------------------------------------------------------------
# MME: MME_Benchmark_release_version/<category>/..., llava_mme.jsonl

MME_CATEGORIES = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                  "artwork", "OCR", "commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_NESTED = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/
MME_SUFFIX = "Please answer yes or no."


def write_mme(root: Path, n: int, rng: random.Random) -> Info:
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


# ----------------------------------------------------------------------------------------------
# POPE: coco/coco_pope_{adversarial,popular,random}.json, llava_pope_test.jsonl, val2014/

POPE_SPLITS = ("adversarial", "popular", "random")
POPE_OBJECTS = ("person", "dog", "car", "chair", "bottle", "cup", "bicycle", "umbrella")


def write_pope(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "pope"
    image_ids = rng.sample(range(1, 581_000), max(2, math.ceil(n / 2)))
    images = []
    for image_id in image_ids:
        name = f"COCO_val2014_{image_id:012d}.jpg"
        images.append((name, save_image(draw_scene(random_scene(rng), rng), folder / "val2014" / name)))
    lines, first, global_id = [], None, 0
    for split in POPE_SPLITS:
        labels = []
        for k in range(n):
            name, path = images[k % len(images)]
            text = f"Is there a {rng.choice(POPE_OBJECTS)} in the image?"
            label = "yes" if (k + rng.randint(0, 1)) % 2 else "no"
            labels.append({"question_id": k + 1, "image": name, "text": text, "label": label})
            global_id += 1
            lines.append({"question_id": global_id, "image": name, "text": f"{text}\n{SHORT_ANSWER}", "category": split})
            if k % len(images) == 0 and first is None:
                first = {"first_image": path, "first_ids": []}
            if path == first["first_image"]:
                first["first_ids"].append(global_id)
        write_jsonl(folder / "coco" / f"coco_pope_{split}.json", labels)
    write_jsonl(folder / "llava_pope_test.jsonl", lines)
    return first


# ----------------------------------------------------------------------------------------------
# ScienceQA: problems.json, pid_splits.json, llava_test_CQM-A.json, images/test/<pid>/image.png


def write_sqa(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "scienceqa"
    pids = [str(p) for p in rng.sample(range(1, 21_000), n + 1)]
    problems, llava_items, first = {}, [], None
    for i, pid in enumerate(pids):
        split = "train" if i == n else "test"  # one training problem, which scoring must ignore
        with_image = i % 3 != 2
        scene = random_scene(rng)
        k = 2 + i % 4  # 2 to 5 choices
        if with_image:
            question = f"Which color are the {plural(scene['shape'])} in the picture?"
            right, wrong = scene["color"], other_colors(rng, scene["color"], k - 1)
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            question = f"What is {a} times {b}?"
            right = str(a * b)
            wrong = [str(v) for v in rng.sample([v for v in range(4, 82) if v != a * b], k - 1)]
        choices = wrong[:]
        answer = rng.randrange(k)
        choices.insert(answer, right)
        hint = "Look at the picture." if i % 2 == 0 else ""
        problems[pid] = {"question": question, "choices": choices, "answer": answer, "hint": hint,
                         "image": "image.png" if with_image else None, "task": "closed choice", "grade": "grade3",
                         "subject": "natural science", "topic": "fixtures", "category": "Colors" if with_image else "Math",
                         "skill": "Identify colors" if with_image else "Multiply", "lecture": "", "solution": "",
                         "split": split}
        if split != "test":
            continue
        prompt = (f"Context: {hint}\n" if hint else "") + f"{question}\n{options_text(choices)}"
        item = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if with_image else "") + prompt},
                                             {"from": "gpt", "value": "ABCDE"[answer]}]}
        if with_image:
            item["image"] = f"{pid}/image.png"
            path = save_image(draw_scene(scene, rng), folder / "images" / "test" / pid / "image.png")
            first = first or {"first_image": path, "first_ids": [pid]}
        llava_items.append(item)
    test_ids = [pid for pid in pids if problems[pid]["split"] == "test"]
    splits = {"train": [pids[n]], "val": [], "test": test_ids, "minival": [], "minitest": test_ids[:2]}
    write_json(folder / "problems.json", problems)
    write_json(folder / "pid_splits.json", splits)
    write_json(folder / "llava_test_CQM-A.json", llava_items, indent=2)
    return first


# ----------------------------------------------------------------------------------------------
# TextVQA: TextVQA_0.5.1_val.json (official), llava_textvqa_val_v051_ocr.jsonl, train_images/


def _human_answers(word: str, rng: random.Random) -> list[str]:
    """Ten answers as annotators write them: case, punctuation, articles and a few outliers."""
    variants = [word, word.upper(), f"{word}.", f"the {word}", word.capitalize()]
    answers = [rng.choice(variants) for _ in range(rng.randint(6, 9))]
    answers += [rng.choice(WORDS) for _ in range(10 - len(answers))]
    rng.shuffle(answers)
    return answers


def write_textvqa(root: Path, n: int, rng: random.Random) -> Info:
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


# ----------------------------------------------------------------------------------------------
# OCRBench: OCRBench.json (official list), data/<image_path>

OCRBENCH_SOURCES = (  # dataset_name, type, question
    ("IIIT5K", "Regular Text Recognition", "what is written in the image?"),
    ("ct80", "Irregular Text Recognition", "what is written in the image?"),
    ("WordArt", "Artistic Text Recognition", "what is written in the image?"),
    ("IAM", "Handwriting Recognition", "what is written in the image?"),
    ("ORAND", "Digit String Recognition", "what is the number in the image?"),
    ("NonSemanticText", "Non-Semantic Text Recognition", "what are the characters in the image?"),
    ("STVQA", "Scene Text-centric VQA", "What does the sign say?"),
    ("docVQA", "Doc-oriented VQA", "What is the title of the document?"),
    ("FUNSD", "Key Information Extraction", "What is the company name?"),
    ("HME100k", "Handwritten Mathematical Expression Recognition",
     "Please write out the expression of the formula in the image using LaTeX format."),
)


def write_ocrbench(root: Path, n: int, rng: random.Random) -> Info:
    folder = root / "ocrbench"
    items, first = [], None
    # HME100k (scored without spaces, case kept) first, then the other sources in a seeded order.
    order = [OCRBENCH_SOURCES[-1]] + rng.sample(OCRBENCH_SOURCES[:-1], len(OCRBENCH_SOURCES) - 1)
    for i in range(n):
        dataset, kind, question = order[i % len(order)]
        scene = random_scene(rng)
        if dataset == "HME100k":
            answers = f"{rng.randint(2, 9)} x ^ {{ 2 }} + {rng.randint(1, 9)}"
        elif dataset == "ORAND":
            answers = [str(rng.randint(100, 99999))]
        else:
            answers = [scene["word"], scene["word"].upper()] if i % 2 else [scene["word"]]
        scene["word"] = answers if isinstance(answers, str) else answers[0]
        image_path = f"{dataset}/test/{i}_{rng.randint(1, 9)}.png"
        path = save_image(draw_scene(scene, rng, with_word=True), folder / "data" / image_path)
        items.append({"dataset_name": dataset, "id": i, "image_path": image_path, "question": question,
                      "answers": answers, "type": kind})
        first = first or {"first_image": path, "first_ids": [i]}
    write_json(folder / "OCRBench.json", items, indent=1)
    return first


WRITERS: dict[str, Callable[[Path, int, random.Random], Info]] = {
    "gqa": write_gqa, "vqav2": write_vqav2, "seed": write_seed, "mmbench": write_mmbench, "mme": write_mme,
    "pope": write_pope, "sqa": write_sqa, "textvqa": write_textvqa, "ocrbench": write_ocrbench,
}


# ----------------------------------------------------------------------------------------------
# Corruption and the public API


def _corrupt(root: Path, bench: str, info: Info) -> dict:
    if bench == "mmbench":
        path = root / "mmbench" / "mmbench_dev_20230712.tsv"
        header, *rows = path.read_text(encoding="utf-8").split("\n")
        column = header.split("\t").index("image")
        cells = rows[0].split("\t")
        cells[column] = base64.b64encode(CORRUPT_BYTES).decode("ascii")
        rows[0] = "\t".join(cells)
        path.write_text("\n".join([header, *rows]), encoding="utf-8")
        return {"benchmark": bench, "file": str(path), "question_ids": info["first_ids"]}
    Path(info["first_image"]).write_bytes(CORRUPT_BYTES)
    return {"benchmark": bench, "file": str(info["first_image"]), "question_ids": info["first_ids"]}


def make_fixtures(out_dir: str | Path, n: int = 6, seed: int = 0, benchmarks: list[str] | None = None,
                  corrupt: str | None = None) -> dict:
    """Write the fixtures under `out_dir` (a data root) and return the manifest (also written to
    out_dir/fixture_manifest.json): folder per benchmark, n, seed and the corrupted file if any."""
    if n < 1:
        raise ValueError("n must be at least 1")
    chosen = list(benchmarks or BENCHMARKS)
    unknown = [b for b in chosen + ([corrupt] if corrupt else []) if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if corrupt and corrupt not in chosen:
        raise ValueError(f"--corrupt {corrupt} needs {corrupt} among the generated benchmarks")
    root = Path(out_dir)
    manifest = {"n": n, "seed": seed, "benchmarks": {}, "corrupt": None}
    for bench in chosen:
        info = WRITERS[bench](root, n, random.Random(f"{seed}:{bench}"))
        manifest["benchmarks"][bench] = str(root / FOLDERS[bench])
        if bench == corrupt:
            manifest["corrupt"] = _corrupt(root, bench, info)
    write_json(root / "fixture_manifest.json", manifest, indent=2)
    return manifest


# ----------------------------------------------------------------------------------------------
# Correct answers in the entry points' formats (work on real data too: they read official files)


def _answer_line(question_id, prompt: str, text: str, model_id: str, **extra) -> dict:
    return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": f"ref-{question_id}",
            "model_id": model_id, "metadata": {}, **extra}


def _load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# Read here from the official files, not through the scorers' helpers: reference answers that came
# from a scorer's own lookup would score 100% even when that lookup is wrong.


def _mmbench_options(row: dict) -> dict[str, str]:
    """A TSV row's options: columns A.. D up to the first empty cell (pandas reads it as NaN)."""
    options = {}
    for letter in "ABCD":
        value = row.get(letter)
        if not isinstance(value, str) or not value.strip():
            break
        options[letter] = value
    return options


def _mme_answer(release: Path, question_id: str, text: str) -> str:
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


def reference_answers(data_root: str | Path, bench: str, model_id: str = "reference") -> list[dict]:
    """Answer records with the right answer for every item (VQAv2: "yes", its answers are hidden;
    ScienceQA: image problems only, as RESTORE's entry point)."""
    root = Path(data_root)
    if bench == "gqa":
        truth = json.loads((root / "gqa/data/testdev_balanced_questions.json").read_text())
        return [_answer_line(q["question_id"], q["text"], truth[q["question_id"]]["answer"], model_id)
                for q in _load_jsonl(root / "gqa/llava_gqa_testdev_balanced.jsonl")]
    if bench == "vqav2":
        return [_answer_line(q["question_id"], q["text"], "yes", model_id)
                for q in _load_jsonl(root / "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl")]
    if bench == "seed":
        truth = {str(q["question_id"]): q["answer"]
                 for q in json.loads((root / "seed_bench/SEED-Bench.json").read_text())["questions"]}
        return [_answer_line(q["question_id"], q["text"], truth[str(q["question_id"])], model_id)
                for q in _load_jsonl(root / "seed_bench/llava-seed-bench.jsonl")]
    if bench == "mmbench":
        import pandas as pd

        lines = []
        for row in pd.read_csv(root / "mmbench/mmbench_dev_20230712.tsv", sep="\t").to_dict("records"):
            options = _mmbench_options(row)
            hint = row.get("hint")
            prompt = row["question"] if not isinstance(hint, str) or not hint else f"{hint}\n{row['question']}"
            prompt += "".join(f"\n{letter}. {text}" for letter, text in options.items())
            lines.append(_answer_line(int(row["index"]), prompt, str(row["answer"]), model_id, round_id=0,
                                      options=list(options.values()), option_char=list(options)))
        return lines
    if bench == "mme":
        release = root / "MME" / "MME_Benchmark_release_version"
        return [_answer_line(q["question_id"], q["text"], _mme_answer(release, q["question_id"], q["text"]), model_id)
                for q in _load_jsonl(root / "MME/llava_mme.jsonl")]
    if bench == "pope":
        labels = {split: _load_jsonl(root / f"pope/coco/coco_pope_{split}.json") for split in POPE_SPLITS}
        seen = {split: 0 for split in POPE_SPLITS}
        lines = []
        for q in _load_jsonl(root / "pope/llava_pope_test.jsonl"):
            label = labels[q["category"]][seen[q["category"]]]["label"]
            seen[q["category"]] += 1
            lines.append(_answer_line(q["question_id"], q["text"], label.capitalize(), model_id))
        return lines
    if bench == "sqa":
        lines = []
        for item in json.loads((root / "scienceqa/llava_test_CQM-A.json").read_text()):
            if "image" not in item:
                continue
            question = item["conversations"][0]["value"].replace("<image>", "").strip()
            prompt = f"<image>\n{question}\n{LETTER_ANSWER}"
            lines.append(_answer_line(item["id"], prompt, item["conversations"][1]["value"], model_id))
        return lines
    if bench == "textvqa":
        data = json.loads((root / "textvqa/TextVQA_0.5.1_val.json").read_text())["data"]
        truth = {(d["image_id"], d["question"].lower()): d["answers"] for d in data}
        lines = []
        for q in _load_jsonl(root / "textvqa/llava_textvqa_val_v051_ocr.jsonl"):
            answers = truth[(q["question_id"], q["text"].split("\n")[0].lower())]
            best = max(set(answers), key=answers.count)
            lines.append(_answer_line(q["question_id"], q["text"], best, model_id))
        return lines
    if bench == "ocrbench":
        items = json.loads((root / "ocrbench/OCRBench.json").read_text())
        return [{**item, "predict": item["answers"] if isinstance(item["answers"], str) else item["answers"][0]}
                for item in items]
    raise ValueError(f"unknown benchmark {bench!r}")


def write_reference_answers(data_root: str | Path, bench: str, path: str | Path, model_id: str = "reference") -> Path:
    return write_jsonl(Path(path), reference_answers(data_root, bench, model_id))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m restore.eval.fixtures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="data root to write (e.g. a temporary folder)")
    parser.add_argument("--n", type=int, default=6, help="items per benchmark (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--benchmarks", nargs="+", choices=BENCHMARKS, default=None)
    parser.add_argument("--corrupt", choices=BENCHMARKS, default=None, help="write one corrupt image for this benchmark")
    parser.add_argument("--answers-out", default=None, help="also write correct answer files <bench>.jsonl here")
    args = parser.parse_args(argv)
    manifest = make_fixtures(args.out, n=args.n, seed=args.seed, benchmarks=args.benchmarks, corrupt=args.corrupt)
    for bench, folder in manifest["benchmarks"].items():
        print(f"{bench:9s} {folder}")
        if args.answers_out:
            write_reference_answers(args.out, bench, Path(args.answers_out) / f"{bench}.jsonl")
    if manifest["corrupt"]:
        print(f"corrupt  {manifest['corrupt']['file']} (questions {manifest['corrupt']['question_ids']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
