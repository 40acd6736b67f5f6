# Every target sets up (or refreshes) .venv itself, so a fresh clone needs nothing but python3.
# `run` installs the package alone; `test`, `lint` and `bench` add the dev extras (Flower, pytest, ruff).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --constraint constraints.txt
# The pinned torch is the CPU build (2.13.0+cpu). Where pip cannot find it (PyPI serves only the CUDA
# builds), the install is retried with PyTorch's CPU index; point TORCH_INDEX at a mirror if needed.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: run test lint bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.core: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) --editable . || $(PIP) --extra-index-url $(TORCH_INDEX) --editable .
	touch $@

$(VENV)/.dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) --editable '.[dev]' || $(PIP) --extra-index-url $(TORCH_INDEX) --editable '.[dev]'
	touch $@ $(VENV)/.core

run: $(VENV)/.core
	$(BIN)/fedbabu compare --algorithms fedavg,fedbabu --out runs/default --overwrite

test: $(VENV)/.dev
	FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/python -m pytest

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests examples benchmarks

bench: $(VENV)/.dev
	$(BIN)/python benchmarks/round_throughput.py

# the documentation site (MkDocs + Material + mkdocstrings) into site/; --strict fails on any broken link
docs: $(VENV)/.dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache site
