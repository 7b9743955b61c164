// Forward pass of the CUDA relative-position memory attention (SPEC §1); shared pieces in
// rel_memory_attention_common.cuh (notation there).
//
//   fwd_kernel   grid (query blocks x key_splits, H, B): online softmax over the visible key blocks of one query
//                block, or over one of key_splits contiguous parts of them. Unsplit it writes out (of dtype, or
//                float32 for the backward, 16-bit P.V then in two parts: P rounded, and what the rounding lost) and
//                lse (float32, natural log). Split (flash-decoding, for calls whose query blocks cannot fill the
//                device: decoding, short segments, small batches) each part writes its unnormalised float32 out and
//                its row max and row sum (log2 units) to the partials part_o [S, B*H*L, D], part_ml [S, 2, B*H*L].
//   merge_key_splits_kernel   grid (cdiv(B*H*L*D, 256)): one thread per element of out: the parts' outputs weighted
//                by 2^(max_s - max), over the weighted sum of their row sums; lse from the same sums. A part that
//                saw no key (max -inf, sum 0) weighs 0. Extra traffic: 2 S B H L (D + 2) floats, against the
//                K, V and r rows (K D elements each per kv head and batch) the parts read once between them.
#pragma once

#include "rel_memory_attention_common.cuh"

namespace memtx {
namespace cuda {
namespace kernels {

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

template <class P, class Cfg>
MEMTX_KERNEL(Cfg::THREADS) fwd_kernel(const KernelArgs args) {
  using Elem = typename P::Elem;
  constexpr int LD = SmemLayout<Elem, Cfg>::LD;
  const RelAttnProblem& p = args.p;
  const Smem<Elem, Cfg> sm{dynamic_smem()};
  const int splits = args.fwd.key_splits, split = blockIdx.x % splits;
  const int qb = gridDim.x / splits - 1 - blockIdx.x / splits;  // longest rows first
  const int h = blockIdx.y, b = blockIdx.z, i0 = qb * Cfg::BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool out_float32 = args.fwd.out_float32;
  Elem* out = static_cast<Elem*>(args.fwd.out);
  float* out32 = static_cast<float*>(args.fwd.out);
  const int64_t g64 = p.kv_head[h];
  if (g64 < 0 || g64 >= p.Hk) {
    if (splits > 1) return;  // the merge writes the NaN rows
    if (out_float32)
      fill_nan_rows<float, Cfg>(out32, args.fwd.lse, p, b, h, i0);
    else
      fill_nan_rows<Elem, Cfg>(out, args.fwd.lse, p, b, h, i0);
    return;
  }
  const int g = int(g64);

  load_query_tile<Elem, Cfg>(sm.q(), p.q, args.vec.q, p, b, h, i0);
  load_bias<Elem, Cfg::DP, Cfg::THREADS>(sm.bias_u(), static_cast<const Elem*>(p.u) + h * p.D, p.D);
  load_bias<Elem, Cfg::DP, Cfg::THREADS>(sm.bias_vb(), static_cast<const Elem*>(p.vb) + h * p.D, p.D);

  float o[Cfg::NTD][4];
  zero_acc(o);
  float m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
  const KeyBlockRange visible = visible_key_blocks(p, i0, Cfg::BM, Cfg::BN);
  const int n_visible = visible.end - visible.first;
  const int kb_end = visible.first + int(int64_t(n_visible) * (split + 1) / splits);
  for (int kbi = visible.first + int(int64_t(n_visible) * split / splits); kbi < kb_end; ++kbi) {
    const KeyBlock kb = key_block(p, kbi, Cfg::BN);
    __syncthreads();  // the previous tiles are consumed
    load_key_tile<Elem, Cfg>(sm.k(), p.k, args.vec.k, p, b, g, kb);
    load_key_tile<Elem, Cfg>(sm.v(), p.v, args.vec.v, p, b, g, kb);
    load_window<Elem, Cfg>(sm.rw(), args.vec.r, p, g, top_distance(p, i0, Cfg::BM, kb));
    cp_async_wait_all();
    __syncthreads();

    float s[Cfg::NT][4];
    warp_scores<P, Cfg>(s, sm, p, i0, kb, warp, lane);
    softmax_step(s, m, l, o);
    const Elem* vt = sm.v();
    const auto pv = [&] {
      warp_mma<P, Cfg::BN, Cfg::NTD>(
          o, [&](int k0) { return P::acc_to_a(s, k0 / P::KS); },
          [&](int k0, int nt) { return P::load_b_t_acc2(vt + 8 * nt, LD, k0, lane); });
    };
    pv();
    if constexpr (sizeof(Elem) == 2) {
      // Training (out_float32): P.V again with what rounding P to 16 bits lost, so that out is the average of V
      // under the P the backward recomputes (delta = dO . out must be sum_j P dP, or dS = P (dP - delta)
      // carries up to 2^-9 |dP| of error in bfloat16, which swamps it where dP - delta cancels).
      if (out_float32) {
#pragma unroll
        for (int nt = 0; nt < Cfg::NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[nt][e] -= to_float(from_float<Elem>(s[nt][e]));
        pv();
      }
    }
  }

  const int64_t row0 = (int64_t(b) * p.H + h) * p.L;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = l[r];
    sum += shfl_xor(sum, 1);
    sum += shfl_xor(sum, 2);
    const int i = i0 + 16 * warp + (lane >> 2) + 8 * r;
    if (i >= p.L) continue;
    if (splits > 1) {
      const int64_t rows = int64_t(p.B) * p.H * p.L, part_row = split * rows + row0 + i;
#pragma unroll
      for (int nt = 0; nt < Cfg::NTD; ++nt)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          const int d = acc_col(lane, nt, e);
          if (d < p.D) args.fwd.part_o[part_row * p.D + d] = o[nt][e];
        }
      if ((lane & 3) == 0) {
        args.fwd.part_ml[2 * split * rows + row0 + i] = m[r];
        args.fwd.part_ml[(2 * split + 1) * rows + row0 + i] = sum;
      }
      continue;
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int nt = 0; nt < Cfg::NTD; ++nt)
#pragma unroll
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        const int d = acc_col(lane, nt, e);
        if (d >= p.D) continue;
        if (out_float32)
          out32[(row0 + i) * p.D + d] = o[nt][e] * inv;
        else
          out[(row0 + i) * p.D + d] = from_float<Elem>(o[nt][e] * inv);
      }
    if ((lane & 3) == 0) args.fwd.lse[row0 + i] = (m[r] + log2f(sum)) * kLn2;
  }
}

constexpr int kMergeThreads = 256;

// out and lse from the key_splits partials of fwd_kernel; see the header. Elem: q's dtype (out is float32 with
// out_float32).
template <class Elem>
MEMTX_KERNEL(kMergeThreads) merge_key_splits_kernel(const KernelArgs args) {
  const RelAttnProblem& p = args.p;
  const int64_t rows = int64_t(p.B) * p.H * p.L;
  const int64_t e = int64_t(blockIdx.x) * kMergeThreads + threadIdx.x;
  if (e >= rows * p.D) return;
  const int64_t row = e / p.D;
  const int h = int(row / p.L % p.H);
  const float* part_ml = args.fwd.part_ml;
  const int splits = args.fwd.key_splits;
  float value = quiet_nan(), lse = quiet_nan();
  if (p.kv_head[h] >= 0 && p.kv_head[h] < p.Hk) {
    float m = kNegInf;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, part_ml[2 * s * rows + row]);
    float total = 0.f, acc = 0.f;
    for (int s = 0; s < splits; ++s) {
      const float m_s = part_ml[2 * s * rows + row];
      const float weight = m_s == kNegInf ? 0.f : exp2f(m_s - m);  // every row sees its own key: m is finite
      total += part_ml[(2 * s + 1) * rows + row] * weight;
      acc += args.fwd.part_o[s * rows * p.D + e] * weight;
    }
    value = acc / total;
    lse = (m + log2f(total)) * kLn2;
  }
  if (args.fwd.out_float32)
    static_cast<float*>(args.fwd.out)[e] = value;
  else
    static_cast<Elem*>(args.fwd.out)[e] = from_float<Elem>(value);
  if (e % p.D == 0) args.fwd.lse[row] = lse;
}

}  // namespace kernels
}  // namespace cuda
}  // namespace memtx
