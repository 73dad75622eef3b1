# The two commands of the README: `make demo` and `make test`. Both set up .venv on a bare machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch comes first and pinned: unpinned, pip resolves it to a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast bench bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

demo: install
	$(BIN)/topk-ds demo --out demo

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install
	$(BIN)/python bench/run_all.py

# On a CUDA machine, from bare: a venv with a CUDA torch the driver supports (bench/gpu_setup.sh), then
# bench/bench_gpu.py writes bench/results-gpu.md. Its CPU parts: python bench/bench_gpu.py --dry-run
bench-gpu:
	bash bench/gpu_setup.sh bench/bench_gpu.py

clean:
	rm -rf $(VENV) .venv-gpu *.egg-info
