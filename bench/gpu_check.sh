#!/usr/bin/env bash
# One call on a lent GPU machine: build for its architecture, run the GPU tests, run them
# again under compute-sanitizer, then benchmark, writing logs and JSON under $OUT.
#
#   bash bench/gpu_check.sh            (OUT defaults to ./gpu-out)
#
# The machine has its own python3 with torch, triton, pybind11 and scikit-build-core and
# no network: the install uses what is there (no build isolation, no dependencies).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
status=0

capability=$($PYTHON -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')")
arch=$([ "$capability" = "90" ] && echo "90a" || echo "$capability")
device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
date=$(date -u +%Y-%m-%d)
echo "device $device, sm_$arch" | tee "$OUT/device.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

FMKERNELS_CUDA=ON FMKERNELS_CUDA_ARCHITECTURES="$arch" \
  $PYTHON -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/build.log" 2>&1 || { echo "build failed"; tail -40 "$OUT/build.log"; exit 1; }
grep -E "ptxas info|spill" "$OUT/build.log" > "$OUT/ptxas.txt" || true

$PYTHON -m fmkernels backends | tee "$OUT/backends.txt"
$PYTHON -m pytest -m gpu -q -x tests > "$OUT/pytest-gpu.log" 2>&1 || status=1
tail -5 "$OUT/pytest-gpu.log"
$PYTHON -m fmkernels check --device cuda > "$OUT/check.log" 2>&1 || status=1
tail -3 "$OUT/check.log"

if command -v compute-sanitizer > /dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 1 $PYTHON -m pytest -m gpu -q -x tests \
    > "$OUT/memcheck.log" 2>&1 || status=1
  tail -3 "$OUT/memcheck.log"
fi

$PYTHON -m fmkernels bench --device cuda --json "$OUT/$date-bench.json" > "$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench.log"
echo "copy $OUT/$date-bench.json to bench/results/$device/ to keep it"
exit $status
