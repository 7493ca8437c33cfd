# Set-up and entry points. Every target creates .venv if it is missing.
# GPU users: make test TORCH_REQ='torch' (or a CUDA wheel spec) to override the CPU build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_REQ ?= torch==2.13.0
CIFAR10_DIR ?= $(abspath ../shared/data)
export CIFAR10_DIR

.PHONY: venv test test-slow demo bench clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_REQ)"
	$(PY) -m pip install --quiet -e '.[dev,notebooks]'
	touch $@

$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev,notebooks,bench]'
	touch $@

test: venv
	$(PY) -m pytest

test-slow: venv
	$(PY) -m pytest -m slow

demo: venv
	$(PY) -m experiments.demo

bench: $(VENV)/.bench-installed
	$(PY) -m benchmarks.run_all

clean-venv:
	rm -rf $(VENV)
