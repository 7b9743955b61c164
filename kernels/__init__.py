"""Triton kernels of memtx_ops (installed as ``memtx_ops.kernels``).

The package is a leaf: its modules import triton, torch and each other, never the rest of memtx_ops. This file
imports no triton, so the backends can ask :func:`interpreter_enabled` where triton is not installed.
"""

import os


def interpreter_enabled() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
