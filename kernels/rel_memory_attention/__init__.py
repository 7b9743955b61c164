"""Triton kernels of ``rel_memory_attention`` (SPEC §1): forward and backward."""

from .bwd import rel_memory_attention_bwd
from .fwd import rel_memory_attention_fwd

__all__ = ["rel_memory_attention_bwd", "rel_memory_attention_fwd"]
