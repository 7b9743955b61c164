"""The CUDA build of the extension (``make check-cuda-build``): with a CUDA build of torch, ``MEMTX_CUDA=1 pip
install --no-build-isolation .`` builds, links and imports ``memtx_ops._C`` with its CUDA kernels registered. No GPU
is needed. Skipped where torch has no CUDA (the usual CPU test environment); ``MEMTX_EXPECT_CUDA_BUILD=1`` (set by
the make target) turns that skip into a failure.
"""

from __future__ import annotations

import os

import pytest
import torch

EXPECTED = os.environ.get("MEMTX_EXPECT_CUDA_BUILD", "") not in ("", "0")
if torch.version.cuda is None and not EXPECTED:
    pytestmark = pytest.mark.skip(reason=f"torch {torch.__version__} has no CUDA: the CUDA build was NOT checked "
                                  "(run `make check-cuda-build`)")

OPS = ("rel_memory_attention_fwd", "rel_memory_attention_bwd")


def test_torch_has_cuda():
    assert torch.version.cuda is not None, f"torch {torch.__version__} is a CPU build"


def test_extension_imports_with_cuda_kernels():
    import memtx_ops
    from memtx_ops._extension import extension_error, has_cuda_kernels

    assert extension_error() is None, extension_error()
    assert has_cuda_kernels(), "memtx_ops._C was built without its CUDA kernels"
    for op in OPS:
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"memtx_C::{op}", key), (op, key)
    assert os.path.dirname(memtx_ops.__file__) != os.path.join(os.path.dirname(os.path.dirname(__file__)), "memtx_ops")


def test_extension_links_the_cuda_runtime():
    from memtx_ops import _C

    with open(_C.__file__, "rb") as f:
        image = f.read()
    assert b"rel_attn_forward" in image and b"cudaLaunchKernel" in image


def test_cuda_backend_reports_ready():
    """The dispatcher sees the CUDA kernels: the cuda backend is ready for CUDA tensors (what runs them needs a GPU)."""
    from memtx_ops.backends import BACKENDS

    assert BACKENDS["cuda"].unavailable_reason(torch.device("cuda")) is None
    assert "runs on cuda tensors" in BACKENDS["cuda"].unavailable_reason(torch.device("cpu"))


def test_shared_memory_the_kernels_need_reaches_the_dispatcher():
    """The extension tells the dispatcher how much shared memory per block its kernels need (what its own check asks
    of the GPU), so that backend="auto" passes over a GPU that has less: more than the 99 KiB of sm_86/sm_89 GPUs for
    some dtypes and head dims, never more than an H100's 227 KiB."""
    from memtx_ops.backends.cuda import _kernel_shared_memory

    need = {(dtype, head_dim): torch.ops.memtx_C.cuda_shared_memory_bytes(head_dim, dtype)
            for dtype in (torch.float16, torch.bfloat16, torch.float32) for head_dim in (1, 32, 33, 64, 65, 128)}
    assert all(48 * 1024 < n <= 227 * 1024 for n in need.values()), need
    assert need[torch.bfloat16, 128] > 99 * 1024, need
    assert _kernel_shared_memory(128, torch.bfloat16) == need[torch.bfloat16, 128]
    with pytest.raises(RuntimeError, match="head dim 129 is not supported"):
        torch.ops.memtx_C.cuda_shared_memory_bytes(129, torch.bfloat16)
