// Host side of the host-emulated CUDA backend (see emu.h): the real ATen wrapper rel_memory_attention_cuda.cpp
// (included here, so that the registration below names its functions with their own types), the CUDA runtime
// calls it and the launchers make, the emulated device memory, the wrapper's two operators registered as
// torch.ops.memtx_cuda_emu.*, and the test's ctypes entry points. Linked with csrc/common/check_inputs.cpp and
// the real launchers (rel_memory_attention_{fwd,bwd_dq,bwd_dkv}.cu, `<<<...>>>` rewritten to emu::launch_kernel)
// into one library, loaded with torch.ops.load_library. Compiled with -include emu.h against the CPU torch's
// headers, with shim/ (c10/cuda, which the CPU wheel has no library for) first on the include path.
#include "rel_memory_attention_cuda.cpp"

#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <utility>

namespace memtx {
namespace emu {

// Device memory: while the test installs it (emu_device_memory), torch's CPU allocator, so every buffer the
// wrapper allocates (outputs, scratch, partial sums, copies) comes from here. A buffer starts as 0xff bytes, NaN
// in float32, float16 and bfloat16, so an element no kernel writes stays NaN; it lies between guard zones of 0xff
// bytes, checked when it is freed and by check(), so a write past either end is reported.
class DeviceMemory final : public c10::Allocator {
 public:
  static constexpr size_t kAlign = 64, kGuard = 256;

  c10::DataPtr allocate(size_t n) override {
    auto* base = static_cast<unsigned char*>(std::aligned_alloc(kAlign, span(n)));
    TORCH_CHECK(base != nullptr, "cuda emulator: out of memory (", n, " bytes)");
    std::memset(base, 0xff, span(n));
    unsigned char* data = base + kGuard;
    const std::lock_guard<std::mutex> lock(mutex_);
    live_[data] = n;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  // "" when the guard zones of every buffer are intact (the live ones, and those freed since the last call); else
  // what the first broken one was.
  std::string check() {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& [data, n] : live_) inspect(data, n);
    return std::exchange(fault_, std::string());
  }

  static DeviceMemory& instance() {
    static auto* memory = new DeviceMemory;  // never destroyed: tensors may be freed at exit
    return *memory;
  }

 private:
  static size_t span(size_t n) { return kGuard + (n + kAlign - 1) / kAlign * kAlign + kGuard; }

  static void release(void* ctx) {
    DeviceMemory& m = instance();
    auto* data = static_cast<unsigned char*>(ctx);
    const std::lock_guard<std::mutex> lock(m.mutex_);
    const auto it = m.live_.find(data);
    m.inspect(data, it->second);
    m.live_.erase(it);
    std::free(data - kGuard);
  }

  // Records the first changed byte of the guard zones (and the padding to kAlign) around data[0, n).
  void inspect(const unsigned char* data, size_t n) {
    const unsigned char* end = data - kGuard + span(n);
    for (const unsigned char* p = data - kGuard; p < end && fault_.empty(); p = p + 1 == data ? data + n : p + 1)
      if (*p != 0xff)
        fault_ = "cuda emulator: a write outside a buffer of " + std::to_string(n) + " bytes of device memory, at " +
                 "byte " + std::to_string(long(p - data)) + " of it";
  }

  std::mutex mutex_;
  std::map<unsigned char*, size_t> live_;
  std::string fault_;
};

}  // namespace emu
}  // namespace memtx

// The wrapper's operators in a namespace of their own (memtx_C belongs to the real extension, which may be loaded
// in the same process); their schemas are inferred from the C++ signatures.
TORCH_LIBRARY(memtx_cuda_emu, m) {
  m.def("rel_memory_attention_fwd", &memtx::rel_memory_attention_fwd_cuda);
  m.def("rel_memory_attention_bwd", &memtx::rel_memory_attention_bwd_cuda);
}

extern "C" {

// The CUDA runtime, as far as the launchers and the wrapper call it.

cudaError_t cudaGetLastError(void) {
  const cudaError_t err = memtx::emu::E().last_error;
  memtx::emu::E().last_error = cudaSuccess;
  return err;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  memtx::emu::Emulator& e = memtx::emu::E();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > e.device_smem_optin)
    return cudaErrorInvalidValue;
  e.smem_optin[func] = value;
  return cudaSuccess;
}

// The emulator's one device: ordinal 0, or -1, the index a CPU tensor reports (the wrapper passes q.get_device()).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  const memtx::emu::Emulator& e = memtx::emu::E();
  if (device != 0 && device != -1) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor:
      *value = e.device_major;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = e.device_smem_optin;
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = e.device_multiprocessors;
      return cudaSuccess;
    default:
      return cudaErrorInvalidValue;  // not emulated
  }
}

// One block per multiprocessor, or none when the block needs more dynamic shared memory than the kernel may have
// (48 KB unless cudaFuncSetAttribute raised it), as the runtime answers then.
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* func, int block_size,
                                                          size_t smem_bytes) {
  const memtx::emu::Emulator& e = memtx::emu::E();
  if (block_size < 1 || block_size > 1024) return cudaErrorInvalidValue;
  const auto optin = e.smem_optin.find(func);
  *blocks = smem_bytes <= (optin == e.smem_optin.end() ? memtx::emu::kDefaultSmemBytes : size_t(optin->second));
  return cudaSuccess;
}

// The runtime's description of the error, followed by the emulator's message where the last launch left one (it
// failed or was refused).
const char* cudaGetErrorString(cudaError_t err) {
  static std::string text;
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      text = "invalid argument";
      break;
    case cudaErrorInvalidConfiguration:
      text = "invalid configuration argument";
      break;
    case cudaErrorInvalidDevice:
      text = "invalid device ordinal";
      break;
    case cudaErrorLaunchFailure:
      text = "unspecified launch failure";
      break;
    default:
      text = "unrecognized error code " + std::to_string(int(err));
  }
  if (!memtx::emu::E().message.empty()) text += " (" + memtx::emu::E().message + ")";
  return text.c_str();
}

// The test's controls.

// Seed of the fiber schedule of the next launches. The launch count restarts too, so the schedules of a test's
// launches depend on its seed alone, not on how many launches the tests before it made (pytest-randomly's order).
void emu_set_seed(unsigned seed) {
  memtx::emu::E().seed = seed;
  memtx::emu::E().launches = 0;
}

// Why the last launch failed or was refused ("" when it ran).
const char* emu_message() { return memtx::emu::message(); }

// Injects a fault (memtx::emu::Fault, as int) into the next launch, or into all for DropWaitAll; 0: none.
void emu_set_fault(int fault) { memtx::emu::E().fault = memtx::emu::Fault(fault); }

// The compute capability (major) and opt-in shared memory per block of the emulated device.
void emu_set_device(int major, int smem_optin) {
  memtx::emu::E().device_major = major;
  memtx::emu::E().device_smem_optin = smem_optin;
}

// The multiprocessors of the emulated device (cudaDevAttrMultiProcessorCount).
void emu_set_multiprocessors(int count) { memtx::emu::E().device_multiprocessors = count; }

// Launches run since the last emu_set_seed.
unsigned emu_launches() { return memtx::emu::E().launches; }

// No fault, the default device (an sm_80 of one multiprocessor).
void emu_reset() {
  emu_set_fault(0);
  emu_set_device(8, memtx::emu::kMaxSmemOptin);
  emu_set_multiprocessors(1);
}

// 1: the emulator's device memory becomes torch's CPU allocator; 0: the allocator it replaced is back. -> 0, or -1
// when torch keeps another one (registered with a higher priority).
int emu_device_memory(int on) {
  static c10::Allocator* replaced = nullptr;
  c10::Allocator* memory = &memtx::emu::DeviceMemory::instance();
  if (on && c10::GetCPUAllocator() != memory) {
    replaced = c10::GetCPUAllocator();
    c10::SetCPUAllocator(memory);
    return c10::GetCPUAllocator() == memory ? 0 : -1;
  }
  if (!on && replaced != nullptr) {
    c10::SetCPUAllocator(replaced);
    replaced = nullptr;
  }
  return 0;
}

// "" when no kernel wrote outside a buffer of device memory (see DeviceMemory::check).
const char* emu_device_memory_check() {
  static std::string fault;
  fault = memtx::emu::DeviceMemory::instance().check();
  return fault.c_str();
}

}  // extern "C"
