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

.PHONY: run test check bench install clean

run: $(INSTALLED)
	$(VENV)/bin/fmkernels check
	$(VENV)/bin/fmkernels bench

test: $(INSTALLED)
	$(PY) -m pytest -q

check: $(INSTALLED)
	$(VENV)/bin/fmkernels check

bench: $(INSTALLED)
	$(VENV)/bin/fmkernels bench

install: $(INSTALLED)

$(BUILD_TOOLS): $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(CONSTRAINTS) scikit-build-core pybind11
	touch $@

# The editable install rebuilds the extensions when a C++/CUDA or build file changes;
# Python and Triton sources are used in place.
$(INSTALLED): $(BUILD_TOOLS) $(BUILD_SOURCES)
	$(PIP) install -q --no-build-isolation -c $(CONSTRAINTS) -e ".[test]"
	touch $@

clean:
	rm -rf build $(VENV)
