// Shared declarations of the relative-memory-attention operators (SPEC §1), used by every C++ backend.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace memtx {

// Problem sizes read off validated inputs. q [B, H, L, D]; k, v [B, Hk, K, D]; r [Hk, R, D].
struct RelAttnShape {
  int64_t B, H, L, D, Hk, K, M, R;
  int64_t window;      // 0: no window
  int64_t mem_offset;  // extra distance of memory keys (j < M)
};

// Checks what the Python layer guarantees (so a direct torch.ops call cannot read out of bounds) and
// returns the sizes, window and mem_offset bounded as kernel_span bounds them. kv_head_index must be int64 [H] with values in [0, Hk). Every input shares q's dtype, but with
// narrow_keys k and v may share float16 or bfloat16 under a float32 q (the CPU forward reads them widened).
RelAttnShape check_rel_attn_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& r, const at::Tensor& u, const at::Tensor& vb,
                                   const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset,
                                   bool narrow_keys = false);

std::tuple<at::Tensor, at::Tensor> rel_memory_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r, const at::Tensor& u,
    const at::Tensor& vb, const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset, double scale,
    bool float32_out);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rel_memory_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r,
    const at::Tensor& u, const at::Tensor& vb, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset, double scale);

}  // namespace memtx
