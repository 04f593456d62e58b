# silu-pipeline: `make repro` sets everything up and runs the pipeline,
# `make test` runs the test suite. `make help` lists every target.

SHELL := /bin/bash
PYTHON ?= python3
# The board runs Python 3.9; pyenv's 3.9 is used when present.
BOARD_PYTHON ?= $(firstword $(wildcard $(or $(PYENV_ROOT),$(HOME)/.pyenv)/versions/3.9.*/bin/python3.9) $(shell command -v python3.9 2>/dev/null))
VENV := .venv
BOARD_VENV := .venv-board
BENCH_VENV := .venv-bench
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install install-board sshd board board-stop repro test test-fast bench bench-env quality clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements/host.txt requirements/host.lock
	@echo ">>> Creating the pipeline environment in $(VENV) (torch, LLaMA-Factory, DVC; a few minutes, ~7 GB)"
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements/host.txt -c requirements/host.lock
	touch $@

install: $(VENV)/.installed ## Create the pipeline venv (.venv)

$(BOARD_VENV)/.installed: deploy/requirements-board.txt deploy/requirements-board.lock
	@echo ">>> Creating the board stand-in environment in $(BOARD_VENV) (Python 3.9, MindSpore, MindNLP 0.4.1; ~3.5 GB)"
	@if [ -z "$(BOARD_PYTHON)" ]; then \
	  echo "error: no Python 3.9 found for the board stand-in. Install it (pyenv install 3.9) or run make BOARD_PYTHON=/path/to/python3.9" >&2; exit 1; fi
	test -x $(BOARD_VENV)/bin/python || $(BOARD_PYTHON) -m venv $(BOARD_VENV)
	$(BOARD_VENV)/bin/pip install --quiet -r deploy/requirements-board.txt -c deploy/requirements-board.lock
	# mindnlp 0.4.1 declares mindspore>=2.2.14, which would add a MindSpore it cannot import.
	$(BOARD_VENV)/bin/pip install --quiet --no-deps -c deploy/requirements-board.lock mindnlp==0.4.1
	touch $@

install-board: $(BOARD_VENV)/.installed ## Create the board stand-in venv (.venv-board, Python 3.9)

sshd: ## Install OpenSSH server when missing (needs root or sudo)
	@if command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ]; then exit 0; fi; \
	echo ">>> Installing openssh-server for the board stand-in"; \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client; \
	elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client; \
	else echo "error: sshd not found, and neither root nor sudo is available to install it. Install the openssh-server package, then rerun." >&2; exit 1; fi

board: install install-board sshd ## Start the board stand-in: sshd on 127.0.0.1 as you, with its own keys
	$(BIN)/python -m tools.board_standin start

board-stop: ## Stop the board stand-in
	$(BIN)/python -m tools.board_standin stop

repro: board ## Set up everything and run the whole pipeline on the embedded sample
	@echo ">>> dvc repro (stages whose inputs did not change are skipped)"
	$(BIN)/dvc repro
	@echo ">>> The board's answers beside the references (data/deploy/answers.jsonl)"
	@cat data/deploy/answers.jsonl
	@echo ">>> dvc metrics show (the deploy row has the board's latency and failed requests)"
	$(BIN)/dvc metrics show

test: install install-board sshd ## Run the whole test suite
	@echo ">>> pytest (the end-to-end tests run the whole pipeline in temporary copies)"
	$(BIN)/python -m pytest

test-fast: install install-board sshd ## Run the tests not marked slow (no training, no whole pipeline)
	$(BIN)/python -m pytest -m "not slow"

$(BENCH_VENV)/.installed: bench/requirements-bench.txt
	@echo ">>> Creating the benchmark environment in $(BENCH_VENV) (img2dataset 1.47.0, compared against the download stage)"
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet -r bench/requirements-bench.txt
	touch $@

bench-env: $(BENCH_VENV)/.installed ## Create the benchmark-only venv (.venv-bench) with img2dataset

bench: install bench-env ## Run the benchmarks in bench/ (not tests; prints ratios)
	$(BIN)/python -m bench

quality: install ## Check the code without changing it
	$(BIN)/ruff check stages deploy tests bench
	$(BIN)/python -m stages.config params.yaml

# .board/ stays: docs/board.md keeps a real board's checked known_hosts there too.
clean: board-stop ## Remove pipeline outputs (not the venvs, the DVC cache or .board/)
	rm -rf data/downloaded data/filtered data/converted data/dataset data/eval data/deploy models/base models/adapter models/merged models/board metrics dvclive
