"""causal_downsample and upsample_add (SPEC §4): the reference against the SPEC's index formulas, every fused backend
against the float64 reference (outputs and every gradient, odd sizes, tile-crossing shapes, the layouts a model hands
over), validation, opcheck, torch.compile, what backward keeps, determinism.

The Triton kernels run in the interpreter without a GPU (float32 and float16 there: its bfloat16 is wrong).
"""

import importlib.util

import pytest
import torch

import memtx_ops
from helpers import assert_close_to_reference, saved_by_autograd
from memtx_ops import reference
from memtx_ops.backends.causal_resample import RESAMPLE_BACKENDS, resolve_resample_backend
from memtx_ops.backends.triton import interpreter_enabled

ON_CUDA = torch.cuda.is_available() and not interpreter_enabled()
TRITON_DEVICE = "cuda" if ON_CUDA else "cpu"
TRITON_REASON = ("triton is not installed" if importlib.util.find_spec("triton") is None else
                 None if ON_CUDA or interpreter_enabled() else
                 "backend 'triton' needs a CUDA device or TRITON_INTERPRET=1 (set before triton is imported)")
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=TRITON_REASON or "")

CPU_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if ON_CUDA else ())
# (B, L, d, factor): factor 1, a single group (factor = L), d of 1 and d past the C++ kernel's 512-column blocks,
# d not a multiple of any vector width; L / factor past the Triton interpreter's 8-row tiles, d past its 32 columns.
CPU_CASES = [(1, 1, 1, 1), (2, 12, 7, 3), (3, 20, 37, 4), (2, 15, 64, 5), (1, 9, 129, 9), (1, 6, 515, 3),
             (2, 34, 300, 2)]
TRITON_CASES = [(1, 4, 16, 1), (2, 30, 37, 3), (1, 10, 70, 5), (2, 9, 8, 9)]
LAYOUTS = ("contiguous", "time_major", "padded", "strided_last")


def rows(B, L, d, dtype, device, layout="contiguous", gen=None):
    """A leaf ``[B, L, d]`` in ``layout``: contiguous; a time-major ``[L, B, d]`` tensor's transpose; a slice of a
    padded buffer (rows and columns around it); every other column of a wider tensor (non-unit last stride)."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)

    if layout == "contiguous":
        t = randn(B, L, d)
    elif layout == "time_major":
        t = randn(L, B, d).transpose(0, 1)
    elif layout == "padded":
        t = randn(B + 1, L + 3, d + 5)[1:, 2: 2 + L, 3: 3 + d]
    else:
        t = randn(B, L, 2 * d)[..., ::2]
    return t.detach().requires_grad_()


def downsample_inputs(case, dtype, device, layout="contiguous", with_prev=True, with_weights=True, seed=0):
    B, L, d, k = case
    gen = torch.Generator().manual_seed(seed)
    x = rows(B, L, d, dtype, device, layout, gen)
    prev = rows(B, k - 1, d, dtype, device, layout, gen) if with_prev else None
    weights = (torch.randn(k, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()
               if with_weights else None)
    return x, prev, weights


def float64_leaves(tensors):
    return [None if t is None else t.detach().to(torch.float64).requires_grad_() for t in tensors]


def assert_downsample_matches_reference(backend, case, dtype, device="cpu", layout="contiguous", with_prev=True,
                                        with_weights=True):
    x, prev, weights = downsample_inputs(case, dtype, device, layout, with_prev, with_weights)
    k = case[3]
    y = memtx_ops.causal_downsample(x, k, prev=prev, weights=weights, backend=backend)
    assert y.shape == (case[0], case[1] // k, case[2]) and y.dtype == dtype
    grad = torch.randn_like(y)
    names = [n for n, t in (("dx", x), ("dprev", prev), ("dweights", weights)) if t is not None]
    leaves = [t for t in (x, prev, weights) if t is not None]
    grads = torch.autograd.grad(y, leaves, grad)
    ref_x, ref_prev, ref_w = float64_leaves((x, prev, weights))
    ref_y = reference.causal_downsample(ref_x, k, ref_prev, ref_w)
    ref_leaves = [t for t in (ref_x, ref_prev, ref_w) if t is not None]
    ref_grads = torch.autograd.grad(ref_y, ref_leaves, grad.to(torch.float64))
    for name, g, t in zip(names, grads, leaves):
        assert g.shape == t.shape and g.dtype == t.dtype, name
    units = {"dweights": weights_grad_unit(ref_x, ref_prev, ref_w, grad, k)} if weights is not None else None
    assert_close_to_reference(dict(y=y, **dict(zip(names, grads))), dict(y=ref_y, **dict(zip(names, ref_grads))),
                              dtype, units=units,
                              context=f"{backend} {case} {layout} prev={with_prev} weights={with_weights}")


def weights_grad_unit(x, prev, weights, grad, k):
    """Unit (tests/helpers.reference_errors) of dweights: ``dweights[r]`` sums n = B * L/k * d products
    ``s[b, m*k + r, c] * grad[b, m, c]``, so two summation orders differ by about ``sqrt(n)`` roundings of the terms
    however much the sum cancels. The unit is ``max_r sum |terms| / sqrt(n)``: the size of an uncancelled sum (it
    equals ``|dweights|`` when the terms do not cancel, and changes nothing then)."""
    abs_x = x.detach().abs()
    abs_prev = None if prev is None else prev.detach().abs()
    w = torch.ones_like(weights, requires_grad=True)
    (total,) = torch.autograd.grad(reference.causal_downsample(abs_x, k, abs_prev, w), w,
                                   grad.detach().to(torch.float64).abs())
    return total.max().item() / grad.numel() ** 0.5


def upsample_inputs(case, dtype, device, layout="contiguous", with_prev=False, seed=0):
    B, L, d, k = case
    gen = torch.Generator().manual_seed(seed)
    x_short = rows(B, L // k, d, dtype, device, layout, gen)
    residual = rows(B, L, d, dtype, device, layout, gen)
    prev = rows(B, 1, d, dtype, device, layout, gen) if with_prev else None
    return x_short, residual, prev


def assert_upsample_matches_reference(backend, case, dtype, mode, device="cpu", layout="contiguous", with_prev=False):
    x_short, residual, prev = upsample_inputs(case, dtype, device, layout, with_prev)
    k = case[3]
    out = memtx_ops.upsample_add(x_short, residual, k, mode=mode, prev=prev, backend=backend)
    assert out.shape == residual.shape and out.dtype == dtype
    grad = torch.randn_like(out)
    names = [n for n, t in (("dx_short", x_short), ("dresidual", residual), ("dprev", prev)) if t is not None]
    leaves = [t for t in (x_short, residual, prev) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad)
    ref_short, ref_res, ref_prev = float64_leaves((x_short, residual, prev))
    ref_out = reference.upsample_add(ref_short, ref_res, k, mode, ref_prev)
    ref_leaves = [t for t in (ref_short, ref_res, ref_prev) if t is not None]
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, grad.to(torch.float64))
    for name, g, t in zip(names, grads, leaves):
        assert g.shape == t.shape and g.dtype == t.dtype, name
    assert_close_to_reference(dict(out=out, **dict(zip(names, grads))),
                              dict(out=ref_out, **dict(zip(names, ref_grads))), dtype,
                              context=f"{backend} {case} {mode} {layout} prev={with_prev}")


# -- the reference against SPEC §4, index by index ------------------------------------------------------------------

@pytest.mark.parametrize("case", CPU_CASES[:5], ids=str)
def test_reference_downsample_is_the_spec_formula(case):
    """y[:, m] = sum_r w_r s[:, m*k + r], s = cat(prev, x[:, :L-(k-1)]), written out row by row."""
    B, L, d, k = case
    x, prev, weights = (t.detach() for t in downsample_inputs(case, torch.float64, "cpu"))
    for p, w in ((prev, weights), (None, None)):
        y = reference.causal_downsample(x, k, p, w)
        for m in range(L // k):
            want = torch.zeros(B, d, dtype=torch.float64)
            for r in range(k):
                t = m * k + r
                row = x[:, t - (k - 1)] if t >= k - 1 else (p[:, t] if p is not None else torch.zeros(B, d))
                want += (w[r] if w is not None else 1 / k) * row
            torch.testing.assert_close(y[:, m], want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("mode", ["repeat", "linear"])
@pytest.mark.parametrize("case", CPU_CASES[:5], ids=str)
def test_reference_upsample_is_the_spec_formula(case, mode):
    """repeat: residual[i] + x_short[i // k]; linear: (r+1)/k x_short[m] + (k-1-r)/k x_short[m-1] (x_short[-1] = prev),
    which reads no coarse row after i // k."""
    B, L, d, k = case
    x_short, residual, prev = (t.detach() for t in upsample_inputs(case, torch.float64, "cpu", with_prev=True))
    for p in ((prev, None) if mode == "linear" else (None,)):
        out = reference.upsample_add(x_short, residual, k, mode, p)
        for i in range(L):
            m, r = divmod(i, k)
            want = residual[:, i] + x_short[:, m]
            if mode == "linear":
                before = x_short[:, m - 1] if m > 0 else (p[:, 0] if p is not None else torch.zeros(B, d))
                want = residual[:, i] + (r + 1) / k * x_short[:, m] + (k - 1 - r) / k * before
            torch.testing.assert_close(out[:, i], want, rtol=1e-14, atol=1e-14)


def test_downsample_reads_no_future_row_and_upsample_no_later_coarse_row():
    """The Jacobians: coarse row m depends on fine rows <= m*k only; fine row i on coarse rows <= i // k only."""
    k, L = 3, 12
    x = torch.randn(1, L, 2, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: reference.causal_downsample(t, k), x)  # [1, L/k, 2, 1, L, 2]
    depends = jac.abs().sum((0, 2, 3, 5)) != 0  # [L/k, L]
    for m in range(L // k):
        assert depends[m].nonzero().max() == m * k
    for mode in ("repeat", "linear"):
        fn = lambda s: reference.upsample_add(s, torch.zeros(1, L, 2, dtype=torch.float64), k, mode)  # noqa: E731
        jac = torch.autograd.functional.jacobian(fn, torch.randn(1, L // k, 2, dtype=torch.float64))
        depends = jac.abs().sum((0, 2, 3, 5)) != 0  # [L, L/k]
        for i in range(L):
            assert depends[i].nonzero().max() == i // k


# -- fused backends against the float64 reference -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_cpu_downsample_matches_reference(case, dtype):
    for with_prev in (False, True):
        for with_weights in (False, True):
            assert_downsample_matches_reference("cpu", case, dtype, with_prev=with_prev, with_weights=with_weights)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_cpu_upsample_matches_reference(case, dtype):
    for mode, with_prev in (("repeat", False), ("linear", False), ("linear", True)):
        assert_upsample_matches_reference("cpu", case, dtype, mode, with_prev=with_prev)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_reads_every_layout(layout, dtype):
    for case in ((2, 15, 37, 3), (1, 8, 16, 4)):
        assert_downsample_matches_reference("cpu", case, dtype, layout=layout)
        assert_upsample_matches_reference("cpu", case, dtype, "linear", layout=layout, with_prev=True)
        assert_upsample_matches_reference("cpu", case, dtype, "repeat", layout=layout)


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_downsample_matches_reference(case, dtype):
    for with_prev, with_weights in ((False, False), (True, True), (True, False)):
        assert_downsample_matches_reference("triton", case, dtype, TRITON_DEVICE, with_prev=with_prev,
                                            with_weights=with_weights)


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_upsample_matches_reference(case, dtype):
    for mode, with_prev in (("repeat", False), ("linear", False), ("linear", True)):
        assert_upsample_matches_reference("triton", case, dtype, mode, TRITON_DEVICE, with_prev=with_prev)


@needs_triton
@pytest.mark.parametrize("layout", ["time_major", "padded", "strided_last"])
def test_triton_reads_every_layout(layout):
    case = (2, 27, 37, 3)
    assert_downsample_matches_reference("triton", case, torch.float32, TRITON_DEVICE, layout=layout)
    assert_upsample_matches_reference("triton", case, torch.float32, "linear", TRITON_DEVICE, layout=layout,
                                      with_prev=True)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=needs_triton)])
def test_strided_inputs_are_not_copied(backend, monkeypatch):
    """A time-major activation's transpose reaches the kernel as it is."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x = torch.randn(12, 2, 16, device=device).transpose(0, 1)
    residual = torch.randn(12, 2, 16, device=device).transpose(0, 1)
    seen = {}
    impl = RESAMPLE_BACKENDS[backend]
    down, up = impl.causal_downsample, impl.upsample_add
    monkeypatch.setattr(impl, "causal_downsample", lambda x_, *a: seen.setdefault("x", x_.data_ptr()) and down(x_, *a))
    monkeypatch.setattr(impl, "upsample_add", lambda s, r, *a: seen.setdefault("res", r.data_ptr()) and up(s, r, *a))
    y = memtx_ops.causal_downsample(x, 3, backend=backend)
    memtx_ops.upsample_add(y, residual, 3, backend=backend)
    assert seen == dict(x=x.data_ptr(), res=residual.data_ptr())


# -- what backward keeps, determinism -------------------------------------------------------------------------------

def test_backward_keeps_no_activation_unless_the_weights_learn():
    x = torch.randn(4, 300, 64, requires_grad=True)
    prev = torch.randn(4, 2, 64, requires_grad=True)
    _, saved = saved_by_autograd(lambda: memtx_ops.causal_downsample(x, 3, prev=prev).sum().backward())
    assert saved == []
    weights = torch.full((3,), 1 / 3, requires_grad=True)
    _, saved = saved_by_autograd(
        lambda: memtx_ops.causal_downsample(x, 3, prev=prev, weights=weights).sum().backward())
    assert {t.data_ptr() for t in saved} == {x.data_ptr(), prev.data_ptr(), weights.data_ptr()}
    _, saved = saved_by_autograd(lambda: memtx_ops.upsample_add(
        torch.randn(4, 100, 64, requires_grad=True), x, 3, mode="linear").sum().backward())
    assert saved == []


def test_weights_gradient_does_not_depend_on_the_thread_count():
    x, prev, weights = downsample_inputs((3, 3000, 48, 3), torch.float32, "cpu")
    grad = torch.randn(3, 1000, 48)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            y = memtx_ops.causal_downsample(x, 3, prev=prev, weights=weights, backend="cpu")
            results.append(torch.autograd.grad(y, [x, weights], grad))
    finally:
        torch.set_num_threads(threads)
    for dx, dw in results[1:]:
        assert torch.equal(dx, results[0][0]) and torch.equal(dw, results[0][1])


# -- validation, dispatch -------------------------------------------------------------------------------------------

X = torch.zeros(2, 12, 8)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=[1.0]), TypeError, r"causal_downsample: x must be a torch.Tensor \[B, L, d\]"),
    (dict(x=torch.zeros(12, 8)), ValueError, r"x must have shape \[B, L, d\] \(3 dims\), got \(12, 8\)"),
    (dict(x=torch.zeros(2, 12, 8, dtype=torch.int64)), TypeError, "x must be float16, bfloat16, float32 or float64"),
    (dict(x=torch.zeros(2, 0, 8)), ValueError, r"x must have B, L, d >= 1"),
    (dict(factor=2.0), TypeError, "factor must be an int"),
    (dict(factor=True), TypeError, "factor must be an int"),
    (dict(factor=0), ValueError, "factor must be >= 1, got 0"),
    (dict(factor=13), ValueError, "factor=13 exceeds the sequence length L=12"),
    (dict(factor=5), ValueError, "L=12 of x must be a multiple of factor=5"),
    (dict(prev=torch.zeros(2, 3, 8)), ValueError, r"prev must have shape \[B, factor - 1, d\] = \[2, 2, 8\]"),
    (dict(prev=torch.zeros(2, 2, 8, dtype=torch.float64)), TypeError, "prev has dtype torch.float64 but x has"),
    (dict(prev=torch.zeros(2, 2, 8, device="meta")), ValueError, "prev is on meta but x is on cpu"),
    (dict(weights=torch.zeros(2)), ValueError, r"weights must have shape \[factor\] = \[3\]"),
    (dict(weights=[1.0, 1.0, 1.0]), TypeError, "weights must be a torch.Tensor"),
    (dict(weights=torch.zeros(3, dtype=torch.float16)), TypeError, "weights has dtype torch.float16"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_downsample_arguments_are_named(kwargs, error, match):
    args = dict(x=X, factor=3, prev=None, weights=None, backend="auto") | kwargs
    with pytest.raises(error, match=match):
        memtx_ops.causal_downsample(args.pop("x"), args.pop("factor"), **args)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x_short="x"), TypeError, r"upsample_add: x_short must be a torch.Tensor"),
    (dict(residual=torch.zeros(12, 8)), ValueError, r"residual must have shape \[B, L, d\] \(3 dims\)"),
    (dict(x_short=torch.zeros(2, 5, 8)), ValueError, r"x_short must have shape \[B, L / factor, d\] = \[2, 4, 8\]"),
    (dict(x_short=torch.zeros(2, 4, 8, dtype=torch.float64)), TypeError, "x_short has dtype torch.float64 but "
                                                                         "residual has torch.float32"),
    (dict(factor=5), ValueError, "L=12 of residual must be a multiple of factor=5"),
    (dict(factor=24), ValueError, "factor=24 exceeds the sequence length L=12"),
    (dict(mode="nearest"), ValueError, r"mode must be one of \('repeat', 'linear'\)"),
    (dict(prev=torch.zeros(2, 1, 8)), ValueError, "prev .* is read by mode='linear' only"),
    (dict(mode="linear", prev=torch.zeros(2, 2, 8)), ValueError, r"prev must have shape \[B, 1, d\] = \[2, 1, 8\]"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_bad_upsample_arguments_are_named(kwargs, error, match):
    args = dict(x_short=torch.zeros(2, 4, 8), residual=X, factor=3, mode="repeat", prev=None, backend="auto") | kwargs
    with pytest.raises(error, match=match):
        memtx_ops.upsample_add(args.pop("x_short"), args.pop("residual"), args.pop("factor"), **args)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=needs_triton)])
def test_registered_ops_called_directly_check_and_read_any_layout(backend):
    """``torch.ops.memtx_ops.*`` are public: called without the functions above, they check their arguments (the
    Triton kernels read past x_short and dropped rows) and read a non-unit last stride right (they read it wrong)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    ops = torch.ops.memtx_ops
    x = torch.randn(2, 6, 16, device=device)[..., ::2]
    short = torch.randn(2, 2, 16, device=device)[..., ::2]
    torch.testing.assert_close(ops.causal_downsample(x, None, None, 3, backend),
                               reference.causal_downsample(x, 3, None, None))
    torch.testing.assert_close(ops.upsample_add(short, x, None, 3, "repeat", backend),
                               reference.upsample_add(short, x, 3, "repeat", None))
    x, short = x.contiguous(), short.contiguous()
    for call, match in (
            (lambda: ops.upsample_add(short[:, :1], x, None, 3, "repeat", backend),
             r"x_short must have shape \[B, L / factor, d\] = \[2, 2, 8\]"),
            (lambda: ops.causal_downsample(x[:, :5], None, None, 3, backend), "L=5 of x must be a multiple of factor=3"),
            (lambda: ops.causal_downsample(x, torch.zeros(2, 5, 8, device=device), None, 3, backend),
             r"prev must have shape \[B, factor - 1, d\] = \[2, 2, 8\]"),
            (lambda: ops.upsample_add_backward(x[:, :5], 3, "repeat", backend), "L=5 of grad must be a multiple"),
            (lambda: ops.causal_downsample_backward(short, torch.ones(2, device=device), 3, backend),
             r"weights must have shape \[factor\] = \[3\]"),
            (lambda: ops.causal_downsample_weights_grad(short[:, :1], x, None, 3, backend),
             r"grad must have shape \[B, L / factor, d\] = \[2, 2, 8\]")):
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_inference_mode_inputs_with_learned_weights(backend):
    """x and prev made under inference_mode, weights learned: the backward keeps x and prev, which autograd cannot
    save as they are (the fused path raised after its kernel ran; the reference path never did)."""
    with torch.inference_mode():
        x, prev = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 2, 4, dtype=torch.float64)
    weights = torch.randn(3, dtype=torch.float64, requires_grad=True)
    memtx_ops.causal_downsample(x, 3, prev=prev, weights=weights, backend=backend).sum().backward()
    want = torch.autograd.grad(reference.causal_downsample(x.clone(), 3, prev.clone(), weights).sum(), weights)[0]
    torch.testing.assert_close(weights.grad, want, rtol=1e-12, atol=1e-12)


def test_backend_dispatch():
    cpu = torch.device("cpu")
    assert resolve_resample_backend("auto", cpu, torch.float32) == "cpu"
    assert resolve_resample_backend("reference", cpu, torch.float32) == "reference"
    with pytest.raises(TypeError, match="backend 'triton' supports dtypes float16, bfloat16, float32; got float64"):
        memtx_ops.causal_downsample(X.double(), 3, backend="triton")
    if not ON_CUDA:
        with pytest.raises(RuntimeError, match="backend 'cpu' is not available: backend 'cpu' runs on cpu tensors"):
            memtx_ops.upsample_add(torch.zeros(2, 4, 8, device="meta"), X.to("meta"), 3, backend="cpu")


def test_factor_one_is_a_copy_and_a_plain_add():
    x = torch.randn(2, 7, 5)
    y = memtx_ops.causal_downsample(x, 1, backend="cpu")
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    residual = torch.randn(2, 7, 5)
    assert torch.equal(memtx_ops.upsample_add(x, residual, 1, mode="linear", backend="cpu"), residual + x)


# -- torch.library: opcheck and torch.compile ------------------------------------------------------------------------

def opcheck_all(backend, device, dtype=torch.float32):
    x, prev, weights = downsample_inputs((2, 12, 6, 3), dtype, device)
    ops = torch.ops.memtx_ops
    torch.library.opcheck(ops.causal_downsample, (x, prev, weights, 3, backend))
    torch.library.opcheck(ops.causal_downsample, (x, None, None, 3, backend))
    grad = torch.randn(2, 4, 6, device=device, dtype=dtype)
    torch.library.opcheck(ops.causal_downsample_backward, (grad, weights.detach(), 3, backend))
    torch.library.opcheck(ops.causal_downsample_weights_grad, (grad, x.detach(), prev.detach(), 3, backend))
    x_short, residual, prev1 = upsample_inputs((2, 12, 6, 3), dtype, device, with_prev=True)
    for mode, p in (("repeat", None), ("linear", prev1), ("linear", None)):
        torch.library.opcheck(ops.upsample_add, (x_short, residual, p, 3, mode, backend))
        torch.library.opcheck(ops.upsample_add_backward, (residual.detach(), 3, mode, backend))


def test_opcheck_cpu():
    opcheck_all("cpu", "cpu")


@needs_triton
def test_opcheck_triton():
    opcheck_all("triton", TRITON_DEVICE)


def hourglass_block(x, prev, weights, residual_scale, backend):
    """Down, a pointwise op, up with the residual: the ops as a model uses them."""
    y = memtx_ops.causal_downsample(x, 3, prev=prev, weights=weights, backend=backend)
    return memtx_ops.upsample_add(torch.tanh(y), x * residual_scale, 3, mode="linear", prev=prev[:, -1:],
                                  backend=backend)


@pytest.mark.parametrize("backend, compile_backend", [("cpu", "inductor"),
                                                      pytest.param("triton", "aot_eager", marks=needs_triton)])
def test_compile_fullgraph_matches_eager(backend, compile_backend):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    x, prev, weights = downsample_inputs((2, 15, 8, 3), torch.float32, device, layout="time_major")
    compiled = torch.compile(lambda *t: hourglass_block(*t, 0.5, backend).sum(), fullgraph=True,
                             backend=compile_backend)
    compiled(x, prev, weights).backward()
    eager = [t.detach().clone().requires_grad_() for t in (x, prev, weights)]
    hourglass_block(*eager, 0.5, backend).sum().backward()
    for a, b in zip((x, prev, weights), eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
