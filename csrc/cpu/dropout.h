// Inverted dropout with a counter-based mask (Philox4x32-10): the mask is a function of (seed, element
// index), so the backward pass recomputes it instead of storing it.
#pragma once

#include <ATen/ATen.h>

namespace memtx {

// y = x * keep / (1 - p), keep[i] = philox word of element i >= p * 2^32 (layout in memtx_ops/reference/dropout.py).
// x: any shape, float32/float64/bfloat16/float16 on the CPU; seed: int64 tensor of one element.
at::Tensor dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed);

// y = max(x, 0) * keep / (1 - p) with the mask of dropout_cpu: dropout(relu(x)) in one pass.
at::Tensor relu_dropout_cpu(const at::Tensor& x, double p, const at::Tensor& seed);

// Gradient of relu_dropout from its output y: grad * (y > 0) / (1 - p) (an element passed iff y > 0).
at::Tensor relu_dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& out, double p);

}  // namespace memtx
