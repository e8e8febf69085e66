#!/usr/bin/env bash
# Qwen2.5-VL-7B-Instruct: TextVQA val, with LLaVA's OCR-token prompt.
# lmms-eval's prompt in Qwen's chat template, images within 200704..12845056 px (docs/qwen2_5_vl.md).
#   bash scripts/qwen2_5_vl/textvqa.sh --base HoloV --keep 0.111 --restore   (--help for every option)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=python
[[ -x $ROOT/.venv-qwen/bin/python ]] && PY=$ROOT/.venv-qwen/bin/python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export RESTORE_SCRIPT_FOLDER=qwen2_5_vl RESTORE_DEFAULT_MODEL=Qwen/Qwen2.5-VL-7B-Instruct
exec "$PY" -m restore.eval.launch textvqa "$@"
