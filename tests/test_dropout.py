"""dropout: the C++ Philox kernel against the plain-PyTorch reference (bit-exact), mask statistics, gradients,
reproducibility, memory, validation, opcheck and torch.compile."""

import math

import pytest
import torch

import memtx_ops
from helpers import assert_compiled_dropout_matches_eager, non_finite_activation, saved_by_autograd
from memtx_ops import reference
from memtx_ops.ops.dropout import _dropout_op
from memtx_ops.nn import Dropout

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# sizes around the kernel's batch of 64 elements (16 counters x 4 words) and its parallel grain (65536)
SHAPES = ((1,), (63,), (64,), (65,), (3, 129), (2, 5, 7, 11), (65536 + 37,), (300, 1000))


def _seed(value):
    return torch.tensor(value, dtype=torch.int64)


def test_philox_matches_the_published_known_answers():
    """Random123's known-answer vectors for philox4x32-10."""
    words = lambda *v: tuple(torch.tensor([x], dtype=torch.int64) for x in v)  # noqa: E731
    cases = [
        (words(0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (words(*[0xFFFFFFFF] * 4), (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (words(0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        assert tuple(int(w) for w in reference.philox4x32_10(counter, key)) == expected


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_kernel_is_bit_exact_with_reference(shape, dtype):
    x = torch.randn(shape).to(dtype)
    seed = int(torch.randint(-(2**63), 2**63 - 1, ()))
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(_dropout_op(x, p, _seed(seed)), reference.dropout(x, p, seed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_inputs_follow_the_reference(dtype):
    """A dropped inf or NaN gives 0 and a kept one stays non-finite, as the reference's select does (a multiply by
    the 0/1 mask would give NaN), in the full batches of 64 and in the tail."""
    x = non_finite_activation(dtype)
    for p in (0.3, 0.7):
        out = _dropout_op(x, p, _seed(11))
        torch.testing.assert_close(out, reference.dropout(x, p, 11), rtol=0, atol=0, equal_nan=True)
        assert (out == 0).any() and out.isnan().any() and out.isinf().any()


def test_strided_input_uses_logical_element_order():
    base = torch.randn(40, 30)
    x = base.t()  # not contiguous
    assert torch.equal(_dropout_op(x, 0.3, _seed(7)), reference.dropout(x.contiguous(), 0.3, 7))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_and_scale(p):
    n = 1 << 20
    y = memtx_ops.dropout(torch.ones(n), p)
    kept = y != 0
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(int(kept.sum()) - n * (1 - p)) < 6 * sigma
    assert torch.all(y[kept] == torch.tensor(1 / (1 - p), dtype=torch.float32))
    # every random word of the Philox output and every counter lane keeps 1 - p of its elements
    per_slot = kept.view(-1, 4, 16).float().mean(0)
    slot_sigma = math.sqrt(p * (1 - p) / (n // 64))
    assert (per_slot - (1 - p)).abs().max() < 6 * slot_sigma


def test_masks_of_neighbours_and_of_calls_are_independent():
    n, p = 1 << 20, 0.5
    a = (memtx_ops.dropout(torch.ones(n), p) != 0).float() - 0.5
    b = (memtx_ops.dropout(torch.ones(n), p) != 0).float() - 0.5
    bound = 6 * 0.25 / math.sqrt(n)  # 6 sigma of a correlation of independent fair coins (variance 1/16 / n)
    assert abs(float((a * b).mean())) < bound  # two calls draw different seeds
    for lag in (1, 4, 16, 64):
        assert abs(float((a[lag:] * a[:-lag]).mean())) < bound


def test_gradient_applies_the_same_mask():
    x = torch.randn(5, 1000, dtype=torch.float64, requires_grad=True)
    y = memtx_ops.dropout(x, 0.4)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * (y != 0) / 0.6, rtol=0, atol=0)
    seed = _seed(12345)
    assert torch.autograd.gradcheck(lambda t: _dropout_op(t, 0.3, seed), (torch.randn(3, 70, dtype=torch.float64,
                                                                                     requires_grad=True),))


def test_backward_keeps_only_the_seed():
    x = torch.randn(256, 1024, requires_grad=True)
    _, saved = saved_by_autograd(lambda: memtx_ops.dropout(x, 0.1).sum().backward())
    assert sum(t.numel() * t.element_size() for t in saved) == 8


def test_manual_seed_reproduces_masks():
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = memtx_ops.dropout(x, 0.5)
    torch.manual_seed(3)
    b = memtx_ops.dropout(x, 0.5)
    c = memtx_ops.dropout(x, 0.5)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_identity_and_zero_cases():
    x = torch.randn(10, 10, requires_grad=True)
    assert memtx_ops.dropout(x, 0.5, training=False) is x
    assert memtx_ops.dropout(x, 0.0) is x
    y = memtx_ops.dropout(x, 1.0)
    assert torch.equal(y, torch.zeros_like(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", ["cpu", "reference", "torch"])
def test_backends_agree_in_distribution(backend):
    y = memtx_ops.dropout(torch.ones(1 << 16), 0.25, backend=backend)
    values = torch.unique(y)
    assert len(values) == 2 and values[0] == 0 and values[1] == torch.tensor(4 / 3)
    assert abs(float((y == 0).float().mean()) - 0.25) < 0.02


def test_reference_backend_equals_cpu_backend_for_the_same_generator_state():
    x = torch.randn(777)
    torch.manual_seed(11)
    a = memtx_ops.dropout(x, 0.3, backend="cpu")
    torch.manual_seed(11)
    b = memtx_ops.dropout(x, 0.3, backend="reference")
    assert torch.equal(a, b)


def test_module_is_a_drop_in_dropout():
    layer = Dropout(0.2)
    assert isinstance(layer, torch.nn.Dropout) and "backend='auto'" in repr(layer)
    x = torch.randn(4, 1000)
    y = layer(x)
    assert ((y == 0) | torch.isclose(y, x / 0.8)).all() and (y == 0).any()
    layer.eval()
    assert layer(x) is x
    with pytest.raises(ValueError, match="backend"):
        Dropout(0.2, backend="cuda")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(x=[1.0]), TypeError, "x must be a tensor"),
        (dict(x=torch.ones(3, dtype=torch.int64)), TypeError, "x must be float16"),
        (dict(p="0.1"), TypeError, "p must be a float"),
        (dict(p=True), TypeError, "p must be a float"),
        (dict(p=1.5), ValueError, r"p must be in \[0, 1\]"),
        (dict(p=-0.1), ValueError, r"p must be in \[0, 1\]"),
        (dict(training=1), TypeError, "training must be a bool"),
        (dict(backend="triton"), ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(x=torch.ones(3), p=0.1, training=True, backend="auto")
    args.update(kwargs)
    with pytest.raises(error, match=match):
        memtx_ops.dropout(args.pop("x"), args.pop("p"), args.pop("training"), **args)


def test_opcheck():
    x = torch.randn(3, 70, requires_grad=True)
    torch.library.opcheck(torch.ops.memtx_ops.dropout, (x, 0.3, _seed(5)))


def test_compile_matches_eager():
    assert_compiled_dropout_matches_eager(memtx_ops.dropout)


def test_auto_uses_torch_dropout_off_the_cpu():
    from memtx_ops.ops.dropout import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="needs a CPU tensor"):
        resolve_backend("cpu", torch.device("cuda"))
