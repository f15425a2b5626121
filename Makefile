# Everything installs into a local virtual environment; torch is pinned to the CPU build.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench constraints clean test-llama-cpp

# constraints.txt pins every dependency to the versions the suite last passed with.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/peftkit train

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests

# llama.cpp itself runs the GGUF files `peftkit export` writes (llama-cpp-python 0.3.36 builds it
# from source: 36 min measured with one compile job at nice 19 on a busy 2-core machine); kept out
# of `make test`'s installs and of the pinned constraints (the test skips without it).
test-llama-cpp: setup
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/pip install llama-cpp-python
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/cli/test_llama_cpp.py -s

bench: setup
	$(BIN)/python benchmarks/train_step.py

constraints: setup
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) out runs
