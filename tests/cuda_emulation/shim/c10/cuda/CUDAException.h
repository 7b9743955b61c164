// Host-emulator stand-in for torch's c10/cuda/CUDAException.h (see CUDAGuard.h): C10_CUDA_CHECK raises, as the
// real one does, with the runtime's description of the error (the emulated cudaGetErrorString, runner.cpp).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#define C10_CUDA_CHECK(EXPR)                                                                    \
  do {                                                                                          \
    const cudaError_t memtx_emu_err = (EXPR);                                                   \
    TORCH_CHECK(memtx_emu_err == cudaSuccess, "CUDA error: ", cudaGetErrorString(memtx_emu_err)); \
  } while (0)
