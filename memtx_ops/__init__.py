"""memtx_ops: fused kernels for memory-based transformers (Transformer-XL attention, skip cross-head, MRBP,
Philox dropout, causal resampling of hourglass models) and prioritized example replay on the device
(memtx_ops.replay)."""

from memtx_ops import _extension, reference, replay
from memtx_ops.backends import BACKEND_NAMES
from memtx_ops.ops import (causal_downsample, cross_head_attention, dropout, memory_replay, rel_memory_attention,
                           relu_dropout, upsample_add)

__version__ = "0.1.0"

__all__ = ["BACKEND_NAMES", "causal_downsample", "cross_head_attention", "dropout", "memory_replay", "reference",
           "rel_memory_attention", "relu_dropout", "replay", "upsample_add"]
