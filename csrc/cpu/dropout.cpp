#include "dropout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

#include "philox.h"

namespace memtx {
namespace {

using Lanes = Philox4x32Lanes;
constexpr int64_t kGroup = 4 * Lanes::kLanes;  // elements per batch of kLanes counters
constexpr int64_t kGrainGroups = 1024;

// Element i of a batch starting at counter c0: counter c0 + i % kLanes, word i / kLanes.
template <typename scalar_t, typename acc_t>
void dropout_kernel(const scalar_t* x, scalar_t* y, int64_t n, uint32_t threshold, acc_t scale, uint64_t key) {
  const int64_t groups = (n + kGroup - 1) / kGroup;
  at::parallel_for(0, groups, kGrainGroups, [&](int64_t begin, int64_t end) {
    Lanes rng;
    for (int64_t g = begin; g < end; ++g) {
      for (int l = 0; l < Lanes::kLanes; ++l) {
        const uint64_t counter = static_cast<uint64_t>(g) * Lanes::kLanes + l;
        rng.word[0][l] = static_cast<uint32_t>(counter);
        rng.word[1][l] = static_cast<uint32_t>(counter >> 32);
        rng.word[2][l] = 0;
        rng.word[3][l] = 0;
      }
      rng.run(key);
      const int64_t base = g * kGroup;
      const uint64_t* words = &rng.word[0][0];
      const int64_t count = std::min(kGroup, n - base);
      for (int64_t i = 0; i < count; ++i) {  // branch-free: the mask is random, a branch would mispredict
        const acc_t kept = static_cast<acc_t>(words[i] >= threshold) * scale;
        y[base + i] = static_cast<scalar_t>(static_cast<acc_t>(x[base + i]) * kept);
      }
    }
  });
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  TORCH_CHECK(x.device().is_cpu(), "dropout_cpu: x must be a CPU tensor");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_cpu: p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "dropout_cpu: seed must be one int64");
  const auto input = x.contiguous();
  auto out = at::empty_like(input, at::MemoryFormat::Contiguous);
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = static_cast<uint32_t>(std::ldexp(p, 32));  // p < 1

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dropout_kernel<scalar_t, acc_t>(input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                    input.numel(), threshold, static_cast<acc_t>(1.0 / (1.0 - p)), key);
  });
  return out;
}

}  // namespace memtx
