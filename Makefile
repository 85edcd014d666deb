# Two commands on a fresh machine:  `make demo` (the main job)  and  `make test` (the test suite).
# Both create ./.venv on first use and install everything gemforge needs into it (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
STAMP := $(VENV)/.gemforge-installed
MODEL ?= models/tiny-random-codegemma
PYTEST_ARGS ?=

.PHONY: install demo test bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard CMakeLists.txt) $(wildcard csrc/*.cu csrc/*.cpp csrc/common/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "setuptools>=64" wheel "pybind11>=2.12" ninja
	$(PIP) torch==2.13.0 triton==3.9.0
	$(PIP) --no-build-isolation -e '.[serve,test]'
	touch $@

$(MODEL)/config.json:
	$(PY) scripts/make_tiny_model.py $(MODEL)

demo: $(STAMP) $(MODEL)/config.json
	$(VENV)/bin/gemforge generate --model $(MODEL) --prompt 'def fibonacci(n):' --max-tokens 32
	$(VENV)/bin/gemforge generate --model $(MODEL) --prompt 'def add(a, b):' --suffix '    return result' --max-tokens 32

test: $(STAMP)
	$(PY) -m pytest -q --benchmark-disable $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/gemforge bench --model $(MODEL)

clean-venv:
	rm -rf $(VENV)
