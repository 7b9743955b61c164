"""``dropout`` and ``relu_dropout``: inverted dropout whose mask is Philox4x32-10 of (seed, element index).

The mask is never stored: the backward pass recomputes it from the seed, so a dropout layer keeps no
activation of its own for backward (torch's CPU dropout keeps a float mask as large as its input), and the
C++ kernel's forward and backward are about 8x faster than torch's CPU dropout (``python -m bench --ops
dropout``). The seed is drawn from torch's default CPU generator, so ``torch.manual_seed`` and saved RNG
states (memory replay) reproduce the masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memtx_ops import _extension, reference

Tensor = torch.Tensor

DROPOUT_BACKENDS = ("auto", "cpu", "reference", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(message: str, error=ValueError, op: str = "dropout"):
    raise error(f"{op}: {message}")


def check_inputs(x, p, training, backend, op: str = "dropout") -> None:
    """Raises ``TypeError``/``ValueError`` naming ``op`` and the argument unless the call is well formed."""
    if not isinstance(x, torch.Tensor):
        _fail(f"x must be a tensor, got {type(x).__name__}", TypeError, op)
    if x.dtype not in _FLOAT_DTYPES:
        _fail(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}", TypeError, op)
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        _fail(f"p must be a float in [0, 1], got {type(p).__name__}", TypeError, op)
    if not 0.0 <= p <= 1.0:
        _fail(f"p must be in [0, 1], got {p}", ValueError, op)
    if not isinstance(training, bool):
        _fail(f"training must be a bool, got {type(training).__name__}", TypeError, op)
    check_backend(backend, op)


def check_backend(backend, op: str = "dropout") -> None:
    """Raises ``ValueError`` unless ``backend`` is one of ``DROPOUT_BACKENDS``."""
    if not isinstance(backend, str) or backend not in DROPOUT_BACKENDS:
        _fail(f"backend must be one of {DROPOUT_BACKENDS}, got {backend!r}", ValueError, op)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"``: the C++ kernel for CPU tensors when the extension is built, else torch's own dropout (on
    CUDA that is already one fused kernel). Raises when ``"cpu"`` cannot run."""
    if backend == "auto":
        return "cpu" if device.type == "cpu" and _extension.extension_error() is None else "torch"
    if backend == "cpu":
        if device.type != "cpu":
            _fail(f"backend 'cpu' needs a CPU tensor, got x on {device}")
        if _extension.extension_error() is not None:
            raise RuntimeError(f"dropout: backend 'cpu' is not available: {_extension.extension_error()}")
    return backend


def draw_seed() -> Tensor:
    """A fresh int64 seed from torch's default CPU generator (a 0-dim tensor, so torch.compile traces it)."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)


def dropout(x: Tensor, p: float = 0.5, training: bool = True, *, backend: str = "auto") -> Tensor:
    """Inverted dropout: ``x * keep / (1 - p)``, each element kept with probability ``1 - p``.

    x any shape -> same shape (contiguous). ``training=False`` or ``p=0`` return ``x``. ``backend``: "auto",
    "cpu" (C++ Philox kernel), "reference" (the same mask in plain PyTorch, bit-exact with "cpu") or "torch"
    (``torch.nn.functional.dropout``, torch's generator).
    """
    check_inputs(x, p, training, backend)
    if not training or p == 0:
        return x
    if p == 1:
        return x * 0.0
    backend = resolve_backend(backend, x.device)
    if backend == "torch":
        return F.dropout(x, p, True)
    seed = draw_seed()
    if backend == "reference":
        return reference.dropout(x, float(p), int(seed))
    return _dropout_op(x, float(p), seed)


@torch.library.custom_op("memtx_ops::dropout", mutates_args=())
def _dropout_op(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return torch.ops.memtx_C.dropout(x, p, seed)


@_dropout_op.register_fake
def _(x, p, seed):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    _, ctx.p, seed = inputs
    ctx.save_for_backward(seed)


def _backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return _dropout_op(grad, ctx.p, seed), None, None


_dropout_op.register_autograd(_backward, setup_context=_setup_context)


def relu_dropout(x: Tensor, p: float = 0.5, training: bool = True, *, backend: str = "auto") -> Tensor:
    """``dropout(relu(x))`` in one pass, with the mask :func:`dropout` draws for the same generator state.

    x any shape -> same shape (contiguous). The backward computes ``grad * (y > 0) / (1 - p)`` from the
    output y, which it saves; the Linear that follows a feed-forward block's dropout keeps y anyway, so the
    pair stores no mask and no pre-activation. ``training=False`` or ``p=0`` give ``relu(x)``. ``backend`` as
    in :func:`dropout`.
    """
    check_inputs(x, p, training, backend, op="relu_dropout")
    if training and 0 < p < 1 and resolve_backend(backend, x.device) == "cpu":
        return _relu_dropout_op(x, float(p), draw_seed())
    return dropout(F.relu(x), p, training, backend=backend)  # every other case: the unfused pair


@torch.library.custom_op("memtx_ops::relu_dropout", mutates_args=())
def _relu_dropout_op(x: Tensor, p: float, seed: Tensor) -> Tensor:
    return torch.ops.memtx_C.relu_dropout(x, p, seed)


@_relu_dropout_op.register_fake
def _(x, p, seed):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("memtx_ops::relu_dropout_backward", mutates_args=())
def _relu_dropout_backward_op(grad: Tensor, out: Tensor, p: float) -> Tensor:
    return torch.ops.memtx_C.relu_dropout_backward(grad, out, p)


@_relu_dropout_backward_op.register_fake
def _(grad, out, p):
    return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)


def _relu_setup_context(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.save_for_backward(output)


def _relu_backward_setup_context(ctx, inputs, output):
    _, out, ctx.p = inputs
    ctx.save_for_backward(out)


def _through_pass_mask(ctx, grad):
    """The gradient of relu_dropout, and of its backward (linear in grad with the same pass mask)."""
    (out,) = ctx.saved_tensors
    return _relu_dropout_backward_op(grad, out, ctx.p), None, None


_relu_dropout_op.register_autograd(_through_pass_mask, setup_context=_relu_setup_context)
_relu_dropout_backward_op.register_autograd(_through_pass_mask, setup_context=_relu_backward_setup_context)
