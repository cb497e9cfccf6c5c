# Self-documenting: every target with a `## comment` shows up in `make help`.
#
# Which Python: an active environment (VIRTUAL_ENV or CONDA_PREFIX set) is used as it is; otherwise
# every target runs in .venv/ in this folder, created on first use from $(PYTHON). Nothing is ever
# installed into the system Python (PEP 668, PIP_REQUIRE_VIRTUALENV). uv is used when it is on PATH
# (much faster installs), else venv + pip.
PYTHON ?= python3
DATASET ?= demo
HEAD ?= self_attention
FEATURES ?= cls
DATA_DIR ?=
TEXT_MODEL ?= bert-base-uncased
IMAGE_MODEL ?= facebook/dinov2-base
EXTRACT_ARGS ?=
TRAIN_ARGS ?=
ABLATE_ARGS ?=
TARGET ?=
TARGETS ?=
BENCH_ARGS ?= --preset small
# torch is installed first and pinned when the environment has none: the CPU build of this release
# lies on these machines' disk (pip's find-links); elsewhere set TORCH_INDEX, e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu, so that pip or uv does not pull a CUDA build.
TORCH_PIN ?= torch==2.13.0
TORCH_INDEX ?=

ifneq ($(VIRTUAL_ENV),)
  ENV_DIR := $(VIRTUAL_ENV)
else ifneq ($(CONDA_PREFIX),)
  ENV_DIR := $(CONDA_PREFIX)
else
  ENV_DIR := $(CURDIR)/.venv
  OWN_VENV := 1
endif
PY := $(ENV_DIR)/bin/python
UV := $(shell command -v uv 2>/dev/null)
ifneq ($(UV),)
  PIP_INSTALL = $(UV) pip install --python $(PY) $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
else
  PIP_INSTALL = $(PY) -m pip install -q
endif
# One stamp per interpreter: switching environments reinstalls there instead of failing on a stale stamp.
STAMP := .make/installed-$(shell printf '%s' '$(PY)' | cksum | cut -d' ' -f1)

.DEFAULT_GOAL := help
.PHONY: help install test test-fast lint docs demo extract cache-info train ablate bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: DATASET=$(DATASET) DATA_DIR=$(DATA_DIR) TEXT_MODEL=$(TEXT_MODEL) IMAGE_MODEL=$(IMAGE_MODEL)"
	@echo "             HEAD=$(HEAD) FEATURES=$(FEATURES) EXTRACT_ARGS=... TRAIN_ARGS=... ABLATE_ARGS=..."
	@echo "  python:    $(PY)$(if $(OWN_VENV), (created on first use))$(if $(UV), via uv)"

ifeq ($(OWN_VENV),1)
VENV_MARK := $(ENV_DIR)/pyvenv.cfg
$(VENV_MARK):
	@echo "creating $(ENV_DIR) (no virtual environment is active)"
	$(if $(UV),$(UV) venv --python $(PYTHON) $(ENV_DIR),$(PYTHON) -m venv $(ENV_DIR))
endif

# torch first and pinned when the environment has none: an unpinned `torch` would pull a multi-GB CUDA
# build on a CPU machine. An environment that already has a torch (a GPU box) keeps it.
$(STAMP): pyproject.toml $(VENV_MARK)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP_INSTALL) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
	$(PIP_INSTALL) -e ".[dev]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

install: $(STAMP) ## install the project and its dev tools (CPU torch if none is installed)

test: $(STAMP) ## run the test suite
	$(PY) -m pytest

test-fast: $(STAMP) ## the tests not marked slow (a quick check while editing; CI runs them all)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP) ## ruff
	$(PY) -m ruff check .

docs: $(STAMP) ## regenerate docs/cli.md from the --help of every command
	$(PY) -m mmcache.cli.docs > docs/cli.md

demo: $(STAMP) ## end to end on the built-in demo data with tiny local encoders (~1-2 min on CPU)
	$(PY) cli.py demo

extract: $(STAMP) ## extract features: make extract DATASET=memotion [DATA_DIR=...] [TEXT_MODEL=...] [IMAGE_MODEL=...]
	$(PY) cli.py extract --dataset $(DATASET) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
		--text-model $(TEXT_MODEL) --image-model $(IMAGE_MODEL) $(EXTRACT_ARGS)

cache-info: $(STAMP) ## every cache file: shapes, dtypes, sizes, provenance, completeness
	$(PY) cli.py cache info

train: $(STAMP) ## train one head: make train HEAD=dual_attention DATASET=memotion FEATURES=tokens [TARGET=task_b] [TRAIN_ARGS="--text-cache ... --epochs 50"]
	$(PY) cli.py train-fusion --head $(HEAD) --dataset $(DATASET) --features $(FEATURES) $(if $(TARGET),--target $(TARGET)) $(TRAIN_ARGS)

ablate: $(STAMP) ## ablation tables for every dataset that has caches [TARGETS=sentiment,task_b,task_c]
	$(PY) cli.py ablate $(if $(TARGETS),--targets $(TARGETS)) $(ABLATE_ARGS)

bench: $(STAMP) ## benchmark both stages; prints a table, writes bench/results.json
	$(PY) cli.py bench $(BENCH_ARGS)

clean: ## remove runs/, results/ and the install stamps (caches and .venv stay)
	rm -rf runs results .make
