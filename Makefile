# The two commands users need: `make demo` and `make test`. Everything else is set up on demand.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Re-install only when the lock or the package metadata changes.
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
export OMP_NUM_THREADS ?= 1
# Built once and reused: the default base trunk, feature caches (content-addressed).
export BACKDOOR_GATE_CACHE ?= $(CURDIR)/.cache/backdoor-gate
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-browser test-fast lint format demo bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned stack into $(VENV) (first time ~2-3 min; log: $(VENV)/install.log)"
	@$(PY) -m pip install --no-deps -r requirements.lock > $(VENV)/install.log 2>&1 \
	  || { tail -30 $(VENV)/install.log; exit 1; }
	@$(PY) -m pip install --no-deps --no-build-isolation -e . >> $(VENV)/install.log 2>&1 \
	  || { tail -30 $(VENV)/install.log; exit 1; }
	@rm -f $(VENV)/.installed-*
	@touch $@
	@echo "setup done: $(VENV)"

# CI runs this (.ci/run): linters, the system packages the browser test needs, then every test,
# slow ones included, on TEST_WORKERS processes (pytest-xdist; a module's tests stay on one,
# tests/conftest.py); prints the slowest and the total.
TEST_WORKERS ?= 2
test: lint test-browser
	@start=$$(date +%s); $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=20 --durations-min=5 tests; rc=$$?; \
	  echo "make test: pytest took $$(( $$(date +%s) - start )) s"; exit $$rc

# Debian's chromium and fonts for tests/integration/test_review_page.py: installed with apt-get when
# root, else it says before the run that the test will be skipped and why.
test-browser:
	@tests/ensure-browser.sh

# The inner loop: everything but the tests marked slow (end-to-end training, pipelines, servers).
test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" --durations=10 tests

# ruff (lint + format check) and mypy over the whole tree; `make format` applies ruff's fixes.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo: setup
	OMP_NUM_THREADS=2 $(PY) -m backdoor_gate demo

bench: setup
	$(PY) -m backdoor_gate bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# Container images (never part of `make test`): images/build.sh builds them with docker (BuildKit),
# starting dockerd when none runs. Tags follow components/images.py; override with
# BACKDOOR_GATE_IMAGE_REGISTRY / _TAG (and compile the pipelines with the same values).
# Where no registry is reachable, `make base-image` first (debootstrap Debian 12 + Python 3.11).
IMAGE_REGISTRY ?= $(or $(BACKDOOR_GATE_IMAGE_REGISTRY),ghcr.io/backdoor-gate)
IMAGE_TAG ?= $(or $(BACKDOOR_GATE_IMAGE_TAG),$(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' detector/__init__.py))
.PHONY: images base-image test-images
images:
	IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) images/build.sh

base-image:
	images/base-image.sh

# Builds (cached), then runs both pipelines, the webhook and the image checks in the images
# (tests/integration/test_images_run.py; README, "Images", for its time). Needs root for dockerd.
test-images: setup images
	IMAGE_REGISTRY=$(IMAGE_REGISTRY) IMAGE_TAG=$(IMAGE_TAG) BACKDOOR_GATE_RUN_IMAGES=1 \
	  $(PY) -m pytest -q -m images --durations=10 tests/integration/test_images_run.py
