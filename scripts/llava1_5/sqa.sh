#!/usr/bin/env bash
# ScienceQA-IMG (image questions only, as RESTORE).
#   bash scripts/llava1_5/sqa.sh --base HoloV --n_vis 64 --restore   (--help for every option)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=python
[[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m restore.eval.launch sqa "$@"
