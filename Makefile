# Two commands do all set-up on a fresh machine that has only Python and pip:
#   make demo   -> .venv, install .[dev], run the embedded demo pipeline
#   make test   -> .venv, install .[dev], run the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stf run pipelines/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) out

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
