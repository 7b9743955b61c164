#include "rel_memory_attention.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace memtx {

RelAttnShape check_rel_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& r, const at::Tensor& u, const at::Tensor& vb,
                                   const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset,
                                   bool narrow_keys) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && r.dim() == 3 && u.dim() == 2 && vb.dim() == 2,
              "rel_memory_attention: expected q, k, v [B, H|Hk, L|K, D], r [Hk, R, D], u, vb [H, D]");
  RelAttnShape s{};
  s.B = q.size(0), s.H = q.size(1), s.L = q.size(2), s.D = q.size(3);
  s.Hk = k.size(1), s.K = k.size(2), s.M = s.K - s.L, s.R = r.size(1);
  // Bounded as memtx_ops' kernel_span bounds them, which changes no result: a window of all the keys or more is
  // none, and an offset of R or more reads r's last row for every memory distance as R does. The kernels compute
  // distances in 32 bits, so a direct call with a larger value would wrap.
  s.window = window >= s.K ? 0 : window, s.mem_offset = std::min(mem_offset, s.R);
  TORCH_CHECK(k.size(0) == s.B && k.size(3) == s.D && v.sizes() == k.sizes(), "rel_memory_attention: bad k/v shape");
  TORCH_CHECK(s.M >= 0, "rel_memory_attention: K must be >= L");
  TORCH_CHECK(r.size(0) == s.Hk && r.size(2) == s.D && s.R >= 1, "rel_memory_attention: bad r shape");
  TORCH_CHECK(u.size(0) == s.H && u.size(1) == s.D && vb.sizes() == u.sizes(), "rel_memory_attention: bad u/vb shape");
  TORCH_CHECK(window >= 0 && mem_offset >= 0, "rel_memory_attention: window and mem_offset must be >= 0");
  const bool half_keys = k.scalar_type() == at::kHalf || k.scalar_type() == at::kBFloat16;
  const bool keys_widened =
      narrow_keys && q.scalar_type() == at::kFloat && half_keys && v.scalar_type() == k.scalar_type();
  for (const at::Tensor* t : {&q, &k, &v, &r, &u, &vb}) {
    const bool widened = keys_widened && (t == &k || t == &v);
    TORCH_CHECK(widened || t->scalar_type() == q.scalar_type(), "rel_memory_attention: inputs must share one dtype",
                narrow_keys ? " (or k and v float16 or bfloat16 under a float32 q)" : "");
    TORCH_CHECK(t->device() == q.device(), "rel_memory_attention: inputs must share one device");
    TORCH_CHECK(t->stride(-1) == 1 || t->size(-1) == 1, "rel_memory_attention: inputs need a contiguous last dimension");
  }
  TORCH_CHECK(kv_head_index.scalar_type() == at::kLong && kv_head_index.dim() == 1 && kv_head_index.size(0) == s.H,
              "rel_memory_attention: kv_head_index must be int64 [H]");
  if (kv_head_index.device().is_cpu()) {
    auto idx = kv_head_index.contiguous();
    const int64_t* p = idx.data_ptr<int64_t>();
    for (int64_t h = 0; h < s.H; ++h)
      TORCH_CHECK(p[h] >= 0 && p[h] < s.Hk, "rel_memory_attention: kv_head_index values must lie in [0, Hk)");
  }
  return s;
}

}  // namespace memtx
