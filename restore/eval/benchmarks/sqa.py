"""ScienceQA-IMG (image questions only, as RESTORE)."""
from . import Benchmark

BENCHMARK = Benchmark(
    name="sqa",
    title="ScienceQA-IMG (image questions only, as RESTORE).",
    entry="science",
    question_file="scienceqa/llava_test_CQM-A.json",
    image_folder="scienceqa/images/test",
    entry_args=("--single-pred-prompt",),
)
