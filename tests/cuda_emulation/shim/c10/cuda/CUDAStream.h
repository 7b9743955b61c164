// Host-emulator stand-in for torch's c10/cuda/CUDAStream.h (see CUDAGuard.h): the emulator has no streams, so the
// current stream is the default one (nullptr), which its launches ignore.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  operator cudaStream_t() const { return stream(); }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(DeviceIndex /*device_index*/ = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
