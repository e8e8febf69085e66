#!/usr/bin/env bash
# ScienceQA-IMG (image questions only, as RESTORE).
#   bash scripts/llava1_5/sqa.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
BENCH=sqa
ENTRY=science
QUESTION_FILE=scienceqa/llava_test_CQM-A.json
IMAGE_FOLDER=scienceqa/images/test
ENTRY_ARGS=(--single-pred-prompt)
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
run_benchmark "$@"
