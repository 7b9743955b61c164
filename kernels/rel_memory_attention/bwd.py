"""Backward of relative-position memory attention, recomputing the probabilities from the saved log-sum-exp.

Kernels, in launch order:

* ``_bwd_preprocess``: ``delta_i = dO_i . O_i``, from the forward's float32 O: a 16-bit O would round it, and
  ``dP - delta`` cancels where a query sees few keys, so that rounding would swamp their gradients.
* ``_bwd_dkdv_kernel``: one program per (batch, kv head, key block) owns dk, dv of its keys and sums over every
  query head mapped to that kv head (any ``kv_head_index``; unused kv heads get zeros). No atomics.
* ``_bwd_dq_kernel``: one program per (batch, head, query block) owns dq and writes per-block partials of du, dvb
  and of the clamped row ``dr[R - 1]``; the unclamped rows of dr are added with float32 atomics.
* ``_bwd_dr_kernel`` (deterministic mode only, replacing those atomics): one program per (kv head, block of
  distances, block of at most 128 columns) sums, in a fixed order, the gradient of its r rows over batches, query
  heads and queries.

With ``dS = scale * P * (dP - delta)``: ``dq = dS k + band(dS) rwin``, ``dk = dS^T (q+u)``, ``dv = P^T dO``,
``dr[d] = sum over (i, j) at clamped distance d of dS_ij (q_i+vb)``, ``du``/``dvb`` = the two parts of dq
summed over batch and queries.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..utils import (aligned_rows, autotune_tiles, dot_precision, load_r_window, load_rows, masked_scores, on_device,
                     smallest_block, store_rows, tile_scores, tile_top_distance, unshift_band)

LOG2E = math.log2(math.e)

# {dtype kind: {largest BLOCK_D: [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]}}, one table per kernel, chosen
# with the ahead-of-time compile check (`make check-aot`, bench/results/triton-aot-3.6.0.md): every config fits
# sm_80's shared memory and the 16-bit ones compile without spills for sm_80 and sm_90. The backward holds the
# recomputed scores, the position band, dP and dS of a tile at once, so its tiles are small: 64 x 64 spills at
# every width, and on sm_80 the dq kernel at D = 64 fits only 16 x 16 without spilling (the float32 tables take
# tiles that fit sm_80's shared memory; their spills are recorded, not gated).
DKDV_CONFIGS = {
    "16bit": {
        64: [(32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2)],
        128: [(32, 32, 8, 1), (16, 32, 8, 2), (16, 16, 8, 2)],
        256: [(16, 16, 8, 2)],  # scores summed a column block at a time (_scores_by_columns)
    },
    "fp32": {
        64: [(32, 32, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2)],
        128: [(16, 32, 8, 2), (16, 16, 8, 2)],
        256: [(16, 16, 8, 1)],
    },
}
DQ_CONFIGS = {
    "16bit": {
        64: [(16, 16, 8, 2), (16, 16, 4, 2)],
        128: [(32, 32, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2)],
        256: [(16, 32, 8, 2), (16, 16, 8, 2)],
    },
    "fp32": {
        64: [(32, 32, 8, 2), (16, 16, 8, 2)],
        128: [(16, 16, 8, 2), (16, 32, 8, 1)],
        256: [(16, 16, 8, 1)],
    },
}
# {dtype kind: {largest BLOCK_D: [(BLOCK_M, BLOCK_R, num_warps, num_stages), ...]}} of the deterministic dr pass.
# For D in (128, 256] a program owns 128 columns of dr (COLUMN_BLOCK): with all 256, every tile spilled.
DR_CONFIGS = {
    "16bit": {
        64: [(16, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
        128: [(16, 16, 8, 2)],
        256: [(16, 16, 8, 1)],
    },
    "fp32": {
        64: [(16, 16, 8, 2), (16, 32, 8, 2)],
        128: [(16, 16, 8, 2)],
        256: [(16, 16, 8, 1)],
    },
}


def deterministic() -> bool:
    """True under ``MEMTX_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``: dr without atomics."""
    return os.environ.get("MEMTX_DETERMINISTIC", "0") not in ("", "0") or torch.are_deterministic_algorithms_enabled()


def band_config(block_m: int, block_r: int, num_warps: int = 4, num_stages: int = 2) -> triton.Config:
    """``BLOCK_M`` queries by ``BLOCK_R`` distances: tiles of ``BLOCK_T`` keys and ``BLOCK_W`` r rows (powers of 2)."""
    block_t = triton.next_power_of_2(block_m + block_r - 1)
    block_w = triton.next_power_of_2(block_m + block_t - 1)
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_R": block_r, "BLOCK_T": block_t, "BLOCK_W": block_w},
        num_warps=num_warps, num_stages=num_stages,
    )


@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                    H, L, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(B * H, cdiv(L, BLOCK_M))``: ``delta [B, H, L] = sum_d dO * O`` in float32 (O float32)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    i0 = pid_m * BLOCK_M
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    o = load_rows(O + b * stride_ob + h * stride_oh, i0, 0, L, stride_om, offs_d, mask_d, BLOCK_M)
    do = load_rows(DO + b * stride_dob + h * stride_doh, i0, 0, L, stride_dom, offs_d, mask_d, BLOCK_M)
    offs_i = i0 + tl.arange(0, BLOCK_M)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * L + offs_i, delta, mask=offs_i < L)


@triton.jit
def _biased_queries(q_base, u_row, vb_row, i0, L, stride_qm, offs_d, mask_d, BLOCK_M: tl.constexpr):
    """Columns ``offs_d`` of query rows ``[i0, i0 + BLOCK_M)`` of one head -> (q+u, q+vb) in the input dtype."""
    q = load_rows(q_base, i0, 0, L, stride_qm, offs_d, mask_d, BLOCK_M)
    u = tl.load(u_row + offs_d, mask=mask_d, other=0.0)
    vb = tl.load(vb_row + offs_d, mask=mask_d, other=0.0)
    qu = (q.to(tl.float32) + u[None, :].to(tl.float32)).to(q.dtype)
    qv = (q.to(tl.float32) + vb[None, :].to(tl.float32)).to(q.dtype)
    return qu, qv


@triton.jit
def _load_query_block(Q, U, VB, DO, LSE, DELTA, b, h, i0, stride_qb, stride_qh, stride_qm, stride_uh, stride_vbh,
                      stride_dob, stride_doh, stride_dom, H, L, offs_d, mask_d, BLOCK_M: tl.constexpr):
    """Rows ``[i0, i0 + BLOCK_M)`` of head h -> (q+u, q+vb, dO in the input dtype; lse in log2 units, delta)."""
    h = tl.cast(h, tl.int64)
    qu, qv = _biased_queries(Q + b * stride_qb + h * stride_qh, U + h * stride_uh, VB + h * stride_vbh, i0, L,
                             stride_qm, offs_d, mask_d, BLOCK_M)
    do = load_rows(DO + b * stride_dob + h * stride_doh, i0, 0, L, stride_dom, offs_d, mask_d, BLOCK_M)
    lse2, delta = _row_stats(LSE, DELTA, (b * H + h) * L, i0 + tl.arange(0, BLOCK_M), L)
    return qu, qv, do, lse2, delta


@triton.jit
def _row_stats(LSE, DELTA, row0, offs_i, L):
    """lse (in log2 units) and delta of query rows ``offs_i`` of the (batch, head) whose rows start at ``row0``."""
    rows = row0 + offs_i
    lse2 = tl.load(LSE + rows, mask=offs_i < L, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + rows, mask=offs_i < L, other=0.0)
    return lse2, delta


# Columns a backward kernel handles at a time where a full-width tile would spill: the dr kernel's programs own this
# many columns of dr, and both it and the dk/dv kernel (for BLOCK_D above it) sum scores over D in such blocks.
COLUMN_BLOCK = 128


def column_block(block_d: int) -> int:
    """``BLOCK_DC`` of the dk/dv and dr kernels for ``BLOCK_D``."""
    return min(block_d, COLUMN_BLOCK)


@triton.jit
def _scores_by_columns(q_base, u_row, vb_row, do_base, k_base, v_base, r_base, stride_qm, stride_dom, stride_kn,
                       stride_vn, stride_rn, offs_i, i0, j0, j_lo, j_hi, offset, L, M, R, WINDOW, qk_scale,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                       BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr, PRECISION: tl.constexpr):
    """What ``tile_scores`` and ``dO v^T`` give for queries ``[i0, i0 + BLOCK_M)`` of one head against the keys
    ``j0 + arange(BLOCK_N)`` (in ``[j_lo, j_hi)``, distances plus ``offset``), summed over D ``BLOCK_DC`` columns at
    a time, so that no full-width tile of q, dO, k, v or the r window is ever live (at D = 256 those spill) -> (scores
    in log2 units, ``-inf`` where not visible; dP), float32 ``[BLOCK_M, BLOCK_N]``."""
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    band = tl.zeros([BLOCK_M, BLOCK_W], tl.float32)
    dp = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    dmax = tile_top_distance(M, i0, j0, offset, BLOCK_M)
    for c0 in range(0, BLOCK_D, BLOCK_DC):
        offs_d = c0 + tl.arange(0, BLOCK_DC)
        mask_d = offs_d < D
        qu, qv = _biased_queries(q_base, u_row, vb_row, i0, L, stride_qm, offs_d, mask_d, BLOCK_M)
        do = load_rows(do_base, i0, 0, L, stride_dom, offs_d, mask_d, BLOCK_M)
        k = load_rows(k_base, j0, j_lo, j_hi, stride_kn, offs_d, mask_d, BLOCK_N)
        v = load_rows(v_base, j0, j_lo, j_hi, stride_vn, offs_d, mask_d, BLOCK_N)
        rwin = load_r_window(r_base, stride_rn, dmax, R, offs_d, mask_d, BLOCK_W)
        s += tl.dot(qu, tl.trans(k), input_precision=PRECISION)
        band += tl.dot(qv, tl.trans(rwin), input_precision=PRECISION)
        dp += tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return masked_scores(s, band, offs_i, j0, j_lo, j_hi, L, M, WINDOW, qk_scale, BLOCK_M, BLOCK_N), dp


@autotune_tiles(DKDV_CONFIGS, key=("D", "BLOCK_D", "PRECISION"))
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, R_, U, VB, KV_HEAD, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_rh, stride_rn, stride_uh, stride_vbh, stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    H, HK, L, M, R, WINDOW, MEM_OFFSET, scale, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DC: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid ``(B * Hk, cdiv(M, BLOCK_N) + cdiv(L, BLOCK_N))``: memory key blocks, then segment key blocks. Up to
    ``BLOCK_DC`` columns (``BLOCK_D == BLOCK_DC``) the block's k and v stay in registers; wider, the scores are
    summed over D a column block at a time from cached loads (:func:`_scores_by_columns`), as full-width k, v and
    r window tiles next to the dk and dv accumulators spill."""
    pid_bg = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bg // HK).to(tl.int64)
    g = (pid_bg % HK).to(tl.int64)
    n_mem = tl.cdiv(M, BLOCK_N)
    segment = pid_n >= n_mem
    j0 = tl.where(segment, M + (pid_n - n_mem) * BLOCK_N, pid_n * BLOCK_N)
    j_lo = tl.where(segment, M, 0)
    j_hi = tl.where(segment, M + L, M)
    offset = tl.where(segment, 0, MEM_OFFSET)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    if BLOCK_D == BLOCK_DC:
        k = load_rows(k_base, j0, j_lo, j_hi, stride_kn, offs_d, mask_d, BLOCK_N)
        v = load_rows(v_base, j0, j_lo, j_hi, stride_vn, offs_d, mask_d, BLOCK_N)
    r_base = R_ + g * stride_rh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # queries that see a key of the block: i >= j0 - M (causal) and i < j_last - M + WINDOW (window)
    i_lo = tl.maximum(j0 - M, 0)
    i_hi = tl.minimum(L - 1, tl.minimum(j0 + BLOCK_N, j_hi) - 1 - M + WINDOW - 1)
    for h in range(H):
        if tl.load(KV_HEAD + h) == g:
            for i0 in range(i_lo // BLOCK_M * BLOCK_M, i_hi + 1, BLOCK_M):
                qu, qv, do, lse2, delta = _load_query_block(
                    Q, U, VB, DO, LSE, DELTA, b, h, i0, stride_qb, stride_qh, stride_qm, stride_uh, stride_vbh,
                    stride_dob, stride_doh, stride_dom, H, L, offs_d, mask_d, BLOCK_M)
                offs_i = i0 + tl.arange(0, BLOCK_M)
                if BLOCK_D == BLOCK_DC:
                    s, _ = tile_scores(qu, qv, k, r_base, stride_rn, offs_d, mask_d, offs_i, i0, j0, j_lo, j_hi,
                                       offset, L, M, R, WINDOW, qk_scale, BLOCK_M, BLOCK_N, BLOCK_W, PRECISION)
                    p = tl.math.exp2(s - lse2[:, None])
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                else:
                    hh = tl.cast(h, tl.int64)
                    s, dp = _scores_by_columns(
                        Q + b * stride_qb + hh * stride_qh, U + hh * stride_uh, VB + hh * stride_vbh,
                        DO + b * stride_dob + hh * stride_doh, k_base, v_base, r_base, stride_qm, stride_dom,
                        stride_kn, stride_vn, stride_rn, offs_i, i0, j0, j_lo, j_hi, offset, L, M, R, WINDOW,
                        qk_scale, D, BLOCK_M, BLOCK_N, BLOCK_W, BLOCK_D, BLOCK_DC, PRECISION)
                    p = tl.math.exp2(s - lse2[:, None])
                    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                ds = p * (dp - delta[:, None]) * scale
                dk += tl.dot(tl.trans(ds.to(qu.dtype)), qu, input_precision=PRECISION)
    store_rows(DK + b * stride_dkb + g * stride_dkh, j0, j_hi, stride_dkn, offs_d, mask_d, dk, BLOCK_N)
    store_rows(DV + b * stride_dvb + g * stride_dvh, j0, j_hi, stride_dvn, offs_d, mask_d, dv, BLOCK_N)


@triton.jit
def _dq_tile(dq_c, dq_p, clamped, qu, qv, do, lse2, delta, k_base, v_base, r_base, DR, g, dr_rows,
             stride_kn, stride_vn, stride_rn, stride_drh, stride_drn, offs_i, offs_d, mask_d,
             i0, j0, j_hi, offset, L, M, R, WINDOW, scale, qk_scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
             DETERMINISTIC: tl.constexpr):
    """One key block ``[j0, j0 + BLOCK_N)`` of the dq program; unless DETERMINISTIC, atomically adds its dr rows
    below ``dr_rows`` (``R - 1``, or 0 for a bad head index: nothing is written) to DR. ``clamped`` collects, per
    query, dS over the keys at distance ``>= R - 1``."""
    k = load_rows(k_base, j0, j0, j_hi, stride_kn, offs_d, mask_d, BLOCK_N)
    v = load_rows(v_base, j0, j0, j_hi, stride_vn, offs_d, mask_d, BLOCK_N)
    s, rwin = tile_scores(qu, qv, k, r_base, stride_rn, offs_d, mask_d, offs_i, i0, j0, j0, j_hi, offset,
                          L, M, R, WINDOW, qk_scale, BLOCK_M, BLOCK_N, BLOCK_W, PRECISION)
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None]) * scale
    dq_c += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    band = unshift_band(ds, BLOCK_M, BLOCK_N, BLOCK_W)
    dq_p += tl.dot(band.to(rwin.dtype), rwin, input_precision=PRECISION)
    dmax = tile_top_distance(M, i0, j0, offset, BLOCK_M)
    dist = dmax - (BLOCK_M - 1 - tl.arange(0, BLOCK_M))[:, None] - tl.arange(0, BLOCK_N)[None, :]
    clamped += tl.sum(tl.where(dist >= R - 1, ds, 0.0), 1)
    if not DETERMINISTIC:
        drwin = tl.dot(tl.trans(band.to(qv.dtype)), qv, input_precision=PRECISION)
        rows = dmax - tl.arange(0, BLOCK_W)
        tl.atomic_add(DR + g * stride_drh + rows[:, None] * stride_drn + offs_d[None, :], drwin,
                      mask=((rows >= 0) & (rows < dr_rows))[:, None] & mask_d[None, :], sem="relaxed")
    return dq_c, dq_p, clamped


# Every buffer this kernel adds to or fills by query block is zeroed before each config's trial run and the real one:
# a trial of a smaller BLOCK_M fills slots that the chosen config leaves alone (du and dvb came out wrong on a GPU).
@autotune_tiles(DQ_CONFIGS, key=("D", "BLOCK_D", "PRECISION", "DETERMINISTIC"), reset_to_zero=["DR", "DU", "DVB", "CQ"])
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, R_, U, VB, KV_HEAD, DO, LSE, DELTA, DQ, DU, DVB, DR, CQ,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_rh, stride_rn, stride_uh, stride_vbh, stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm, stride_drh, stride_drn,
    H, HK, L, M, R, WINDOW, MEM_OFFSET, scale, qk_scale, NUM_SLOTS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr,
):
    """Grid ``(B * H, cdiv(L, BLOCK_M))``. DU, DVB, CQ: float32 partials ``[B, NUM_SLOTS, H, D]``, slot = query
    block; CQ holds the gradient of the clamped row ``r[R - 1]``. DR: float32 ``[Hk, R, D]`` atomic accumulator
    (rows below ``R - 1``, and ``R - 1`` itself unless DETERMINISTIC)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    g = tl.load(KV_HEAD + h).to(tl.int64)
    # As in the forward: a bad index (unchecked under torch.compile) gives NaN in this head's dq, du and dvb, and
    # reads or writes nothing outside the tensors; dr, dk, dv of the real kv heads get nothing from it.
    g_valid = (g >= 0) & (g < HK)
    g = tl.where(g_valid, g, 0)
    dr_rows = tl.where(g_valid, R - 1, 0)  # the dr rows below R - 1 this program may add to
    i0 = pid_m * BLOCK_M
    offs_i = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    qu, qv, do, lse2, delta = _load_query_block(
        Q, U, VB, DO, LSE, DELTA, b, h, i0, stride_qb, stride_qh, stride_qm, stride_uh, stride_vbh,
        stride_dob, stride_doh, stride_dom, H, L, offs_d, mask_d, BLOCK_M)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    r_base = R_ + g * stride_rh

    dq_c = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq_p = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    clamped = tl.zeros([BLOCK_M], tl.float32)  # sum of dS over the keys at distance >= R - 1
    hi = M + tl.minimum(i0 + BLOCK_M, L) - 1
    lo = tl.maximum(M + i0 - WINDOW + 1, 0)
    for j0 in range(lo // BLOCK_N * BLOCK_N, tl.minimum(hi + 1, M), BLOCK_N):
        dq_c, dq_p, clamped = _dq_tile(
            dq_c, dq_p, clamped, qu, qv, do, lse2, delta, k_base, v_base, r_base, DR, g, dr_rows,
            stride_kn, stride_vn, stride_rn, stride_drh, stride_drn, offs_i, offs_d, mask_d,
            i0, j0, M, MEM_OFFSET, L, M, R, WINDOW, scale, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_W, PRECISION, DETERMINISTIC)
    for j0 in range(M + (tl.maximum(lo, M) - M) // BLOCK_N * BLOCK_N, hi + 1, BLOCK_N):
        dq_c, dq_p, clamped = _dq_tile(
            dq_c, dq_p, clamped, qu, qv, do, lse2, delta, k_base, v_base, r_base, DR, g, dr_rows,
            stride_kn, stride_vn, stride_rn, stride_drh, stride_drn, offs_i, offs_d, mask_d,
            i0, j0, M + L, 0, L, M, R, WINDOW, scale, qk_scale,
            BLOCK_M, BLOCK_N, BLOCK_W, PRECISION, DETERMINISTIC)

    dq = tl.where(g_valid, dq_c + dq_p, float("nan"))
    store_rows(DQ + b * stride_dqb + h * stride_dqh, i0, L, stride_dqm, offs_d, mask_d, dq, BLOCK_M)
    slot = ((b * NUM_SLOTS + pid_m) * H + h) * D + offs_d
    tl.store(DU + slot, tl.where(g_valid, tl.sum(dq_c, 0), float("nan")), mask=mask_d)
    tl.store(DVB + slot, tl.where(g_valid, tl.sum(dq_p, 0), float("nan")), mask=mask_d)
    cq = tl.sum(clamped[:, None] * qv.to(tl.float32), 0)
    if DETERMINISTIC:
        tl.store(CQ + slot, cq, mask=mask_d)  # summed by the dr kernel for the heads mapped to g only
    else:
        tl.atomic_add(DR + g * stride_drh + (R - 1) * stride_drn + offs_d, cq, mask=offs_d < tl.where(g_valid, D, 0),
                      sem="relaxed")


@triton.jit
def _band_needed(j_first, j_lo, j_hi, i0, L, M, WINDOW, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """Whether keys ``[j_first, j_first + BLOCK_M + BLOCK_R - 1)`` meet ``[j_lo, j_hi)`` and the keys visible
    to queries ``[i0, i0 + BLOCK_M)``."""
    first = tl.maximum(tl.maximum(j_first, j_lo), M + i0 - WINDOW + 1)
    last = tl.minimum(tl.minimum(j_first + BLOCK_M + BLOCK_R - 2, j_hi - 1), M + tl.minimum(i0 + BLOCK_M, L) - 1)
    return first <= last


@triton.jit
def _dr_band(acc, q_base, u_row, vb_row, do_base, lse2, delta, k_base, v_base, r_base, stride_qm, stride_dom,
             stride_kn, stride_vn, stride_rn, offs_i, offs_c, mask_c, i0, d0, j_first, j_lo, j_hi, offset,
             L, M, R, WINDOW, scale, qk_scale, D: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr, PRECISION: tl.constexpr):
    """Adds to ``acc [BLOCK_R, BLOCK_DC]`` the columns ``offs_c`` of the gradient of r rows ``[d0, d0 + BLOCK_R)``
    (those below ``R - 1``) from queries ``[i0, i0 + BLOCK_M)`` and the keys in ``[j_lo, j_hi)`` at those distances.

    Query ``ii`` meets distance ``d0 + dd`` at key ``j_first + ii + BLOCK_R - 1 - dd``: the tile of keys
    ``j_first + arange(BLOCK_T)`` covers them all, read back along its diagonals with ``tl.gather``; its scores and
    dP are sums over all of D (:func:`_scores_by_columns`)."""
    s, dp = _scores_by_columns(q_base, u_row, vb_row, do_base, k_base, v_base, r_base, stride_qm, stride_dom,
                               stride_kn, stride_vn, stride_rn, offs_i, i0, j_first, j_lo, j_hi, offset, L, M, R,
                               WINDOW, qk_scale, D, BLOCK_M, BLOCK_T, BLOCK_W, BLOCK_D, BLOCK_DC, PRECISION)
    p = tl.math.exp2(s - lse2[:, None])
    ds = p * (dp - delta[:, None]) * scale
    dist = d0 + BLOCK_R - 1 + tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_T)[None, :]
    ds = tl.where(dist < R - 1, ds, 0.0)  # the clamped row comes from the dq kernel's partials
    index = tl.arange(0, BLOCK_M)[:, None] + (BLOCK_R - 1 - tl.arange(0, BLOCK_R))[None, :]
    by_distance = tl.gather(ds, index, axis=1)  # [BLOCK_M, BLOCK_R]
    _, qv = _biased_queries(q_base, u_row, vb_row, i0, L, stride_qm, offs_c, mask_c, BLOCK_M)
    return acc + tl.dot(tl.trans(by_distance.to(qv.dtype)), qv, input_precision=PRECISION)


@autotune_tiles(DR_CONFIGS, make_config=band_config, key=("D", "BLOCK_D", "PRECISION"))
@triton.jit
def _bwd_dr_kernel(
    Q, K, V, R_, U, VB, KV_HEAD, DO, LSE, DELTA, CQ, DR,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_rh, stride_rn, stride_uh, stride_vbh, stride_dob, stride_doh, stride_dom, stride_drh, stride_drn,
    B, H, L, M, R, WINDOW, MEM_OFFSET, scale, qk_scale, NUM_SLOTS,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid ``(Hk, cdiv(R, BLOCK_R), BLOCK_D // BLOCK_DC)``: rows ``[d0, d0 + BLOCK_R)`` and one block of
    ``BLOCK_DC`` columns of ``dr[g]``, summed in a fixed order over batches, the query heads of g, query blocks,
    and (row ``R - 1``) the dq kernel's partials CQ."""
    g = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    d0 = pid_d * BLOCK_R
    offs_c = tl.program_id(2) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    mask_c = offs_c < D
    r_base = R_ + g * stride_rh
    acc = tl.zeros([BLOCK_R, BLOCK_DC], tl.float32)
    clamped = tl.zeros([BLOCK_DC], tl.float32)
    owns_clamped_row = (d0 <= R - 1) & (R - 1 < d0 + BLOCK_R)
    for batch in range(B):
        b = tl.cast(batch, tl.int64)
        k_base = K + b * stride_kb + g * stride_kh
        v_base = V + b * stride_vb + g * stride_vh
        for head in range(H):
            if tl.load(KV_HEAD + head) == g:
                h = tl.cast(head, tl.int64)
                q_base = Q + b * stride_qb + h * stride_qh
                do_base = DO + b * stride_dob + h * stride_doh
                u_row = U + h * stride_uh
                vb_row = VB + h * stride_vbh
                for i0 in range(0, L, BLOCK_M):
                    # query i meets distance d at segment key M + i - d and memory key M + i + MEM_OFFSET - d
                    j_segment = M + i0 - d0 - (BLOCK_R - 1)
                    j_memory = j_segment + MEM_OFFSET
                    need_segment = (d0 < R - 1) & _band_needed(j_segment, M, M + L, i0, L, M, WINDOW, BLOCK_M, BLOCK_R)
                    need_memory = (d0 < R - 1) & _band_needed(j_memory, 0, M, i0, L, M, WINDOW, BLOCK_M, BLOCK_R)
                    if need_segment | need_memory:
                        offs_i = i0 + tl.arange(0, BLOCK_M)
                        lse2, delta = _row_stats(LSE, DELTA, (b * H + h) * L, offs_i, L)
                        if need_segment:
                            acc = _dr_band(acc, q_base, u_row, vb_row, do_base, lse2, delta, k_base, v_base, r_base,
                                           stride_qm, stride_dom, stride_kn, stride_vn, stride_rn, offs_i, offs_c,
                                           mask_c, i0, d0, j_segment, M, M + L, 0, L, M, R, WINDOW, scale, qk_scale,
                                           D, BLOCK_M, BLOCK_R, BLOCK_T, BLOCK_W, BLOCK_D, BLOCK_DC, PRECISION)
                        if need_memory:
                            acc = _dr_band(acc, q_base, u_row, vb_row, do_base, lse2, delta, k_base, v_base, r_base,
                                           stride_qm, stride_dom, stride_kn, stride_vn, stride_rn, offs_i, offs_c,
                                           mask_c, i0, d0, j_memory, 0, M, MEM_OFFSET, L, M, R, WINDOW, scale,
                                           qk_scale, D, BLOCK_M, BLOCK_R, BLOCK_T, BLOCK_W, BLOCK_D, BLOCK_DC,
                                           PRECISION)
                if owns_clamped_row:
                    for slot in range(NUM_SLOTS):
                        clamped += tl.load(CQ + ((b * NUM_SLOTS + slot) * H + h) * D + offs_c, mask=mask_c, other=0.0)
    acc += tl.where((tl.arange(0, BLOCK_R) == R - 1 - d0)[:, None], clamped[None, :], 0.0)
    store_rows(DR + g * stride_drh, d0, R, stride_drn, offs_c, mask_c, acc, BLOCK_R)


def rel_memory_attention_bwd(grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale):
    """Backward. grad_out ``[B, H, L, D]`` in q.dtype; out ``[B, H, L, D]`` float32 and lse ``[B, H, L]`` float32
    from the forward (``float32_out=True``); the other arguments as in :func:`rel_memory_attention_fwd`.

    -> (dq, dk, dv, dr, du, dvb), each with its input's shape and dtype. Deterministic (no atomics) under
    ``MEMTX_DETERMINISTIC=1`` or ``torch.use_deterministic_algorithms(True)``. Launches on the inputs' GPU.
    """
    if out.dtype != torch.float32 or grad_out.dtype != q.dtype:
        raise TypeError(f"rel_memory_attention_bwd: out must be the forward's float32 out (float32_out=True) and "
                        f"grad_out in q's dtype {q.dtype}; got out {out.dtype}, grad_out {grad_out.dtype}")
    with on_device(q):
        return _backward(grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale)


def _backward(grad_out, q, k, v, r, u, vb, out, lse, kv_head_index, window, mem_offset, scale):
    B, H, L, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    M, R = K - L, r.shape[1]
    q, k, v, r, grad_out, out = (aligned_rows(t) for t in (q, k, v, r, grad_out, out))  # streamed rows, aligned
    kv_head_index = kv_head_index.contiguous()  # the kernels read KV_HEAD[h] without a stride
    window = window if window > 0 else K + 1
    block_d = max(16, triton.next_power_of_2(D))
    precision = dot_precision(q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)
    common_strides = (
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), r.stride(0), r.stride(1), u.stride(0), vb.stride(0),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
    )

    delta = torch.empty(B, H, L, **f32)
    _bwd_preprocess[(B * H, triton.cdiv(L, 64))](
        out, grad_out, delta, out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), H, L, D=D, BLOCK_M=64, BLOCK_D=block_d,
    )

    dk = torch.empty(B, Hk, K, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, Hk, K, D, dtype=v.dtype, device=v.device)
    grid = lambda meta: (B * Hk, triton.cdiv(M, meta["BLOCK_N"]) + triton.cdiv(L, meta["BLOCK_N"]))  # noqa: E731
    _bwd_dkdv_kernel[grid](
        q, k, v, r, u, vb, kv_head_index, grad_out, lse, delta, dk, dv, *common_strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
        H, Hk, L, M, R, window, mem_offset, scale, scale * LOG2E, D=D, BLOCK_D=block_d,
        BLOCK_DC=column_block(block_d), PRECISION=precision,
    )

    is_deterministic = deterministic()
    dq = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    num_slots = triton.cdiv(L, smallest_block(_bwd_dq_kernel, "BLOCK_M"))
    du_part, dvb_part, cq_part = (torch.zeros(B, num_slots, H, D, **f32) for _ in range(3))
    dr_acc = torch.zeros(Hk, R, D, **f32)
    grid = lambda meta: (B * H, triton.cdiv(L, meta["BLOCK_M"]))  # noqa: E731
    _bwd_dq_kernel[grid](
        q, k, v, r, u, vb, kv_head_index, grad_out, lse, delta, dq, du_part, dvb_part, dr_acc, cq_part,
        *common_strides, dq.stride(0), dq.stride(1), dq.stride(2), dr_acc.stride(0), dr_acc.stride(1),
        H, Hk, L, M, R, window, mem_offset, scale, scale * LOG2E, num_slots,
        D=D, BLOCK_D=block_d, PRECISION=precision, DETERMINISTIC=is_deterministic,
    )

    if is_deterministic:
        dr = torch.empty(Hk, R, D, dtype=r.dtype, device=r.device)
        block_dc = column_block(block_d)
        grid = lambda meta: (Hk, triton.cdiv(R, meta["BLOCK_R"]), block_d // block_dc)  # noqa: E731
        _bwd_dr_kernel[grid](
            q, k, v, r, u, vb, kv_head_index, grad_out, lse, delta, cq_part, dr, *common_strides,
            dr.stride(0), dr.stride(1), B, H, L, M, R, window, mem_offset, scale, scale * LOG2E, num_slots,
            D=D, BLOCK_D=block_d, BLOCK_DC=block_dc, PRECISION=precision,
        )
    else:
        dr = dr_acc.to(r.dtype)
    du = du_part.sum((0, 1)).to(u.dtype)
    dvb = dvb_part.sum((0, 1)).to(vb.dtype)
    return dq, dk, dv, dr, du, dvb
