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
constexpr int64_t kGrain = kGroup * kGrainGroups;

// Element i of a batch starting at counter c0: counter c0 + i % kLanes, word i / kLanes. With kRelu the
// input is max(x, 0) (NaN stays NaN).
template <bool kRelu, typename scalar_t, typename acc_t>
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
        acc_t value = static_cast<acc_t>(x[base + i]);
        if constexpr (kRelu) value = value < acc_t(0) ? acc_t(0) : value;
        y[base + i] = static_cast<scalar_t>(value * kept);
      }
    }
  });
}

template <bool kRelu>
at::Tensor dropout_forward(const char* name, const at::Tensor& x, double p, const at::Tensor& seed) {
  TORCH_CHECK(x.device().is_cpu(), name, ": x must be a CPU tensor");
  TORCH_CHECK(p >= 0.0 && p < 1.0, name, ": p must be in [0, 1), got ", p);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, name, ": seed must be one int64");
  const auto input = x.contiguous();
  auto out = at::empty_like(input, at::MemoryFormat::Contiguous);
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t threshold = static_cast<uint32_t>(std::ldexp(p, 32));  // p < 1

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dropout_kernel<kRelu, scalar_t, acc_t>(input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                           input.numel(), threshold, static_cast<acc_t>(1.0 / (1.0 - p)), key);
  });
  return out;
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  return dropout_forward<false>("dropout_cpu", x, p, seed);
}

at::Tensor relu_dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed) {
  return dropout_forward<true>("relu_dropout_cpu", x, p, seed);
}

at::Tensor relu_dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& out, double p) {
  TORCH_CHECK(grad.device().is_cpu() && out.device().is_cpu(), "relu_dropout_backward_cpu: expected CPU tensors");
  TORCH_CHECK(grad.sizes() == out.sizes() && grad.scalar_type() == out.scalar_type(),
              "relu_dropout_backward_cpu: grad and out must share shape and dtype");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "relu_dropout_backward_cpu: p must be in [0, 1), got ", p);
  const auto g = grad.contiguous(), y = out.contiguous();
  auto dx = at::empty_like(g, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "relu_dropout_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - p));
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // an element passed iff its output is positive
        const acc_t pass = static_cast<acc_t>(static_cast<acc_t>(yp[i]) > acc_t(0)) * scale;
        dp[i] = static_cast<scalar_t>(static_cast<acc_t>(gp[i]) * pass);
      }
    });
  });
  return dx;
}

}  // namespace memtx
