# Two commands set up a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000
# The suite exercises PostgreSQL too; point this elsewhere, or at nothing, as needed.
RISK_ENGINE_TEST_POSTGRES_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
export RISK_ENGINE_TEST_POSTGRES_URL
# pytest processes (pytest-xdist; 0: one process). Each test has its own files and PostgreSQL schema.
TEST_WORKERS ?= 2

.PHONY: run test lint typecheck pytest bench openapi clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/risk-engine serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check risk_engine tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict risk_engine

pytest: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS)

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python bench/payments.py

openapi: $(STAMP)
	$(BIN)/risk-engine openapi > api/openapi.json

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
