# The two commands a new user types: `make demo` and `make test`.
# Each creates or refreshes .venv on first use (and whenever pyproject.toml or
# constraints.txt changes): `make demo` installs only what the demo needs (the
# library and the `demo` extra), everything else installs every extra. torch is
# pinned through constraints.txt in the same pip command as everything else, so
# megatron-core and transformers never pull a multi-GB CUDA build of torch.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
EXTRAS := megatron,hf,demo,bench,trio,docs,metrics,dev
export RAY_AUTH_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test lint typecheck docs browser bench bench-full soak clean

venv: $(STAMP)

# Every extra also covers the demo's, so it stamps both.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[$(EXTRAS)]"
	touch $(STAMP) $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0 -e ".[demo]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(VENV)/bin/asyncsync demo

# Two pytest processes, one Ray each: the main suite on a one-node local Ray
# (tests/multinode excluded in pyproject.toml), then the multi-node suite on a head
# and three worker nodes. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read when ray is
# imported) keeps every address of that cluster on the loopback interface.
test: $(STAMP) browser lint typecheck
	$(PY) -m pytest
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(PY) -m pytest tests/multinode

lint: $(STAMP)
	$(VENV)/bin/ruff check asyncsync tests examples benchmarks
	$(VENV)/bin/ruff format --check asyncsync tests examples benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The site, into .site/. The first build fetches the mermaid renderer from the npm
# registry (docs/_ext/mermaid_offline.py), so diagrams render with no network.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir .site

# Debian's headless Chromium, in which tests/test_docs.py checks that every diagram
# renders offline. Installed if missing (apt, as root; about 30 s); where that is
# not possible the check is skipped, except under CI=true where it fails.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the docs' diagram check will be skipped"


# The bench is the repository's benchmarks/ package (not in the wheel): it measures,
# then publishes BENCHMARKS.md and benchmarks/bench.png (about 5 minutes, and about a
# minute more for the delta-sync section: --delta-engines none --delta-lrs none skips it).
bench: $(STAMP)
	$(PY) -m benchmarks --publish

# The run BENCHMARKS.md comes from: both sizes on 1 and 2 engines, fleet rows up to
# 16 engines, delta sessions to 1 and 8 engines, and 6 engines over 1 to 3 nodes of a
# local cluster (about 15 minutes).
bench-full: $(STAMP)
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 $(PY) -m benchmarks --publish --engines 1,2 \
	  --fleet-engines 1,2,4,8,16 --delta-engines 1,8 --nodes 3

soak: $(STAMP)
	ASYNCSYNC_SOAK_SECONDS=600 $(PY) -m pytest tests/test_soak.py -p no:cacheprovider

clean:
	rm -rf $(VENV) .site .cache .pytest_cache .mypy_cache .ruff_cache
