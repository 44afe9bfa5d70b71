# Two commands do all set-up on a fresh machine that has only Python and pip:
#   make demo   -> .venv, install the locked dependencies and the project, run the embedded demo pipeline
#   make test   -> .venv, install the locked dependencies and the project, ruff, the default test suite
# Dependencies are installed from requirements-lock.txt (exact versions and hashes, Python 3.11 on
# Linux x86-64); pyproject.toml keeps the ranges a user's own environment may resolve. `make lock`
# re-resolves the ranges to today's newest versions and rewrites the lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements-lock.txt
STAMP := $(VENV)/.installed
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28

.PHONY: demo test test-slow lock clean

$(STAMP): $(LOCK) pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stf run pipelines/demo.yaml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# uv resolves for the target platform whatever machine runs it; it lives in its own venv so the
# project's venv holds exactly the lock.
lock:
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/python -m pip install --quiet --upgrade uv
	$(VENV)-lock/bin/uv pip compile pyproject.toml --extra dev $(LOCK_TARGET) --generate-hashes --upgrade \
		--custom-compile-command "make lock" --quiet -o $(LOCK)

clean:
	rm -rf $(VENV) $(VENV)-lock out

.PHONY: docs

# The documentation site (the docs extra, also in dev): benchmarks page from docs/benchmarks/*.json, then
# the site with warnings as errors into out/site.
docs: $(STAMP)
	$(BIN)/python docs/gen_benchmarks.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The linters (the lint extra): ruff (E, F, B, I at 120 columns) and mypy, settings in pyproject.toml.
LINT_STAMP := $(VENV)/.lint-installed

$(LINT_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[lint]"
	touch $(LINT_STAMP)

.PHONY: lint

lint: $(LINT_STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy stf_pipeline
