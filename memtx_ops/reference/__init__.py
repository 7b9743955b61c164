"""Plain-PyTorch references of every op: the ground truth the fused backends are tested against."""

from .causal_resample import causal_downsample, linear_upsample_weights, shifted_rows, upsample_add
from .cross_head_attention import cross_head_attention
from .dropout import dropout, dropout_keep_mask, philox4x32_10
from .rel_memory_attention import (
    default_kv_head_index,
    position_scores,
    rel_memory_attention,
    rel_shift,
    relative_scores,
    visibility_mask,
)
from .replay import (
    ReferencePrioritizedReplay,
    importance_weights,
    inverse_cdf,
    sampling_probabilities,
    updated_priorities,
)

__all__ = [
    "ReferencePrioritizedReplay",
    "causal_downsample",
    "cross_head_attention",
    "default_kv_head_index",
    "dropout",
    "dropout_keep_mask",
    "importance_weights",
    "inverse_cdf",
    "linear_upsample_weights",
    "philox4x32_10",
    "position_scores",
    "rel_memory_attention",
    "rel_shift",
    "relative_scores",
    "sampling_probabilities",
    "shifted_rows",
    "updated_priorities",
    "upsample_add",
    "visibility_mask",
]
