# duoclass: every target sets up its own virtual environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-gpu bench clean-venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/python -m pip install --quiet torch torchvision
	$(BIN)/python -m pip install --quiet -e ".[text,tune,tensorboard,dev]"
	touch $(STAMP)

## Quick start 1: train, evaluate and predict on scikit-learn's bundled digits
demo: $(STAMP)
	$(BIN)/duoclass demo --output runs/demo

## Quick start 2: the test suite (slow and GPU checks excluded)
test: $(STAMP)
	$(BIN)/python -m pytest -q

## Long checks on the real datasets in ../shared/data
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

clean-venv:
	rm -rf $(VENV)
