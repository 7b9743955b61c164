"""Row tiles shared by the resampling kernels: masked loads and stores of rows of ``[B, rows, d]`` tensors, the
shifted sequence of the downsampling, and the tile sizes.

A program handles ``BLOCK_M`` rows by ``BLOCK_D`` columns of one batch entry; every load and store is masked (rows
out of range are clamped to row 0 before the address is formed, so no address leaves its tensor either). Tensors are
read through their batch and row strides with a unit last stride, offsets in int64.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl

from .. import interpreter_enabled


def tile_sizes(D: int, interpreted: Optional[bool] = None):
    """``(BLOCK_M, BLOCK_D)`` for rows of ``D`` columns: 32 rows by up to 128 columns on a GPU (the ops are memory
    bound: a tile is a few KiB per program); 8 by up to 32 under the interpreter (``interpreted``, default: whether
    it is on), so small tests cross tiles."""
    if interpreter_enabled() if interpreted is None else interpreted:
        return 8, min(32, max(16, triton.next_power_of_2(D)))
    return 32, min(128, max(16, triton.next_power_of_2(D)))


@triton.jit
def program_tile(first_row, n_rows, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's tile of a grid ``(cdiv(rows, BLOCK_M), B, cdiv(D, BLOCK_D))`` over rows ``[first_row, n_rows)``
    -> (batch as int64, row indices, column indices, row mask, column mask)."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M) + first_row
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    return b, offs_m, offs_d, offs_m < n_rows, offs_d < D


@triton.jit
def load_rows(base, b, stride_b, stride_l, rows, ok, offs_d, mask_d):
    """Rows ``rows`` (where ``ok``) of batch entry ``b``, columns ``offs_d`` -> float32 ``[BLOCK, BLOCK_D]``, 0
    elsewhere."""
    safe = tl.where(ok, rows, 0).to(tl.int64)
    ptrs = base + b * stride_b + safe[:, None] * stride_l + offs_d[None, :]
    return tl.load(ptrs, mask=ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def store_rows(base, b, stride_b, stride_l, rows, ok, offs_d, mask_d, value):
    """Stores ``value [BLOCK, BLOCK_D]`` into rows ``rows`` (where ``ok``) and columns ``offs_d < D``."""
    safe = tl.where(ok, rows, 0).to(tl.int64)
    ptrs = base + b * stride_b + safe[:, None] * stride_l + offs_d[None, :]
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=ok[:, None] & mask_d[None, :])


@triton.jit
def load_shifted_rows(X, PREV, b, t, ok, SHIFT, stride_xb, stride_xl, stride_pb, stride_pl, offs_d, mask_d,
                      HAS_PREV: tl.constexpr):
    """Rows ``t`` of ``s = cat(prev, x[:, :L - SHIFT])`` (prev row t for t < SHIFT, else x row t - SHIFT; zeros
    without prev) -> float32 ``[BLOCK, BLOCK_D]``."""
    value = load_rows(X, b, stride_xb, stride_xl, t - SHIFT, ok & (t >= SHIFT), offs_d, mask_d)
    if HAS_PREV:
        value += load_rows(PREV, b, stride_pb, stride_pl, t, ok & (t < SHIFT), offs_d, mask_d)
    return value
