"""Fused ops: public entry points with argument checks, autograd and ``torch.library`` registration."""

from .cross_head_attention import cross_head_attention
from .dropout import dropout, relu_dropout
from .memory_replay import memory_replay
from .rel_memory_attention import rel_memory_attention

__all__ = ["cross_head_attention", "dropout", "memory_replay", "rel_memory_attention", "relu_dropout"]
