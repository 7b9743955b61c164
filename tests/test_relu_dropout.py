"""relu_dropout: the fused dropout(relu(x)) against the reference dropout of relu(x) (bit-exact, same masks),
its gradient from the output's sign, what it saves, validation, opcheck and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import memtx_ops
from helpers import assert_compiled_dropout_matches_eager, non_finite_activation, saved_by_autograd
from memtx_ops import reference
from memtx_ops.ops.dropout import _relu_dropout_backward_op, _relu_dropout_op

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# sizes around the kernel's batch of 64 elements and its parallel grain (65536)
SHAPES = ((1,), (63,), (65,), (3, 129), (2, 5, 7, 11), (65536 + 37,))


def _seed(value):
    return torch.tensor(value, dtype=torch.int64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_kernel_is_bit_exact_with_reference_dropout_of_relu(shape, dtype):
    x = torch.randn(shape).to(dtype)
    seed = int(torch.randint(-(2**63), 2**63 - 1, ()))
    for p in (0.1, 0.5, 0.9):
        y = _relu_dropout_op(x, p, _seed(seed))
        assert torch.equal(y, reference.dropout(F.relu(x), p, seed))
        assert (y >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_inputs_follow_the_reference(dtype):
    """relu keeps NaN and +inf and zeroes -inf; a dropped element is 0 whatever its value (full batches and tail)."""
    x = non_finite_activation(dtype)
    for p in (0.3, 0.7):
        out = _relu_dropout_op(x, p, _seed(11))
        torch.testing.assert_close(out, reference.dropout(F.relu(x), p, 11), rtol=0, atol=0, equal_nan=True)
        assert out.isnan().any() and out.isinf().any()


def test_gradient_is_the_output_sign_and_equals_unfused_autograd():
    x = torch.randn(7, 300, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 300, dtype=torch.float64)
    torch.manual_seed(4)
    y = memtx_ops.relu_dropout(x, 0.4)
    y.backward(g)
    fused = x.grad.clone()
    torch.testing.assert_close(fused, g * (y > 0) / 0.6, rtol=0, atol=0)
    x.grad = None
    torch.manual_seed(4)
    memtx_ops.dropout(F.relu(x), 0.4).backward(g)  # the same seed: the same mask
    assert torch.equal(fused, x.grad)
    assert (fused == 0).any() and (fused != 0).any()


def test_non_finite_gradient_is_zero_where_nothing_passed():
    y = torch.tensor([0.0, 1.5, 0.0, 2.0, 0.0]).repeat(7)  # two vectors of 16 and a tail
    g = torch.tensor([float("inf"), float("inf"), float("nan"), float("nan"), -float("inf")]).repeat(7)
    dx = _relu_dropout_backward_op(g, y, 0.5)
    expected = torch.tensor([0.0, float("inf"), 0.0, float("nan"), 0.0]).repeat(7)
    torch.testing.assert_close(dx, expected, rtol=0, atol=0, equal_nan=True)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(3, 70, dtype=torch.float64)
    x = (x + 0.1 * x.sign()).requires_grad_()  # keep every element away from relu's kink
    seed = _seed(99)
    fn = lambda t: _relu_dropout_op(t, 0.3, seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_backward_saves_only_the_output():
    x = torch.randn(256, 1024, requires_grad=True)
    y, saved = saved_by_autograd(lambda: memtx_ops.relu_dropout(x, 0.1))
    y.sum().backward()
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()


def test_reference_and_cpu_backends_agree_for_the_same_generator_state():
    x = torch.randn(777)
    torch.manual_seed(11)
    a = memtx_ops.relu_dropout(x, 0.3, backend="cpu")
    torch.manual_seed(11)
    b = memtx_ops.relu_dropout(x, 0.3, backend="reference")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference", "torch"])
def test_backends_keep_the_right_fraction(backend):
    x = torch.rand(1 << 16) + 0.5  # positive: relu passes everything
    y = memtx_ops.relu_dropout(x, 0.25, backend=backend)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert abs(float(kept.float().mean()) - 0.75) < 0.02
    assert torch.equal(memtx_ops.relu_dropout(-x, 0.25, backend=backend), torch.zeros_like(x))


def test_identity_and_zero_cases():
    x = torch.randn(10, 10, requires_grad=True)
    assert torch.equal(memtx_ops.relu_dropout(x, 0.5, training=False), F.relu(x))
    assert torch.equal(memtx_ops.relu_dropout(x, 0.0), F.relu(x))
    y = memtx_ops.relu_dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=[1.0]), TypeError, "relu_dropout: x must be a tensor"),
        (dict(x=torch.ones(3, dtype=torch.int32)), TypeError, "relu_dropout: x must be float16"),
        (dict(p=None), TypeError, "relu_dropout: p must be a float"),
        (dict(p=2.0), ValueError, r"relu_dropout: p must be in \[0, 1\]"),
        (dict(training="yes"), TypeError, "relu_dropout: training must be a bool"),
        (dict(backend="cuda"), ValueError, "relu_dropout: backend must be one of"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(x=torch.ones(3), p=0.1, training=True, backend="auto")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        memtx_ops.relu_dropout(args.pop("x"), args.pop("p"), args.pop("training"), **args)


def test_opcheck():
    x = torch.randn(3, 70, requires_grad=True)
    torch.library.opcheck(torch.ops.memtx_ops.relu_dropout, (x, 0.3, _seed(5)))
    y = F.relu(torch.randn(3, 70))
    torch.library.opcheck(torch.ops.memtx_ops.relu_dropout_backward, (torch.randn(3, 70, requires_grad=True), y, 0.3))


def test_compile_matches_eager():
    assert_compiled_dropout_matches_eager(memtx_ops.relu_dropout)


def test_backward_op_is_linear_in_grad():
    y = F.relu(torch.randn(50, dtype=torch.float64))
    g = torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(_relu_dropout_backward_op(2 * g, y, 0.2), 2 * _relu_dropout_backward_op(g, y, 0.2),
                               rtol=0, atol=0)
