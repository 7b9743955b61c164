"""Backends of the causal resampling ops (SPEC §4): which implementation runs a ``causal_downsample`` or
``upsample_add`` call.

``"cpu"``: the C++ kernels (``csrc/cpu/causal_resample.cpp``); ``"triton"``: ``kernels/causal_resample`` (CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"reference"``: the eager composition
(:mod:`memtx_ops.reference.causal_resample`). ``"auto"``: ``"cpu"`` for CPU tensors, ``"triton"`` for CUDA tensors of
its dtypes, else ``"reference"``. Availability is that of the attention backend of the same name.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import cpu, triton
from .base import check_usable, warn_unavailable_extension

Tensor = torch.Tensor
_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ResampleBackend:
    """One fused implementation of the resampling ops. Arguments arrive validated: 3-d tensors ``[B, rows, d]`` with
    a unit last stride (other strides arbitrary), weights contiguous ``[k]``, mode ``"repeat"`` or ``"linear"``."""

    name = ""
    dtypes: Tuple[torch.dtype, ...] = ()

    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        raise NotImplementedError

    def unfit_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        """None when this backend, available on ``device`` and supporting ``dtype``, runs it there, else why not."""
        return None

    def causal_downsample(self, x, prev, weights, factor) -> Tensor:
        """-> y ``[B, L / k, d]``."""
        raise NotImplementedError

    def causal_downsample_backward(self, grad, weights, factor) -> Tuple[Tensor, Tensor]:
        """-> (dx ``[B, L, d]``, dprev ``[B, k - 1, d]``)."""
        raise NotImplementedError

    def causal_downsample_weights_grad(self, grad, x, prev, factor) -> Tensor:
        """-> dweights ``[k]``."""
        raise NotImplementedError

    def upsample_add(self, x_short, residual, prev, factor, mode) -> Tensor:
        """-> out ``[B, L, d]``."""
        raise NotImplementedError

    def upsample_add_backward(self, grad, factor, mode) -> Tuple[Tensor, Tensor]:
        """-> (dx_short ``[B, L / k, d]``, dprev ``[B, 1, d]`` for "linear", ``[B, 0, d]`` for "repeat")."""
        raise NotImplementedError


class CpuResample(ResampleBackend):
    name = "cpu"
    dtypes = _ALL_FLOATS

    def unavailable_reason(self, device):
        return cpu.BACKEND.unavailable_reason(device)

    def causal_downsample(self, x, prev, weights, factor):
        return torch.ops.memtx_C.causal_downsample(x, prev, weights, factor)

    def causal_downsample_backward(self, grad, weights, factor):
        return torch.ops.memtx_C.causal_downsample_backward(grad, weights, factor)

    def causal_downsample_weights_grad(self, grad, x, prev, factor):
        return torch.ops.memtx_C.causal_downsample_weights_grad(grad, x, prev, factor)

    def upsample_add(self, x_short, residual, prev, factor, mode):
        return torch.ops.memtx_C.upsample_add(x_short, residual, prev, factor, mode)

    def upsample_add_backward(self, grad, factor, mode):
        return torch.ops.memtx_C.upsample_add_backward(grad, factor, mode)


class TritonResample(ResampleBackend):
    name = "triton"
    dtypes = triton.BACKEND.dtypes

    def unavailable_reason(self, device):
        return triton.BACKEND.unavailable_reason(device)

    def unfit_reason(self, device, dtype):
        return triton.interpreter_dtype_reason(device, dtype)

    @staticmethod
    def _kernels():
        from memtx_ops.kernels import causal_resample

        return causal_resample

    def causal_downsample(self, x, prev, weights, factor):
        return self._kernels().causal_downsample_fwd(x, prev, weights, factor)

    def causal_downsample_backward(self, grad, weights, factor):
        return self._kernels().causal_downsample_bwd(grad, weights, factor)

    def causal_downsample_weights_grad(self, grad, x, prev, factor):
        return self._kernels().causal_downsample_weights_grad(grad, x, prev, factor)

    def upsample_add(self, x_short, residual, prev, factor, mode):
        return self._kernels().upsample_add_fwd(x_short, residual, prev, factor, mode)

    def upsample_add_backward(self, grad, factor, mode):
        return self._kernels().upsample_add_bwd(grad, factor, mode)


RESAMPLE_BACKENDS: Dict[str, ResampleBackend] = {b.name: b for b in (CpuResample(), TritonResample())}
RESAMPLE_BACKEND_NAMES = ("auto", "reference") + tuple(RESAMPLE_BACKENDS)


def get_resample_backend(name: str, device: torch.device, dtype: torch.dtype, op: str) -> ResampleBackend:
    """The backend called ``name``, checked to run on ``device`` and ``dtype``; raises a clear error naming ``op``."""
    backend = RESAMPLE_BACKENDS[name]
    check_usable(backend, op, device, dtype)
    reason = backend.unfit_reason(device, dtype)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {name!r} cannot run on {device}: {reason}")
    return backend


def resolve_resample_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turns ``"auto"`` into ``"cpu"`` (CPU tensors), ``"triton"`` (CUDA) or ``"reference"`` where neither runs;
    other names are returned unchanged."""
    if name != "auto":
        return name
    candidate = RESAMPLE_BACKENDS["cpu" if device.type == "cpu" else "triton"]
    if (dtype in candidate.dtypes and candidate.unavailable_reason(device) is None
            and candidate.unfit_reason(device, dtype) is None):
        return candidate.name
    warn_unavailable_extension("causal resampling")
    return "reference"
