# Two commands do all set-up on a fresh machine that has only Python and pip:
#   make demo   -> .venv, install the locked dependencies and the project, run the embedded demo pipeline
#   make test   -> .venv, install the locked dependencies and the project, make lint (ruff, mypy), the default
#                  test suite
# Dependencies are installed from requirements-lock.txt (exact versions and hashes, Python 3.11 on
# Linux x86-64); pyproject.toml keeps the ranges a user's own environment may resolve. `make lock`
# re-resolves the ranges to today's newest versions and rewrites the lock; `make lock LOCK_UPGRADE=`
# keeps every pin of the lock that still fits and only adds what pyproject.toml newly asks for.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements-lock.txt
STAMP := $(VENV)/.installed
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28
LOCK_UPGRADE ?= --upgrade

.PHONY: demo test test-slow lock clean

$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stf run pipelines/demo.yaml

test: lint
	$(BIN)/python -m pytest -n 2 -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# uv resolves for the target platform whatever machine runs it; it lives in its own venv so the
# project's venv holds exactly the lock.
lock:
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet --upgrade uv
	$(VENV)-lock/bin/uv pip compile pyproject.toml --extra dev $(LOCK_TARGET) --generate-hashes $(LOCK_UPGRADE) \
		--custom-compile-command "make lock" --quiet -o $(LOCK)

clean:
	rm -rf $(VENV) $(VENV)-lock out

.PHONY: docs

# The documentation site (the docs extra, also in dev): benchmarks page from docs/benchmarks/*.json, then
# the site with warnings as errors into out/site.
docs: $(STAMP)
	$(BIN)/python docs/gen_benchmarks.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The linters at the lock's pins (the dev extra holds the lint extra's ruff and mypy, and the stubs mypy
# checks against): ruff (E, F, B, I at 120 columns) and mypy over stf_pipeline, settings in pyproject.toml.
# mypy keeps its cache in .mypy_cache: a second run checks only what changed.
.PHONY: lint ruff mypy

lint: ruff mypy

ruff: $(STAMP)
	$(BIN)/ruff check .

mypy: $(STAMP)
	$(BIN)/python -m mypy
