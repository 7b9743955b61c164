// Host-side dispatch shared by the .cu files: tile configuration per (dtype, head dim), kernel arguments,
// launch helpers. Each .cu instantiates only the kernels it launches, so the files compile in parallel.
// Needs only the runtime API (nvcc adds cuda_runtime.h to every .cu for the launches).
#pragma once

#include <cstdint>
#include <type_traits>

#include "rel_memory_attention_common.cuh"

namespace memtx {
namespace cuda {
namespace kernels {

template <class T>
struct Type {
  using type = T;
};

// Tile configuration of policy P for padded head dim DP (32, 64 or 128); see SmemLayout for the bytes.
//   fp16/bf16: BM 64 (4 warps); BN 64 for DP <= 64, 32 for DP = 128.
//   fp32:      DP 32 as fp16; DP >= 64: BM 32 (2 warps), BN 32 (tiles are twice as wide in bytes).
template <class P, int DP>
struct ConfigFor {
  static constexpr bool kF32 = std::is_same<typename P::Elem, float>::value;
  static constexpr int kBN = (DP <= 32 || (!kF32 && DP <= 64)) ? 64 : 32;
  static constexpr int kNW = (kF32 && DP >= 64) ? 2 : 4;
  using type = TileConfig<DP, kBN, kNW>;
  using Lay = SmemLayout<typename P::Elem, type>;
  static_assert(Lay::fwd_bytes <= kMaxSmemBytes && Lay::dq_bytes <= kMaxSmemBytes &&
                    Lay::dkv_bytes <= kMaxSmemBytes,
                "tile configuration exceeds the shared memory of sm_80");
};

constexpr int kMaxHeadDim = 128;

inline int padded_head_dim(int D) { return D <= 32 ? 32 : (D <= 64 ? 64 : 128); }

// Calls f(Type<P>{}, Type<Cfg>{}) for the policy of `dtype` and the configuration of head dim D.
template <class F>
cudaError_t dispatch(DType dtype, int D, F&& f) {
  if (D < 1 || D > kMaxHeadDim) return cudaErrorInvalidValue;
  auto with_policy = [&](auto policy) -> cudaError_t {
    using P = typename decltype(policy)::type;
    switch (padded_head_dim(D)) {
      case 32:
        return f(policy, Type<typename ConfigFor<P, 32>::type>{});
      case 64:
        return f(policy, Type<typename ConfigFor<P, 64>::type>{});
      default:
        return f(policy, Type<typename ConfigFor<P, 128>::type>{});
    }
  };
  switch (dtype) {
    case DType::kHalf:
      return with_policy(Type<Policy16<__half>>{});
    case DType::kBFloat16:
      return with_policy(Type<Policy16<__nv_bfloat16>>{});
    case DType::kFloat:
      return with_policy(Type<PolicyTF32x3>{});
  }
  return cudaErrorInvalidValue;
}

inline size_t element_size(DType dtype) { return dtype == DType::kFloat ? 4 : 2; }

// True when 16-byte loads of rows are safe: D and every stride a multiple of 16 bytes, base aligned.
inline bool vec_ok(const void* data, int64_t s0, int64_t s1, int64_t s2, int D, size_t elem) {
  const int64_t ch = int64_t(16 / elem);
  return D % ch == 0 && reinterpret_cast<uintptr_t>(data) % 16 == 0 && s0 % ch == 0 && s1 % ch == 0 &&
         s2 % ch == 0;
}

inline bool vec_ok(const Strided4& t, int D, size_t elem) { return vec_ok(t.data, t.sb, t.sh, t.sr, D, elem); }

inline KernelArgs make_args(const RelAttnProblem& p) {
  KernelArgs a{};
  a.p = p;
  const size_t es = element_size(p.dtype);
  a.vec.q = vec_ok(p.q, p.D, es);
  a.vec.k = vec_ok(p.k, p.D, es);
  a.vec.v = vec_ok(p.v, p.D, es);
  a.vec.r = vec_ok(p.r, p.r_sh, p.r_sr, 0, p.D, es);
  return a;
}

// Raises the kernel's dynamic shared-memory limit when it needs more than the default 48 KB.
template <class Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                              int(bytes));
}

inline int query_blocks(const RelAttnProblem& p, int BM) { return (p.L + BM - 1) / BM; }

// The dk/dv kernel (rel_memory_attention_bwd_dkv.cu).
cudaError_t launch_dkv(const KernelArgs& args, cudaStream_t stream);

}  // namespace kernels
}  // namespace cuda
}  // namespace memtx
