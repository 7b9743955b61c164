"""``causal_downsample`` and ``upsample_add``: the shortening and upsampling of hourglass models (SPEC §4), fused.

Layout: batch-first ``[B, L, d]`` with any batch and row strides (a time-major ``[L, B, d]`` activation is passed as
``h.transpose(0, 1)`` and read in place) and a contiguous last dimension (otherwise it is copied once); outputs are
contiguous ``[B, rows, d]``. ``L`` must be a multiple of the factor ``k`` (else ``ValueError``: pad the segment or
choose its length). The backward of ``causal_downsample`` keeps no activation unless the weights are learned (then
x and prev, for their gradient); that of ``upsample_add`` keeps nothing.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from memtx_ops import reference
from memtx_ops.backends.causal_resample import (
    RESAMPLE_BACKEND_NAMES,
    get_resample_backend,
    resolve_resample_backend,
)
from memtx_ops.ops.rel_memory_attention import savable
from memtx_ops.reference.causal_resample import UPSAMPLE_MODES

Tensor = torch.Tensor
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(op: str, message: str, error=ValueError):
    raise error(f"{op}: {message}")


def _check_rows(op: str, name: str, t, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}", TypeError)
    if t.dim() != 3:
        _fail(op, f"{name} must have shape {layout} (3 dims), got {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        _fail(op, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}", TypeError)


def _check_like(op: str, name: str, t: Tensor, like_name: str, like: Tensor, shape, layout: str) -> None:
    """``t`` must have ``shape`` (described by ``layout``) and the dtype and device of ``like``."""
    if tuple(t.shape) != tuple(shape):
        _fail(op, f"{name} must have shape {layout} = {list(shape)}, got {tuple(t.shape)}")
    if t.dtype != like.dtype:
        _fail(op, f"{name} has dtype {t.dtype} but {like_name} has {like.dtype}; they must share one dtype", TypeError)
    if t.device != like.device:
        _fail(op, f"{name} is on {t.device} but {like_name} is on {like.device}")


def _check_factor(op: str, factor, length: int, what: str) -> None:
    if isinstance(factor, bool) or not isinstance(factor, int):
        _fail(op, f"factor must be an int >= 1, got {type(factor).__name__}", TypeError)
    if factor < 1:
        _fail(op, f"factor must be >= 1, got {factor}")
    if factor > length:
        _fail(op, f"factor={factor} exceeds the sequence length L={length} of {what}: a group needs factor rows")
    if length % factor != 0:
        _fail(op, f"the sequence length L={length} of {what} must be a multiple of factor={factor} "
                  f"(pad the segment to {(length // factor + 1) * factor} rows or choose a segment length that is)")


def _check_backend(op: str, backend) -> None:
    if not isinstance(backend, str) or backend not in RESAMPLE_BACKEND_NAMES:
        _fail(op, f"backend must be one of {RESAMPLE_BACKEND_NAMES}, got {backend!r}")


def check_downsample_inputs(x, factor, prev, weights, backend) -> None:
    """Raises ``TypeError``/``ValueError`` naming the argument unless ``causal_downsample`` is called well."""
    op = "causal_downsample"
    _check_rows(op, "x", x, "[B, L, d]")
    B, L, d = x.shape
    if B < 1 or L < 1 or d < 1:
        _fail(op, f"x must have B, L, d >= 1, got {tuple(x.shape)}")
    _check_factor(op, factor, L, "x")
    if prev is not None:
        _check_rows(op, "prev", prev, "[B, factor - 1, d]")
        _check_like(op, "prev", prev, "x", x, (B, factor - 1, d), "[B, factor - 1, d]")
    if weights is not None:
        if not isinstance(weights, torch.Tensor):
            _fail(op, f"weights must be a torch.Tensor [factor], got {type(weights).__name__}", TypeError)
        _check_like(op, "weights", weights, "x", x, (factor,), "[factor]")
    _check_backend(op, backend)


def check_upsample_inputs(x_short, residual, factor, mode, prev, backend) -> None:
    """Raises ``TypeError``/``ValueError`` naming the argument unless ``upsample_add`` is called well."""
    op = "upsample_add"
    _check_rows(op, "x_short", x_short, "[B, L / factor, d]")
    _check_rows(op, "residual", residual, "[B, L, d]")
    B, L, d = residual.shape
    if B < 1 or L < 1 or d < 1:
        _fail(op, f"residual must have B, L, d >= 1, got {tuple(residual.shape)}")
    _check_factor(op, factor, L, "residual")
    _check_like(op, "x_short", x_short, "residual", residual, (B, L // factor, d), "[B, L / factor, d]")
    if not isinstance(mode, str) or mode not in UPSAMPLE_MODES:
        _fail(op, f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if prev is not None:
        if mode != "linear":
            _fail(op, f"prev (the coarse row before x_short) is read by mode='linear' only, got mode={mode!r}")
        _check_rows(op, "prev", prev, "[B, 1, d]")
        _check_like(op, "prev", prev, "x_short", x_short, (B, 1, d), "[B, 1, d]")
    _check_backend(op, backend)


def _unit_last_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` itself when its last dimension is contiguous (the kernels read the other strides), else a copy."""
    if t is None or t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def causal_downsample(x: Tensor, factor: int, *, prev: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                      backend: str = "auto") -> Tensor:
    """Causal shortening by ``factor = k`` (SPEC §4): x ``[B, L, d]`` -> y ``[B, L / k, d]``.

    Shifts x right by ``k - 1`` rows, taking the shifted-in rows from ``prev`` ``[B, k - 1, d]`` (the last ``k - 1``
    rows of the previous segment's x; zeros when None), then sums each group of ``k`` rows with ``weights`` ``[k]``
    (learned; the mean when None): ``y[:, m] = sum_r w_r * s[:, m*k + r]``, which reads the fine rows
    ``m*k - (k - 1) .. m*k`` and nothing later. ``L`` must be a multiple of ``k``. Differentiable in x, prev and
    weights. ``backend``: "auto", "reference", "cpu" or "triton".
    """
    check_downsample_inputs(x, factor, prev, weights, backend)
    backend = resolve_resample_backend(backend, x.device, x.dtype)
    if backend == "reference":
        return reference.causal_downsample(x, factor, prev, weights)
    get_resample_backend(backend, x.device, x.dtype, "causal_downsample")  # raises when it cannot run here
    return _causal_downsample_op(x, prev, weights, factor, backend)


def upsample_add(x_short: Tensor, residual: Tensor, factor: int, *, mode: str = "repeat",
                 prev: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """``residual + upsample(x_short)`` in one pass (SPEC §4): x_short ``[B, L / k, d]``, residual ``[B, L, d]`` ->
    ``[B, L, d]``.

    ``mode="repeat"``: ``out[:, i] = residual[:, i] + x_short[:, i // k]``. ``mode="linear"``: with ``m, r = i // k,
    i % k``, ``out[:, i] = residual[:, i] + (r + 1) / k * x_short[:, m] + (k - 1 - r) / k * x_short[:, m - 1]``, a
    ramp from the previous coarse row to the current one that reads no later row; ``x_short[:, -1]`` is ``prev``
    ``[B, 1, d]`` (the previous segment's last coarse row; zeros when None). Differentiable in x_short, residual and
    prev. ``backend``: "auto", "reference", "cpu" or "triton".
    """
    check_upsample_inputs(x_short, residual, factor, mode, prev, backend)
    backend = resolve_resample_backend(backend, residual.device, residual.dtype)
    if backend == "reference":
        return reference.upsample_add(x_short, residual, factor, mode, prev)
    get_resample_backend(backend, residual.device, residual.dtype, "upsample_add")
    return _upsample_add_op(x_short, residual, prev, factor, mode, backend)


def _empty_rows(like: Tensor, B: int, rows: int, d: int) -> Tensor:
    return torch.empty((B, rows, d), dtype=like.dtype, device=like.device)


# The registered ops below check their arguments again (cheap, on the host): they are public torch.library ops,
# which a caller may reach without the functions above, and the Triton kernels assume what the checks ensure.


@torch.library.custom_op("memtx_ops::causal_downsample", mutates_args=())
def _causal_downsample_op(x: Tensor, prev: Optional[Tensor], weights: Optional[Tensor], factor: int,
                          backend: str) -> Tensor:
    check_downsample_inputs(x, factor, prev, weights, backend)
    impl = get_resample_backend(backend, x.device, x.dtype, "causal_downsample")
    return impl.causal_downsample(_unit_last_stride(x), _unit_last_stride(prev),
                                  None if weights is None else weights.contiguous(), factor)


@_causal_downsample_op.register_fake
def _(x, prev, weights, factor, backend):
    B, L, d = x.shape
    return _empty_rows(x, B, L // factor, d)


@torch.library.custom_op("memtx_ops::causal_downsample_backward", mutates_args=())
def _causal_downsample_backward_op(grad: Tensor, weights: Optional[Tensor], factor: int,
                                   backend: str) -> Tuple[Tensor, Tensor]:
    op = "causal_downsample_backward"
    _check_rows(op, "grad", grad, "[B, L / factor, d]")
    _check_factor(op, factor, grad.shape[1] * factor, "the forward's x")
    if weights is not None:
        _check_like(op, "weights", weights, "grad", grad, (factor,), "[factor]")
    _check_backend(op, backend)
    impl = get_resample_backend(backend, grad.device, grad.dtype, "causal_downsample")
    return impl.causal_downsample_backward(grad.contiguous(), None if weights is None else weights.contiguous(), factor)


@_causal_downsample_backward_op.register_fake
def _(grad, weights, factor, backend):
    B, Ls, d = grad.shape
    return _empty_rows(grad, B, Ls * factor, d), _empty_rows(grad, B, factor - 1, d)


@torch.library.custom_op("memtx_ops::causal_downsample_weights_grad", mutates_args=())
def _causal_downsample_weights_grad_op(grad: Tensor, x: Tensor, prev: Optional[Tensor], factor: int,
                                       backend: str) -> Tensor:
    check_downsample_inputs(x, factor, prev, None, backend)
    B, L, d = x.shape
    _check_rows("causal_downsample_weights_grad", "grad", grad, "[B, L / factor, d]")
    _check_like("causal_downsample_weights_grad", "grad", grad, "x", x, (B, L // factor, d), "[B, L / factor, d]")
    impl = get_resample_backend(backend, x.device, x.dtype, "causal_downsample")
    return impl.causal_downsample_weights_grad(grad.contiguous(), _unit_last_stride(x), _unit_last_stride(prev),
                                               factor)


@_causal_downsample_weights_grad_op.register_fake
def _(grad, x, prev, factor, backend):
    return torch.empty((factor,), dtype=x.dtype, device=x.device)


def _downsample_setup_context(ctx, inputs, output):
    x, prev, weights, ctx.factor, ctx.backend = inputs
    ctx.has_prev = prev is not None
    ctx.weights_grad = ctx.needs_input_grad[2]
    # dx and dprev need only the weights; x and prev are kept for the weights' gradient alone
    ctx.save_for_backward(*(savable(t) for t in (weights, *((x, prev) if ctx.weights_grad else ()))))


def _downsample_backward(ctx, grad):
    grad = grad.contiguous()
    weights, *kept = ctx.saved_tensors
    dx, dprev = _causal_downsample_backward_op(grad, weights, ctx.factor, ctx.backend)
    dweights = None
    if ctx.weights_grad:
        x, prev = kept
        dweights = _causal_downsample_weights_grad_op(grad, x, prev, ctx.factor, ctx.backend)
    return dx, (dprev if ctx.has_prev else None), dweights, None, None


_causal_downsample_op.register_autograd(_downsample_backward, setup_context=_downsample_setup_context)


@torch.library.custom_op("memtx_ops::upsample_add", mutates_args=())
def _upsample_add_op(x_short: Tensor, residual: Tensor, prev: Optional[Tensor], factor: int, mode: str,
                     backend: str) -> Tensor:
    check_upsample_inputs(x_short, residual, factor, mode, prev, backend)
    impl = get_resample_backend(backend, residual.device, residual.dtype, "upsample_add")
    return impl.upsample_add(_unit_last_stride(x_short), _unit_last_stride(residual), _unit_last_stride(prev), factor,
                             mode)


@_upsample_add_op.register_fake
def _(x_short, residual, prev, factor, mode, backend):
    return _empty_rows(residual, *residual.shape)


@torch.library.custom_op("memtx_ops::upsample_add_backward", mutates_args=())
def _upsample_add_backward_op(grad: Tensor, factor: int, mode: str, backend: str) -> Tuple[Tensor, Tensor]:
    op = "upsample_add_backward"
    _check_rows(op, "grad", grad, "[B, L, d]")
    _check_factor(op, factor, grad.shape[1], "grad")
    if not isinstance(mode, str) or mode not in UPSAMPLE_MODES:
        _fail(op, f"mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    _check_backend(op, backend)
    impl = get_resample_backend(backend, grad.device, grad.dtype, "upsample_add")
    return impl.upsample_add_backward(grad.contiguous(), factor, mode)


@_upsample_add_backward_op.register_fake
def _(grad, factor, mode, backend):
    B, L, d = grad.shape
    return _empty_rows(grad, B, L // factor, d), _empty_rows(grad, B, 1 if mode == "linear" else 0, d)


def _upsample_setup_context(ctx, inputs, output):
    _, _, prev, ctx.factor, ctx.mode, ctx.backend = inputs
    ctx.has_prev = prev is not None


def _upsample_backward(ctx, grad):
    grad = grad.contiguous()
    dx_short, dprev = _upsample_add_backward_op(grad, ctx.factor, ctx.mode, ctx.backend)
    return dx_short, grad, (dprev if ctx.has_prev else None), None, None, None


_upsample_add_op.register_autograd(_upsample_backward, setup_context=_upsample_setup_context)
