# hyperloop-lm: `make demo` and `make test` work from a fresh clone (Python 3.11, no torch).
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
# STAMP: the package + runtime dependencies (make demo); DEV: + test/integration extras (make test)
STAMP   := $(VENV)/.installed
DEV     := $(VENV)/.installed-dev

.PHONY: help install install-dev demo test test-slow bench reproduce clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned, so no dependency can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(DEV): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV)

install: $(STAMP)  ## create .venv with the package

install-dev: $(DEV)  ## + dev dependencies (pytest, transformers, onnx, lm-eval, ...)

demo: $(STAMP)  ## fetch the corpus, train Hyperloop + Transformer, eval, quantize, generate, compare
	$(BIN)/hyperloop-lm demo

test: $(DEV)  ## run the fast test suite (exit code 5 = no tests = failure)
	$(BIN)/python -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

test-slow: $(DEV)  ## run only the slow tests (real corpus fetch, long training)
	$(BIN)/python -m pytest -m slow; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$rc

bench: $(DEV)  ## benchmarks -> reports/bench/*.json + summary.md
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
