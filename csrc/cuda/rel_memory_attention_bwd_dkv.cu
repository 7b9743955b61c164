// Launcher of the dk/dv kernel of the rel_memory_attention backward (one block per key block, kv head, batch).
#include "rel_memory_attention_bwd_dkv.cuh"
#include "rel_memory_attention_dispatch.cuh"

namespace memtx {
namespace cuda {
namespace kernels {

cudaError_t launch_dkv(const KernelArgs& args, cudaStream_t stream) {
  const RelAttnProblem& problem = args.p;
  if (int64_t(problem.B) * problem.Hk * problem.K == 0) return cudaSuccess;
  return dispatch(problem.dtype, problem.D, [&](auto policy, auto cfg) {
    using P = typename decltype(policy)::type;
    using Cfg = typename decltype(cfg)::type;
    const size_t smem = SmemLayout<typename P::Elem, Cfg>::dkv_bytes;
    auto kernel = dkv_kernel<P, Cfg>;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(num_key_blocks(problem, Cfg::BN), problem.Hk, problem.B);
    kernel<<<grid, Cfg::THREADS, smem, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace kernels
}  // namespace cuda
}  // namespace memtx
