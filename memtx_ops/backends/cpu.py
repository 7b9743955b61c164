"""C++ CPU backend: the ``memtx_C`` operators' CPU kernels (``csrc/cpu``)."""

import torch

from .base import ExtensionBackend

BACKEND = ExtensionBackend("cpu", "cpu", (torch.float32, torch.float64))
