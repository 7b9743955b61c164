"""``memory_replay``: memory replay back-propagation through a recurrent-memory model (SPEC §3, Memformer's MRBP)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .rel_memory_attention import savable

Tensor = torch.Tensor
Tensors = Tuple[Tensor, ...]
Structure = Tuple[int, bool]  # (number of tensors, whether they come as a tuple) of a tensor-or-tuple value

# Cotangent of a replayed output meaning "ones shaped like it": the gradient of the sum of the outputs.
_ONES_LIKE_OUTPUT = "ones_like_output"


def _fail(message: str, error=ValueError):
    raise error(f"memory_replay: {message}")


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _flatten(value, what: str) -> Tuple[Tensors, bool]:
    """``(tensors, is_tuple)`` of a tensor or a non-empty tuple/list of tensors; TypeError naming ``what`` otherwise."""
    if isinstance(value, Tensor):
        return (value,), False
    if isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, Tensor) for v in value):
        return tuple(value), True
    _fail(f"{what} must be a tensor or a non-empty tuple of tensors, got {_describe(value)}", TypeError)


def _unflatten(tensors: Sequence[Tensor], is_tuple: bool):
    return tuple(tensors) if is_tuple else tensors[0]


def _split_by(flat: Sequence, structures: Sequence[Structure]) -> Tuple[List[tuple], tuple]:
    """``flat`` cut into one run per structure (its number of tensors), and what is left after them."""
    runs, start = [], 0
    for n, _ in structures:
        runs.append(tuple(flat[start:start + n]))
        start += n
    return runs, tuple(flat[start:])


def _differentiable(t: Tensor) -> bool:
    return t.dtype.is_floating_point or t.dtype.is_complex


def _none_if_empty(cotangents: Optional[Sequence[Optional[Tensor]]]) -> Optional[Tuple[Optional[Tensor], ...]]:
    """``None`` when no entry of ``cotangents`` is a tensor (nothing to back-propagate), else the tuple."""
    if cotangents is None or all(c is None for c in cotangents):
        return None
    return tuple(cotangents)


def shares_storage(t: Tensor, buffers: Sequence[Optional[Tensor]]) -> bool:
    """Whether ``t`` is a view of one of ``buffers`` (None entries skipped): a write to that buffer would change it."""
    storage = t.untyped_storage().data_ptr()
    return any(b is not None and b.untyped_storage().data_ptr() == storage for b in buffers)


def _add(total: Optional[Tensor], term: Optional[Tensor]) -> Optional[Tensor]:
    if term is None:
        return total
    # The first term may alias a cotangent the caller owns: accumulate into a copy of it.
    return term.clone() if total is None else total.add_(term)


class _RngState:
    """The CPU generator's state and those of the given CUDA devices, to be set again later."""

    def __init__(self, cuda_devices: Sequence[int]):
        self.cpu = torch.get_rng_state()
        self.cuda = [(device, torch.cuda.get_rng_state(device)) for device in cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


class _RngStates:
    """The RNG states before each of T steps, in one byte buffer per generator allocated before the rollout
    (like :class:`_MemoryStore`, so that nothing kept across steps sits among a step's temporaries)."""

    def __init__(self, cuda_devices: Sequence[int], segments: int):
        self.cuda_devices = list(cuda_devices)
        now = _RngState(self.cuda_devices)
        self.cpu = torch.empty((segments, now.cpu.numel()), dtype=now.cpu.dtype)
        self.cuda = [torch.empty((segments, state.numel()), dtype=state.dtype) for _, state in now.cuda]

    def save(self, t: int) -> None:
        self.cpu[t].copy_(torch.get_rng_state())
        for buffer, device in zip(self.cuda, self.cuda_devices):
            buffer[t].copy_(torch.cuda.get_rng_state(device))

    def restore(self, t: int) -> None:
        # set_rng_state reads a state from the start of its storage: hand it a row of its own (a temporary)
        torch.set_rng_state(self.cpu[t].clone())
        for buffer, device in zip(self.cuda, self.cuda_devices):
            torch.cuda.set_rng_state(buffer[t].clone(), device)


@contextlib.contextmanager
def _rng_kept(cuda_devices: Sequence[int], enabled: bool):
    """Runs the body, then sets the RNG states back to what they were before it (when ``enabled``)."""
    state = _RngState(cuda_devices) if enabled else None
    try:
        yield
    finally:
        if state is not None:
            state.restore()


class _AutocastState:
    """The caller's autocast settings, re-entered for the replays (backward runs outside the caller's contexts)."""

    def __init__(self):
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.settings = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in device_types]
        self.cache_enabled = torch.is_autocast_cache_enabled()

    def __call__(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for device_type, enabled, dtype in self.settings:
            stack.enter_context(
                torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache_enabled))
        return stack


class _MemoryStore:
    """The memories ``mem_1 .. mem_{T-1}`` kept for their replays, in one buffer per memory tensor
    ``[T - 1, *shape]`` allocated before the rollout starts (on the memory's device, or pinned host memory when
    offloaded). Slot ``t - 1`` receives a copy of ``mem_t``, and the next step reads that slot, so that no step's
    output outlives the step after it. Kept as separate tensors among each step's temporaries, the memories
    fragmented the heap: the resident peak grew about 4x faster than their bytes."""

    def __init__(self, layout: Sequence[Tuple[torch.Size, torch.dtype, torch.device]], segments: int, offload: bool):
        self.devices = [device for _, _, device in layout]
        self.offload = offload
        self.buffers = [
            torch.empty((segments - 1, *shape), dtype=dtype,
                        device="cpu" if offload else device, pin_memory=offload and device.type == "cuda")
            for shape, dtype, device in layout
        ] if segments > 1 else []

    def store(self, t: int, mem: Tensors) -> Tensors:
        """Copies ``mem_t`` into its slot -> what the next step reads: the slot, where it lies on the memory's
        device (so the step's own output can go now), else ``mem``."""
        for buffer, m in zip(self.buffers, mem):
            buffer[t - 1].copy_(m.detach(), non_blocking=self.offload)
        return tuple(b[t - 1] if b.device == m.device else m for b, m in zip(self.buffers, mem))

    def load(self, t: int) -> Tensors:
        return tuple(buffer[t - 1].to(device, non_blocking=True) for buffer, device in zip(self.buffers, self.devices))

    def release(self) -> List[Tensor]:
        """Hands the buffers over (to autograd's saved tensors) and drops this store's references to them."""
        buffers, self.buffers = self.buffers, []
        return buffers

    def attach(self, buffers: Sequence[Tensor]) -> None:
        """Takes the buffers back for a backward pass."""
        self.buffers = list(buffers)


class _OutputStore:
    """The replayed outputs ``y_t`` of a rollout, copied into one buffer per output tensor ``[T, *shape]`` (with its
    T row views) made when the first of them arrives; an output of another shape or dtype is kept as a copy."""

    def __init__(self, segments: int):
        self.segments = segments
        self.rows: Optional[List[List[Tensor]]] = None  # per output tensor: its T row views

    def keep(self, y_tensors: Tensors) -> Tensors:
        if self.rows is None:
            self.rows = [list(torch.empty((self.segments, *v.shape), dtype=v.dtype, device=v.device).unbind(0))
                         for v in y_tensors]
        kept = []
        for i, v in enumerate(y_tensors):
            row = self.rows[i].pop() if i < len(self.rows) and self.rows[i] else None
            if row is None or row.shape != v.shape or row.dtype != v.dtype or row.device != v.device:
                row = torch.empty_like(v)
            kept.append(row.copy_(v.detach()))
        return tuple(kept)


@dataclasses.dataclass
class _Rollout:
    """Everything about one call that is not a tensor input of the autograd Function."""

    step: Callable
    takes_need_output: bool
    mem_is_tuple: bool
    mem_layout: List[Tuple[torch.Size, torch.dtype, torch.device]]
    x_structures: List[Structure]
    n_params: int
    truncate_every: Optional[int]
    offload: bool
    preserve_rng: bool
    cuda_devices: List[int]
    y_structures: List[Structure] = dataclasses.field(default_factory=list)  # set by the forward pass

    @property
    def segments(self) -> int:
        return len(self.x_structures)

    @property
    def x_offsets(self) -> List[int]:
        """Index of the first tensor of each segment input among the Function's inputs."""
        offsets, start = [], len(self.mem_layout)
        for n, _ in self.x_structures:
            offsets.append(start)
            start += n
        return offsets

    def split(self, inputs: Sequence[Tensor]) -> Tuple[Tensors, List[Tensors], Tensors]:
        """The Function's flat inputs -> (mem0 tensors, tensors of each segment input, params)."""
        n_mem = len(self.mem_layout)
        xs, params = _split_by(inputs[n_mem:], self.x_structures)
        return tuple(inputs[:n_mem]), xs, params

    def truncated_before(self, t: int) -> bool:
        """Whether the memory entering segment ``t`` is detached (a truncation boundary)."""
        return self.truncate_every is not None and t > 0 and t % self.truncate_every == 0

    def run_step(self, t: int, mem: Tensors, x: Tensors, need_output: bool):
        """Step ``t`` on flat tensors, checking what it returns -> ``((y tensors, y is tuple) or None, mem_next)``."""
        args = (_unflatten(mem, self.mem_is_tuple), _unflatten(x, self.x_structures[t][1]))
        out = self.step(*args, need_output=need_output) if self.takes_need_output else self.step(*args)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            _fail(f"step must return a pair (y, mem_next), got {_describe(out)} at segment {t}", TypeError)
        y, mem_next = out
        mem_next = self._check_memory(mem_next, t)
        if not need_output:
            return None, mem_next
        return _flatten(y, f"the output y that step returned at segment {t}"), mem_next

    def _check_memory(self, mem_next, t: int) -> Tensors:
        tensors, is_tuple = _flatten(mem_next, f"the memory that step returned at segment {t}")
        if is_tuple != self.mem_is_tuple or len(tensors) != len(self.mem_layout):
            expected = f"a tuple of {len(self.mem_layout)} tensors" if self.mem_is_tuple else "a single tensor"
            _fail(f"step changed the memory's structure at segment {t}: mem0 is {expected}, "
                  f"step returned {_describe(mem_next)}")
        for i, (m, (shape, dtype, device)) in enumerate(zip(tensors, self.mem_layout)):
            if m.dtype != dtype:
                _fail(f"step changed the dtype of memory tensor {i} at segment {t}: mem0 has {dtype}, step returned "
                      f"{m.dtype}; the memory must keep its dtypes across segments", TypeError)
            if m.shape != shape or m.device != device:
                _fail(f"step changed memory tensor {i} at segment {t}: mem0 has shape {tuple(shape)} on {device}, "
                      f"step returned shape {tuple(m.shape)} on {m.device}; the memory must keep its shapes and "
                      "device across segments")
        return tensors


@dataclasses.dataclass
class _Replayed:
    """What one backward sweep gives: a gradient per input of the Function (None where none) and, when
    asked for, the replayed outputs ``(y tensors, y is tuple)`` and which of their tensors are differentiable."""

    grads: List[Optional[Tensor]]
    ys: List[Optional[Tuple[Tensors, bool]]]
    y_requires_grad: List[Tuple[bool, ...]]


class _Tape:
    """What the replays need besides the Function's inputs: the memories ``mem_1 .. mem_{T-1}`` (``mem_0`` is
    an input, ``mem_T`` is never replayed from), the RNG state before each step and the autocast settings."""

    def __init__(self, rollout: _Rollout, needs_input_grad: Sequence[bool]):
        self.rollout = rollout
        self.needs_input_grad = tuple(needs_input_grad)
        self.memories = _MemoryStore(rollout.mem_layout, rollout.segments, rollout.offload)
        self.rng_states = _RngStates(rollout.cuda_devices, rollout.segments) if rollout.preserve_rng else None
        self.autocast = _AutocastState()

    def before_step(self, t: int) -> None:
        """Called just before step ``t`` runs in the forward pass."""
        if self.rollout.preserve_rng:
            self.rng_states.save(t)

    def after_step(self, t: int, mem_next: Tensors) -> Tensors:
        """Called with the memory step ``t`` returned in the forward pass -> the memory step ``t + 1`` reads."""
        return self.memories.store(t + 1, mem_next) if t + 1 < self.rollout.segments else mem_next

    def replay(self, mem0: Tensors, xs: List[Tensors], params: Tensors, dys: List, dmem_last,
               collect_outputs: bool = False) -> _Replayed:
        """Back-propagates through the steps ``T-1 .. 0``, recomputing each from its stored memory.

        ``dys[t]``: cotangents of y_t's tensors (None entries for unused ones), ``_ONES_LIKE_OUTPUT``, or None
        when y_t gets no gradient (then step t runs with ``need_output=False`` where it takes that keyword).
        ``dmem_last``: cotangents of ``mem_T``'s tensors, or None.
        """
        r = self.rollout
        n_mem = len(r.mem_layout)
        grads: List[Optional[Tensor]] = [None] * len(self.needs_input_grad)
        param_slots = range(len(grads) - len(params), len(grads))
        ys: List = [None] * r.segments
        kept_outputs = _OutputStore(r.segments) if collect_outputs else None
        # dmem_t goes from one step to the one before it through two slots per memory tensor (made at the first
        # gradient), so that autograd's result can go at once instead of outliving the next step's temporaries.
        carried: List[Optional[Tensor]] = [None] * n_mem
        y_requires_grad: List[Tuple[bool, ...]] = [()] * r.segments
        dmem = _none_if_empty(dmem_last)
        with _rng_kept(r.cuda_devices, r.preserve_rng):
            for t in reversed(range(r.segments)):
                dy = dys[t]
                if dy is None and dmem is None:
                    continue  # nothing flows back through this step (nor, then, through mem_t)
                mem = mem0 if t == 0 else self.memories.load(t)
                if t == 0:
                    mem_needs = self.needs_input_grad[:n_mem]
                else:
                    mem_needs = [_differentiable(m) and not r.truncated_before(t) for m in mem]
                x_start = r.x_offsets[t]
                x_needs = self.needs_input_grad[x_start:x_start + len(xs[t])]
                mem_leaves = tuple(m.detach().requires_grad_(need) for m, need in zip(mem, mem_needs))
                x_leaves = tuple(x.detach().requires_grad_(need) for x, need in zip(xs[t], x_needs))
                if r.preserve_rng:
                    self.rng_states.restore(t)
                with torch.enable_grad(), self.autocast():
                    y, mem_next = r.run_step(t, mem_leaves, x_leaves, need_output=dy is not None)

                pairs = []  # (output, cotangent) to back-propagate
                if dy is not None:
                    y_tensors, y_is_tuple = y
                    y_requires_grad[t] = tuple(v.requires_grad for v in y_tensors)
                    if kept_outputs is not None:
                        ys[t] = (kept_outputs.keep(y_tensors), y_is_tuple)
                    if dy is _ONES_LIKE_OUTPUT:
                        dy = tuple(torch.ones_like(v) for v in y_tensors)
                    if len(dy) != len(y_tensors):
                        _fail(f"step returned {len(y_tensors)} output tensors when replaying segment {t} but "
                              f"{len(dy)} in the forward pass; step must be deterministic given its RNG state",
                              RuntimeError)
                    pairs += zip(y_tensors, dy)
                if dmem is not None:
                    pairs += zip(mem_next, dmem)
                pairs = [(v, d) for v, d in pairs if d is not None and v.requires_grad]

                # (slot among the Function's inputs, leaf) for everything this step differentiates
                slotted = [(i, leaf) for i, leaf in enumerate(mem_leaves) if leaf.requires_grad]
                slotted += [(x_start + i, leaf) for i, leaf in enumerate(x_leaves) if leaf.requires_grad]
                slotted += list(zip(param_slots, params))
                step_grads = [None] * len(slotted)
                if pairs and slotted:
                    outputs, cotangents = zip(*pairs)
                    step_grads = torch.autograd.grad(outputs, [leaf for _, leaf in slotted], cotangents,
                                                     allow_unused=True)
                del y, mem_next, pairs  # this segment's graph goes before the next one is built

                next_dmem: List[Optional[Tensor]] = [None] * n_mem
                for (slot, _), g in zip(slotted, step_grads):
                    if slot < n_mem:
                        if g is not None and t > 0:
                            if carried[slot] is None:
                                carried[slot] = torch.empty((2, *g.shape), dtype=g.dtype, device=g.device)
                            g = carried[slot][t % 2].copy_(g)
                        next_dmem[slot] = g
                    elif slot < param_slots.start:
                        # A segment input whose gradient is dmem_{t+1} passed through (mem_next = mem + x, or x
                        # itself) gets autograd's alias of that carried slot, which step t - 1 overwrites.
                        grads[slot] = g.clone() if g is not None and shares_storage(g, carried) else g
                    else:
                        grads[slot] = _add(grads[slot], g)
                if t == 0:
                    grads[:n_mem] = next_dmem
                dmem = _none_if_empty(next_dmem)
                del step_grads, next_dmem
        return _Replayed(grads, ys, y_requires_grad)


def _uniform_scale(dys: List, y_requires_grad: List[Tuple[bool, ...]]) -> Optional[Tensor]:
    """The scalar ``s`` (0-dim tensor) when the cotangent of every differentiable output tensor is ``s``
    everywhere -- the backward of ``sum(ys)`` or ``mean`` -- else None."""
    cotangents = []
    for dy, mask in zip(dys, y_requires_grad):
        for i, requires_grad in enumerate(mask):
            if requires_grad:
                d = None if dy is None else dy[i]
                if d is None:
                    return None
                cotangents.append(d)
    cotangents = [d for d in cotangents if d.numel() > 0]  # an empty output contributes no term, whatever its scale
    if not cotangents:
        return torch.ones(())  # no output element: the replayed gradients hold no term of ys to scale
    scale = cotangents[0].reshape(-1)[0]
    return scale if bool(torch.stack([(d == scale).all() for d in cotangents]).all()) else None


class _MemoryReplay(torch.autograd.Function):
    """Inputs: the rollout description, then mem0's tensors, every segment input's tensors, the parameters.
    Outputs: every output y_t's tensors, then mem_T's tensors."""

    @staticmethod
    def forward(ctx, rollout: _Rollout, *inputs: Tensor):
        ctx.set_materialize_grads(False)
        mem0, xs, params = rollout.split(inputs)
        tape = _Tape(rollout, ctx.needs_input_grad[1:])
        mem, ys, kept_outputs = mem0, [], _OutputStore(rollout.segments)
        for t, x in enumerate(xs):
            tape.before_step(t)
            versions = [m._version for m in mem]
            y, mem_next = rollout.run_step(t, mem, x, need_output=not rollout.takes_need_output)
            if [m._version for m in mem] != versions:
                _fail(f"step modified its input memory in place at segment {t}; the replay would not see what the "
                      "forward pass saw: step must return new memory tensors (not update mem in place)", RuntimeError)
            mem = tape.after_step(t, mem_next)
            del mem_next
            ys.append(None if y is None else (kept_outputs.keep(y[0]), y[1]))
        ctx.precomputed = None
        precomputed_grads: List[Tensor] = []
        if rollout.takes_need_output:
            # The outputs come from the replay, run now with the cotangent of sum(ys); its gradients serve every
            # backward whose cotangents are uniform (see memory_replay). Its RNG use is undone by _rng_kept.
            precomputed = tape.replay(mem0, xs, params, [_ONES_LIKE_OUTPUT] * rollout.segments, None,
                                      collect_outputs=True)
            ys = precomputed.ys
            precomputed.ys = None
            if any(any(mask) for mask in precomputed.y_requires_grad):
                precomputed_grads = [g for g in precomputed.grads if g is not None]
                precomputed.grads = [g is not None for g in precomputed.grads]  # where they go
                ctx.precomputed = precomputed
        rollout.y_structures = [(len(y), is_tuple) for y, is_tuple in ys]
        # The stored memories and the precomputed gradients go through save_for_backward, so that autograd frees
        # them once the backward is done (unless the graph is retained), not when the caller drops the outputs.
        buffers = tape.memories.release()
        ctx.counts = (len(inputs), len(buffers))
        ctx.save_for_backward(*inputs, *buffers, *precomputed_grads)
        ctx.tape = tape
        return (*(v for y, _ in ys for v in y), *mem)

    @staticmethod
    def backward(ctx, *output_grads: Optional[Tensor]):
        tape: _Tape = ctx.tape
        rollout = tape.rollout
        saved = ctx.saved_tensors
        n_inputs, n_buffers = ctx.counts
        mem0, xs, params = rollout.split(saved[:n_inputs])
        tape.memories.attach(saved[n_inputs:n_inputs + n_buffers])
        try:
            return (None, *_MemoryReplay._gradients(ctx, tape, mem0, xs, params, saved[n_inputs + n_buffers:],
                                                    output_grads))
        finally:
            tape.memories.release()

    @staticmethod
    def _gradients(ctx, tape, mem0, xs, params, precomputed_grads, output_grads) -> List[Optional[Tensor]]:
        rollout = tape.rollout
        y_grads, mem_grads = _split_by(output_grads, rollout.y_structures)
        dys = [_none_if_empty(g) for g in y_grads]
        dmem_last = _none_if_empty(mem_grads)
        precomputed: Optional[_Replayed] = ctx.precomputed
        if precomputed is not None:
            scale = _uniform_scale(dys, precomputed.y_requires_grad)
            if scale is not None:
                stored = iter(precomputed_grads)
                grads = [next(stored) * scale if present else None for present in precomputed.grads]
                if dmem_last is not None:  # the part through mem_T needs the memory path only
                    residual = tape.replay(mem0, xs, params, [None] * rollout.segments, dmem_last)
                    grads = [_add(g, h) for g, h in zip(grads, residual.grads)]
                return grads
            warnings.warn(
                "memory_replay: the gradients reaching ys are not the same scalar everywhere (as for sum(ys) or a "
                "mean), so the gradients replayed in the forward pass are discarded and the steps are replayed "
                "again (exact but slower); with a step that takes need_output, return the loss as y",
                stacklevel=3,
            )
        return tape.replay(mem0, xs, params, dys, dmem_last).grads


def _takes_need_output(step: Callable) -> bool:
    target = step.forward if isinstance(step, nn.Module) else step
    try:
        parameter = inspect.signature(target).parameters.get("need_output")
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    return parameter is not None and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)


def _parameters_of(step: Callable, params: Optional[Iterable[Tensor]]) -> List[Tensor]:
    """The tensors that receive gradients besides mem0 and xs: ``params``, or the parameters of ``step``
    (a module or a method of one) when None; only those requiring grad, each once."""
    if params is None:
        owner = step if isinstance(step, nn.Module) else getattr(step, "__self__", None)
        params = owner.parameters() if isinstance(owner, nn.Module) else ()
    elif isinstance(params, Tensor) or not isinstance(params, Iterable):
        _fail(f"params must be an iterable of tensors (e.g. model.parameters()), got {_describe(params)}", TypeError)
    unique, seen = [], set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            _fail(f"params must contain tensors only, got {_describe(p)} at index {i}", TypeError)
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    return unique


def memory_replay(
    step: Callable,
    mem0,
    xs: Sequence,
    *,
    params: Optional[Iterable[Tensor]] = None,
    offload: bool = False,
    preserve_rng: bool = True,
    truncate_every: Optional[int] = None,
):
    """Runs ``step`` over T segments and back-propagates by memory replay (SPEC §3): ``-> (ys, mem_T)``.

    ``step(mem, x) -> (y, mem_next)``; ``mem`` is a tensor or a tuple of tensors whose shapes and dtypes stay
    fixed (e.g. per-layer ``[B, M, d]`` hidden states, or ``[B, S, d]`` memory slots); ``xs`` holds the T segment
    inputs (each a tensor or tuple of tensors, e.g. ``([B, L] tokens, [B, L] targets)``); ``y`` is a tensor or
    tuple of tensors. Returns ``ys`` (a list of the T outputs) and ``mem_T`` (differentiable, so that rollouts
    chain). Gradients flow to ``mem0``, ``xs`` and ``params`` (default: the parameters of ``step`` when it is an
    ``nn.Module`` or a method of one) -- not to other tensors that ``step`` closes over.

    The forward pass builds no graph and keeps ``mem_0 .. mem_{T-1}`` (in host memory with ``offload=True``:
    pinned, asynchronous copies from CUDA) and, with ``preserve_rng``, the CPU and CUDA RNG states before each
    step; the caller's RNG state afterwards is as if the steps (as the forward pass calls them) had run once, and
    the replays leave it untouched. Backward replays ``t = T-1 .. 0`` with the RNG state and autocast settings
    of the forward pass, so peak activation memory is one segment's. The parameter gradients, summed over the
    replays, are the Function's gradients: each parameter receives one gradient per backward (data-parallel
    hooks fire once; wrap the whole rollout, not ``step``, in DDP). ``truncate_every=n`` detaches the memory
    entering segments ``n, 2n, ...``. Without grad mode (or with nothing requiring grad) the steps simply run.
    ``preserve_rng=False`` is for deterministic steps only (the replays would draw new dropout masks).

    ``need_output``: when ``step`` takes that keyword, the forward pass runs it with ``need_output=False`` (it
    returns ``(None, mem_next)``: only the memory path, no output head or loss), then replays the steps at
    once with ``need_output=True`` and the cotangent of ``sum(ys)``: that replay yields the values of ``ys``
    and gradients kept for the backward, which scales them when the cotangents of ``ys`` are one scalar
    everywhere (``sum(ys).backward()``, a mean) -- one replay in all, as in Memformer. So have ``step`` return
    the segment's loss as ``y``. Other cotangents stay exact but cost a second replay (with a warning); a
    gradient through ``mem_T`` costs a replay of the memory path only. ``mem_{t+1}`` must not depend on
    ``need_output`` (draw the output path's random numbers after the memory path's).
    """
    if not callable(step):
        _fail(f"step must be callable, got {_describe(step)}", TypeError)
    mem_tensors, mem_is_tuple = _flatten(mem0, "mem0")
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        _fail(f"xs must be a list or tuple of segment inputs, got {_describe(xs)} "
              "(split a [T, ...] tensor with list(x.unbind(0)))", TypeError)
    if len(xs) == 0:
        _fail("xs must hold at least one segment input, got an empty sequence")
    xs_flat = [_flatten(x, f"xs[{t}]") for t, x in enumerate(xs)]
    for name, flag in (("offload", offload), ("preserve_rng", preserve_rng)):
        if not isinstance(flag, bool):
            _fail(f"{name} must be a bool, got {_describe(flag)}", TypeError)
    if truncate_every is not None:
        if isinstance(truncate_every, bool) or not isinstance(truncate_every, int):
            _fail(f"truncate_every must be a positive int or None, got {_describe(truncate_every)}", TypeError)
        if truncate_every < 1:
            _fail(f"truncate_every must be >= 1 (detach the memory every n segments), got {truncate_every}")
    param_list = _parameters_of(step, params)
    inputs = [*mem_tensors, *(v for x, _ in xs_flat for v in x), *param_list]

    rollout = _Rollout(
        step=step,
        takes_need_output=_takes_need_output(step),
        mem_is_tuple=mem_is_tuple,
        mem_layout=[(m.shape, m.dtype, m.device) for m in mem_tensors],
        x_structures=[(len(x), is_tuple) for x, is_tuple in xs_flat],
        n_params=len(param_list),
        truncate_every=truncate_every,
        offload=offload,
        preserve_rng=preserve_rng,
        cuda_devices=sorted({t.device.index for t in inputs if t.device.type == "cuda"}),
    )
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        mem, ys = mem_tensors, []
        for t, (x, _) in enumerate(xs_flat):
            (y, y_is_tuple), mem = rollout.run_step(t, mem, x, need_output=True)
            ys.append(_unflatten(y, y_is_tuple))
        return ys, _unflatten(mem, mem_is_tuple)

    inputs = [savable(t) for t in inputs]
    y_runs, mem_last = _split_by(_MemoryReplay.apply(rollout, *inputs), rollout.y_structures)
    ys = [_unflatten(y, is_tuple) for y, (_, is_tuple) in zip(y_runs, rollout.y_structures)]
    return ys, _unflatten(mem_last, mem_is_tuple)
