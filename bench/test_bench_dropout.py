"""pytest-benchmark cases of dropout and relu_dropout (forward+backward) on the CPU:
``pytest bench/ --benchmark-only``."""

import pytest
import torch

from bench.suites.dropout import RELU_SHAPES, SHAPES, VARIANTS


CASES = [("dropout", s) for s in SHAPES] + [("relu_dropout", s) for s in RELU_SHAPES]


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("op, shape", CASES, ids=lambda c: c if isinstance(c, str) else "x".join(map(str, c)))
def test_fwd_bwd(benchmark, op, backend, shape):
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    fn = VARIANTS[op][backend]

    def step():
        x.grad = None
        fn(x).backward(grad)

    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
