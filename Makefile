# Two commands do everything: `make run` (the built-in default) and `make test` (the test suite).
# Each creates .venv and installs the project into it the first time.
PYTHON ?= python3
VENV ?= .venv
# The tested pins (one source: envs/patchmap.yaml pins the same, tests/test_envs.py checks it).
TESTED := constraints/tested.txt
# The torch build to install first: the tested one (the CPU build on this machine's disk);
# `make TORCH=torch` takes the newest release the project allows instead (a CUDA build on Linux).
TORCH ?= $(shell grep '^torch==' $(TESTED))
CORES ?= all

.PHONY: run test test-ends install clean

$(VENV)/.installed: pyproject.toml $(TESTED)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	grep -v '^torch==' $(TESTED) > $(VENV)/constraints.txt  # torch: whichever TORCH installed
	$(VENV)/bin/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/snakemake --cores $(CORES)

test: install
	$(VENV)/bin/python -m pytest

# the engine-equivalence tests and a tiny workflow at both ends of pyproject's ranges (.ci/ends.sh)
test-ends: install
	FLOORS_PYTHON=$(VENV)/bin/python bash .ci/ends.sh

clean:
	rm -rf results/models results/default .snakemake
