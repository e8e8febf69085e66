"""OCRBench (final score out of 1000)."""
from . import Benchmark

BENCHMARK = Benchmark(
    name="ocrbench",
    title="OCRBench (final score out of 1000).",
    entry="ocrbench",
    question_file="ocrbench/OCRBench.json",
    image_folder="ocrbench/data",
    entry_args=(),
)
