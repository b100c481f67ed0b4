# hapsms-relay: the quick start is `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/dev.toml

.PHONY: run test lint typecheck pytest bench bench-smoke wrk clean

# The venv is rebuilt when the packaging metadata changes.
$(BIN)/hapsms-relay: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	@touch $@

$(VENV)/.test-extras: $(BIN)/hapsms-relay
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

run: $(BIN)/hapsms-relay
	$(BIN)/hapsms-relay serve --config $(CONFIG)

lint: $(VENV)/.test-extras
	$(BIN)/ruff check hapsms_relay tests $(wildcard bench)

typecheck: $(VENV)/.test-extras
	$(BIN)/mypy

pytest: $(VENV)/.test-extras
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# Benchmarks (bench/README.md): server pinned to CPU 0, wrk and the sink on CPU 1.
wrk:
	@command -v wrk >/dev/null || (apt-get update -q && apt-get install -y -q wrk) \
		|| { echo "make bench needs wrk: apt-get install wrk (Debian's package)" >&2; exit 1; }

bench: $(BIN)/hapsms-relay wrk
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# A few seconds per stage, no thresholds: CI runs it so the tooling cannot rot.
bench-smoke: $(BIN)/hapsms-relay wrk
	$(BIN)/python bench/run.py --smoke

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
