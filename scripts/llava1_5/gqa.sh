#!/usr/bin/env bash
# GQA test-dev balanced (accuracy).
#   bash scripts/llava1_5/gqa.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
BENCH=gqa
ENTRY=vqa_loader
QUESTION_FILE=gqa/llava_gqa_testdev_balanced.jsonl
IMAGE_FOLDER=gqa/data/images
ENTRY_ARGS=()
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_benchmark "$@"
