// Inverted dropout with a counter-based mask (Philox4x32-10): the mask is a function of (seed, element
// index), so the backward pass recomputes it instead of storing it.
#pragma once

#include <ATen/ATen.h>

namespace memtx {

// y = x * keep / (1 - p), keep[i] = philox word of element i >= p * 2^32 (layout in memtx_ops/reference/dropout.py).
// x: any shape, float32/float64/bfloat16/float16 on the CPU; seed: int64 tensor of one element.
at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed);

}  // namespace memtx
