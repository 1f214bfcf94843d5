# Two commands do everything: `make run` (the built-in default) and `make test` (the test suite).
# Each creates .venv and installs the project into it the first time.
PYTHON ?= python3
VENV ?= .venv
# The torch build to install first. 2.13.0 is what the suite is run with; `make TORCH=torch` takes the
# newest release the project allows (a CUDA build on Linux).
TORCH ?= torch==2.13.0
CORES ?= all

.PHONY: run test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/snakemake --cores $(CORES)

test: install
	$(VENV)/bin/python -m pytest

clean:
	rm -rf results/models results/default .snakemake
