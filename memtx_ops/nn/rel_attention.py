"""Drop-in ``RelPartialLearnableMultiHeadAttn`` (Transformer-XL) running the fused attention op.

Constructor arguments, parameter names and ``forward(w, r, attn_mask=None, mems=None)`` follow the
Transformer-XL module of that name (in its widely used port with per-layer or shared ``r_w_bias`` /
``r_r_bias``), so its state dicts load with ``strict=True``. Inside, the ``[qlen, klen]`` boolean mask is
recognised as causal-with-memory or ``same_length`` (a window), the flipped position embeddings become the
op's ``r`` (clamped distances are read off repeated rows), q is projected from the segment's rows only (the
memory rows' queries are never used), k and v are passed as strided views of their fused projection, and the
output dropout is :class:`memtx_ops.nn.Dropout`. Cases the fused op cannot express fall back to the eager reference with a warning.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from memtx_ops import reference
from memtx_ops.nn.dropout import Dropout
from memtx_ops.nn.generation import KeyValueCache
from memtx_ops.ops.rel_memory_attention import check_span, rel_memory_attention, values_readable

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what autocast casts to its own dtype


def _fail(message: str, error=ValueError):
    raise error(f"RelPartialLearnableMultiHeadAttn: {message}")


def window_of_mask(attn_mask: torch.Tensor, qlen: int, klen: int):
    """Reads a Transformer-XL boolean mask (True = masked) ``[qlen, klen]`` or ``[qlen, klen, 1 or bsz]`` (one
    per batch entry: recognised when they are all alike).

    Returns ``(True, window)`` when it is causal-with-memory (window None) or ``same_length`` (a window),
    else ``(False, None)``.
    """
    mask = attn_mask
    if mask.dim() == 3:
        if mask.shape[2] > 1 and not bool((mask == mask[..., :1]).all()):  # batch entries masked apart
            return False, None
        mask = mask[..., 0]
    if tuple(mask.shape) != (qlen, klen):
        return False, None
    visible_last_row = int((~mask[-1].bool()).sum())
    window = visible_last_row if visible_last_row < klen else None
    if window == 0:
        return False, None
    expected = reference.visibility_mask(qlen, klen, window, mask.device)
    return bool(torch.equal(~mask.bool(), expected)), window


def clamp_rows(r_asc: torch.Tensor) -> int:
    """Number of rows to keep of ``r_asc`` ``[rlen, ...]`` (ascending distance): rows past the first of a
    run of identical last rows repeat it, which the op's clamp at ``R - 1`` reproduces."""
    flat = r_asc.reshape(r_asc.shape[0], -1)
    changes = torch.nonzero((flat[1:] != flat[:-1]).any(-1))
    return int(changes[-1]) + 2 if changes.numel() else 1


def check_clamp_len(clamp_len) -> None:
    """Raises ``TypeError`` unless ``clamp_len`` is None (read off r) or an int (<= 0: no clamp)."""
    if clamp_len is not None and (isinstance(clamp_len, bool) or not isinstance(clamp_len, int)):
        _fail(f"clamp_len must be None or an int (<= 0: no clamp), got {clamp_len!r}", TypeError)


class RelPartialLearnableMultiHeadAttn(nn.Module):
    """Transformer-XL relative multi-head attention layer (attention + residual + layer norm).

    w ``[qlen, bsz, d_model]``, r ``[klen, 1, d_model]`` (position embeddings, distance ``klen-1`` down to
    0), attn_mask bool ``[qlen, klen]`` or ``[qlen, klen, 1 or bsz]`` (True = masked), mems ``[mlen, bsz, d_model]``
    -> ``[qlen, bsz, d_model]``. Extensions: ``kv_head_index`` ``[n_head]`` (cross-head permutation) and
    ``mem_offset`` (aged memory; r then has ``klen + mem_offset`` rows). ``clamp_len`` states the position
    clamp instead of reading it off r (None: read it off r's repeated rows, unless r requires grad, whose equal rows
    each get their own gradient; > 0: distances past it share its
    row; <= 0: no clamp), in the constructor or per call; ``backend`` selects the attention backend ("auto") and
    ``dropout_backend`` that of the output dropout (:func:`memtx_ops.dropout`; "torch" for torch's own).

    ``window``: ``"mask"`` (the default, the drop-in path) recognises ``attn_mask``; a caller that built
    Transformer-XL's causal mask itself passes what it knows instead -- ``None`` (causal over [memory ;
    segment]) or an int (``same_length``: the ``window`` most recent keys) -- and ``attn_mask`` is then not read.
    With ``window`` and ``clamp_len`` given, the forward reads no tensor value on the host, so it compiles whole
    (``torch.compile(fullgraph=True)``).

    ``kv_cache`` (inference, under ``torch.no_grad()``): a :class:`~memtx_ops.nn.generation.KeyValueCache` that
    holds the projected k, v of ``mems`` (or is empty: it is filled from them). Only the segment's k, v are then
    projected and appended, and the projected position embeddings are kept per ``r`` table. The caller trims it
    with the memory (``keep_last``), as :meth:`~memtx_ops.nn.TransformerXL.generate` does.
    """

    def __init__(self, n_head, d_model, d_head, dropout, dropatt=0.0, pre_lnorm=False, r_r_bias=None,
                 r_w_bias=None, layer_norm_epsilon=1e-5, *, clamp_len: Optional[int] = None, backend: str = "auto",
                 dropout_backend: str = "auto"):
        super().__init__()
        self.n_head, self.d_model, self.d_head, self.dropout = n_head, d_model, d_head, dropout
        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.drop = Dropout(dropout, backend=dropout_backend)
        self.dropatt = nn.Dropout(dropatt)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_epsilon)
        self.scale = 1 / (d_head ** 0.5)
        self.pre_lnorm = pre_lnorm
        if r_r_bias is None or r_w_bias is None:  # per-layer biases
            self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
            self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
        else:  # shared across layers, owned by the model
            self.r_r_bias, self.r_w_bias = r_r_bias, r_w_bias
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        check_clamp_len(clamp_len)
        self.clamp_len = clamp_len
        self.backend = backend

    def _fallback_reason(self, attn_mask, window):
        if self.training and self.dropatt.p > 0:
            return "attention dropout (dropatt > 0) in training"
        if window == "mask" and attn_mask is None:
            return "no attn_mask (the fused op is causal)"
        return None

    def forward(self, w, r, attn_mask=None, mems=None, *, kv_head_index=None, mem_offset=0, window="mask",
                clamp_len="layer", kv_cache: Optional[KeyValueCache] = None):
        self._check_inputs(w, r, attn_mask, mems, kv_head_index, mem_offset, window)
        if clamp_len != "layer":
            check_clamp_len(clamp_len)
        qlen, bsz = w.shape[0], w.shape[1]
        mlen = 0 if mems is None else mems.shape[0]
        klen, rlen = mlen + qlen, r.shape[0]
        H, D = self.n_head, self.d_head
        if kv_cache is not None:
            if torch.is_grad_enabled():
                _fail("kv_cache is for inference (its keys are those of the weights it was filled with): call under "
                      "torch.no_grad()")
            if len(kv_cache) not in (0, mlen):
                _fail(f"kv_cache holds {len(kv_cache)} positions, but mems has {mlen} (it must hold the keys of "
                      "exactly these, or be empty)")
        # the rows projected here: the segment's when the cache holds the memory's k, v, else [memory ; segment]
        reuse = kv_cache is not None and len(kv_cache) == mlen
        rows_in = w if mems is None or reuse else torch.cat([mems, w], 0)
        x = self.layer_norm(rows_in) if self.pre_lnorm else rows_in
        # qkv_net's rows: q, then k and v; [len, bsz, ...] -> strided [bsz, H, len, D] views, no copies
        q = F.linear(x[x.shape[0] - qlen:], self.qkv_net.weight[: H * D]).view(qlen, bsz, H, D).permute(1, 2, 0, 3)
        kv = F.linear(x, self.qkv_net.weight[H * D:]).view(x.shape[0], bsz, 2, H, D)
        k, v = kv.permute(2, 1, 3, 0, 4).unbind(0) if kv_cache is None else kv_cache.extend(kv)

        reason = self._fallback_reason(attn_mask, window)
        if reason is None and window == "mask":
            recognised, mask_window = window_of_mask(attn_mask, qlen, klen)
            if recognised:
                window = mask_window
            else:
                reason = "attn_mask is neither causal-with-memory nor same_length"
        if reason is not None:
            if not torch.compiler.is_compiling():  # a warning per call would break a compiled graph
                warnings.warn(f"RelPartialLearnableMultiHeadAttn: {reason}; using the eager reference", stacklevel=2)
            if window != "mask":  # the caller stated the mask: attn_mask is not read
                attn_mask = ~reference.visibility_mask(qlen, klen, window, w.device)

        rows = rlen
        if reason is None:
            clamp_len = self.clamp_len if clamp_len == "layer" else clamp_len
            if clamp_len is None and r.requires_grad:  # rows that are equal now are not one row: each gets its gradient
                clamp_len = 0
            rows = clamp_rows(r.flip(0).squeeze(1)) if clamp_len is None else clamp_len + 1 if clamp_len > 0 else rlen
            rows = min(rows, rlen)
        r_head = (self._project_positions(r, rows) if kv_cache is None
                  else kv_cache.positions(r, rows, self._project_positions))
        if reason is None:
            u, vb = self.r_w_bias.to(q.dtype), self.r_r_bias.to(q.dtype)  # autocast leaves parameters in float32
            attn_vec = rel_memory_attention(q, k, v, r_head, u, vb, kv_head_index=kv_head_index,
                                            window=window, mem_offset=mem_offset, scale=self.scale,
                                            backend=self.backend)
        else:
            self._check_kv_head_values(kv_head_index)
            attn_vec = self._eager_attention(q, k, v, r_head, attn_mask, kv_head_index, mem_offset)
        attn_out = self.drop(self.o_net(attn_vec.permute(2, 0, 1, 3).reshape(qlen, bsz, H * D)))
        return w + attn_out if self.pre_lnorm else self.layer_norm(w + attn_out)

    def _check_inputs(self, w, r, attn_mask, mems, kv_head_index, mem_offset, window) -> None:
        """Raises ``TypeError``/``ValueError`` naming the offending argument, before anything is projected or a
        kv_cache extended, whichever path (fused or eager) the call then takes."""
        for name, t in (("w", w), ("r", r), ("mems", mems), ("attn_mask", attn_mask)):
            if not (isinstance(t, torch.Tensor) or (t is None and name in ("mems", "attn_mask"))):
                _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
        d_model, weight = self.d_model, self.qkv_net.weight
        if w.dim() != 3 or w.shape[0] < 1 or w.shape[1] < 1 or w.shape[2] != d_model:
            _fail(f"w must have shape [qlen >= 1, bsz >= 1, d_model={d_model}], got {tuple(w.shape)}")
        if w.device != weight.device:
            _fail(f"w is on {w.device} but the layer's weights are on {weight.device}")
        # the projections run in the weights' dtype, or under autocast in its own (which it casts these to)
        dtypes = (weight.dtype, *_AUTOCAST_DTYPES) if torch.is_autocast_enabled(w.device.type) else (weight.dtype,)
        for name, t in (("w", w), ("r", r)):
            if t.dtype not in dtypes:
                _fail(f"{name} must have the layer's dtype {weight.dtype} (under autocast also float16, bfloat16 or "
                      f"float32), got {t.dtype}", TypeError)
        qlen, bsz = w.shape[0], w.shape[1]
        if mems is not None:
            if mems.dim() != 3 or tuple(mems.shape[1:]) != (bsz, d_model):
                _fail(f"mems must have shape [mlen, bsz={bsz}, d_model={d_model}], got {tuple(mems.shape)}")
            if mems.dtype != w.dtype:
                _fail(f"mems has dtype {mems.dtype} but w has {w.dtype}", TypeError)
            if mems.device != w.device:
                _fail(f"mems is on {mems.device} but w is on {w.device}")
        if r.dim() != 3 or r.shape[1] != 1 or r.shape[2] != d_model:
            _fail(f"r must have shape [rlen, 1, d_model={d_model}] (one embedding per distance, shared by the batch: "
                  f"pass pos_emb[:, :1], not an expansion over bsz), got {tuple(r.shape)}")
        if r.device != w.device:
            _fail(f"r is on {r.device} but w is on {w.device}")
        check_span(None if window == "mask" else window, mem_offset, _fail, "'mask', None or an int")
        if kv_head_index is not None:
            self._check_kv_head_index(kv_head_index, w.device)
        klen = qlen + (0 if mems is None else mems.shape[0])
        if r.shape[0] != klen + mem_offset:
            _fail(f"r must have klen + mem_offset = {klen + mem_offset} rows (distance klen + mem_offset - 1 down to "
                  f"0), got {r.shape[0]}")
        if attn_mask is not None and (attn_mask.dim() not in (2, 3) or tuple(attn_mask.shape[:2]) != (qlen, klen)
                                      or (attn_mask.dim() == 3 and attn_mask.shape[2] not in (1, bsz))):
            _fail(f"attn_mask must be [qlen, klen] or [qlen, klen, 1 or bsz] = [{qlen}, {klen}(, {bsz})], got "
                  f"{tuple(attn_mask.shape)}")

    def _check_kv_head_index(self, kv_head_index, device) -> None:
        """Raises unless ``kv_head_index`` is an int32/int64 ``[n_head]`` tensor on ``device`` (its values: below)."""
        H = self.n_head
        if not isinstance(kv_head_index, torch.Tensor) or kv_head_index.dtype not in (torch.int32, torch.int64):
            got = kv_head_index.dtype if isinstance(kv_head_index, torch.Tensor) else type(kv_head_index).__name__
            _fail(f"kv_head_index must be an int32 or int64 tensor of shape [n_head={H}], got {got}", TypeError)
        if tuple(kv_head_index.shape) != (H,):
            _fail(f"kv_head_index must have shape [n_head={H}], got {tuple(kv_head_index.shape)}")
        if kv_head_index.device != device:
            _fail(f"kv_head_index is on {kv_head_index.device} but w is on {device}")

    def _check_kv_head_values(self, kv_head_index) -> None:
        """Raises unless the heads of ``kv_head_index`` lie in ``[0, n_head)``: on the eager path only (the fused op
        checks them itself), where a negative head wrapped silently and one past the last raised an IndexError."""
        if kv_head_index is not None and values_readable(kv_head_index):
            lo, hi = int(kv_head_index.min()), int(kv_head_index.max())
            if lo < 0 or hi >= self.n_head:
                _fail(f"kv_head_index values must lie in [0, n_head={self.n_head}), got values in [{lo}, {hi}]")

    def _project_positions(self, r, rows):
        """r ``[rlen, 1, d_model]`` (distance ``rlen - 1`` down to 0) -> the op's ``[H, rows, D]``, row d for
        distance d (past ``rows - 1``, the op reads the last row)."""
        r_asc = r[r.shape[0] - rows:].flip(0).squeeze(1)  # row d embeds distance d
        return self.r_net(r_asc).view(-1, self.n_head, self.d_head).transpose(0, 1)

    def _eager_attention(self, q, k, v, r_head, attn_mask, kv_head_index, mem_offset):
        """The eager path for what the fused op cannot express: any mask, attention dropout."""
        if kv_head_index is not None:
            k, v, r_head = k[:, kv_head_index], v[:, kv_head_index], r_head[kv_head_index]
        score = reference.relative_scores(q, k, self.r_w_bias, self.r_r_bias, r_head.flip(1), mem_offset, self.scale)
        if attn_mask is not None:
            mask = attn_mask.bool()
            if mask.dim() == 3:  # [qlen, klen, 1 or bsz] -> [1 or bsz, 1, qlen, klen], as the scores [bsz, H, ...]
                mask = mask.permute(2, 0, 1)[:, None]
            score = score.masked_fill(mask, float("-inf"))
        return torch.einsum("bhij,bhjd->bhid", self.dropatt(torch.softmax(score, dim=-1)), v)
