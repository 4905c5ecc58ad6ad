# The two commands that do all set-up (see README.md):
#
#   make app    create .venv on first use, install everything, serve the app (python app.py)
#   make test   the same set-up, Debian's Chromium for the browser test, then ruff, the import
#               contracts and the test suite; what CI runs (.ci/run)
#
# Set-up runs again only when requirements*.txt, pyproject.toml or this file change: a stamp in
# .venv is named after their hash. `make setup` does the set-up alone; `make lint` lints alone.
# Variables: PYTHON (the interpreter that makes the venv, default python3), VENV (default .venv),
# CHROMIUM=0 (do not install Chromium; the browser test then skips).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
CHROMIUM ?= 1
BIN := $(VENV)/bin
# torch first, alone, at the versions requirements.txt pins (pip's configured wheel sources apply)
TORCH := $(shell grep -E '^(torch|torchvision)==' requirements.txt)
SETUP_HASH := $(shell cat requirements.txt requirements-dev.txt pyproject.toml Makefile | sha256sum | cut -c1-16)
STAMP := $(VENV)/.dgq-setup-$(SETUP_HASH)

export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PYTHONUNBUFFERED := 1

.PHONY: app test setup lint chromium

app: $(STAMP)
	$(BIN)/python app.py

test: $(STAMP) chromium lint
	@set +e; $(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: no tests collected"; exit 1; fi; exit $$rc

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

$(STAMP):
	@[ -x $(BIN)/python ] || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q --upgrade pip; }
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt -e .
	@rm -f $(VENV)/.dgq-setup-*
	@touch $@

# Debian's Chromium for tests/test_app_browser.py; without it (no root, no apt) that test skips.
chromium:
	@if [ "$(CHROMIUM)" != 0 ] && [ ! -x /usr/bin/chromium ]; then \
	  echo "installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	    || echo "warning: could not install chromium; the browser test will be skipped"; \
	fi
