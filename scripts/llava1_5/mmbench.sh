#!/usr/bin/env bash
# MMBench dev (English), one answer per row; local CircularEval score and the upload xlsx.
#   bash scripts/llava1_5/mmbench.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=python
[[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m restore.eval.launch mmbench "$@"
