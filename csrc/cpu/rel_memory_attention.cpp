// Fused relative-position memory attention on the CPU (SPEC §1), forward and backward.
//
// Flash-style: a query block of kBlockM rows streams over key blocks of at most kBlockN keys with an
// online softmax; the backward recomputes the probabilities from the saved log-sum-exp. Within a tile the
// distances form a band of bm + n - 1 consecutive values, so the position term is one GEMM of the query
// block against that window of r rows, read back with a per-row shift. Key blocks never straddle the
// memory/segment boundary (memory keys carry mem_offset), and blocks with no visible key are skipped.
// Scratch is a few tiles per thread, plus one [Hk, R, D] partial of dr per batch chunk: nothing L x K.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/rel_memory_attention.h"
#include "blas.h"
#include "vec_ops.h"

namespace memtx {
namespace cpu {
namespace {

constexpr int64_t kBlockM = 64;                    // queries per tile
constexpr int64_t kBlockN = 512;                   // keys per tile
constexpr int64_t kWindow = kBlockM + kBlockN - 1;  // r rows a tile reads

struct KeyBlock {
  int64_t j0, j1;  // keys [j0, j1)
  int64_t offset;  // mem_offset for memory keys, 0 for segment keys
};

// Key blocks of [memory ; segment]; none straddles j = M.
std::vector<KeyBlock> key_blocks(const RelAttnShape& s) {
  std::vector<KeyBlock> blocks;
  for (int64_t j0 = 0; j0 < s.M; j0 += kBlockN) blocks.push_back({j0, std::min(j0 + kBlockN, s.M), s.mem_offset});
  for (int64_t j0 = s.M; j0 < s.K; j0 += kBlockN) blocks.push_back({j0, std::min(j0 + kBlockN, s.K), 0});
  return blocks;
}

// Strided view of one [*, *, rows, D] tensor (last dim contiguous).
template <typename T>
struct Strided4 {
  T* data;
  int64_t s0, s1, s2;
  explicit Strided4(const at::Tensor& t)
      : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  T* row(int64_t a, int64_t b, int64_t i) const { return data + a * s0 + b * s1 + i * s2; }
};

// One query block of one (batch, head) against the key blocks it can see.
template <typename T>
struct QueryTile {
  const RelAttnShape& s;
  int64_t i0, bm;  // queries [i0, i0 + bm)
  int64_t g;       // kv head

  int64_t first_visible(int64_t i) const { return s.window > 0 ? std::max<int64_t>(0, s.M + i - s.window + 1) : 0; }
  bool sees(const KeyBlock& kb) const {
    return kb.j0 <= s.M + i0 + bm - 1 && kb.j1 - 1 >= first_visible(i0);
  }
  // kb narrowed to the keys some row of the tile sees (no work on columns masked for every row).
  KeyBlock clip(const KeyBlock& kb) const {
    return {std::max(kb.j0, first_visible(i0)), std::min(kb.j1, s.M + i0 + bm), kb.offset};
  }
  // Visible keys of row ii inside kb, relative to kb.j0, inclusive; lo > hi when none.
  void visible_range(const KeyBlock& kb, int64_t ii, int64_t& lo, int64_t& hi) const {
    const int64_t i = i0 + ii;
    lo = std::max(kb.j0, first_visible(i)) - kb.j0;
    hi = std::min(kb.j1 - 1, s.M + i) - kb.j0;
  }
  // Largest distance of the tile: window row w holds r row clamp(dmax - w, 0, R - 1).
  int64_t dmax(const KeyBlock& kb) const { return s.M + i0 + bm - 1 - kb.j0 + kb.offset; }

  // Copies the tile's window of r rows (descending distance) into rwin [bm + n - 1, D].
  void gather_window(const KeyBlock& kb, const T* r_head, int64_t r_stride, T* rwin) const {
    const int64_t width = bm + (kb.j1 - kb.j0) - 1, top = dmax(kb);
    for (int64_t w = 0; w < width; ++w) {
      const int64_t d = std::clamp<int64_t>(top - w, 0, s.R - 1);
      std::memcpy(rwin + w * s.D, r_head + d * r_stride, s.D * sizeof(T));
    }
  }

  // scores [bm, kBlockN] = (q+u)'k^T + shifted (q+vb)'rwin^T, masked rows zero outside [lo, hi].
  // qu, qv are the scaled biased queries [bm, D]; pos [bm, kWindow] is scratch.
  void scores(const KeyBlock& kb, const T* qu, const T* qv, const T* k_rows, int64_t k_stride, const T* rwin,
              T* score, T* pos) const {
    const int64_t n = kb.j1 - kb.j0, width = bm + n - 1;
    gemm<T>(false, true, bm, n, s.D, T(1), qu, s.D, k_rows, k_stride, T(0), score, kBlockN);
    gemm<T>(false, true, bm, width, s.D, T(1), qv, s.D, rwin, s.D, T(0), pos, kWindow);
    for (int64_t ii = 0; ii < bm; ++ii) {
      int64_t lo, hi;
      visible_range(kb, ii, lo, hi);
      if (lo <= hi) add_into(score + ii * kBlockN + lo, pos + ii * kWindow + (bm - 1 - ii) + lo, hi - lo + 1);
    }
  }
};

// qu = scale * (q + u), qv = scale * (q + vb) for the bm rows of a query block.
template <typename T>
void biased_queries(const T* q_rows, int64_t q_stride, const T* u, const T* vb, T scale, int64_t bm, int64_t D,
                    T* qu, T* qv) {
  for (int64_t ii = 0; ii < bm; ++ii) {
    const T* qr = q_rows + ii * q_stride;
    add(qu + ii * D, qr, u, D);
    add(qv + ii * D, qr, vb, D);
    scale_inplace(qu + ii * D, scale, D);
    scale_inplace(qv + ii * D, scale, D);
  }
}

template <typename T>
void zero_outside(T* row, int64_t lo, int64_t hi, int64_t n) {
  std::fill(row, row + std::min(lo, n), T(0));
  if (hi + 1 < n) std::fill(row + std::max<int64_t>(hi + 1, 0), row + n, T(0));
}

template <typename T>
void forward_impl(const RelAttnShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& r, const at::Tensor& u, const at::Tensor& vb, const int64_t* kv_head,
                  T scale, at::Tensor& out, at::Tensor& lse) {
  const Strided4<T> Q(q), Kt(k), V(v);
  const T* r_data = r.data_ptr<T>();
  const T* u_data = u.data_ptr<T>();
  const T* vb_data = vb.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  T* lse_data = lse.data_ptr<T>();
  const auto blocks = key_blocks(s);
  const int64_t n_qblocks = (s.L + kBlockM - 1) / kBlockM;

  at::parallel_for(0, s.B * s.H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qu(kBlockM * s.D), qv(kBlockM * s.D), rwin(kWindow * s.D);
    std::vector<T> score(kBlockM * kBlockN), pos(kBlockM * kWindow), row_max_(kBlockM), row_sum(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (s.H * n_qblocks), h = (task / n_qblocks) % s.H, qb = task % n_qblocks;
      const QueryTile<T> tile{s, qb * kBlockM, std::min(kBlockM, s.L - qb * kBlockM), kv_head[h]};
      const int64_t bm = tile.bm;
      T* o = out_data + ((b * s.H + h) * s.L + tile.i0) * s.D;  // the output rows accumulate in place
      biased_queries(Q.row(b, h, tile.i0), Q.s2, u_data + h * s.D, vb_data + h * s.D, scale, bm, s.D, qu.data(),
                     qv.data());
      std::fill(o, o + bm * s.D, T(0));
      std::fill(row_max_.begin(), row_max_.end(), -std::numeric_limits<T>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      const T* r_head = r_data + tile.g * r.stride(0);

      for (const KeyBlock& block : blocks) {
        if (!tile.sees(block)) continue;
        const KeyBlock kb = tile.clip(block);
        const int64_t n = kb.j1 - kb.j0;
        tile.gather_window(kb, r_head, r.stride(1), rwin.data());
        tile.scores(kb, qu.data(), qv.data(), Kt.row(b, tile.g, kb.j0), Kt.s2, rwin.data(), score.data(), pos.data());
        for (int64_t ii = 0; ii < bm; ++ii) {
          T* row = score.data() + ii * kBlockN;
          int64_t lo, hi;
          tile.visible_range(kb, ii, lo, hi);
          if (lo > hi) {
            std::fill(row, row + n, T(0));
            continue;
          }
          const T m_new = std::max(row_max_[ii], row_max(row + lo, hi - lo + 1));
          const T sum = exp_sub_sum(row + lo, m_new, hi - lo + 1);
          zero_outside(row, lo, hi, n);
          const T alpha = std::exp(row_max_[ii] - m_new);
          row_sum[ii] = row_sum[ii] * alpha + sum;
          row_max_[ii] = m_new;
          if (alpha != T(1)) scale_inplace(o + ii * s.D, alpha, s.D);
        }
        gemm<T>(false, false, bm, s.D, n, T(1), score.data(), kBlockN, V.row(b, tile.g, kb.j0), V.s2, T(1), o, s.D);
      }
      T* lse_rows = lse_data + (b * s.H + h) * s.L + tile.i0;
      for (int64_t ii = 0; ii < bm; ++ii) {
        scale_inplace(o + ii * s.D, T(1) / row_sum[ii], s.D);
        lse_rows[ii] = row_max_[ii] + std::log(row_sum[ii]);
      }
    }
  });
}

template <typename T>
void backward_impl(const RelAttnShape& s, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& r, const at::Tensor& u, const at::Tensor& vb,
                   const at::Tensor& out, const at::Tensor& lse, const int64_t* kv_head, T scale, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, at::Tensor& dr_partial, at::Tensor& du_partial,
                   at::Tensor& dvb_partial) {
  const Strided4<T> Q(q), Kt(k), V(v);
  const T* r_data = r.data_ptr<T>();
  const T* u_data = u.data_ptr<T>();
  const T* vb_data = vb.data_ptr<T>();
  const T* dout_data = grad_out.data_ptr<T>();
  const T* out_data = out.data_ptr<T>();
  const T* lse_data = lse.data_ptr<T>();
  T* dq_data = dq.data_ptr<T>();
  T* dk_data = dk.data_ptr<T>();
  T* dv_data = dv.data_ptr<T>();
  const auto blocks = key_blocks(s);
  const int64_t n_qblocks = (s.L + kBlockM - 1) / kBlockM;
  const int64_t n_chunks = dr_partial.size(0);

  std::vector<std::vector<int64_t>> heads_of(s.Hk);  // query heads reading each kv head
  for (int64_t h = 0; h < s.H; ++h) heads_of[kv_head[h]].push_back(h);

  // One task per (kv head, batch chunk) owns dk, dv of its rows, dq of its query heads, and its partials.
  at::parallel_for(0, s.Hk * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qu(kBlockM * s.D), qv(kBlockM * s.D), rwin(kWindow * s.D), drwin(kWindow * s.D);
    std::vector<T> dq_content(kBlockM * s.D), dq_position(kBlockM * s.D), delta(kBlockM);
    std::vector<T> score(kBlockM * kBlockN), dprob(kBlockM * kBlockN), band(kBlockM * kWindow);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / n_chunks, chunk = task % n_chunks;
      T* dr_g = dr_partial.data_ptr<T>() + (chunk * s.Hk + g) * s.R * s.D;
      const T* r_head = r_data + g * r.stride(0);
      for (int64_t b = chunk * s.B / n_chunks; b < (chunk + 1) * s.B / n_chunks; ++b) {
        T* dk_rows = dk_data + (b * s.Hk + g) * s.K * s.D;
        T* dv_rows = dv_data + (b * s.Hk + g) * s.K * s.D;
        for (int64_t h : heads_of[g]) {
          T* du_h = du_partial.data_ptr<T>() + (chunk * s.H + h) * s.D;
          T* dvb_h = dvb_partial.data_ptr<T>() + (chunk * s.H + h) * s.D;
          for (int64_t qb = 0; qb < n_qblocks; ++qb) {
            const QueryTile<T> tile{s, qb * kBlockM, std::min(kBlockM, s.L - qb * kBlockM), g};
            const int64_t bm = tile.bm, row0 = (b * s.H + h) * s.L + tile.i0;
            const T* dout = dout_data + row0 * s.D;
            const T* lse_rows = lse_data + row0;
            biased_queries(Q.row(b, h, tile.i0), Q.s2, u_data + h * s.D, vb_data + h * s.D, scale, bm, s.D,
                           qu.data(), qv.data());
            for (int64_t ii = 0; ii < bm; ++ii) delta[ii] = dot(dout + ii * s.D, out_data + (row0 + ii) * s.D, s.D);
            std::fill(dq_content.begin(), dq_content.end(), T(0));
            std::fill(dq_position.begin(), dq_position.end(), T(0));

            for (const KeyBlock& block : blocks) {
              if (!tile.sees(block)) continue;
              const KeyBlock kb = tile.clip(block);
              const int64_t n = kb.j1 - kb.j0, width = bm + n - 1;
              const T* k_rows = Kt.row(b, g, kb.j0);
              tile.gather_window(kb, r_head, r.stride(1), rwin.data());
              tile.scores(kb, qu.data(), qv.data(), k_rows, Kt.s2, rwin.data(), score.data(), band.data());
              // score <- probabilities (zero where masked)
              int64_t lo[kBlockM], hi[kBlockM];
              for (int64_t ii = 0; ii < bm; ++ii) {
                T* row = score.data() + ii * kBlockN;
                tile.visible_range(kb, ii, lo[ii], hi[ii]);
                if (lo[ii] <= hi[ii]) exp_sub_sum(row + lo[ii], lse_rows[ii], hi[ii] - lo[ii] + 1);
                zero_outside(row, lo[ii], hi[ii], n);
              }
              // dv += P^T dO;  dP = dO v^T;  score <- dS = P * (dP - delta)
              gemm<T>(true, false, n, s.D, bm, T(1), score.data(), kBlockN, dout, s.D, T(1), dv_rows + kb.j0 * s.D, s.D);
              gemm<T>(false, true, bm, n, s.D, T(1), dout, s.D, V.row(b, g, kb.j0), V.s2, T(0), dprob.data(), kBlockN);
              for (int64_t ii = 0; ii < bm; ++ii) {
                if (lo[ii] <= hi[ii])
                  softmax_grad_inplace(score.data() + ii * kBlockN + lo[ii], dprob.data() + ii * kBlockN + lo[ii],
                                       delta[ii], hi[ii] - lo[ii] + 1);
              }
              // content term: dq_c += dS k;  dk += dS^T (q+u)'
              gemm<T>(false, false, bm, s.D, n, T(1), score.data(), kBlockN, k_rows, Kt.s2, T(1), dq_content.data(), s.D);
              gemm<T>(true, false, n, s.D, bm, T(1), score.data(), kBlockN, qu.data(), s.D, T(1), dk_rows + kb.j0 * s.D, s.D);
              // position term through the band: band[ii, bm-1-ii+jj] = dS[ii, jj]
              for (int64_t ii = 0; ii < bm; ++ii) {
                T* brow = band.data() + ii * kWindow;
                const int64_t shift = bm - 1 - ii;
                if (lo[ii] > hi[ii]) {
                  std::fill(brow, brow + width, T(0));
                  continue;
                }
                std::fill(brow, brow + shift + lo[ii], T(0));
                std::memcpy(brow + shift + lo[ii], score.data() + ii * kBlockN + lo[ii], (hi[ii] - lo[ii] + 1) * sizeof(T));
                std::fill(brow + shift + hi[ii] + 1, brow + width, T(0));
              }
              gemm<T>(false, false, bm, s.D, width, T(1), band.data(), kWindow, rwin.data(), s.D, T(1), dq_position.data(), s.D);
              gemm<T>(true, false, width, s.D, bm, T(1), band.data(), kWindow, qv.data(), s.D, T(0), drwin.data(), s.D);
              const int64_t top = tile.dmax(kb);
              for (int64_t w = 0; w < width; ++w)
                add_into(dr_g + std::clamp<int64_t>(top - w, 0, s.R - 1) * s.D, drwin.data() + w * s.D, s.D);
            }
            // dq = scale (dq_c + dq_p); du += scale colsum(dq_c); dvb += scale colsum(dq_p)
            T* dq_rows = dq_data + row0 * s.D;
            for (int64_t ii = 0; ii < bm; ++ii) {
              const T* c = dq_content.data() + ii * s.D;
              const T* p = dq_position.data() + ii * s.D;
              add(dq_rows + ii * s.D, c, p, s.D);
              scale_inplace(dq_rows + ii * s.D, scale, s.D);
              add_into(du_h, c, s.D);
              add_into(dvb_h, p, s.D);
            }
          }
        }
      }
    }
  });
  du_partial.mul_(scale);
  dvb_partial.mul_(scale);
}

// k and v rows go to BLAS with leading dimension stride(2), which must be >= D and fit an int. Any other
// layout (keys expanded with stride 0, overlapping as_strided views, huge strides) is copied first;
// rows padded past D and views of time-major buffers are read in place.
at::Tensor blas_rows(const at::Tensor& t) {
  const int64_t ld = t.stride(2);
  if (ld >= t.size(3) && ld <= std::numeric_limits<int>::max()) return t;
  return at::empty(t.sizes(), t.options()).copy_(t);
}

void check_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "rel_memory_attention_fwd_cpu: expected CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "rel_memory_attention (cpu backend): supports float32 and float64, got ", q.scalar_type());
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> rel_memory_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r, const at::Tensor& u,
    const at::Tensor& vb, const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset, double scale) {
  const RelAttnShape s = check_rel_attn_inputs(q, k, v, r, u, vb, kv_head_index, window, mem_offset);
  cpu::check_cpu(q);
  auto out = at::empty({s.B, s.H, s.L, s.D}, q.options());
  auto lse = at::empty({s.B, s.H, s.L}, q.options());
  const auto kv_head = kv_head_index.contiguous();
  const auto uc = u.contiguous(), vbc = vb.contiguous();
  const auto kc = cpu::blas_rows(k), vc = cpu::blas_rows(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rel_memory_attention_fwd_cpu", [&] {
    cpu::forward_impl<scalar_t>(s, q, kc, vc, r, uc, vbc, kv_head.data_ptr<int64_t>(), static_cast<scalar_t>(scale),
                                out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rel_memory_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r,
    const at::Tensor& u, const at::Tensor& vb, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset, double scale) {
  const RelAttnShape s = check_rel_attn_inputs(q, k, v, r, u, vb, kv_head_index, window, mem_offset);
  cpu::check_cpu(q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && lse.numel() == s.B * s.H * s.L,
              "rel_memory_attention_bwd_cpu: grad_out/out/lse do not match q");
  const auto dout = grad_out.contiguous(), outc = out.contiguous(), lsec = lse.contiguous().to(q.scalar_type());
  const auto kv_head = kv_head_index.contiguous();
  const auto uc = u.contiguous(), vbc = vb.contiguous();
  const auto kc = cpu::blas_rows(k), vc = cpu::blas_rows(v);
  // Enough (kv head, batch chunk) tasks for every thread; each chunk keeps its own dr, du, dvb partials.
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks = std::clamp<int64_t>((2 * threads + s.Hk - 1) / s.Hk, 1, s.B);
  auto dq = at::empty({s.B, s.H, s.L, s.D}, q.options());
  auto dk = at::zeros({s.B, s.Hk, s.K, s.D}, q.options());
  auto dv = at::zeros({s.B, s.Hk, s.K, s.D}, q.options());
  auto dr_partial = at::zeros({n_chunks, s.Hk, s.R, s.D}, q.options());
  auto du_partial = at::zeros({n_chunks, s.H, s.D}, q.options());
  auto dvb_partial = at::zeros({n_chunks, s.H, s.D}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rel_memory_attention_bwd_cpu", [&] {
    cpu::backward_impl<scalar_t>(s, dout, q, kc, vc, r, uc, vbc, outc, lsec, kv_head.data_ptr<int64_t>(),
                                 static_cast<scalar_t>(scale), dq, dk, dv, dr_partial, du_partial, dvb_partial);
  });
  return {dq, dk, dv, dr_partial.sum(0), du_partial.sum(0), dvb_partial.sum(0)};
}

}  // namespace memtx
