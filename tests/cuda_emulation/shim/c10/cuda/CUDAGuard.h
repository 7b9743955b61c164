// Host-emulator stand-in for torch's c10/cuda/CUDAGuard.h (the CPU torch wheel ships the header but not
// libc10_cuda, which implements it). The emulator has one device, whose memory is the CPU's: the guard accepts
// that device only, as the real one accepts only CUDA devices, and has nothing to switch.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace c10 {
namespace cuda {

class CUDAGuard {
 public:
  explicit CUDAGuard(Device device) {
    TORCH_CHECK(device.is_cpu(), "CUDAGuard (host emulator): expected the emulated device (cpu), got ", device);
  }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

}  // namespace cuda
}  // namespace c10
