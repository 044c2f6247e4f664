# `make demo` and `make test` work on a fresh machine: they create .venv and
# install guestmem from pyproject.toml (pinned) before running.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench info check clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/guestmem demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

info: $(STAMP)
	$(BIN)/guestmem info

check: $(STAMP)
	$(BIN)/guestmem check

bench: $(STAMP)
	$(BIN)/python bench/populate.py
	$(BIN)/python bench/exits.py

clean:
	rm -rf $(VENV) build src/*.egg-info
