"""Eager reference of cross-head attention (SPEC §2), as the paper's code computes it.

Query head ``h`` attends with the keys, values and position projections of head ``perm[h]``:
``k[:, perm]``, ``v[:, perm]`` and ``r[perm]`` are copied, then ordinary relative attention runs.
``u``, ``vb`` and the head order of the output stay with the query head. The fused path
(:func:`memtx_ops.cross_head_attention`) passes ``kv_head_index=perm`` instead and copies nothing.
"""

from __future__ import annotations

from typing import Optional

import torch

from .rel_memory_attention import rel_memory_attention


def cross_head_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r: torch.Tensor,
    u: torch.Tensor,
    vb: torch.Tensor,
    perm: torch.Tensor,
    *,
    window: Optional[int] = None,
    mem_offset: int = 0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Relative attention after permuting the key/value/position heads, with copies.

    q ``[B, H, L, D]``; k, v ``[B, H, K, D]``; r ``[H, R, D]``; u, vb ``[H, D]``; perm ``[H]`` a
    permutation of ``range(H)``. -> ``[B, H, L, D]``. Not validated here (see the fused op).
    """
    perm = perm.to(device=k.device, dtype=torch.long)
    return rel_memory_attention(
        q, k[:, perm], v[:, perm], r[perm], u, vb, window=window, mem_offset=mem_offset, scale=scale
    )
