// CUDA implementation of the memtx_C relative-memory-attention operators (SPEC §1): checks, output
// allocation and the calls into the kernels of rel_memory_attention_*.cu. Compiled only in CUDA builds.
//
// The forward writes out (of the inputs' dtype, or float32 with float32_out: the out the backward reads) and lse
// (float32); where its query blocks cannot fill the device it splits their keys (forward_key_splits) into parts
// whose float32 scratch it allocates here. The backward writes dq, dk, dv directly; dr is accumulated in a
// float32 buffer with atomics (so it is not bitwise deterministic), du and dvb from per-block partials
// (deterministic). q, k, v, grad_out and out are read through their strides (last dim contiguous).
//
// tests/cuda_emulation compiles this file as it is, with MEMTX_HOST_EMULATION (its emulator runs the kernels on
// the CPU): there the kernels' device is the CPU, and the two functions are registered in the emulator's own
// operator namespace instead of memtx_C (runner.cpp).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../common/rel_memory_attention.h"
#include "rel_memory_attention_launch.h"

namespace memtx {
namespace {

cuda::DType dtype_of(at::ScalarType scalar_type) {
  switch (scalar_type) {
    case at::kHalf:
      return cuda::DType::kHalf;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kFloat:
      return cuda::DType::kFloat;
    default:
      TORCH_CHECK(false, "rel_memory_attention (cuda backend): supports float16, bfloat16 and float32, got ",
                  scalar_type);
  }
}

cuda::Strided4 strided(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// The device the kernels run on: CUDA, or the CPU under the host emulator (whose CPU tensors are its device memory).
#if defined(MEMTX_HOST_EMULATION)
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
#endif

int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "rel_memory_attention (cuda backend): ", what, " = ",
              v, " does not fit in int32");
  return int(v);
}

// Device, dtype, head dim and shared memory of the device; returns the kernels' dtype.
cuda::DType check_cuda(const at::Tensor& q, const RelAttnShape& s) {
  TORCH_CHECK(q.device().type() == kKernelDevice, "rel_memory_attention_fwd_cuda: expected ",
              c10::DeviceTypeName(kKernelDevice), " tensors, got ", q.device());
  const cuda::DType dtype = dtype_of(q.scalar_type());
  TORCH_CHECK(s.D >= 1 && s.D <= cuda::max_head_dim(), "rel_memory_attention (cuda backend): head dim D=", s.D,
              " is not supported (D <= ", cuda::max_head_dim(), "); use backend='triton' or 'reference'");
  TORCH_CHECK(s.H <= 65535 && s.Hk <= 65535 && s.B <= 65535,
              "rel_memory_attention (cuda backend): B, H and Hk must be <= 65535 (grid dimensions)");
  int major = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, q.get_device()));
  TORCH_CHECK(major >= 8, "rel_memory_attention (cuda backend): needs compute capability 8.0 or newer (mma.sync ",
              "with bf16/tf32), got major ", major, "; use backend='triton' or 'reference'");
  const int smem = cuda::shared_memory_bytes(int(s.D), dtype);
  TORCH_CHECK(smem <= smem_optin, "rel_memory_attention (cuda backend): needs ", smem,
              " bytes of shared memory per block for D=", s.D, ", the device allows ", smem_optin);
  return dtype;
}

// The launchers' description of one call (all tensors already checked; u, vb, kv_head contiguous on q's device).
cuda::RelAttnProblem make_problem(const RelAttnShape& s, cuda::DType dtype, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& r, const at::Tensor& u, const at::Tensor& vb,
                                  const at::Tensor& kv_head, double scale) {
  cuda::RelAttnProblem p{};
  p.q = strided(q);
  p.k = strided(k);
  p.v = strided(v);
  p.r = r.data_ptr();
  p.r_sh = r.stride(0);
  p.r_sr = r.stride(1);
  p.u = u.data_ptr();
  p.vb = vb.data_ptr();
  p.kv_head = kv_head.data_ptr<int64_t>();
  p.B = to_int(s.B, "B");
  p.H = to_int(s.H, "H");
  p.L = to_int(s.L, "L");
  p.D = to_int(s.D, "D");
  p.Hk = to_int(s.Hk, "Hk");
  p.K = to_int(s.K, "K");
  p.M = to_int(s.M, "M");
  p.R = to_int(s.R, "R");
  p.window = s.window >= s.K ? 0 : int(s.window);  // a window of K or more keys restricts nothing
  p.mem_offset = s.mem_offset;
  p.scale = float(scale);
  p.dtype = dtype;
  return p;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rel_memory_attention (cuda backend): ", what, " failed: ", cudaGetErrorString(err));
}

at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> rel_memory_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r, const at::Tensor& u,
    const at::Tensor& vb, const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset, double scale,
    bool float32_out) {
  const RelAttnShape s = check_rel_attn_inputs(q, k, v, r, u, vb, kv_head_index, window, mem_offset);
  const cuda::DType dtype = check_cuda(q, s);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto f32 = q.options().dtype(at::kFloat);
  auto out = at::empty({s.B, s.H, s.L, s.D}, float32_out ? f32 : q.options());
  auto lse = at::empty({s.B, s.H, s.L}, f32);
  const auto kv_head = kv_head_index.to(q.device(), at::kLong).contiguous();
  const auto uc = u.contiguous(), vbc = vb.contiguous();
  const cuda::RelAttnProblem p = make_problem(s, dtype, q, k, v, r, uc, vbc, kv_head, scale);
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, q.get_device()));
  const int splits = cuda::forward_key_splits(p, multiprocessors);
  // the parts' float32 scratch (forward_key_splits): unnormalised outputs, then row maxima and sums
  at::Tensor part_o, part_ml;
  if (splits > 1) {
    part_o = at::empty({splits, s.B * s.H * s.L, s.D}, f32);
    part_ml = at::empty({splits, 2, s.B * s.H * s.L}, f32);
  }
  const cuda::RelAttnForward fwd{out.data_ptr(), lse.data_ptr<float>(), out.scalar_type() == at::kFloat, splits,
                                 splits > 1 ? part_o.data_ptr<float>() : nullptr,
                                 splits > 1 ? part_ml.data_ptr<float>() : nullptr};
  check_launch(cuda::rel_attn_forward(p, fwd, c10::cuda::getCurrentCUDAStream()), "forward kernel launch");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rel_memory_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r,
    const at::Tensor& u, const at::Tensor& vb, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset, double scale) {
  const RelAttnShape s = check_rel_attn_inputs(q, k, v, r, u, vb, kv_head_index, window, mem_offset);
  const cuda::DType dtype = check_cuda(q, s);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "rel_memory_attention_bwd_cuda: grad_out and out must have the shape of q");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == at::kFloat,
              "rel_memory_attention_bwd_cuda: grad_out must have the dtype of q, and out must be the forward's float32 "
              "out (float32_out=True); got grad_out ", grad_out.scalar_type(), ", out ", out.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.numel() == s.B * s.H * s.L,
              "rel_memory_attention_bwd_cuda: lse must be float32 [B, H, L]");
  for (const at::Tensor* t : {&grad_out, &out, &lse})
    TORCH_CHECK(t->device() == q.device(), "rel_memory_attention_bwd_cuda: all tensors must be on ", q.device());
  at::globalContext().alertNotDeterministic("rel_memory_attention_bwd_cuda (dr is accumulated with atomics)");
  const c10::cuda::CUDAGuard guard(q.device());

  const auto dout = last_dim_contiguous(grad_out), outc = last_dim_contiguous(out);
  const auto lsec = lse.contiguous();
  const auto kv_head = kv_head_index.to(q.device(), at::kLong).contiguous();
  const auto uc = u.contiguous(), vbc = vb.contiguous();
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t n_qb = (s.L + cuda::query_block_rows(int(s.D), dtype) - 1) / cuda::query_block_rows(int(s.D), dtype);

  auto dq = at::empty({s.B, s.H, s.L, s.D}, q.options());
  auto dk = at::empty({s.B, s.Hk, s.K, s.D}, q.options());
  auto dv = at::empty({s.B, s.Hk, s.K, s.D}, q.options());
  auto dr_acc = at::zeros({s.Hk, s.R, s.D}, f32);
  auto du_part = at::empty({s.B * n_qb, s.H, s.D}, f32);
  auto dvb_part = at::empty({s.B * n_qb, s.H, s.D}, f32);
  auto delta = at::empty({s.B, s.H, s.L}, f32);

  const cuda::RelAttnProblem p = make_problem(s, dtype, q, k, v, r, uc, vbc, kv_head, scale);
  cuda::RelAttnBackward bwd{};
  bwd.dout = strided(dout);
  bwd.out = strided(outc);
  bwd.lse = lsec.data_ptr<float>();
  bwd.delta = delta.data_ptr<float>();
  bwd.dq = dq.data_ptr();
  bwd.dk = dk.data_ptr();
  bwd.dv = dv.data_ptr();
  bwd.dr_acc = dr_acc.data_ptr<float>();
  bwd.du_part = du_part.data_ptr<float>();
  bwd.dvb_part = dvb_part.data_ptr<float>();
  check_launch(cuda::rel_attn_backward(p, bwd, c10::cuda::getCurrentCUDAStream()), "backward kernel launch");

  auto dr = dr_acc.to(q.scalar_type());
  auto du = du_part.sum(0).to(q.scalar_type());
  auto dvb = dvb_part.sum(0).to(q.scalar_type());
  return {dq, dk, dv, dr, du, dvb};
}

// The shared memory per block that check_cuda requires for (head_dim, dtype), for the Python dispatcher to refuse a
// GPU that cannot give it before any launch (memtx_ops/backends/cuda.py; backend="auto" then takes Triton).
int64_t cuda_shared_memory_bytes(int64_t head_dim, at::ScalarType scalar_type) {
  TORCH_CHECK(head_dim >= 1 && head_dim <= cuda::max_head_dim(), "cuda_shared_memory_bytes: head dim ", head_dim,
              " is not supported (D <= ", cuda::max_head_dim(), ")");
  return cuda::shared_memory_bytes(int(head_dim), dtype_of(scalar_type));
}

#if !defined(MEMTX_HOST_EMULATION)  // the emulator registers the two in a namespace of its own (runner.cpp)
TORCH_LIBRARY_IMPL(memtx_C, CUDA, m) {
  m.impl("rel_memory_attention_fwd", &rel_memory_attention_fwd_cuda);
  m.impl("rel_memory_attention_bwd", &rel_memory_attention_bwd_cuda);
}

// No tensor argument, so no dispatch key: the schema and its one kernel, in CUDA builds only.
TORCH_LIBRARY_FRAGMENT(memtx_C, m) {
  m.def("cuda_shared_memory_bytes(int head_dim, ScalarType dtype) -> int", &cuda_shared_memory_bytes);
}
#endif

}  // namespace memtx
