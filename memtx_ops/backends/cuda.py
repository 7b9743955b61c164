"""C++/CUDA backend: the ``memtx_C`` operators' CUDA kernels (``csrc/cuda``).

The kernels use ``mma.sync`` with bf16/tf32 operands (compute capability 8.0 or newer) and opt in to more shared
memory per block than the default 48 KiB, how much depending on the dtype and head dim (up to about 118 KiB). A GPU
that cannot give either is refused here, before a launch, so that ``backend="auto"`` passes over it (Triton then)
instead of raising in the C++ check: sm_7x GPUs, and the 99 KiB of sm_86/sm_89 GPUs (A10, L4, RTX 30xx/40xx) for
some dtypes and head dims.
"""

from typing import Dict, Optional, Tuple

import torch

from .base import ExtensionBackend


@torch.compiler.assume_constant_result
def _compute_capability_major(index: Optional[int]) -> int:
    """The compute capability's major number of CUDA device ``index`` (None: the current one)."""
    return torch.cuda.get_device_properties(index).major


@torch.compiler.assume_constant_result
def _shared_memory_optin(index: Optional[int]) -> int:
    """The shared memory per block, in bytes, that a kernel on CUDA device ``index`` may opt in to."""
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


_KERNEL_SHARED_MEMORY: Dict[Tuple[int, torch.dtype], int] = {}


@torch.compiler.assume_constant_result
def _kernel_shared_memory(head_dim: int, dtype: torch.dtype) -> int:
    """The shared memory per block, in bytes, that the kernels for ``head_dim`` and ``dtype`` need (the largest of
    their passes), as the extension computes it; asked once per pair."""
    key = (head_dim, dtype)
    if key not in _KERNEL_SHARED_MEMORY:
        _KERNEL_SHARED_MEMORY[key] = torch.ops.memtx_C.cuda_shared_memory_bytes(head_dim, dtype)
    return _KERNEL_SHARED_MEMORY[key]


class CudaBackend(ExtensionBackend):
    """:class:`ExtensionBackend` on CUDA tensors, refusing a GPU its kernels cannot run on."""

    def unfit_reason(self, device, dtype, head_dim):
        major = _compute_capability_major(device.index)
        if major < 8:
            return (f"its kernels need compute capability 8.0 or newer (mma.sync with bf16/tf32), this GPU has "
                    f"{major}.x; use backend='triton' or 'reference'")
        need, have = _kernel_shared_memory(head_dim, dtype), _shared_memory_optin(device.index)
        if need > have:
            return (f"its kernels for D={head_dim} in {str(dtype).replace('torch.', '')} need {need} bytes of shared "
                    f"memory per block, this GPU allows {have}; use backend='triton' or 'reference'")
        return None


BACKEND = CudaBackend("cuda", "cuda", (torch.float16, torch.bfloat16, torch.float32), max_head_dim=128)
