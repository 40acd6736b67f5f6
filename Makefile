# Every target sets up (or refreshes) .venv itself, so a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/fedbabu compare --algorithms fedavg,fedbabu --out runs/default --overwrite

test: $(STAMP)
	FLWR_DISABLE_UPDATE_CHECK=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/round_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
