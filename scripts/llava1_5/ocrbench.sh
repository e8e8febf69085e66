#!/usr/bin/env bash
# OCRBench (final score out of 1000).
#   bash scripts/llava1_5/ocrbench.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=python
[[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m restore.eval.launch ocrbench "$@"
