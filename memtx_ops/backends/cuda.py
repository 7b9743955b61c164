"""C++/CUDA backend: the ``memtx_C`` operators' CUDA kernels (``csrc/cuda``)."""

import torch

from .base import ExtensionBackend

BACKEND = ExtensionBackend("cuda", "cuda", (torch.float16, torch.bfloat16, torch.float32), max_head_dim=128)
