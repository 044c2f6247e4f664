# `make demo` and `make test` work on a fresh machine: they create .venv and
# install guestmem from pyproject.toml at the exact versions in constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt

.PHONY: demo test lint bench info check clean mutation

# -c pins what guestmem[test] installs; PIP_CONSTRAINT also reaches the isolated
# environment in which pip builds guestmem, and pins its setuptools.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PY) -m venv $(VENV)
	PIP_CONSTRAINT=$(CURDIR)/$(CONSTRAINTS) \
	  $(BIN)/pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/guestmem demo
	@if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then $(BIN)/guestmem demo --backend kvm; \
	 elif [ -e /dev/kvm ]; then echo "/dev/kvm is not readable and writable by $$(id -un): skipping the demo on the real kernel"; \
	 else echo "no /dev/kvm on this machine: skipping the demo on the real kernel"; fi

test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

info: $(STAMP)
	$(BIN)/guestmem info --backend kvm

check: $(STAMP)
	$(BIN)/guestmem check --backend kvm

bench: $(STAMP)
	$(BIN)/python bench/populate.py
	$(BIN)/python bench/exits.py

# Mutation testing (not part of make test): its own venv with the pinned tool.
MVENV := .venv-mutation
MSTAMP := $(MVENV)/.installed
$(MSTAMP): pyproject.toml $(CONSTRAINTS) constraints-mutation.txt
	$(PY) -m venv $(MVENV)
	PIP_CONSTRAINT=$(CURDIR)/$(CONSTRAINTS) \
	  $(MVENV)/bin/pip install --quiet -c $(CONSTRAINTS) -c constraints-mutation.txt \
	  -e '.[test,mutation]'
	touch $(MSTAMP)

# Scores a random sample of MUTANTS mutants (300; SEED fixes it: 1), about 25
# minutes here; MUTANTS=0 scores all of them, many hours.
mutation: $(MSTAMP)
	$(MVENV)/bin/python tools/mutation.py --sample $${MUTANTS:-300} --seed $${SEED:-1}

clean:
	rm -rf $(VENV) $(MVENV) mutants build src/*.egg-info
