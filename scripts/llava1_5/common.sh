# Shared by scripts/llava1_5/<bench>.sh; not run on its own.
#
# A benchmark script sets BENCH (the scorer's name), ENTRY (restore.eval.<ENTRY>), QUESTION_FILE and
# IMAGE_FOLDER (relative to --data-root; IMAGE_FOLDER may be empty) and ENTRY_ARGS (fixed entry-point
# flags), then calls `run_benchmark "$@"`. Steps: one inference process per shard (one per GPU in
# CUDA_VISIBLE_DEVICES), each logging to its own file; wait for every shard; merge the shard files in
# chunk order after checking each is complete; score with restore.eval.scoring; write one result JSON.

set -euo pipefail

if ((BASH_VERSINFO[0] < 5)); then
    echo "error: these scripts need bash 5 or later (this is $BASH_VERSION)" >&2
    exit 2
fi

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    PY="$REPO_ROOT/.venv/bin/python"
else
    PY=python
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

usage() {
    cat <<EOF
usage: bash scripts/llava1_5/$BENCH.sh [options] [entry-point flags]

Runs $BENCH inference (python -m restore.eval.$ENTRY), one shard per GPU, then scores it and writes a
result record for python -m restore.report.

options of this script:
  --model-path PATH     checkpoint (default liuhaotian/llava-v1.5-7b)
  --data-root DIR       LLaVA's playground/data/eval layout (default playground/data/eval in the repo)
  --shards N            inference processes on this machine (default: one per GPU in CUDA_VISIBLE_DEVICES,
                        else one per visible GPU, else 1); shards beyond the GPU count share GPUs round-robin
  --nodes N             machines sharing this benchmark (default 1); each runs this script with its own
  --node-rank K         0..N-1 (e.g. --node-rank \$SLURM_ARRAY_TASK_ID); every node needs the same --shards,
                        and the node that finishes last merges and scores; a node whose layout
                        differs from another's is refused
  --answers-root DIR    default playground/answers in the repo
  --results-dir DIR     default playground/results in the repo
  --run-name NAME       answers subfolder (default <base>-<n_vis>[-restore], or "full" without --base)
  -h, --help            this text

CPU shards run OMP_NUM_THREADS threads each (default $DEFAULT_CPU_THREADS_PER_SHARD, whatever --shards is).

entry-point flags are passed through, e.g. --base HoloV --n_vis 64 --restore, RESTORE's settings
(--prune_ratio 0.75 --anchors uniform --positions reindexed --calibration size --calibration_c 2
--merged_position mean; docs/settings.md, each named in the run name), --device cpu,
--dtype bfloat16, --temperature 0.2, --max_new_tokens 16, --overwrite (see python -m restore.eval.$ENTRY -h).
EOF
}

die() {
    echo "error: $*" >&2
    exit 2
}

# LLaVA's get_model_name_from_path: the last path component, or "<parent>_<checkpoint-N>".
model_name_of() {
    local path=${1%/} last parent
    last=${path##*/}
    if [[ $last == checkpoint-* && $path == */* ]]; then
        parent=${path%/*}
        echo "${parent##*/}_$last"
    else
        echo "$last"
    fi
}

# Creates DIR if needed and fails now, not after hours of inference, when nothing can be written there.
require_writable_dir() {
    local dir=$1 what=$2 probe
    mkdir -p "$dir" 2> /dev/null || die "cannot create the $what $dir (pass another one, or fix its parent)"
    probe=$(mktemp "$dir/.write-test.XXXXXX" 2> /dev/null) \
        || die "the $what $dir is not writable (pass another one, or fix its permissions)"
    rm -f "$probe"
}

# Each attempt's shard log starts empty; the previous attempt's log is kept beside it, named after the
# time it was last written (<name>.log.<YYYYmmddTHHMMSS>).
start_fresh_log() {
    local log=$1 kept
    if [[ -s $log ]]; then
        kept="$log.$(date -r "$log" '+%Y%m%dT%H%M%S')"
        while [[ -e $kept ]]; do kept+="_"; done
        mv "$log" "$kept"
    fi
    : > "$log"
}

# Threads of one CPU shard: a fixed number, so that --shards (which only says how the questions are cut)
# cannot change the answers; torch's CPU kernels may round differently with another thread count.
DEFAULT_CPU_THREADS_PER_SHARD=1
cpu_threads_per_shard() {
    local threads=${OMP_NUM_THREADS:-$DEFAULT_CPU_THREADS_PER_SHARD}
    [[ $threads =~ ^[1-9][0-9]*$ ]] || die "OMP_NUM_THREADS must be a positive integer, got '$threads'"
    echo "$threads"
}

# "123/456" from the last progress bar in a log, or "starting".
shard_progress() {
    local found
    found=$(tail -c 4000 "$1" 2>/dev/null | tr '\r' '\n' | grep -Eo '[0-9]+/[0-9]+ \[' | tail -n 1 | cut -d' ' -f1 || true)
    echo "${found:-starting}"
}

run_benchmark() {
    local model_path="liuhaotian/llava-v1.5-7b" data_root="$REPO_ROOT/playground/data/eval"
    local answers_root="$REPO_ROOT/playground/answers" results_dir="$REPO_ROOT/playground/results"
    local shards="" nodes=1 node_rank=0 run_name="" base="" n_vis="" restore=0 device=auto
    local -a pass=()

    # --flag=value -> --flag value, so that both spellings work below and in argparse.
    local -a argv=()
    local arg
    for arg in "$@"; do
        if [[ $arg == --*=* ]]; then argv+=("${arg%%=*}" "${arg#*=}"); else argv+=("$arg"); fi
    done
    set -- ${argv[@]+"${argv[@]}"}
    while (($#)); do
        case "$1" in
            -h|--help) usage; exit 0 ;;
            --model-path|--data-root|--shards|--nodes|--node-rank|--answers-root|--results-dir|--run-name)
                (($# >= 2)) || die "$1 needs a value"
                case "$1" in
                    --model-path) model_path=$2 ;;
                    --data-root) data_root=$2 ;;
                    --shards) shards=$2 ;;
                    --nodes) nodes=$2 ;;
                    --node-rank) node_rank=$2 ;;
                    --answers-root) answers_root=$2 ;;
                    --results-dir) results_dir=$2 ;;
                    --run-name) run_name=$2 ;;
                esac
                shift 2 ;;
            --question-file|--image-folder|--answers-file|--num-chunks|--chunk-idx|--check-only)
                die "$1 is set by this script (use --data-root, --answers-root, --shards, --nodes/--node-rank)" ;;
            --base|--n_vis|--n-vis|--device)
                (($# >= 2)) || die "$1 needs a value"
                case "$1" in
                    --base) base=$2 ;;
                    --device) device=$2 ;;
                    *) n_vis=$2 ;;
                esac
                pass+=("$1" "$2")
                shift 2 ;;
            --restore) restore=1; pass+=("$1"); shift ;;
            *) pass+=("$1"); shift ;;
        esac
    done
    local positive='^[1-9][0-9]*$'
    [[ -z $shards || $shards =~ $positive ]] || die "--shards must be a positive integer, got '$shards'"
    [[ $nodes =~ $positive ]] || die "--nodes must be a positive integer, got '$nodes'"
    [[ $node_rank =~ ^[0-9]+$ ]] && ((node_rank < nodes)) || die "--node-rank must be in 0..$((nodes - 1)), got '$node_rank'"
    [[ -d $data_root ]] || die "data root $data_root not found (see docs/evaluation.md; pass --data-root)"
    [[ -f $data_root/$QUESTION_FILE ]] || die "question file $data_root/$QUESTION_FILE not found (see docs/evaluation.md)"
    if [[ -n $IMAGE_FOLDER && ! -d $data_root/$IMAGE_FOLDER ]]; then
        die "image folder $data_root/$IMAGE_FOLDER not found (see docs/evaluation.md)"
    fi

    # The entry point parses the pass-through flags exactly as every shard will (no abbreviations, no
    # unknown flags, plugins imported before --base is checked) and reads the question file: once, now.
    local -a check_images=()
    [[ -n $IMAGE_FOLDER ]] && check_images=(--image-folder "$data_root/$IMAGE_FOLDER")
    local entry_problem
    entry_problem=$("$PY" -m "restore.eval.$ENTRY" --check-only --model-path "$model_path" \
        --question-file "$data_root/$QUESTION_FILE" ${check_images[@]+"${check_images[@]}"} \
        --answers-file /dev/null --num-chunks 1 --chunk-idx 0 \
        ${ENTRY_ARGS[@]+"${ENTRY_ARGS[@]}"} ${pass[@]+"${pass[@]}"} 2>&1) \
        || { echo "$entry_problem" >&2; exit 2; }

    # The scorer's own files (annotations, labels) are first read after inference: check them now.
    local data_problem
    data_problem=$("$PY" -m restore.eval.scoring "$BENCH" --data-root "$data_root" --check-data 2>&1) \
        || die "${data_problem#error: }"

    # Answers are keyed by model and reduction setting, so no run ever merges another run's files.
    local model_name tag answers_dir
    model_name=$(model_name_of "$model_path")
    if [[ -n $run_name ]]; then
        tag=$run_name
    else
        # One place names a configuration (restore.settings.run_tag): base, budget and every setting.
        tag=$("$PY" -m restore.settings tag ${pass[@]+"${pass[@]}"}) || die "cannot name this configuration"
    fi
    answers_dir="$answers_root/$BENCH/$model_name/$tag"
    require_writable_dir "$answers_dir/chunks" "answers folder"
    require_writable_dir "$answers_dir/logs" "log folder"
    require_writable_dir "$results_dir" "results folder"

    # One shard per GPU listed in CUDA_VISIBLE_DEVICES (or visible to nvidia-smi), each pinned to it.
    local -a gpus=()
    local g
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        IFS=, read -ra gpus <<< "$CUDA_VISIBLE_DEVICES"
    elif [[ $device != cpu ]] && command -v nvidia-smi > /dev/null 2>&1; then
        mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2> /dev/null || true)
    fi
    local -a clean=()
    for g in ${gpus[@]+"${gpus[@]}"}; do
        g=${g//[[:space:]]/}
        [[ -n $g ]] && clean+=("$g")
    done
    gpus=(${clean[@]+"${clean[@]}"})
    local n_gpus=${#gpus[@]}
    [[ -n $shards ]] || shards=$((n_gpus > 0 ? n_gpus : 1))
    local total=$((nodes * shards)) first=$((node_rank * shards))
    local -a layout_args=(--answers-dir "$answers_dir" --nodes "$nodes" --node-rank "$node_rank" --shards "$shards")
    if ((nodes > 1)); then
        local layout_problem
        layout_problem=$("$PY" -m restore.eval.shards layout "${layout_args[@]}" 2>&1) || die "${layout_problem#error: }"
    fi

    local -a chunk_files=() pids=() logs=()
    local i chunk
    for ((i = 0; i < total; i++)); do
        chunk_files+=("$answers_dir/chunks/${total}_$i.jsonl")
    done

    local -A running=()
    # shellcheck disable=SC2317  # called from the trap
    stop_shards() {
        local pid
        for pid in "${!running[@]}"; do kill "$pid" 2> /dev/null || true; done
        echo "[$BENCH] interrupted; answers written so far are kept and a rerun resumes" >&2
        exit 130
    }
    trap stop_shards INT TERM

    local where="no GPU pinning"
    ((n_gpus > 0)) && where="GPU(s) ${gpus[*]}"
    echo "[$BENCH] $model_name, $tag: $shards shard(s) on this node, chunks $first..$((first + shards - 1)) of $total," \
         "$where; answers in $answers_dir"
    local cpu_threads=""
    if [[ $device == cpu || $n_gpus == 0 ]]; then
        cpu_threads=$(cpu_threads_per_shard)
    fi
    local started=$SECONDS started_at=$EPOCHREALTIME
    for ((i = 0; i < shards; i++)); do
        chunk=$((first + i))
        local log="$answers_dir/logs/${total}_$chunk.log"
        start_fresh_log "$log"
        echo "===== $(date '+%Y-%m-%d %H:%M:%S') $BENCH chunk $chunk of $total =====" >> "$log"
        local -a pin=()
        ((n_gpus > 0)) && pin+=("CUDA_VISIBLE_DEVICES=${gpus[i % n_gpus]}")
        [[ -n $cpu_threads ]] && pin+=("OMP_NUM_THREADS=$cpu_threads")
        local -a image_arg=()
        [[ -n $IMAGE_FOLDER ]] && image_arg=(--image-folder "$data_root/$IMAGE_FOLDER")
        env ${pin[@]+"${pin[@]}"} "$PY" -m "restore.eval.$ENTRY" \
            --model-path "$model_path" \
            --question-file "$data_root/$QUESTION_FILE" \
            ${image_arg[@]+"${image_arg[@]}"} \
            --answers-file "${chunk_files[chunk]}" \
            --num-chunks "$total" --chunk-idx "$chunk" \
            ${ENTRY_ARGS[@]+"${ENTRY_ARGS[@]}"} ${pass[@]+"${pass[@]}"} \
            >> "$log" 2>&1 &
        pids+=("$!")
        logs+=("$log")
        running[$!]=$i
        echo "[$BENCH]   shard $i: chunk $chunk${pin[*]:+, ${pin[*]}}, log $log"
    done

    # Wait for every shard; report each failure as soon as it happens (the others keep their answers).
    local -a failed=()
    local pid rc last_report=$SECONDS
    while ((${#running[@]})); do
        for pid in "${!running[@]}"; do
            kill -0 "$pid" 2> /dev/null && continue
            i=${running[$pid]}
            unset "running[$pid]"
            if wait "$pid"; then rc=0; else rc=$?; fi
            if ((rc == 0)); then
                echo "[$BENCH]   shard $i done ($((SECONDS - started)) s)"
            else
                failed+=("$i")
                echo "[$BENCH]   shard $i FAILED with exit code $rc; last lines of ${logs[i]}:" >&2
                tail -n 25 "${logs[i]}" | tr '\r' '\n' | tail -n 25 | sed 's/^/    | /' >&2
            fi
        done
        ((${#running[@]})) || break
        if ((SECONDS - last_report >= 60)); then
            last_report=$SECONDS
            local line="[$BENCH]   progress:"
            for pid in "${!running[@]}"; do
                line+=" shard ${running[$pid]} $(shard_progress "${logs[${running[$pid]}]}")"
            done
            echo "$line"
        fi
        sleep 1
    done
    trap - INT TERM
    local wall
    wall=$(awk -v a="$started_at" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
    if ((${#failed[@]})); then
        echo "[$BENCH] ${#failed[@]} of $shards shard(s) failed (${failed[*]}); nothing merged or scored." \
             "Fix the cause and rerun the same command: finished answers are kept and resumed." >&2
        exit 1
    fi

    if ((nodes > 1)); then
        # A node started with another layout after this one began: its chunks and ours never add up.
        local layout_out
        layout_out=$("$PY" -m restore.eval.shards layout --check-only "${layout_args[@]}" 2>&1) || {
            echo "[$BENCH] this node's chunks are done, but ${layout_out#error: }" >&2
            exit 1
        }
        # 3: some chunk is missing or unfinished (another node is still at work); anything else but 0 is a
        # conflict or damage that waiting cannot fix, so it must fail here, loudly.
        local check_rc=0 check_out
        check_out=$("$PY" -m restore.eval.shards merge --check --out "$answers_dir/merge.jsonl" "${chunk_files[@]}" 2>&1) \
            || check_rc=$?
        if ((check_rc == 3)); then
            echo "[$BENCH] this node's chunks are done; other nodes' chunks are not complete yet." \
                 "The last node to finish merges and scores (or rerun any node when all are done)."
            exit 0
        elif ((check_rc != 0)); then
            echo "[$BENCH] this node's chunks are done, but the chunks of all nodes cannot be merged:" >&2
            echo "$check_out" | sed 's/^/    | /' >&2
            exit 1
        fi
    fi
    (
        # Several nodes may finish together: merge and score under a lock when flock exists.
        if command -v flock > /dev/null 2>&1; then flock 9; fi
        if ((nodes > 1)) && [[ -f $answers_dir/merge.jsonl ]]; then
            local newer=0 f
            for f in "${chunk_files[@]}"; do [[ $f -nt $answers_dir/merge.jsonl ]] && newer=1; done
            if ((newer == 0)); then
                echo "[$BENCH] another node has merged and scored these chunks already"
                exit 0
            fi
        fi
        "$PY" -m restore.eval.shards finish --benchmark "$BENCH" --answers-dir "$answers_dir" \
            --data-root "$data_root" --results-dir "$results_dir" --model "$model_name" --wall-time "$wall" --run-name "$tag" \
            "${chunk_files[@]}"
    ) 9> "$answers_dir/.merge.lock"
}
