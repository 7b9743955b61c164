"""Reference of the causal resampling ops (SPEC §4): the eager composition of pad, view, mean, repeat_interleave, add.

Batch-first ``[B, L, d]`` (any strides), shortening factor ``k >= 1``, ``L`` a multiple of ``k``.

``causal_downsample``: shift right by ``k - 1`` (the shifted-in rows come from ``prev``, the previous segment's last
``k - 1`` rows, zeros without it), then the mean or a ``weights``-weighted sum over groups of ``k``, so that coarse row
``m`` reads the fine rows ``m*k - (k - 1) .. m*k``: nothing after token ``m*k``.

``upsample_add``: ``residual[:, i] + up[:, i]`` with ``up[:, i] = x_short[:, i // k]`` (``"repeat"``), or
(``"linear"``, this library's extension of SPEC §4, within what it allows) the ramp from the previous coarse row to
the current one across a group::

    m, r = i // k, i % k
    up[:, i] = (r + 1) / k * x_short[:, m] + (k - 1 - r) / k * x_short[:, m - 1]

where ``x_short[:, -1]`` is ``prev`` ``[B, 1, d]`` (the previous segment's last coarse row; zeros without it). It is
the linear interpolation of the coarse rows placed at the last fine position of their group (``m*k + k - 1``), so
fine row ``i`` reads ``x_short[:, i // k]`` and the row before it only, never a later one.
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

UPSAMPLE_MODES = ("repeat", "linear")


def shifted_rows(x: Tensor, factor: int, prev: Optional[Tensor] = None) -> Tensor:
    """``s = cat([prev, x[:, : L - (k - 1)]], dim=1)`` ``[B, L, d]``: x shifted right by ``k - 1`` rows, ``prev``
    ``[B, k - 1, d]`` (zeros when None) shifted in."""
    B, L, d = x.shape
    if prev is None:
        prev = x.new_zeros(B, factor - 1, d)
    return torch.cat([prev, x[:, : L - (factor - 1)]], dim=1)


def causal_downsample(x: Tensor, factor: int, prev: Optional[Tensor] = None,
                      weights: Optional[Tensor] = None) -> Tensor:
    """x ``[B, L, d]``, prev ``[B, k - 1, d]`` or None, weights ``[k]`` or None (the mean) -> ``[B, L / k, d]``:
    ``y[:, m] = sum_r w_r * s[:, m*k + r]`` over the shifted rows ``s`` (:func:`shifted_rows`)."""
    B, L, d = x.shape
    groups = shifted_rows(x, factor, prev).reshape(B, L // factor, factor, d)
    if weights is None:
        return groups.mean(dim=2)
    return torch.einsum("bmrd,r->bmd", groups, weights)


def linear_upsample_weights(factor: int, dtype=torch.float64, device=None):
    """The ramp of ``mode="linear"``: (weight of the current coarse row, weight of the previous one), each ``[k]``
    over the position ``r = i % k`` in the group: ``(r + 1) / k`` and ``(k - 1 - r) / k``."""
    r = torch.arange(factor, dtype=dtype, device=device)
    return (r + 1) / factor, (factor - 1 - r) / factor


def upsample_add(x_short: Tensor, residual: Tensor, factor: int, mode: str = "repeat",
                 prev: Optional[Tensor] = None) -> Tensor:
    """x_short ``[B, L / k, d]``, residual ``[B, L, d]`` -> ``residual + up(x_short)`` ``[B, L, d]``; prev
    ``[B, 1, d]`` (``mode="linear"`` only: the coarse row before ``x_short[:, 0]``, zeros when None)."""
    up = x_short.repeat_interleave(factor, dim=1)
    if mode == "linear":
        B, _, d = x_short.shape
        before = x_short.new_zeros(B, 1, d) if prev is None else prev
        earlier = torch.cat([before, x_short[:, :-1]], dim=1).repeat_interleave(factor, dim=1)
        current_w, previous_w = linear_upsample_weights(factor, x_short.dtype, x_short.device)
        L = residual.shape[1]
        up = current_w.repeat(L // factor)[:, None] * up + previous_w.repeat(L // factor)[:, None] * earlier
    return residual + up
