# One entry point for set-up, tests and benchmarks. `make setup` works offline on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch pinned for machines without a GPU. A GPU user installs CUDA torch into the
# venv first (see README) and runs `make setup TORCH_SPEC=` to keep it.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test test-fast lint bench
setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q $(TORCH_SPEC); fi
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import config, torch, transformers, peft; print('setup ok: torch', torch.__version__)"

# The test command (CI runs exactly this).
test:
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled $(BIN)/python -m pytest -q

test-fast:
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not slow"

lint:
	$(BIN)/ruff check .

bench:
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_preprocess.py
