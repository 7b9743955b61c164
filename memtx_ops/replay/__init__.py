"""Prioritized example replay on the device (SPEC §5): the buffer, its sampling structures, the ghost-norm priority
and a host-sync detector for the tests.

    from memtx_ops.replay import PrioritizedReplay, LinearSchedule

    buffer = PrioritizedReplay(100_000, alpha=0.6, beta=LinearSchedule(0.4, 1.0, steps=10_000), rule="loss")
    buffer.add((tokens, targets))                     # [k, L] each; new examples get the largest priority
    indices, (tokens, targets), weights = buffer.sample(32)
    losses = per_example_loss(tokens, targets)        # [32], from the training batch's own forward
    (weights * losses).mean().backward()
    buffer.update(indices, losses.detach())
"""

from .buffer import RULES, LinearSchedule, PrioritizedReplay, ReplaySample
from .ghost_norm import cross_entropy_logit_grads, output_layer_grad_norms
from .host_sync import HostSyncDetector, HostSyncError
from .structures import STRUCTURES, SUM_TREE_FROM, CumsumSampler, SumTree, make_structure

__all__ = ["CumsumSampler", "HostSyncDetector", "HostSyncError", "LinearSchedule", "PrioritizedReplay", "RULES",
           "ReplaySample", "STRUCTURES", "SUM_TREE_FROM", "SumTree", "cross_entropy_logit_grads", "make_structure",
           "output_layer_grad_norms"]
