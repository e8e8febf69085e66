"""GQA test-dev balanced (accuracy)."""
from . import Benchmark

BENCHMARK = Benchmark(
    name="gqa",
    title="GQA test-dev balanced (accuracy).",
    entry="vqa_loader",
    question_file="gqa/llava_gqa_testdev_balanced.jsonl",
    image_folder="gqa/data/images",
    entry_args=(),
)
