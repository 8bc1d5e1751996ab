# `make demo` and `make test` set everything up on a fresh clone (Python >= 3.9 with venv; no GPU needed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The CPU build of torch that this project is developed and tested with; the package itself accepts any
# torch >= 2.1, so GPU users keep their CUDA build.
TORCH ?= torch==2.13.0

.PHONY: env demo lint test test-all bench clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	# deepbet (brain extractor, ships its weights) and pydeface (the average head used by the demo, reface
	# and deface) without their GUI and FSL/nipype dependencies.
	$(PIP) install -q --no-deps deepbet==1.0.2 pydeface==2.1.0
	$(PIP) install -q --no-deps trame-slicer==2.0.0
	$(PIP) install -q -e ".[test,train,eval]"
	touch $(STAMP)

demo: env
	$(VENV)/bin/mri-deidentify demo demo-output

# Lint: ruff (lint and format) on the engine, the module, tests, benchmarks and scripts; mypy on the engine
# (pyproject.toml).
lint: env
	$(VENV)/bin/ruff check MRIDeIdentify benchmarks scripts
	$(VENV)/bin/ruff format --check MRIDeIdentify benchmarks scripts
	$(VENV)/bin/mypy

test: env lint
	VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow $(PY) -m pytest -q -ra

test-all: env
	VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow $(PY) -m pytest -q -ra -m "slow or not slow"

bench: env
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
