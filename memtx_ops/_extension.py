"""Loads the compiled extension ``memtx_ops._C`` and says why when it could not be loaded."""

from __future__ import annotations

from typing import Optional

import torch

_load_error: Optional[BaseException]
try:
    from memtx_ops import _C  # noqa: F401  (registers the torch.ops.memtx_C operators)

    _load_error = None
except ImportError as exc:  # the package still imports: the reference and Triton backends work
    _load_error = exc


def extension_error() -> Optional[str]:
    """None when ``memtx_ops._C`` is loaded, otherwise why it is not and how to build it."""
    if _load_error is None:
        return None
    return (
        f"the compiled extension memtx_ops._C could not be imported ({_load_error}); "
        "build it with `pip install --no-build-isolation .` (or `-e .`) in the memtx_ops checkout, "
        "with a C++17 compiler and the same torch that you run"
    )


# Read once, at import (the extension registers its kernels as it loads): torch.compile traces has_cuda_kernels() as
# a constant, where the dispatcher query itself, a torch function returning a bool, would break the graph.
_HAS_CUDA_KERNELS = _load_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "memtx_C::rel_memory_attention_fwd", "CUDA"
)


def has_cuda_kernels() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return _HAS_CUDA_KERNELS
