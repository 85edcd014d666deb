# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create ./.venv on first use and install everything gemforge needs into it (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.gemforge-installed
MODEL ?= models/nano-codegemma
DRAFT ?= models/nano-codegemma-draft
GF := $(VENV)/bin/gemforge
PYTEST_ARGS ?=

.PHONY: install demo test test-gpu-stack bench clean-venv

install: $(STAMP)

$(STAMP): Makefile pyproject.toml setup.py $(wildcard CMakeLists.txt) $(wildcard csrc/*.cu csrc/*.cpp csrc/*.h csrc/common/* csrc/cpu/* csrc/emu/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "setuptools>=64" wheel "pybind11>=2.12" ninja
	$(PIP) torch==2.13.0 triton==3.9.0
	$(PIP) --no-deps --upgrade --target $(VENV)/triton-3.6 triton==3.6.0  # the GPU machine's; tests compile for it
	$(PIP) --no-build-isolation -e '.[serve,test]'
	touch $@

demo: $(STAMP)
	@echo "== completion ($(MODEL))"
	$(GF) generate --model $(MODEL) --prompt $$'import os\n\n\ndef list_files(directory):\n    """Return the names of the files in directory."""\n' --max-tokens 40
	@echo "== infill: fill-in-the-middle between a prefix and a suffix"
	$(GF) generate --model $(MODEL) --prompt $$'class Person:\n    def __init__(self, name):\n' --suffix $$'        self.value = None\n' --max-tokens 8
	@echo "== speculative decoding: $(DRAFT) drafts, $(MODEL) verifies (same output as the target alone)"
	$(GF) generate --model $(MODEL) --draft-model $(DRAFT) --prompt $$'def read_file(path):\n    with open(path) as f:\n' --max-tokens 64

# PYTHONSAFEPATH: `-m` would put the working directory first on sys.path, where this repository's
# kernels/ folder shadows the `kernels` package that transformers imports (gemforge's is gemforge.kernels).
test: $(STAMP)
	PYTHONSAFEPATH=1 $(PY) -m pytest -q --benchmark-disable $(PYTEST_ARGS)

# The same tests under the GPU machine's torch and transformers (a ~5 GB download once; not part of CI).
test-gpu-stack: $(STAMP)
	bash scripts/gpu_stack_check.sh $(PYTEST_ARGS)

bench: $(STAMP)
	$(GF) bench --model $(MODEL) --draft $(DRAFT)

clean-venv:
	rm -rf $(VENV)
