#!/usr/bin/env bash
# POPE (COCO adversarial / popular / random; mean F1).
#   bash scripts/llava1_5/pope.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=python
[[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m restore.eval.launch pope "$@"
