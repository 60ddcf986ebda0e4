# The two commands of the README:
#   make run    set up and run the main job
#   make test   set up and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python

.PHONY: setup run test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build of 2.13.0 is what we test; an unpinned torch pulls the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m modeling_muddpythia.cli demo --output outputs/demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
