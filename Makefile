# Two entry points for a fresh machine; each makes its own virtual environment.
PYTHON ?= python3
VENV ?= .venv

.PHONY: demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev,feedly,docs]"
	touch $@

# The Feedly showcase: ten stages with real in-process models, on an embedded
# PostgreSQL unless FEEDLY_DSN (or --dsn in ARGS) names a server.
demo: $(VENV)/.installed
	$(VENV)/bin/python -m examples.feedly $(ARGS)

# The tests also build a tiny LLaVA offline: torch (CPU build) and transformers.
$(VENV)/.installed-llava: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet "torch==2.13.0" -e ".[feedly-llava]"
	touch $@

test: $(VENV)/.installed-llava
	$(VENV)/bin/pytest $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks
	$(VENV)/bin/mypy
