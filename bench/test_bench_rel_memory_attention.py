"""pytest-benchmark cases of rel_memory_attention (forward+backward): ``pytest bench/ --benchmark-only``."""

import pytest
import torch

from bench.harness import attention_inputs, default_device
from bench.suites.rel_memory_attention import backend_fn, default_config

DEVICE = default_device()
CONFIG = default_config(DEVICE)


@pytest.mark.parametrize("backend", CONFIG["backends"])
@pytest.mark.parametrize("length", CONFIG["lengths"])
def test_fwd_bwd(benchmark, backend, length):
    fn, reason = backend_fn(backend, DEVICE)
    if fn is None:
        pytest.skip(f"{backend} is not available on {DEVICE}: {reason}")
    D, dtype = CONFIG["head_dims"][0], getattr(torch, CONFIG["dtypes"][0])
    inputs = attention_inputs(CONFIG["batch"], CONFIG["heads"], length, length, D, dtype, DEVICE)
    grad = torch.randn_like(inputs[0])

    def step():
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(grad)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
