#!/usr/bin/env bash
# The GPU checks in one run, for a GPU machine without network (about 6 minutes on one H100):
# the CUDA tests, then benchmarks/gpu.py. Results go to OUT_DIR (default: $OUT, else .):
# gpu-tests.log, gpu-bench.log and gpu.jsonl. Needs a python3 with CUDA torch, transformers and
# the test packages; gpt2engine itself is installed from this checkout (editable) if missing.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu-card.txt"
if ! python3 -c "import gpt2engine" 2>/dev/null || ! [ -x "$(python3 -c 'import sys, os; print(os.path.dirname(sys.executable))')/gpt2" ]; then
    python3 -m pip install --quiet --no-deps --no-index --no-build-isolation -e . || exit 1
fi
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_graphs.py 2>&1 | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
timeout 420 python3 benchmarks/gpu.py "$out/gpu.jsonl" 2>&1 | tee "$out/gpu-bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, benchmark exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
