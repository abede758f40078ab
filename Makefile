# Two entry points for a fresh machine: `make repro` and `make test`. Both create or reuse .venv and
# install everything from this project's own files: torch first (the CPU build on this machine's disk,
# so nothing pulls a CUDA build), then the pinned requirements.lock, then ssltk itself.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.ssltk-installed
TORCH := torch==2.13.0
export PATH := $(BIN):$(PATH)
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup repro test lint format bench gpu-check screenshots clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

## The main job: the DVC pipeline on the embedded demo data, ending in a report (set-up included
## in the wall time it prints).
repro:
	@start=$$(date +%s) && $(MAKE) --no-print-directory setup && dvc repro && dvc status && \
	awk '/^## (Pre-logits|Best layer)/{on=1} /^## (Pretext|The paper)/{on=0} on' reports/results.md && \
	echo "make repro: wall time $$(( $$(date +%s) - start )) s (reports/results.md, reports/*.png)"

## The whole test suite (Triton kernels run under its CPU interpreter).
test: setup
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Every benchmark in benchmarks/, collected into reports/benchmarks.md.
bench: setup
	$(BIN)/python benchmarks/run_all.py --out reports/benchmarks.md

## After `make repro`: the MLflow UI's runs table and compare view and the `dvc plots show` page,
## in headless Chromium (Debian's; installed when missing), as reports/*.png for the README.
screenshots: setup
	$(BIN)/python -m pip install --quiet -r requirements-screenshots.lock
	$(BIN)/python scripts/screenshots.py --out reports

## On a machine with a CUDA GPU: the CUDA tests and GPU benchmarks (scripts/gpu_check.sh).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
