# Everything installs into a local virtual environment; torch is pinned to the CPU build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/peftkit train

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

bench: setup
	$(BIN)/python benchmarks/train_step.py

clean:
	rm -rf $(VENV) out runs
