# duoclass: every target sets up its own virtual environment on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-gpu browser bench bench-quick clean-venv

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/python -m pip install --quiet torch torchvision
	$(BIN)/python -m pip install --quiet -e ".[text,tune,tensorboard,onnx,serve,ray,explain,dev]"
	# AutoAttack and the reference attacks; every torchattacks release pins an old requests it never imports
	$(BIN)/python -m pip install --quiet --no-deps "torchattacks==3.5.1"
	touch $(STAMP)

## Quick start 1: train, evaluate and predict on scikit-learn's bundled digits
demo: $(STAMP)
	$(BIN)/duoclass demo --output runs/demo

## Debian's chromium for the page test, installed when missing (as root, or with passwordless sudo)
browser:
	@bash scripts/install_chromium.sh

## Quick start 2: the test suite (slow and GPU checks excluded). Skip reasons are listed (-rs), and a skip
## that should not happen fails the run (tests/conftest.py: only GPU tests, and shared-data tests where
## ../shared/data is absent, may skip)
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -rs

## Long checks on the real datasets in ../shared/data (tests/test_slow.py; they skip when the data is absent)
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m slow

## CUDA checks (tests/test_gpu.py; they skip without a CUDA device)
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m gpu

## The fused AdamW step against PyTorch's per-tensor loop: step times on real duoclass models, then
## tfidf-mlp training on ../shared/data/text/chnsenticorp_htl with each. Writes runs/bench/optimizer_step.json
## (the committed figures are in benchmarks/results/ and benchmarks/RESULTS.md); BENCH_ARGS adds options.
BENCH_ARGS ?=
bench: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/optimizer_step.py --out runs/bench/optimizer_step.json $(BENCH_ARGS)

## The step part alone (a minute or two; no shared data needed)
bench-quick: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python benchmarks/optimizer_step.py --parts step --steps 10 \
		--out runs/bench/optimizer_step_quick.json $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
