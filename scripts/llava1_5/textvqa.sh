#!/usr/bin/env bash
# TextVQA val, with LLaVA's OCR-token prompt.
#   bash scripts/llava1_5/textvqa.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
BENCH=textvqa
ENTRY=vqa_loader
QUESTION_FILE=textvqa/llava_textvqa_val_v051_ocr.jsonl
IMAGE_FOLDER=textvqa/train_images
ENTRY_ARGS=()
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_benchmark "$@"
