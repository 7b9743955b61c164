// Vectorised row primitives of the fused CPU attention (AVX-512 / AVX2 through at::vec, scalar tails).
#pragma once

#include "capability.h"
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace memtx::cpu {

using at::vec::Vectorized;

// Horizontal sum / max of one vector register.
template <typename T>
inline T hsum(const Vectorized<T>& x) {
  return at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return a + b; }, x);
}

template <typename T>
inline T hmax(const Vectorized<T>& x) {
  return at::vec::vec_reduce_all<T>([](const Vectorized<T>& a, const Vectorized<T>& b) { return at::vec::maximum(a, b); }, x);
}

// y[i] += x[i]
template <typename T>
inline void add_into(T* y, const T* x, int64_t n) {
  using V = Vectorized<T>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(y + i) + V::loadu(x + i)).store(y + i);
  for (; i < n; ++i) y[i] += x[i];
}

// y[t] += x_last[-t] for t in [0, n): adds x read backwards (a row of scores reads its band of position scores
// from the largest distance down).
template <typename T>
inline void add_reversed_into(T* y, const T* x_last, int64_t n) {
  int64_t t = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(T) == sizeof(float)) {
    const __m512i reverse = _mm512_set_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; t + 16 <= n; t += 16) {
      const __m512 x = _mm512_permutexvar_ps(reverse, _mm512_loadu_ps(x_last - t - 15));
      _mm512_storeu_ps(y + t, _mm512_add_ps(_mm512_loadu_ps(y + t), x));
    }
  } else {
    const __m512i reverse = _mm512_set_epi64(0, 1, 2, 3, 4, 5, 6, 7);
    for (; t + 8 <= n; t += 8) {
      const __m512d x = _mm512_permutexvar_pd(reverse, _mm512_loadu_pd(x_last - t - 7));
      _mm512_storeu_pd(y + t, _mm512_add_pd(_mm512_loadu_pd(y + t), x));
    }
  }
#endif
  for (; t < n; ++t) y[t] += x_last[-t];
}

// y[i] = a[i] + b[i]
template <typename T>
inline void add(T* y, const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(a + i) + V::loadu(b + i)).store(y + i);
  for (; i < n; ++i) y[i] = a[i] + b[i];
}

// y[i] *= s
template <typename T>
inline void scale_inplace(T* y, T s, int64_t n) {
  using V = Vectorized<T>;
  const V vs(s);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(y + i) * vs).store(y + i);
  for (; i < n; ++i) y[i] *= s;
}

// max of x[0, n) (NaN if any is). Four running maxima: one chain of NaN-propagating maxima took 8 cycles a vector.
template <typename T>
inline T row_max(const T* x, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= W) {
    V vm[4] = {V::loadu(x), V(m), V(m), V(m)};
    for (i = W; i + 4 * W <= n; i += 4 * W) {
      for (int c = 0; c < 4; ++c) vm[c] = at::vec::maximum(vm[c], V::loadu(x + i + c * W));
    }
    for (; i + W <= n; i += W) vm[0] = at::vec::maximum(vm[0], V::loadu(x + i));
    m = hmax(at::vec::maximum(at::vec::maximum(vm[0], vm[1]), at::vec::maximum(vm[2], vm[3])));
  }
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[i] = exp(x[i] - m); returns the sum. float uses at::vec's polynomial exp, double the libm one.
template <typename T>
inline T exp_sub_sum(T* x, T m, int64_t n) {
  T sum = 0;
  int64_t i = 0;
  if constexpr (sizeof(T) == sizeof(float)) {
    using V = Vectorized<T>;
    const V vm(m);
    V acc(T(0));
    for (; i + V::size() <= n; i += V::size()) {
      V e = (V::loadu(x + i) - vm).exp_u20();
      e.store(x + i);
      acc = acc + e;
    }
    sum = hsum(acc);
  }
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  return sum;
}

// x[i] = exp((x[i] - m) - m_low), where m + m_low is a log-sum-exp held to twice T's precision (the backward's
// float64 lse split into two floats): x[i] - m is exact for every x[i] within a factor 2 of m, the scores whose
// probabilities matter, so they carry no rounding of the lse, which would scale the whole row alike.
template <typename T>
inline void exp_sub_pair(T* x, T m, T m_low, int64_t n) {
  int64_t i = 0;
  if constexpr (sizeof(T) == sizeof(float)) {
    using V = Vectorized<T>;
    const V vm(m), vm_low(m_low);
    for (; i + V::size() <= n; i += V::size()) ((V::loadu(x + i) - vm) - vm_low).exp_u20().store(x + i);
  }
  for (; i < n; ++i) x[i] = std::exp((x[i] - m) - m_low);
}

// k and v rows may come narrower than the arithmetic: float32 arithmetic on bfloat16 or float16 rows (a half-precision
// model's inference reads half the bytes). widen<T>(x) is one element in T, load_widened<T>(x) one vector of them.
template <typename T, typename E>
inline T widen(E x) {
  return static_cast<T>(x);
}

template <typename T, typename E>
inline Vectorized<T> load_widened(const E* x) {
  if constexpr (std::is_same_v<T, E>) {
    return Vectorized<T>::loadu(x);
  } else {
    static_assert(std::is_same_v<T, float>, "only float32 arithmetic widens narrower rows");
    Vectorized<float> out;
    at::vec::load_to_float(x, out);
    return out;
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// 16 elements of a float32, bfloat16 or float16 row as float32; the masked form reads only the lanes of `lanes`.
inline __m512 load16_ps(const float* x) { return _mm512_loadu_ps(x); }
inline __m512 load16_ps(__mmask16 lanes, const float* x) { return _mm512_maskz_loadu_ps(lanes, x); }
inline __m512 widen_bf16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16_ps(const at::BFloat16* x) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
inline __m512 load16_ps(__mmask16 lanes, const at::BFloat16* x) {
  return widen_bf16(_mm256_maskz_loadu_epi16(lanes, x));
}
inline __m512 load16_ps(const at::Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
inline __m512 load16_ps(__mmask16 lanes, const at::Half* x) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, x));
}

// n rows of D elements of E (`stride` apart) -> dense float32 rows [n, D] at out.
template <typename E>
inline void widen_rows(const E* rows, int64_t stride, int64_t n, int64_t D, float* out) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (D % 16)) - 1);
  for (int64_t t = 0; t < n; ++t) {
    int64_t d = 0;
    for (; d + 16 <= D; d += 16) _mm512_storeu_ps(out + t * D + d, load16_ps(rows + t * stride + d));
    if (d < D) _mm512_mask_storeu_ps(out + t * D + d, tail, load16_ps(tail, rows + t * stride + d));
  }
}
#endif

// sum of a[i] * b[i]
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) acc = at::vec::fmadd(V::loadu(a + i), V::loadu(b + i), acc);
  T sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// sum of a[i] * x[i] + b[i] * y[i]: a query row's content and position terms against one key (one reduction; the
// key row x may be narrower than T).
template <typename T, typename E>
inline T dot2(const T* a, const E* x, const T* b, const T* y, int64_t n) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    acc = at::vec::fmadd(V::loadu(a + i), load_widened<T>(x + i), acc);
    acc = at::vec::fmadd(V::loadu(b + i), V::loadu(y + i), acc);
  }
  T sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * widen<T>(x[i]) + b[i] * y[i];
  return sum;
}

// out[t] = sum_i a[i] x[t][i] + b[i] y[t][i] for t in [0, 16): dot2 for 16 rows (keys) at once. Under AVX-512
// float the 16 accumulators are summed by a transposing tree (4 levels of lane shuffles, about 3 instructions per
// row instead of one full reduction each).
template <typename T, typename E>
inline void dot2_rows16(const T* a, const E* const* x, const T* b, const T* const* y, int64_t n, T* out) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (sizeof(T) == sizeof(float)) {
    __m512 acc[16];
    for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512 va = _mm512_loadu_ps(a + i), vb = _mm512_loadu_ps(b + i);
      for (int t = 0; t < 16; ++t) {
        acc[t] = _mm512_fmadd_ps(va, load16_ps(x[t] + i), acc[t]);
        acc[t] = _mm512_fmadd_ps(vb, _mm512_loadu_ps(y[t] + i), acc[t]);
      }
    }
    if (i < n) {
      const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
      const __m512 va = _mm512_maskz_loadu_ps(tail, a + i), vb = _mm512_maskz_loadu_ps(tail, b + i);
      for (int t = 0; t < 16; ++t) {
        acc[t] = _mm512_fmadd_ps(va, load16_ps(tail, x[t] + i), acc[t]);
        acc[t] = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(tail, y[t] + i), acc[t]);
      }
    }
    // 16 -> 8: row pairs, each row's 256-bit halves added (row 2p in the low half, 2p + 1 in the high one)
    __m512 pairs[8];
    for (int t = 0; t < 8; ++t)
      pairs[t] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * t], acc[2 * t + 1], 0x44),
                               _mm512_shuffle_f32x4(acc[2 * t], acc[2 * t + 1], 0xEE));
    // 8 -> 4: 128-bit block c of quads[t] holds row 4t + c
    __m512 quads[4];
    for (int t = 0; t < 4; ++t)
      quads[t] = _mm512_add_ps(_mm512_shuffle_f32x4(pairs[2 * t], pairs[2 * t + 1], 0x88),
                               _mm512_shuffle_f32x4(pairs[2 * t], pairs[2 * t + 1], 0xDD));
    // 4 -> 2 -> 1, inside each 128-bit block c: element c * 4 + t ends as row c + 4t
    __m512 halves[2];
    for (int t = 0; t < 2; ++t)
      halves[t] = _mm512_add_ps(_mm512_shuffle_ps(quads[2 * t], quads[2 * t + 1], 0x44),
                                _mm512_shuffle_ps(quads[2 * t], quads[2 * t + 1], 0xEE));
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(halves[0], halves[1], 0x88),
                                      _mm512_shuffle_ps(halves[0], halves[1], 0xDD));
    const __m512i row_order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    _mm512_storeu_ps(out, _mm512_permutexvar_ps(row_order, sums));
    return;
  }
#endif
  for (int t = 0; t < 16; ++t) out[t] = dot2(a, x[t], b, y[t], n);
}

// Asks for the cache lines of x[0, n) ahead of their use, into L2 (prefetcht1; prefetcht0, into L1, measured slower).
template <typename T>
inline void prefetch_row(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(x + i, 0, 2);
}

// y[i] += p[0] x0[i] + p[1] x1[i] + p[2] x2[i] + p[3] x3[i]: four rows of values (maybe narrower than T) into one
// output row.
template <typename T, typename E>
inline void axpy4_into(T* y, const T* p, const E* x0, const E* x1, const E* x2, const E* x3, int64_t n) {
  using V = Vectorized<T>;
  const V p0(p[0]), p1(p[1]), p2(p[2]), p3(p[3]);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V acc = at::vec::fmadd(p0, load_widened<T>(x0 + i), V::loadu(y + i));
    acc = at::vec::fmadd(p1, load_widened<T>(x1 + i), acc);
    acc = at::vec::fmadd(p2, load_widened<T>(x2 + i), acc);
    at::vec::fmadd(p3, load_widened<T>(x3 + i), acc).store(y + i);
  }
  for (; i < n; ++i)
    y[i] += p[0] * widen<T>(x0[i]) + p[1] * widen<T>(x1[i]) + p[2] * widen<T>(x2[i]) + p[3] * widen<T>(x3[i]);
}

// y[i] += p x[i] (x maybe narrower than T)
template <typename T, typename E>
inline void axpy_into(T* y, T p, const E* x, int64_t n) {
  using V = Vectorized<T>;
  const V vp(p);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size())
    at::vec::fmadd(vp, load_widened<T>(x + i), V::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += p * widen<T>(x[i]);
}

#if defined(CPU_CAPABILITY_AVX512)
// Lane tiles: query rows in the lanes of R registers, 16 rows each (see lane_rows_block).

// The cache lines of `rows` rows (`row_bytes` each, `stride_bytes` apart), asked for one line per step() into L2
// (prefetcht1): the lane tiles spread the next chunk's prefetches between their FMAs. Issued in bursts, software
// prefetches fill the line fill buffers and stall the FMAs behind them.
class LinePrefetcher {
 public:
  LinePrefetcher() = default;
  LinePrefetcher(const void* row, int64_t stride_bytes, int64_t row_bytes, int64_t rows)
      : row_(static_cast<const char*>(row)), stride_(stride_bytes), lines_per_row_((row_bytes + 63) / 64),
        rows_left_(rows) {}
  void step() {
    if (rows_left_ <= 0) return;
    __builtin_prefetch(row_ + 64 * line_, 0, 2);
    if (++line_ == lines_per_row_) {
      line_ = 0;
      row_ += stride_;
      --rows_left_;
    }
  }
  void finish() {
    while (rows_left_ > 0) step();
  }

 private:
  const char* row_ = nullptr;
  int64_t stride_ = 0, lines_per_row_ = 1, line_ = 0, rows_left_ = 0;
};

// acc[t * R + r] = sum_d broadcast(rows[t][d]) * cols[d][r] for N rows at rows0 + t * stride (cols: [D, 16 R], R
// registers of lanes per d). With one register, two partial sums per row (even and odd d) keep 2N FMA chains in
// flight. pf asks for N rows' lines over the d loop.
template <int N, int R>
inline void lanes_dot(const float* cols, const float* rows0, int64_t stride, int64_t D, __m512* acc,
                      LinePrefetcher& pf) {
  constexpr int kSplit = R == 1 ? 2 : 1;
  constexpr int kEvery = std::max(1, 16 / (N * kSplit));  // iterations per prefetched line
  __m512 part[kSplit][N * R];
  for (int h = 0; h < kSplit; ++h)
    for (int i = 0; i < N * R; ++i) part[h][i] = _mm512_setzero_ps();
  const auto step = [&](int h, int64_t d) {
    __m512 c[R];
    for (int r = 0; r < R; ++r) c[r] = _mm512_load_ps(cols + (d * R + r) * 16);
    for (int t = 0; t < N; ++t) {
      const __m512 k = _mm512_set1_ps(rows0[t * stride + d]);
      for (int r = 0; r < R; ++r) part[h][t * R + r] = _mm512_fmadd_ps(k, c[r], part[h][t * R + r]);
    }
  };
  int64_t d = 0;
  for (int64_t it = 0; d + kSplit <= D; d += kSplit, ++it) {
    if (it % kEvery == 0) pf.step();
    for (int h = 0; h < kSplit; ++h) step(h, d + h);
  }
  if (d < D) step(0, d);
  pf.finish();
  for (int i = 0; i < N * R; ++i) acc[i] = kSplit == 2 ? _mm512_add_ps(part[0][i], part[kSplit - 1][i]) : part[0][i];
}

// out[d][r] += sum_t p[t][r] * broadcast(rows[t][d]) for the n rows at rows0 + t * stride (out: [D, 16 R], p: [n,
// 16 R]). Each block of 16 / R columns of out stays in (at most 16) registers over the n rows, so out is loaded and
// stored once: a few rows at a time over all of out, its loads and stores cost 3.5% of a 16-row tile at L = 16,
// M = 640. pf: one line per R rows of a block.
template <int R>
inline void lanes_pv(float* out, const float* p, const float* rows0, int64_t stride, int64_t n, int64_t D,
                     LinePrefetcher& pf) {
  constexpr int W = 16 * R;
  const auto block = [&](auto dims_tag, int64_t d0, int64_t& it) {
    constexpr int kDims = decltype(dims_tag)::value;
    __m512 acc[kDims * R];
    for (int dd = 0; dd < kDims; ++dd)
      for (int r = 0; r < R; ++r) acc[dd * R + r] = _mm512_load_ps(out + (d0 + dd) * W + 16 * r);
    for (int64_t t = 0; t < n; ++t, ++it) {
      if (it % R == 0) pf.step();
      __m512 pr[R];
      for (int r = 0; r < R; ++r) pr[r] = _mm512_load_ps(p + t * W + 16 * r);
      const float* row = rows0 + t * stride + d0;
      for (int dd = 0; dd < kDims; ++dd) {
        const __m512 x = _mm512_set1_ps(row[dd]);
        for (int r = 0; r < R; ++r) acc[dd * R + r] = _mm512_fmadd_ps(pr[r], x, acc[dd * R + r]);
      }
    }
    for (int dd = 0; dd < kDims; ++dd)
      for (int r = 0; r < R; ++r) _mm512_store_ps(out + (d0 + dd) * W + 16 * r, acc[dd * R + r]);
  };
  constexpr int kDims = 16 / R;
  int64_t d0 = 0, it = 0;
  for (; d0 + kDims <= D; d0 += kDims) block(std::integral_constant<int, kDims>{}, d0, it);
  for (; d0 < D; ++d0) block(std::integral_constant<int, 1>{}, d0, it);
  pf.finish();
}
#endif

// p[i] = p[i] * (dp[i] - delta): the softmax backward, in place on p.
template <typename T>
inline void softmax_grad_inplace(T* p, const T* dp, T delta, int64_t n) {
  using V = Vectorized<T>;
  const V vd(delta);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(p + i) * (V::loadu(dp + i) - vd)).store(p + i);
  for (; i < n; ++i) p[i] = p[i] * (dp[i] - delta);
}

}  // namespace memtx::cpu
