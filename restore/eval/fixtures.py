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
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..jsonio import write_json, write_jsonl
from .benchmarks import BENCHMARK_MODULES, benchmark_names, get_benchmark
from .entry_point import OPTION_LETTER_SUFFIX, SHORT_ANSWER_SUFFIX

BENCHMARKS = BENCHMARK_MODULES
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


def options_text(options: list[str]) -> str:
    return "\n".join(f"{'ABCDE'[i]}. {o}" for i, o in enumerate(options))


# Every fixture writer (a benchmark's write_fixture) returns {"first_image": path of an image file,
# "first_ids": question ids using it}.
Info = dict



def reference_line(question_id: Any, prompt: str, text: str, model_id: str, **extra: Any) -> dict:
    """An answer line of LLaVA's model_vqa scripts carrying the right answer."""
    return {"question_id": question_id, "prompt": prompt, "text": text, "answer_id": f"ref-{question_id}",
            "model_id": model_id, "metadata": {}, **extra}


# ----------------------------------------------------------------------------------------------
# The public API: each benchmark's module (restore.eval.benchmarks) writes its own files.


def fixture_benchmarks() -> list[str]:
    """Registered benchmarks that have a fixture writer, in registration order."""
    return [name for name in benchmark_names() if get_benchmark(name).write_fixture is not None]


def _corrupt(root: Path, bench: str, info: Info) -> dict:
    corrupt = get_benchmark(bench).corrupt_fixture
    if corrupt is not None:
        return corrupt(root, info)
    Path(info["first_image"]).write_bytes(CORRUPT_BYTES)
    return {"benchmark": bench, "file": str(info["first_image"]), "question_ids": info["first_ids"]}


def make_fixtures(out_dir: str | Path, n: int = 6, seed: int = 0, benchmarks: list[str] | None = None,
                  corrupt: str | None = None) -> dict:
    """Write the fixtures under `out_dir` (a data root) and return the manifest (also written to
    out_dir/fixture_manifest.json): folder per benchmark, n, seed and the corrupted file if any."""
    if n < 1:
        raise ValueError("n must be at least 1")
    known = fixture_benchmarks()
    chosen = list(benchmarks or BENCHMARKS)
    unknown = [b for b in chosen + ([corrupt] if corrupt else []) if b not in known]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(known)}")
    if corrupt and corrupt not in chosen:
        raise ValueError(f"--corrupt {corrupt} needs {corrupt} among the generated benchmarks")
    root = Path(out_dir)
    manifest = {"n": n, "seed": seed, "benchmarks": {}, "corrupt": None}
    for bench in chosen:
        benchmark = get_benchmark(bench)
        info = benchmark.write_fixture(root, n, random.Random(f"{seed}:{bench}"))
        manifest["benchmarks"][bench] = str(root / benchmark.folder)
        if bench == corrupt:
            manifest["corrupt"] = _corrupt(root, bench, info)
    write_json(root / "fixture_manifest.json", manifest, indent=2)
    return manifest


def reference_answers(data_root: str | Path, bench: str, model_id: str = "reference") -> list[dict]:
    """Answer records with the right answer for every item, read from the official files (they work on
    real data too). Not built from the scorers' lookups: answers that came from a scorer's own lookup would
    score 100% even when that lookup is wrong."""
    build = get_benchmark(bench).reference_answers
    if build is None:
        raise ValueError(f"benchmark {bench!r} has no reference answers")
    return build(Path(data_root), model_id)


def write_reference_answers(data_root: str | Path, bench: str, path: str | Path, model_id: str = "reference") -> Path:
    write_jsonl(Path(path), reference_answers(data_root, bench, model_id), ensure_ascii=True)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m restore.eval.fixtures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="data root to write (e.g. a temporary folder)")
    parser.add_argument("--n", type=int, default=6, help="items per benchmark (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--benchmarks", nargs="+", choices=fixture_benchmarks(), default=None)
    parser.add_argument("--corrupt", choices=fixture_benchmarks(), default=None, help="write one corrupt image for this benchmark")
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
