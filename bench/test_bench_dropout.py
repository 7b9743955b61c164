"""pytest-benchmark cases of dropout (forward+backward) on the CPU: ``pytest bench/ --benchmark-only``."""

import pytest
import torch

from bench.suites.dropout import P, SHAPES
import memtx_ops


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fwd_bwd(benchmark, backend, shape):
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)

    def step():
        x.grad = None
        memtx_ops.dropout(x, P, backend=backend).backward(grad)

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
