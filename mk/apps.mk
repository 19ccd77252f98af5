# MONAI Label server app (apps/monailabel) and MONAI Deploy application (apps/deploy), docs/apps.md. They live outside
# the scse_monai package; each framework gets its own environment:
# MONAI Label 0.8.5 needs pydicom 2 / numpy 1, the Deploy App SDK 4.0.0 needs pydicom 3 / highdicom 0.28.
# As for .venv, torch==2.13.0 (CPU wheel) goes in first; a stamp file makes setup idempotent.
LABEL_VENV := .venv-label
DEPLOY_VENV := .venv-deploy
LABEL_BUNDLE ?= bundle
STUDIES ?=
HOST ?= 127.0.0.1
PORT ?= 8000
INPUT ?=
OUTPUT ?= output
MODEL ?= bundle/models/model.ts

TEST_DEPS += label-setup deploy-setup

.PHONY: label-setup deploy-setup label-server deploy-run

# $(call apps_pip,VENV,ARGS): quiet pip install; its output goes to VENV/setup.log and is shown only on failure.
apps_pip = $(PIP_INSTALL) $(1)/bin/python -q $(2) >>$(1)/setup.log 2>&1 || { cat $(1)/setup.log; exit 1; }

label-setup: $(LABEL_VENV)/.installed

$(LABEL_VENV)/.installed: apps/monailabel/requirements.txt pyproject.toml mk/apps.mk mk/pip-install
	@echo "setting up $(LABEL_VENV) (MONAI Label 0.8.5) ..."
	@test -x $(LABEL_VENV)/bin/python || $(PYTHON) -m venv $(LABEL_VENV)
	@: > $(LABEL_VENV)/setup.log
	@$(call apps_pip,$(LABEL_VENV),--upgrade pip)
	@$(call apps_pip,$(LABEL_VENV),$(TORCH))
	@$(call apps_pip,$(LABEL_VENV),-r apps/monailabel/requirements.txt)
	@$(call apps_pip,$(LABEL_VENV),--no-deps monailabel==0.8.5)
	@$(call apps_pip,$(LABEL_VENV),--no-deps -e .)
	@cd apps/monailabel && $(abspath $(LABEL_VENV))/bin/python -c "import monailabel.main, main" \
		>>$(abspath $(LABEL_VENV))/setup.log 2>&1 || { tail -20 $(abspath $(LABEL_VENV))/setup.log; exit 1; }
	@touch $@
	@echo "$(LABEL_VENV) ready"

deploy-setup: $(DEPLOY_VENV)/.installed

$(DEPLOY_VENV)/.installed: apps/deploy/requirements-sdk.txt pyproject.toml mk/apps.mk mk/pip-install
	@echo "setting up $(DEPLOY_VENV) (MONAI Deploy App SDK 4.0.0) ..."
	@test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	@: > $(DEPLOY_VENV)/setup.log
	@$(call apps_pip,$(DEPLOY_VENV),--upgrade pip)
	@$(call apps_pip,$(DEPLOY_VENV),$(TORCH))
	@$(call apps_pip,$(DEPLOY_VENV),-r apps/deploy/requirements-sdk.txt)
	@$(call apps_pip,$(DEPLOY_VENV),--no-deps monai-deploy-app-sdk==4.0.0)
	@$(call apps_pip,$(DEPLOY_VENV),--no-deps -e .)
	@cd apps/deploy && $(abspath $(DEPLOY_VENV))/bin/python -c "import app" \
		>>$(abspath $(DEPLOY_VENV))/setup.log 2>&1 || { tail -20 $(abspath $(DEPLOY_VENV))/setup.log; exit 1; }
	@touch $@
	@echo "$(DEPLOY_VENV) ready"

# make label-server STUDIES=DIR [PORT=8000] [HOST=127.0.0.1] [LABEL_BUNDLE=bundle]: foreground; Ctrl-C stops it.
label-server: label-setup
	@test -n "$(STUDIES)" || { echo "usage: make label-server STUDIES=DIR [PORT=8000] [HOST=127.0.0.1]" >&2; exit 2; }
	@test -d "$(STUDIES)" || { echo "error: STUDIES=$(STUDIES): no such folder" >&2; exit 2; }
	@test -f "$(LABEL_BUNDLE)/models/model.pt" || \
		{ echo "error: $(LABEL_BUNDLE)/models/model.pt missing (LABEL_BUNDLE=DIR picks another bundle)" >&2; exit 2; }
	$(LABEL_VENV)/bin/python -m monailabel.main start_server --app apps/monailabel \
		--studies "$(STUDIES)" --host $(HOST) --port $(PORT) --conf bundle "$(LABEL_BUNDLE)"

# make deploy-run INPUT=DICOM_DIR [OUTPUT=output] [MODEL=bundle/models/model.ts]
deploy-run: deploy-setup
	@test -n "$(INPUT)" || \
		{ echo "usage: make deploy-run INPUT=DICOM_DIR [OUTPUT=DIR] [MODEL=bundle/models/model.ts]" >&2; exit 2; }
	$(DEPLOY_VENV)/bin/python apps/deploy -i "$(INPUT)" -o "$(OUTPUT)" -m "$(MODEL)"
