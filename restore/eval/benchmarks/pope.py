"""POPE (COCO adversarial / popular / random; mean F1)."""
from . import Benchmark

BENCHMARK = Benchmark(
    name="pope",
    title="POPE (COCO adversarial / popular / random; mean F1).",
    entry="vqa_loader",
    question_file="pope/llava_pope_test.jsonl",
    image_folder="pope/val2014",
    entry_args=(),
)
