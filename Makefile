# Two commands matter: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment in $(VENV) when it is missing and install what is needed.
# Use an existing environment (and its torch) with `make test VENV=/path/to/venv`.

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.facerec-requirements
DATA ?= ../shared/data
DEMO_DIR ?= work_dirs/demo
# test workers (pytest-xdist): one per core this process may use, at most 4; TEST_WORKERS=0 runs in-process
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))" 2>/dev/null || echo 2)

.PHONY: setup test test-fast lint demo bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# Keep a torch that is already there (CUDA builds, nightlies); otherwise take the pinned release.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

demo: setup
	FACEREC_DATA=$(DATA) $(PY) -m scripts.demo --data $(DATA) --out $(DEMO_DIR) \
		$(if $(CELEBA),--celeba $(CELEBA)) $(if $(LFW),--lfw $(LFW)) $(if $(PAIRS),--lfw-pairs $(PAIRS)) \
		$(if $(CONFIG),--config $(CONFIG))

bench: setup
	$(PY) -m scripts.bench_data

clean:
	rm -rf .pytest_cache .ruff_cache $(DEMO_DIR)
