# Two entry points: `make demo` and `make test`. Both set up .venv from pyproject.toml first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo lint test test-fast bench constraints pack train-cpu train-gpu clean

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

# cluster/constraints.txt: exact versions of the image's runtime dependencies, from this environment
# (after `make setup` resolved pyproject.toml); cluster/Dockerfile installs with `-c` it.
constraints: setup
	$(PY) cluster/constraints.py cluster/constraints.txt

# The model recipe (training/recipe.py, models/README.md). `make pack` on a CPU machine writes the
# training pack (.pack, <= 40 MiB) and the one wheel a bare GPU box lacks (.whl: diffusers);
# `make train-gpu` there (python3 with torch, opencv, einops) trains the shipped configuration.
GPU_PYTHON ?= python3
RECIPE_OUT ?= out/recipe

pack: setup
	$(PY) -m training.pack .pack
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .whl "diffusers==$$($(PY) -c 'import diffusers; print(diffusers.__version__)')"

train-cpu: setup
	$(PY) -m training.recipe .pack $(RECIPE_OUT)-cpu --config models/configs/recipe_cpu.yaml

train-gpu:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --target /tmp/stabledub-site .whl/*.whl
	PYTHONPATH=/tmp/stabledub-site:. $(GPU_PYTHON) -m training.recipe .pack $(RECIPE_OUT)-gpu --config models/configs/recipe_gpu.yaml

clean:
	rm -rf $(VENV) demo-output .pytest_cache
