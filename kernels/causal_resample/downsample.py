"""``causal_downsample`` (SPEC §4) in Triton: forward, the gradients of x and prev, and that of the weights.

Forward: a program sums, for ``BLOCK_M`` coarse rows m, the k rows ``s[m*k + r]`` of the shifted sequence read in
place from x and prev (no shifted copy), in float32. Backward: a program writes rows u of ``[dprev ; dx]`` =
``w_{u%k} grad[u // k]`` (the last k - 1 rows of x feed no coarse row: zeros); neither x nor prev is read. The
weights' gradient: a program sums ``<s[m*k + r], grad[m]>`` over its rows into one float32 partial per r; the
partials are added in a fixed order (deterministic). Memory: the outputs and ``k`` floats per program of dw.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import load_rows, load_shifted_rows, program_tile, store_rows, tile_sizes


@triton.jit
def _downsample_fwd_kernel(X, PREV, W, Y, stride_xb, stride_xl, stride_pb, stride_pl, stride_yb, stride_yl,
                           L_SHORT, D, FACTOR, HAS_PREV: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(L / k, BLOCK_M), B, cdiv(D, BLOCK_D))``."""
    b, offs_m, offs_d, mask_m, mask_d = program_tile(0, L_SHORT, D, BLOCK_M, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for r in range(0, FACTOR):
        rows = load_shifted_rows(X, PREV, b, offs_m * FACTOR + r, mask_m, FACTOR - 1, stride_xb, stride_xl,
                                 stride_pb, stride_pl, offs_d, mask_d, HAS_PREV)
        if HAS_WEIGHTS:
            acc += tl.load(W + r).to(tl.float32) * rows
        else:
            acc += rows
    if not HAS_WEIGHTS:
        acc = acc / FACTOR
    store_rows(Y, b, stride_yb, stride_yl, offs_m, mask_m, offs_d, mask_d, acc)


@triton.jit
def _downsample_bwd_kernel(G, W, DX, DPREV, stride_gb, stride_gl, stride_xb, stride_xl, stride_pb, stride_pl,
                           L, D, FACTOR, HAS_WEIGHTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(L + k - 1, BLOCK_M), B, cdiv(D, BLOCK_D))`` over the rows u of ``[dprev ; dx]``."""
    b, offs_u, offs_d, mask_u, mask_d = program_tile(0, L + FACTOR - 1, D, BLOCK_M, BLOCK_D)
    in_s = mask_u & (offs_u < L)  # rows of the shifted sequence; the rest are the dead rows of dx
    ds = load_rows(G, b, stride_gb, stride_gl, offs_u // FACTOR, in_s, offs_d, mask_d)
    if HAS_WEIGHTS:
        ds = ds * tl.load(W + offs_u % FACTOR, mask=in_s, other=0.0).to(tl.float32)[:, None]
    else:
        ds = ds / FACTOR
    store_rows(DPREV, b, stride_pb, stride_pl, offs_u, mask_u & (offs_u < FACTOR - 1), offs_d, mask_d, ds)
    store_rows(DX, b, stride_xb, stride_xl, offs_u - (FACTOR - 1), mask_u & (offs_u >= FACTOR - 1), offs_d, mask_d,
               ds)


@triton.jit
def _downsample_weights_grad_kernel(X, PREV, G, PARTIAL, stride_xb, stride_xl, stride_pb, stride_pl, stride_gb,
                                    stride_gl, L_SHORT, D, FACTOR, HAS_PREV: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_D: tl.constexpr):
    """Grid ``(cdiv(L / k, BLOCK_M), B)``: PARTIAL[b, block, r] = sum over the block's rows of <s[m*k + r], grad[m]>."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < L_SHORT
    out = PARTIAL + (b * tl.num_programs(0) + tl.program_id(0)) * FACTOR
    for r in range(0, FACTOR):
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            g = load_rows(G, b, stride_gb, stride_gl, offs_m, mask_m, offs_d, mask_d)
            s = load_shifted_rows(X, PREV, b, offs_m * FACTOR + r, mask_m, FACTOR - 1, stride_xb, stride_xl,
                                  stride_pb, stride_pl, offs_d, mask_d, HAS_PREV)
            acc += s * g
        tl.store(out + r, tl.sum(tl.sum(acc, 1), 0))


def causal_downsample_fwd(x, prev, weights, factor):
    """x ``[B, L, d]``, prev ``[B, k - 1, d]`` or None, weights ``[k]`` or None -> y ``[B, L / k, d]`` (contiguous).
    Unit last strides; other strides arbitrary."""
    B, L, D = x.shape
    L_short = L // factor
    y = torch.empty(B, L_short, D, dtype=x.dtype, device=x.device)
    block_m, block_d = tile_sizes(D)
    p = x if prev is None else prev  # a placeholder pointer when there is no prev (never read)
    grid = (triton.cdiv(L_short, block_m), B, triton.cdiv(D, block_d))
    _downsample_fwd_kernel[grid](
        x, p, x if weights is None else weights, y, x.stride(0), x.stride(1), p.stride(0), p.stride(1),
        y.stride(0), y.stride(1), L_short, D, factor, HAS_PREV=prev is not None, HAS_WEIGHTS=weights is not None,
        BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return y


def causal_downsample_bwd(grad, weights, factor):
    """grad ``[B, L / k, d]`` -> (dx ``[B, L, d]``, dprev ``[B, k - 1, d]``)."""
    B, L_short, D = grad.shape
    L = L_short * factor
    dx = torch.empty(B, L, D, dtype=grad.dtype, device=grad.device)
    dprev = torch.empty(B, factor - 1, D, dtype=grad.dtype, device=grad.device)
    p = dprev if factor > 1 else dx  # factor 1: dprev is empty and never written
    block_m, block_d = tile_sizes(D)
    grid = (triton.cdiv(L + factor - 1, block_m), B, triton.cdiv(D, block_d))
    _downsample_bwd_kernel[grid](
        grad, grad if weights is None else weights, dx, p, grad.stride(0), grad.stride(1), dx.stride(0), dx.stride(1),
        p.stride(0), p.stride(1), L, D, factor, HAS_WEIGHTS=weights is not None, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return dx, dprev


def causal_downsample_weights_grad(grad, x, prev, factor):
    """grad ``[B, L / k, d]``, x ``[B, L, d]``, prev or None -> dweights ``[k]`` (float32 partials, summed in order)."""
    B, L_short, D = grad.shape
    block_m, block_d = tile_sizes(D)
    blocks = triton.cdiv(L_short, block_m)
    partial = torch.empty(B, blocks, factor, dtype=torch.float32, device=x.device)
    p = x if prev is None else prev
    _downsample_weights_grad_kernel[(blocks, B)](
        x, p, grad, partial, x.stride(0), x.stride(1), p.stride(0), p.stride(1), grad.stride(0), grad.stride(1),
        L_short, D, factor, HAS_PREV=prev is not None, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return partial.reshape(-1, factor).sum(0).to(x.dtype)
