"""A compact Transformer-XL language model on the fused ops.

Embedding, a stack of relative-attention decoder layers with per-layer memory, sinusoid relative positions
and a tied output layer. Options: cross-head attention (SPEC §2), skip-retain two-phase training (SPEC §2)
and gradient through the memory with memory replay back-propagation (SPEC §3) instead of detached memory.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from memtx_ops.nn.cross_head import CrossHeadPermutation
from memtx_ops.nn.dropout import Dropout
from memtx_ops.nn.generation import KeyValueCache, PendingMemory, check_sampling, sample_next_token
from memtx_ops.ops.dropout import relu_dropout
from memtx_ops.ops.memory_replay import memory_replay
from memtx_ops.ops.rel_memory_attention import is_fake
from memtx_ops.nn.rel_attention import RelPartialLearnableMultiHeadAttn
from memtx_ops.nn.skip_retain import PHASES, LayerMemory, SkipRetainSchedule

Memory = List[LayerMemory]
TOKEN_DTYPES = (torch.int64, torch.int32)  # what nn.Embedding takes


def sinusoid_positions(klen: int, d_model: int, clamp_len: int, device, dtype) -> torch.Tensor:
    """Transformer-XL position embeddings for distances ``klen - 1`` down to 0 (clamped): ``[klen, 1, d_model]``."""
    compute = torch.promote_types(dtype, torch.float32)  # float64 tables of a float64 model, else float32
    pos = torch.arange(klen - 1, -1, -1, device=device, dtype=compute)
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    inv_freq = 1 / (10000 ** (torch.arange(0, d_model, 2, device=device, dtype=compute) / d_model))
    angles = pos[:, None] * inv_freq[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)[:, None, :].to(dtype)


class PositionwiseFF(nn.Module):
    """Transformer-XL feed-forward block with residual and layer norm: ``[L, B, d_model] -> same``.

    ``CoreNet`` keeps Transformer-XL's layers (and state-dict keys); unless ``dropout_backend="torch"``, its
    ReLU and first dropout run as one :func:`memtx_ops.relu_dropout`.
    """

    def __init__(self, d_model: int, d_inner: int, dropout: float, pre_lnorm: bool = False, eps: float = 1e-5,
                 dropout_backend: str = "auto"):
        super().__init__()
        self.CoreNet = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(inplace=True),
                                     Dropout(dropout, backend=dropout_backend), nn.Linear(d_inner, d_model),
                                     Dropout(dropout, backend=dropout_backend))
        self.layer_norm = nn.LayerNorm(d_model, eps=eps)
        self.pre_lnorm = pre_lnorm

    def _core(self, x):
        linear1, _, drop1, linear2, drop2 = self.CoreNet
        if getattr(drop1, "backend", "torch") == "torch":  # torch's dropout (or a user's nn.Dropout put there)
            return self.CoreNet(x)
        return drop2(linear2(relu_dropout(linear1(x), drop1.p, drop1.training, backend=drop1.backend)))

    def forward(self, x):
        if self.pre_lnorm:
            return x + self._core(self.layer_norm(x))
        return self.layer_norm(x + self._core(x))


def updated_memory(mem: LayerMemory, skipped: bool, x: torch.Tensor, mem_len: int,
                   kv_cache: Optional[KeyValueCache]) -> LayerMemory:
    """``mem.update(skipped, x, mem_len)``; with a ``kv_cache`` (decoding) the kept rows are appended to its buffer
    instead of copied (:meth:`KeyValueCache.update_memory`)."""
    if kv_cache is None or skipped:
        return mem.update(skipped, x, mem_len)
    return kv_cache.update_memory(mem, x, mem_len)


class DecoderLayer(nn.Module):
    """Relative attention over ``[memory ; segment]`` then the feed-forward block; time-major ``[L, B, d]``."""

    def __init__(self, n_head, d_model, d_head, d_inner, dropout, dropatt, pre_lnorm, r_w_bias, r_r_bias,
                 cross_head_p, backend, dropout_backend):
        super().__init__()
        self.dec_attn = RelPartialLearnableMultiHeadAttn(n_head, d_model, d_head, dropout, dropatt, pre_lnorm,
                                                         r_r_bias=r_r_bias, r_w_bias=r_w_bias, backend=backend,
                                                         dropout_backend=dropout_backend)
        self.pos_ff = PositionwiseFF(d_model, d_inner, dropout, pre_lnorm, dropout_backend=dropout_backend)
        # seeded by the model once its weights are made (TransformerXL._seed_generators)
        self.cross_head = CrossHeadPermutation(cross_head_p, generator=torch.Generator()) if cross_head_p > 0 else None

    def draw_permutation(self, device) -> Optional[torch.Tensor]:
        """This forward's cross-head permutation ``[n_head]``, or None (no cross-head, eval, or the coin)."""
        return self.cross_head(self.dec_attn.n_head, device) if self.cross_head is not None else None

    def forward(self, h, pos_emb, mems, window, clamp_len, mem_offset=0, kv_head_index=None, kv_cache=None):
        """h ``[L, B, d]``, mems ``[M, B, d]``; Transformer-XL's causal mask stated by ``window`` (None or the
        same_length window) rather than built; ``kv_cache``: the projected keys of ``mems`` (inference)."""
        out = self.dec_attn(h, pos_emb, None, mems, kv_head_index=kv_head_index, mem_offset=mem_offset, window=window,
                            clamp_len=clamp_len, kv_cache=kv_cache)
        return self.pos_ff(out)


class TransformerXL(nn.Module):
    """Character- or word-level Transformer-XL language model.

    ``forward(tokens [B, L], memory=None, targets=None) -> (logits [B, L, n_token] or mean loss, memory)``
    where ``memory`` is one :class:`~memtx_ops.nn.LayerMemory` per layer (``None``: empty). Options:
    ``cross_head_p`` (probability of a head permutation per layer forward in training), ``skip_retain_p``
    with ``skip_schedule`` and ``phase`` (two-phase training), ``same_length``, ``clamp_len``,
    ``backend`` for the attention op and ``dropout_backend`` for every dropout (:func:`memtx_ops.dropout`;
    ``backend="reference", dropout_backend="torch"`` is the eager Transformer-XL). :meth:`replay_segments` trains
    with gradient through the memory; :meth:`generate` decodes against cached memories.
    """

    def __init__(self, n_token: int, n_layer: int = 4, n_head: int = 4, d_model: int = 128, d_head: int = 32,
                 d_inner: int = 512, dropout: float = 0.1, dropatt: float = 0.0, mem_len: int = 128,
                 same_length: bool = False, clamp_len: int = -1, pre_lnorm: bool = False,
                 cross_head_p: float = 0.0, skip_retain_p: float = 0.0, skip_schedule: str = "linear",
                 phase: str = "pretrain", backend: str = "auto", dropout_backend: str = "auto"):
        super().__init__()
        for name, size in (("n_token", n_token), ("n_layer", n_layer), ("n_head", n_head), ("d_head", d_head),
                           ("d_inner", d_inner), ("d_model", d_model)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be an int >= 1, got {size!r}")
        if d_model % 2:
            raise ValueError(f"d_model must be even (the position embeddings are d_model / 2 sines and as many "
                             f"cosines), got {d_model}")
        for name, p in (("cross_head_p", cross_head_p), ("skip_retain_p", skip_retain_p)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        self.n_token, self.n_layer, self.n_head, self.d_model = n_token, n_layer, n_head, d_model
        self.mem_len, self.same_length, self.clamp_len = 0, False, -1
        TransformerXL.set_attention_span(self, mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
        self.word_emb = nn.Embedding(n_token, d_model)
        nn.init.normal_(self.word_emb.weight, std=0.02)
        self.emb_scale = d_model ** 0.5
        self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.layers = nn.ModuleList(
            DecoderLayer(n_head, d_model, d_head, d_inner, dropout, dropatt, pre_lnorm, self.r_w_bias, self.r_r_bias,
                         cross_head_p, backend, dropout_backend)
            for _ in range(n_layer)
        )
        self.drop = Dropout(dropout, backend=dropout_backend)
        self.out_bias = nn.Parameter(torch.zeros(n_token))  # output weights tied to the embedding
        self.skip_retain = (SkipRetainSchedule(n_layer, skip_retain_p, skip_schedule, phase,
                                               generator=torch.Generator()) if skip_retain_p > 0 else None)
        self._position_tables: Dict[Tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._seed_generators()

    def _seed_generators(self) -> None:
        """Seeds layer ``i``'s cross-head generator and the skip-retain one (as number ``n_layer``) from the state of
        torch's global generator, without drawing from it: with the same seed, a model with these options gets the
        initial weights of one without them and leaves the global generator as that one does (so an ablation
        compares like with like), and each of its generators draws apart."""
        own = [(i, layer.cross_head) for i, layer in enumerate(self.layers) if layer.cross_head is not None]
        own += [(self.n_layer, self.skip_retain)] if self.skip_retain is not None else []
        state = torch.get_rng_state().numpy().tobytes()
        for number, module in own:
            digest = hashlib.blake2b(state + number.to_bytes(8, "little"), digest_size=8).digest()
            module.generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 2)

    def random_state(self) -> Dict[str, object]:
        """The states of the model's own generators: each layer's cross-head draws and the skip-retain decisions
        (torch's global generators are the caller's). With :meth:`set_random_state`, a checkpoint resumes exactly."""
        return {"cross_head": [None if layer.cross_head is None else layer.cross_head.generator.get_state()
                               for layer in self.layers],
                "skip_retain": None if self.skip_retain is None else self.skip_retain.generator.get_state()}

    def set_random_state(self, state: Dict[str, object]) -> None:
        """Restores what :meth:`random_state` returned (for a model with the same layers and options)."""
        cross_head = state["cross_head"]
        if len(cross_head) != self.n_layer or any((s is None) != (layer.cross_head is None)
                                                  for s, layer in zip(cross_head, self.layers)):
            raise ValueError("set_random_state: the state is of a model with other layers or cross-head options")
        if (state["skip_retain"] is None) != (self.skip_retain is None):
            raise ValueError("set_random_state: the state is of a model with other skip-retain options")
        for s, layer in zip(cross_head, self.layers):
            if s is not None:
                layer.cross_head.generator.set_state(s)
        if self.skip_retain is not None:
            self.skip_retain.generator.set_state(state["skip_retain"])

    def set_attention_span(self, *, mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                           same_length: Optional[bool] = None) -> Dict[str, object]:
        """Changes the memory length, the position clamp and ``same_length`` (None keeps one) -> the previous
        settings. Transformer-XL evaluates with a longer memory than it trains with (enwik8: segment 128, memory
        3800; WikiText-103: segment 64, memory 640, clamp_len 400, all with same_length); the parameters are the same.
        :meth:`attention_span` is the context-manager form."""
        if mem_len is not None and (isinstance(mem_len, bool) or not isinstance(mem_len, int) or mem_len < 0):
            raise ValueError(f"mem_len must be an int >= 0, got {mem_len!r}")
        if clamp_len is not None and (isinstance(clamp_len, bool) or not isinstance(clamp_len, int)):
            raise ValueError(f"clamp_len must be an int (<= 0: no clamp), got {clamp_len!r}")
        if same_length is not None and not isinstance(same_length, bool):
            raise ValueError(f"same_length must be a bool, got {same_length!r}")
        previous = dict(mem_len=self.mem_len, clamp_len=self.clamp_len, same_length=self.same_length)
        if (self.same_length if same_length is None else same_length) and \
                (self.mem_len if mem_len is None else mem_len) == 0:
            raise ValueError("same_length needs mem_len >= 1: its window, the memory length, must hold the query")
        self.mem_len = self.mem_len if mem_len is None else mem_len
        self.clamp_len = self.clamp_len if clamp_len is None else clamp_len
        self.same_length = self.same_length if same_length is None else same_length
        return previous

    @contextlib.contextmanager
    def attention_span(self, *, mem_len: Optional[int] = None, clamp_len: Optional[int] = None,
                       same_length: Optional[bool] = None):
        """``with model.attention_span(mem_len=3800, same_length=True): ...`` runs the body with those settings
        (:meth:`set_attention_span`) and restores the previous ones."""
        previous = self.set_attention_span(mem_len=mem_len, clamp_len=clamp_len, same_length=same_length)
        try:
            yield self
        finally:
            self.set_attention_span(**previous)

    # Segments (and so the positions a memory covers) come in multiples of this many tokens: 1 here; the hourglass
    # model's largest factor.
    segment_multiple = 1

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, memory: Optional[Memory] = None,
                 generator: Optional[torch.Generator] = None, segment_len: Optional[int] = None,
                 return_logits: bool = False):
        """Continues ``prompt [B, P]`` (P >= 1) by ``max_new_tokens`` sampled tokens -> (new tokens ``[B, N]``, the
        memory), plus the logits of every step ``[B, N, n_token]`` with ``return_logits``. The memory covers the
        prompt and every new token but the last, so ``generate(new[:, -1:], n, memory=memory)`` goes on.

        The prompt is fed in segments of ``segment_len`` tokens (default ``max(mem_len, 1)``) after ``memory``
        (None: empty), then each token is decoded alone against the cached memory, which keeps at most ``mem_len``
        positions (set :meth:`attention_span` for a longer one). Each layer keeps the projected keys and values
        of its memory (:class:`~memtx_ops.nn.generation.KeyValueCache`), so a step projects only its own token's.
        Sampling: :func:`memtx_ops.nn.generation.
        sample_next_token` (``temperature`` 0: greedy; ``top_k``; ``top_p``; ``generator`` reproduces the draws).
        Runs in evaluation mode (no dropout, no skipped layers, no head permutations) and restores the mode after.

        A model whose memory advances by groups of ``segment_multiple`` tokens (the hourglass model) decodes a token
        that does not complete a group with the group's earlier tokens, padded to a group, and then forgets those
        positions again (:meth:`KeyValueCache.rollback`); ``segment_len`` must be a multiple of the group; a memory
        returned with a group unfinished is a :class:`~memtx_ops.nn.generation.PendingMemory`.
        """
        check_sampling(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        group = self.segment_multiple
        segment_len = max(self.mem_len, group) if segment_len is None else segment_len
        if isinstance(segment_len, bool) or not isinstance(segment_len, int) or segment_len < 1 or segment_len % group:
            raise ValueError(f"generate: segment_len must be an int >= 1 and a multiple of {group} (the model's "
                             f"segments are), got {segment_len!r}")
        pending = getattr(memory, "pending", None)
        if pending is not None:
            TransformerXL.check_segment(self, prompt, what="prompt")
            if not isinstance(pending, torch.Tensor) or pending.dim() != 2 or pending.shape[0] != prompt.shape[0] \
                    or pending.device != prompt.device or pending.dtype not in TOKEN_DTYPES:
                raise ValueError("generate: memory.pending must be the [B, t] tokens (int64 or int32) of the prompt's "
                                 "batch and device that the memory ends with")
            prompt, memory = torch.cat([pending.to(prompt.dtype), prompt], 1), list(memory)
        TransformerXL.check_segment(self, prompt, memory, what="prompt")  # any length: groups are handled here
        modes = [(module, module.training) for module in self.modules()]  # each module's own, restored after
        self.eval()
        try:
            memory = self.empty_memory(prompt.shape[0], prompt.device) if memory is None else memory
            kv_caches = self.new_kv_caches()
            whole = prompt.shape[1] - prompt.shape[1] % group
            for start in range(0, whole, segment_len):
                hidden, memory = self._stack(prompt[:, start:min(start + segment_len, whole)], memory,
                                             kv_caches=kv_caches)
            pending = prompt[:, whole:]
            if pending.shape[1]:
                hidden, memory = self._decode_partial_group(pending, memory, kv_caches)
            tokens, step_logits = [], []
            for step in range(max_new_tokens):
                logits = self.logits(hidden[:, -1])
                step_logits.append(logits)
                tokens.append(sample_next_token(logits, temperature, top_k, top_p, generator))
                if step + 1 < max_new_tokens:
                    pending = torch.cat([pending, tokens[-1][:, None]], 1)
                    if pending.shape[1] < group:
                        hidden, memory = self._decode_partial_group(pending, memory, kv_caches)
                    else:
                        hidden, memory = self._stack(pending, memory, kv_caches=kv_caches)
                        pending = pending[:, :0]
        finally:
            for module, training in modes:
                module.training = training
        memory = self._owned_memory(memory, kv_caches)
        if pending.shape[1]:
            memory = PendingMemory(memory, pending)
        new = torch.stack(tokens, 1) if tokens else prompt.new_empty(prompt.shape[0], 0)
        if return_logits:
            logits = torch.stack(step_logits, 1) if step_logits else hidden.new_empty(prompt.shape[0], 0, self.n_token)
            return new, logits, memory
        return new, memory

    def _decode_partial_group(self, tokens, memory: Memory, kv_caches: List[KeyValueCache]):
        """The top hidden states ``[B, t, d]`` of ``tokens [B, t]`` (fewer than a group) after ``memory``, which
        stays as it was -> (them, the memory): the tokens padded to a group (by repeating the last one; causal
        layers never let a row read a later one), decoded, and forgotten by every cache."""
        B, t = tokens.shape
        padded = torch.cat([tokens, tokens[:, -1:].expand(B, self.segment_multiple - t)], 1)
        checkpoints = [cache.checkpoint() for cache in kv_caches]
        hidden, _ = self._stack(padded, memory, kv_caches=kv_caches)
        kept = [cache.rollback(checkpoint, mem) for cache, checkpoint, mem in zip(kv_caches, checkpoints, memory)]
        return hidden[:, :t], kept + list(memory[len(kept):])

    def new_kv_caches(self) -> List[KeyValueCache]:
        """One empty :class:`~memtx_ops.nn.generation.KeyValueCache` per layer, for ``forward(kv_caches=...)``."""
        return [KeyValueCache() for _ in range(self.n_layer)]

    @staticmethod
    def _owned_memory(memory: Memory, kv_caches: Optional[List[KeyValueCache]]) -> Memory:
        """``memory`` with the layers' rows in tensors of their own, not views of the caches' buffers (which the
        next step appends to and moves); each cache then stands for its copy."""
        if kv_caches is None:
            return memory
        owned = list(memory)
        for index, cache in enumerate(kv_caches):
            mem = owned[index]
            owned[index] = LayerMemory(mem.hidden.clone(memory_format=torch.contiguous_format), mem.age,
                                       mem.mem_offset)
            cache.adopt(owned[index])
        return owned

    def set_phase(self, phase: str) -> None:
        """``"pretrain"`` (skip-retain active in training) or ``"finetune"`` (never skips)."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if self.skip_retain is not None:
            self.skip_retain.phase = phase

    def empty_memory(self, batch_size: int, device=None, dtype=None) -> Memory:
        """One empty :class:`LayerMemory` per memory entry (here per layer; ``[B, 0, d_model]``)."""
        x = self.word_emb.weight.new_empty(batch_size, 0, self.d_model, device=device, dtype=dtype)
        return [LayerMemory.empty(x) for _ in self.memory_lengths()]

    def memory_lengths(self) -> List[int]:
        """Positions each entry of the memory holds once full, in the memory's order: ``mem_len`` per layer here
        (a subclass with other memories, such as the hourglass model, says its own)."""
        return [self.mem_len] * self.n_layer

    def _memory_description(self) -> str:
        """What the memory must hold, for the error of a memory that does not."""
        return f"one LayerMemory per layer (n_layer={self.n_layer})"

    def _positions(self, rlen: int, device, dtype) -> torch.Tensor:
        """Sinusoid embeddings of distances ``rlen - 1`` down to 0, ``[rlen, 1, d_model]``: the last ``rlen`` rows of
        one table per (clamp_len, device, dtype), which grows by doubling, so a memory that fills one position per
        decoding step neither keeps a table per length nor builds one per step (computed inline under
        torch.compile, where the length may be symbolic, and under a fake mode, whose tables hold no values)."""
        if torch.compiler.is_compiling() or is_fake():
            return sinusoid_positions(rlen, self.d_model, self.clamp_len, device, dtype)
        key = (self.clamp_len, device, dtype)
        table = self._position_tables.get(key)
        if table is None or table.shape[0] < rlen:
            length = rlen if table is None else max(rlen, 2 * table.shape[0])
            # a table made under inference_mode would be an inference tensor, which training cannot save for backward
            with torch.inference_mode(False):
                table = self._position_tables[key] = sinusoid_positions(length, self.d_model, self.clamp_len, device,
                                                                        dtype)
        return table[table.shape[0] - rlen:]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output layer: ``[..., d_model] -> [..., n_token]``."""
        return F.linear(hidden, self.word_emb.weight, self.out_bias)

    def hidden_states(self, tokens: torch.Tensor, memory: Memory, detach_memory: bool = True,
                      kv_head_index: Optional[Sequence[Optional[torch.Tensor]]] = None, top_layer: bool = True):
        """The stack over one segment: tokens ``[B, L]`` -> (top hidden ``[B, L, d_model]``, next memory).

        ``kv_head_index``: per-layer head permutations to use instead of drawing them (memory replay).
        ``top_layer=False`` stops once every memory is updated (the last layer feeds no memory) and
        returns None for the hidden states.
        """
        self.check_segment(tokens, memory)
        return self._stack(tokens, memory, detach_memory, kv_head_index, top_layer)

    def _stack(self, tokens, memory: Memory, detach_memory: bool = True, kv_head_index=None, top_layer: bool = True,
               kv_caches: Optional[List[KeyValueCache]] = None):
        """:meth:`hidden_states` on checked arguments; ``kv_caches``: one per layer, holding the projected keys of
        its memory (inference), kept in step with the memory."""
        skip = self.skip_retain.decide(self.training) if self.skip_retain is not None else [False] * self.n_layer
        h = self.drop(self.word_emb(tokens) * self.emb_scale).transpose(0, 1)  # [L, B, d]
        next_memory = []
        for index, (mem, skipped) in enumerate(zip(memory, skip)):
            h, next_mem = self._layer_step(index, h, mem, skipped, detach_memory, self.mem_len, kv_head_index,
                                           top_layer, kv_caches)
            next_memory.append(next_mem)
        if not top_layer:
            return None, next_memory
        return self.drop(h).transpose(0, 1), next_memory

    def _layer_step(self, index, h, mem: LayerMemory, skipped: bool, detach_memory: bool, mem_len: int, kv_head_index,
                    top_layer: bool, kv_caches: Optional[List[KeyValueCache]]):
        """Layer ``index`` on ``h [L, B, d]`` against ``mem``, whose level keeps ``mem_len`` positions -> (its output,
        its memory for the next segment); a skipped layer, or the last one with ``top_layer=False``, only updates
        the memory. ``kv_caches`` (inference): the layer's cache is kept in step with the memory."""
        cache = None if kv_caches is None else kv_caches[index]
        layer_input = h.transpose(0, 1)
        next_mem = updated_memory(mem, skipped, layer_input.detach() if detach_memory else layer_input, mem_len,
                                  cache)
        if skipped or (index == self.n_layer - 1 and not top_layer):
            return h, next_mem
        layer = self.layers[index]
        klen = mem.hidden.shape[1] + h.shape[0]
        pos_emb = self.drop(self._positions(klen + mem.mem_offset, h.device, h.dtype))
        perm = layer.draw_permutation(h.device) if kv_head_index is None else kv_head_index[index]
        window = mem_len if self.same_length else None  # same_length: the window of the layer's level
        # dropout drops each position row apart (Transformer-XL's drop(pos_emb)), so the rows past the clamp are
        # equal only while it is off: the layer then reads one of them; in training it reads every dropped row
        clamp_len = -1 if self.drop.training and self.drop.p > 0 else self.clamp_len
        h = layer(h, pos_emb, mem.hidden.transpose(0, 1), window, clamp_len, mem.mem_offset, perm, cache)
        if cache is not None:
            cache.keep_last(next_mem.hidden.shape[1])
        return h, next_mem

    def check_segment(self, tokens, memory: Optional[Memory] = None, targets=None, what: str = "tokens") -> None:
        """Raises ``TypeError``/``ValueError`` unless ``tokens`` (and ``targets``) are integer ``[B, L]`` tensors
        and ``memory`` is None or one :class:`LayerMemory` per layer with hidden ``[B, M, d_model]`` on the
        tokens' device: a memory that does not match the model is never used silently."""
        name = type(self).__name__
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in TOKEN_DTYPES:
            got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise TypeError(f"{name}: {what} must be an int64 or int32 tensor [B, L] of token ids (the embedding "
                            f"takes no other; convert bytes with .long()), got {got}")
        B, L = tokens.shape
        if L < 1 or B < 1:
            raise ValueError(f"{name}: {what} must have B, L >= 1, got shape {tuple(tokens.shape)}")
        if targets is not None and (not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (B, L)):
            shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ValueError(f"{name}: targets must have the shape of {what} ({B}, {L}), got {shape}")
        if targets is not None and targets.dtype not in TOKEN_DTYPES:
            raise TypeError(f"{name}: targets must be an int64 or int32 tensor of token ids, got {targets.dtype}")
        if targets is not None and targets.device != tokens.device:
            raise ValueError(f"{name}: targets are on {targets.device} but {what} are on {tokens.device}")
        if memory is None:
            return
        pending = getattr(memory, "pending", None)
        if pending is not None and pending.shape[1]:
            raise ValueError(f"{name}: memory ends {pending.shape[1]} tokens into a group of {self.segment_multiple} "
                             "(a PendingMemory from generate): pass it to generate(), which decodes memory.pending "
                             "first, or forward torch.cat([memory.pending, tokens], 1) with list(memory)")
        if not isinstance(memory, (list, tuple)) or len(memory) != len(self.memory_lengths()):
            got = f"{len(memory)} entries" if isinstance(memory, (list, tuple)) else type(memory).__name__
            raise ValueError(f"{name}: memory must hold {self._memory_description()}, got {got}")
        for index, mem in enumerate(memory):
            if not isinstance(mem, LayerMemory):
                raise TypeError(f"{name}: memory[{index}] must be a LayerMemory, got {type(mem).__name__}")
            h = mem.hidden
            if h.dim() != 3 or h.shape[0] != B or h.shape[2] != self.d_model:
                raise ValueError(f"{name}: memory[{index}].hidden must have shape [B={B}, M, d_model={self.d_model}], "
                                 f"got {tuple(h.shape)}")
            if h.device != tokens.device:
                raise ValueError(f"{name}: memory[{index}] is on {h.device} but {what} are on {tokens.device}")
            if h.dtype != self.word_emb.weight.dtype:
                raise TypeError(f"{name}: memory[{index}].hidden must have the model's dtype "
                                f"{self.word_emb.weight.dtype} (the layers' inputs), got {h.dtype}")
            for field, least in (("age", 1), ("mem_offset", 0)):
                value = getattr(mem, field)
                if isinstance(value, bool) or not isinstance(value, int) or value < least:
                    raise ValueError(f"{name}: memory[{index}].{field} must be an int >= {least}, got {value!r}")

    def forward(self, tokens: torch.Tensor, memory: Optional[Memory] = None, targets: Optional[torch.Tensor] = None,
                *, kv_caches: Optional[List[KeyValueCache]] = None):
        """tokens ``[B, L]`` -> (logits ``[B, L, n_token]``, or the mean cross-entropy when ``targets``
        ``[B, L]`` is given; the next memory, detached as in Transformer-XL). ``memory``: None (empty) or one
        :class:`~memtx_ops.nn.LayerMemory` per layer, ``[B, M, d_model]``; anything else raises.

        ``kv_caches`` (evaluation under ``torch.no_grad()``): :meth:`new_kv_caches`, passed with every segment of a
        stream. Each layer then keeps the projected keys and values of its memory and projects only the segment's
        (at L=128 against M=3800, 1/30 of the projection); the results are the same. A memory the caches did not
        return (another stream's, an edited one) makes them start over from it."""
        self.check_segment(tokens, memory, targets)
        if kv_caches is not None and (not isinstance(kv_caches, (list, tuple)) or len(kv_caches) != self.n_layer
                                      or not all(isinstance(c, KeyValueCache) for c in kv_caches)):
            got = f"{len(kv_caches)} entries" if isinstance(kv_caches, (list, tuple)) else type(kv_caches).__name__
            raise TypeError(f"{type(self).__name__}: kv_caches must be model.new_kv_caches() (one KeyValueCache per "
                            f"layer, n_layer={self.n_layer}), got {got}")
        if memory is None:
            memory = self.empty_memory(tokens.shape[0], tokens.device)
        hidden, next_memory = self._stack(tokens, memory, kv_caches=kv_caches)
        next_memory = self._owned_memory(next_memory, kv_caches)
        if targets is None:
            return self.logits(hidden), next_memory
        return self._loss(hidden, targets), next_memory

    def replay_segments(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                        memory: Optional[Memory] = None, offload: bool = False):
        """Trains over T consecutive segments with gradient through the memory (SPEC §3).

        inputs, targets: T tensors ``[B, L]``. -> (the T segment losses, the memory after them, still
        attached to the graph so that rollouts chain; detach it to truncate). Back-propagating the sum of
        the losses gives the gradients of full back-propagation through time, at the activation memory of
        about one segment: memory replay runs once the memory has reached ``mem_len`` (its shapes are then
        fixed) and no layer's memory is aged; the segments before that keep their graphs.
        """
        if self.skip_retain is not None and self.training and self.skip_retain.phase == "pretrain":
            raise ValueError("replay_segments: skip-retain changes the memory's structure between segments; "
                             "train the pre-training phase with detached memory (forward) instead")
        for name, segments in (("inputs", inputs), ("targets", targets)):
            if not isinstance(segments, (list, tuple)):
                raise TypeError(f"replay_segments: {name} must be a list or tuple of T tensors [B, L] (one per "
                                f"segment), got {type(segments).__name__}")
        if len(inputs) != len(targets) or not inputs:
            raise ValueError(f"replay_segments: need as many targets as inputs (>= 1), got {len(inputs)} and "
                             f"{len(targets)}")
        for t, (x, y) in enumerate(zip(inputs, targets)):
            self.check_segment(x, memory if t == 0 else None, y, what=f"inputs[{t}]")
            if tuple(x.shape) != tuple(inputs[0].shape):
                raise ValueError(f"replay_segments: every segment must have the shape of inputs[0] "
                                 f"{tuple(inputs[0].shape)}, got {tuple(x.shape)} at {t}")
        if memory is None:
            memory = self.empty_memory(inputs[0].shape[0], inputs[0].device)
        losses, t = [], 0
        # memory replay carries the rows alone: until every memory is full and fresh (an aged one, of skip-retain's
        # pre-training, is read at its offset once more, SPEC §2) the segments keep their graphs
        while t < len(inputs) and any(m.hidden.shape[1] < n or (m.age, m.mem_offset) != (1, 0)
                                      for m, n in zip(memory, self.memory_lengths())):
            hidden, memory = self._stack(inputs[t], memory, detach_memory=False)
            losses.append(self._loss(hidden, targets[t]))
            t += 1
        if t == len(inputs):
            return losses, memory
        xs = [(inputs[i], targets[i]) + self._draw_permutations(inputs[i].device) for i in range(t, len(inputs))]
        ys, mem_last = memory_replay(self._replay_step, tuple(m.hidden for m in memory), xs,
                                     params=[p for p in self.parameters() if p.requires_grad], offload=offload)
        return losses + list(ys), [LayerMemory(h) for h in mem_last]

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(hidden).reshape(-1, self.n_token), targets.reshape(-1).long())

    def _draw_permutations(self, device) -> Tuple[torch.Tensor, ...]:
        """Each layer's cross-head draw for one segment as an int64 ``[n_layer, n_head]`` table (row of -1: none),
        drawn before memory replay so that the replayed step uses the same permutations; () without cross-head."""
        if all(layer.cross_head is None for layer in self.layers):
            return ()
        rows = []
        for layer in self.layers:
            perm = layer.draw_permutation(device)
            rows.append(perm if perm is not None else torch.full((self.n_head,), -1, device=device))
        return (torch.stack(rows),)

    def _replay_step(self, mem: Tuple[torch.Tensor, ...], x: Tuple[torch.Tensor, ...], need_output: bool = True):
        """One segment for memory_replay: mem (per-layer ``[B, M, d_model]``), x (tokens, targets[, perms])
        -> (loss or None, next mem)."""
        tokens, targets = x[0], x[1]
        perms = [None if row[0] < 0 else row for row in x[2]] if len(x) > 2 else None
        hidden, next_memory = self._stack(tokens, [LayerMemory(h) for h in mem], detach_memory=False,
                                          kv_head_index=perms, top_layer=need_output)
        next_mem = tuple(m.hidden for m in next_memory)
        return (self._loss(hidden, targets) if need_output else None), next_mem


class SegmentRollout(nn.Module):
    """``forward(inputs, targets, memory=None, offload=False)`` is ``model.replay_segments(...)``: a whole
    memory-replay rollout as one module call, the unit a data-parallel wrapper (``DistributedDataParallel``) needs to
    see one forward and one backward per step. Holds no parameters of its own (its state dict is the model's)."""

    def __init__(self, model: TransformerXL):
        super().__init__()
        self.model = model

    def forward(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], memory: Optional[Memory] = None,
                offload: bool = False):
        return self.model.replay_segments(inputs, targets, memory, offload)
