// Forward launcher of rel_memory_attention (SPEC §1): its key splits (flash-decoding) and merge, and the size
// queries of the CUDA backend.
#include <algorithm>

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

constexpr int kMaxKeySplits = 64;

int forward_key_splits(const RelAttnProblem& problem, int multiprocessors) {
  int splits = 1;
  dispatch(problem.dtype, problem.D, [&](auto policy, auto cfg) {
    using P = typename decltype(policy)::type;
    using Cfg = typename decltype(cfg)::type;
    const size_t smem = SmemLayout<typename P::Elem, Cfg>::fwd_bytes;
    auto kernel = fwd_kernel<P, Cfg>;
    int resident = 0;
    cudaError_t err = allow_smem(kernel, smem);
    if (err == cudaSuccess)
      err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, reinterpret_cast<const void*>(kernel),
                                                          Cfg::THREADS, smem);
    if (err != cudaSuccess) return err;
    const int64_t wave = int64_t(std::max(resident, 1)) * std::max(multiprocessors, 1);
    const int64_t blocks = std::max<int64_t>(int64_t(problem.B) * problem.H * query_blocks(problem, Cfg::BM), 1);
    splits = int(std::max<int64_t>(
        1, std::min<int64_t>({wave / blocks, kMaxKeySplits, num_key_blocks(problem, Cfg::BN)})));
    return cudaSuccess;
  });
  return splits;
}

cudaError_t rel_attn_forward(const RelAttnProblem& problem, const RelAttnForward& fwd, cudaStream_t stream) {
  if (int64_t(problem.B) * problem.H * problem.L == 0) return cudaSuccess;
  const int splits = fwd.key_splits;
  if (splits < 1 || splits > kMaxKeySplits || (splits > 1 && (fwd.part_o == nullptr || fwd.part_ml == nullptr)))
    return cudaErrorInvalidValue;
  KernelArgs args = make_args(problem);
  args.fwd = fwd;
  return dispatch(problem.dtype, problem.D, [&](auto policy, auto cfg) {
    using P = typename decltype(policy)::type;
    using Cfg = typename decltype(cfg)::type;
    const size_t smem = SmemLayout<typename P::Elem, Cfg>::fwd_bytes;
    auto kernel = fwd_kernel<P, Cfg>;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(query_blocks(problem, Cfg::BM) * splits, problem.H, problem.B);
    kernel<<<grid, Cfg::THREADS, smem, stream>>>(args);
    err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1) return err;
    const int64_t elements = int64_t(problem.B) * problem.H * problem.L * problem.D;
    merge_key_splits_kernel<typename P::Elem>
        <<<dim3(unsigned((elements + kMergeThreads - 1) / kMergeThreads)), kMergeThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace memtx
