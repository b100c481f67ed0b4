# hapsms-relay: the quick start is `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/dev.toml

.PHONY: run test lint typecheck pytest bench bench-smtp clean

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

# Messages/s through the smtp provider's connection pool to a local aiosmtpd: the client on
# CPU 0, the server in a child process on CPU $(SERVER_CPU) ("same": CPU 0 as well).
SERVER_CPU ?= 1
bench-smtp: $(VENV)/.test-extras
	taskset -c 0 $(BIN)/python bench/smtp_bench.py --server-cpu $(SERVER_CPU) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
