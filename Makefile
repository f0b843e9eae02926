# mailfs developer entry points. `make demo` and `make test` are all a newcomer needs.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test demo lint bench

setup:
	@scripts/setup.sh

test: setup
	$(VENV)/bin/pytest -ra tests/

demo: setup
	$(PY) scripts/demo.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) -m bench.run_all --layout all --replication
