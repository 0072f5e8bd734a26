# Two entry points: `make demo` and `make test`. Both set up .venv from pyproject.toml first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo lint test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[s3,test,demo]'
	# the last mediapipe wheel that bundles its face models; --no-deps: see pyproject.toml
	$(PY) -m pip install -q --no-deps 'mediapipe==0.10.21'
	# headless Chromium for the report and eval page tests (they skip without it)
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && apt-get install -y -q chromium) || true
	touch $(STAMP)

demo: setup
	$(VENV)/bin/stabledub demo --output demo-output

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

bench: setup
	$(PY) -m pip install -q -e '.[decord]'  # bench/decode.py compares the decord backend too
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) demo-output .pytest_cache
