#!/usr/bin/env bash
# The GPU run, in one go: install, test, benchmark. Run from anywhere on a CUDA machine:
#
#   benchmarks/gpu_suite.sh OUTPUT_DIR [fastalign bench options...]
#
# 1. installs wheels from $WHEELS_DIR (default benchmarks/wheels, if present; e.g. liger-kernel,
#    cut-cross-entropy) and fastalign itself (editable, building the extension against the
#    installed torch);
# 2. runs `pytest tests` with the Triton interpreter off  -> OUTPUT_DIR/pytest.txt
# 3. runs `fastalign bench --device cuda`                 -> OUTPUT_DIR/linear_logprobs_*.{csv,png,md}
#    then `fastalign bench --op linear_kl --device cuda`   -> OUTPUT_DIR/linear_kl_*.{csv,png,md}
#    and  `fastalign bench --op dpo --device cuda`         -> OUTPUT_DIR/dpo_*.{csv,png,md}
# 4. copies the results to benchmarks/results/<gpu>_torch<v>_triton<v>_<date>/.
# Extra options go to the linear_logprobs `fastalign bench` (e.g. --shapes 8192,4096,128256 to
# fit a time limit); KL_BENCH_ARGS and DPO_BENCH_ARGS (environment, word-split) go to the other two
# (e.g. DPO_BENCH_ARGS="--shapes 2,1024,4096,128256"). BENCH_OPS (default
# "linear_logprobs linear_kl dpo") picks which benchmarks run.
# Exit status: non-zero if the tests or a benchmark failed (the benchmarks run either way).
set -uo pipefail

out=${1:?usage: $0 OUTPUT_DIR [fastalign bench options...]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
unset TRITON_INTERPRET
py=${PYTHON:-python}

wheels=${WHEELS_DIR:-benchmarks/wheels}
if compgen -G "$wheels/*.whl" > /dev/null; then
    $py -m pip install -q --no-index --no-deps "$wheels"/*.whl || echo "wheel install failed"
fi
$py -m pip install -q --no-build-isolation --no-deps -e . || exit 1
{ nvidia-smi; $py -m pip list; } > "$out/env.txt" 2>&1

$py -m pytest tests -q -p no:cacheprovider 2>&1 | tee "$out/pytest.txt"
tests_rc=${PIPESTATUS[0]}

ops=${BENCH_OPS:-linear_logprobs linear_kl dpo}
bench_rc=0
for op in $ops; do
    case $op in
        linear_logprobs) args=("$@"); log=bench.txt ;;
        linear_kl) read -r -a args <<< "${KL_BENCH_ARGS:-}"; log=bench_linear_kl.txt ;;
        dpo) read -r -a args <<< "${DPO_BENCH_ARGS:-}"; log=bench_dpo.txt ;;
        *) echo "unknown op in BENCH_OPS: $op"; bench_rc=2; continue ;;
    esac
    $py -m fastalign.cli bench --op "$op" --device cuda --output "$out" --on-mismatch skip \
        --no-progress "${args[@]}" 2>&1 | tee "$out/$log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || bench_rc=$rc
done

slug=$($py -c 'from fastalign.bench import measure; print(measure.device_slug("cuda"))' 2>/dev/null)
torch_v=$($py -c 'import torch; print(torch.__version__)')
triton_v=$($py -c 'import triton; print(triton.__version__)')
name="${slug:-gpu}_torch${torch_v/+/-}_triton${triton_v}_$(date +%F)"
mkdir -p "benchmarks/results/$name"
for file in "$out"/linear_logprobs_* "$out"/linear_kl_* "$out"/dpo_* "$out"/bench*.txt \
            "$out"/env.txt "$out"/pytest.txt; do
    [ -e "$file" ] && cp "$file" "benchmarks/results/$name/"
done
echo "results in $out and benchmarks/results/$name (tests rc=$tests_rc, bench rc=$bench_rc)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
