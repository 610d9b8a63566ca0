#!/usr/bin/env bash
# The GPU check, sized for a lent H100/H200's 15 minutes of device time: at most 8 minutes of
# wall time after the machine has started. Run from the repository root (a plain copy will do):
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on the GPU machine
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run   # anywhere: print the plan and its estimate
#
# 1. installs benchmarks/wheels/*.whl (Liger-Kernel, Cut Cross-Entropy) into a folder on
#    PYTHONPATH, and fastalign itself, editable, without its C++ extension (CPU only);
# 2. runs fastalign/bench/gpu_check.py: the GPU tests under each Triton backward strategy, the
#    bf16 matrix rate, then the benchmark cases, most important first, every section under a
#    hard time budget (a case that no longer fits is skipped with a note; the report is
#    rewritten after every case). Its docstring and benchmarks/README.md say what runs.
# Writes OUT_DIR/gpu_check.md, gpu_check.log, tests.txt, linear_logprobs.{csv,png},
# linear_nll.{csv,png}. Exit status: 0 when every section passed, 1 when tests failed or timed
# out, 2 for bad usage or a failed install. PYTHON (default python3) picks the interpreter.
set -uo pipefail

usage="usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
out=$1
shift
dry_run=0
for arg in "$@"; do
    case $arg in
        --dry-run) dry_run=1 ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
py=${PYTHON:-python3}
# Run by path: the plan needs nothing but the standard library, fastalign need not be installed.
driver=fastalign/bench/gpu_check.py
if [ "$dry_run" = 1 ]; then
    exec "$py" "$driver" --dry-run --out "$out"
fi

run() {
    SECONDS=0
    local install_budget total_budget left
    read -r install_budget total_budget < <("$py" "$driver" --print-budgets)
    unset TRITON_INTERPRET
    local site=${TMPDIR:-/tmp}/fastalign-gpu-check-site
    if compgen -G "benchmarks/wheels/*.whl" > /dev/null; then
        timeout "$install_budget" "$py" -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target "$site" benchmarks/wheels/*.whl \
            || echo "gpu_check: installing the wheels failed: their providers will be skipped"
        export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    fi
    left=$((install_budget - SECONDS))
    FASTALIGN_BUILD_EXT=0 timeout $((left > 10 ? left : 10)) "$py" -m pip install -q \
        --no-build-isolation --no-deps --no-cache-dir -e . \
        || { echo "gpu_check: installing fastalign failed"; return 2; }
    echo "gpu_check: installed in ${SECONDS} s"
    # The driver keeps to its budgets by itself; this timeout is the last resort.
    timeout -k 10 $((total_budget + 20 - SECONDS)) \
        "$py" -m fastalign.bench.gpu_check --out "$out" --elapsed-s "$SECONDS"
}

run 2>&1 | tee -a "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
