// Forward pass of the CUDA relative-position memory attention (SPEC §1); shared pieces in
// rel_memory_attention_common.cuh (notation there).
//
//   fwd_kernel   grid (query blocks, H, B): online softmax, writes out (of dtype, or float32 for the backward,
//                16-bit P.V then in two parts: P rounded, and what the rounding lost) and lse (float32, natural log).
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
  const int qb = gridDim.x - 1 - blockIdx.x;  // longest rows first
  const int h = blockIdx.y, b = blockIdx.z, i0 = qb * Cfg::BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool out_float32 = args.fwd.out_float32;
  Elem* out = static_cast<Elem*>(args.fwd.out);
  float* out32 = static_cast<float*>(args.fwd.out);
  const int64_t g64 = p.kv_head[h];
  if (g64 < 0 || g64 >= p.Hk) {
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
  const int n_kb = num_key_blocks(p, Cfg::BN);
  for (int kbi = 0; kbi < n_kb; ++kbi) {
    const KeyBlock kb = key_block(p, kbi, Cfg::BN);
    if (!tile_visible(p, i0, Cfg::BM, kb)) continue;
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
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    const int i = i0 + 16 * warp + (lane >> 2) + 8 * r;
    if (i >= p.L) continue;
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

}  // namespace kernels
}  // namespace cuda
}  // namespace memtx
