# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and reinstall only when pyproject.toml changes.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUDIES ?= studies
DEMO := $(STUDIES)/sinsim_beta

.PHONY: demo test venv report clean-demo reliability

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision come from pip with ranges (no exact pins): on machines that
# ship local wheels pip takes those; never uv/poetry (they would download GBs).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	@if [ -f $(DEMO)/spec.yaml ]; then \
	  echo "[demo] $(DEMO) exists: resuming it (finished trials are not rerun)"; \
	  $(BIN)/otstudy resume $(DEMO); \
	else \
	  $(BIN)/otstudy run --preset sinsim_beta --storage $(STUDIES); \
	fi
	$(BIN)/otstudy report $(DEMO)
	@echo
	@echo "Report:       $(abspath $(DEMO))/report/index.html"
	@echo "MLflow store: sqlite:///$(abspath $(DEMO))/mlflow.db   (browse: $(BIN)/otstudy ui $(DEMO))"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# long fault-injection tests (3 kills of the driver in one study), plus the fault tests of `make test`
reliability: $(STAMP)
	rm -f .reliability.json
	$(BIN)/python -m pytest -q -m "reliability or not reliability" tests/test_reliability.py tests/test_spec.py
	$(BIN)/python -m tests.reliability_table

clean-demo:
	rm -rf $(DEMO)
