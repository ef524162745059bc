# The two commands a new user needs: `make run` and `make test`.
# Both create .venv and install what they need on their own.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test test-db test-compose bench soak lint proto release-protos venv clean help

help:
	@echo "make run     start PostgreSQL (embedded unless DATABASE_URL is set) and the three services"
	@echo "make test    run the whole test suite against a real PostgreSQL"
	@echo "make lint    ruff, mypy, buf lint, buf breaking (against protos/released/), squawk"
	@echo "make bench   benchmark the hot paths against their ceilings (BENCH_ARGS=--scale 2)"
	@echo "make soak    mixed traffic through the three services, then leak checks (SOAK_ARGS=--duration 300 --streams 50 --writers 8)"
	@echo "make test-compose  the integration suite against the docker compose stack"
	@echo "make proto   regenerate gen/ from protos/"
	@echo "make release-protos  record protos/ as the released API that make lint checks against"

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m services

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Only the database-layer tests (CI also runs these against the system PostgreSQL).
test-db: $(STAMP)
	$(PY) -m pytest -m db $(PYTEST_ARGS)

# The integration suite against the docker compose stack (needs a Docker engine;
# with no registry: ../shared/docker/standin-images.sh, then
# POSTGRES_IMAGE=local/postgres:15 PYTHON_IMAGE=local/python:3.11 make test-compose).
test-compose: $(STAMP)
	$(PY) -m tests.integration.compose $(PYTEST_ARGS)

# The hot paths against their ceilings (embedded PostgreSQL unless DATABASE_URL).
bench: $(STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# Mixed traffic for a long while (embedded PostgreSQL), then the checks: no errors,
# complete streams, flat memory, no leaked connections, unread counts that agree.
soak: $(STAMP)
	$(PY) -m tests.reliability.soak $(SOAK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd protos && $(abspath $(BIN))/buf lint
	$(BIN)/buf breaking protos --against $(RELEASED_PROTOS) --exclude-imports
	$(PY) -m db.squawk

proto: $(STAMP)
	$(PY) protos/generate.py

# The released API that `make lint` (and tests/test_static_checks.py) checks
# protos/ against with `buf breaking` (the FILE rules of protos/buf.yaml). Run it
# only when a release is cut, on purpose (README, "Changing the API").
RELEASED_PROTOS := protos/released/chat.binpb

release-protos: $(STAMP)
	$(BIN)/buf build protos --exclude-source-info -o $(RELEASED_PROTOS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
