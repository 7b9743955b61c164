"""Skip-retain (SPEC §2): phase 1 of the two-phase training of the Skip Cross-head Transformer-XL.

Schedule (:class:`SkipRetainSchedule`). In pre-training, once per segment, layer ``l`` (``l = 1 .. n_layer``)
is skipped with probability ``p_l``: ``p`` for every layer (``"uniform"``) or ``p * l / n_layer``
(``"linear"``; the default ``p = 0.5`` gives the paper's ``0.5 * l / n_layer``). The last layer is never
skipped. Evaluation and the fine-tuning phase (``phase="finetune"``, phase 2) never skip. The draws come
from a CPU ``torch.Generator`` synchronised from rank 0 under ``torch.distributed``, exactly like
:class:`memtx_ops.nn.CrossHeadPermutation`'s, so every rank skips the same layers.

Memory (:class:`LayerMemory`). Layer ``l`` of a Transformer-XL stack attends over ``[memory ; segment]``,
its memory holding the inputs it saw in earlier segments (batch-first, ``[B, M, ...]``). A kept layer
attends, then refreshes its memory with its current input. A skipped layer passes its input through
unchanged and keeps its memory, which ages: the age ``g`` counts the segments since the memory was written
(1: the previous segment). A memory of age ``g`` ends ``(g - 1) * L`` positions before the current segment,
so a kept layer attends with ``mem_offset = (g - 1) * L`` (the sum of the skipped segments' lengths, which
is the same when all segments have length ``L``). A memory always holds consecutive positions, because a
single ``mem_offset`` can describe no gap: a kept layer with ``g = 1`` keeps the last ``mem_len`` positions of
``[memory ; input]`` (Transformer-XL), but with ``g > 1`` the old memory is not adjacent to the input and the
new memory is the last ``mem_len`` positions of the input alone. In evaluation and fine-tuning ``g = 1``.

One segment of a stack::

    skip = schedule.decide(model.training)
    h, new_memories = x, []
    for layer, memory, skipped in zip(layers, memories, skip):
        new_memories.append(memory.update(skipped, h.detach(), mem_len))  # Transformer-XL detaches memory
        if not skipped:
            h = layer(h, memory.hidden, mem_offset=memory.mem_offset)
    memories = new_memories
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from .cross_head import RankConsistentRandom

SCHEDULES = ("uniform", "linear")
PHASES = ("pretrain", "finetune")


class SkipRetainSchedule(RankConsistentRandom):
    """Which layers of an ``n_layer`` stack to skip in a segment.

    ``p``: the uniform skip probability, or the slope of the linear schedule (``p_l = p * l / n_layer``).
    ``schedule``: ``"uniform"`` or ``"linear"``. ``phase``: ``"pretrain"`` (skips) or ``"finetune"``
    (never skips; settable). ``generator``, ``group``: as for :class:`memtx_ops.nn.CrossHeadPermutation`.
    """

    def __init__(self, n_layer: int, p: float = 0.5, schedule: str = "linear", phase: str = "pretrain", *,
                 generator: Optional[torch.Generator] = None, group=None):
        if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
            raise ValueError(f"n_layer must be an int >= 1, got {n_layer!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.n_layer, self.p, self.schedule = n_layer, float(p), schedule
        self.phase = phase
        self.group = group
        self.generator = generator

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self._phase = phase

    @property
    def probabilities(self) -> List[float]:
        """Skip probability of each layer in pre-training, ``[n_layer]``; the last one is 0."""
        n = self.n_layer
        probs = [self.p if self.schedule == "uniform" else self.p * l / n for l in range(1, n)]
        return probs + [0.0]

    def decide(self, training: bool) -> List[bool]:
        """Skip flags of one segment, ``[n_layer]`` (True: skip layer ``l``). All False unless ``training``
        in the pre-training phase."""
        if not training or self.phase == "finetune":
            return [False] * self.n_layer
        draws = torch.rand(self.n_layer, generator=self._synced_generator(), dtype=torch.float64)
        return (draws < torch.tensor(self.probabilities, dtype=torch.float64)).tolist()


@dataclasses.dataclass(frozen=True)
class LayerMemory:
    """One layer's memory: ``hidden`` ``[B, M, ...]`` (``M`` may be 0), its age ``g`` and the ``mem_offset``
    the layer attends to it with (``(g - 1) * L``)."""

    hidden: torch.Tensor
    age: int = 1
    mem_offset: int = 0

    @classmethod
    def empty(cls, x: torch.Tensor) -> "LayerMemory":
        """No memory yet: ``hidden`` is ``x[:, :0]`` (``[B, 0, ...]``)."""
        return cls(x[:, :0])

    def update(self, skipped: bool, x: torch.Tensor, mem_len: int) -> "LayerMemory":
        """The memory for the next segment, given this segment's layer input ``x`` ``[B, L, ...]``.

        Skipped: the same ``hidden``, one segment older (``mem_offset`` grows by ``L``). Kept: the last
        ``mem_len`` positions of ``[hidden ; x]`` (of ``x`` alone if this memory had aged), age 1, as a new
        contiguous tensor (one copy of those positions, so the layout is the same whether or not it is full).
        """
        if isinstance(mem_len, bool) or not isinstance(mem_len, int) or mem_len < 0:
            raise ValueError(f"mem_len must be an int >= 0, got {mem_len!r}")
        if skipped:
            return LayerMemory(self.hidden, self.age + 1, self.mem_offset + x.shape[1])
        from_x = min(x.shape[1], mem_len)
        from_hidden = min(self.hidden.shape[1], mem_len - from_x) if self.age == 1 else 0
        kept = [self.hidden[:, self.hidden.shape[1] - from_hidden:], x[:, x.shape[1] - from_x:]]
        return LayerMemory(torch.cat(kept, dim=1))
