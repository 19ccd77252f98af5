# scse-monai: every environment the tests and commands need is built here, from nothing.
# torch is always installed first from its pinned CPU wheel; an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
PYTEST_ARGS ?=
# Extra environments (MONAI Label, MONAI Deploy) add their setup targets here from mk/*.mk.
TEST_DEPS := setup

.PHONY: setup test demo bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

-include mk/*.mk

test: $(TEST_DEPS)
	$(BIN)/python -m ruff check scse_monai tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m scse_monai.demo

bench: setup
	$(BIN)/python -m benchmarks.run

lint: setup
	$(BIN)/python -m ruff check scse_monai tests benchmarks
	$(BIN)/python -m ruff format --check scse_monai tests benchmarks

clean:
	rm -rf $(VENV) .venv-label .venv-deploy .pytest_cache build *.egg-info
