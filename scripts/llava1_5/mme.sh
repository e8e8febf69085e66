#!/usr/bin/env bash
# MME (perception and cognition scores).
#   bash scripts/llava1_5/mme.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
BENCH=mme
ENTRY=vqa_loader
QUESTION_FILE=MME/llava_mme.jsonl
IMAGE_FOLDER=MME/MME_Benchmark_release_version
ENTRY_ARGS=()
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_benchmark "$@"
