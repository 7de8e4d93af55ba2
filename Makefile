# Quick start: `make demo` (main job), `make test` (test suite) and `make lint` (static checks). All create .venv
# when missing and install the project with torch pinned; bring your own torch with e.g. `make test TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Tools run as `python -m` so a venv copied from another folder (scripts with stale #! lines) still works.
PY := $(BIN)/python
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)' | tr -c 'A-Za-z0-9.' '_')

.PHONY: install test test-compile demo bench gpu-check clean lint lint-ruff lint-format lint-mypy lint-mypy-strict \
	lint-mypy-lenient mypy-links

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
	$(BIN)/python -m pytest -q -m compile tests/fused

# Static checks (config in pyproject.toml): ruff lint, ruff format check, mypy strict on the package and lenient on
# tests/ and benchmarks/. -k: every check runs and reports even when an earlier one fails.
lint: $(STAMP)
	@$(MAKE) --no-print-directory -k lint-ruff lint-format lint-mypy

lint-ruff: $(STAMP)
	$(PY) -m ruff check .

lint-format: $(STAMP)
	$(PY) -m ruff format --check --output-format concise .

lint-mypy: lint-mypy-strict lint-mypy-lenient

# mypy cannot follow setuptools' package-dir mapping (callbacks/ -> lightning_revrnn.callbacks, datamodules/ ->
# lightning_revrnn.datamodules): these links, on mypy_path (pyproject.toml), make the two folders resolve under
# their installed names; the sed below reports their errors under the real paths again.
MYPY_LINKS := build/mypy/lightning_revrnn
MYPY_REAL_PATHS := sed -E 's,^$(MYPY_LINKS)/(callbacks|datamodules)/,\1/,'

mypy-links:
	mkdir -p $(MYPY_LINKS)
	ln -sfn ../../../callbacks $(MYPY_LINKS)/callbacks
	ln -sfn ../../../datamodules $(MYPY_LINKS)/datamodules

# Strict: lightning_revrnn (all of it, incl. callbacks and datamodules); the strict flags are per-module settings.
lint-mypy-strict: $(STAMP) mypy-links
	@echo "mypy (strict): lightning_revrnn, callbacks/, datamodules/"
	@$(PY) -m mypy --cache-dir build/mypy_cache/strict -p lightning_revrnn -p lightning_revrnn.callbacks \
		-p lightning_revrnn.datamodules >build/mypy-strict.log 2>&1; \
		status=$$?; $(MYPY_REAL_PATHS) build/mypy-strict.log; exit $$status

# Lenient: tests and benchmarks, errors only; imports of the package are followed silently (the strict run reports
# them). The two conftest.py files share a module name for mypy, so tests/datamodules/conftest.py gets its own run.
lint-mypy-lenient: $(STAMP) mypy-links
	@echo "mypy (lenient): tests/, benchmarks/"
	@$(PY) -m mypy --cache-dir build/mypy_cache/lenient --follow-imports=silent \
		--exclude 'tests/datamodules/conftest\.py$$' tests benchmarks >build/mypy-lenient.log 2>&1; \
		status=$$?; $(MYPY_REAL_PATHS) build/mypy-lenient.log; \
		$(PY) -m mypy --cache-dir build/mypy_cache/lenient --follow-imports=silent tests/datamodules/conftest.py \
		>build/mypy-lenient.log 2>&1 || status=1; $(MYPY_REAL_PATHS) build/mypy-lenient.log; exit $$status

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
