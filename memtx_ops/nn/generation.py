"""Decoding: sampling the next token from a language model's logits (temperature, top-k and nucleus (top-p)
filtering), the per-layer caches a decoding step reads instead of recomputing, and the memory of a decoding that
stopped inside a group of positions.

``sample_next_token(logits [B, V], ...) -> [B]`` int64. All of it runs on the logits' device; the only random draw is
one ``torch.multinomial`` from the caller's generator (or torch's default one), so a seeded generator reproduces
the tokens.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def check_sampling(temperature, top_k, top_p) -> None:
    """Raises ``TypeError``/``ValueError`` naming the argument unless the sampling options are well formed."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite float >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a float in (0, 1], got {top_p!r}")


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """One token per row of ``logits [B, V]`` -> int64 ``[B]``.

    ``temperature`` 0 takes the most likely token; otherwise the logits are divided by it, restricted to the
    ``top_k`` most likely tokens and then to the smallest set whose probability reaches ``top_p`` (the most likely
    token always stays), and one token is drawn with ``generator``.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float()
    # From the row's maximum, so that no temperature turns the scores into inf - inf; below float32's smallest normal
    # a temperature would round to 0 in the division (0 / 0 at the maximum).
    scores = (scores - scores.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_scores, order = scores.sort(-1, descending=True)
        probs = sorted_scores.softmax(-1)
        before = probs.cumsum(-1) - probs  # the probability of the tokens ranked above each one
        drop_sorted = before >= top_p  # keeps the first token (before = 0) and stops once top_p is reached
        scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


class PositionBuffer:
    """Positions ``[start, end)`` along dimension ``dim`` of a buffer with room to append. ``extend(rows)`` appends
    rows (the buffer's shape but along ``dim``) and returns the view of every kept position; ``keep_last(n)`` drops
    the oldest. A full buffer first moves its positions to the front: one copy of them every ``capacity - len``
    appended positions, so a step of one new position costs O(1) rows amortised, not a copy of the whole memory."""

    def __init__(self, dim: int):
        self.dim = dim
        self.buffer: Optional[Tensor] = None
        self.start = self.end = 0
        self.appended = 0  # positions ever appended

    def __len__(self) -> int:
        return self.end - self.start

    def _span(self, start: int, end: int) -> Tensor:
        return self.buffer.narrow(self.dim, start, end - start)

    def extend(self, rows: Tensor) -> Tensor:
        """Appends ``rows`` -> the view of the kept positions and these."""
        kept, n = len(self), rows.shape[self.dim]
        old = self.buffer
        if old is None or old.shape[self.dim] < kept + n or old.dtype != rows.dtype or old.device != rows.device:
            shape = list(rows.shape)
            shape[self.dim] = kept + n + (kept + n) // 2 + 16
            self.buffer = rows.new_empty(shape)
            if kept:
                self._span(0, kept).copy_(old.narrow(self.dim, self.start, kept))
            self.start, self.end = 0, kept
        elif self.end + n > old.shape[self.dim]:
            self._span(0, kept).copy_(self._span(self.start, self.end).clone())
            self.start, self.end = 0, kept
        self._span(self.end, self.end + n).copy_(rows)
        self.end += n
        self.appended += n
        return self.window()

    def mark(self) -> Tuple[int, int]:
        """(kept positions, positions ever appended): what :meth:`forget_last` needs to undo the next extend."""
        return len(self), self.appended

    def forget_last(self, n: int, kept: int) -> None:
        """Drops the last ``n`` positions appended and keeps the ``kept`` before them: undoes one :meth:`extend` of
        ``n`` (and any :meth:`keep_last` after it), which kept the positions before them, moving them to the front
        at most, so they are still in the buffer."""
        if not 0 <= kept <= self.end - n:
            raise ValueError(f"PositionBuffer.forget_last: {kept} kept positions before the last {n} are not all in "
                             f"the buffer (it holds {self.end} up to its end)")
        self.end -= n
        self.start, self.appended = self.end - kept, self.appended - n

    def keep_last(self, n: int) -> None:
        """Drops all but the last ``n`` positions."""
        self.start = max(self.start, self.end - n)

    def window(self) -> Tensor:
        """The kept positions, a view of the buffer."""
        return self._span(self.start, self.end)


class KeyValueCache:
    """What one attention layer recomputes at every decoding step otherwise, kept across the steps (inference only).

    Without it a step projects k and v of the layer's whole ``[memory ; segment]`` again: at L=1 against M=3800 that
    product is ~3800x the step's own and most of the cost of decoding, and the memory update copies the memory.

    - ``extend(kv [L, B, 2, H, D])`` appends a segment's projected keys and values and returns k, v
      ``[B, H, len, D]`` over ``[memory ; segment]``, views of a ``[B, 2, H, capacity, D]`` buffer whose rows are
      dense (the CPU kernel reads them faster than the model's time-major projection: at L=1, M=3800, H=8, 4.3 vs
      9.1 ms); ``keep_last(n)`` keeps the last ``n``.
    - ``update_memory(mem, x, mem_len)`` is ``mem.update(False, x, mem_len)`` whose hidden rows are a view of a
      buffer of this cache, appended to rather than copied. Given a memory it does not stand for (the one it
      returned, or one it ``adopt``-ed, unless edited in place since), it starts over from that memory's rows and
      drops its keys.
    - ``positions(r, rows, project)`` keeps the layer's projected position embeddings of the table ``r`` is the
      tail of (the model's ``r`` of every length is the tail of one table), projected ahead and sliced: a memory
      that fills one position per step costs O(log M) projections.
    - ``checkpoint()`` and ``rollback(checkpoint, mem)`` forget one forward of the layer (a partial group decoded
      against the memory, which no memory keeps: :meth:`TransformerXL.generate` by groups).

    A cache is valid for the weights it was filled with: :meth:`TransformerXL.generate` makes one per layer for its
    call; an evaluation loop passes ``model.new_kv_caches()`` to every ``model(tokens, memory, kv_caches=...)``.
    """

    def __init__(self):
        self._keys = PositionBuffer(dim=3)
        self._hidden = PositionBuffer(dim=1)
        self._memory = None  # the LayerMemory this cache stands for: the one update_memory returned last, or adopted
        self._memory_version = None  # its rows' version then (an edit in place makes the cache start over)
        self._memory_is_view = False  # whether its rows are a view of self._hidden (update_memory's)
        self._positions = None  # see positions()

    def __len__(self) -> int:
        return len(self._keys)

    def extend(self, kv: Tensor):
        """Appends ``kv [L, B, 2, H, D]`` -> (k, v) ``[B, H, len + L, D]``."""
        window = self._keys.extend(kv.permute(1, 2, 3, 0, 4))
        return window[:, 0], window[:, 1]

    def keep_last(self, n: int) -> None:
        """Drops all but the last ``n`` positions of the keys and values."""
        self._keys.keep_last(n)

    def update_memory(self, mem, x: Tensor, mem_len: int):
        """``mem.update(False, x [B, L, ...], mem_len)``, the kept rows a view of this cache's buffer. The rows of
        the memory returned before may be overwritten: the layer reads only the length of a memory whose keys this
        cache holds."""
        if not self._stands_for(mem) or mem.age != 1:  # one it does not stand for, or aged: start from its rows
            kept = mem.update(False, x[:, :0], mem_len).hidden
            self._hidden = PositionBuffer(dim=1)
            self._hidden.extend(kept)
            self._keys = PositionBuffer(dim=3)  # and project its keys again
        self._hidden.extend(x)
        self._hidden.keep_last(mem_len)
        self._stand_for(type(mem)(self._hidden.window()), is_view=True)
        return self._memory

    def adopt(self, mem) -> None:
        """Stands for ``mem`` from now on: a copy of the memory :meth:`update_memory` returned last."""
        self._stand_for(mem, is_view=False)

    def _stand_for(self, mem, is_view: bool) -> None:
        self._restore(mem, _version(mem.hidden), is_view)

    def _restore(self, mem, version: Optional[int], is_view: bool) -> None:
        """Stands for ``mem`` as it was at ``version`` (a checkpoint's)."""
        self._memory, self._memory_version, self._memory_is_view = mem, version, is_view

    def _stands_for(self, mem) -> bool:
        """Whether ``mem`` is the memory this cache stands for, unchanged since (an inference tensor has no version
        counter: an edit in place under ``torch.inference_mode`` is not seen)."""
        return mem is self._memory and _version(mem.hidden) == self._memory_version

    def checkpoint(self):
        """What :meth:`rollback` needs to forget the next forward of the layer."""
        return (self._keys, self._keys.mark(), self._hidden, self._hidden.mark(), self._memory,
                self._memory_version, self._memory_is_view)

    def rollback(self, checkpoint, mem):
        """Forgets the positions one forward of the layer since ``checkpoint`` appended (a partial group decoded
        against the memory, whose positions no memory keeps) -> the memory to go on with in place of ``mem``, the
        layer's memory before that forward: a fresh view of its rows when this cache stands for it (the forward may
        have moved them in the buffer). A forward that started over from ``mem``'s rows (a memory this cache did not
        stand for) keeps them and their projected keys, so the next forward does not project them again; one that
        could not keep them all (an aged memory, or one longer than ``mem_len``) is forgotten whole."""
        keys, keys_mark, hidden, hidden_mark, memory, version, is_view = checkpoint
        M = mem.hidden.shape[1]
        if self._keys is keys and self._hidden is hidden:  # appended to: forget the appended positions
            for buffer, (kept, appended) in ((keys, keys_mark), (hidden, hidden_mark)):
                buffer.forget_last(buffer.appended - appended, kept)
            self._restore(memory, version, is_view)
            if mem is not memory or not is_view:
                return mem
        elif (mem.age, mem.mem_offset) == (1, 0) and self._keys.appended == self._hidden.appended > M:
            n = self._hidden.appended - M  # started over from all of mem's rows: keep them
            self._keys.forget_last(n, M)
            self._hidden.forget_last(n, M)
        else:
            self._keys, self._hidden = keys, hidden
            self._restore(memory, version, is_view)
            return mem
        self._stand_for(type(mem)(self._hidden.window()), is_view=True)
        return self._memory

    def positions(self, r: Tensor, rows: int, project):
        """The layer's projected position embeddings ``[H, rows, D]`` of the last ``rows`` rows of ``r [rlen, 1, d]``
        (distance ``rows - 1`` down to 0), row d for distance d. ``project(source, n)`` projects the last ``n`` rows
        of ``source``. The model's ``r`` of every length is the tail of one table (its storage), so the cache
        projects rows of that table ahead, twice as many as the last time while they last, and slices them: a
        memory that fills one position per decoding step costs O(log M) projections, not one per step."""
        if r.is_inference():  # no version counter to tell an edit in place: projected afresh
            return project(r, rows)
        # the rows before r in its storage, r's own layout extended back to the storage's start: the table r is
        # the tail of (whatever views lie between them)
        before = (r.storage_offset() // r.stride(0) if r.is_contiguous() and r.stride(0) > 0
                  and r.storage_offset() % r.stride(0) == 0 else 0)
        source = r.as_strided((before + r.shape[0], *r.shape[1:]), r.stride(),
                              r.storage_offset() - before * r.stride(0))
        end = (source.untyped_storage().data_ptr(), r[-1].data_ptr(), r.stride(), r.dtype)
        cached = self._positions  # (source, which holds its storage alive; end; version; projected rows)
        same = cached is not None and cached[1] == end and cached[2] == source._version
        if same and rows <= cached[3].shape[1]:
            return cached[3][:, :rows]
        n = min(source.shape[0], max(rows, 2 * cached[3].shape[1] if same else rows))
        projected = project(source, n)
        self._positions = (source, end, source._version, projected)
        return projected[:, :rows]


def _version(t: Tensor) -> Optional[int]:
    """``t``'s version counter (bumped by every write in place), None for an inference tensor, which has none."""
    return None if t.is_inference() else t._version


class PendingMemory(list):
    """A memory that ends inside a group of positions: the model's memory entries (a list, as ever) up to the last
    whole group, and ``pending`` ``[B, t]`` (0 < t < the group), the tokens after it that no entry holds yet.

    :meth:`HourglassTransformerXL.generate <memtx_ops.nn.HourglassTransformerXL.generate>` returns one when the
    context it decoded does not end on a multiple of the largest factor (a memory holds whole groups of it);
    ``generate(prompt, memory=it)`` decodes the pending tokens before the prompt, and ``forward`` refuses it (its
    segment would start inside a group).
    """

    def __init__(self, entries, pending: Tensor):
        super().__init__(entries)
        self.pending = pending
