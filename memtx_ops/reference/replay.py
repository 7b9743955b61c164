"""Plain reference of prioritized example replay (SPEC §5): the formulas written out, in float64 on the CPU, with
Python loops where the device buffer vectorises (the priority update runs slot by slot, in order) and a brute-force
running sum where the device buffer has a sum tree.

:class:`ReferencePrioritizedReplay` has the API of :class:`memtx_ops.replay.PrioritizedReplay` (add, sample, update)
and draws its uniform numbers exactly as that does (``torch.rand(n, dtype=float64, generator)``), so the two, driven
by the same calls and generator states, give the same slots, weights and priorities.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def sampling_probabilities(priorities: Tensor, alpha: float) -> Tensor:
    """``P(i) = p_i**alpha / sum_j p_j**alpha`` of the filled slots' priorities ``[n]`` -> ``[n]`` float64."""
    masses = priorities.double() ** alpha
    return masses / masses.sum()


def importance_weights(priorities: Tensor, indices: Tensor, alpha: float, beta: float) -> Tensor:
    """``w_i = (n P(i))**-beta / max_j (n P(j))**-beta`` of the slots ``indices``; n = number of filled slots, the
    max over the whole buffer -> ``[len(indices)]`` float64."""
    probabilities = sampling_probabilities(priorities, alpha)
    n = priorities.numel()
    scaled = (n * probabilities) ** -beta
    return scaled[indices.long()] / scaled.max()


def inverse_cdf(masses: Tensor, uniforms: Tensor) -> Tensor:
    """For each uniform ``u`` in [0, 1), the first slot whose running sum of ``masses`` exceeds ``u * total``
    (slot j is drawn with probability ``masses[j] / total``), by a brute-force scan -> ``[len(uniforms)]`` int64."""
    running, total = [], 0.0
    for m in masses.double().tolist():
        total += m
        running.append(total)
    slots = []
    for u in uniforms.double().tolist():
        target = u * total
        j = 0
        while j < len(running) - 1 and running[j] <= target:
            j += 1
        slots.append(j)
    return torch.tensor(slots, dtype=torch.long)


def updated_priorities(priorities: Tensor, last_losses: Tensor, indices: Tensor, values: Tensor, rule: str,
                       eps: float) -> Tuple[Tensor, Tensor]:
    """The priorities and last-visit losses ``[N]`` after ``update(indices, values)`` by ``rule``, one slot after
    the other: every new priority is computed from the state before the update (a NaN last loss: none recorded,
    ``|value|`` is used), and a slot that appears more than once keeps its last occurrence's value."""
    before = last_losses.double().clone()
    priorities, last_losses = priorities.double().clone(), last_losses.double().clone()
    for i, v in zip(indices.long().tolist(), values.double().tolist()):
        if rule == "loss_difference":
            previous = before[i].item()
            priorities[i] = (abs(v) if math.isnan(previous) else abs(v - previous)) + eps
            last_losses[i] = v
        elif rule in ("loss", "grad_norm"):
            priorities[i] = abs(v) + eps
        else:
            raise ValueError(f"unknown rule {rule!r}")
    return priorities, last_losses


class ReferencePrioritizedReplay:
    """The SPEC's buffer in plain Python: lists of examples and float64 priorities on the CPU. ``beta`` is a float
    or a callable of the number of samples drawn, as for :class:`memtx_ops.replay.PrioritizedReplay`."""

    def __init__(self, capacity: int, alpha: float = 0.6, beta=0.4, rule: str = "loss", eps: float = 1e-6):
        self.capacity, self.alpha, self.beta, self.rule, self.eps = capacity, alpha, beta, rule, eps
        self.examples: List[Optional[Tuple[Tensor, ...]]] = [None] * capacity
        self.priorities = torch.zeros(capacity, dtype=torch.float64)
        self.last_losses = torch.full((capacity,), math.nan, dtype=torch.float64)
        self.max_priority = 1.0
        self.position = self.filled = self.samples_drawn = 0

    def add(self, examples: Sequence[Tensor], priorities: Optional[Tensor] = None,
            losses: Optional[Tensor] = None) -> Tensor:
        """Writes the k examples (a tuple of ``[k, ...]`` tensors) one by one into the ring -> their slots."""
        slots = []
        for j in range(examples[0].shape[0]):
            slot = self.position
            self.examples[slot] = tuple(t[j].cpu().clone() for t in examples)
            p = self.max_priority if priorities is None else float(priorities[j])
            self.priorities[slot] = p
            self.last_losses[slot] = math.nan if losses is None else float(losses[j])
            slots.append(slot)
            self.position = (self.position + 1) % self.capacity
            self.filled = min(self.filled + 1, self.capacity)
        if priorities is not None:
            self.max_priority = max(self.max_priority, float(priorities.max()))
        return torch.tensor(slots, dtype=torch.long)

    def sample(self, n: int, generator: torch.Generator):
        """-> (slots [n], examples (tuple of [n, ...]), weights [n] float64), from ``torch.rand(n, float64,
        generator)``."""
        beta = self.beta(self.samples_drawn) if callable(self.beta) else self.beta
        uniforms = torch.rand(n, dtype=torch.float64, generator=generator)
        filled = self.priorities[: self.filled]
        slots = inverse_cdf(filled ** self.alpha, uniforms)
        weights = importance_weights(filled, slots, self.alpha, beta)
        self.samples_drawn += 1
        examples = tuple(torch.stack([self.examples[i][k] for i in slots.tolist()])
                         for k in range(len(self.examples[0])))
        return slots, examples, weights

    def update(self, indices: Tensor, values: Tensor) -> None:
        self.priorities, self.last_losses = updated_priorities(self.priorities, self.last_losses, indices.cpu(),
                                                               values.cpu(), self.rule, self.eps)
        for i in indices.tolist():
            self.max_priority = max(self.max_priority, float(self.priorities[i]))
