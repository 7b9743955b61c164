"""Triton kernels of memtx_ops (installed as ``memtx_ops.kernels``)."""
