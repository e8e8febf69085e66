"""TextVQA val, with LLaVA's OCR-token prompt."""
from . import Benchmark

BENCHMARK = Benchmark(
    name="textvqa",
    title="TextVQA val, with LLaVA's OCR-token prompt.",
    entry="vqa_loader",
    question_file="textvqa/llava_textvqa_val_v051_ocr.jsonl",
    image_folder="textvqa/train_images",
    entry_args=(),
)
