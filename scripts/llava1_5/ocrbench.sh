#!/usr/bin/env bash
# OCRBench (final score out of 1000).
#   bash scripts/llava1_5/ocrbench.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
BENCH=ocrbench
ENTRY=ocrbench
QUESTION_FILE=ocrbench/OCRBench.json
IMAGE_FOLDER=ocrbench/data
ENTRY_ARGS=()
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_benchmark "$@"
