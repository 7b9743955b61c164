// ctypes entry points of the host-emulated CUDA backend (see emu.h), linked with the real launchers of
// csrc/cuda (rel_memory_attention_{fwd,bwd_dq,bwd_dkv}.cu, their `<<<...>>>` launches rewritten to
// emu::launch_kernel), plus the two CUDA runtime calls those launchers make. Compiled with -include emu.h.
#include <cstddef>
#include <cstring>

#include "rel_memory_attention_launch.h"

using memtx::cuda::DType;
using memtx::cuda::RelAttnBackward;
using memtx::cuda::RelAttnForward;
using memtx::cuda::RelAttnProblem;
using memtx::cuda::Strided4;

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t err = memtx::emu::E().last_error;
  memtx::emu::E().last_error = cudaSuccess;
  return err;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > memtx::emu::kMaxSmemOptin)
    return cudaErrorInvalidValue;
  memtx::emu::E().smem_optin[func] = value;
  return cudaSuccess;
}

// Seed of the fiber schedule of the next calls.
void emu_set_seed(unsigned seed) { memtx::emu::E().seed = seed; }

// Why the last call failed ("" when it did not).
const char* emu_message() { return memtx::emu::message(); }

// Byte offset of "Struct.field", size of "Struct", value of "DType::kX"; -1 for a name not listed here. The
// test checks its ctypes mirrors of the structs of rel_memory_attention_launch.h against these.
long emu_layout(const char* name) {
#define MEMTX_FIELD(S, f) {#S "." #f, long(offsetof(S, f))}
  static const struct {
    const char* name;
    long value;
  } table[] = {
      {"Strided4", long(sizeof(Strided4))},
      MEMTX_FIELD(Strided4, data), MEMTX_FIELD(Strided4, sb), MEMTX_FIELD(Strided4, sh), MEMTX_FIELD(Strided4, sr),
      {"RelAttnProblem", long(sizeof(RelAttnProblem))},
      MEMTX_FIELD(RelAttnProblem, q), MEMTX_FIELD(RelAttnProblem, k), MEMTX_FIELD(RelAttnProblem, v),
      MEMTX_FIELD(RelAttnProblem, r), MEMTX_FIELD(RelAttnProblem, r_sh), MEMTX_FIELD(RelAttnProblem, r_sr),
      MEMTX_FIELD(RelAttnProblem, u), MEMTX_FIELD(RelAttnProblem, vb), MEMTX_FIELD(RelAttnProblem, kv_head),
      MEMTX_FIELD(RelAttnProblem, B), MEMTX_FIELD(RelAttnProblem, H), MEMTX_FIELD(RelAttnProblem, L),
      MEMTX_FIELD(RelAttnProblem, D), MEMTX_FIELD(RelAttnProblem, Hk), MEMTX_FIELD(RelAttnProblem, K),
      MEMTX_FIELD(RelAttnProblem, M), MEMTX_FIELD(RelAttnProblem, R), MEMTX_FIELD(RelAttnProblem, window),
      MEMTX_FIELD(RelAttnProblem, mem_offset), MEMTX_FIELD(RelAttnProblem, scale), MEMTX_FIELD(RelAttnProblem, dtype),
      {"RelAttnForward", long(sizeof(RelAttnForward))},
      MEMTX_FIELD(RelAttnForward, out), MEMTX_FIELD(RelAttnForward, lse),
      {"RelAttnBackward", long(sizeof(RelAttnBackward))},
      MEMTX_FIELD(RelAttnBackward, dout), MEMTX_FIELD(RelAttnBackward, out), MEMTX_FIELD(RelAttnBackward, lse),
      MEMTX_FIELD(RelAttnBackward, delta), MEMTX_FIELD(RelAttnBackward, dq), MEMTX_FIELD(RelAttnBackward, dk),
      MEMTX_FIELD(RelAttnBackward, dv), MEMTX_FIELD(RelAttnBackward, dr_acc), MEMTX_FIELD(RelAttnBackward, du_part),
      MEMTX_FIELD(RelAttnBackward, dvb_part),
      {"DType::kHalf", long(DType::kHalf)}, {"DType::kBFloat16", long(DType::kBFloat16)},
      {"DType::kFloat", long(DType::kFloat)},
  };
#undef MEMTX_FIELD
  for (const auto& entry : table)
    if (std::strcmp(entry.name, name) == 0) return entry.value;
  return -1;
}

int emu_query_block_rows(int D, int dtype) { return memtx::cuda::query_block_rows(D, DType(dtype)); }

// The launchers, as the ATen wrapper calls them; return the cudaError_t (message in emu_message()).
int emu_forward(const RelAttnProblem* problem, const RelAttnForward* fwd) {
  memtx::emu::E().failed = false;
  memtx::emu::E().message.clear();
  return int(memtx::cuda::rel_attn_forward(*problem, *fwd, nullptr));
}

int emu_backward(const RelAttnProblem* problem, const RelAttnBackward* bwd) {
  memtx::emu::E().failed = false;
  memtx::emu::E().message.clear();
  return int(memtx::cuda::rel_attn_backward(*problem, *bwd, nullptr));
}

}  // extern "C"
