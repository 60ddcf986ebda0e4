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
# Which torch build setup installs (docs/development.md, Install in detail):
#   TORCH=cpu   (default) the CPU build from PyTorch's wheel index TORCH_INDEX (about 190 MB); if that index cannot
#               be reached, the plain pin from pip's usual index instead, with a message saying so
#   TORCH=pypi  the plain pin from pip's usual index (on Linux x86_64: the CUDA build, about 2.7 GB)
# Setup ends by printing the installed build (also in $(VENV)/torch-build.txt). Another index, e.g. a CUDA one:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu130
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: setup run test test-setup clean

# What the main job needs: torch, the package and its `eval` extra (lm-evaluation-harness, matplotlib).
$(VENV)/.installed: setup.cfg pyproject.toml tools/install_torch.py
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU build of 2.13.0 is what we test; an unpinned torch pulls the CUDA build.
	$(PY) tools/install_torch.py --version $(TORCH_VERSION) --build $(TORCH) --index $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[eval]"
	@cat $(VENV)/torch-build.txt
	touch $@

# What the test suite needs on top: the `test` extra (pytest, peft, datasets, tensorstore, triton, ...).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,eval]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m modeling_muddpythia.cli main --output outputs

# transformers' own common model tests (ModelTesterMixin, ConfigTester, ...) are not in the wheel: fetch the sdist of
# the installed (pinned) version from the package index and unpack its tests/ into the ignored build/ folder, where
# tests/transformers_common.py finds them. Nothing of it is copied into the repository.
HF_TESTS = build/transformers-tests
$(HF_TESTS)/.unpacked: $(VENV)/.installed-test
	rm -rf $(HF_TESTS) && mkdir -p $(HF_TESTS)
	version=$$($(PY) -c "import transformers; print(transformers.__version__)") && \
	$(PY) -m pip download -q --no-deps --no-binary :all: "transformers==$$version" -d $(HF_TESTS) && \
	tar -xzf $(HF_TESTS)/transformers-$$version.tar.gz -C $(HF_TESTS) --strip-components=1 "transformers-$$version/tests" && \
	echo "$$version" > $(HF_TESTS)/VERSION && rm $(HF_TESTS)/transformers-$$version.tar.gz
	touch $@

test-setup: $(VENV)/.installed-test $(HF_TESTS)/.unpacked

test: test-setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) outputs build/transformers-tests
