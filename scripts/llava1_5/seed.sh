#!/usr/bin/env bash
# SEED-Bench (image + video-frame questions).
#   bash scripts/llava1_5/seed.sh --base HoloV --n_vis 64 --restore   (--help for every option)
# Without the video frames (docs/data.md), answer the image questions only:
#   bash scripts/llava1_5/seed.sh --base HoloV --n_vis 64 --restore --only-images-under SEED-Bench-image
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=python
[[ -x $ROOT/.venv/bin/python ]] && PY=$ROOT/.venv/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m restore.eval.launch seed "$@"
