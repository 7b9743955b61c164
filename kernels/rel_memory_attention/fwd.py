"""Forward of relative-position memory attention: online softmax over the visible key blocks."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..utils import autotune_tiles, dot_precision, load_rows, store_rows, tile_scores

LOG2E = math.log2(math.e)

# {largest BLOCK_D: [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]}
FWD_CONFIGS = {
    64: [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
    128: [(64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2)],
    256: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
}


@triton.jit
def _fwd_tile(acc, m_i, l_i, qu, qv, k_base, v_base, r_base, stride_kn, stride_vn, stride_rn,
              offs_i, offs_d, mask_d, i0, j0, j_hi, offset, L, M, R, WINDOW, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr):
    """One key block ``[j0, j0 + BLOCK_N)`` (keys past ``j_hi`` masked; ``offset`` added to its distances)."""
    k = load_rows(k_base, j0, j0, j_hi, stride_kn, offs_d, mask_d, BLOCK_N)
    v = load_rows(v_base, j0, j0, j_hi, stride_vn, offs_d, mask_d, BLOCK_N)
    s, _ = tile_scores(qu, qv, k, r_base, stride_rn, offs_d, mask_d, offs_i, i0, j0, j0, j_hi, offset,
                       L, M, R, WINDOW, qk_scale, BLOCK_M, BLOCK_N, BLOCK_W, PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@autotune_tiles(FWD_CONFIGS)
@triton.jit
def _fwd_kernel(
    Q, K, V, R_, U, VB, KV_HEAD, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_rh, stride_rn, stride_uh, stride_vbh, stride_ob, stride_oh, stride_om,
    H, HK, L, M, R, D, WINDOW, MEM_OFFSET, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid ``(cdiv(L, BLOCK_M), B * H)``: one query block of one (batch, head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    g = tl.load(KV_HEAD + h).to(tl.int64)
    g_valid = (g >= 0) & (g < HK)  # unchecked under torch.compile: a bad index gives NaN, never a stray read
    g = tl.where(g_valid, g, 0)
    i0 = pid_m * BLOCK_M
    offs_i = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D

    q = load_rows(Q + b * stride_qb + h * stride_qh, i0, 0, L, stride_qm, offs_d, mask_d, BLOCK_M)
    u = tl.load(U + h * stride_uh + offs_d, mask=mask_d, other=0.0)
    vb = tl.load(VB + h * stride_vbh + offs_d, mask=mask_d, other=0.0)
    qu = (q.to(tl.float32) + u[None, :].to(tl.float32)).to(q.dtype)
    qv = (q.to(tl.float32) + vb[None, :].to(tl.float32)).to(q.dtype)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh
    r_base = R_ + g * stride_rh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # visible keys of the block: [lo, hi]; memory blocks tile [0, M), segment blocks tile [M, M + L)
    hi = M + tl.minimum(i0 + BLOCK_M, L) - 1
    lo = tl.maximum(M + i0 - WINDOW + 1, 0)
    for j0 in range(lo // BLOCK_N * BLOCK_N, tl.minimum(hi + 1, M), BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qu, qv, k_base, v_base, r_base, stride_kn, stride_vn, stride_rn,
                                  offs_i, offs_d, mask_d, i0, j0, M, MEM_OFFSET, L, M, R, WINDOW, qk_scale,
                                  BLOCK_M, BLOCK_N, BLOCK_W, PRECISION)
    for j0 in range(M + (tl.maximum(lo, M) - M) // BLOCK_N * BLOCK_N, hi + 1, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qu, qv, k_base, v_base, r_base, stride_kn, stride_vn, stride_rn,
                                  offs_i, offs_d, mask_d, i0, j0, M + L, 0, L, M, R, WINDOW, qk_scale,
                                  BLOCK_M, BLOCK_N, BLOCK_W, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows past L see no key
    out = tl.where(g_valid, acc / l_safe[:, None], float("nan"))
    store_rows(O + b * stride_ob + h * stride_oh, i0, L, stride_om, offs_d, mask_d, out, BLOCK_M)
    lse = tl.where(g_valid, (m_i + tl.math.log2(l_safe)) / 1.4426950408889634, float("nan"))
    tl.store(LSE + pid_bh.to(tl.int64) * L + offs_i, lse, mask=offs_i < L)


def rel_memory_attention_fwd(q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale):
    """Forward. q ``[B, H, L, D]``; k, v ``[B, Hk, M + L, D]``; r ``[Hk, R, D]``; u, vb ``[H, D]``;
    kv_head_index ``[H]`` int64; ``window`` (0: none), ``mem_offset``, ``scale``.

    -> (out ``[B, H, L, D]`` in q.dtype, lse ``[B, H, L]`` float32, natural log of the softmax denominators).
    Every tensor needs a unit last stride; other strides are arbitrary.
    """
    B, H, L, D = q.shape
    M = k.shape[2] - L
    kv_head_index = kv_head_index.contiguous()  # the kernel reads KV_HEAD[h] without a stride
    out = torch.empty(B, H, L, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(L, meta["BLOCK_M"]), B * H)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, r, u, vb, kv_head_index, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), r.stride(0), r.stride(1), u.stride(0), vb.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        H, k.shape[1], L, M, r.shape[1], D, window if window > 0 else M + L + 1, mem_offset, scale * LOG2E,
        BLOCK_D=max(16, triton.next_power_of_2(D)), PRECISION=dot_precision(q.dtype),
    )
    return out, lse
