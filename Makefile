# The README's two commands: `make run` (whole pipeline on MovieLens-100K) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: env run test test-all clean

env:
	@bash scripts/bootstrap.sh

run: env
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m jobs.pipeline experiment=ml100k $(ARGS)

test: env
	WANDB_MODE=disabled $(PY) -m pytest -m "not slow" -q $(ARGS)

test-all: env
	WANDB_MODE=disabled $(PY) -m pytest -q $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
