"""``rel_memory_attention``: the public op, its argument checks and its ``torch.library`` registration."""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import torch

from memtx_ops import reference
from memtx_ops.backends import BACKEND_NAMES, BACKENDS, get_backend, resolve_backend

Tensor = torch.Tensor

MAX_HEAD_DIM = 256
MAX_SPAN = 2**62  # window and mem_offset lie below it (int64 arithmetic on distances never overflows)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(message: str, error=ValueError):
    raise error(f"rel_memory_attention: {message}")


def is_fake(t: Optional[Tensor] = None) -> bool:
    """Whether ``t`` is a FakeTensor or a fake mode is active (shape propagation): there are no values to read, no
    kernel to run directly, and nothing made now may be cached for later calls."""
    return torch._guards.detect_fake_mode(t) is not None


def savable(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t``, or a copy of it when it was made under ``torch.inference_mode``: autograd can neither save such a tensor
    for the backward nor read its version counter."""
    return t.clone() if t is not None and t.is_inference() else t


def values_readable(t: Tensor) -> bool:
    """Whether the values of ``t`` can be checked here: not under ``torch.compile`` (a read would break the graph),
    not on the meta device, not fake."""
    return not (torch.compiler.is_compiling() or t.is_meta or is_fake(t))


def check_span(window, mem_offset, fail: Callable[..., None] = _fail, window_kinds: str = "an int or None") -> None:
    """Raises ``TypeError``/``ValueError`` through ``fail`` unless ``window`` is None or an int in ``[1, 2**62)`` and
    ``mem_offset`` an int in ``[0, 2**62)``; ``window_kinds`` says what a window may be, for the message."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int):
            fail(f"window must be {window_kinds}, got {window!r}", TypeError)
        if not 1 <= window < MAX_SPAN:
            fail(f"window must be >= 1 (the query itself is always visible) and < 2**62, got {window}")
    if isinstance(mem_offset, bool) or not isinstance(mem_offset, int):
        fail(f"mem_offset must be an int, got {mem_offset!r}", TypeError)
    if not 0 <= mem_offset < MAX_SPAN:
        fail(f"mem_offset must be >= 0 and < 2**62, got {mem_offset}")


def check_inputs(q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, backend) -> None:
    """Raises ``TypeError``/``ValueError`` naming the offending argument; nothing is launched before this."""
    named = {"q": q, "k": k, "v": v, "r": r, "u": u, "vb": vb}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    for name, t, rank, layout in (
        ("q", q, 4, "[B, H, L, D]"),
        ("k", k, 4, "[B, Hk, K, D]"),
        ("v", v, 4, "[B, Hk, K, D]"),
        ("r", r, 3, "[Hk, R, D]"),
        ("u", u, 2, "[H, D]"),
        ("vb", vb, 2, "[H, D]"),
    ):
        if t.dim() != rank:
            _fail(f"{name} must have shape {layout} ({rank} dims), got {tuple(t.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        _fail(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}", TypeError)
    for name, t in named.items():
        if t.dtype != q.dtype:
            _fail(f"{name} has dtype {t.dtype} but q has {q.dtype}; all of q, k, v, r, u, vb must share one dtype", TypeError)
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")

    B, H, L, D = q.shape
    Bk, Hk, K, Dk = k.shape
    if L < 1 or B < 1 or H < 1 or D < 1:
        _fail(f"q must have B, H, L, D >= 1, got {tuple(q.shape)}")
    if Bk != B:
        _fail(f"k has batch {Bk} but q has batch {B}")
    if Dk != D:
        _fail(f"k has head dim {Dk} but q has {D}")
    if Hk < 1:
        _fail(f"k must have at least one head, got shape {tuple(k.shape)}")
    if K < L:
        _fail(f"k has K={K} keys but q has L={L} queries; keys cover [memory ; segment] so K = M + L >= L")
    if tuple(v.shape) != tuple(k.shape):
        _fail(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if r.shape[0] != Hk or r.shape[2] != D:
        _fail(f"r must have shape [Hk={Hk}, R, D={D}], got {tuple(r.shape)}")
    if r.shape[1] < 1:
        _fail("r must have at least one row (R >= 1): row d embeds distance d")
    for name, t in (("u", u), ("vb", vb)):
        if tuple(t.shape) != (H, D):
            _fail(f"{name} must have shape [H={H}, D={D}], got {tuple(t.shape)}")

    if kv_head_index is None:
        if H % Hk != 0:
            _fail(f"q has H={H} heads and k has Hk={Hk}: without kv_head_index, H must be a multiple of Hk")
    else:
        if not isinstance(kv_head_index, torch.Tensor):
            _fail(f"kv_head_index must be an integer tensor of shape [H={H}], got {type(kv_head_index).__name__}", TypeError)
        if kv_head_index.dtype not in (torch.int32, torch.int64):
            _fail(f"kv_head_index must have dtype int32 or int64, got {kv_head_index.dtype}", TypeError)
        if tuple(kv_head_index.shape) != (H,):
            _fail(f"kv_head_index must have shape [H={H}], got {tuple(kv_head_index.shape)}")
        if kv_head_index.device != q.device:
            _fail(f"kv_head_index is on {kv_head_index.device} but q is on {q.device}")
        if values_readable(kv_head_index):  # kernels bound-check too
            lo, hi = int(kv_head_index.min()), int(kv_head_index.max())
            if lo < 0 or hi >= Hk:
                _fail(f"kv_head_index values must lie in [0, Hk={Hk}), got values in [{lo}, {hi}]")

    check_span(window, mem_offset)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            _fail(f"scale must be a float or None, got {type(scale).__name__}", TypeError)
        if not math.isfinite(scale) or scale <= 0:
            _fail(f"scale must be a finite float > 0 (default D ** -0.5), got {scale}")
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        _fail(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend != "reference" and D > MAX_HEAD_DIM:
        _fail(f"head dim D={D} is not supported by the fused backends (D <= {MAX_HEAD_DIM}); use backend='reference'")


def kernel_span(window: int, mem_offset: int, keys: int, rows: int) -> Tuple[int, int]:
    """``(window, mem_offset)`` (window 0: none) bounded for the kernels without changing what they compute, for
    ``keys`` keys and ``rows`` rows of r: a window of all the keys or more is none, and once ``mem_offset >= rows -
    2`` every memory distance reads r's last row, so a larger offset is taken as ``rows``. The kernels compute
    distances in 32 bits: a window or offset past 2**31 wrapped (wrong results, reads before r)."""
    return (0 if window >= keys else window), min(mem_offset, rows)


def unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself when its rows are contiguous (the layout every backend reads through its other strides),
    else a contiguous copy."""
    if t.stride(-1) == 1 or t.shape[-1] == 1:
        return t
    return t.contiguous()


def converted(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, differentiably; each expanded (stride-0) dimension of a view is converted once and
    expanded again, not materialised (its gradient reaches the view's base summed, as through the expansion). A
    leaf that is stride-0 itself is converted whole, so that its gradient stays one entry per position."""
    base = t
    if not (t.requires_grad and t.is_leaf):
        for dim in range(t.dim()):
            if t.stride(dim) == 0 and t.shape[dim] > 1:
                base = base.narrow(dim, 0, 1)
    return base.to(dtype).expand(t.shape)


@functools.lru_cache(maxsize=64)
def _default_kv_heads(num_heads: int, num_kv_heads: int, device: torch.device) -> Tensor:
    """``reference.default_kv_head_index``, made once per (H, Hk, device): the kernels only read it, and its three
    small allocations cost a decoding step about 40 us more than their own time (measured at L=1, M=640). Made
    outside inference mode: an inference tensor cached by a call under ``torch.inference_mode`` could not be saved
    for the backward of a later training call."""
    with torch.inference_mode(False):
        return reference.default_kv_head_index(num_heads, num_kv_heads, device)


def rel_memory_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    u: Tensor,
    vb: Tensor,
    *,
    kv_head_index: Optional[Tensor] = None,
    window: Optional[int] = None,
    mem_offset: int = 0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Relative-position attention over ``[memory ; segment]`` (SPEC §1), fused.

    q ``[B, H, L, D]``; k, v ``[B, Hk, K, D]`` with ``K = M + L``; r ``[Hk, R, D]`` (row d embeds
    distance d; longer distances read row ``R - 1``); u, vb ``[H, D]``; kv_head_index ``[H]``
    (query head h reads kv head ``kv_head_index[h]``; default ``h * Hk // H``). ``window`` keeps
    the ``window`` most recent keys, ``mem_offset`` adds distance to memory keys. -> ``[B, H, L, D]``.

    ``backend``: "auto" (the fastest available for the device and dtype), "reference", "cpu",
    "triton" or "cuda". Float16 and bfloat16 on the CPU run the float32 kernels and round the output back. With
    a gradient to compute (or traced) they take float32 copies of q, k, v, r, u, vb; otherwise only
    q, r, u, vb are copied, and the forward reads k and v in their own dtype, widening each row as it reads it
    (half the bytes of float32 keys). With a gradient to compute, every fused backend keeps the output in float32
    for the backward and returns it rounded: the backward's delta = rowsum(dO * O) taken from a rounded O would
    swamp the gradients of queries that see few keys (on the GPU this costs 2 bytes more per element of out kept
    for the backward; inference writes the 16-bit output directly).
    Differentiable in every tensor argument but ``kv_head_index``. A call that needs no
    gradient (under ``torch.no_grad()``, or no input requires grad) outside ``torch.compile`` and fake modes runs the
    backend's kernel directly, without the custom op's dispatch (decoding, evaluation).
    """
    check_inputs(q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, backend)
    backend = resolve_backend(backend, q.device, q.dtype, q.shape[-1])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend == "reference":
        return reference.rel_memory_attention(
            q, k, v, r, u, vb, kv_head_index=kv_head_index, window=window, mem_offset=mem_offset, scale=scale
        )
    impl = get_backend(backend, q.device, q.dtype, q.shape[-1])  # raises when it cannot run here
    # Traced (torch.compile, or shape propagation under a fake mode): the custom op, which has a fake implementation;
    # nothing made from the inputs is cached
    tracing = torch.compiler.is_compiling() or is_fake(q)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, r, u, vb))
    dtype, compute_dtype = q.dtype, impl.compute_dtypes.get(q.dtype)
    if compute_dtype is not None:  # e.g. float16 / bfloat16 on the CPU: float32 kernels
        q, r, u, vb = (converted(t, compute_dtype) for t in (q, r, u, vb))
        if tracing or needs_grad:  # else the forward reads k and v as they are, widening each row it reads
            k, v = (converted(t, compute_dtype) for t in (k, v))
    if kv_head_index is None:
        kv_head_index = (reference.default_kv_head_index(q.shape[1], k.shape[1], q.device)
                         if tracing else _default_kv_heads(q.shape[1], k.shape[1], q.device))
    q, k, v, r = (unit_last_stride(t) for t in (q, k, v, r))
    k, v = impl.arrange_keys(k, v, q.shape[2], needs_grad)
    tensors = (q, k, v, r, u.contiguous(), vb.contiguous(), kv_head_index.to(torch.int64).contiguous())
    if not tracing and not needs_grad:
        # Inference (decoding, evaluation): nothing to differentiate or trace, so the backend's kernel is called
        # directly. The custom op's dispatch costs about 0.1 ms a call here, 15% of a decoding step at M = 640.
        span = kernel_span(window or 0, mem_offset, k.shape[2], r.shape[1])
        return impl.forward(*tensors, *span, float(scale), float32_out=False)[0].to(dtype)
    out, _ = _rel_memory_attention_op(*tensors, window or 0, mem_offset, float(scale), backend)
    return out.to(dtype)


def _saved_out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the op's out for inputs of ``dtype``: float32 for 16-bit inputs (kept for the backward's delta),
    else the inputs' own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.custom_op("memtx_ops::rel_memory_attention", mutates_args=())
def _rel_memory_attention_op(
    q: Tensor, k: Tensor, v: Tensor, r: Tensor, u: Tensor, vb: Tensor, kv_head_index: Tensor,
    window: int, mem_offset: int, scale: float, backend: str,
) -> Tuple[Tensor, Tensor]:
    """-> (out ``[B, H, L, D]``, float32 for 16-bit inputs (:func:`_saved_out_dtype`); lse ``[B, H, L]`` in the
    backend's ``lse_dtype``)."""
    impl = get_backend(backend, q.device, q.dtype, q.shape[-1])
    window, mem_offset = kernel_span(window, mem_offset, k.shape[2], r.shape[1])
    return impl.forward(q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, float32_out=True)


@_rel_memory_attention_op.register_fake
def _(q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, backend):
    B, H, L, D = q.shape
    lse_dtype = BACKENDS[backend].lse_dtype(q.dtype)
    return q.new_empty(B, H, L, D, dtype=_saved_out_dtype(q.dtype)), q.new_empty(B, H, L, dtype=lse_dtype)


@torch.library.custom_op("memtx_ops::rel_memory_attention_backward", mutates_args=())
def _rel_memory_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, r: Tensor, u: Tensor, vb: Tensor, out: Tensor,
    lse: Tensor, kv_head_index: Tensor, window: int, mem_offset: int, scale: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    window, mem_offset = kernel_span(window, mem_offset, k.shape[2], r.shape[1])
    return get_backend(backend, q.device, q.dtype, q.shape[-1]).backward(
        grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale
    )


@_rel_memory_attention_backward_op.register_fake
def _(grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale, backend):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v, r, u, vb))


def _setup_context(ctx, inputs, output):
    q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, backend = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*(savable(t) for t in (q, k, v, r, u, vb, out, lse, kv_head_index)))
    ctx.window, ctx.mem_offset, ctx.scale, ctx.backend = window, mem_offset, scale, backend


def _backward(ctx, grad_out, grad_lse):
    q, k, v, r, u, vb, out, lse, kv_head_index = ctx.saved_tensors
    # grad_out arrives in out's float32 for 16-bit inputs: the gradient of the rounded output the caller got, so
    # narrowing it back is exact (the kernels multiply dO with v in the inputs' dtype)
    grads = _rel_memory_attention_backward_op(
        grad_out.to(q.dtype).contiguous(), q, k, v, r, u, vb, out, lse, kv_head_index,
        ctx.window, ctx.mem_offset, ctx.scale, ctx.backend,
    )
    return (*grads, None, None, None, None, None)


_rel_memory_attention_op.register_autograd(_backward, setup_context=_setup_context)
