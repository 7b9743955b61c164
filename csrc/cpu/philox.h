// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) for the dropout masks:
// philox_16_counters gives the four words of 16 consecutive counters. Under AVX-512 they are the 32-bit lanes of one
// register; other builds run Philox4x32Lanes, which holds the 32-bit words in 64-bit lanes so that the compiler
// vectorises each round's 32x32 -> 64-bit products (vpmuludq) where a widening multiply would not.
#pragma once

#include <cstdint>

#include "capability.h"
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace memtx {

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

// The four random words of the 16 counters first_counter + [0, 16) (first_counter a multiple of 16, the counters'
// other two words zero) under the 64-bit key, as words[w][l]. Under AVX-512 the 16 counters are the 32-bit lanes of
// one register and each 32x32 -> 64-bit product is two vpmuludq (even and odd lanes), 3x faster than the 64-bit lanes
// of Philox4x32Lanes, which other builds run.
inline void philox_16_counters(uint64_t first_counter, uint64_t key, uint32_t (&words)[4][16]) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i m0 = _mm512_set1_epi64(0xD2511F53u), m1 = _mm512_set1_epi64(0xCD9E8D57u);
  constexpr __mmask16 kOdd = 0xAAAA;
  // hi and lo words of a * m per 32-bit lane (m < 2^32 in each 64-bit lane)
  const auto mul_hi_lo = [&](__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
    const __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    lo = _mm512_mask_blend_epi32(kOdd, even, _mm512_slli_epi64(odd, 32));
    hi = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(even, 32), odd);
  };
  // counters c + l never cross a multiple of 2^32: c is a multiple of 16
  __m512i w0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_counter))), lane);
  __m512i w1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_counter >> 32)));
  __m512i w2 = _mm512_setzero_si512(), w3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mul_hi_lo(w0, m0, hi0, lo0);
    mul_hi_lo(w2, m1, hi1, lo1);
    w0 = _mm512_ternarylogic_epi32(hi1, w1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // three-way xor
    w2 = _mm512_ternarylogic_epi32(hi0, w3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    w1 = lo1;
    w3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm512_store_si512(words[0], w0);
  _mm512_store_si512(words[1], w1);
  _mm512_store_si512(words[2], w2);
  _mm512_store_si512(words[3], w3);
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
