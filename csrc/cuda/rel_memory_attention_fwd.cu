// Forward launcher of rel_memory_attention (SPEC §1) and the size queries of the CUDA backend.
#include "rel_memory_attention_dispatch.cuh"
#include "rel_memory_attention_fwd.cuh"

namespace memtx {
namespace cuda {

using namespace kernels;

int max_head_dim() { return kMaxHeadDim; }

int query_block_rows(int D, DType dtype) {
  int rows = 0;
  dispatch(dtype, D, [&](auto, auto cfg) {
    rows = decltype(cfg)::type::BM;
    return cudaSuccess;
  });
  return rows;
}

int shared_memory_bytes(int D, DType dtype) {
  size_t bytes = 0;
  dispatch(dtype, D, [&](auto policy, auto cfg) {
    using Lay = SmemLayout<typename decltype(policy)::type::Elem, typename decltype(cfg)::type>;
    bytes = Lay::fwd_bytes > Lay::dq_bytes ? Lay::fwd_bytes : Lay::dq_bytes;
    bytes = bytes > Lay::dkv_bytes ? bytes : Lay::dkv_bytes;
    return cudaSuccess;
  });
  return int(bytes);
}

cudaError_t rel_attn_forward(const RelAttnProblem& problem, const RelAttnForward& fwd, cudaStream_t stream) {
  if (int64_t(problem.B) * problem.H * problem.L == 0) return cudaSuccess;
  KernelArgs args = make_args(problem);
  args.fwd = fwd;
  return dispatch(problem.dtype, problem.D, [&](auto policy, auto cfg) {
    using P = typename decltype(policy)::type;
    using Cfg = typename decltype(cfg)::type;
    const size_t smem = SmemLayout<typename P::Elem, Cfg>::fwd_bytes;
    auto kernel = fwd_kernel<P, Cfg>;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(query_blocks(problem, Cfg::BM), problem.H, problem.B);
    kernel<<<grid, Cfg::THREADS, smem, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace memtx
