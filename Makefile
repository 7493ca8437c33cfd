# Set-up and entry points. Every target creates .venv if it is missing.
# GPU users: make test TORCH_REQ='torch' (or a CUDA wheel spec) to override the CPU build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_REQ ?= torch==2.13.0
# CIFAR-10 is found by experiments.data.resolve_cifar10_dir (CIFAR10_DIR if set, else a search).

.PHONY: venv test test-slow demo figures bench gpu-check clean-venv

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

# Promote what `make demo` (runs/demo) and `python -m experiments.notebooks --full` (runs/figures)
# wrote into the tracked figures/, with provenance (figures/provenance.json).
figures: venv
	$(PY) -m experiments.notebooks --promote

bench: $(VENV)/.bench-installed
	$(PY) -m benchmarks.run_all

# On a GPU machine, with its own python3 and torch (installs nothing; needs data_subset/ from
# `python -m benchmarks.pack_cifar_subset`): pytest -m cuda + the GPU benchmarks, <= 8 minutes.
OUT ?= runs/gpu_check
gpu-check:
	benchmarks/gpu_check.sh $(OUT)

clean-venv:
	rm -rf $(VENV)
