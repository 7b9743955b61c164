// Vectorised row primitives of the fused CPU attention (AVX-512 / AVX2 through at::vec, scalar tails).
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace memtx::cpu {

using at::vec::Vectorized;

// Horizontal sum / max of one vector register.
template <typename T>
inline T hsum(const Vectorized<T>& x) {
  T lanes[Vectorized<T>::size()];
  x.store(lanes);
  T sum = 0;
  for (int64_t i = 0; i < Vectorized<T>::size(); ++i) sum += lanes[i];
  return sum;
}

template <typename T>
inline T hmax(const Vectorized<T>& x) {
  T lanes[Vectorized<T>::size()];
  x.store(lanes);
  T m = lanes[0];
  for (int64_t i = 1; i < Vectorized<T>::size(); ++i) m = std::max(m, lanes[i]);
  return m;
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

// max of x[0, n)
template <typename T>
inline T row_max(const T* x, int64_t n) {
  using V = Vectorized<T>;
  T m = -std::numeric_limits<T>::infinity();
  int64_t i = 0;
  if (n >= V::size()) {
    V vm = V::loadu(x);
    for (i = V::size(); i + V::size() <= n; i += V::size()) vm = at::vec::maximum(vm, V::loadu(x + i));
    m = hmax(vm);
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
