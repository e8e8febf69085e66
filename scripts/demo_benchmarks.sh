#!/usr/bin/env bash
# Second half of `make demo`: the nine benchmark scripts end to end on the CPU, on few-item fixtures in the
# official file formats, with the small random checkpoint: no reduction, HoloV at 64 tokens, HoloV + RESTORE;
# then the results table. The checkpoint's weights are random: the scores mean nothing, the pipeline is real.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
[[ -x $python ]] || python=python
demo=$root/playground/demo
checkpoint=$root/playground/checkpoints/llava-v1.5-small-random
benchmarks=(gqa vqav2 seed mmbench mme pope sqa textvqa ocrbench)

rm -rf "$demo"
"$python" -c "from restore.small_checkpoint import ensure_small_checkpoint as e; e('$checkpoint')"
"$python" -m restore.eval.fixtures --out "$demo/data" --n 4 > /dev/null
# One pass per benchmark for the three configurations (--configs): one model load, one encoding of each image.
for bench in "${benchmarks[@]}"; do
    echo "== $bench"
    bash "$root/scripts/llava1_5/$bench.sh" --model-path "$checkpoint" --data-root "$demo/data" \
        --answers-root "$demo/answers" --results-dir "$demo/results" --device cpu --max_new_tokens 4 \
        --configs full,HoloV-64,HoloV-64-restore 2>&1 | tail -n 4
done
"$python" -m restore.report --results "$demo/results" --out "$demo"
echo
echo "The small checkpoint has RANDOM weights: these scores mean nothing, they show the whole pipeline runs."
echo "For the real model: bash scripts/llava1_5/<bench>.sh --model-path liuhaotian/llava-v1.5-7b --base HoloV --n_vis 64 --restore"
echo "(data layout: docs/data.md). Answers, logs and scores of this demo: $demo"
