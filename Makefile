# Self-documenting: every target with a `## comment` shows up in `make help`.
PYTHON ?= python3
DATASET ?= demo
HEAD ?= self_attention
FEATURES ?= cls
DATA_DIR ?=
TEXT_MODEL ?= bert-base-uncased
IMAGE_MODEL ?= facebook/dinov2-base
EXTRACT_ARGS ?=
ABLATE_ARGS ?=
TARGET ?=
TARGETS ?=
BENCH_ARGS ?= --preset small
STAMP := .make/installed

.DEFAULT_GOAL := help
.PHONY: help install test lint demo extract cache-info train ablate bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: DATASET=$(DATASET) DATA_DIR=$(DATA_DIR) TEXT_MODEL=$(TEXT_MODEL) IMAGE_MODEL=$(IMAGE_MODEL)"

# torch first and pinned: an unpinned `torch` would pull a multi-GB CUDA build on a CPU machine.
# A machine that already has a torch (a GPU box) keeps it.
$(STAMP): pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[dev]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

install: $(STAMP) ## install the project and its dev tools (CPU torch if none is installed)

test: $(STAMP) ## run the test suite
	$(PYTHON) -m pytest

lint: $(STAMP) ## ruff
	$(PYTHON) -m ruff check .

demo: $(STAMP) ## end to end on the built-in demo data with tiny local encoders (~1-2 min on CPU)
	$(PYTHON) cli.py demo

extract: $(STAMP) ## extract features: make extract DATASET=memotion [DATA_DIR=...] [TEXT_MODEL=...] [IMAGE_MODEL=...]
	$(PYTHON) cli.py extract --dataset $(DATASET) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) \
		--text-model $(TEXT_MODEL) --image-model $(IMAGE_MODEL) $(EXTRACT_ARGS)

cache-info: $(STAMP) ## every cache file: shapes, dtypes, sizes, provenance, completeness
	$(PYTHON) cli.py cache info

train: $(STAMP) ## train one head: make train HEAD=dual_attention DATASET=memotion FEATURES=tokens [TARGET=task_b]
	$(PYTHON) cli.py train-fusion --head $(HEAD) --dataset $(DATASET) --features $(FEATURES) $(if $(TARGET),--target $(TARGET))

ablate: $(STAMP) ## ablation tables for every dataset that has caches [TARGETS=sentiment,task_b,task_c]
	$(PYTHON) cli.py ablate $(if $(TARGETS),--targets $(TARGETS)) $(ABLATE_ARGS)

bench: $(STAMP) ## benchmark both stages; prints a table, writes bench/results.json
	$(PYTHON) cli.py bench $(BENCH_ARGS)

clean: ## remove runs/, results/ and the install stamp (caches stay)
	rm -rf runs results .make
