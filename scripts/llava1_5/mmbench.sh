#!/usr/bin/env bash
# MMBench dev (English), one answer per row; local CircularEval score and the upload xlsx.
#   bash scripts/llava1_5/mmbench.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
BENCH=mmbench
ENTRY=mmbench
QUESTION_FILE=mmbench/mmbench_dev_20230712.tsv
IMAGE_FOLDER=
ENTRY_ARGS=(--single-pred-prompt)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_benchmark "$@"
