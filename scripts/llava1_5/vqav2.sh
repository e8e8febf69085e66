#!/usr/bin/env bash
# VQAv2 test-dev: writes the EvalAI upload file (scored online). Greedy by default; the official script samples at 0.2 (pass --temperature 0.2 to reproduce it).
#   bash scripts/llava1_5/vqav2.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
BENCH=vqav2
ENTRY=vqa_loader
QUESTION_FILE=vqav2/llava_vqav2_mscoco_test-dev2015.jsonl
IMAGE_FOLDER=vqav2/test2015
ENTRY_ARGS=()
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_benchmark "$@"
