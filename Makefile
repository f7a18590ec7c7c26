# Two entry points: `make demo` runs the nightly job on a simulated company in the
# embedded SQLite warehouse, `make test` runs the test suite. Both create .venv first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180

.PHONY: install demo test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Fulcrum needs Python 3.11 or newer" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/fulcrum demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)
