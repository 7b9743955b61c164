"""Drop-in ``nn.Module``s over the fused ops."""

from .cross_head import CrossHeadPermutation
from .dropout import Dropout
from .generation import KeyValueCache, PendingMemory
from .hourglass import HourglassTransformerXL
from .rel_attention import RelPartialLearnableMultiHeadAttn
from .skip_retain import LayerMemory, SkipRetainSchedule
from .transformer_xl import SegmentRollout, TransformerXL

__all__ = ["CrossHeadPermutation", "Dropout", "HourglassTransformerXL", "KeyValueCache", "LayerMemory", "PendingMemory",
           "RelPartialLearnableMultiHeadAttn", "SegmentRollout", "SkipRetainSchedule", "TransformerXL"]
