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
	@if [ -e /dev/kvm ]; then $(BIN)/guestmem demo --backend kvm; \
	 else echo "no /dev/kvm on this machine: skipping the demo on the real kernel"; fi

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

info: $(STAMP)
	$(BIN)/guestmem info --backend kvm

check: $(STAMP)
	$(BIN)/guestmem check --backend kvm

bench: $(STAMP)
	$(BIN)/python bench/populate.py
	$(BIN)/python bench/exits.py

clean:
	rm -rf $(VENV) build src/*.egg-info
