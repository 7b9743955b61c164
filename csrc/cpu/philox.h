// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) for the dropout masks:
// philox_16_counters gives the four words of 16 consecutive counters. Under AVX-512 (AVX2) they are the 32-bit lanes
// of one register (two), each 32x32 -> 64-bit product two vpmuludq (even and odd lanes); builds with neither run
// Philox4x32Lanes, which holds the 32-bit words in 64-bit lanes so that the compiler vectorises each round's
// products where a widening multiply would not.
#pragma once

#include <cstdint>

#include "capability.h"
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace memtx {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// A register of 32-bit lanes and the operations Philox4x32-10 needs on it.
struct PhiloxRegister {
#if defined(CPU_CAPABILITY_AVX512)
  using V = __m512i;
  static constexpr int kLanes = 16;
  static V set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static V lane_index() { return _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0); }
  static V add(V a, V b) { return _mm512_add_epi32(a, b); }
  static V mul_even(V a, V b) { return _mm512_mul_epu32(a, b); }  // 64-bit products of the even lanes
  static V shift_down(V a) { return _mm512_srli_epi64(a, 32); }   // odd lanes to even ones (64-bit shifts)
  static V shift_up(V a) { return _mm512_slli_epi64(a, 32); }
  static V even_odd(V even, V odd) { return _mm512_mask_blend_epi32(0xAAAA, even, odd); }  // even lanes of the first
  static V xor3(V a, V b, V c) { return _mm512_ternarylogic_epi32(a, b, c, 0x96); }
  static void store(uint32_t* p, V a) { _mm512_store_si512(p, a); }
#else
  using V = __m256i;
  static constexpr int kLanes = 8;
  static V set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static V lane_index() { return _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0); }
  static V add(V a, V b) { return _mm256_add_epi32(a, b); }
  static V mul_even(V a, V b) { return _mm256_mul_epu32(a, b); }
  static V shift_down(V a) { return _mm256_srli_epi64(a, 32); }
  static V shift_up(V a) { return _mm256_slli_epi64(a, 32); }
  static V even_odd(V even, V odd) { return _mm256_blend_epi32(even, odd, 0xAA); }
  static V xor3(V a, V b, V c) { return _mm256_xor_si256(_mm256_xor_si256(a, b), c); }
  static void store(uint32_t* p, V a) { _mm256_store_si256(reinterpret_cast<V*>(p), a); }
#endif
};
#else
// The portable form: the 32-bit words in 64-bit lanes, kLanes counters per call.
struct Philox4x32Lanes {
  static constexpr int kLanes = 16;
  uint64_t word[4][kLanes];  // the counters on entry, the random words (each < 2^32) on return

  // Runs the ten rounds on every lane with the 64-bit key ``key``.
  void run(uint64_t key) {
    constexpr uint64_t kLow = 0xFFFFFFFFu;
    uint64_t k0[10], k1[10];
    k0[0] = key & kLow;
    k1[0] = key >> 32;
    for (int round = 1; round < 10; ++round) {
      k0[round] = (k0[round - 1] + 0x9E3779B9u) & kLow;
      k1[round] = (k1[round - 1] + 0xBB67AE85u) & kLow;
    }
    for (int l = 0; l < kLanes; ++l) {
      uint64_t w0 = word[0][l], w1 = word[1][l], w2 = word[2][l], w3 = word[3][l];
#pragma GCC unroll 10
      for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = 0xD2511F53u * w0;
        const uint64_t p1 = 0xCD9E8D57u * w2;
        w0 = (p1 >> 32) ^ w1 ^ k0[round];
        w2 = (p0 >> 32) ^ w3 ^ k1[round];
        w1 = p1 & kLow;
        w3 = p0 & kLow;
      }
      word[0][l] = w0;
      word[1][l] = w1;
      word[2][l] = w2;
      word[3][l] = w3;
    }
  }
};
#endif

// The four random words of the 16 counters first_counter + [0, 16) (first_counter a multiple of 16, the counters'
// other two words zero) under the 64-bit key, as words[w][l] (words 64-byte aligned). In registers 3x faster than
// the 64-bit lanes of Philox4x32Lanes under AVX-512, 2x under AVX2.
inline void philox_16_counters(uint64_t first_counter, uint64_t key, uint32_t (&words)[4][16]) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  using P = PhiloxRegister;
  using V = P::V;
  const V m0 = P::set1(0xD2511F53u), m1 = P::set1(0xCD9E8D57u);
  // hi and lo words of a * m per 32-bit lane
  const auto mul_hi_lo = [](V a, V m, V& hi, V& lo) {
    const V even = P::mul_even(a, m), odd = P::mul_even(P::shift_down(a), m);
    lo = P::even_odd(even, P::shift_up(odd));
    hi = P::even_odd(P::shift_down(even), odd);
  };
  for (int first = 0; first < 16; first += P::kLanes) {
    // counters c + l never cross a multiple of 2^32: c is a multiple of 16
    const uint64_t c = first_counter + first;
    V w0 = P::add(P::set1(static_cast<uint32_t>(c)), P::lane_index());
    V w1 = P::set1(static_cast<uint32_t>(c >> 32)), w2 = P::set1(0), w3 = P::set1(0);
    uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
    for (int round = 0; round < 10; ++round) {
      V hi0, lo0, hi1, lo1;
      mul_hi_lo(w0, m0, hi0, lo0);
      mul_hi_lo(w2, m1, hi1, lo1);
      w0 = P::xor3(hi1, w1, P::set1(k0));
      w2 = P::xor3(hi0, w3, P::set1(k1));
      w1 = lo1;
      w3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    P::store(words[0] + first, w0);
    P::store(words[1] + first, w1);
    P::store(words[2] + first, w2);
    P::store(words[3] + first, w3);
  }
#else
  Philox4x32Lanes rng;
  for (int l = 0; l < Philox4x32Lanes::kLanes; ++l) {
    const uint64_t counter = first_counter + l;
    rng.word[0][l] = static_cast<uint32_t>(counter);
    rng.word[1][l] = static_cast<uint32_t>(counter >> 32);
    rng.word[2][l] = 0;
    rng.word[3][l] = 0;
  }
  rng.run(key);
  for (int w = 0; w < 4; ++w)
    for (int l = 0; l < 16; ++l) words[w][l] = static_cast<uint32_t>(rng.word[w][l]);
#endif
}

}  // namespace memtx
