"""Fused ops: public entry points with argument checks, autograd and ``torch.library`` registration."""

from .rel_memory_attention import rel_memory_attention

__all__ = ["rel_memory_attention"]
