"""Plain-PyTorch references of every op: the ground truth the fused backends are tested against."""

from .rel_memory_attention import default_kv_head_index, rel_memory_attention, rel_shift, visibility_mask

__all__ = ["default_kv_head_index", "rel_memory_attention", "rel_shift", "visibility_mask"]
