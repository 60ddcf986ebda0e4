# The two commands of the README:
#   make run    set up and run the main job
#   make test   set up and run the test suite
PYTHON ?= python3
VENV ?= .venv
PY = $(VENV)/bin/python
# Offline at run time (PyPI only during setup); idle OpenMP threads sleep instead of spinning, which keeps torch
# fast on a machine whose cores are shared.
export HF_HUB_OFFLINE ?= 1
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: setup run test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build of 2.13.0 is what we test; an unpinned torch pulls the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# eval: lm-evaluation-harness and matplotlib, used by the main job and its tests
	$(PY) -m pip install -q -e ".[test,eval]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m modeling_muddpythia.cli main --output outputs

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
