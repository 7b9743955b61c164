# Two commands on a fresh machine: `make bench` (the report) and `make test` (the test suite).
# Both install what they need first: torch is pinned where it is missing (an unpinned torch would pull several GB
# of CUDA wheels on a CPU machine), everything else comes from requirements-dev.txt.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: install test bench check-aot check-cuda-resources check-cuda-build gpu-check

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install --no-build-isolation --no-deps -e .

# One pytest-xdist worker per core, each with its share of torch's threads (tests/conftest.py): on 2 cores the suite
# takes about 10 minutes instead of 16. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto

test: install
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) tests

bench: install
	$(PYTHON) -m bench

# GPU readiness without a GPU (see bench/aot_triton.py, bench/cuda_resources.py, bench/check_cuda_build.sh).
# check-aot compiles every Triton kernel config for sm_90 and sm_80 with the GPU image's Triton, installed beside
# the one the tests use (4.4-7.7 min on 2 cores from scratch, cached after; AOT_FLAGS=--sample: of the float32
# configs of a group only the first that fits).
AOT_TRITON ?= 3.6.0
AOT_DIR ?= $(HOME)/.cache/memtx-aot/triton-$(AOT_TRITON)
AOT_FLAGS ?=

check-aot: install
	test -d $(AOT_DIR)/triton || $(PYTHON) -m pip install -q --no-deps --target $(AOT_DIR) triton==$(AOT_TRITON)
	PYTHONPATH=$(AOT_DIR) $(PYTHON) -m bench.aot_triton $(AOT_FLAGS)

check-cuda-resources:
	$(PYTHON) -m bench.cuda_resources

check-cuda-build:
	bench/check_cuda_build.sh

# On a machine with a GPU: the one prepared check (build, GPU tests, decoding, model, generation, sanitizers, reduced
# bench), at most 9.5 min. GPU_CHECK_ARGS="--steps build,tests --budget 300" runs some steps (bench/gpu_check.py).
# Results in /tmp/gpu-check-<device>, packed after every step into $OUT/gpu-check-<device>.tgz where OUT is set.
GPU_CHECK_ARGS ?=

gpu-check:
	$(PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)
