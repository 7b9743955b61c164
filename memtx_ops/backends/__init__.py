"""Backend registry and the one dispatcher: which implementation runs a call."""

from __future__ import annotations

from typing import Dict

import torch

from . import cpu, cuda, triton
from .base import Backend

BACKENDS: Dict[str, Backend] = {b.name: b for b in (cpu.BACKEND, triton.BACKEND, cuda.BACKEND)}
BACKEND_NAMES = ("auto", "reference") + tuple(BACKENDS)

# backend="auto" on CUDA tensors: tried in this order, the first one available wins.
_CUDA_PREFERENCE = ("triton", "cuda")


def get_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend called ``name``, checked to run on ``device`` and ``dtype``; raises a clear error if not."""
    backend = BACKENDS[name]
    reason = backend.unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"rel_memory_attention: backend {name!r} is not available: {reason}")
    if dtype not in backend.dtypes:
        supported = ", ".join(str(d).replace("torch.", "") for d in backend.dtypes)
        raise TypeError(
            f"rel_memory_attention: backend {name!r} supports dtypes {supported}; got {str(dtype).replace('torch.', '')}"
        )
    return backend


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turns ``"auto"`` into a concrete backend name; other names are returned unchanged."""
    if name != "auto":
        return name
    candidates = _CUDA_PREFERENCE if device.type == "cuda" else ("cpu",)
    for candidate in candidates:
        backend = BACKENDS[candidate]
        if dtype in backend.dtypes and backend.unavailable_reason(device) is None:
            return candidate
    return "reference"
