#!/usr/bin/env bash
# POPE (COCO adversarial / popular / random; mean F1).
#   bash scripts/llava1_5/pope.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
BENCH=pope
ENTRY=vqa_loader
QUESTION_FILE=pope/llava_pope_test.jsonl
IMAGE_FOLDER=pope/val2014
ENTRY_ARGS=()
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_benchmark "$@"
