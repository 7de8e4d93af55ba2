# Quick start: `make demo` (main job) and `make test` (test suite). Both create .venv when missing and
# install the project with torch pinned; bring your own torch with e.g. `make test TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)' | tr -c 'A-Za-z0-9.' '_')

.PHONY: install test test-compile demo bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The fused path's tests (torch.compile; a few minutes, left out of `make test`).
test-compile: $(STAMP)
	$(BIN)/python -m pytest -q -m compile tests/fused/test_fused.py

demo: $(STAMP)
	$(BIN)/python -m lightning_revrnn.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/rnn.py

# Exactness tests on CUDA, host-sync count and the benchmarks against cuDNN (needs a GPU and a CUDA torch:
# `make gpu-check TORCH=torch`); without a GPU it says so and runs the CPU parts.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
