#!/usr/bin/env bash
# SEED-Bench (image + video-frame questions).
#   bash scripts/llava1_5/seed.sh --base HoloV --n_vis 64 --restore   (--help for every option)
# Without the video frames (docs/data.md), answer the image questions only:
#   bash scripts/llava1_5/seed.sh --base HoloV --n_vis 64 --restore --only-images-under SEED-Bench-image
set -euo pipefail
BENCH=seed
ENTRY=vqa_loader
QUESTION_FILE=seed_bench/llava-seed-bench.jsonl
IMAGE_FOLDER=seed_bench
ENTRY_ARGS=()
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_benchmark "$@"
