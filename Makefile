# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint clean gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# DEMO_ARGS: python -m mt_scale.demo's flags, e.g. DEMO_ARGS="--jobs 1 --out runs/demo1"
DEMO_ARGS ?=

demo: $(STAMP)
	$(PY) -m mt_scale.demo $(DEMO_ARGS)

# Tests run in TEST_WORKERS processes (pytest-xdist; 0: in this one). Tests that read the same session
# run (tests/conftest.py) are grouped on one worker, so each run is trained once. The ten slowest tests
# are listed at the end.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=10

test: $(STAMP)
	$(PYTEST)

# The inner loop: every test but the ones marked slow (real training, launches; `make test` runs them too).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check shard_tools pipelines mt_scale tests

clean:
	rm -rf $(VENV) runs build *.egg-info

# The GPU check (docs/performance.md, "GPU check"): the tests marked gpu, then every mt-bench stage on the
# GPU at the ImageNet preset's 40 rows per device (and at the largest batch that fits), written to
# $(GPU_OUT)/gpu.json and gpu.md. Offline, install from a wheel folder: PIP_NO_INDEX=1
# PIP_FIND_LINKS=DIR make gpu-check (docs/performance.md, "Installing without a network").
GPU_OUT ?= bench-out/gpu
GPU_ARGS ?=

gpu-check: $(STAMP)
	$(PY) -m pytest -m gpu -q
	$(VENV)/bin/mt-bench all --device cuda --train-batch-size 40 --train-labeled-per-batch 20 --train-max-batch \
		--json $(GPU_OUT)/gpu.json --markdown $(GPU_OUT)/gpu.md $(GPU_ARGS)
