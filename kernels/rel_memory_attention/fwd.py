"""Forward of relative-position memory attention: online softmax over the visible key blocks."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..utils import (
    aligned_rows,
    autotune_tiles,
    dot_precision,
    load_rows,
    on_device,
    smallest_block,
    store_rows,
    tile_scores,
)

LOG2E = math.log2(math.e)

# {dtype kind: {largest BLOCK_D: [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]}}. Chosen with the ahead-of-time
# compile check (`make check-aot`, bench/results/triton-aot-3.6.0.md): every config fits sm_80's shared memory and
# the 16-bit ones compile without spills for sm_80 and sm_90 (sm_80, without wgmma, needs more registers). The
# position band ([BLOCK_M, BLOCK_W] float32) is what fills the registers: 64-query tiles spill on sm_80 but for
# 64 x 32 at D = 128, and 128-query tiles spill at any width.
FWD_CONFIGS = {
    "16bit": {
        64: [(32, 64, 8, 2), (32, 64, 4, 2), (32, 32, 8, 2)],
        128: [(32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2)],
        256: [(32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 8, 2)],
    },
    "fp32": {  # twice the bytes per tile: smaller tiles
        64: [(32, 64, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2)],
        128: [(32, 32, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)],
        256: [(16, 32, 8, 1), (16, 16, 8, 2)],
    },
}


@triton.jit
def _fwd_tile(acc, m_i, l_i, qu, qv, k_base, v_base, r_base, stride_kn, stride_vn, stride_rn,
              offs_i, offs_d, mask_d, i0, j0, j_hi, offset, L, M, R, WINDOW, qk_scale,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PRECISION: tl.constexpr,
              EXACT_PV: tl.constexpr):
    """One key block ``[j0, j0 + BLOCK_N)`` (keys past ``j_hi`` masked; ``offset`` added to its distances).

    ``EXACT_PV`` (16-bit inputs, training): P.V takes P as the sum of two 16-bit parts, so that O is the average
    of V under the very P the backward recomputes (one 16-bit P is off by up to 2^-9 in bfloat16, and the backward's
    delta = dO . O would miss sum_j P dP by that, which swamps dS where dP - delta cancels)."""
    k = load_rows(k_base, j0, j0, j_hi, stride_kn, offs_d, mask_d, BLOCK_N)
    v = load_rows(v_base, j0, j0, j_hi, stride_vn, offs_d, mask_d, BLOCK_N)
    s, _ = tile_scores(qu, qv, k, r_base, stride_rn, offs_d, mask_d, offs_i, i0, j0, j0, j_hi, offset,
                       L, M, R, WINDOW, qk_scale, BLOCK_M, BLOCK_N, BLOCK_W, PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    p_high = p.to(v.dtype)
    if EXACT_PV:
        p_low = (p - p_high.to(tl.float32)).to(v.dtype)
    acc = tl.dot(p_high, v, acc * alpha[:, None], input_precision=PRECISION)  # into acc: no second [BM, D] tile
    if EXACT_PV:
        acc = tl.dot(p_low, v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def visited_key_blocks(i0, L, M, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key blocks query block ``[i0, i0 + BLOCK_M)`` visits, memory blocks first (they tile ``[0, M)`` and carry
    the memory offset), then segment blocks (tiling ``[M, M + L)``) -> (first memory key, memory blocks, first
    segment key, all blocks). Block ``t`` starts at ``mem_first + t * BLOCK_N`` or ``seg_first + (t - n_mem) *
    BLOCK_N``."""
    hi = M + tl.minimum(i0 + BLOCK_M, L) - 1  # visible keys of the block: [lo, hi]
    lo = tl.maximum(M + i0 - WINDOW + 1, 0)
    mem_first = lo // BLOCK_N * BLOCK_N
    n_mem = tl.cdiv(tl.maximum(tl.minimum(hi + 1, M) - mem_first, 0), BLOCK_N)
    seg_first = M + (tl.maximum(lo, M) - M) // BLOCK_N * BLOCK_N
    n_seg = tl.cdiv(tl.maximum(hi + 1 - seg_first, 0), BLOCK_N)
    return mem_first, n_mem, seg_first, n_mem + n_seg


@autotune_tiles(FWD_CONFIGS, key=("D", "BLOCK_D", "PRECISION", "PARTIAL", "EXACT_PV"))
@triton.jit
def _fwd_kernel(
    Q, K, V, R_, U, VB, KV_HEAD, O, LSE, PART_O, PART_ML,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_rh, stride_rn, stride_uh, stride_vbh, stride_ob, stride_oh, stride_om,
    B, H, HK, L, M, R, WINDOW, MEM_OFFSET, qk_scale, SPLITS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, PARTIAL: tl.constexpr, EXACT_PV: tl.constexpr,
):
    """Grid ``(B * H, cdiv(L, BLOCK_M), SPLITS)``: one query block of one (batch, head), over one of ``SPLITS``
    parts of its key blocks. Without ``PARTIAL`` (one part) it writes ``O`` and ``LSE``; else (split-K,
    flash-decoding) its unnormalised output, row max and row sum (log2 units) go to ``PART_O [SPLITS, B * H, L,
    BLOCK_D]`` and ``PART_ML [SPLITS, 2, B * H, L]`` (float32) for :func:`_merge_key_splits_kernel`. ``EXACT_PV``:
    see :func:`_fwd_tile`."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
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
    mem_first, n_mem, seg_first, n_blocks = visited_key_blocks(i0, L, M, WINDOW, BLOCK_M, BLOCK_N)
    for t in range(n_blocks * split // SPLITS, n_blocks * (split + 1) // SPLITS):
        memory = t < n_mem
        j0 = tl.where(memory, mem_first + t * BLOCK_N, seg_first + (t - n_mem) * BLOCK_N)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qu, qv, k_base, v_base, r_base, stride_kn, stride_vn, stride_rn,
                                  offs_i, offs_d, mask_d, i0, j0, tl.where(memory, M, M + L),
                                  tl.where(memory, MEM_OFFSET, 0), L, M, R, WINDOW, qk_scale,
                                  BLOCK_M, BLOCK_N, BLOCK_W, PRECISION, EXACT_PV)

    if not PARTIAL:
        # every row < L sees its own key, so l_i is 0 only where its scores were all -inf (an inf input): out is then
        # 0 / 0, NaN as in the reference; the padding rows past L (0 / 0 too) are not stored
        out = tl.where(g_valid, acc / l_i[:, None], float("nan"))
        store_rows(O + b * stride_ob + h * stride_oh, i0, L, stride_om, offs_d, mask_d, out, BLOCK_M)
        lse = tl.where(g_valid, (m_i + tl.math.log2(l_i)) / 1.4426950408889634, float("nan"))
        tl.store(LSE + pid_bh.to(tl.int64) * L + offs_i, lse, mask=offs_i < L)
    else:
        rows = (split * B * H + pid_bh).to(tl.int64) * L  # first row of this (split, batch, head)
        store_rows(PART_O + rows * BLOCK_D, i0, L, BLOCK_D, offs_d, offs_d < BLOCK_D, acc, BLOCK_M)
        ml = (split * 2 * B * H + pid_bh).to(tl.int64) * L + offs_i  # [split, 0 (max) | 1 (sum), bh, i]
        tl.store(PART_ML + ml, m_i, mask=offs_i < L)
        # a bad kv head: a NaN sum, so that the merged out and lse are NaN
        tl.store(PART_ML + ml + B * H * L, tl.where(g_valid, l_i, float("nan")), mask=offs_i < L)


def key_splits(programs: int, keys: int, device: torch.device) -> int:
    """Parts of the key range per query block (flash-decoding): 1 when ``programs`` (query blocks x batch x heads)
    fill the GPU, else enough for about two programs per multiprocessor, at most one per 64 keys. Under the
    interpreter a GPU of four multiprocessors is assumed, so that small test problems take the split path too."""
    processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    if programs >= 2 * processors:
        return 1
    return max(1, min(triton.cdiv(2 * processors, programs), triton.cdiv(keys, 64)))


@triton.jit
def _merge_key_splits_kernel(PART_O, PART_ML, O, LSE, ROWS, SPLITS, D: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_R: tl.constexpr):
    """Grid ``(cdiv(ROWS, BLOCK_R),)``, ``ROWS = B * H * L``: rows of out ``[ROWS, D]`` (contiguous, its dtype) and
    lse ``[ROWS]`` from the ``SPLITS`` partials of :func:`_fwd_kernel`: every part's output weighted by
    ``2 ** (max_part - max)``, over the weighted sum of the row sums. A part that saw no visible key (max -inf,
    sum 0) weighs 0; a NaN sum (bad kv head) makes the row NaN."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < ROWS
    offs_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(PART_ML + 2 * s * ROWS + rows, mask=mask_r, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # rows past ROWS only: every row sees its own key
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(SPLITS):
        weight = tl.math.exp2(tl.load(PART_ML + 2 * s * ROWS + rows, mask=mask_r, other=float("-inf")) - m_safe)
        total += tl.load(PART_ML + (2 * s + 1) * ROWS + rows, mask=mask_r, other=0.0) * weight
        part = tl.load(PART_O + (s * ROWS + rows)[:, None] * BLOCK_D + offs_d[None, :], mask=mask_r[:, None],
                       other=0.0)
        acc += part * weight[:, None]
    total_safe = tl.where(mask_r, total, 1.0)
    out = acc / total_safe[:, None]
    tl.store(O + rows[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mask_r[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + rows, (m_safe + tl.math.log2(total_safe)) / 1.4426950408889634, mask=mask_r)


# Rows of out per program of _merge_key_splits_kernel, with 2 warps and no software pipelining: spill-free for every
# head dim on sm_80 and sm_90, where 4 warps (8 elements a thread at D = 64) spilled 4 bytes on sm_80 in 16 bits.
MERGE_ROWS = 16


def rel_memory_attention_fwd(q, k, v, r, u, vb, kv_head_index, window, mem_offset, scale, float32_out=False):
    """Forward. q ``[B, H, L, D]``; k, v ``[B, Hk, M + L, D]``; r ``[Hk, R, D]``; u, vb ``[H, D]``;
    kv_head_index ``[H]`` int64; ``window`` (0: none), ``mem_offset``, ``scale``.

    -> (out ``[B, H, L, D]`` in q.dtype, or float32 with ``float32_out`` (the out the backward reads: 16-bit
    inputs then also take P.V with P in two 16-bit parts, ``EXACT_PV``), lse ``[B, H, L]`` float32, natural log of
    the softmax denominators).
    Every tensor needs a unit last stride; other strides are arbitrary (q, k, v and r are streamed with rows
    aligned: :func:`aligned_rows`). When the query blocks of all batches and heads are too few to fill the GPU
    (decoding, short segments), each one's keys are split into parts computed by separate programs and merged
    (:func:`key_splits`).
    """
    B, H, L, D = q.shape
    M = k.shape[2] - L
    q, k, v, r = (aligned_rows(t) for t in (q, k, v, r))
    kv_head_index = kv_head_index.contiguous()  # the kernel reads KV_HEAD[h] without a stride
    out = torch.empty(B, H, L, D, dtype=torch.float32 if float32_out else q.dtype, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    splits = key_splits(B * H * triton.cdiv(L, smallest_block(_fwd_kernel, "BLOCK_M")), M + L, q.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    part_o = torch.empty((splits, B * H, L, block_d) if splits > 1 else (1,), **f32)
    part_ml = torch.empty((splits, 2, B * H, L) if splits > 1 else (1,), **f32)
    grid = lambda meta: (B * H, triton.cdiv(L, meta["BLOCK_M"]), splits)  # noqa: E731
    with on_device(q):
        _launch_forward(grid, q, k, v, r, u, vb, kv_head_index, out, lse, part_o, part_ml, window, mem_offset, scale,
                        splits, block_d, exact_pv=float32_out and q.dtype != torch.float32)
        if splits > 1:
            rows = B * H * L
            _merge_key_splits_kernel[(triton.cdiv(rows, MERGE_ROWS),)](
                part_o, part_ml, out, lse, rows, splits, D=D, BLOCK_D=block_d, BLOCK_R=MERGE_ROWS, num_warps=2,
                num_stages=1)
    return out, lse


def _launch_forward(grid, q, k, v, r, u, vb, kv_head_index, out, lse, part_o, part_ml, window, mem_offset, scale,
                    splits, block_d, exact_pv):
    B, H, L, D = q.shape
    M = k.shape[2] - L
    _fwd_kernel[grid](
        q, k, v, r, u, vb, kv_head_index, out, lse, part_o, part_ml,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), r.stride(0), r.stride(1), u.stride(0), vb.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        B, H, k.shape[1], L, M, r.shape[1], window if window > 0 else M + L + 1, mem_offset, scale * LOG2E, splits,
        D=D, BLOCK_D=block_d, PRECISION=dot_precision(q.dtype), PARTIAL=splits > 1, EXACT_PV=exact_pv,
    )
