# kt_paper: the two commands of the README, and a few helpers. Both main targets create .venv and install into it.
SHELL   := /bin/bash
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PRESET  ?= tiny
ARGS    ?=
BENCH_ARGS ?=
NB_WORKERS ?= 2
# The tests check one program on every CPU: fp32 unless asked (`make test TEST_PRECISION=bf16`); the bf16 paths have
# their own tests. `KT_PAPER_HIDE_BF16=1` makes a CPU with bf16 units look like one without.
TEST_PRECISION ?= fp32

.PHONY: install reproduce test readme check-readme gates nbtest pytest bench clean-runs

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/.installed

## The main job: every stage notebook, in order, through papermill (default preset: tiny, offline, CPU); it updates
## the committed figures/<preset>/ (a plain `kt-paper reproduce` writes them under its run folder).
reproduce: install
	$(BIN)/kt-paper reproduce --preset $(PRESET) --fig-dir figures/$(PRESET) $(ARGS)

## The test command (what CI runs): clean notebooks, library in sync, README current, notebooks, then pytest.
test: install gates nbtest pytest

gates: install
	$(BIN)/python tools/gate.py "notebooks clean" 'nbs/**/*.ipynb' 'nbs/*.ipynb' -- $(BIN)/nbdev-clean
	$(BIN)/python tools/gate.py "library in sync" 'kt_paper/**/*.py' 'kt_paper/*.py' -- $(BIN)/nbdev-export
	$(BIN)/python tools/make_readme.py --check
	$(BIN)/python -m pyflakes kt_paper && echo "gate ok: no unused imports or names (pyflakes)"

nbtest: install
	KT_PAPER_PRECISION=$(TEST_PRECISION) MPLBACKEND=agg $(BIN)/nbdev-test --n-workers $(NB_WORKERS) --timing

pytest: install
	KT_PAPER_PRECISION=$(TEST_PRECISION) MPLBACKEND=agg $(BIN)/python -m pytest -q tests

readme: install
	$(BIN)/python tools/make_readme.py

## Every benchmark at its real size (minutes); `make bench BENCH_ARGS=--smoke`: toy sizes, what tests/test_bench.py runs.
bench: install
	for f in bench/[!_]*.py; do echo "== $$f"; $(BIN)/python $$f $(BENCH_ARGS) || exit 1; done

clean-runs:
	rm -rf runs
