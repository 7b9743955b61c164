// Host interface of the CUDA kernels of rel_memory_attention (SPEC §1): plain structs of device pointers,
// element strides and sizes, and the launchers. Shared by the ATen wrapper (rel_memory_attention_cuda.cpp)
// and the .cu files; it includes no torch header, so nvcc compiles the kernels without ATen.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace memtx {
namespace cuda {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2 };

// One [B, heads, rows, D] tensor: element strides of its first three dims, last dim contiguous.
struct Strided4 {
  const void* data;
  int64_t sb, sh, sr;
};

// The inputs of one call. q [B, H, L, D]; k, v [B, Hk, K, D], K = M + L; r [Hk, R, D] (strides r_sh, r_sr);
// u, vb [H, D] contiguous; kv_head [H] int64 on the device. All tensors share `dtype` and the device.
struct RelAttnProblem {
  Strided4 q, k, v;
  const void* r;
  int64_t r_sh, r_sr;
  const void* u;
  const void* vb;
  const int64_t* kv_head;
  int B, H, L, D, Hk, K, M, R;
  int window;          // 0: no window; else 1 <= window <= K
  int64_t mem_offset;  // extra distance of memory keys (j < M), >= 0
  float scale;
  DType dtype;
};

// Outputs of the forward: out [B, H, L, D] contiguous, of dtype or, with out_float32, float32 (the out the
// backward reads: its delta from a rounded out would swamp the gradients of queries that see few keys);
// lse [B, H, L] float32 (natural log). With key_splits S > 1 (forward_key_splits) the keys of every query block
// are split into S parts, whose float32 scratch part_o [S, B * H * L, D] and part_ml [S, 2, B * H * L] the caller
// allocates (unused, may be null, with S = 1).
struct RelAttnForward {
  void* out;
  float* lse;
  bool out_float32;
  int key_splits;
  float* part_o;
  float* part_ml;
};

// Inputs and outputs of the backward. dq [B, H, L, D] and dk, dv [B, Hk, K, D] are contiguous, of dtype,
// fully written. dr_acc [Hk, R, D] float32 must be zeroed by the caller (it is accumulated with atomics).
// du_part, dvb_part [B * query_blocks(D, dtype), H, D] float32 are fully written: sum them over dim 0.
struct RelAttnBackward {
  Strided4 dout, out;  // [B, H, L, D]: dout of dtype, out float32 (the forward's, with out_float32)
  const float* lse;    // [B, H, L] contiguous
  float* delta;        // [B, H, L] scratch: rowsum(dout * out)
  void* dq;
  void* dk;
  void* dv;
  float* dr_acc;
  float* du_part;
  float* dvb_part;
};

// Largest head dim the kernels support.
int max_head_dim();

// Query rows per block of the backward (the number of du/dvb partials is B * ceil(L / rows) * H).
int query_block_rows(int D, DType dtype);

// Largest dynamic shared memory (bytes) one block of the kernels for (D, dtype) needs; compare it with the
// device's cudaDevAttrMaxSharedMemoryPerBlockOptin (every configuration fits sm_80 and sm_90).
int shared_memory_bytes(int D, DType dtype);

// Parts to split each query block's keys into (flash-decoding) on a device of `multiprocessors`: as many as keep
// the forward's blocks (B x H x query blocks x parts) within one wave (multiprocessors x the blocks resident on
// one, by cudaOccupancyMaxActiveBlocksPerMultiprocessor), at most one per key block and 64; 1 when the unsplit
// blocks fill more than half a wave, and for an unsupported D.
int forward_key_splits(const RelAttnProblem& problem, int multiprocessors);

// Launch on `stream`; return the first CUDA error (cudaErrorInvalidValue for an unsupported D).
cudaError_t rel_attn_forward(const RelAttnProblem& problem, const RelAttnForward& fwd, cudaStream_t stream);
cudaError_t rel_attn_backward(const RelAttnProblem& problem, const RelAttnBackward& bwd, cudaStream_t stream);

}  // namespace cuda
}  // namespace memtx
