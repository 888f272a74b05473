# The two commands a new user types: `make demo` and `make test`.
# Each creates or refreshes .venv on first use (and whenever pyproject.toml or
# constraints.txt changes). torch is pinned through constraints.txt in the same
# pip command as everything else, so megatron-core and transformers never pull a
# multi-GB CUDA build of torch.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := megatron,hf,demo,bench,trio,docs,dev
export RAY_AUTH_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test lint typecheck docs bench soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/asyncsync demo

test: $(STAMP) lint typecheck
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check asyncsync tests examples
	$(VENV)/bin/ruff format --check asyncsync tests examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir .site

bench: $(STAMP)
	$(VENV)/bin/asyncsync bench --publish

soak: $(STAMP)
	ASYNCSYNC_SOAK_SECONDS=600 $(PY) -m pytest tests/test_soak.py -p no:cacheprovider

clean:
	rm -rf $(VENV) .site .pytest_cache .mypy_cache .ruff_cache
