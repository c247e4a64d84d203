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

demo: $(STAMP)
	$(PY) -m mt_scale.demo

# Tests run in TEST_WORKERS processes (pytest-xdist; 0: in this one). Tests that read the same session
# run (tests/conftest.py) are grouped on one worker, so each run is trained once.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP)
	$(PYTEST)

# The inner loop: every test but the ones marked slow (real training, launches; `make test` runs them too).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check shard_tools pipelines mt_scale tests

clean:
	rm -rf $(VENV) runs build *.egg-info

# The GPU check (issue 14; docs/performance.md, "GPU check"), on a machine with a GPU and no network,
# with the machine's own Python (no venv): joins the wheels split into parts under $(WHEELS), installs
# from there what that Python lacks (never from the network), then runs the kit and writes
# $(GPU_OUT)/gpu.json and gpu.md. `make gpu-check GPU_ARGS=--dry-run` rehearses it on a CPU.
GPU_PYTHON ?= python3
WHEELS ?= .whl
GPU_OUT ?= bench-out/gpu
GPU_ARGS ?=

gpu-check:
	$(GPU_PYTHON) -m mt_scale.bench.gpu gpu --wheels $(WHEELS) --install-only
	$(GPU_PYTHON) -m mt_scale.bench.gpu gpu --json $(GPU_OUT)/gpu.json --markdown $(GPU_OUT)/gpu.md $(GPU_ARGS)
