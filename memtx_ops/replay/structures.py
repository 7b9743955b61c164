"""Sampling structures of prioritized replay, on the device and without host synchronisation.

Each holds one mass per slot of a buffer of capacity N (``p_i ** alpha`` for a filled slot, 0 for an empty one),
in float64, and answers: ``set`` the masses of some slots; ``draw`` slots with probability proportional to their
mass, from uniform numbers in [0, 1); ``min_mass``, the smallest mass of the filled slots (for the importance
weights). The filled slots are always ``0 .. filled - 1`` (the ring fills from slot 0 before it wraps), and every
filled slot has a positive mass (priorities are at least eps), so the empty slots are a tail.

:class:`SumTree` -- a sum tree of branching factor ``b`` (2 is the classic binary tree) plus a min tree of the
same shape. Level 0 holds the N leaves, level ``k + 1`` one node per block of ``b`` nodes of level ``k`` (their
sum, resp. their minimum); the top level has one node, the root. Each level is one tensor, padded to a multiple
of ``b`` (with 0, resp. +inf), so that ``level.view(-1, b)[j]`` are the children of node ``j`` above.

* ``set(slots, masses)`` of n slots: the leaves are written at once, then, level by level, the touched parents
  ``slots // b**k`` are recomputed from their ``b`` children in one vectorised gather + row sum (row min) + write:
  ``log_b N`` passes of O(n b) work, no serial loop. Two touched leaves under one parent make that parent appear
  twice; both writes carry the same value, so the result is defined. Every parent is recomputed from its children
  (never moved by a delta), so the sums do not drift however many updates run.
* ``draw(u)``: n descents at once, one level per step from the root: the target ``u * total`` goes to the child
  whose running sum of masses first exceeds it, less the masses before that child. A boundary into a child of mass
  0 is never crossed, so a target that rounding pushed past the last filled leaf still lands on a filled one.
  ``log_b N`` steps of O(n b) work.
* ``min_mass``: the min tree's root, O(1).

:class:`CumsumSampler` -- the masses as one tensor; ``draw`` takes their running sum (O(N)) and ``searchsorted``
(O(n log N)); ``set`` is one write (O(n)); ``min_mass`` a reduction over the filled slots and ``total`` one over all
(O(N)). Fewer, larger
kernels than the tree: faster below a capacity that depends on the device (``bench/suites/replay.py`` measures the
crossover; :func:`make_structure` chooses by it).

Memory: the tree holds about ``2 N b / (b - 1)`` float64 values (both trees), the cumsum sampler N plus an N-long
running sum while drawing.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor

STRUCTURES = ("auto", "sum_tree", "cumsum")
DEFAULT_BRANCHING = 16
# Capacity from which "auto" takes the sum tree, per device type: the crossover that bench/suites/replay.py measured
# (sample + update of 256 slots per step; CPU: cumsum faster at 1e5 slots, the sum tree 1.3x faster at 3e5, on a quiet
# 2-core machine; CUDA: not measured). See docs/replay.md.
SUM_TREE_FROM = {"cpu": 2**18, "cuda": 2**24}


def _check_capacity(capacity) -> None:
    """A ValueError unless ``capacity`` is an int >= 1."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")


class SumTree:
    """Sum and min trees over ``capacity`` float64 masses on ``device``; ``branching`` children per node (>= 2)."""

    def __init__(self, capacity: int, device, branching: int = DEFAULT_BRANCHING):
        _check_capacity(capacity)
        if isinstance(branching, bool) or not isinstance(branching, int) or branching < 2:
            raise ValueError(f"branching must be an int >= 2, got {branching!r}")
        self.capacity, self.branching, self.device = capacity, branching, torch.device(device)
        self.sums: List[Tensor] = []
        self.mins: List[Tensor] = []
        count = capacity
        while True:
            size = -(-count // branching) * branching
            self.sums.append(torch.zeros(size, dtype=torch.float64, device=self.device))
            self.mins.append(torch.full((size,), float("inf"), dtype=torch.float64, device=self.device))
            if count == 1:
                break
            count = -(-count // branching)

    @property
    def masses(self) -> Tensor:
        """The leaves: ``[capacity]`` float64 (0 where empty)."""
        return self.sums[0][: self.capacity]

    @property
    def total(self) -> Tensor:
        """The sum of all masses, 0-dim."""
        return self.sums[-1][0]

    def set(self, slots: Tensor, masses: Tensor) -> None:
        """Writes ``masses`` [n] float64 at ``slots`` [n] int64 (duplicate slots must carry equal masses)."""
        b = self.branching
        self.sums[0].index_copy_(0, slots, masses)
        self.mins[0].index_copy_(0, slots, masses)
        node = slots
        for k in range(len(self.sums) - 1):
            node = torch.div(node, b, rounding_mode="floor")
            self.sums[k + 1].index_copy_(0, node, self.sums[k].view(-1, b).index_select(0, node).sum(1))
            self.mins[k + 1].index_copy_(0, node, self.mins[k].view(-1, b).index_select(0, node).amin(1))

    def draw(self, uniforms: Tensor, filled: int) -> Tensor:
        """Slots ``[n]`` int64 drawn with probability mass / total from ``uniforms`` [n] float64 in [0, 1)."""
        b = self.branching
        target = uniforms * self.total
        node = torch.zeros(uniforms.shape, dtype=torch.long, device=self.device)
        for k in range(len(self.sums) - 2, -1, -1):
            children = self.sums[k].view(-1, b).index_select(0, node)           # [n, b]
            running = children.cumsum(1)
            # cross the boundary after child j when the target reaches it and child j + 1 has mass
            crossed = (running[:, :-1] <= target[:, None]) & (children[:, 1:] > 0)
            child = crossed.sum(1, keepdim=True)
            target = target - F.pad(running[:, :-1], (1, 0)).gather(1, child).squeeze(1)
            node = node * b + child.squeeze(1)
        return node

    def min_mass(self, filled: int) -> Tensor:
        """The smallest mass of the filled slots, 0-dim (+inf when none is filled)."""
        return self.mins[-1][0]

    def state_dict(self) -> Dict[str, object]:
        return {"branching": self.branching, "sums": [t.clone() for t in self.sums],
                "mins": [t.clone() for t in self.mins]}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if state["branching"] != self.branching or [t.numel() for t in state["sums"]] != \
                [t.numel() for t in self.sums]:
            raise ValueError(f"SumTree.load_state_dict: the state is of a tree with branching {state['branching']} "
                             f"and other levels (this one: capacity {self.capacity}, branching {self.branching})")
        for mine, saved in zip(self.sums + self.mins, list(state["sums"]) + list(state["mins"])):
            mine.copy_(saved)


class CumsumSampler:
    """The ``capacity`` float64 masses in one tensor on ``device``; draws by cumsum + searchsorted."""

    def __init__(self, capacity: int, device):
        _check_capacity(capacity)
        self.capacity, self.device = capacity, torch.device(device)
        self.masses = torch.zeros(capacity, dtype=torch.float64, device=self.device)

    def set(self, slots: Tensor, masses: Tensor) -> None:
        """Writes ``masses`` [n] float64 at ``slots`` [n] int64 (duplicate slots must carry equal masses)."""
        self.masses.index_copy_(0, slots, masses)

    def draw(self, uniforms: Tensor, filled: int) -> Tensor:
        """Slots ``[n]`` int64 drawn with probability mass / total from ``uniforms`` [n] float64 in [0, 1)."""
        running = self.masses[:filled].cumsum(0)
        slots = torch.searchsorted(running, uniforms * running[-1], right=True)
        return slots.clamp_(max=filled - 1)  # a target that rounding put at the total

    @property
    def total(self) -> Tensor:
        """The sum of all masses, 0-dim."""
        return self.masses.sum()

    def min_mass(self, filled: int) -> Tensor:
        """The smallest mass of the filled slots, 0-dim."""
        return self.masses[:filled].amin()

    def state_dict(self) -> Dict[str, object]:
        return {"masses": self.masses.clone()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        if "masses" not in state or state["masses"].shape != self.masses.shape:
            raise ValueError(f"CumsumSampler.load_state_dict: the state is not of a cumsum sampler of capacity "
                             f"{self.capacity}")
        self.masses.copy_(state["masses"])


def make_structure(kind: str, capacity: int, device, branching: int = DEFAULT_BRANCHING):
    """``"sum_tree"``, ``"cumsum"`` or ``"auto"`` (the sum tree from ``SUM_TREE_FROM[device type]`` slots on,
    else cumsum) -> the structure."""
    _check_capacity(capacity)
    device = torch.device(device)
    if kind == "auto":
        kind = "sum_tree" if capacity >= SUM_TREE_FROM.get(device.type, SUM_TREE_FROM["cuda"]) else "cumsum"
    if kind == "sum_tree":
        return SumTree(capacity, device, branching)
    if kind == "cumsum":
        return CumsumSampler(capacity, device)
    raise ValueError(f"structure must be one of {STRUCTURES}, got {kind!r}")
