// Causal resampling of multi-scale (hourglass) models (SPEC §4): shortening by a shifted group sum, and upsampling
// fused with the residual add. Layout batch-first [B, L, d], any strides with a unit last stride.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace memtx {

// y [B, L/k, d] (contiguous): y[:, m] = sum_{r<k} w_r * s[:, m*k + r], s = cat(prev, x[:, :L-(k-1)]).
// x [B, L, d]; prev [B, k-1, d] or none (zeros); weights [k] or none (w_r = 1/k).
at::Tensor causal_downsample_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& prev,
                                 const c10::optional<at::Tensor>& weights, int64_t factor);

// Gradients of causal_downsample_cpu from grad [B, L/k, d]: (dx [B, L, d], dprev [B, k-1, d]).
std::tuple<at::Tensor, at::Tensor> causal_downsample_backward_cpu(const at::Tensor& grad,
                                                                  const c10::optional<at::Tensor>& weights,
                                                                  int64_t factor);

// Gradient of causal_downsample_cpu with respect to its weights: [k], dw_r = sum_{b,m} <s[b, m*k + r], grad[b, m]>.
at::Tensor causal_downsample_weights_grad_cpu(const at::Tensor& grad, const at::Tensor& x,
                                              const c10::optional<at::Tensor>& prev, int64_t factor);

// out [B, L, d] (contiguous) = residual + up(x_short): mode "repeat" up[i] = x_short[i/k]; "linear"
// up[i] = (r+1)/k x_short[m] + (k-1-r)/k x_short[m-1] (m = i/k, r = i%k, x_short[-1] = prev [B, 1, d] or zeros).
at::Tensor upsample_add_cpu(const at::Tensor& x_short, const at::Tensor& residual,
                            const c10::optional<at::Tensor>& prev, int64_t factor, c10::string_view mode);

// Gradients of upsample_add_cpu from grad [B, L, d]: (dx_short [B, L/k, d], dprev [B, 1, d] for "linear",
// [B, 0, d] for "repeat"). The residual's gradient is grad itself.
std::tuple<at::Tensor, at::Tensor> upsample_add_backward_cpu(const at::Tensor& grad, int64_t factor,
                                                             c10::string_view mode);

}  // namespace memtx
