"""Prioritized example replay on the examples' device (SPEC §5; Transformer with Memory Replay, Liu & Mozafari 2022).

A ring of ``capacity`` slots holds training examples (a tensor, or a tuple of tensors, with a leading example
dimension) with one priority ``p_i > 0`` each. ``sample`` draws slots with probability
``P(i) = p_i**alpha / sum_j p_j**alpha`` over the filled slots and returns the importance weights
``w_i = (n P(i))**-beta / max_j (n P(j))**-beta`` (n filled slots, the max over the buffer: the weight is
``(m_i / m_min)**-beta`` with ``m = p**alpha``). ``update`` sets the priorities of replayed examples from their
losses: ``|loss| + eps`` (rule ``"loss"``), ``|loss - loss at the last visit| + eps`` (``"loss_difference"``; an
example's first visit, with no loss recorded, takes ``|loss| + eps``) or ``gradient norm + eps`` (``"grad_norm"``,
the norms from :func:`memtx_ops.replay.output_layer_grad_norms`). New examples enter with the largest priority seen
so far (1 in an empty buffer).

Duplicates: every priority of one ``update`` is computed from the state before it (the loss difference of a slot
drawn twice is taken against its previous visit both times), and a slot that appears more than once takes the value
of its last occurrence. The position of each index's last occurrence comes from one ``scatter_reduce(amax)`` of the
positions into a scratch tensor, so every write carries the last occurrence's value and is defined, without a sort
or a host sync.

No host synchronisation in ``add``, ``sample`` or ``update``: sizes come from shapes (the ring position and the
number of filled slots are Python ints), every op is one whose output size the host knows (``index_select``,
``index_copy_``, ``scatter_reduce``, ``cumsum``, ``searchsorted``, reductions to 0-dim tensors, ``torch.rand`` with
a device generator), the running maximum priority stays a 0-dim device tensor, and value checks (priorities positive
and finite, indices among the filled slots) run as ``torch._assert_async`` (a device-side assertion on CUDA). The
tests run all three under :class:`memtx_ops.replay.HostSyncDetector`.

Sampling structure: a sum tree (``log_b N`` vectorised passes per call) or cumsum + searchsorted (O(N) per draw,
fewer kernels), chosen by capacity (``structure="auto"``; see :mod:`memtx_ops.replay.structures`). Memory: the
examples, plus about 5 float64/int64 values per slot (priority, last loss, dedup scratch, masses) and the tree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from memtx_ops.ops.memory_replay import shares_storage

from .structures import DEFAULT_BRANCHING, STRUCTURES, make_structure

RULES = ("loss", "loss_difference", "grad_norm")
Examples = Union[Tensor, Tuple[Tensor, ...]]


class LinearSchedule:
    """``beta`` annealed linearly from ``start`` to ``end`` over ``steps`` samples, then held: ``schedule(step)``."""

    def __init__(self, start: float, end: float = 1.0, steps: int = 10000):
        for name, value in (("start", start), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"LinearSchedule: {name} must be in [0, 1], got {value!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"LinearSchedule: steps must be an int >= 1, got {steps!r}")
        self.start, self.end, self.steps = float(start), float(end), steps

    def __call__(self, step: int) -> float:
        return self.start + (self.end - self.start) * min(step, self.steps) / self.steps

    def __repr__(self) -> str:
        return f"LinearSchedule(start={self.start}, end={self.end}, steps={self.steps})"


class ReplaySample(NamedTuple):
    """What :meth:`PrioritizedReplay.sample` returns: slots ``[n]`` int64, the examples there (the structure they
    were added with, each ``[n, ...]``) and the importance weights ``[n]`` float32 (the largest possible is 1)."""

    indices: Tensor
    examples: Examples
    weights: Tensor


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}" if isinstance(value, (int, float, str)) else type(value).__name__


def _check_number(name: str, value, low: float, high: float = math.inf) -> float:
    """``value`` as a float, or a ValueError naming ``name`` unless it is a finite number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
            or not math.isfinite(value):
        bounds = f"in [{low}, {high}]" if high < math.inf else f">= {low} and finite"
        raise ValueError(f"{name} must be a number {bounds}, got {_describe(value)}")
    return float(value)


class PrioritizedReplay:
    """A prioritized replay buffer of training examples on their device (SPEC §5).

    ``capacity``: slots of the ring. ``alpha`` >= 0: priority exponent (0: uniform). ``beta``: importance-weight
    exponent in [0, 1], or a callable of the number of ``sample`` calls so far (e.g. :class:`LinearSchedule`).
    ``device``: where the buffer lives (default: that of the first examples added). ``rule``: ``"loss"``,
    ``"loss_difference"`` or ``"grad_norm"`` (what :meth:`update` makes of its values). ``eps`` > 0: added to every
    priority. ``structure``: ``"auto"`` (by capacity), ``"sum_tree"`` or ``"cumsum"``; ``branching``: the sum
    tree's children per node. ``seed``: of the buffer's own generator, an int in ``[-2**63, 2**64)`` (what
    ``torch.Generator.manual_seed`` takes; default: drawn from torch's default generator, so ``torch.manual_seed``
    reproduces a run); its state is in :meth:`state_dict`.

    ``add(examples, priorities=None, losses=None) -> slots``, ``sample(n, generator=None) -> ReplaySample``,
    ``update(indices, values)``; ``len(buffer)`` is the number of filled slots.
    """

    def __init__(self, capacity: int, *, alpha: float = 0.6, beta: Union[float, Callable[[int], float]] = 0.4,
                 device=None, rule: str = "loss", eps: float = 1e-6, structure: str = "auto",
                 branching: int = DEFAULT_BRANCHING, seed: Optional[int] = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {_describe(capacity)}")
        self.capacity = capacity
        self.alpha = _check_number("alpha", alpha, 0.0)
        if not callable(beta):
            _check_number("beta", beta, 0.0, 1.0)
        self.beta = beta
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.eps = _check_number("eps", eps, 0.0)
        if self.eps == 0:
            raise ValueError("eps must be > 0 (it keeps every priority positive), got 0")
        smallest_mass = torch.tensor(self.eps, dtype=torch.float64).pow(self.alpha)  # of any updated priority
        if not (smallest_mass > 0 and smallest_mass.isfinite()):
            raise ValueError(f"eps ** alpha must be positive and finite in float64, got eps={self.eps}, "
                             f"alpha={self.alpha}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if isinstance(branching, bool) or not isinstance(branching, int) or branching < 2:
            raise ValueError(f"branching must be an int >= 2, got {_describe(branching)}")
        self.structure_kind, self.branching = structure, branching
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {_describe(seed)}")
        if seed is not None and not -2**63 <= seed < 2**64:
            raise ValueError(f"seed must be in [-2**63, 2**64) (the range of torch.Generator.manual_seed), got {seed}")
        self.seed = int(torch.randint(0, 2**62, (), dtype=torch.long).item()) if seed is None else seed
        self.device: Optional[torch.device] = None
        self.position = 0          # the next slot the ring writes
        self.filled = 0            # slots 0 .. filled - 1 hold examples
        self.samples_drawn = 0     # sample() calls so far: the step of the beta schedule
        self._storage: Optional[Tuple[Tensor, ...]] = None
        self._is_tuple = False
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be a torch.device or a device string such as 'cpu' or 'cuda:0', got "
                                 f"{_describe(device)}") from None
            self._allocate(device, "device")

    # -- set-up ---------------------------------------------------------------------------------------------------

    @torch.inference_mode(False)
    def _allocate(self, device: torch.device, name: str) -> None:
        """The per-slot state on ``device``, which the argument ``name`` chose (the examples' storage comes with the
        first add). Normal tensors even under inference mode: later calls outside it update them in place."""
        if device.type == "meta":
            raise ValueError(f"{name}: the meta device holds no values, so a buffer there cannot sample (use a "
                             f"device such as cpu or cuda)")
        try:
            generator = torch.Generator(device=device)
        except RuntimeError as error:
            raise ValueError(f"{name}: {device} has no random generator for the buffer ({error})") from None
        generator.manual_seed(self.seed)
        self.generator = generator
        self.priorities = torch.zeros(self.capacity, dtype=torch.float64, device=device)
        self.device = self.priorities.device  # as tensors report it: "cuda" -> cuda:0, "cpu:0" -> cpu
        self.last_losses = torch.full((self.capacity,), math.nan, dtype=torch.float64, device=self.device)
        self.max_priority = torch.ones((), dtype=torch.float64, device=self.device)
        self._last_position = torch.empty(self.capacity, dtype=torch.long, device=self.device)  # dedup scratch
        self.structure = make_structure(self.structure_kind, self.capacity, self.device, self.branching)

    @torch.inference_mode(False)
    def _allocate_storage(self, examples: Sequence[Tensor]) -> None:
        """Zeroed storage ``[capacity, ...]`` on the buffer's device for examples like ``examples`` (normal tensors
        even under inference mode, as in :meth:`_allocate`)."""
        self._storage = tuple(t.new_zeros((self.capacity, *t.shape[1:]), device=self.device) for t in examples)

    def __len__(self) -> int:
        return self.filled

    def __repr__(self) -> str:
        return (f"PrioritizedReplay(capacity={self.capacity}, filled={self.filled}, alpha={self.alpha}, "
                f"beta={self.beta!r}, rule={self.rule!r}, structure={type(getattr(self, 'structure', None)).__name__}, "
                f"device={self.device})")

    def current_beta(self) -> float:
        """The importance-weight exponent the next :meth:`sample` uses."""
        beta = self.beta(self.samples_drawn) if callable(self.beta) else self.beta
        return _check_number("beta (from the schedule)", beta, 0.0, 1.0)

    # -- validation -----------------------------------------------------------------------------------------------

    def _check_examples(self, examples) -> Tuple[Tuple[Tensor, ...], bool]:
        is_tuple = isinstance(examples, (tuple, list))
        tensors = tuple(examples) if is_tuple else (examples,)
        if not tensors or not all(isinstance(t, Tensor) for t in tensors):
            raise TypeError(f"examples must be a tensor or a tuple of tensors with a leading example dimension, got "
                            f"{_describe(examples) if not is_tuple else [_describe(t) for t in tensors]}")
        k = tensors[0].shape[0] if tensors[0].dim() else 0
        for i, t in enumerate(tensors):
            if t.dim() == 0 or t.shape[0] != k or k == 0:
                raise ValueError(f"examples[{i}] must have the leading example dimension k >= 1 of examples[0] "
                                 f"(k={k}), got shape {tuple(t.shape)}")
            if self.device is not None and t.device != self.device:
                raise ValueError(f"examples[{i}] is on {t.device}, the buffer on {self.device}")
        if self._storage is not None:
            if is_tuple != self._is_tuple or len(tensors) != len(self._storage):
                raise TypeError(f"examples must have the structure of the first ones added "
                                f"({len(self._storage)} tensor(s){', a tuple' if self._is_tuple else ''})")
            for i, (t, s) in enumerate(zip(tensors, self._storage)):
                if t.shape[1:] != s.shape[1:] or t.dtype != s.dtype:
                    raise ValueError(f"examples[{i}] must be [k, {', '.join(map(str, s.shape[1:]))}] {s.dtype} like "
                                     f"the first ones added, got {tuple(t.shape)} {t.dtype}")
        return tensors, is_tuple

    def _check_values(self, name: str, values, n: int) -> Tensor:
        if not isinstance(values, Tensor) or values.dim() != 1 or values.shape[0] != n \
                or not (values.dtype.is_floating_point or values.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"{name} must be a real tensor [{n}], got {_describe(values)}")
        if values.device != self.device:
            raise ValueError(f"{name} is on {values.device}, the buffer on {self.device}")
        return values.detach().to(torch.float64)

    # -- the three operations ---------------------------------------------------------------------------------------

    def add(self, examples: Examples, priorities: Optional[Tensor] = None, losses: Optional[Tensor] = None) -> Tensor:
        """Writes k examples (a tensor ``[k, ...]`` or a tuple of them) into the next slots of the ring and returns
        those slots ``[k]`` int64. ``priorities`` ``[k]`` (positive, finite): theirs; default the largest priority
        seen so far. ``losses`` ``[k]``: their losses now, the "last visit" of rule ``"loss_difference"``. More than
        ``capacity`` examples keep the last ``capacity``. The examples are stored detached (no autograd history)."""
        tensors, is_tuple = self._check_examples(examples)
        if self.device is None:
            self._allocate(tensors[0].device, "examples")
        # stored without their autograd history, and read before the ring overwrites them if they are the buffer's own
        # (views of the storage, as examples() returns)
        tensors = tuple(t.detach().clone() if shares_storage(t, self._storage or ()) else t.detach() for t in tensors)
        k = tensors[0].shape[0]
        given = None if priorities is None else self._check_values("priorities", priorities, k)
        seen = None if losses is None else self._check_values("losses", losses, k)
        if given is not None:
            torch._assert_async(((given > 0) & given.isfinite()).all(), "add: priorities must be positive and finite")
            self._masses(given, "add")  # checked before anything is written
            self.max_priority = torch.maximum(self.max_priority, given.amax())
        if self._storage is None:
            self._allocate_storage(tensors)
            self._is_tuple = is_tuple
        if k > self.capacity:  # the ring would overwrite the first ones within this call
            drop = k - self.capacity
            tensors = tuple(t[drop:] for t in tensors)
            given = None if given is None else given[drop:]
            seen = None if seen is None else seen[drop:]
            self.position = (self.position + drop) % self.capacity
            k = self.capacity
        slots = (torch.arange(k, device=self.device) + self.position) % self.capacity
        new_priorities = self.max_priority.expand(k) if given is None else given
        head = min(k, self.capacity - self.position)  # the ring wraps after `head` examples
        for start, stop, offset in ((self.position, self.position + head, 0), (0, k - head, head)):
            if stop > start:
                part = slice(offset, offset + stop - start)
                for store, t in zip(self._storage, tensors):
                    store[start:stop].copy_(t[part])
                self.priorities[start:stop].copy_(new_priorities[part])
                self.last_losses[start:stop] = math.nan if seen is None else seen[part]
        self.structure.set(slots, self._masses(new_priorities, "add"))
        self.position = (self.position + k) % self.capacity
        self.filled = min(self.filled + k, self.capacity)
        return slots

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> ReplaySample:
        """Draws ``n`` slots with replacement, with probability ``P(i)`` -> :class:`ReplaySample` (indices,
        examples, importance weights). ``generator``: a ``torch.Generator`` on the buffer's device (default the
        buffer's own). Advances the beta schedule by one."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {_describe(n)}")
        if self.filled == 0:
            raise ValueError("sample: the buffer is empty; add examples first")
        if generator is not None and (not isinstance(generator, torch.Generator)
                                      or generator.device.type != self.device.type):
            raise TypeError(f"generator must be a torch.Generator on {self.device}, got {_describe(generator)}"
                            + (f" on {generator.device}" if isinstance(generator, torch.Generator) else ""))
        beta = self.current_beta()
        uniforms = torch.rand(n, dtype=torch.float64, device=self.device,
                              generator=self.generator if generator is None else generator)
        slots = self.structure.draw(uniforms, self.filled)
        masses = self.structure.masses.index_select(0, slots)
        weights = (masses / self.structure.min_mass(self.filled)).pow(-beta).to(torch.float32)
        self.samples_drawn += 1
        examples = tuple(s.index_select(0, slots) for s in self._storage)
        return ReplaySample(slots, examples if self._is_tuple else examples[0], weights)

    def update(self, indices: Tensor, values: Tensor) -> None:
        """Sets the priorities of the slots ``indices`` [n] from ``values`` [n] by the buffer's rule (losses for
        ``"loss"`` and ``"loss_difference"``, per-example gradient norms for ``"grad_norm"``). Every priority is
        computed from the state before the call; a slot given more than once takes its last occurrence's value."""
        if self.filled == 0:
            raise ValueError("update: the buffer is empty; add examples first")
        if not isinstance(indices, Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point \
                or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor [n], got {_describe(indices)}")
        if indices.device != self.device:
            raise ValueError(f"indices is on {indices.device}, the buffer on {self.device}")
        n = indices.shape[0]
        values = self._check_values("values", values, n)
        if n == 0:
            return
        slots = indices.long()
        torch._assert_async(((slots >= 0) & (slots < self.filled)).all(),
                            f"update: indices must be filled slots, in [0, {self.filled})")
        torch._assert_async(values.isfinite().all(), "update: values must be finite")
        positions = torch.arange(n, device=self.device)
        last = self._last_position.scatter_reduce_(0, slots, positions, "amax", include_self=False)
        last = last.index_select(0, slots)  # for every entry, the position of its slot's last occurrence
        if self.rule == "loss_difference":
            previous = self.last_losses.index_select(0, slots)
            raw = torch.where(previous.isnan(), values.abs(), (values - previous).abs())
        else:
            raw = values.abs()
        new_priorities = raw.index_select(0, last) + self.eps
        masses = self._masses(new_priorities, "update")  # checked before anything is written
        if self.rule == "loss_difference":
            self.last_losses.index_copy_(0, slots, values.index_select(0, last))
        self.priorities.index_copy_(0, slots, new_priorities)
        self.structure.set(slots, masses)
        self.max_priority = torch.maximum(self.max_priority, new_priorities.amax())

    def _masses(self, priorities: Tensor, op: str) -> Tensor:
        """``priorities ** alpha`` ``[k]`` float64, asserted positive and finite, and finite when added to the masses
        held (a bound on the new total): the structures draw correctly and the importance weights exist only while
        every filled slot has a positive mass and their sum is finite (an infinite total sent every draw to one slot)."""
        masses = priorities.pow(self.alpha)
        torch._assert_async(((masses > 0) & masses.isfinite()).all() & (self.structure.total + masses.sum()).isfinite(),
                            f"{op}: priority ** alpha must be positive and finite in float64 (alpha={self.alpha}), "
                            f"and so must its sum with the masses held; a priority that far from 1 under this alpha "
                            f"cannot be sampled by its mass")
        return masses

    # -- views and checkpoints --------------------------------------------------------------------------------------

    def probabilities(self) -> Tensor:
        """``P(i)`` of the filled slots, ``[filled]`` float64 (for inspection and tests)."""
        masses = self.structure.masses[: self.filled]
        return masses / masses.sum()

    def examples(self) -> Optional[Examples]:
        """The stored examples of the filled slots (views ``[filled, ...]``), or None before the first add."""
        if self._storage is None:
            return None
        views = tuple(s[: self.filled] for s in self._storage)
        return views if self._is_tuple else views[0]

    def state_dict(self) -> Dict[str, object]:
        """Everything :meth:`load_state_dict` needs to go on exactly: the examples of the filled slots, priorities,
        last losses, the largest priority, the sampling structure, ring position, filled count, schedule step and
        generator state."""
        state: Dict[str, object] = dict(capacity=self.capacity, alpha=self.alpha, rule=self.rule, eps=self.eps,
                                        position=self.position, filled=self.filled, samples_drawn=self.samples_drawn,
                                        seed=self.seed, is_tuple=self._is_tuple, device=None, storage=None)
        if self.device is not None:
            # copies, not the live tensors that later calls change in place (and only the filled slots' examples,
            # which a view would save with the whole storage)
            state.update(device=str(self.device), priorities=self.priorities.clone(),
                         last_losses=self.last_losses.clone(), max_priority=self.max_priority.clone(),
                         structure_kind=type(self.structure).__name__, structure=self.structure.state_dict(),
                         generator=self.generator.get_state(),
                         storage=None if self._storage is None else [s[: self.filled].clone() for s in self._storage])
        return state

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restores :meth:`state_dict` into a buffer built with the same capacity, alpha, rule and eps (and
        structure); the tensors move to this buffer's device (default: theirs)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict from PrioritizedReplay.state_dict(), got {_describe(state)}")
        mine = dict(capacity=self.capacity, alpha=self.alpha, rule=self.rule, eps=self.eps)
        changed = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if changed:
            raise ValueError(f"load_state_dict: the state is of a buffer with other settings (state, this): {changed}")
        self.position, self.filled, self.samples_drawn = state["position"], state["filled"], state["samples_drawn"]
        self.seed, self._is_tuple = state["seed"], state["is_tuple"]
        if state["device"] is None:  # a buffer that never held an example: so is this one now
            if self.device is not None:
                self._allocate(self.device, "device")
            self._storage = None
            return
        if self.device is None:
            self._allocate(state["priorities"].device, "state")
        if type(self.structure).__name__ != state["structure_kind"]:
            raise ValueError(f"load_state_dict: the state's sampling structure is a {state['structure_kind']}, this "
                             f"buffer's a {type(self.structure).__name__} (pass structure= to match)")
        self.structure.load_state_dict({k: ([t.to(self.device) for t in v] if isinstance(v, list) else
                                            v.to(self.device) if isinstance(v, Tensor) else v)
                                        for k, v in state["structure"].items()})
        self.priorities.copy_(state["priorities"])
        self.last_losses.copy_(state["last_losses"])
        self.max_priority = state["max_priority"].to(self.device, torch.float64).clone()
        self.generator.set_state(state["generator"].cpu())
        storage: Optional[Sequence[Tensor]] = state["storage"]  # the filled slots
        self._storage = None
        if storage is not None:
            self._allocate_storage(storage)
            for store, saved in zip(self._storage, storage):
                store[: saved.shape[0]].copy_(saved)
