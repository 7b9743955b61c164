"""``cross_head_attention``: cross-head attention (SPEC §2) as ``rel_memory_attention`` with ``kv_head_index=perm``.

Query head ``h`` reads the keys, values and position projections of head ``perm[h]`` straight from
``k``, ``v`` and ``r``: no permuted copy is made, so time and memory are those of plain attention.
Gradients of ``k``, ``v``, ``r`` land on head ``perm[h]``; those of ``q``, ``u``, ``vb`` stay on head ``h``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .rel_memory_attention import rel_memory_attention, values_readable

Tensor = torch.Tensor


def _fail(message: str, error=ValueError):
    raise error(f"cross_head_attention: {message}")


def check_perm(perm, device: Optional[torch.device]) -> None:
    """Raises ``TypeError``/``ValueError`` unless ``perm`` is a 1-dim int32/int64 permutation of ``range(len(perm))``
    on ``device`` (q's; None: not checked here)."""
    if not isinstance(perm, torch.Tensor):
        _fail(f"perm must be an int32 or int64 tensor of shape [H], got {type(perm).__name__}", TypeError)
    if perm.dtype not in (torch.int32, torch.int64):
        _fail(f"perm must have dtype int32 or int64, got {perm.dtype}", TypeError)
    if perm.dim() != 1 or perm.numel() < 1:
        _fail(f"perm must have shape [H] with H >= 1, got {tuple(perm.shape)}")
    if device is not None and perm.device != device:
        _fail(f"perm must be on q's device {device}, got perm on {perm.device}")
    if values_readable(perm):
        if not torch.equal(perm.sort().values, torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)):
            _fail(f"perm must be a permutation of range({perm.numel()}), got {perm.tolist()}")


def cross_head_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    r: Tensor,
    u: Tensor,
    vb: Tensor,
    perm: Tensor,
    *,
    window: Optional[int] = None,
    mem_offset: int = 0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> Tensor:
    """Relative memory attention in which query head ``h`` uses the k/v/r heads ``perm[h]``, fused.

    q ``[B, H, L, D]``; k, v ``[B, H, K, D]``; r ``[H, R, D]``; u, vb ``[H, D]``; perm ``[H]`` int32/int64,
    a permutation of ``range(H)`` on q's device. -> ``[B, H, L, D]``, equal to
    :func:`memtx_ops.reference.cross_head_attention`. ``window``, ``mem_offset``, ``scale`` and
    ``backend`` are those of :func:`memtx_ops.rel_memory_attention`.
    """
    check_perm(perm, q.device if isinstance(q, torch.Tensor) else None)
    H = perm.numel()
    # Malformed q or k are left to rel_memory_attention's checks, which name the argument.
    if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k)) and not q.shape[1] == k.shape[1] == H:
        _fail(f"perm permutes H={H} heads but q has {q.shape[1]} and k has {k.shape[1]}; cross-head attention needs H == Hk")
    return rel_memory_attention(
        q, k, v, r, u, vb, kv_head_index=perm, window=window, mem_offset=mem_offset,
        scale=scale, backend=backend,
    )
