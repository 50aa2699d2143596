# Each target creates .venv if it is missing, so a fresh machine needs only Python.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo

.PHONY: demo test bench floor clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# The embedded default: 2-D GMM, exact oracle, teacher -> sample -> distill -> eval. CPU, no download.
demo: $(VENV)/.installed
	$(BIN)/python -m fdistill.demo --workdir=$(WORKDIR)

# The CPU test suite (what .ci/run calls).
test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 --durations=10 tests

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/toy2d_divergences.py

# setup.py's >= floors, tested (.ci/floor): a fresh venv in a temp dir with every floor pinned
# (==), the test extra, then a few fast tests, run from a copy of tests/ and configs/ outside the
# checkout (so they exercise the installed package). Minutes and registry downloads: not part of test.
floor:
	$(PY) .ci/floor

# runs/ is the scratch area; the result files the docs cite that git tracks there stay
# (in a git checkout only untracked, ignored files under runs/ are removed).
clean:
	rm -rf $(VENV)
	if git rev-parse --git-dir >/dev/null 2>&1; then git clean -fdqX -- runs; else rm -rf runs; fi
