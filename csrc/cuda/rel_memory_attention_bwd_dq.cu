// Backward launcher of rel_memory_attention (SPEC §1): delta, then dq/du/dvb/dr, then dk/dv (launch_dkv).
#include "rel_memory_attention_bwd_dq.cuh"
#include "rel_memory_attention_dispatch.cuh"

namespace memtx {
namespace cuda {

using namespace kernels;

cudaError_t rel_attn_backward(const RelAttnProblem& problem, const RelAttnBackward& bwd, cudaStream_t stream) {
  KernelArgs args = make_args(problem);
  args.bwd = bwd;
  const size_t es = element_size(problem.dtype);
  args.vec.dout = vec_ok(bwd.dout, problem.D, es);
  const int64_t rows = int64_t(problem.B) * problem.H * problem.L;

  if (rows > 0) {
    const cudaError_t err = dispatch(problem.dtype, problem.D, [&](auto policy, auto cfg) {
      using P = typename decltype(policy)::type;
      using Cfg = typename decltype(cfg)::type;
      constexpr int kRowsPerBlock = kDeltaThreads / 32;
      delta_kernel<typename P::Elem>
          <<<unsigned((rows + kRowsPerBlock - 1) / kRowsPerBlock), kDeltaThreads, 0, stream>>>(args);
      cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;

      const size_t smem = SmemLayout<typename P::Elem, Cfg>::dq_bytes;
      auto kernel = dq_kernel<P, Cfg>;
      e = allow_smem(kernel, smem);
      if (e != cudaSuccess) return e;
      const dim3 grid(query_blocks(problem, Cfg::BM), problem.H, problem.B);
      kernel<<<grid, Cfg::THREADS, smem, stream>>>(args);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  return launch_dkv(args, stream);
}

}  // namespace cuda
}  // namespace memtx
