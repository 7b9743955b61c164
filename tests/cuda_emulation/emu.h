// Host emulator of the CUDA features used by the memtx kernels (csrc/cuda), for testing them and their ATen wrapper
// on a CPU. Force-included (g++ -include emu.h) before every file of the emulator library (the kernels and
// launchers, the wrapper rel_memory_attention_cuda.cpp, check_inputs.cpp, runner.cpp): it defines
// MEMTX_HOST_EMULATION, which turns the kernels into plain C++ functions (and makes the wrapper take CPU tensors,
// registered under torch.ops.memtx_cuda_emu), and supplies the built-ins they call. A launch (the test rewrites
// `<<<...>>>` to emu::launch_kernel) runs the blocks one after another, each CUDA thread as a fiber (ucontext).
//
// Modelled, from the PTX ISA and the CUDA programming guide:
//  * __syncthreads and the warp operations (__syncwarp, __shfl_xor_sync, mma.sync, ldmatrix) are barriers that
//    every thread of the block / lane of the warp must reach; threads at different barriers, or waiting for
//    exited ones, are reported as a deadlock.
//  * An adversarial schedule: fibers switch only at barriers; one warp runs (lanes in random order) until all
//    of its lanes wait at __syncthreads, then a random other one, so a missing barrier reads stale data or the
//    NaN bytes dynamic shared memory starts with (guard zones around it catch stray writes).
//  * mma.sync m16n8k16 f16/bf16 and m16n8k8 tf32 fragment layouts (exact products, summed in double);
//    cvt.rna.tf32.f32; ldmatrix .x4 (.trans); alignment and shared-memory bounds of both; float atomicAdd.
//  * cp.async 16 bytes with zero fill, in flight until it lands: each copy lands after a random number of fiber
//    switches (drawn at issue), in any order, and at the latest when its thread runs cp.async.wait_all or exits.
//    __syncthreads does not wait for copies, as on the hardware: a read of a tile without the issuing threads'
//    wait_all before the barrier sees the NaN bytes shared memory starts with, or a part of the tile.
//  * Launch limits: 1-D blocks of at most 1024 threads, grid y, z <= 65535, dynamic shared memory above 48 KB
//    only as far as cudaFuncSetAttribute raised it (at most the device's opt-in limit, sm_80's 163 KB).
//  * What the host code sees (runner.cpp, shim/): one device, an sm_80 by default, whose memory is the CPU's
//    (cudaDeviceGetAttribute: compute capability, opt-in shared memory, multiprocessors, one by default);
//    cudaOccupancyMaxActiveBlocksPerMultiprocessor (one block, if the kernel may have its shared memory, else
//    none); cudaGetLastError, cudaFuncSetAttribute,
//    cudaGetErrorString (with the emulator's message); c10/cuda's CUDAGuard, current stream and C10_CUDA_CHECK.
//    Device memory: during the test's calls, torch's CPU allocator hands out buffers that start as NaN bytes
//    between guard zones, checked when they are freed and at the end of the calls.
// Not modelled: timing and performance; the memory model beyond barriers (writes are visible at once, and any
// warp operation orders shared memory like __syncwarp, so a missing __syncwarp next to an mma or shuffle goes
// unnoticed); cp.async groups (commit_group / wait_group: the kernels use wait_all only); concurrency between
// blocks (no cross-block races, e.g. on dr's atomics); the tensor cores' accumulation rounding and fast-math
// intrinsics (libm's exp2f, log2f); streams; bounds of global memory other than by guard zones (the device
// memory's around the wrapper's buffers, the test's NaN around its inputs). A failed check ends the launch with
// cudaErrorLaunchFailure and a message (emu::message()) instead of crashing the process; the wrapper raises it.
#pragma once
#define MEMTX_HOST_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define MEMTX_EMU_ASAN 1
#else
#define MEMTX_EMU_ASAN 0
#endif

namespace memtx {
namespace emu {

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;            // around dynamic shared memory
constexpr size_t kDefaultSmemBytes = 48 * 1024;  // without cudaFuncSetAttribute
constexpr int kMaxSmemOptin = 166912;          // sm_80: 163 KB per block

enum class State { Ready, AtWarpOp, AtSyncthreads, Exited };
enum class WarpOp { None, Syncwarp, Shfl, MmaF16, MmaBF16, MmaTF32, Ldsm, LdsmTrans };

// Faults the tests inject (emu_set_fault, runner.cpp), to see that the test catches them. DropWaitAll: every
// cp.async.wait_all does nothing (the kernels without their waits, a mutant that must fail). FailNextLaunch: the
// next launch fails in its first thread, as at a failed check. SkipNextLaunch: the next launch runs no block.
enum class Fault { None = 0, DropWaitAll = 1, FailNextLaunch = 2, SkipNextLaunch = 3 };

struct Copy {
  void* dst;
  const void* src;
  int bytes;
  int switches_left;  // lands after this many more fiber switches (unless a wait_all comes first)
};

struct Thread {
  ucontext_t ctx;
  State state;
  std::vector<Copy> copies;  // cp.async in flight
};

// Operands each lane deposits for the current warp operation, and its results (computed by the last lane in).
struct Warp {
  int arrived, ready;
  WarpOp op;
  float value[32];
  int lane_mask[32];
  uint32_t a[32][4], b[32][2];
  float acc[32][4];
  const void* row[32];
  uint32_t frag[32][4];
};

struct Emulator {
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t main_ctx;
  const void* main_stack = nullptr;
  size_t main_stack_size = 0;
  bool leaving_main = false;
  int nthreads = 0, current = -1, cur_warp = -1, at_syncthreads = 0, exited = 0;
  uint3 block{}, grid{};
  std::vector<unsigned char> smem_buf;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::function<void()> body;
  std::mt19937 rng;
  unsigned seed = 1, launches = 0;
  bool failed = false;
  std::string message;
  cudaError_t last_error = cudaSuccess;
  std::map<const void*, int> smem_optin;  // cudaFuncAttributeMaxDynamicSharedMemorySize per kernel
  // The device cudaDeviceGetAttribute describes (an sm_80 by default; emu_set_device), and the injected fault.
  // One multiprocessor by default (emu_set_multiprocessors), so that the forward splits keys only where the
  // test asks for it (see forward_key_splits).
  int device_major = 8, device_smem_optin = kMaxSmemOptin, device_multiprocessors = 1;
  Fault fault = Fault::None;
};

inline Emulator& E() {
  static Emulator e;
  return e;
}

inline const char* message() { return E().message.c_str(); }

// ASan only: the switch onto this stack is complete; the first switch from launch() gives the caller's stack.
inline void landed(void* fake_stack) {
#if MEMTX_EMU_ASAN
  Emulator& e = E();
  const void* bottom = nullptr;
  size_t size = 0;
  __sanitizer_finish_switch_fiber(fake_stack, &bottom, &size);
  if (e.leaving_main) {
    e.main_stack = bottom;
    e.main_stack_size = size;
    e.leaving_main = false;
  }
#else
  (void)fake_stack;
#endif
}

// Switches fibers (to_thread -1: back to launch()); `from_dies` when the current fiber never resumes.
inline void jump(ucontext_t* from, ucontext_t* to, int to_thread, bool from_dies) {
#if MEMTX_EMU_ASAN
  Emulator& e = E();
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(from_dies ? nullptr : &fake_stack,
                                 to_thread < 0 ? e.main_stack : e.stacks[to_thread].get(),
                                 to_thread < 0 ? e.main_stack_size : kStackBytes);
  swapcontext(from, to);
  landed(fake_stack);
#else
  (void)to_thread, (void)from_dies;
  swapcontext(from, to);
#endif
}

// Records the failure; inside a fiber, abandons the block (control returns to launch()).
inline void fail(const char* fmt, ...) {
  Emulator& e = E();
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (!e.failed) {
    char where[96] = "";
    if (e.current >= 0)
      std::snprintf(where, sizeof where, "block (%u, %u, %u) thread %d: ", e.block.x, e.block.y, e.block.z,
                    e.current);
    e.message = std::string("cuda emulator: ") + where + buf;
  }
  e.failed = true;
  if (e.current >= 0) {
    const int self = e.current;
    e.current = -1;
    jump(&e.threads[self].ctx, &e.main_ctx, -1, true);
  }
}

inline void set_state(int t, State s) {
  Emulator& e = E();
  State& old = e.threads[t].state;
  Warp& w = e.warps[t / 32];
  w.ready += (s == State::Ready) - (old == State::Ready);
  e.at_syncthreads += (s == State::AtSyncthreads) - (old == State::AtSyncthreads);
  e.exited += (s == State::Exited) - (old == State::Exited);
  old = s;
}

// The next thread to run: a ready lane of the current warp, else a ready lane of a random warp; -1 if none.
inline int pick_next() {
  Emulator& e = E();
  if (e.cur_warp < 0 || e.warps[e.cur_warp].ready == 0) {
    int candidates[32], n = 0;
    for (int w = 0; w < int(e.warps.size()); ++w)
      if (e.warps[w].ready > 0) candidates[n++] = w;
    if (n == 0) return -1;
    e.cur_warp = candidates[e.rng() % n];
  }
  const int first = e.cur_warp * 32, lanes = std::min(32, e.nthreads - first);
  int k = int(e.rng() % unsigned(e.warps[e.cur_warp].ready));
  for (int l = 0; l < lanes; ++l)
    if (e.threads[first + l].state == State::Ready && k-- == 0) return first + l;
  return -1;  // unreachable: `ready` counts the ready lanes
}

inline void land(const Copy& c) {
  std::memcpy(c.dst, c.src, size_t(c.bytes));
  std::memset(static_cast<char*>(c.dst) + c.bytes, 0, size_t(16 - c.bytes));
}

// Every copy of the current thread lands (at its exit: the hardware completes them).
inline void land_all_copies() {
  Thread& t = E().threads[E().current];
  for (const Copy& c : t.copies) land(c);
  t.copies.clear();
}

// cp.async.wait_all (a no-op under Fault::DropWaitAll).
inline void wait_copies() {
  if (E().fault != Fault::DropWaitAll) land_all_copies();
}

// At a fiber switch: the copies in flight, of every thread, whose time has come land. A copy's time is drawn at
// issue, uniform in [0, 4 x threads) switches: a block's barrier is at least `threads` switches away, so without
// its wait_all a copy lands after the barrier about three times in four.
inline void land_due_copies() {
  for (Thread& t : E().threads) {
    size_t kept = 0;
    for (Copy& c : t.copies) {
      if (--c.switches_left <= 0)
        land(c);
      else
        t.copies[kept++] = c;
    }
    t.copies.resize(kept);
  }
}

// The current thread has left State::Ready: run another until someone makes this one ready again.
inline void wait() {
  Emulator& e = E();
  const int self = e.current, next = pick_next();
  if (next < 0)
    fail("deadlock: %d threads wait at __syncthreads, %d at warp operations, %d have exited", e.at_syncthreads,
         e.nthreads - e.at_syncthreads - e.exited, e.exited);
  land_due_copies();
  e.current = next;
  jump(&e.threads[self].ctx, &e.threads[next].ctx, next, false);
}

inline void syncthreads() {
  Emulator& e = E();
  set_state(e.current, State::AtSyncthreads);
  if (e.at_syncthreads + e.exited < e.nthreads) return wait();
  if (e.exited > 0) fail("__syncthreads reached after %d threads of the block exited", e.exited);
  for (int t = 0; t < e.nthreads; ++t) set_state(t, State::Ready);
}

// Lane-side part of a warp operation: the lanes' operands are deposited in the Warp; the last lane in runs
// `complete(warp)` to write every lane's results, then all lanes continue.
template <class Complete>
inline void warp_op(WarpOp op, Complete&& complete) {
  Emulator& e = E();
  const int w = e.current / 32;
  Warp& W = e.warps[w];
  if (std::min(32, e.nthreads - 32 * w) != 32) fail("warp operation in a partial warp");
  if (W.arrived == 0) W.op = op;
  if (W.op != op) fail("lanes of warp %d meet at different warp operations (%d and %d)", w, int(W.op), int(op));
  set_state(e.current, State::AtWarpOp);
  if (++W.arrived < 32) return wait();
  complete(W);
  W.arrived = 0;
  for (int l = 0; l < 32; ++l) set_state(32 * w + l, State::Ready);
}

inline int lane() { return E().current % 32; }
inline Warp& my_warp() { return E().warps[E().current / 32]; }

inline void syncwarp() {
  warp_op(WarpOp::Syncwarp, [](Warp&) {});
}

inline float shfl_xor(unsigned member_mask, float v, int lane_mask) {
  if (member_mask != 0xffffffffu || lane_mask < 0 || lane_mask > 31) fail("unsupported __shfl_xor_sync arguments");
  Warp& W = my_warp();
  const int l = lane();
  W.value[l] = v;
  W.lane_mask[l] = lane_mask;
  float in[32];
  warp_op(WarpOp::Shfl, [&](Warp& w) {
    std::memcpy(in, w.value, sizeof in);
    for (int i = 0; i < 32; ++i) w.value[i] = in[i ^ w.lane_mask[i]];
  });
  return W.value[l];
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero; the low 13 bits of the result are zero.
inline uint32_t tf32_round(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if ((bits & 0x7f800000u) == 0x7f800000u) return (bits & 0x007fffffu) ? 0x7fffe000u : bits;  // NaN, inf
  return (bits + 0x1000u) & 0xffffe000u;
}

inline double half_bits(uint32_t reg, int hi, WarpOp op) {
  const unsigned short bits = (unsigned short)(hi ? reg >> 16 : reg & 0xffffu);
  if (op == WarpOp::MmaF16) {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
  __nv_bfloat16_raw raw;
  raw.x = bits;
  return __bfloat162float(__nv_bfloat16(raw));
}

inline double tf32_bits(uint32_t reg) {
  reg &= 0xffffe000u;  // the mma reads only the tf32 bits
  float f;
  std::memcpy(&f, &reg, 4);
  return f;
}

// d += a b for one warp: m16n8k16 (f16, bf16) or m16n8k8 (tf32). Lane l = 4 g + t holds (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 / m16n8k8"): 16-bit A a_i, i = 0..7: row g + 8 ((i / 2) % 2), column
// 2 t + i % 2 + 8 (i / 4); B b_i, i = 0..3: row 2 t + i % 2 + 8 (i / 2), column g; tf32 A a0..a3: (g, t),
// (g + 8, t), (g, t + 4), (g + 8, t + 4); B b0, b1: (t, g), (t + 4, g); C/D c0..c3: row g + 8 (i / 2),
// column 2 t + i % 2.
inline void mma(WarpOp op, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  Warp& W = my_warp();
  const int l = lane();
  std::memcpy(W.a[l], a, sizeof a);
  std::memcpy(W.b[l], b, sizeof b);
  std::memcpy(W.acc[l], d, sizeof d);
  warp_op(op, [op](Warp& w) {
    const bool tf32 = op == WarpOp::MmaTF32;
    const int K = tf32 ? 8 : 16;
    double A[16][16], B[16][8];
    for (int ln = 0; ln < 32; ++ln) {
      const int g = ln >> 2, t = ln & 3;
      if (tf32) {
        for (int i = 0; i < 4; ++i) A[g + 8 * (i & 1)][t + 4 * (i >> 1)] = tf32_bits(w.a[ln][i]);
        for (int i = 0; i < 2; ++i) B[t + 4 * i][g] = tf32_bits(w.b[ln][i]);
      } else {
        for (int i = 0; i < 8; ++i) A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] =
            half_bits(w.a[ln][i >> 1], i & 1, op);
        for (int i = 0; i < 4; ++i) B[2 * t + (i & 1) + 8 * (i >> 1)][g] = half_bits(w.b[ln][i >> 1], i & 1, op);
      }
    }
    for (int ln = 0; ln < 32; ++ln)
      for (int i = 0; i < 4; ++i) {
        const int row = (ln >> 2) + 8 * (i >> 1), col = 2 * (ln & 3) + (i & 1);
        double s = w.acc[ln][i];
        for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
        w.acc[ln][i] = float(s);
      }
  });
  std::memcpy(d, W.acc[l], sizeof d);
}

inline void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { mma(WarpOp::MmaF16, d, a, b); }
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { mma(WarpOp::MmaBF16, d, a, b); }
inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { mma(WarpOp::MmaTF32, d, a, b); }

inline unsigned char* dynamic_smem() { return E().smem; }

inline bool in_smem(const void* p, size_t bytes) {
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= E().smem && c + bytes <= E().smem + E().smem_bytes;
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8 i .. 8 i + 7 give the row addresses of matrix i;
// register i of lane 4 g + t receives matrix i's row g, columns 2 t, 2 t + 1 (with .trans: rows 2 t, 2 t + 1
// of column g), the first in the low half.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row_ptr, bool trans) {
  if (reinterpret_cast<uintptr_t>(row_ptr) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  if (!in_smem(row_ptr, 16)) fail("ldmatrix row outside dynamic shared memory");
  Warp& W = my_warp();
  const int l = lane();
  W.row[l] = row_ptr;
  warp_op(trans ? WarpOp::LdsmTrans : WarpOp::Ldsm, [trans](Warp& w) {
    for (int ln = 0; ln < 32; ++ln) {
      const int g = ln >> 2, t = ln & 3;
      for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (trans) {
          lo = static_cast<const uint16_t*>(w.row[8 * i + 2 * t])[g];
          hi = static_cast<const uint16_t*>(w.row[8 * i + 2 * t + 1])[g];
        } else {
          lo = static_cast<const uint16_t*>(w.row[8 * i + g])[2 * t];
          hi = static_cast<const uint16_t*>(w.row[8 * i + g])[2 * t + 1];
        }
        w.frag[ln][i] = uint32_t(lo) | (uint32_t(hi) << 16);
      }
    }
  });
  std::memcpy(r, W.frag[l], sizeof r);
}

// cp.async.cg.shared.global 16 bytes, src_bytes of them read, the rest zero-filled.
inline void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (src_bytes < 0 || src_bytes > 16) fail("cp.async src-size %d out of [0, 16]", src_bytes);
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0))
    fail("cp.async address not 16-byte aligned");
  if (!in_smem(dst, 16)) fail("cp.async destination outside dynamic shared memory");
  Emulator& e = E();
  e.threads[e.current].copies.push_back({dst, src, src_bytes, int(e.rng() % unsigned(4 * e.nthreads))});
}

inline float atomic_add(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}

inline void thread_main() {
  Emulator& e = E();
  landed(nullptr);
  e.body();
  land_all_copies();
  const int self = e.current;
  set_state(self, State::Exited);
  const int next = pick_next();
  if (next < 0 && e.exited < e.nthreads)
    fail("deadlock: %d threads wait at __syncthreads, %d at warp operations, %d have exited", e.at_syncthreads,
         e.nthreads - e.at_syncthreads - e.exited, e.exited);
  e.current = next;
  jump(&e.threads[self].ctx, next < 0 ? &e.main_ctx : &e.threads[next].ctx, next, true);
}

inline cudaError_t launch_error(cudaError_t err, const char* what) {
  E().message = std::string("cuda emulator: launch refused: ") + what;
  return E().last_error = err;
}

// Runs body() as every thread of every block of the grid, block after block. The message of the previous launch
// is cleared.
inline void launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, std::function<void()> body) {
  Emulator& e = E();
  e.failed = false;
  e.message.clear();
  if (block.y != 1 || block.z != 1) return void(launch_error(cudaErrorInvalidConfiguration, "2-D or 3-D block"));
  if (block.x < 1 || block.x > 1024) return void(launch_error(cudaErrorInvalidConfiguration, "block size"));
  if (grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535)
    return void(launch_error(cudaErrorInvalidConfiguration, "grid size"));
  const auto optin = e.smem_optin.find(kernel);
  if (smem_bytes > (optin == e.smem_optin.end() ? kDefaultSmemBytes : size_t(optin->second)))
    return void(launch_error(cudaErrorInvalidValue, "dynamic shared memory above the kernel's limit"));
  if (e.fault == Fault::SkipNextLaunch || e.fault == Fault::FailNextLaunch) {
    const bool skip = e.fault == Fault::SkipNextLaunch;
    e.fault = Fault::None;
    if (skip) return;
    body = [] { fail("fault injected by the test (Fault::FailNextLaunch)"); };
  }

  e.nthreads = int(block.x);
  e.threads.resize(e.nthreads);
  e.warps.resize((e.nthreads + 31) / 32);
  while (e.stacks.size() < e.threads.size()) e.stacks.emplace_back(new char[kStackBytes]);
  e.smem_bytes = smem_bytes;
  e.smem_buf.resize(smem_bytes + 2 * kGuardBytes + 128);
  e.smem = e.smem_buf.data() + (128 - reinterpret_cast<uintptr_t>(e.smem_buf.data()) % 128) % 128 + kGuardBytes;
  e.body = std::move(body);
  e.grid = {grid.x, grid.y, grid.z};
  ++e.launches;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        e.block = {x, y, z};
        e.rng.seed(e.seed * 2654435761u + e.launches * 40503u + (x + grid.x * (y + grid.y * z)) * 7919u);
        std::memset(e.smem - kGuardBytes, 0xff, smem_bytes + 2 * kGuardBytes);
        for (Warp& w : e.warps) w.arrived = w.ready = 0;
        e.at_syncthreads = e.exited = 0;
        for (int t = 0; t < e.nthreads; ++t) {
          Thread& th = e.threads[t];
          th.state = State::Ready;
          th.copies.clear();
          ++e.warps[t / 32].ready;
          getcontext(&th.ctx);
          th.ctx.uc_stack.ss_sp = e.stacks[t].get();
          th.ctx.uc_stack.ss_size = kStackBytes;
          th.ctx.uc_link = nullptr;
          makecontext(&th.ctx, thread_main, 0);
        }
        e.cur_warp = -1;
        e.current = pick_next();
        e.leaving_main = true;
        jump(&e.main_ctx, &e.threads[e.current].ctx, e.current, false);
        e.current = -1;
        for (size_t i = 0; i < kGuardBytes && !e.failed; ++i)
          if ((e.smem - kGuardBytes)[i] != 0xff || e.smem[smem_bytes + i] != 0xff)
            fail("shared memory written outside its %zu bytes (block (%u, %u, %u))", smem_bytes, x, y, z);
        if (e.failed) {
          e.last_error = cudaErrorLaunchFailure;
          return;
        }
      }
}

// The replacement of `kernel<<<grid, block, smem, stream>>>(args...)`: launch_kernel(kernel, grid, block, smem,
// stream)(args...).
template <class... Params>
inline auto launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem = 0,
                          cudaStream_t = nullptr) {
  return [=](auto&&... args) {
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem, [&] { kernel(args...); });
  };
}

inline uint3 thread_idx() { return {unsigned(E().current), 0, 0}; }
inline uint3 block_idx() { return E().block; }
inline uint3 grid_dim() { return E().grid; }

}  // namespace emu
}  // namespace memtx

#define threadIdx (::memtx::emu::thread_idx())
#define blockIdx (::memtx::emu::block_idx())
#define gridDim (::memtx::emu::grid_dim())
#define __syncthreads() ::memtx::emu::syncthreads()
#define __syncwarp() ::memtx::emu::syncwarp()
#define __shfl_xor_sync(mask, v, lane_mask) ::memtx::emu::shfl_xor((mask), (v), (lane_mask))
#define atomicAdd(p, v) ::memtx::emu::atomic_add((p), (v))
