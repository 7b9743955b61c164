"""``upsample_add`` (SPEC §4) in Triton: ``residual + upsample(x_short)`` forward and backward.

Forward: a program reads ``BLOCK_M`` fine rows i of residual, the coarse row ``i // k`` and (linear) the one before
it (``prev`` before the first), and writes ``residual + a_r x_short[m] + b_r x_short[m - 1]`` (repeat: a = 1, b = 0;
linear: a = (r + 1) / k, b = (k - 1 - r) / k, r = i % k) in float32. Backward: a program owns ``BLOCK_M`` coarse rows
j of ``cat(prev, x_short)`` and sums the k grad rows that read row j as the current row and (linear) the k rows of the
next group that read it as the previous one; the residual's gradient is grad itself. Memory: the outputs only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import load_rows, program_tile, store_rows, tile_sizes


@triton.jit
def _upsample_fwd_kernel(XS, RES, PREV, OUT, stride_sb, stride_sl, stride_rb, stride_rl, stride_pb, stride_ob,
                         stride_ol, L, D, FACTOR, LINEAR: tl.constexpr, HAS_PREV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(L, BLOCK_M), B, cdiv(D, BLOCK_D))``."""
    b, offs_i, offs_d, mask_i, mask_d = program_tile(0, L, D, BLOCK_M, BLOCK_D)
    m = offs_i // FACTOR
    out = load_rows(RES, b, stride_rb, stride_rl, offs_i, mask_i, offs_d, mask_d)
    current = load_rows(XS, b, stride_sb, stride_sl, m, mask_i, offs_d, mask_d)
    if LINEAR:
        r = (offs_i % FACTOR).to(tl.float32)
        before = load_rows(XS, b, stride_sb, stride_sl, m - 1, mask_i & (m >= 1), offs_d, mask_d)
        if HAS_PREV:  # the one row before x_short, broadcast to the rows of the first coarse position
            prev = tl.load(PREV + b * stride_pb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            before = tl.where((m == 0)[:, None], prev[None, :], before)
        out += ((r + 1) / FACTOR)[:, None] * current + ((FACTOR - 1 - r) / FACTOR)[:, None] * before
    else:
        out += current
    store_rows(OUT, b, stride_ob, stride_ol, offs_i, mask_i, offs_d, mask_d, out)


@triton.jit
def _upsample_bwd_kernel(G, DXS, DPREV, stride_gb, stride_gl, stride_sb, stride_sl, stride_pb, L_SHORT, D, FACTOR,
                         LINEAR: tl.constexpr, FIRST_ROW: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(rows, BLOCK_M), B, cdiv(D, BLOCK_D))`` over the coarse rows j of ``cat(prev, x_short)`` from
    ``FIRST_ROW`` (0 for linear, where j = 0 is prev; 1 for repeat) to L / k."""
    b, offs_j, offs_d, mask_j, mask_d = program_tile(FIRST_ROW, L_SHORT + 1, D, BLOCK_M, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r in range(0, FACTOR):
        current = load_rows(G, b, stride_gb, stride_gl, (offs_j - 1) * FACTOR + r, mask_j & (offs_j >= 1), offs_d,
                            mask_d)
        if LINEAR:
            following = load_rows(G, b, stride_gb, stride_gl, offs_j * FACTOR + r, mask_j & (offs_j < L_SHORT),
                                  offs_d, mask_d)
            acc += ((r + 1.0) / FACTOR) * current + ((FACTOR - 1.0 - r) / FACTOR) * following
        else:
            acc += current
    store_rows(DXS, b, stride_sb, stride_sl, offs_j - 1, mask_j & (offs_j >= 1), offs_d, mask_d, acc)
    if LINEAR:
        store_rows(DPREV, b, stride_pb, 0, offs_j, mask_j & (offs_j == 0), offs_d, mask_d, acc)


def upsample_add_fwd(x_short, residual, prev, factor, mode):
    """x_short ``[B, L / k, d]``, residual ``[B, L, d]``, prev ``[B, 1, d]`` or None, mode "repeat" or "linear" ->
    ``[B, L, d]`` (contiguous). Unit last strides; other strides arbitrary."""
    B, L, D = residual.shape
    out = torch.empty(B, L, D, dtype=residual.dtype, device=residual.device)
    block_m, block_d = tile_sizes(D)
    p = x_short if prev is None else prev  # a placeholder pointer when there is no prev (never read)
    grid = (triton.cdiv(L, block_m), B, triton.cdiv(D, block_d))
    _upsample_fwd_kernel[grid](
        x_short, residual, p, out, x_short.stride(0), x_short.stride(1), residual.stride(0), residual.stride(1),
        p.stride(0), out.stride(0), out.stride(1), L, D, factor, LINEAR=mode == "linear", HAS_PREV=prev is not None,
        BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return out


def upsample_add_bwd(grad, factor, mode):
    """grad ``[B, L, d]`` -> (dx_short ``[B, L / k, d]``, dprev ``[B, 1, d]`` for "linear", ``[B, 0, d]`` for
    "repeat")."""
    B, L, D = grad.shape
    L_short = L // factor
    linear = mode == "linear"
    dx_short = torch.empty(B, L_short, D, dtype=grad.dtype, device=grad.device)
    dprev = torch.empty(B, 1 if linear else 0, D, dtype=grad.dtype, device=grad.device)
    p = dprev if linear else dx_short  # repeat: dprev is empty and never written
    block_m, block_d = tile_sizes(D)
    grid = (triton.cdiv(L_short + (1 if linear else 0), block_m), B, triton.cdiv(D, block_d))
    _upsample_bwd_kernel[grid](
        grad, dx_short, p, grad.stride(0), grad.stride(1), dx_short.stride(0), dx_short.stride(1), p.stride(0),
        L_short, D, factor, LINEAR=linear, FIRST_ROW=0 if linear else 1, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return dx_short, dprev
