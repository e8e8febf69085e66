"""VQAv2 test-dev: writes the EvalAI upload file (scored online)."""
from . import Benchmark

BENCHMARK = Benchmark(
    name="vqav2",
    title="VQAv2 test-dev: writes the EvalAI upload file (scored online).",
    entry="vqa_loader",
    question_file="vqav2/llava_vqav2_mscoco_test-dev2015.jsonl",
    image_folder="vqav2/test2015",
    entry_args=(),
    usage_note="Greedy by default; the official script samples at 0.2 (pass --temperature 0.2 to reproduce it).",
)
