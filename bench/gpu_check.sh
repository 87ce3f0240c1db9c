#!/usr/bin/env bash
# One call on a lent GPU machine: build for its architecture, test, sanitize and benchmark,
# writing logs and JSON under $OUT and a summary at the end of the output.
#
#   bash bench/gpu_check.sh [STAGE ...]        (OUT defaults to ./gpu-out)
#
# Stages, run in the order given (default: build sass test memcheck check bench):
#   build     pip install -e . for this GPU's architecture only, with ptxas's resource report
#   sass      per-kernel registers/shared memory/spills and the matrix instructions in the SASS
#   test      pytest -m gpu over $TESTS (default: tests)
#   memcheck  the CUDA backend's GPU tests under compute-sanitizer memcheck
#   racecheck the CUDA kernels' GPU tests ($RACECHECK_FILTER) under compute-sanitizer racecheck
#   fuzz      tests/test_fuzz.py's search on CUDA tensors under compute-sanitizer memcheck
#             ($FUZZ_EXAMPLES examples per test, 25 by default; a fresh random seed each run)
#   variants  bench/cuda_attention_variants.py and bench/cuda_decode_variants.py
#   masked    the allowed= bitmask sampling paths (triton, cuda) on CUDA tensors (tests/test_triton_allowed.py,
#             tests/test_sampling_allowed.py, tests/test_triton_sampling.py), then
#             bench/masked_sampling.py: masked against unmasked sample, vocab 128256, batch 1-256
#   check     fmkernels check --device cuda ($CHECK_OPS: every op by default)
#   bench     fmkernels bench --device cuda (one default shape per op, every implementation)
#   sweep     fmkernels bench --device cuda --sweep: attention, decode and append_kv against the
#             SDPA peers and triton; sampling against the sort-based reference and triton
#             ($SWEEP_GROUPS: "attention sampling" by default)
#
# Logs go to $OUT/logs.tgz (the device tool returns at most 8 files); JSON beside it.
#
# The machine has its own python3 with torch, triton, pybind11 and scikit-build-core and
# no network: the install uses what is there (no build isolation, no dependencies).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
# Logs are written outside $OUT and packed into $OUT/logs.tgz after every stage, so a call
# cut short still returns what the finished stages wrote.
LOGS=${LOGS:-$(mktemp -d)/logs}
mkdir -p "$LOGS" "$OUT"
PYTHON=${PYTHON:-python3}
TESTS=${TESTS:-tests}
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build sass test memcheck check bench)
summary=()
status=0

note() {  # note STAGE RC TEXT: one summary line, and a failure marks the run
  summary+=("$(printf '%-9s %s %s' "$1" "$([ "$2" = 0 ] && echo ok || echo "FAILED($2)")" "$3")")
  [ "$2" = 0 ] || status=1
}

capability=$($PYTHON -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')")
arch=$([ "$capability" = "90" ] && echo "90a" || echo "$capability")
device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
date=$(date -u +%Y-%m-%d)
echo "device $device, sm_$arch, $($PYTHON -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')" | tee "$LOGS/device.txt"
nvidia-smi >> "$LOGS/device.txt" 2>&1

cuda_tests() { ls tests/test_cuda_*.py 2>/dev/null; echo tests/test_append_kv.py; }

for stage in "${stages[@]}"; do
  start=$SECONDS
  case $stage in
    build)
      FMKERNELS_CUDA=ON FMKERNELS_CUDA_ARCHITECTURES="$arch" CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-Xptxas=-v" \
        $PYTHON -m pip install --no-build-isolation --no-deps -v -e . > "$LOGS/build.log" 2>&1
      rc=$?
      grep -E "ptxas info|spill|stack frame" "$LOGS/build.log" > "$LOGS/ptxas.txt"
      [ $rc = 0 ] || { tail -40 "$LOGS/build.log"; note build $rc "see build.log"; break; }
      $PYTHON -m fmkernels backends | tee -a "$LOGS/device.txt"
      note build 0 "$((SECONDS - start)) s"
      ;;
    sass)
      module=$($PYTHON -c "import fmkernels._cuda as m; print(m.__file__)")
      cuobjdump --dump-resource-usage "$module" > "$LOGS/resource-usage.txt" 2>&1
      cuobjdump --dump-sass "$module" | $PYTHON bench/sass_summary.py > "$LOGS/sass-summary.txt" 2>&1
      rc=$?
      cat "$LOGS/sass-summary.txt"
      note sass $rc "resource-usage.txt, sass-summary.txt"
      ;;
    test)
      # Triton compiles each kernel variant on first use: spread the tests over a few processes
      # (16 at once ran the full-size cases out of the H100's 80 GB).
      workers=$($PYTHON -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-4}")
      timeout ${TEST_TIMEOUT:-900} $PYTHON -m pytest -m gpu -q -p no:cacheprovider $workers $TESTS > "$LOGS/pytest-gpu.log" 2>&1
      rc=$?
      grep -E "^(FAILED|ERROR)" "$LOGS/pytest-gpu.log" | head -30
      note test $rc "$(tail -1 "$LOGS/pytest-gpu.log")"
      ;;
    memcheck)
      # One process per test file, so no file inherits another's GPU memory; $MEMCHECK_FILTER
      # (a pytest -k expression) narrows the cases.
      rc=0
      for file in $(cuda_tests); do
        filter=${MEMCHECK_FILTER:-}
        [ "$file" = tests/test_append_kv.py ] && filter="cuda"
        timeout 900 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
          $PYTHON -m pytest -m gpu -q -p no:cacheprovider ${filter:+-k "$filter"} "$file" >> "$LOGS/memcheck.log" 2>&1 || rc=$?
        echo "$file: $(grep -E 'ERROR SUMMARY' "$LOGS/memcheck.log" | tail -1) $(tail -1 "$LOGS/memcheck.log")"
      done
      grep -m 20 -E "Invalid|out of bounds" "$LOGS/memcheck.log"
      note memcheck $rc "$(grep -c 'ERROR SUMMARY: 0 errors' "$LOGS/memcheck.log") clean files"
      ;;
    racecheck)
      # Only fmkernels' kernels are checked (the reference's cuBLAS calls are not ours to judge).
      targets=$(ls tests/test_cuda_attention.py tests/test_cuda_decode_attention.py tests/test_cuda_sampling.py 2>/dev/null)
      timeout 900 compute-sanitizer --tool racecheck --kernel-name kns=fmkernels --error-exitcode 1 --print-limit 20 \
        $PYTHON -m pytest -m gpu -q -x -p no:cacheprovider -k "${RACECHECK_FILTER:-not large}" $targets \
        > "$LOGS/racecheck.log" 2>&1
      rc=$?
      grep -m 20 -E "hazard|RACECHECK SUMMARY" "$LOGS/racecheck.log"
      note racecheck $rc "$(grep -E 'RACECHECK SUMMARY' "$LOGS/racecheck.log" | tail -1) $(tail -1 "$LOGS/racecheck.log")"
      ;;
    fuzz)
      # The property-based tests' calls drawn on CUDA tensors: every backend that runs on them held
      # to the reference, and invalid calls refused before anything is written.
      FMKERNELS_FUZZ_DEVICE=cuda FMKERNELS_HYPOTHESIS_PROFILE=fuzz FMKERNELS_FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-25} \
        timeout ${FUZZ_TIMEOUT:-900} compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
        $PYTHON -m pytest -q -p no:cacheprovider tests/test_fuzz.py > "$LOGS/fuzz-memcheck.log" 2>&1
      rc=$?
      grep -m 20 -E "Invalid|out of bounds|^(FAILED|ERROR)" "$LOGS/fuzz-memcheck.log"
      note fuzz $rc "$(grep -E 'ERROR SUMMARY' "$LOGS/fuzz-memcheck.log" | tail -1) $(tail -1 "$LOGS/fuzz-memcheck.log")"
      ;;
    variants)
      # The CUDA kernels' schedules side by side (each script prints one compact table).
      rc=0
      for script in cuda_attention_variants cuda_decode_variants; do
        timeout 300 $PYTHON bench/$script.py --repeats "${VARIANT_REPEATS:-20}" --json "$OUT/$date-$script.json" \
          > "$LOGS/$script.log" 2>&1 || rc=$?
        cat "$LOGS/$script.log"
      done
      note variants $rc "$OUT/$date-cuda_*_variants.json"
      ;;
    masked)
      timeout ${MASKED_TIMEOUT:-300} $PYTHON -m pytest -q -p no:cacheprovider tests/test_triton_allowed.py \
        tests/test_sampling_allowed.py tests/test_triton_sampling.py > "$LOGS/masked-tests.log" 2>&1
      rc=$?
      grep -E "^(FAILED|ERROR)" "$LOGS/masked-tests.log" | head -20
      note masked $rc "$(tail -1 "$LOGS/masked-tests.log")"
      timeout ${MASKED_TIMEOUT:-300} $PYTHON bench/masked_sampling.py --device cuda --kernel-only \
        --rounds "${MASKED_ROUNDS:-6}" --json "$OUT/$date-masked_sampling.json" > "$LOGS/masked-bench.log" 2>&1
      rc=$?
      cat "$LOGS/masked-bench.log"
      note masked-bench $rc "$OUT/$date-masked_sampling.json"
      ;;
    check)
      timeout 600 $PYTHON -m fmkernels check --device cuda ${CHECK_OPS:-} > "$LOGS/check.log" 2>&1
      rc=$?
      grep -E "fail|error" "$LOGS/check.log" | grep -v " pass " | head -20
      note check $rc "$(tail -1 "$LOGS/check.log")"
      ;;
    bench)
      timeout 600 $PYTHON -m fmkernels bench --device cuda --json "$OUT/$date-bench.json" > "$LOGS/bench.log" 2>&1
      rc=$?
      cat "$LOGS/bench.log"
      note bench $rc "$OUT/$date-bench.json"
      ;;
    sweep)
      rc=0
      for group in "attention decode_attention append_kv|cuda,triton,sdpa,sdpa_flash,sdpa_cudnn|attention" \
                   "filter_logits sample|cuda,triton,reference|sampling"; do
        IFS="|" read -r ops only name <<< "$group"
        [[ " ${SWEEP_GROUPS:-attention sampling} " == *" $name "* ]] || continue
        timeout 900 $PYTHON -m fmkernels bench $ops --device cuda --sweep --only "$only" \
          --repeats "${SWEEP_REPEATS:-30}" --json "$OUT/$date-sweep-$name.json" > "$LOGS/sweep-$name.log" 2>&1 || rc=$?
        cat "$LOGS/sweep-$name.log"
      done
      note sweep $rc "$OUT/$date-sweep-*.json"
      ;;
    *)
      note "$stage" 2 "unknown stage"
      ;;
  esac
  echo "== $stage: $((SECONDS - start)) s"
  tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" logs
done

tar czf "$OUT/logs.tgz" -C "$(dirname "$LOGS")" logs
echo "== summary ($device, sm_$arch; copy JSON to bench/results/$device/ to keep it)"
printf '%s\n' "${summary[@]}"
exit $status
