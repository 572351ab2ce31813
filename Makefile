# privgrad — every target does its own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]" torch==2.13.0
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/privgrad train --out runs/demo --overwrite

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples

bench: $(STAMP)
	$(PY) benchmarks/run.py
	$(PY) benchmarks/accounting_bench.py
	cd benchmarks && ../$(PY) conv_norms_bench.py
	$(PY) benchmarks/train_accuracy.py
	cd benchmarks && ../$(PY) distributed_bench.py

clean:
	rm -rf $(VENV)
