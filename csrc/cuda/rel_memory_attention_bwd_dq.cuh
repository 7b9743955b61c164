// Backward pass of the CUDA relative-position memory attention over query blocks (SPEC §1).
//
//   dq_kernel    grid (query blocks, H, B): recomputes P and dS = scale P (dP - delta); writes dq; du, dvb
//                partials per block (column sums of dq's content and position parts; deterministic);
//                dr = Band^T (q + vb) per tile through float32 atomics, rows at the clamp (distance >= R - 1)
//                summed in shared memory first (one atomic per column per block).
#pragma once

#include "rel_memory_attention_bwd.cuh"

namespace memtx {
namespace cuda {
namespace kernels {

// ---------------------------------------------------------------------------------------------------------
// Backward: dq, du, dvb, dr (grid over query blocks)
// ---------------------------------------------------------------------------------------------------------

// dr window rows: acc = Band^T (q + vb) for window rows [16 mt, 16 mt + 16) and head-dim columns
// [n0, n0 + 32); Band[ii][w] = dS(ii, w - (BM - 1 - ii)) is sm.band2. Results go to dr_acc[g] with float32
// atomics, except rows at or past the clamp (distance >= R - 1), which are summed into sm.tail.
template <class P, class Cfg>
MEMTX_DEVICE void block_dr(const Smem<typename P::Elem, Cfg>& sm, const RelAttnProblem& p, float* dr_acc, int g,
                           int64_t dtop, int warp, int lane) {
  using Elem = typename P::Elem;
  using Lay = SmemLayout<Elem, Cfg>;
  constexpr int MT = Cfg::WIN / 16, NCH = Cfg::DP / 32;
  const Elem* band2 = sm.band2();
  const Elem* q = sm.q();
  const float* bias_vb = sm.bias_vb();
  float* dr_g = dr_acc + int64_t(g) * p.R * p.D;
  for (int task = warp; task < MT * NCH; task += Cfg::NW) {
    const int w0 = 16 * (task % MT), n0 = 32 * (task / MT);
    // Band rows ii with a nonzero entry in window rows [w0, w0 + 16): BM - 16 - w0 <= ii <= BM + BN - 2 - w0.
    const int lo = imax(0, Cfg::BM - 16 - w0) / P::KS * P::KS;
    const int hi = imin(Cfg::BM, Cfg::BM + Cfg::BN - 1 - w0);
    float acc[4][4];
    zero_acc(acc);
    for (int k0 = lo; k0 < hi; k0 += P::KS) {
      const typename P::FragA a = P::load_a_t(band2 + w0, Lay::LDB2, k0, lane);
#pragma unroll
      for (int nt = 0; nt < 4; nt += 2) {
        const typename P::FragB2 b = P::load_b_t2(q + n0 + 8 * nt, Lay::LD, k0, bias_vb + n0 + 8 * nt, lane);
        P::mma(acc[nt], a, b.f[0]);
        P::mma(acc[nt + 1], a, b.f[1]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float val = acc[nt][e];
        const int d = n0 + acc_col(lane, nt, e);
        if (val == 0.f || d >= p.D) continue;
        const int64_t dist = dtop - (w0 + acc_row(lane, e));
        if (dist >= p.R - 1)
          atomicAdd(sm.tail() + d, val);
        else if (dist >= 0)
          atomicAdd(dr_g + dist * p.D + d, val);
      }
  }
}

// Sums of this warp's accumulator rows per column, into dst[0, DP) (written by lanes 0..3).
template <int NTD>
MEMTX_DEVICE void warp_column_sums(float* dst, const float (&acc)[NTD][4], int lane) {
#pragma unroll
  for (int nt = 0; nt < NTD; ++nt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      float v = acc[nt][c] + acc[nt][c + 2];  // rows g and g + 8
      v += shfl_xor(v, 4);
      v += shfl_xor(v, 8);
      v += shfl_xor(v, 16);
      if (lane < 4) dst[acc_col(lane, nt, c)] = v;
    }
}

template <class P, class Cfg>
MEMTX_KERNEL(Cfg::THREADS) dq_kernel(const KernelArgs args) {
  using Elem = typename P::Elem;
  using Lay = SmemLayout<Elem, Cfg>;
  constexpr int LD = Lay::LD;
  const RelAttnProblem& p = args.p;
  const Smem<Elem, Cfg> sm{dynamic_smem()};
  const int qb = gridDim.x - 1 - blockIdx.x, n_qb = gridDim.x;
  const int h = blockIdx.y, b = blockIdx.z, i0 = qb * Cfg::BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t part = (int64_t(b) * n_qb + qb) * p.H + h;  // du/dvb partial row
  const int64_t g64 = p.kv_head[h];
  if (g64 < 0 || g64 >= p.Hk) {
    fill_nan_rows<Elem, Cfg>(static_cast<Elem*>(args.bwd.dq), nullptr, p, b, h, i0);
    for (int d = threadIdx.x; d < p.D; d += Cfg::THREADS)
      args.bwd.du_part[part * p.D + d] = args.bwd.dvb_part[part * p.D + d] = quiet_nan();
    return;
  }
  const int g = int(g64);

  // The band's triangles outside each row's BN columns stay zero; the band cells are rewritten per tile.
  for (int c = threadIdx.x; c < Cfg::BM * Lay::LDB2; c += Cfg::THREADS) sm.band2()[c] = from_float<Elem>(0.f);
  for (int d = threadIdx.x; d < Cfg::DP; d += Cfg::THREADS) sm.tail()[d] = 0.f;
  load_backward_rows<Elem, Cfg>(sm, args, b, h, i0);

  // dq = dq_c + dq_p (content and position parts, scaled); du sums dq_c over rows, dvb sums dq_p.
  float dq_c[Cfg::NTD][4], dq_p[Cfg::NTD][4];
  zero_acc(dq_c);
  zero_acc(dq_p);
  const int base_w = Cfg::BM - 16 - 16 * warp;
  Elem* band_rows = sm.band2() + 16 * warp * Lay::LDB2;  // this warp's rows of the dS band
  const int n_kb = num_key_blocks(p, Cfg::BN);
  for (int kbi = 0; kbi < n_kb; ++kbi) {
    const KeyBlock kb = key_block(p, kbi, Cfg::BN);
    if (!tile_visible(p, i0, Cfg::BM, kb)) continue;
    const int64_t dtop = top_distance(p, i0, Cfg::BM, kb);
    __syncthreads();  // the previous tiles and band are consumed
    load_key_tile<Elem, Cfg>(sm.k(), p.k, args.vec.k, p, b, g, kb);
    load_key_tile<Elem, Cfg>(sm.v(), p.v, args.vec.v, p, b, g, kb);
    load_window<Elem, Cfg>(sm.rw(), args.vec.r, p, g, dtop);
    cp_async_wait_all();
    __syncthreads();

    float ds[Cfg::NT][4], unused[Cfg::NT][4];
    warp_dscores<P, Cfg, false>(ds, unused, sm, p, i0, kb, warp, lane);
    // content term: dq_c += dS k
    const Elem* kt = sm.k();
    warp_mma<P, Cfg::BN, Cfg::NTD>(
        dq_c, [&](int k0) { return P::acc_to_a(ds, k0 / P::KS); },
        [&](int k0, int nt) { return P::load_b_t_acc2(kt + 8 * nt, LD, k0, lane); });
    // dS into the band: row a of this warp, window column BM - 1 - (16 warp + a) + jj = base_w + 15 - a + jj
#pragma unroll
    for (int nt = 0; nt < Cfg::NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int a = acc_row(lane, e);
        band_rows[a * Lay::LDB2 + base_w + 15 - a + acc_col(lane, nt, e)] = from_float<Elem>(ds[nt][e]);
      }
    __syncwarp();
    // position term: dq_p += Band_w rw over this warp's window slab
    const Elem* slab = sm.rw() + base_w * LD;
    warp_mma<P, Cfg::BN + 16, Cfg::NTD>(
        dq_p, [&](int k0) { return P::load_a(band_rows + base_w, Lay::LDB2, k0, nullptr, lane); },
        [&](int k0, int nt) { return P::load_b_t2(slab + 8 * nt, LD, k0, nullptr, lane); });
    __syncthreads();  // the whole band is written
    block_dr<P, Cfg>(sm, p, args.bwd.dr_acc, g, dtop, warp, lane);
  }

  // dq rows (dS already carries the scale); rows past L are zero and not written
  Elem* dq_out = static_cast<Elem*>(args.bwd.dq);
  const int64_t row0 = (int64_t(b) * p.H + h) * p.L;
#pragma unroll
  for (int nt = 0; nt < Cfg::NTD; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i0 + 16 * warp + acc_row(lane, e), d = acc_col(lane, nt, e);
      if (i < p.L && d < p.D) dq_out[(row0 + i) * p.D + d] = from_float<Elem>(dq_c[nt][e] + dq_p[nt][e]);
    }
  // du, dvb partials of this block: column sums over its rows, warps combined in a fixed order
  warp_column_sums(sm.colsum(0, warp), dq_c, lane);
  warp_column_sums(sm.colsum(1, warp), dq_p, lane);
  __syncthreads();  // column sums and every tail contribution are in
  for (int d = threadIdx.x; d < p.D; d += Cfg::THREADS) {
    float du = 0.f, dvb = 0.f;
    for (int w = 0; w < Cfg::NW; ++w) {
      du += sm.colsum(0, w)[d];
      dvb += sm.colsum(1, w)[d];
    }
    args.bwd.du_part[part * p.D + d] = du;
    args.bwd.dvb_part[part * p.D + d] = dvb;
  }
  float* dr_last = args.bwd.dr_acc + (int64_t(g) * p.R + p.R - 1) * p.D;
  for (int d = threadIdx.x; d < p.D; d += Cfg::THREADS)
    if (sm.tail()[d] != 0.f) atomicAdd(dr_last + d, sm.tail()[d]);
}

}  // namespace kernels
}  // namespace cuda
}  // namespace memtx
