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
    M = K - L
    R = r.shape[1]
    if scale is None:
        scale = D ** -0.5
    if kv_head_index is None:
        kv_head_index = default_kv_head_index(H, Hk, q.device)
    kv_head_index = kv_head_index.to(device=q.device, dtype=torch.long)
    k = k.index_select(1, kv_head_index)
    v = v.index_select(1, kv_head_index)
    r = r.index_select(0, kv_head_index)

    # Position table ordered like Transformer-XL's r_head_k: distance T-1 down to 0.  With a
    # memory offset the memory columns need T = K + mem_offset distances; the segment columns
    # are then read from the last L columns of the shifted matrix.
    T = K + mem_offset
    distances = torch.arange(T - 1, -1, -1, device=q.device).clamp(max=R - 1)
    r_table = r.index_select(1, distances)  # [H, T, D]

    ac = torch.einsum("bhid,bhjd->bhij", q + u[None, :, None, :], k)
    bd = torch.einsum("bhid,hjd->bhij", q + vb[None, :, None, :], r_table)
    bd = rel_shift(bd)
    if mem_offset:
        bd = torch.cat([bd[..., :M], bd[..., M + mem_offset:]], dim=-1)
    scores = (ac + bd) * scale
    scores = scores.masked_fill(~visibility_mask(L, K, window, q.device), float("-inf"))
    softmax_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
    return torch.einsum("bhij,bhjd->bhid", probs, v)
