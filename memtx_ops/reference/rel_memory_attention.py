"""Eager reference of relative-position memory attention (SPEC §1).

It follows the Transformer-XL code path -- content scores ``AC``, position scores ``BD``
against a table of ``r`` rows ordered from the largest distance down to 0, ``_rel_shift``,
masked softmax -- generalised to every argument of the SPEC. It materialises several
``L x K`` matrices: it is the baseline the fused backends are measured against, and the
ground truth they are tested against (in float64).
"""

from __future__ import annotations

from typing import Optional

import torch


def default_kv_head_index(num_heads: int, num_kv_heads: int, device=None) -> torch.Tensor:
    """``g(h) = h * Hk // H`` for ``h`` in ``[0, H)``: plain MHA or grouped-query heads. -> ``[H]`` int64."""
    return torch.arange(num_heads, device=device) * num_kv_heads // num_heads


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Transformer-XL ``_rel_shift`` on the last two dims: ``[..., L, T] -> [..., L, T]``.

    Row ``i`` is shifted left by ``L - 1 - i``; entries that wrap around hold garbage and are
    masked by the caller, exactly as in the original code.
    """
    *lead, L, T = x.shape
    padded = torch.nn.functional.pad(x, (1, 0))
    padded = padded.view(*lead, T + 1, L)
    return padded[..., 1:, :].reshape(*lead, L, T)


def position_scores(q_biased: torch.Tensor, r_table: torch.Tensor) -> torch.Tensor:
    """Transformer-XL ``BD`` term: ``rel_shift((q + vb) . r_table^T)``.

    q_biased ``[B, H, L, D]`` (queries plus the position bias), r_table ``[H, T, D]`` ordered from
    distance ``T - 1`` down to 0 -> ``[B, H, L, T]``, where column j holds distance ``T - L + i - j``.
    """
    return rel_shift(torch.einsum("bhid,hjd->bhij", q_biased, r_table))


def relative_scores(q, k, u, vb, r_table, mem_offset: int, scale: float) -> torch.Tensor:
    """Scaled Transformer-XL scores ``scale * (AC + BD)``, unmasked: ``[B, H, L, K]``.

    q ``[B, H, L, D]``, k ``[B, H, K, D]``, u, vb ``[H, D]``, r_table ``[H, K + mem_offset, D]`` ordered from
    distance ``K + mem_offset - 1`` down to 0. With a memory offset the shifted position scores have
    ``mem_offset`` more columns: memory keys read the first ``M``, segment keys the last ``L``.
    """
    L, K = q.shape[2], k.shape[2]
    M = K - L
    ac = torch.einsum("bhid,bhjd->bhij", q + u[None, :, None, :], k)
    bd = position_scores(q + vb[None, :, None, :], r_table)
    if mem_offset:
        bd = torch.cat([bd[..., :M], bd[..., M + mem_offset:]], dim=-1)
    return (ac + bd) * scale


def visibility_mask(L: int, K: int, window: Optional[int], device=None) -> torch.Tensor:
    """Boolean ``[L, K]``, True where query ``i`` may see key ``j`` (SPEC §1 ``visible``)."""
    M = K - L
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(K, device=device)[None, :]
    visible = j <= M + i
    if window is not None:
        visible = visible & (j > M + i - window)
    return visible


def rel_memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    u: torch.Tensor,
    vb: torch.Tensor,
    *,
    kv_head_index: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    mem_offset: int = 0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Transformer-XL relative attention over ``[memory ; segment]``, eager.

    q ``[B, H, L, D]``; k, v ``[B, Hk, K, D]`` with ``K = M + L``; r ``[Hk, R, D]`` (row d =
    distance d, clamped at ``R - 1``); u, vb ``[H, D]``; kv_head_index ``[H]``. -> ``[B, H, L, D]``.
    Arguments are not validated here; :func:`memtx_ops.rel_memory_attention` validates them.
    """
    B, H, L, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    R = r.shape[1]
    if scale is None:
        scale = D ** -0.5
    if kv_head_index is None:
        kv_head_index = default_kv_head_index(H, Hk, q.device)
    kv_head_index = kv_head_index.to(device=q.device, dtype=torch.long)
    k = k.index_select(1, kv_head_index)
    v = v.index_select(1, kv_head_index)
    r = r.index_select(0, kv_head_index)

    # Once mem_offset >= R - 2 every memory distance (>= mem_offset + 1) reads row R - 1: a larger offset is taken as
    # R, which changes nothing but the size of the table below (an offset of 2**40 would not fit in memory).
    mem_offset = min(mem_offset, R)
    # Position table ordered like Transformer-XL's r_head_k: distance T-1 down to 0, T = K + mem_offset.
    distances = torch.arange(K + mem_offset - 1, -1, -1, device=q.device).clamp(max=R - 1)
    scores = relative_scores(q, k, u, vb, r.index_select(1, distances), mem_offset, scale)
    scores = scores.masked_fill(~visibility_mask(L, K, window, q.device), float("-inf"))
    softmax_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    return torch.einsum("bhij,bhjd->bhid", probs, v)
