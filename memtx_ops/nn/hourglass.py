"""An hourglass Transformer-XL (Nawrot et al., "Hierarchical Transformers Are More Efficient Language Models"): layers
at full resolution, then on sequences shortened by ever larger factors, then back up, every level with its own
Transformer-XL memory.

Layout ``"2@1 4@3 2@1"``: 2 layers at full resolution, 4 layers on the sequence shortened 3x, 2 layers at full
resolution again. In general ``n@f`` groups whose factors rise from 1 to a peak and fall back symmetrically, each
factor a multiple of the one before (``"1@1 2@2 4@6 2@2 1@1"``). Between two levels of ratio ``k``:

* down: the level's input is kept as the residual and shortened by :func:`memtx_ops.causal_downsample` (shift right
  by ``k - 1``, the mean or learned ``weights`` of each group of ``k``). The shifted-in rows are the last ``k - 1``
  rows of the previous segment's input to that shortening (kept in the memory), so coarse row ``m`` summarises fine
  rows ``m*k - (k - 1) .. m*k`` in every segment, the first one included;
* up: :func:`memtx_ops.upsample_add` adds the upsampled short sequence to that residual (``"repeat"``, or
  ``"linear"``, whose ramp also reads the previous segment's last coarse row, kept in the memory). Fine row ``i``
  reads coarse row ``i // k``: tokens up to ``(i // k) * k <= i`` only.

The shortened layers are :class:`~memtx_ops.nn.transformer_xl.DecoderLayer` s running ``rel_memory_attention``
unchanged in coarse units (SPEC §4): a layer at factor ``f`` keeps ``mem_len / f`` coarse positions of memory and its
position embeddings count coarse steps (``clamp_len`` too). Segments must be a multiple of the largest factor long.

The memory is a list of :class:`~memtx_ops.nn.LayerMemory`: one per layer (in layer order; ``[B, mem_len / f, d]``),
then one per shortening (its previous ``k - 1`` input rows), then, with ``upsample="linear"``, one per upsampling (its
previous coarse row). Every entry has a fixed shape once full, so memory replay (``replay_segments``) carries all of
them. Cross-head and skip-retain act on each layer as in :class:`~memtx_ops.nn.TransformerXL` (a skipped shortened
layer's memory ages by ``L / f`` coarse positions per segment). The state dict is that of the flat ``TransformerXL``
with as many layers (same keys, same shapes), plus ``downsample_weights.<i>`` with ``downsample="weighted"``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import List, Optional, Tuple

import torch
from torch import nn

from memtx_ops.nn.skip_retain import LayerMemory
from memtx_ops.nn.transformer_xl import Memory, TransformerXL
from memtx_ops.ops.causal_resample import causal_downsample, upsample_add
from memtx_ops.reference.causal_resample import UPSAMPLE_MODES

DOWNSAMPLE_MODES = ("mean", "weighted")
_GROUP = re.compile(r"^(\d+)@(\d+)$")


def parse_layout(layout: str) -> List[Tuple[int, int]]:
    """``"2@1 4@3 2@1"`` -> ``[(2, 1), (4, 3), (2, 1)]``: (layers, shortening factor) per group.

    Raises ``ValueError`` unless every group is ``n@f`` with ``n, f >= 1``, the factors rise strictly from 1 to one
    peak and fall back through the same factors to 1 (a palindrome), and each factor divides the next one up.
    """
    if not isinstance(layout, str):
        raise TypeError(f"layout must be a string such as '2@1 4@3 2@1', got {type(layout).__name__}")
    groups = []
    for token in layout.split():
        match = _GROUP.match(token)
        if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
            raise ValueError(f"layout {layout!r}: group {token!r} must be <layers>@<factor> with both >= 1, "
                             f"e.g. '2@1 4@3 2@1'")
        groups.append((int(match.group(1)), int(match.group(2))))
    if not groups:
        raise ValueError("layout must hold at least one group <layers>@<factor>, e.g. '2@1 4@3 2@1'")
    factors = [f for _, f in groups]
    peak = len(factors) // 2
    rising = factors[: peak + 1]
    if len(factors) % 2 == 0 or factors != factors[::-1] or rising[0] != 1 or any(
            b <= a or b % a for a, b in zip(rising, rising[1:])):
        raise ValueError(f"layout {layout!r}: the factors {factors} must rise from 1 to one peak and fall back "
                         f"symmetrically to 1, each a multiple of the one below (e.g. '2@1 4@3 2@1', "
                         f"'1@1 2@2 4@6 2@2 1@1')")
    return groups


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of the hourglass: ``"layers"`` (``count`` layers from ``first_layer`` at shortening ``factor``, a
    memory of the model's ``mem_len / factor`` each), ``"down"`` or ``"up"`` (by the ratio ``factor`` between two
    levels; ``state``: the index of its resampling state in the memory, or -1)."""

    kind: str
    factor: int
    count: int = 0
    first_layer: int = 0
    state: int = -1


class HourglassTransformerXL(TransformerXL):
    """Hourglass Transformer-XL language model (see the module docstring).

    ``forward(tokens [B, L], memory=None, targets=None) -> (logits [B, L, n_token] or mean loss, memory)`` and
    :meth:`replay_segments` as for :class:`~memtx_ops.nn.TransformerXL`; ``L`` a multiple of the largest factor.
    ``layout``: ``"2@1 4@3 2@1"`` style (the depth is the sum of the groups' layers). ``mem_len``: memory at full
    resolution (a multiple of the largest factor; a level at factor f keeps ``mem_len / f``). ``downsample``:
    ``"mean"`` or ``"weighted"`` (learned group weights per shortening, initialised to the mean). ``upsample``:
    ``"repeat"`` or ``"linear"``. ``resample_backend``: backend of the resampling ops. Every other argument is
    :class:`~memtx_ops.nn.TransformerXL`'s, applied to each layer.
    """

    def __init__(self, n_token: int, layout: str = "2@1 4@3 2@1", n_head: int = 4, d_model: int = 128,
                 d_head: int = 32, d_inner: int = 512, dropout: float = 0.1, dropatt: float = 0.0, mem_len: int = 128,
                 same_length: bool = False, clamp_len: int = -1, pre_lnorm: bool = False, cross_head_p: float = 0.0,
                 skip_retain_p: float = 0.0, skip_schedule: str = "linear", phase: str = "pretrain",
                 backend: str = "auto", dropout_backend: str = "auto", downsample: str = "mean",
                 upsample: str = "repeat", resample_backend: str = "auto"):
        groups = parse_layout(layout)
        max_factor = max(f for _, f in groups)
        if isinstance(mem_len, bool) or not isinstance(mem_len, int) or mem_len < 0 or mem_len % max_factor:
            raise ValueError(f"mem_len must be an int >= 0 and a multiple of the largest factor {max_factor} of "
                             f"layout {layout!r} (a level at factor f keeps mem_len / f positions), got {mem_len!r}")
        if downsample not in DOWNSAMPLE_MODES:
            raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {downsample!r}")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        super().__init__(n_token, n_layer=sum(n for n, _ in groups), n_head=n_head, d_model=d_model, d_head=d_head,
                         d_inner=d_inner, dropout=dropout, dropatt=dropatt, mem_len=mem_len, same_length=same_length,
                         clamp_len=clamp_len, pre_lnorm=pre_lnorm, cross_head_p=cross_head_p,
                         skip_retain_p=skip_retain_p, skip_schedule=skip_schedule, phase=phase, backend=backend,
                         dropout_backend=dropout_backend)
        self.layout, self.max_factor = " ".join(f"{n}@{f}" for n, f in groups), max_factor
        self.downsample, self.upsample, self.resample_backend = downsample, upsample, resample_backend
        self.stages, self._state_lengths = self._plan(groups)
        ratios = [s.factor for s in self.stages if s.kind == "down"]
        self.downsample_weights = (nn.ParameterList(nn.Parameter(torch.full((k,), 1.0 / k)) for k in ratios)
                                   if downsample == "weighted" else None)

    def _plan(self, groups):
        """The stages of ``groups`` and the lengths of the resampling states, in memory order (shortenings first)."""
        stages, first, peak = [], 0, len(groups) // 2
        downs = [groups[i][1] // groups[i - 1][1] for i in range(1, peak + 1)]
        state_lengths = [k - 1 for k in downs] + ([1] * len(downs) if self.upsample == "linear" else [])
        for index, (count, factor) in enumerate(groups):
            if 0 < index <= peak:
                stages.append(Stage("down", downs[index - 1], state=index - 1))
            elif index > peak:
                up = 2 * peak - index  # the shortening this upsampling undoes
                stages.append(Stage("up", downs[up], state=len(downs) + up if self.upsample == "linear" else -1))
            stages.append(Stage("layers", factor, count, first))
            first += count
        return stages, state_lengths

    def memory_lengths(self) -> List[int]:
        """Positions each memory entry holds once full: per layer ``mem_len / f`` (f: its level's factor), then
        ``k - 1`` per shortening by ``k`` and, with ``upsample="linear"``, 1 per upsampling."""
        per_layer = [self.mem_len // s.factor for s in self.stages if s.kind == "layers" for _ in range(s.count)]
        return per_layer + self._state_lengths

    def set_attention_span(self, *, mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                           same_length: Optional[bool] = None):
        """:meth:`TransformerXL.set_attention_span`; ``mem_len`` must be a multiple of the largest factor (a level at
        factor f then keeps ``mem_len / f``; ``clamp_len`` and ``same_length``'s window count each level's steps)."""
        if mem_len is not None and not isinstance(mem_len, bool) and isinstance(mem_len, int) \
                and mem_len % self.max_factor:
            raise ValueError(f"mem_len must be a multiple of the largest factor {self.max_factor} of layout "
                             f"{self.layout!r} (a level at factor f keeps mem_len / f positions), got {mem_len!r}")
        return super().set_attention_span(mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)

    def _memory_description(self) -> str:
        return (f"one LayerMemory per layer (n_layer={self.n_layer}) and per resampling state "
                f"({len(self._state_lengths)}): {len(self.memory_lengths())} entries")

    @property
    def segment_multiple(self) -> int:
        """Segments are a multiple of the largest factor long, and :meth:`generate` decodes by groups of it."""
        return self.max_factor

    def check_segment(self, tokens, memory: Optional[Memory] = None, targets=None, what: str = "tokens") -> None:
        """:meth:`TransformerXL.check_segment`, and the segment length must be a multiple of the largest factor."""
        super().check_segment(tokens, memory, targets, what)
        if tokens.shape[1] % self.max_factor:
            raise ValueError(f"{type(self).__name__}: {what} have L={tokens.shape[1]} positions, which must be a "
                             f"multiple of the largest factor {self.max_factor} of layout {self.layout!r}")

    def _stack(self, tokens, memory: Memory, detach_memory: bool = True, kv_head_index=None, top_layer: bool = True,
               kv_caches=None):
        """:meth:`TransformerXL.hidden_states` on checked arguments, through the hourglass's stages."""
        skip = self.skip_retain.decide(self.training) if self.skip_retain is not None else [False] * self.n_layer
        kept = (lambda t: t.detach()) if detach_memory else (lambda t: t)
        h = self.drop(self.word_emb(tokens) * self.emb_scale).transpose(0, 1)  # [L, B, d], time-major
        next_memory = list(memory)
        residuals = []
        for stage in self.stages:
            if stage.kind == "layers":
                h = self._layers(stage, h, memory, next_memory, skip, detach_memory, kv_head_index, top_layer,
                                 kv_caches)
            elif stage.kind == "down":
                x = h.transpose(0, 1)  # [B, L, d] view
                state = memory[self.n_layer + stage.state]
                next_memory[self.n_layer + stage.state] = LayerMemory(self._last_rows(kept(x), stage.factor - 1))
                weights = None
                if self.downsample_weights is not None:
                    weights = self.downsample_weights[stage.state].to(x.dtype)
                residuals.append(h)
                h = causal_downsample(x, stage.factor, prev=state.hidden if state.hidden.shape[1] else None,
                                      weights=weights, backend=self.resample_backend).transpose(0, 1)
            else:
                residual = residuals.pop()
                x_short = h.transpose(0, 1).to(residual.dtype)
                prev = None
                if stage.state >= 0:
                    state = memory[self.n_layer + stage.state]
                    prev = state.hidden if state.hidden.shape[1] else None
                    next_memory[self.n_layer + stage.state] = LayerMemory(self._last_rows(kept(x_short), 1))
                h = upsample_add(x_short, residual.transpose(0, 1), stage.factor, mode=self.upsample, prev=prev,
                                 backend=self.resample_backend).transpose(0, 1)
        if not top_layer:
            return None, next_memory
        return self.drop(h).transpose(0, 1), next_memory

    @staticmethod
    def _last_rows(x: torch.Tensor, n: int) -> torch.Tensor:
        """A copy of ``x[:, -n:]`` (not a view, which would keep the whole activation alive in the memory)."""
        return x[:, x.shape[1] - n:].clone(memory_format=torch.contiguous_format)

    def _layers(self, stage: Stage, h, memory, next_memory, skip, detach_memory, kv_head_index, top_layer,
                kv_caches):
        """Runs the ``stage.count`` layers of one level on ``h`` ``[L_level, B, d]``
        (:meth:`TransformerXL._layer_step`, each keeping ``mem_len / factor``), refreshing their memories."""
        for index in range(stage.first_layer, stage.first_layer + stage.count):
            h, next_memory[index] = self._layer_step(index, h, memory[index], skip[index], detach_memory,
                                                     self.mem_len // stage.factor, kv_head_index, top_layer,
                                                     kv_caches)
        return h
