// Backward pass of the CUDA relative-position memory attention over key blocks (SPEC §1).
//
//   dkv_kernel   grid (key blocks, Hk, B): loops over the query heads mapped to its kv head (any
//                kv_head_index) and the query blocks that see its keys; dk, dv accumulate in registers
//                (deterministic, no atomics; kv heads no query head reads get zeros).
#pragma once

#include "rel_memory_attention_bwd.cuh"

namespace memtx {
namespace cuda {
namespace kernels {

// ---------------------------------------------------------------------------------------------------------
// Backward: dk, dv (grid over key blocks)
// ---------------------------------------------------------------------------------------------------------

template <class P, class Cfg>
MEMTX_KERNEL(Cfg::THREADS) dkv_kernel(const KernelArgs args) {
  using Elem = typename P::Elem;
  using Lay = SmemLayout<Elem, Cfg>;
  constexpr int LD = Lay::LD;
  constexpr int SLABS = Cfg::BN / 16, SPLITS = Cfg::NW / SLABS, DPW = Cfg::DP / SPLITS, NTW = DPW / 8;
  static_assert(DPW % 8 == 0, "head-dim split");
  const RelAttnProblem& p = args.p;
  const Smem<Elem, Cfg> sm{dynamic_smem()};
  const int kbi = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slab = warp % SLABS, n0 = (warp / SLABS) * DPW;  // phase B: keys 16 slab .., columns n0 ..
  const KeyBlock kb = key_block(p, kbi, Cfg::BN);

  load_key_tile<Elem, Cfg>(sm.k(), p.k, args.vec.k, p, b, g, kb);
  load_key_tile<Elem, Cfg>(sm.v(), p.v, args.vec.v, p, b, g, kb);

  float dk[NTW][4], dv[NTW][4];
  zero_acc(dk);
  zero_acc(dv);
  const int n_qb = (p.L + Cfg::BM - 1) / Cfg::BM;
  for (int h = 0; h < p.H; ++h) {
    if (p.kv_head[h] != g) continue;
    for (int qb = 0; qb < n_qb; ++qb) {
      const int i0 = qb * Cfg::BM;
      if (!tile_visible(p, i0, Cfg::BM, kb)) continue;
      __syncthreads();  // the previous query tiles, P and dS are consumed
      load_backward_rows<Elem, Cfg>(sm, args, b, h, i0);
      load_window<Elem, Cfg>(sm.rw(), args.vec.r, p, g, top_distance(p, i0, Cfg::BM, kb));
      cp_async_wait_all();
      __syncthreads();

      // phase A (warp = 16 query rows): P and dS into shared memory
      {
        float ds[Cfg::NT][4], prob[Cfg::NT][4];
        warp_dscores<P, Cfg, true>(ds, prob, sm, p, i0, kb, warp, lane);
        Elem* pt = sm.p_tile() + 16 * warp * Lay::LDP;
        Elem* dst = sm.ds_tile() + 16 * warp * Lay::LDP;
#pragma unroll
        for (int nt = 0; nt < Cfg::NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int at = acc_row(lane, e) * Lay::LDP + acc_col(lane, nt, e);
            pt[at] = from_float<Elem>(prob[nt][e]);
            dst[at] = from_float<Elem>(ds[nt][e]);
          }
      }
      __syncthreads();

      // phase B (warp = 16 keys x DPW columns): dv += P^T dout, dk += dS^T (q + u)
      const Elem* dout = sm.dout() + n0;
      const Elem* q = sm.q() + n0;
      const float* bias_u = sm.bias_u() + n0;
      warp_mma<P, Cfg::BM, NTW>(
          dv, [&](int k0) { return P::load_a_t(sm.p_tile() + 16 * slab, Lay::LDP, k0, lane); },
          [&](int k0, int nt) { return P::load_b_t2(dout + 8 * nt, LD, k0, nullptr, lane); });
      warp_mma<P, Cfg::BM, NTW>(
          dk, [&](int k0) { return P::load_a_t(sm.ds_tile() + 16 * slab, Lay::LDP, k0, lane); },
          [&](int k0, int nt) { return P::load_b_t2(q + 8 * nt, LD, k0, bias_u + 8 * nt, lane); });
    }
  }

  cp_async_wait_all();  // no copy outlives the block (when no query block sees these keys)
  Elem* dk_out = static_cast<Elem*>(args.bwd.dk);
  Elem* dv_out = static_cast<Elem*>(args.bwd.dv);
  const int64_t row0 = (int64_t(b) * p.Hk + g) * p.K;
#pragma unroll
  for (int nt = 0; nt < NTW; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int j = kb.j0 + 16 * slab + acc_row(lane, e), d = n0 + acc_col(lane, nt, e);
      if (j < kb.j1 && d < p.D) {
        dk_out[(row0 + j) * p.D + d] = from_float<Elem>(dk[nt][e]);
        dv_out[(row0 + j) * p.D + d] = from_float<Elem>(dv[nt][e]);
      }
    }
}

}  // namespace kernels
}  // namespace cuda
}  // namespace memtx
