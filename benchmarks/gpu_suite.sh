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
# 4. copies the results to benchmarks/results/<gpu>_torch<v>_triton<v>_<date>/.
# Extra options go to `fastalign bench` (e.g. --shapes 8192,4096,128256 to fit a time limit).
# Exit status: non-zero if the tests or the benchmark failed (the benchmark runs either way).
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

$py -m fastalign.cli bench --device cuda --output "$out" --on-mismatch skip --no-progress "$@" \
    2>&1 | tee "$out/bench.txt"
bench_rc=${PIPESTATUS[0]}

slug=$($py -c 'from fastalign import bench; print(bench.device_slug("cuda"))' 2>/dev/null)
torch_v=$($py -c 'import torch; print(torch.__version__)')
triton_v=$($py -c 'import triton; print(triton.__version__)')
name="${slug:-gpu}_torch${torch_v/+/-}_triton${triton_v}_$(date +%F)"
mkdir -p "benchmarks/results/$name"
cp "$out"/linear_logprobs_* "$out"/env.txt "$out"/pytest.txt "benchmarks/results/$name/"
echo "results in $out and benchmarks/results/$name (tests rc=$tests_rc, bench rc=$bench_rc)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
