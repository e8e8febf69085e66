"""MME (perception and cognition scores)."""
from . import Benchmark

BENCHMARK = Benchmark(
    name="mme",
    title="MME (perception and cognition scores).",
    entry="vqa_loader",
    question_file="MME/llava_mme.jsonl",
    image_folder="MME/MME_Benchmark_release_version",
    entry_args=(),
)
