// Backward of the CUDA relative-position memory attention (SPEC §1): the delta kernel and the pieces the dq and
// dk/dv passes share (query-side tiles, recomputed dS). Shared with the forward: rel_memory_attention_common.cuh.
//
//   delta_kernel one warp per row: delta = rowsum(dout * out) in float32, from the forward's float32 out.
#pragma once

#include "rel_memory_attention_common.cuh"

namespace memtx {
namespace cuda {
namespace kernels {

// ---------------------------------------------------------------------------------------------------------
// Backward: delta = rowsum(dout * out)
// ---------------------------------------------------------------------------------------------------------

constexpr int kDeltaThreads = 128;

template <class Elem>
MEMTX_KERNEL(kDeltaThreads) delta_kernel(const KernelArgs args) {
  const RelAttnProblem& p = args.p;
  const int64_t row = int64_t(blockIdx.x) * (kDeltaThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= int64_t(p.B) * p.H * p.L) return;  // uniform per warp
  const int i = int(row % p.L), h = int((row / p.L) % p.H), b = int(row / (int64_t(p.L) * p.H));
  const Elem* x = row_of<Elem>(args.bwd.dout, b, h, i);
  const float* y = row_of<float>(args.bwd.out, b, h, i);
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) acc += to_float(x[d]) * to_float(y[d]);
#pragma unroll
  for (int m = 16; m >= 1; m >>= 1) acc += shfl_xor(acc, m);
  if (lane == 0) args.bwd.delta[row] = acc;
}

// Loads the query-side tiles of (b, h, i0) for the backward: q, dout, biases, lse and delta rows.
template <class Elem, class Cfg>
MEMTX_DEVICE void load_backward_rows(const Smem<Elem, Cfg>& sm, const KernelArgs& args, int b, int h, int i0) {
  const RelAttnProblem& p = args.p;
  load_query_tile<Elem, Cfg>(sm.q(), p.q, args.vec.q, p, b, h, i0);
  load_query_tile<Elem, Cfg>(sm.dout(), args.bwd.dout, args.vec.dout, p, b, h, i0);
  load_bias<Elem, Cfg::DP, Cfg::THREADS>(sm.bias_u(), static_cast<const Elem*>(p.u) + h * p.D, p.D);
  load_bias<Elem, Cfg::DP, Cfg::THREADS>(sm.bias_vb(), static_cast<const Elem*>(p.vb) + h * p.D, p.D);
  const int64_t row0 = (int64_t(b) * p.H + h) * p.L + i0;
  for (int r = threadIdx.x; r < Cfg::BM; r += Cfg::THREADS) {
    const bool in = i0 + r < p.L;
    sm.lse()[r] = in ? args.bwd.lse[row0 + r] : 0.f;
    sm.delta()[r] = in ? args.bwd.delta[row0 + r] : 0.f;
  }
}

// Recomputes this warp's dS (scaled, fp32, zero where masked) for the current tile; returns P in `prob` when
// asked (the dkv kernel needs it). Reads q, k, v, rw, dout, lse, delta from shared memory.
template <class P, class Cfg, bool kKeepProb>
MEMTX_DEVICE void warp_dscores(float (&ds)[Cfg::NT][4], float (&prob)[Cfg::NT][4],
                               const Smem<typename P::Elem, Cfg>& sm, const RelAttnProblem& p, int i0,
                               const KeyBlock& kb, int warp, int lane) {
  warp_scores<P, Cfg>(ds, sm, p, i0, kb, warp, lane);
  float lse2[2], delta[2];
  row_pair(lse2, sm.lse(), warp, lane, kLog2e);
  row_pair(delta, sm.delta(), warp, lane, 1.f);
  probabilities(ds, lse2);
  if (kKeepProb) {
#pragma unroll
    for (int nt = 0; nt < Cfg::NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) prob[nt][e] = ds[nt][e];
  }
  float dp[Cfg::NT][4];
  warp_dprob<P, Cfg>(dp, sm, warp, lane);
  softmax_grad(ds, dp, delta, p.scale);
}

}  // namespace kernels
}  // namespace cuda
}  // namespace memtx
