"""Plain-PyTorch references of every op: the ground truth the fused backends are tested against."""

from .cross_head_attention import cross_head_attention
from .rel_memory_attention import (
    default_kv_head_index,
    position_scores,
    rel_memory_attention,
    rel_shift,
    relative_scores,
    visibility_mask,
)

__all__ = [
    "cross_head_attention",
    "default_kv_head_index",
    "position_scores",
    "rel_memory_attention",
    "rel_shift",
    "relative_scores",
    "visibility_mask",
]
