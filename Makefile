# scse-monai: every environment the tests and commands need is built here, from nothing.
# torch is always installed first from its pinned CPU wheel; an unpinned torch pulls a CUDA build.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
# Every pip install goes through this wrapper: it retries when the registry connection drops mid-download.
PIP_INSTALL := bash mk/pip-install
PYTEST_ARGS ?=
# Extra environments (MONAI Label, MONAI Deploy) add their setup targets here from mk/*.mk.
TEST_DEPS := setup

SHARED ?= ../shared/data
PREPARED ?= prepared

.PHONY: setup test demo bench lint clean prepare-samples wheel

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml mk/pip-install
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(BIN)/python -q --upgrade pip
	$(PIP_INSTALL) $(BIN)/python -q $(TORCH)
	$(PIP_INSTALL) $(BIN)/python -q -e ".[dev]"
	touch $@

-include mk/*.mk

test: $(TEST_DEPS)
	$(BIN)/python -m ruff check scse_monai tests benchmarks apps
	$(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m scse_monai.demo

# sdist + wheel of scse-monai (PEP 517 build in an isolated environment) into dist/
wheel: $(VENV)/.installed
	$(BIN)/python -m build --sdist --wheel --outdir dist .

bench: setup
	$(BIN)/python -m benchmarks.run

# Real samples next to the repo (not needed by the tests): prepare them and write overlay previews.
prepare-samples: setup
	$(BIN)/python -m scse_monai.data prepare chaos --root $(SHARED)/CHAOS_sample/Train_Sets --task mr-t2spir \
		--out $(PREPARED)/chaos_mr_t2
	$(BIN)/python -m scse_monai.data prepare visceral --root $(SHARED)/VISCERAL_sample --out $(PREPARED)/visceral --folds 1
	$(BIN)/python -m scse_monai.data preview --datalist $(PREPARED)/chaos_mr_t2/datalist.json --case chaos_mr_t2_01 \
		--out $(PREPARED)/previews/chaos_mr_t2_01.png

lint: setup
	$(BIN)/python -m ruff check scse_monai tests benchmarks apps
	$(BIN)/python -m ruff format --check scse_monai tests benchmarks apps

clean:
	rm -rf $(VENV) .venv-label .venv-deploy .pytest_cache build dist *.egg-info
