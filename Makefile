# Two commands do everything: `make run` (the built-in default) and `make test` (the workflow's lint, the test
# suite in the tested install, then the lowest and newest dependency versions; CI runs exactly this).
# Each creates .venv and installs the project into it the first time.
PYTHON ?= python3
VENV ?= .venv
# The tested pins (one source: envs/patchmap.yaml pins the same, tests/test_envs.py checks it).
TESTED := constraints/tested.txt
# The torch build to install first: the tested one (the CPU build on this machine's disk);
# `make TORCH=torch` takes the newest release the project allows instead (a CUDA build on Linux).
TORCH ?= $(shell grep '^torch==' $(TESTED))
CORES ?= all

.PHONY: run test lint test-suite test-ends install clean

# uv installs in seconds what pip takes minutes over; pip puts uv itself into the venv first. Where pip
# finds wheels in a local folder (PIP_FIND_LINKS: this machine's torch CPU build), uv is told too.
UV := $(VENV)/bin/uv
FIND_LINKS := $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS))
# Every workflow job is a fresh Python that imports torch and transformers. Python caches their compiled
# bytecode in .venv the first time (uv installs no .pyc files); with PYTHONDONTWRITEBYTECODE set, as on
# some CI machines, every job would compile them again (about 15 s each on a slow core).
unexport PYTHONDONTWRITEBYTECODE

$(VENV)/.installed: pyproject.toml $(TESTED)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet uv
	$(UV) pip install --quiet --python $(VENV)/bin/python $(FIND_LINKS) "$(TORCH)"
	grep -v '^torch==' $(TESTED) > $(VENV)/constraints.txt  # torch: whichever TORCH installed
	$(UV) pip install --quiet --python $(VENV)/bin/python -c $(VENV)/constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/snakemake --cores $(CORES)

# The suite in TEST_WORKERS processes (pytest-xdist), each test file in one of them (its workflow runs
# are module fixtures), in conftest's order (longest first), one thread each: the tests are tiny and
# mostly single-threaded, so two processes use both of CI's 2 cores; more threads than cores make OpenMP wait.
TEST_WORKERS ?= 2
test: lint test-suite test-ends

# Snakemake's own checks of the workflow (rules, logs, conda envs, no mixed rules and functions)
lint: install
	$(VENV)/bin/snakemake --lint

test-suite: install
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# the engine-equivalence tests and a tiny workflow at both ends of pyproject's ranges, each in a fresh
# venv that uv installs (.ci/ends.sh; `make test` runs it after the suite)
test-ends: install
	PYTHON=$(PYTHON) UV=$(UV) bash .ci/ends.sh

clean:
	rm -rf results/models results/default .snakemake
