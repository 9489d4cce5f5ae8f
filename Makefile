# Two set-up commands: `make repro` and `make test`. Both create .venv when missing and
# install the exact versions in requirements.lock; the install re-runs only when
# pyproject.toml or requirements.lock changed (stamp file), so repeated runs are fast.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
# dvc.yaml runs `python pipeline/...`: make that the venv's python.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install repro test test-fast bench ui lock ci-baseline clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

repro: $(STAMP)
	$(VENV)/bin/dvc repro

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup --timeout 1800 tests

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" tests

bench: $(STAMP)
	$(PY) bench/run_all.py

ui: $(STAMP)
	$(PY) -m segan.ui

# Refresh the CI metrics baseline on purpose (after a change that is meant to move the CI
# model's metrics): run the CI-size pipeline in a temp copy and keep its metrics.
ci-baseline: $(STAMP)
	rm -rf /tmp/segan-ci-baseline
	$(PY) -m pytest -q -p no:cacheprovider --basetemp=/tmp/segan-ci-baseline \
		tests/test_pipeline_e2e.py::test_repro_produces_every_artifact
	cp /tmp/segan-ci-baseline/pipeline0/repo/reports/metrics.json tests/data/ci_baseline_metrics.json
	@echo "tests/data/ci_baseline_metrics.json refreshed: review the diff and commit it"

# Refresh requirements.lock from a fresh resolve of pyproject.toml (deliberate upgrades only).
lock:
	rm -rf /tmp/segan-lock && $(PYTHON) -m venv /tmp/segan-lock
	/tmp/segan-lock/bin/pip install --quiet -e '.[dev]'
	/tmp/segan-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' > requirements.lock

clean:
	rm -rf $(VENV)
