"""Cross-head permutation draws (SPEC §2, the regulariser of the Skip Cross-head Transformer-XL).

In training, each forward of a layer's :class:`CrossHeadPermutation` flips one coin: with probability
``p`` it returns a random permutation ``perm`` of the ``H`` heads (int64 ``[H]``), which the layer passes
to :func:`memtx_ops.cross_head_attention` (query head ``h`` then reads the keys, values and position
projections of head ``perm[h]``); otherwise it returns None (plain attention). In evaluation it returns None.

Draws come from a CPU ``torch.Generator`` (a constructor argument or the ``generator`` attribute; by
default one seeded from the global RNG when the module is made), so runs are reproducible. Under
``torch.distributed`` the generator's state is broadcast from rank 0 of the process group before its
first draw (and again after the generator is replaced); from then on every rank draws the same coins
and permutations as long as all ranks draw in the same order, as data-parallel training does. No
collective runs per draw and no device is synchronised.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn


class RankConsistentRandom:
    """Mixin: a CPU ``generator`` whose state is copied from rank 0 of ``group`` before the first draw.

    Subclasses set ``self.group`` and ``self.generator`` in ``__init__`` and draw from
    ``self._synced_generator()``. On ranks other than 0 the synchronisation overwrites the state of the
    generator that was passed in.
    """

    group: Optional["dist.ProcessGroup"] = None

    @property
    def generator(self) -> torch.Generator:
        return self._generator

    @generator.setter
    def generator(self, generator: Optional[torch.Generator]) -> None:
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))
        elif not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"generator must be a CPU torch.Generator or None, got {generator!r}")
        self._generator = generator
        self._synced = False

    def _synced_generator(self) -> torch.Generator:
        """The generator, its state first broadcast from rank 0 if a process group is up and it was not yet."""
        if not self._synced and dist.is_available() and dist.is_initialized():
            state = [self._generator.get_state()]
            dist.broadcast_object_list(state, group=self.group, group_src=0)
            self._generator.set_state(state[0])
            self._synced = True
        return self._generator


class CrossHeadPermutation(RankConsistentRandom, nn.Module):
    """One coin and one head permutation per layer forward, in training only.

    ``p``: probability of permuting (0.1 in the paper). ``generator``: CPU ``torch.Generator`` the draws
    come from (settable later through ``.generator``). ``group``: the process group whose rank 0 sets
    the generator state (default: the world).
    """

    def __init__(self, p: float = 0.1, *, generator: Optional[torch.Generator] = None, group=None):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.group = group
        self.generator = generator

    def forward(self, num_heads: int, device=None) -> Optional[torch.Tensor]:
        """In training, with probability ``p``: a random permutation of ``range(num_heads)``, int64 ``[num_heads]``
        on ``device``; otherwise (and always in eval) None."""
        if not self.training:
            return None
        generator = self._synced_generator()
        if torch.rand((), generator=generator, dtype=torch.float64).item() >= self.p:
            return None
        return torch.randperm(num_heads, generator=generator).to(device)

    def extra_repr(self) -> str:
        return f"p={self.p}"
