"""Triton backend (``kernels/rel_memory_attention``): CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``."""

from __future__ import annotations

from typing import Optional

import torch

from memtx_ops.kernels import interpreter_enabled

from .base import Backend


def interpreter_dtype_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton kernels cannot run ``dtype`` on ``device`` (None when they can): on CPU tensors they run in
    Triton's interpreter, whose bfloat16 arithmetic is wrong (outputs off by a factor of about 1e9)."""
    if device.type == "cpu" and dtype == torch.bfloat16:
        return ("Triton's CPU interpreter computes bfloat16 wrong; use float16 or float32 there, or backend 'cpu' "
                "(bfloat16 runs on CUDA tensors)")
    return None


class TritonBackend(Backend):
    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)

    def unavailable_reason(self, device):
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return f"triton is not installed ({exc}); `pip install triton`"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and interpreter_enabled():
            return None
        return (
            f"backend 'triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported; got tensors on {device}"
        )

    def unfit_reason(self, device, dtype, head_dim):
        return interpreter_dtype_reason(device, dtype)

    def forward(self, q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, *, float32_out):
        from memtx_ops.kernels.rel_memory_attention import rel_memory_attention_fwd

        return rel_memory_attention_fwd(q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale,
                                        float32_out=float32_out)

    def backward(self, grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale):
        from memtx_ops.kernels.rel_memory_attention import rel_memory_attention_bwd

        return rel_memory_attention_bwd(
            grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale
        )


BACKEND = TritonBackend()
