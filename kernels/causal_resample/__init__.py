"""Triton kernels of the causal resampling ops (SPEC §4): ``causal_downsample`` and ``upsample_add``."""

from .downsample import causal_downsample_bwd, causal_downsample_fwd, causal_downsample_weights_grad
from .upsample import upsample_add_bwd, upsample_add_fwd

__all__ = ["causal_downsample_bwd", "causal_downsample_fwd", "causal_downsample_weights_grad", "upsample_add_bwd",
           "upsample_add_fwd"]
