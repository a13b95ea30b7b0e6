# Everything runs from the project's own virtual environment (.venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint bench segment-phantom clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch ships with the machine; any other version pulls CUDA (DEVELOPERS.md).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest -q -ra

bench: install
	$(BIN)/python -m bench.inference

# Generates a phantom lower-extremity CT, segments it with the shipped weights, prints Dice.
segment-phantom: install
	$(BIN)/dicom-node segment-phantom --seed 1001 --size small

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
