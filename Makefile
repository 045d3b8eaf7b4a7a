# One entry point for set-up, tests and benchmarks. `make setup` works offline on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch pinned for machines without a GPU. A GPU user installs CUDA torch into the
# venv first (see README) and runs `make setup TORCH_SPEC=` to keep it.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup test test-fast lint bench demo demo-quick gpu-check
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q $(TORCH_SPEC); fi
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	$(BIN)/python -m pip install -q -r requirements-audio.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -c "import config, torch, transformers, peft; print('setup ok: torch', torch.__version__)"

# A fresh clone sets itself up on first use; an existing .venv is used as it is.
$(BIN)/python:
	$(MAKE) setup

# The test command (CI runs exactly this).
test: $(BIN)/python
	$(OFFLINE) WANDB_MODE=disabled $(BIN)/python -m pytest -q

test-fast: $(BIN)/python
	$(OFFLINE) WANDB_MODE=disabled $(BIN)/python -m pytest -q -m "not slow"

# On a CUDA machine (< 8 min on one GPU): the gpu-marked tests, the trainer per precision at the
# official size, GradCache's re-run with dropout, extraction against the CPU, the GPU bench rows
# (bench/README.md, "GPU check"); report in results/gpu_check.json. Without CUDA it says so and
# runs its CPU parts.
gpu-check: $(BIN)/python
	$(OFFLINE) WANDB_MODE=disabled $(BIN)/python bench/gpu_check.py

# The embedded default: the whole pipeline offline on CPU (README, first lines). Outputs: data/demo/.
demo: $(BIN)/python
	$(OFFLINE) $(BIN)/python -m demo

# A smaller corpus and model and a few training steps: every output made and well formed (CI).
demo-quick: $(BIN)/python
	$(OFFLINE) $(BIN)/python -m demo --quick

lint:
	$(BIN)/ruff check .

bench:
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_preprocess.py
