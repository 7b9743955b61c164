"""Drop-in ``nn.Module``s over the fused ops."""

from .cross_head import CrossHeadPermutation
from .rel_attention import RelPartialLearnableMultiHeadAttn
from .skip_retain import LayerMemory, SkipRetainSchedule

__all__ = ["CrossHeadPermutation", "LayerMemory", "RelPartialLearnableMultiHeadAttn", "SkipRetainSchedule"]
