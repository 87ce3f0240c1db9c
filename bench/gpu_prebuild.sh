#!/usr/bin/env bash
# Before a call on a lent GPU machine, here, with no GPU: build fmkernels' wheel for that
# machine's Python and architecture, and read the CUDA kernels' ptxas report and SASS, so the
# call spends no device time compiling or disassembling.
#
#   bash bench/gpu_prebuild.sh          then name .gpu-wheel in the device call's carry
#
# The wheel lands in $WHEEL_DIR (default .gpu-wheel, git-ignored), with build.log, ptxas.txt
# (registers, shared memory, spills per kernel), resource-usage.txt and sass-summary.txt
# (bench/sass_summary.py: HGMMA/HMMA/LDSM/cp.async/TMA/16-byte/local-memory counts per kernel).
# `bench/gpu_check.sh build` installs it when its Python tag matches the machine's, the compiled
# sources (csrc/, CMakeLists.txt, pyproject.toml: compiled-sources.sha256) are those of the tree
# it runs in and both extensions import there, then puts the tree's Python files over the
# wheel's (so a Python change needs no new wheel); otherwise it builds from source.
#
# The GPU machine's python3 is 3.12 (../shared/GPU.md): PYTHON_FOR_GPU names the interpreter
# whose ABI to build for (default python3.12), ARCH the architecture (default 90a, Hopper).
# The extensions link no libtorch and the CUDA runtime statically, so the wheel does not care
# which torch is installed there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_FOR_GPU=${PYTHON_FOR_GPU:-python3.12}
ARCH=${ARCH:-90a}
WHEEL_DIR=${WHEEL_DIR:-.gpu-wheel}
VENV=build/gpu-prebuild-venv

if ! "$PYTHON_FOR_GPU" --version > /dev/null 2>&1; then
  # A pyenv shim answers `command -v` for a version that is installed but not selected.
  found=$(ls -d "$(pyenv root 2>/dev/null)"/versions/*/bin/"$PYTHON_FOR_GPU" 2>/dev/null | tail -1)
  [ -n "$found" ] || { echo "gpu_prebuild: $PYTHON_FOR_GPU not found (PYTHON_FOR_GPU: the GPU machine's Python)" >&2; exit 2; }
  PYTHON_FOR_GPU=$found
fi
test -x "$VENV/bin/python" || "$PYTHON_FOR_GPU" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c constraints/ci.txt scikit-build-core pybind11
rm -rf "$WHEEL_DIR"
mkdir -p "$WHEEL_DIR"
# The .cu files are compiled again each time, so ptxas reports on every kernel (the C++ is
# rebuilt only where it changed).
tag=$("$VENV/bin/python" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
rm -rf build/"$tag-$tag"-*/CMakeFiles/fmkernels_cuda_kernels.dir
start=$SECONDS
FMKERNELS_CUDA=ON FMKERNELS_CUDA_ARCHITECTURES="$ARCH" CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-Xptxas=-v" \
  "$VENV/bin/python" -m pip wheel --no-build-isolation --no-deps -v -w "$WHEEL_DIR" . > "$WHEEL_DIR/build.log" 2>&1 \
  || { tail -40 "$WHEEL_DIR/build.log"; exit 1; }
grep -E "ptxas info|spill|stack frame" "$WHEEL_DIR/build.log" > "$WHEEL_DIR/ptxas.txt" || true
find csrc CMakeLists.txt pyproject.toml -type f | sort | xargs sha256sum | sha256sum > "$WHEEL_DIR/compiled-sources.sha256"
wheel=$(ls "$WHEEL_DIR"/fmkernels-*.whl)
echo "built $wheel for sm_$ARCH in $((SECONDS - start)) s"

# The disassembler: the toolkit's, or the one Triton's wheel carries.
cuobjdump=$(command -v cuobjdump || ls .venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -1)
if [ -z "$cuobjdump" ]; then
  echo "no cuobjdump (CUDA toolkit, or triton's wheel in .venv): SASS not read" >&2
  exit 0
fi
unpacked=$(mktemp -d)
"$VENV/bin/python" -m zipfile -e "$wheel" "$unpacked"
module=$(ls "$unpacked"/fmkernels/_cuda*.so)
"$cuobjdump" --dump-resource-usage "$module" > "$WHEEL_DIR/resource-usage.txt" 2>&1
"$cuobjdump" --dump-sass "$module" | .venv/bin/python bench/sass_summary.py > "$WHEEL_DIR/sass-summary.txt"
rm -rf "$unpacked"
cat "$WHEEL_DIR/sass-summary.txt"
echo "spills: $(grep -c -E '[1-9][0-9]* bytes spill' "$WHEEL_DIR/ptxas.txt" || true) kernels with spill stores or loads (ptxas.txt)"
