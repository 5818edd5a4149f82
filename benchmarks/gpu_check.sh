#!/usr/bin/env bash
# The GPU check (issue 14): transferlab's CUDA paths on one NVIDIA GPU, in a prepared environment that has its own
# Python and torch and no package index (a cluster module, an NVIDIA container). From the repository root:
#
#   WHEELS=wheels/ bash benchmarks/gpu_check.sh [STEP ...]      (default: every step, in this order)
#
# Steps, each with its own time limit (seconds; the defaults add up to 10 minutes) and one line
# "gpu_check: STEP PASS|FAIL ..." in the output and in RESULTS/summary.txt; a failed step does not stop the others:
#   install  (T_INSTALL=45)  pip install --no-deps of the wheels in WHEELS whose package this Python lacks, then
#                            `pip install --no-deps -e .` (its build backend from WHEELS too); never replaces torch
#                            (checked), and checks every declared requirement against what is installed (gpu_env.py)
#   env      (T_ENV=30)      Python, torch, CUDA, the GPU, bf16 support, cuDNN, Triton -> RESULTS/env.txt
#   tests    (T_TESTS=150)   the device-agnostic tests with TRANSFERLAB_TEST_DEVICE=$DEVICE -> RESULTS/tests.log
#   paper    (T_PAPER=270)   studies/paper.toml end to end on DATA and WEIGHTS -> RESULTS/paper.md (per-trial times
#                            and accuracies), RESULTS/paper.log (each attempt appended)
#   best     (T_BEST=105)    studies/best.toml, variant full only -> RESULTS/best.md, RESULTS/best.log
# A study stopped by its limit keeps what it finished: run the same step again and it resumes (its trials, its run
# directories and the caches live in WORK).
#
# Settings (environment variables):
#   PYTHON   the prepared interpreter (default: python3)
#   WHEELS   folder of wheels for what it lacks, made by benchmarks/make_wheels.sh (default: wheels)
#   PIP_ARGS more pip install options, e.g. --user where the environment is not writable
#   DATA     the CIFAR-10 image folder, or a .tar / .tar.gz of it (default: ../shared/datasets/cifar10-train-jpeg)
#   WEIGHTS  SqueezeNet 1.1 weights (default: ../shared/weights/squeezenet1_1-imagenet-features.pth)
#   RESULTS  where the summary, logs and results go (default: $OUT/gpu-check when OUT is set, else gpu-check-out)
#   WORK     studies and caches (default: /tmp/transferlab-gpu-check)
#   DEVICE   cuda (default), or cpu for a dry run of the script itself on a machine without a GPU
#   TESTS    the test files of the tests step (default: the device-agnostic list below)
#   PAPER_ARGS, BEST_ARGS   more `study run` options, e.g. "--set limit=2000 --set grid.epochs=[1]" for a short try
# Options: -h/--help, --list (the steps), --dry-run (print each step's command instead of running it).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

STEPS=(install env tests paper best)
DEFAULT_TESTS="tests/engine/test_device_paths.py tests/engine/test_train.py tests/inference/test_evaluate.py tests/engine/test_features.py
tests/engine/test_preprocess.py tests/engine/test_augment.py tests/models/test_freezing.py tests/models/test_preprocessing.py"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

DRY_RUN=0
CHOSEN=()
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        --list) printf '%s\n' "${STEPS[@]}"; exit 0 ;;
        --dry-run) DRY_RUN=1 ;;
        -*) echo "gpu_check: unknown option $arg (see --help)" >&2; exit 2 ;;
        *)
            if [[ " ${STEPS[*]} " != *" $arg "* ]]; then
                echo "gpu_check: unknown step '$arg': choose from ${STEPS[*]}" >&2
                exit 2
            fi
            CHOSEN+=("$arg")
            ;;
    esac
done
[ ${#CHOSEN[@]} -gt 0 ] || CHOSEN=("${STEPS[@]}")

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels}
PIP_ARGS=${PIP_ARGS:-}
DATA=${DATA:-../shared/datasets/cifar10-train-jpeg}
WEIGHTS=${WEIGHTS:-../shared/weights/squeezenet1_1-imagenet-features.pth}
if [ -n "${OUT:-}" ]; then RESULTS=${RESULTS:-$OUT/gpu-check}; else RESULTS=${RESULTS:-gpu-check-out}; fi
WORK=${WORK:-/tmp/transferlab-gpu-check}
DEVICE=${DEVICE:-cuda}
TESTS=${TESTS:-$DEFAULT_TESTS}
PAPER_ARGS=${PAPER_ARGS:-}
BEST_ARGS=${BEST_ARGS:-}
case "$DEVICE" in cuda | cpu) ;; *) echo "gpu_check: DEVICE=$DEVICE: expected cuda or cpu" >&2; exit 2 ;; esac
mkdir -p "$RESULTS" "$WORK" || exit 2
SUMMARY=$RESULTS/summary.txt
# the decode and feature caches of the studies; a retried trial of a stopped study is re-queued after 12 s, not 3 min
export TRANSFERLAB_CACHE=$WORK/cache TRANSFERLAB_HEARTBEAT_GRACE=12 PYTHONUNBUFFERED=1
# the checkout's code even where the install step failed (after it, the same code: the install is editable)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

limit_of() {
    local name="T_${1^^}" default
    case "$1" in install) default=45 ;; env) default=30 ;; tests) default=150 ;; paper) default=270 ;; best) default=105 ;; esac
    echo "${!name:-$default}"
}

# transferlab's command line through this Python (its console script may not be on PATH)
transferlab() { "$PYTHON" -c 'import sys; from transferlab.cli import main; sys.argv[0] = "transferlab"; sys.exit(main())' "$@"; }

torch_version() { "$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null; }

step_install() {
    local before after wheel name missing=()
    before=$(torch_version) || { echo "no torch in $PYTHON: the check needs the environment's own torch"; return 1; }
    shopt -s nullglob
    for wheel in "$WHEELS"/*.whl; do
        name=$(basename "$wheel"); name=${name%%-*}
        # installed already (in whatever version): the environment's own copy stays
        if "$PYTHON" -c 'import importlib.metadata as m, sys; m.version(sys.argv[1])' "$name" 2>/dev/null; then
            echo "present: $name (wheel not used)"
        else
            missing+=("$wheel")
        fi
    done
    shopt -u nullglob
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${#missing[@]} wheels: ${missing[*]##*/}"
        # shellcheck disable=SC2086
        "$PYTHON" -m pip install --no-index --no-deps --disable-pip-version-check $PIP_ARGS "${missing[@]}" || return 1
    fi
    # built in pip's isolated build environment, its backend (setuptools) taken from WHEELS too
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" --no-deps --disable-pip-version-check $PIP_ARGS -e . \
        || return 1
    after=$(torch_version)
    [ "$before" = "$after" ] || { echo "torch changed from $before to $after"; return 1; }
    echo "torch $after kept"
    "$PYTHON" benchmarks/gpu_env.py
}

step_env() {
    local require=()
    [ "$DEVICE" = cuda ] && require=(--require-cuda)
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    "$PYTHON" benchmarks/gpu_env.py "${require[@]}" | tee -i "$RESULTS/env.txt"
}

step_tests() {
    # shellcheck disable=SC2086
    TRANSFERLAB_TEST_DEVICE=$DEVICE "$PYTHON" -m pytest -q -ra -p no:cacheprovider -m "not shared and not postgres" \
        $TESTS 2>&1 | tee -i "$RESULTS/tests.log"
}

data_folder() { # DATA itself, or the folder its .tar / .tar.gz archive holds (unpacked once, in WORK/data)
    if [ ! -f "$DATA" ]; then echo "$DATA"; return; fi
    local dest=$WORK/data
    if [ ! -f "$dest/.unpacked" ]; then
        echo "unpacking $DATA into $dest" >&2
        rm -rf "$dest" && mkdir -p "$dest" && tar -xf "$DATA" -C "$dest" && touch "$dest/.unpacked" || return 1
    fi
    find "$dest" -mindepth 1 -maxdepth 1 -type d | head -n 1
}

study_step() { # name spec results-title extra-args...
    local name=$1 spec=$2 title=$3 data status
    shift 3
    data=$(data_folder) || return 1
    echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC'): $name ===" >>"$RESULTS/$name.log"  # a rerun resumes: logs add up
    transferlab study run "$spec" --dir "$WORK/$name" --set "data=$data" --set "weights=$WEIGHTS" \
        --set "device=$DEVICE" --set progress=false "$@" 2>&1 | tee -i -a "$RESULTS/$name.log"
    status=${PIPESTATUS[0]}
    "$PYTHON" benchmarks/gpu_results.py "$WORK/$name" --title "$title" >"$RESULTS/$name.md" \
        && cat "$RESULTS/$name.md"
    return "$status"
}

step_paper() {
    # shellcheck disable=SC2086
    study_step paper studies/paper.toml "studies/paper.toml end to end ($DEVICE)" $PAPER_ARGS
}

step_best() {
    # shellcheck disable=SC2086
    study_step best studies/best.toml "studies/best.toml, variant full ($DEVICE)" --set 'grid.variant=["full"]' \
        $BEST_ARGS
}

export -f transferlab torch_version data_folder step_install step_env step_tests study_step step_paper step_best
export PYTHON WHEELS PIP_ARGS DATA WEIGHTS RESULTS WORK DEVICE TESTS PAPER_ARGS BEST_ARGS

[ "$DRY_RUN" = 1 ] && SUMMARY=/dev/null
echo "gpu_check: steps ${CHOSEN[*]}; device $DEVICE; results in $RESULTS; studies and caches in $WORK" | tee -a "$SUMMARY"
failed=0
for step in "${CHOSEN[@]}"; do
    limit=$(limit_of "$step")
    if [ "$DRY_RUN" = 1 ]; then
        echo "gpu_check: $step (limit ${limit} s):"
        declare -f "step_$step" | sed '1,2d; $d'
        continue
    fi
    echo "=== gpu_check: $step (limit ${limit} s) ==="
    started=$(date +%s)
    # INT first (to the whole group; tee -i outlives it): a study saves what it finished and says so, pytest prints its
    # summary; KILL 20 s later if it has not stopped
    timeout --signal=INT --kill-after=20 "$limit" bash -o pipefail -c "step_$step"
    status=$?
    seconds=$(($(date +%s) - started))
    if [ "$status" -eq 0 ]; then
        line="gpu_check: $step PASS (${seconds} s)"
    elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        line="gpu_check: $step FAIL (time limit ${limit} s reached; run 'bash benchmarks/gpu_check.sh $step' again to go on)"
        failed=1
    else
        line="gpu_check: $step FAIL (exit status $status after ${seconds} s; see the output above)"
        failed=1
    fi
    echo "$line" | tee -a "$SUMMARY"
done
exit "$failed"
