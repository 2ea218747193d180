# Each target installs what it needs into .venv first, so it is the only command to type.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The pinned torch build (installed before the project so pip never fetches another one).
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO_DATA ?= data/demo

export DAGSTER_HOME := $(CURDIR)/.dagster
export MTMC_ARTIFACTS ?= artifacts

.PHONY: install demo test lint ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/mtmc demo-data $(DEMO_DATA)
	@start=$$(date +%s); \
	MTMC_DATA_ROOT=$(DEMO_DATA) $(BIN)/dagster asset materialize --select '*' -m assets.definitions; \
	rc=$$?; echo; echo "pipeline: $$(( $$(date +%s) - start )) s (exit code $$rc)"; exit $$rc
	@$(BIN)/mtmc summary --artifacts $(MTMC_ARTIFACTS)

test: install lint
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

ui: install
	MTMC_DATA_ROOT=$${MTMC_DATA_ROOT:-$(DEMO_DATA)} $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

clean:
	rm -rf artifacts data .pytest_cache
	find .dagster -mindepth 1 ! -name dagster.yaml -exec rm -rf {} +
