# Entry points for a fresh machine; each makes its own virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
# The tiny LLaVA test needs torch. PyPI's default Linux build pulls the CUDA libraries
# (several GB); the CPU build from this index is ~190 MB. When the index cannot be reached,
# pip warns and takes the pinned version from the other indexes.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-llava test-peers lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e ".[dev,feedly,docs]"
	touch $@

# The Feedly showcase: ten stages with real in-process models, on an embedded
# PostgreSQL unless FEEDLY_DSN (or --dsn in ARGS) names a server.
demo: $(VENV)/.installed
	$(VENV)/bin/python -m examples.feedly $(ARGS)

# Every test but the one that loads a model with torch (see test-llava).
test: $(VENV)/.installed
	$(VENV)/bin/pytest -m "not model" $(ARGS)

# The model-loading test: a tiny LLaVA built offline with torch (CPU) and transformers.
$(VENV)/.installed-llava: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --retries 2 --extra-index-url $(TORCH_INDEX) \
		"$(TORCH)" -e ".[feedly-llava]"
	touch $@

test-llava: $(VENV)/.installed-llava
	FEEDLY_REQUIRE_MODELS=1 $(VENV)/bin/pytest -m model $(ARGS)

# benchmarks/peers.py at a tiny size, with the other job queues (an optional extra).
$(VENV)/.installed-peers: $(VENV)/.installed
	$(VENV)/bin/pip install --quiet -e ".[peers]"
	touch $@

test-peers: $(VENV)/.installed-peers
	$(VENV)/bin/pytest tests/integration/test_peers_smoke.py $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests examples benchmarks
	$(VENV)/bin/ruff format --check src tests examples benchmarks
	$(VENV)/bin/mypy
