# The README's two commands: `make run` (whole pipeline on MovieLens-100K) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
# the suite on 2 pytest-xdist workers, a test file per worker at a time (tests/conftest.py);
# `make test XDIST=` runs it in one process
XDIST ?= -n 2 --dist loadgroup --no-loadscope-reorder

.PHONY: env lock run test test-all lint format clean

env:
	@bash scripts/bootstrap.sh

# regenerate requirements.lock from setup.cfg (ARGS=--upgrade for newer releases)
lock:
	@ARGS="$(ARGS)" bash scripts/lock.sh

run: env
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m jobs.pipeline experiment=ml100k $(ARGS)

test: env
	WANDB_MODE=disabled $(PY) -m pytest -m "not slow" -q $(XDIST) $(ARGS)

test-all: env
	WANDB_MODE=disabled $(PY) -m pytest -q $(XDIST) $(ARGS)

# what CI runs before the tests: lint, format check, types (pyproject.toml configures all three)
lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: env
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf outputs multirun .pytest_cache .mypy_cache .ruff_cache
