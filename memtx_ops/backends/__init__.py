"""Backend registry and the one dispatcher: which implementation runs a call."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

from . import cpu, cuda, triton
from .base import Backend, check_usable, warn_unavailable_extension

BACKENDS: Dict[str, Backend] = {b.name: b for b in (cpu.BACKEND, triton.BACKEND, cuda.BACKEND)}
BACKEND_NAMES = ("auto", "reference") + tuple(BACKENDS)

# backend="auto" on CUDA tensors: the faster of "triton" and "cuda" measured by `python -m bench
# --record-auto` on that GPU, per dtype and head dim (this file); otherwise this order: on the one GPU measured (an
# H200, bf16) the CUDA kernels were the faster in every training case and in decoding, where Triton's forward is
# host-bound (bench/results/gpu-check-NVIDIA-H200).
CUDA_CHOICES_FILE = os.path.join(os.path.dirname(__file__), "cuda_choices.json")
_CUDA_PREFERENCE = ("cuda", "triton")


def _load_cuda_choices() -> Dict[str, Dict[str, Dict[str, str]]]:
    """{GPU name: {dtype: {head dim: backend}}} from CUDA_CHOICES_FILE (empty when absent)."""
    try:
        with open(CUDA_CHOICES_FILE) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


# Read at import, not per call: torch.compile traces a call of the op, and a file read would break its graph.
_CUDA_CHOICES = _load_cuda_choices()


def cuda_choices() -> Dict[str, Dict[str, Dict[str, str]]]:
    """The recorded choices that backend="auto" follows ({GPU name: {dtype: {head dim: backend}}})."""
    return _CUDA_CHOICES


def reload_cuda_choices() -> None:
    """Reads CUDA_CHOICES_FILE again (after ``python -m bench --record-auto`` rewrote it)."""
    global _CUDA_CHOICES
    _CUDA_CHOICES = _load_cuda_choices()


@torch.compiler.assume_constant_result
def _gpu_name(index: Optional[int]) -> str:
    """The name of CUDA device ``index`` (None: the current one); torch.compile runs it once, as a constant."""
    return torch.cuda.get_device_name(index)


def measured_cuda_choice(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """The backend recorded as fastest for this GPU, dtype and head dim, or None."""
    by_dtype = _CUDA_CHOICES.get(_gpu_name(device.index), {})
    return by_dtype.get(str(dtype).replace("torch.", ""), {}).get(str(head_dim))


def get_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Backend:
    """The backend called ``name``, checked to run on ``device``, ``dtype`` and ``head_dim``; raises a clear
    error if not."""
    backend = BACKENDS[name]
    check_usable(backend, "rel_memory_attention", device, dtype)
    if head_dim > backend.max_head_dim:
        raise ValueError(
            f"rel_memory_attention: backend {name!r} supports head dims D <= {backend.max_head_dim}; got D={head_dim}"
        )
    reason = backend.unfit_reason(device, dtype, head_dim)
    if reason is not None:
        raise RuntimeError(f"rel_memory_attention: backend {name!r} cannot run on {device}: {reason}")
    return backend


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """Turns ``"auto"`` into a concrete backend name; other names are returned unchanged."""
    if name != "auto":
        return name
    candidates = ("cpu",)
    if device.type == "cuda":
        measured = measured_cuda_choice(device, dtype, head_dim)
        candidates = ((measured,) if measured else ()) + _CUDA_PREFERENCE
    for candidate in candidates:
        backend = BACKENDS[candidate]
        if (dtype in backend.dtypes and head_dim <= backend.max_head_dim and backend.unavailable_reason(device) is None
                and backend.unfit_reason(device, dtype, head_dim) is None):
            return candidate
    warn_unavailable_extension("rel_memory_attention")
    return "reference"
