# hapsms-relay: the quick start is `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/dev.toml

.PHONY: run test lint typecheck pytest fuzz bench clean

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

# The webhook fuzz test with 10,000 generated requests (make test runs 300).
fuzz: $(VENV)/.test-extras
	FUZZ_EXAMPLES=10000 $(BIN)/pytest tests/test_fuzz.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info .pytest_cache .mypy_cache .ruff_cache
