"""SEED-Bench (image + video-frame questions)."""
from . import Benchmark

BENCHMARK = Benchmark(
    name="seed",
    title="SEED-Bench (image + video-frame questions).",
    entry="vqa_loader",
    question_file="seed_bench/llava-seed-bench.jsonl",
    image_folder="seed_bench",
    entry_args=(),
    usage_note="Without the video frames (docs/data.md), answer the image questions only: --only-images-under SEED-Bench-image",
)
