"""Fused ops: public entry points with argument checks, autograd and ``torch.library`` registration."""

from .causal_resample import causal_downsample, upsample_add
from .cross_head_attention import cross_head_attention
from .dropout import dropout, relu_dropout
from .memory_replay import memory_replay
from .rel_memory_attention import rel_memory_attention

__all__ = ["causal_downsample", "cross_head_attention", "dropout", "memory_replay", "rel_memory_attention",
           "relu_dropout", "upsample_add"]
