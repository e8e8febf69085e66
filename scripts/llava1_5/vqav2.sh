#!/usr/bin/env bash
# VQAv2 test-dev: writes the EvalAI upload file (scored online). Greedy by default; the official script samples at 0.2 (pass --temperature 0.2 to reproduce it).
#   bash scripts/llava1_5/vqav2.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=python
[[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m restore.eval.launch vqav2 "$@"
