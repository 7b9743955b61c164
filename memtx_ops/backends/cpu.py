"""C++ CPU backend: the ``memtx_C`` operators' CPU kernels (``csrc/cpu``)."""

import torch

from .base import ExtensionBackend

# Queries per tile of the C++ kernels (kBlockM, csrc/cpu/rel_memory_attention.cpp).
QUERY_TILE = 64


class CpuBackend(ExtensionBackend):
    def lse_dtype(self, dtype):
        """Float64 in every dtype: the backward's probabilities then carry no rounding of the lse
        (``csrc/cpu/rel_memory_attention.cpp``'s header)."""
        return torch.float64

    def arrange_keys(self, k, v, query_len, needs_grad):
        """Training calls of more than one query tile get k and v with dense rows: a model hands them as views of
        its fused time-major projection ``[K, B, 2, Hk, D]``, whose rows of one (batch, head) lie a page or more
        apart, so every row read misses the TLB. Each row is read again by every query tile, in the forward and
        in the backward; one copy here serves both, and the projection's own buffer is then not kept for the
        backward. Measured at B=8, H=4, L=M=512, D=64 (2 threads): fwd+bwd 77-85 ms in place, 69-71 ms with
        the copy. Short queries and inference read each row about once: they stay in place. Tensors with an
        expanded (stride-0) dimension stay too, so that no expansion is materialised."""
        if not needs_grad or query_len <= QUERY_TILE:
            return k, v
        return tuple(t.contiguous() if t.stride(-2) > t.shape[-1] and 0 not in t.stride() else t for t in (k, v))


# Float16 and bfloat16 (a model under CPU autocast) run the float32 kernels (SPEC §1: accumulate in float32).
BACKEND = CpuBackend("cpu", "cpu", (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                     compute_dtypes={torch.float16: torch.float32, torch.bfloat16: torch.float32})
