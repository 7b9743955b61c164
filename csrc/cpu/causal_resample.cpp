// Causal resampling on the CPU (SPEC §4): the shortening and the upsampling of an hourglass model, forward and
// backward, each one pass over its rows.
//
// Downsample: coarse row m is sum_r w_r s[m*k + r] over the shifted sequence s = cat(prev, x[:, :L-(k-1)]), read
// in place (s row t is prev row t for t < k-1, else x row t-(k-1); a missing prev reads as zeros), so neither the
// shifted copy nor the [B, L/k, k, d] groups of the eager composition exist. Its backward writes ds[t] =
// w_{t%k} grad[t/k] straight into dprev (t < k-1) and dx (the last k-1 rows of x feed no coarse row: zeros); it
// needs neither x nor prev. The weights' gradient, dw_r = sum <s[m*k + r], grad[m]>, sums fixed blocks of coarse
// rows into float64 partials, added in block order: deterministic for any number of threads.
// Upsample: out[i] = residual[i] + a_r x_short[m] + b_r x_short[m-1] (m = i/k, r = i%k; repeat: a = 1, b = 0;
// linear: a = (r+1)/k, b = (k-1-r)/k; x_short[-1] = prev). Its backward sums, per coarse row j, the k grad rows
// that read it as the current row and (linear) the k rows of the next group that read it as the previous one.
// Arithmetic is in the op-math type (float for half/bfloat16); sums over a group run over blocks of at most
// kColumns columns accumulated on the stack. OpenMP splits the output rows. Memory: the outputs, one k-float64
// partial per block of coarse rows for dw, nothing else.
// Inputs are read through their batch and row strides (a time-major [L, B, d] activation passed as
// .transpose(0, 1) is not copied); the last dimension must be contiguous.

#include "causal_resample.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace memtx {
namespace {

constexpr int64_t kColumns = 512;             // columns accumulated per pass over a row's sources
constexpr int64_t kGrainElements = 1 << 15;   // elements per parallel chunk
constexpr int64_t kWeightBlockRows = 64;      // coarse rows per float64 partial of dw

// A [B, N, d] tensor row by row: unit last stride, other strides arbitrary.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t sb = 0, sn = 0;
  Rows() = default;
  explicit Rows(const at::Tensor& t) : data(static_cast<T*>(t.data_ptr())), sb(t.stride(0)), sn(t.stride(1)) {}
  T* row(int64_t b, int64_t n) const { return data + b * sb + n * sn; }
};

// s = cat(prev, x[:, :L-(k-1)]) read in place: row t, or nullptr for a zero row (no prev).
template <typename T>
struct ShiftedRows {
  Rows<const T> x, prev;
  bool has_prev;
  int64_t shift;  // k - 1
  const T* row(int64_t b, int64_t t) const {
    if (t >= shift) return x.row(b, t - shift);
    return has_prev ? prev.row(b, t) : nullptr;
  }
};

// The shifted sequence of x [B, L, d] and prev [B, k-1, d] (undefined: zeros), both with a unit last stride.
template <typename T>
ShiftedRows<T> shifted_rows(const at::Tensor& x, const at::Tensor& prev, int64_t k) {
  return {Rows<const T>(x), prev.defined() ? Rows<const T>(prev) : Rows<const T>(), prev.defined(), k - 1};
}

// acc[c] += w * src[c]
template <typename T, typename A>
inline void axpy(A* acc, A w, const T* src, int64_t n) {
  for (int64_t c = 0; c < n; ++c) acc[c] += w * static_cast<A>(src[c]);
}

// dst[c] = scale * acc[c]
template <typename T, typename A>
inline void store(T* dst, const A* acc, A scale, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = static_cast<T>(scale * acc[c]);
}

inline int64_t grain_rows(int64_t elements_per_row) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, elements_per_row));
}

at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be [B, rows, d], got ", t.sizes());
}

// The group weights in the op-math type, and the scale applied to their sum: (weights, 1) or (ones, 1/k).
template <typename T, typename A = at::opmath_type<T>>
std::pair<std::vector<A>, A> group_weights(const c10::optional<at::Tensor>& weights, int64_t k) {
  if (!weights.has_value()) return {std::vector<A>(k, A(1)), A(1) / static_cast<A>(k)};
  const auto w = weights->contiguous();
  const T* p = w.const_data_ptr<T>();
  std::vector<A> out(k);
  for (int64_t r = 0; r < k; ++r) out[r] = static_cast<A>(p[r]);
  return {out, A(1)};
}

void check_downsample(const char* op, const at::Tensor& x, const c10::optional<at::Tensor>& prev,
                      const c10::optional<at::Tensor>& weights, int64_t k) {
  check_rows(x, op, "x");
  TORCH_CHECK(k >= 1 && x.size(1) % k == 0, op, ": L=", x.size(1), " must be a multiple of factor=", k);
  if (prev.has_value()) {
    check_rows(*prev, op, "prev");
    TORCH_CHECK(prev->size(0) == x.size(0) && prev->size(1) == k - 1 && prev->size(2) == x.size(2), op,
                ": prev must be [B, k-1, d] = [", x.size(0), ", ", k - 1, ", ", x.size(2), "], got ", prev->sizes());
    TORCH_CHECK(prev->scalar_type() == x.scalar_type(), op, ": prev must have the dtype of x");
  }
  if (weights.has_value()) {
    TORCH_CHECK(weights->device().is_cpu() && weights->dim() == 1 && weights->size(0) == k, op,
                ": weights must be a CPU tensor [factor=", k, "], got ", weights->sizes());
    TORCH_CHECK(weights->scalar_type() == x.scalar_type(), op, ": weights must have the dtype of x");
  }
}

bool is_linear(c10::string_view mode, const char* op) {
  TORCH_CHECK(mode == "repeat" || mode == "linear", op, ": mode must be 'repeat' or 'linear', got '",
              std::string(mode), "'");
  return mode == "linear";
}

// Upsampling coefficients of the group positions r < k: current row a_r, previous row b_r.
template <typename A>
void upsample_coefficients(int64_t k, bool linear, std::vector<A>& current, std::vector<A>& previous) {
  current.assign(k, A(1));
  previous.assign(k, A(0));
  if (!linear) return;
  for (int64_t r = 0; r < k; ++r) {
    current[r] = static_cast<A>(r + 1) / static_cast<A>(k);
    previous[r] = static_cast<A>(k - 1 - r) / static_cast<A>(k);
  }
}

}  // namespace

at::Tensor causal_downsample_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& prev_in,
                                 const c10::optional<at::Tensor>& weights, int64_t k) {
  constexpr const char* op = "causal_downsample_cpu";
  check_downsample(op, x_in, prev_in, weights, k);
  const auto x = unit_last_stride(x_in);
  const auto prev = prev_in.has_value() ? unit_last_stride(*prev_in) : at::Tensor();
  const int64_t B = x.size(0), Ls = x.size(1) / k, d = x.size(2);
  auto y = at::empty({B, Ls, d}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    const auto s = shifted_rows<scalar_t>(x, prev, k);
    const auto weighting = group_weights<scalar_t>(weights, k);
    const std::vector<A>& w = weighting.first;
    const A scale = weighting.second;
    const Rows<scalar_t> out(y);
    at::parallel_for(0, B * Ls, grain_rows(k * d), [&](int64_t begin, int64_t end) {
      A acc[kColumns];
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / Ls, m = row % Ls;
        for (int64_t c0 = 0; c0 < d; c0 += kColumns) {
          const int64_t n = std::min(kColumns, d - c0);
          std::fill(acc, acc + n, A(0));
          for (int64_t r = 0; r < k; ++r) {
            if (const scalar_t* src = s.row(b, m * k + r)) axpy(acc, w[r], src + c0, n);
          }
          store(out.row(b, m) + c0, acc, scale, n);
        }
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> causal_downsample_backward_cpu(const at::Tensor& grad_in,
                                                                  const c10::optional<at::Tensor>& weights,
                                                                  int64_t k) {
  constexpr const char* op = "causal_downsample_backward_cpu";
  check_rows(grad_in, op, "grad");
  TORCH_CHECK(k >= 1, op, ": factor must be >= 1, got ", k);
  const auto grad = unit_last_stride(grad_in);
  const int64_t B = grad.size(0), Ls = grad.size(1), d = grad.size(2), L = Ls * k;
  if (weights.has_value()) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == k && weights->scalar_type() == grad.scalar_type(), op,
                ": weights must be [factor=", k, "] of grad's dtype");
  }
  auto dx = at::empty({B, L, d}, grad.options());
  auto dprev = at::empty({B, k - 1, d}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    const auto weighting = group_weights<scalar_t>(weights, k);
    const std::vector<A>& w = weighting.first;
    const A scale = weighting.second;
    const Rows<const scalar_t> g(grad);
    const Rows<scalar_t> dx_rows(dx), dprev_rows(dprev);
    const int64_t rows = L + k - 1;  // s rows [0, L), then the k-1 rows of x that feed no coarse row
    at::parallel_for(0, B * rows, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / rows, t = row % rows;
        scalar_t* dst = t < k - 1 ? dprev_rows.row(b, t) : dx_rows.row(b, t - (k - 1));
        if (t >= L) {
          std::fill(dst, dst + d, scalar_t(0));
          continue;
        }
        const scalar_t* src = g.row(b, t / k);
        const A wt = w[t % k] * scale;
        for (int64_t c = 0; c < d; ++c) dst[c] = static_cast<scalar_t>(wt * static_cast<A>(src[c]));
      }
    });
  });
  return {dx, dprev};
}

at::Tensor causal_downsample_weights_grad_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                              const c10::optional<at::Tensor>& prev_in, int64_t k) {
  constexpr const char* op = "causal_downsample_weights_grad_cpu";
  check_downsample(op, x_in, prev_in, c10::nullopt, k);
  check_rows(grad_in, op, "grad");
  TORCH_CHECK(grad_in.size(0) == x_in.size(0) && grad_in.size(1) * k == x_in.size(1) && grad_in.size(2) == x_in.size(2),
              op, ": grad must be [B, L/k, d] of x");
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), op, ": grad must have the dtype of x");
  const auto grad = unit_last_stride(grad_in), x = unit_last_stride(x_in);
  const auto prev = prev_in.has_value() ? unit_last_stride(*prev_in) : at::Tensor();
  const int64_t B = x.size(0), Ls = grad.size(1), d = x.size(2);
  const int64_t blocks_per_batch = (Ls + kWeightBlockRows - 1) / kWeightBlockRows, blocks = B * blocks_per_batch;
  std::vector<double> partial(blocks * k, 0.0);
  auto dw = at::empty({k}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    const auto s = shifted_rows<scalar_t>(x, prev, k);
    const Rows<const scalar_t> g(grad);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t b = block / blocks_per_batch, m0 = (block % blocks_per_batch) * kWeightBlockRows;
        double* out = partial.data() + block * k;
        for (int64_t m = m0; m < std::min(m0 + kWeightBlockRows, Ls); ++m) {
          const scalar_t* gm = g.row(b, m);
          for (int64_t r = 0; r < k; ++r) {
            const scalar_t* src = s.row(b, m * k + r);
            if (src == nullptr) continue;
            A dot = 0;
            for (int64_t c = 0; c < d; ++c) dot += static_cast<A>(src[c]) * static_cast<A>(gm[c]);
            out[r] += static_cast<double>(dot);
          }
        }
      }
    });
    scalar_t* dst = dw.data_ptr<scalar_t>();
    for (int64_t r = 0; r < k; ++r) {
      double total = 0.0;
      for (int64_t block = 0; block < blocks; ++block) total += partial[block * k + r];
      dst[r] = static_cast<scalar_t>(total);
    }
  });
  return dw;
}

at::Tensor upsample_add_cpu(const at::Tensor& x_short_in, const at::Tensor& residual_in,
                            const c10::optional<at::Tensor>& prev_in, int64_t k, c10::string_view mode) {
  constexpr const char* op = "upsample_add_cpu";
  const bool linear = is_linear(mode, op);
  check_rows(x_short_in, op, "x_short");
  check_rows(residual_in, op, "residual");
  TORCH_CHECK(k >= 1, op, ": factor must be >= 1, got ", k);
  TORCH_CHECK(residual_in.size(0) == x_short_in.size(0) && residual_in.size(1) == x_short_in.size(1) * k &&
                  residual_in.size(2) == x_short_in.size(2),
              op, ": residual must be [B, L/k * k, d] of x_short, got ", residual_in.sizes(), " and ",
              x_short_in.sizes());
  TORCH_CHECK(residual_in.scalar_type() == x_short_in.scalar_type(), op, ": residual must have the dtype of x_short");
  if (prev_in.has_value()) {
    TORCH_CHECK(linear, op, ": prev is read by mode 'linear' only");
    check_rows(*prev_in, op, "prev");
    TORCH_CHECK(prev_in->size(0) == x_short_in.size(0) && prev_in->size(1) == 1 &&
                    prev_in->size(2) == x_short_in.size(2),
                op, ": prev must be [B, 1, d]");
    TORCH_CHECK(prev_in->scalar_type() == x_short_in.scalar_type(), op, ": prev must have the dtype of x_short");
  }
  const auto xs = unit_last_stride(x_short_in), res = unit_last_stride(residual_in);
  const auto prev = prev_in.has_value() ? unit_last_stride(*prev_in) : at::Tensor();
  const int64_t B = res.size(0), L = res.size(1), d = res.size(2);
  auto out = at::empty({B, L, d}, res.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, res.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<A> current, previous;
    upsample_coefficients(k, linear, current, previous);
    const Rows<const scalar_t> short_rows(xs), res_rows(res);
    const Rows<const scalar_t> prev_rows = prev.defined() ? Rows<const scalar_t>(prev) : Rows<const scalar_t>();
    const Rows<scalar_t> out_rows(out);
    at::parallel_for(0, B * L, grain_rows(d), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / L, i = row % L, m = i / k, r = i % k;
        const scalar_t* cur = short_rows.row(b, m);
        const scalar_t* before = !linear ? nullptr : m > 0 ? short_rows.row(b, m - 1)
                                                           : prev.defined() ? prev_rows.row(b, 0) : nullptr;
        const scalar_t* src = res_rows.row(b, i);
        scalar_t* dst = out_rows.row(b, i);
        const A a = current[r], p = previous[r];
        if (before == nullptr) {
          for (int64_t c = 0; c < d; ++c) {
            dst[c] = static_cast<scalar_t>(static_cast<A>(src[c]) + a * static_cast<A>(cur[c]));
          }
        } else {
          for (int64_t c = 0; c < d; ++c) {
            dst[c] = static_cast<scalar_t>(static_cast<A>(src[c]) +
                                           (a * static_cast<A>(cur[c]) + p * static_cast<A>(before[c])));
          }
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> upsample_add_backward_cpu(const at::Tensor& grad_in, int64_t k,
                                                             c10::string_view mode) {
  constexpr const char* op = "upsample_add_backward_cpu";
  const bool linear = is_linear(mode, op);
  check_rows(grad_in, op, "grad");
  TORCH_CHECK(k >= 1 && grad_in.size(1) % k == 0, op, ": grad rows ", grad_in.size(1),
              " must be a multiple of factor=", k);
  const auto grad = unit_last_stride(grad_in);
  const int64_t B = grad.size(0), Ls = grad.size(1) / k, d = grad.size(2);
  auto dx_short = at::empty({B, Ls, d}, grad.options());
  auto dprev = at::empty({B, linear ? 1 : 0, d}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
    using A = at::opmath_type<scalar_t>;
    std::vector<A> current, previous;
    upsample_coefficients(k, linear, current, previous);
    const Rows<const scalar_t> g(grad);
    const Rows<scalar_t> short_rows(dx_short), prev_rows(dprev);
    // coarse row j of cat(prev, x_short): j = 0 is prev (linear only), j >= 1 is x_short[j - 1]
    const int64_t first = linear ? 0 : 1, rows = Ls + 1 - first;
    at::parallel_for(0, B * rows, grain_rows(2 * k * d), [&](int64_t begin, int64_t end) {
      A acc[kColumns];
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / rows, j = row % rows + first;
        scalar_t* dst = j == 0 ? prev_rows.row(b, 0) : short_rows.row(b, j - 1);
        for (int64_t c0 = 0; c0 < d; c0 += kColumns) {
          const int64_t n = std::min(kColumns, d - c0);
          std::fill(acc, acc + n, A(0));
          for (int64_t r = 0; j >= 1 && r < k; ++r) axpy(acc, current[r], g.row(b, (j - 1) * k + r) + c0, n);
          for (int64_t r = 0; linear && j < Ls && r < k; ++r) axpy(acc, previous[r], g.row(b, j * k + r) + c0, n);
          store(dst + c0, acc, A(1), n);
        }
      }
    });
  });
  return {dx_short, dprev};
}

}  // namespace memtx
