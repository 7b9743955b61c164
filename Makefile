# Two commands on a fresh machine: `make bench` (the report) and `make test` (the test suite).
# Both install what they need first: torch is pinned where it is missing (an unpinned torch would pull several GB
# of CUDA wheels on a CPU machine), everything else comes from requirements-dev.txt.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: install test bench

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) -m bench
