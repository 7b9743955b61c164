// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), evaluated on
// kLanes counters at once so that the compiler vectorises each round across lanes. The 32-bit words are held
// in 64-bit lanes: the 32x32->64-bit products then vectorise (vpmuludq) where a widening multiply would not.
#pragma once

#include <cstdint>

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

}  // namespace memtx
