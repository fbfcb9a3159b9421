# The quick start: `make demo` serves the demo, `make test` runs every check.
# Both do their own set-up: a .venv, the package with its test extras, and the
# system packages the tests drive for real (redis-server, nginx, chromium).

VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: demo test lint typecheck pytest bench bench-smoke system-deps clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,redis,auth,tracing,bench,loadgen]'
	touch $@

system-deps:
	./.ci/system-deps

demo: $(VENV)/.installed
	$(VENV)/bin/trio-stream demo --host $(HOST) --port $(PORT)

lint: $(VENV)/.installed
	$(PY) -m ruff check trio_stream tests examples benchmarks
	$(PY) -m ruff format --check trio_stream tests examples benchmarks

typecheck: $(VENV)/.installed
	$(PY) -m mypy

pytest: $(VENV)/.installed system-deps
	$(PY) -m pytest

test: lint typecheck pytest

bench: $(VENV)/.installed
	$(PY) -m benchmarks

bench-smoke: $(VENV)/.installed
	$(PY) -m benchmarks --smoke

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
