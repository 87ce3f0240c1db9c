#!/usr/bin/env bash
# One call on a lent GPU machine: install, verify, measure, tune, writing logs and JSON under
# $OUT after every stage and a summary at the end of the output.
#
#   bash bench/gpu_check.sh all                 every stage of ALL_STAGES, within BUDGET_S
#   bash bench/gpu_check.sh [STAGE ...]         the stages named, in that order
#   FMKERNELS_GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh all
#                                               here, without a GPU: print every command with its
#                                               time limit and import its Python parts
#                                               (bench/gpu_check_dry_run.py); CI runs this
#
# Before the call, run `bash bench/gpu_prebuild.sh` here and carry .gpu-wheel: the build stage
# then installs that wheel instead of compiling (and the ptxas report and SASS were read here).
#
# Stages, in the order `all` runs them (value per device second: verify, then measure, then
# tune), each with its own time limit in seconds (LIMIT_<stage> overrides it), every limit cut
# to what is left of BUDGET_S (default 530 s: with the device query and the packing, the call
# fits in 9 minutes); a stage with under 10 s left is skipped and says so:
#   build     90   the prebuilt wheel of .gpu-wheel when it fits this machine, else pip install -e .
#                  for this GPU's architecture only, with ptxas's resource report
#   test      100  pytest -m gpu over $TESTS (default: tests), over $TEST_WORKERS processes
#   check     40   fmkernels check --device cuda ($CHECK_OPS: every op by default)
#   memcheck  60   the CUDA test files under compute-sanitizer memcheck, one process each
#   racecheck 30   the CUDA attention, decode and sampling tests under racecheck ($RACECHECK_FILTER)
#   fuzz      40   tests/test_fuzz.py's search on CUDA tensors under memcheck ($FUZZ_EXAMPLES, 8)
#   targets   90   bench/gpu_targets.py: decode against copy bandwidth, prefill against SDPA flash,
#                  masked against unmasked sampling, filter_logits against the reference
#   model     40   bench/model_generate.py on CUDA: tiny and llama-100m against transformers,
#                  decode with CUDA graphs on and off
#   sweep     30   fmkernels bench --sweep: attention, decode, append_kv against the SDPA peers
#                  ($SWEEP_GROUPS: "attention sampling")
#   variants  10   bench/cuda_attention_variants.py and bench/cuda_decode_variants.py
# Stages `all` leaves out: sass (the SASS summary, read here by gpu_prebuild.sh), masked
# (the masked-sampling tests and bench alone), bench (fmkernels bench --device cuda).
#
# Logs go to $OUT/logs.tgz and JSON to $OUT/results.tgz (the device tool returns at most 8
# files), both packed again after every stage, so a call cut off still returns what it did.
#
# The machine has its own python3 with torch, triton, pybind11 and scikit-build-core and
# no network: the install uses what is there (no build isolation, no dependencies).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
DRY_RUN=${FMKERNELS_GPU_CHECK_DRY_RUN:-}
[ "$DRY_RUN" = 0 ] && DRY_RUN=
WORK=$(mktemp -d)
LOGS=$WORK/logs
RESULTS=$WORK/results
mkdir -p "$LOGS" "$RESULTS" "$OUT"
PYTHON=${PYTHON:-python3}
TESTS=${TESTS:-tests}
WHEEL_DIR=${WHEEL_DIR:-.gpu-wheel}
BUDGET_S=${BUDGET_S:-530}
export PYTHONUNBUFFERED=1

ALL_STAGES=(build test check memcheck racecheck fuzz targets model sweep variants)
declare -A LIMIT=([build]=90 [test]=100 [check]=40 [memcheck]=60 [racecheck]=30 [fuzz]=40 [targets]=90
                  [model]=40 [sweep]=30 [variants]=10 [sass]=30 [masked]=60 [bench]=60)

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build sass test memcheck check bench)
[ "${stages[*]}" = all ] && stages=("${ALL_STAGES[@]}")
for stage in "${stages[@]}"; do  # a misspelt stage ends the call before it spends anything
  [ -n "${LIMIT[$stage]:-}" ] || { echo "gpu_check: unknown stage $stage (known: all ${!LIMIT[*]})" >&2; exit 2; }
done
[ -n "$DRY_RUN" ] && : > "$WORK/dry-run-commands"
summary=()
status=0
# The clock the limits are cut by: seconds since the start; in a dry run, only as if every
# command had run to its limit (the dry run's own seconds are this host's, not the device's, and
# a loaded host must not push the last stages out of the budget), so the dry run shows which
# stages a slow call would still reach.
DRY_CLOCK=0
now() { if [ -n "$DRY_RUN" ]; then echo "$DRY_CLOCK"; else echo "$SECONDS"; fi; }
deadline=$(($(now) + BUDGET_S))

note() {  # note STAGE RC TEXT: one summary line; a failure marks the run
  local verdict
  case $2 in 0) verdict=ok ;; skipped) verdict=skipped ;; 124 | 137) verdict="TIMED-OUT" ;; *) verdict="FAILED($2)" ;; esac
  summary+=("$(printf '%-9s %-9s %s' "$1" "$verdict" "$3")")
  [ "$2" = 0 ] || [ "$2" = skipped ] || status=1
}

# run LOG SECONDS CMD...: CMD under a time limit, its output appended to $LOGS/LOG; CMD's
# status (124 when the limit stopped it). In a dry run, CMD is printed and listed for
# bench/gpu_check_dry_run.py instead.
run() {
  local log=$1 seconds=$2
  shift 2
  if [ -n "$DRY_RUN" ]; then
    echo "+ [${seconds} s] $*"
    printf '%q ' "$@" >> "$WORK/dry-run-commands"
    echo >> "$WORK/dry-run-commands"
    DRY_CLOCK=$((DRY_CLOCK + seconds))
    return 0
  fi
  timeout -k 10 "$seconds" "$@" >> "$LOGS/$log" 2>&1
}

share() {  # share INDEX COUNT: the seconds the stage has left, split over its COUNT - INDEX remaining parts
  echo $(((limit - ($(now) - start)) / ($2 - $1)))
}

show() {  # show FILE [grep -E pattern]: the file (or its matching lines), where a real run wrote it
  [ -n "$DRY_RUN" ] || [ ! -f "$1" ] && return 0
  if [ $# -gt 1 ]; then grep -m 30 -E "$2" "$1"; else cat "$1"; fi
}

tests_reported() {  # tests_reported LOG: pytest's last line, or (cut off) the outcomes printed so far
  [ -n "$DRY_RUN" ] && { echo "dry run"; return; }
  local last
  last=$(tail -1 "$LOGS/$1" 2>/dev/null)
  case $last in
    *" in "*s*) echo "$last" ;;
    *) echo "cut off: $(grep -c ' PASSED' "$LOGS/$1") passed, $(grep -cE ' (FAILED|ERROR)' "$LOGS/$1") failed so far" ;;
  esac
}

if [ -n "$DRY_RUN" ]; then
  capability=90 device=dry-run
else
  capability=$($PYTHON -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}{minor}')")
  device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
fi
arch=$([ "$capability" = "90" ] && echo "90a" || echo "$capability")
date=$(date -u +%Y-%m-%d)
if [ -z "$DRY_RUN" ]; then
  echo "device $device, sm_$arch, $($PYTHON -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')" | tee "$LOGS/device.txt"
  nvidia-smi >> "$LOGS/device.txt" 2>&1
fi

cuda_tests() { ls tests/test_cuda_*.py 2>/dev/null; echo tests/test_append_kv.py; }

workers() {  # pytest-xdist's option for N processes, where xdist is installed
  [ -z "$DRY_RUN" ] && $PYTHON -c "import xdist" 2>/dev/null && echo "-n $1"
}

# The wheel gpu_prebuild.sh made, where it is for this Python, was compiled from this tree's
# csrc/ and imports here; the tree's Python files then replace the wheel's.
install_prebuilt() {
  local tag wheel site
  tag=$($PYTHON -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  wheel=$(ls "$WHEEL_DIR"/fmkernels-*-"$tag"-*.whl 2>/dev/null | head -1)
  [ -n "$wheel" ] || { echo "no $tag wheel in $WHEEL_DIR"; return 1; }
  find csrc CMakeLists.txt pyproject.toml -type f | sort | xargs sha256sum | sha256sum \
    | cmp -s - "$WHEEL_DIR/compiled-sources.sha256" || { echo "$wheel: csrc/ changed since it was built"; return 1; }
  $PYTHON -m pip install --no-build-isolation --no-deps --force-reinstall "$wheel" || return 1
  site=$(cd /tmp && $PYTHON -c "import fmkernels._C, fmkernels._cuda, os; print(os.path.dirname(fmkernels._C.__file__))") \
    || return 1
  cp -r python/fmkernels/. "$site/" && cp kernels/*.py "$site/kernels/" && echo "installed $wheel, this tree's Python in $site"
}

for stage in "${stages[@]}"; do
  start=$(now)
  left=$((deadline - start))
  limit=${LIMIT[$stage]:-60}
  override=LIMIT_$stage
  limit=${!override:-$limit}
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    note "$stage" skipped "out of budget: ${left} s of BUDGET_S=$BUDGET_S left"
    continue
  fi
  echo "== $stage (limit $limit s)"
  case $stage in
    build)
      rc=1
      if [ -n "$DRY_RUN" ]; then
        echo "+ pip install $WHEEL_DIR/fmkernels-*-cp3XX-*.whl where it is this Python's and imports; else:"
      elif [ -d "$WHEEL_DIR" ]; then
        install_prebuilt >> "$LOGS/build.log" 2>&1 && rc=0 && cp "$WHEEL_DIR"/*.txt "$LOGS/" 2>/dev/null
      fi
      how="prebuilt wheel"
      if [ $rc != 0 ]; then
        how="built here"
        run build.log $((limit - 20 - ($(now) - start))) env FMKERNELS_CUDA=ON FMKERNELS_CUDA_ARCHITECTURES="$arch" \
          CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-Xptxas=-v" $PYTHON -m pip install --no-build-isolation --no-deps -v -e .
        rc=$?
        [ -z "$DRY_RUN" ] && grep -E "ptxas info|spill|stack frame" "$LOGS/build.log" > "$LOGS/ptxas.txt"
      fi
      [ $rc = 0 ] || { show "$LOGS/build.log" .; note build $rc "see build.log"; break; }
      run device.txt 20 $PYTHON -m fmkernels backends
      show "$LOGS/device.txt" "available|unavailable"
      note build 0 "$how, $(($(now) - start)) s"
      ;;
    sass)
      module=$([ -n "$DRY_RUN" ] || $PYTHON -c "import fmkernels._cuda as m; print(m.__file__)")
      run resource-usage.txt "$limit" cuobjdump --dump-resource-usage "$module"
      run sass-summary.txt "$limit" bash -c "cuobjdump --dump-sass $module | $PYTHON bench/sass_summary.py"
      rc=$?
      show "$LOGS/sass-summary.txt"
      note sass $rc "resource-usage.txt, sass-summary.txt"
      ;;
    test)
      # Triton compiles each kernel variant on first use: spread the tests over a few processes
      # (16 at once ran the full-size cases out of the H100's 80 GB). -v: a run cut off at its
      # limit still shows each finished test's outcome.
      run pytest-gpu.log "$limit" $PYTHON -m pytest -m gpu -v -p no:cacheprovider --durations=15 \
        $(workers "${TEST_WORKERS:-6}") $TESTS
      rc=$?
      show "$LOGS/pytest-gpu.log" "^(FAILED|ERROR)"
      note test $rc "$(tests_reported pytest-gpu.log)"
      ;;
    memcheck)
      # One process per test file, so no file inherits another's GPU memory, each given an equal
      # share of the stage's time; $MEMCHECK_FILTER (a pytest -k expression) narrows the cases.
      rc=0
      files=($(cuda_tests))
      for index in "${!files[@]}"; do
        file=${files[$index]}
        share=$(share "$index" ${#files[@]})
        filter=${MEMCHECK_FILTER:-}
        [ "$file" = tests/test_append_kv.py ] && filter="cuda${filter:+ and ($filter)}"
        run memcheck.log "$share" compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
          $PYTHON -m pytest -m gpu -q -p no:cacheprovider ${filter:+-k "$filter"} "$file" || rc=$?
        [ -z "$DRY_RUN" ] && echo "$file: $(grep -E 'ERROR SUMMARY' "$LOGS/memcheck.log" | tail -1) $(tail -1 "$LOGS/memcheck.log")"
      done
      show "$LOGS/memcheck.log" "Invalid|out of bounds"
      note memcheck $rc "$([ -n "$DRY_RUN" ] || grep -c 'ERROR SUMMARY: 0 errors' "$LOGS/memcheck.log") clean of ${#files[@]} files"
      ;;
    racecheck)
      # Only fmkernels' kernels are checked (the reference's cuBLAS calls are not ours to judge).
      race_files=$(ls tests/test_cuda_attention.py tests/test_cuda_decode_attention.py tests/test_cuda_sampling.py 2>/dev/null)
      run racecheck.log "$limit" compute-sanitizer --tool racecheck --kernel-name kns=fmkernels --error-exitcode 1 \
        --print-limit 20 $PYTHON -m pytest -m gpu -q -x -p no:cacheprovider -k "${RACECHECK_FILTER:-not large}" $race_files
      rc=$?
      show "$LOGS/racecheck.log" "hazard|RACECHECK SUMMARY"
      note racecheck $rc "$([ -n "$DRY_RUN" ] || grep -E 'RACECHECK SUMMARY' "$LOGS/racecheck.log" | tail -1) $(tests_reported racecheck.log)"
      ;;
    fuzz)
      # The property-based tests' calls drawn on CUDA tensors: every backend that runs on them held
      # to the reference, and invalid calls refused before anything is written.
      run fuzz-memcheck.log "$limit" env FMKERNELS_FUZZ_DEVICE=cuda FMKERNELS_HYPOTHESIS_PROFILE=fuzz \
        FMKERNELS_FUZZ_EXAMPLES="${FUZZ_EXAMPLES:-8}" compute-sanitizer --tool memcheck --error-exitcode 1 \
        --print-limit 20 $PYTHON -m pytest -q -p no:cacheprovider tests/test_fuzz.py
      rc=$?
      show "$LOGS/fuzz-memcheck.log" "Invalid|out of bounds|^(FAILED|ERROR)"
      note fuzz $rc "$([ -n "$DRY_RUN" ] || grep -E 'ERROR SUMMARY' "$LOGS/fuzz-memcheck.log" | tail -1) $(tests_reported fuzz-memcheck.log)"
      ;;
    check)
      run check.log "$limit" $PYTHON -m fmkernels check --device cuda ${CHECK_OPS:-}
      rc=$?
      show "$LOGS/check.log" "fail|error"
      note check $rc "$([ -n "$DRY_RUN" ] || tail -1 "$LOGS/check.log")"
      ;;
    targets)
      run targets.log "$limit" $PYTHON bench/gpu_targets.py --repeats "${TARGET_REPEATS:-20}" \
        --json "$RESULTS/$date-gpu-targets.json"
      rc=$?
      show "$LOGS/targets.log" "^target|yes|NO"
      # 3: measured, and some target is not met (the table says which); not a failed stage.
      met=""
      [ $rc = 3 ] && rc=0 && met="(not every target met)"
      note targets $rc "$date-gpu-targets.json $met"
      ;;
    model)
      run model.log "$limit" $PYTHON bench/model_generate.py --device cuda --backend auto \
        --configs "${MODEL_CONFIGS:-tiny,llama-100m}" --dtypes bfloat16 --batches 1,8 --prompt-len 256 \
        --new-tokens 64 --repeats 2 --peers transformers --cuda-graphs on,off \
        --json "$RESULTS/$date-model-generate-cuda.json"
      rc=$?
      show "$LOGS/model.log"
      note model $rc "$date-model-generate-cuda.json"
      ;;
    variants)
      # The CUDA kernels' schedules side by side (each script prints one compact table).
      rc=0
      scripts=(cuda_attention_variants cuda_decode_variants)
      for index in "${!scripts[@]}"; do
        script=${scripts[$index]}
        run "$script.log" "$(share "$index" ${#scripts[@]})" $PYTHON bench/$script.py \
          --repeats "${VARIANT_REPEATS:-10}" --json "$RESULTS/$date-$script.json" || rc=$?
        show "$LOGS/$script.log"
      done
      note variants $rc "$date-cuda_*_variants.json"
      ;;
    masked)
      run masked-tests.log $((limit / 2)) $PYTHON -m pytest -q -p no:cacheprovider tests/test_triton_allowed.py \
        tests/test_sampling_allowed.py tests/test_triton_sampling.py
      rc=$?
      show "$LOGS/masked-tests.log" "^(FAILED|ERROR)"
      note masked $rc "$(tests_reported masked-tests.log)"
      run masked-bench.log $((limit - ($(now) - start))) $PYTHON bench/masked_sampling.py --device cuda \
        --kernel-only --rounds "${MASKED_ROUNDS:-6}" --json "$RESULTS/$date-masked_sampling.json"
      rc=$?
      show "$LOGS/masked-bench.log"
      note masked-bench $rc "$date-masked_sampling.json"
      ;;
    bench)
      run bench.log "$limit" $PYTHON -m fmkernels bench --device cuda --json "$RESULTS/$date-bench.json"
      rc=$?
      show "$LOGS/bench.log"
      note bench $rc "$date-bench.json"
      ;;
    sweep)
      rc=0
      groups=()
      for group in "attention decode_attention append_kv|cuda,triton,triton_hopper,sdpa,sdpa_flash,sdpa_cudnn|attention" \
                   "filter_logits sample|cuda,triton,reference|sampling"; do
        [[ " ${SWEEP_GROUPS:-attention sampling} " == *" ${group##*|} "* ]] && groups+=("$group")
      done
      for index in "${!groups[@]}"; do
        IFS="|" read -r ops only name <<< "${groups[$index]}"
        run "sweep-$name.log" "$(share "$index" ${#groups[@]})" $PYTHON -m fmkernels bench $ops --device cuda \
          --sweep --only "$only" --repeats "${SWEEP_REPEATS:-10}" --json "$RESULTS/$date-sweep-$name.json" || rc=$?
        show "$LOGS/sweep-$name.log"
      done
      note sweep $rc "$date-sweep-*.json"
      ;;
  esac
  echo "== $stage: $(($(now) - start)) s"
  [ -z "$DRY_RUN" ] && tar czf "$OUT/logs.tgz" -C "$WORK" logs && tar czf "$OUT/results.tgz" -C "$WORK" results
done

if [ -n "$DRY_RUN" ]; then
  # Every command's Python parts imported here: its scripts, pytest's selection, the CLI's arguments.
  $PYTHON bench/gpu_check_dry_run.py "$WORK/dry-run-commands" || status=1
else
  tar czf "$OUT/logs.tgz" -C "$WORK" logs
  tar czf "$OUT/results.tgz" -C "$WORK" results
fi
echo "== summary ($device, sm_$arch, $((SECONDS)) s; unpack results.tgz into bench/results/$device/ to keep it)"
printf '%s\n' "${summary[@]}"
exit $status
