"""MMBench dev (English), one answer per row; local CircularEval score and the upload xlsx."""
from . import Benchmark

BENCHMARK = Benchmark(
    name="mmbench",
    title="MMBench dev (English), one answer per row; local CircularEval score and the upload xlsx.",
    entry="mmbench",
    question_file="mmbench/mmbench_dev_20230712.tsv",
    image_folder=None,
    entry_args=("--single-pred-prompt",),
)
