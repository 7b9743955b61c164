// CUDA kernels of relative-position memory attention (SPEC §1), flash-style: what every pass shares (hardware
// primitives, element types, MMA policies, tile configurations and shared-memory layouts, tile geometry,
// cooperative loads, the warp-level score and softmax pieces). The passes, one header each as on the Triton side:
// rel_memory_attention_fwd.cuh (forward), _bwd.cuh (delta and the backward's shared pieces), _bwd_dq.cuh (dq, du,
// dvb, dr), _bwd_dkv.cuh (dk, dv); each .cu includes the pass it launches.
//
// Notation. A block of BM = 16 * NW queries (one warp per 16 query rows) streams over key blocks of at most
// BN keys; key blocks never straddle j = M, since memory keys carry mem_offset. Inside a tile the distances
// form a band: query row ii (0..BM-1) and key column jj (0..BN-1) have distance dtop - w with
// w = BM - 1 - ii + jj, dtop = M + i0 + BM - 1 - j0 + offset. The tile's window holds r rows
// rw[w] = r[clamp(dtop - w, 0, R - 1)] for w in [0, BM + BN) (the last row is padding). Warp `wp` only needs
// window rows base_w + c, base_w = BM - 16 - 16 wp, c in [0, BN + 16): its position term is one 16 x (BN + 16)
// matmul against that slab, read back with a per-row shift through shared memory:
//   pos(ii, jj) = band[a][15 - a + jj], a = ii - 16 wp.
//
// Matmuls use mma.sync: m16n8k16 with fp32 accumulation for fp16/bf16, and 3xTF32 (split hi + lo, three
// m16n8k8 products) for fp32, which keeps fp32 accuracy (~1e-6) whatever torch's TF32 setting says.
// Tiles go global -> shared with cp.async (16-byte chunks, zero-filled out of range) when rows are 16-byte
// aligned, element by element otherwise; rows are padded by 16 bytes (conflict-free ldmatrix). 16-bit
// fragments are read with ldmatrix (.trans for operands stored by k), fp32 ones with 32-bit shared loads.
// Every global read is bounds-checked (rows past L or the key block, columns past D, r rows clamped into
// [0, R - 1]); nothing of size L x K is stored.
//
// Host emulation: with MEMTX_HOST_EMULATION defined, the includer supplies the CUDA built-ins this file
// uses (threadIdx, blockIdx, gridDim, __syncthreads, __syncwarp, __shfl_xor_sync, atomicAdd) and
// memtx::emu::{mma_f16, mma_bf16, mma_tf32, tf32_round, cp_async_16, wait_copies, ldmatrix_x4, dynamic_smem};
// every kernel is then a plain function that a CPU-side thread emulator can run.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "rel_memory_attention_launch.h"

#if defined(MEMTX_HOST_EMULATION)
#define MEMTX_DEVICE inline
#define MEMTX_HOST_DEVICE inline
#define MEMTX_KERNEL(threads) inline void
#else
#define MEMTX_DEVICE __device__ __forceinline__
#define MEMTX_HOST_DEVICE __host__ __device__ __forceinline__
#define MEMTX_KERNEL(threads) __global__ void __launch_bounds__(threads, 1)
#endif

namespace memtx {
namespace cuda {
namespace kernels {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

// 16-byte vector loads are allowed per tensor (D and strides multiples of 16 bytes, aligned base).
struct VecFlags {
  bool q, k, v, r, dout;
};

// Everything a kernel reads: the problem, the outputs of the pass, the load flags. Passed by value.
struct KernelArgs {
  RelAttnProblem p;
  RelAttnForward fwd;
  RelAttnBackward bwd;
  VecFlags vec;
};

// ---------------------------------------------------------------------------------------------------------
// Hardware primitives
// ---------------------------------------------------------------------------------------------------------

template <class To, class From>
MEMTX_DEVICE To bitcast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bitcast between types of different sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

MEMTX_DEVICE float quiet_nan() { return bitcast<float>(uint32_t(0x7fc00000u)); }

MEMTX_HOST_DEVICE int imin(int a, int b) { return a < b ? a : b; }
MEMTX_HOST_DEVICE int imax(int a, int b) { return a > b ? a : b; }

MEMTX_DEVICE unsigned char* dynamic_smem() {
#if defined(MEMTX_HOST_EMULATION)
  return emu::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char memtx_smem[];
  return memtx_smem;
#endif
}

MEMTX_DEVICE float shfl_xor(float x, int mask) { return __shfl_xor_sync(0xffffffffu, x, mask); }

// Asynchronous 16-byte copy global -> shared (sm_80+); src_bytes = 0 writes zeros without reading src.
MEMTX_DEVICE void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
#if defined(MEMTX_HOST_EMULATION)
  emu::cp_async_16(smem_dst, gmem_src, src_bytes);
#else
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem_src), "r"(src_bytes) : "memory");
#endif
}

// Waits for this thread's cp.async copies; a __syncthreads() after it publishes them to the block.
MEMTX_DEVICE void cp_async_wait_all() {
#if defined(MEMTX_HOST_EMULATION)
  emu::wait_copies();
#else
  asm volatile("cp.async.wait_all;" ::: "memory");
#endif
}

// ldmatrix .x4 (.trans): lane l gives the address of row l % 8 of 8x8 matrix l / 8 (16 bytes, 16-byte aligned);
// register i receives matrix i, lane (g = l / 4, t = l % 4) holding row g, columns 2t, 2t + 1 (with .trans:
// stored rows 2t, 2t + 1 of column g), the lower column (row) in the low half.
MEMTX_DEVICE void ldsm_x4(uint32_t (&r)[4], const void* row_ptr) {
#if defined(MEMTX_HOST_EMULATION)
  emu::ldmatrix_x4(r, row_ptr, false);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
#endif
}

MEMTX_DEVICE void ldsm_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
#if defined(MEMTX_HOST_EMULATION)
  emu::ldmatrix_x4(r, row_ptr, true);
#else
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
#endif
}

// x rounded to nearest TF32 (low 13 mantissa bits zero), as the bits of a float.
MEMTX_DEVICE uint32_t tf32_round(float x) {
#if defined(MEMTX_HOST_EMULATION)
  return emu::tf32_round(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#endif
}

// d += a b for one m16n8k16 tile, fp16 inputs, fp32 accumulators.
MEMTX_DEVICE void mma_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MEMTX_HOST_EMULATION)
  emu::mma_f16(d, a, b);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += a b for one m16n8k16 tile, bf16 inputs, fp32 accumulators.
MEMTX_DEVICE void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MEMTX_HOST_EMULATION)
  emu::mma_bf16(d, a, b);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += a b for one m16n8k8 tile, tf32 inputs, fp32 accumulators.
MEMTX_DEVICE void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(MEMTX_HOST_EMULATION)
  emu::mma_tf32(d, a, b);
#else
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------------------

MEMTX_DEVICE float to_float(float x) { return x; }
MEMTX_DEVICE float to_float(__half x) { return __half2float(x); }
MEMTX_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class Elem>
MEMTX_DEVICE Elem from_float(float x);
template <>
MEMTX_DEVICE float from_float<float>(float x) { return x; }
template <>
MEMTX_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
MEMTX_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Packing of two 16-bit elements into the 32-bit registers of mma fragments (low half = lower column).
template <class Elem>
struct Pack16;

template <>
struct Pack16<__half> {
  static MEMTX_DEVICE uint32_t pack(float lo, float hi) { return bitcast<uint32_t>(__floats2half2_rn(lo, hi)); }
  static MEMTX_DEVICE float2 unpack(uint32_t v) { return __half22float2(bitcast<__half2>(v)); }
  static MEMTX_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { mma_f16(d, a, b); }
};

template <>
struct Pack16<__nv_bfloat16> {
  static MEMTX_DEVICE uint32_t pack(float lo, float hi) { return bitcast<uint32_t>(__floats2bfloat162_rn(lo, hi)); }
  static MEMTX_DEVICE float2 unpack(uint32_t v) { return __bfloat1622float2(bitcast<__nv_bfloat162>(v)); }
  static MEMTX_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) { mma_bf16(d, a, b); }
};

// ---------------------------------------------------------------------------------------------------------
// MMA policies: fragment loads from shared memory and the product, per element type.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 / m16n8k8"), g = lane / 4, t = lane % 4:
//   C/D 16x8:          c0, c1 = (g, 2t), (g, 2t+1);  c2, c3 = (g+8, 2t), (g+8, 2t+1)
//   fp16 A 16x16:      x0 = (g, 2t..2t+1), x1 = (g+8, 2t..), x2 = (g, 2t+8..), x3 = (g+8, 2t+8..)
//   fp16 B 16x8 (k,n): x0 = (2t..2t+1, g), x1 = (2t+8..2t+9, g)
//   tf32 A 16x8:       a0 = (g, t), a1 = (g+8, t), a2 = (g, t+4), a3 = (g+8, t+4)
//   tf32 B 8x8 (k,n):  b0 = (t, g), b1 = (t+4, g)
// Loaders take the tile's top-left pointer; "bias" (optional, float, indexed by the head-dim coordinate) is
// added before rounding, which is how q + u and q + vb are formed.
// ---------------------------------------------------------------------------------------------------------

template <class Elem_>
struct Policy16 {
  using Elem = Elem_;
  using Ops = Pack16<Elem>;
  static constexpr int KS = 16;  // k per mma
  struct FragA {
    uint32_t x[4];
  };
  struct FragB {
    uint32_t x[2];
  };
  struct FragB2 {  // two n-tiles of 8
    FragB f[2];
  };

  static MEMTX_DEVICE uint32_t add(uint32_t v, float b_lo, float b_hi) {
    const float2 f = Ops::unpack(v);
    return Ops::pack(f.x + b_lo, f.y + b_hi);
  }

  // A 16 x KS from k0: element (m, k) = base[m * ld + k] (+ bias[k]). Matrices: rows 0-7 / 8-15 x k lo / hi.
  static MEMTX_DEVICE FragA load_a(const Elem* base, int ld, int k0, const float* bias, int lane) {
    const int mi = lane >> 3;
    FragA a;
    ldsm_x4(a.x, base + ((lane & 7) + 8 * (mi & 1)) * ld + k0 + 8 * (mi >> 1));
    if (bias != nullptr) {
      const int c = k0 + 2 * (lane & 3);
      a.x[0] = add(a.x[0], bias[c], bias[c + 1]);
      a.x[1] = add(a.x[1], bias[c], bias[c + 1]);
      a.x[2] = add(a.x[2], bias[c + 8], bias[c + 9]);
      a.x[3] = add(a.x[3], bias[c + 8], bias[c + 9]);
    }
    return a;
  }

  // A 16 x KS from k0, stored transposed: element (m, k) = base[k * ld + m]. Stored rows k, columns m.
  static MEMTX_DEVICE FragA load_a_t(const Elem* base, int ld, int k0, int lane) {
    const int mi = lane >> 3;
    FragA a;
    ldsm_x4_trans(a.x, base + (k0 + (lane & 7) + 8 * (mi >> 1)) * ld + 8 * (mi & 1));
    return a;
  }

  // B for n-tiles [0, 8) and [8, 16), KS x 16 from k0, stored by n: element (k, n) = base[n * ld + k].
  static MEMTX_DEVICE FragB2 load_b2(const Elem* base, int ld, int k0, int lane) {
    const int mi = lane >> 3;
    uint32_t r[4];
    ldsm_x4(r, base + ((lane & 7) + 8 * (mi >> 1)) * ld + k0 + 8 * (mi & 1));
    return {{{{r[0], r[1]}}, {{r[2], r[3]}}}};
  }

  // B for n-tiles [0, 8) and [8, 16), stored by k: element (k, n) = base[k * ld + n] (+ bias[n]).
  static MEMTX_DEVICE FragB2 load_b_t2(const Elem* base, int ld, int k0, const float* bias, int lane) {
    const int mi = lane >> 3;
    uint32_t r[4];
    ldsm_x4_trans(r, base + (k0 + (lane & 7) + 8 * (mi & 1)) * ld + 8 * (mi >> 1));
    if (bias != nullptr) {
      const int g = lane >> 2;
      r[0] = add(r[0], bias[g], bias[g]);
      r[1] = add(r[1], bias[g], bias[g]);
      r[2] = add(r[2], bias[g + 8], bias[g + 8]);
      r[3] = add(r[3], bias[g + 8], bias[g + 8]);
    }
    return {{{{r[0], r[1]}}, {{r[2], r[3]}}}};
  }

  // B stored by k, in the k order of acc_to_a (the natural order for 16-bit types).
  static MEMTX_DEVICE FragB2 load_b_t_acc2(const Elem* base, int ld, int k0, int lane) {
    return load_b_t2(base, ld, k0, nullptr, lane);
  }

  // A operand for k step kk (columns 16 kk .. 16 kk + 15) from fp32 accumulators c[nt] (n-tiles of 8).
  template <int NT>
  static MEMTX_DEVICE FragA acc_to_a(const float (&c)[NT][4], int kk) {
    FragA a;
    a.x[0] = Ops::pack(c[2 * kk][0], c[2 * kk][1]);
    a.x[1] = Ops::pack(c[2 * kk][2], c[2 * kk][3]);
    a.x[2] = Ops::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a.x[3] = Ops::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    return a;
  }

  static MEMTX_DEVICE void mma(float (&d)[4], const FragA& a, const FragB& b) { Ops::mma(d, a.x, b.x); }
};

// fp32 through 3xTF32: x = hi + lo with hi, lo TF32; a b ~= a_lo b_hi + a_hi b_lo + a_hi b_hi.
struct PolicyTF32x3 {
  using Elem = float;
  static constexpr int KS = 8;
  struct FragA {
    uint32_t hi[4], lo[4];
  };
  struct FragB {
    uint32_t hi[2], lo[2];
  };

  static MEMTX_DEVICE void split(float x, uint32_t& hi, uint32_t& lo) {
    hi = tf32_round(x);
    lo = tf32_round(x - bitcast<float>(hi));
  }
  static MEMTX_DEVICE FragA make_a(float a0, float a1, float a2, float a3) {
    FragA a;
    split(a0, a.hi[0], a.lo[0]);
    split(a1, a.hi[1], a.lo[1]);
    split(a2, a.hi[2], a.lo[2]);
    split(a3, a.hi[3], a.lo[3]);
    return a;
  }
  static MEMTX_DEVICE FragB make_b(float b0, float b1) {
    FragB b;
    split(b0, b.hi[0], b.lo[0]);
    split(b1, b.hi[1], b.lo[1]);
    return b;
  }

  // A 16 x 8 from k0: element (m, k) = base[m * ld + k] (+ bias[k]).
  static MEMTX_DEVICE FragA load_a(const float* base, int ld, int k0, const float* bias, int lane) {
    const int t = lane & 3;
    const float* p = base + (lane >> 2) * ld + k0 + t;
    const float b0 = bias != nullptr ? bias[k0 + t] : 0.f;
    const float b4 = bias != nullptr ? bias[k0 + t + 4] : 0.f;
    return make_a(p[0] + b0, p[8 * ld] + b0, p[4] + b4, p[8 * ld + 4] + b4);
  }

  // A 16 x 8 from k0, stored transposed: element (m, k) = base[k * ld + m].
  static MEMTX_DEVICE FragA load_a_t(const float* base, int ld, int k0, int lane) {
    const float* p = base + (k0 + (lane & 3)) * ld + (lane >> 2);
    return make_a(p[0], p[8], p[4 * ld], p[4 * ld + 8]);
  }

  // B 8 x 8 from k0, stored by n: element (k, n) = base[n * ld + k].
  static MEMTX_DEVICE FragB load_b(const float* base, int ld, int k0, int lane) {
    const float* p = base + (lane >> 2) * ld + k0 + (lane & 3);
    return make_b(p[0], p[4]);
  }

  // B 8 x 8 from k0, stored by k: element (k, n) = base[k * ld + n] (+ bias[n]).
  static MEMTX_DEVICE FragB load_b_t(const float* base, int ld, int k0, const float* bias, int lane) {
    const int g = lane >> 2;
    const float* p = base + (k0 + (lane & 3)) * ld + g;
    const float bg = bias != nullptr ? bias[g] : 0.f;
    return make_b(p[0] + bg, p[4 * ld] + bg);
  }

  // B stored by k in the k order of acc_to_a: logical k = t, t + 4 are physical rows k0 + 2t, k0 + 2t + 1.
  static MEMTX_DEVICE FragB load_b_t_acc(const float* base, int ld, int k0, int lane) {
    const float* p = base + (k0 + 2 * (lane & 3)) * ld + (lane >> 2);
    return make_b(p[0], p[ld]);
  }

  struct FragB2 {
    FragB f[2];
  };
  static MEMTX_DEVICE FragB2 load_b2(const float* base, int ld, int k0, int lane) {
    return {{load_b(base, ld, k0, lane), load_b(base + 8 * ld, ld, k0, lane)}};
  }
  static MEMTX_DEVICE FragB2 load_b_t2(const float* base, int ld, int k0, const float* bias, int lane) {
    const float* bias_hi = bias != nullptr ? bias + 8 : nullptr;
    return {{load_b_t(base, ld, k0, bias, lane), load_b_t(base + 8, ld, k0, bias_hi, lane)}};
  }
  static MEMTX_DEVICE FragB2 load_b_t_acc2(const float* base, int ld, int k0, int lane) {
    return {{load_b_t_acc(base, ld, k0, lane), load_b_t_acc(base + 8, ld, k0, lane)}};
  }

  // A operand for k step kk (columns 8 kk .. 8 kk + 7, permuted as in load_b_t_acc) from accumulators:
  // c[kk] holds (g, 8kk + 2t), (g, 8kk + 2t + 1), (g+8, ...), i.e. logical k = t and t + 4.
  template <int NT>
  static MEMTX_DEVICE FragA acc_to_a(const float (&c)[NT][4], int kk) {
    return make_a(c[kk][0], c[kk][2], c[kk][1], c[kk][3]);
  }

  static MEMTX_DEVICE void mma(float (&d)[4], const FragA& a, const FragB& b) {
    mma_tf32(d, a.lo, b.hi);
    mma_tf32(d, a.hi, b.lo);
    mma_tf32(d, a.hi, b.hi);
  }
};

// acc[nt] += A (16 x KDIM) B (KDIM x 8 NT); load_a(k0) -> FragA, load_b2(k0, nt) -> FragB2 of n-tiles nt and
// nt + 1. Fully unrolled, so loaders may index register arrays with k0.
template <class P, int KDIM, int NT, class LoadA, class LoadB2>
MEMTX_DEVICE void warp_mma(float (&acc)[NT][4], LoadA&& load_a, LoadB2&& load_b2) {
  static_assert(KDIM % P::KS == 0 && NT % 2 == 0, "k extent a multiple of the mma k, an even number of n-tiles");
#pragma unroll
  for (int k0 = 0; k0 < KDIM; k0 += P::KS) {
    const typename P::FragA a = load_a(k0);
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      const typename P::FragB2 b = load_b2(k0, nt);
      P::mma(acc[nt], a, b.f[0]);
      P::mma(acc[nt + 1], a, b.f[1]);
    }
  }
}

template <int NT>
MEMTX_DEVICE void zero_acc(float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
}

// Row (0..15) and column (0..8 NT - 1) of accumulator element acc[nt][e] held by `lane`.
MEMTX_DEVICE int acc_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
MEMTX_DEVICE int acc_col(int lane, int nt, int e) { return 8 * nt + 2 * (lane & 3) + (e & 1); }

// ---------------------------------------------------------------------------------------------------------
// Tile configuration and shared-memory layouts
// ---------------------------------------------------------------------------------------------------------

template <int DP_, int BN_, int NW_>
struct TileConfig {
  static constexpr int DP = DP_;          // head dim, padded (D <= DP, columns >= D are zero)
  static constexpr int BN = BN_;          // keys per block
  static constexpr int NW = NW_;          // warps per block
  static constexpr int BM = 16 * NW;      // queries per block
  static constexpr int THREADS = 32 * NW;
  static constexpr int WIN = BM + BN;     // r window rows per tile (the last is padding)
  static constexpr int NT = BN / 8;       // n-tiles of a warp's scores
  static constexpr int NTB = (BN + 16) / 8;  // n-tiles of a warp's position band slab
  static constexpr int NTD = DP / 8;      // n-tiles over the head dim
  static constexpr int LDBAND = BN + 20;  // fp32 band slab row stride
  static_assert(DP % 32 == 0 && BN % 16 == 0, "tile sizes");
  static_assert(NW % (BN / 16) == 0, "the dkv kernel gives every warp a 16-key slab");
};

constexpr size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// Offsets (bytes) of the shared-memory regions of each kernel. Tiles of Elem have LD = DP + 16 bytes / elem.
template <class Elem, class Cfg>
struct SmemLayout {
  static constexpr int LD = Cfg::DP + int(16 / sizeof(Elem));                // q, k, v, dout, rw tiles
  static constexpr int LDB2 = Cfg::WIN + int(16 / sizeof(Elem));             // dS band [BM][WIN]
  static constexpr int LDP = Cfg::BN + int(16 / sizeof(Elem));               // P, dS [BM][BN]
  static constexpr size_t tile(int rows) { return align16(size_t(rows) * LD * sizeof(Elem)); }
  static constexpr size_t floats(int n) { return align16(size_t(n) * sizeof(float)); }

  // Regions common to the three attention kernels.
  static constexpr size_t q = 0;
  static constexpr size_t k = q + tile(Cfg::BM);
  static constexpr size_t v = k + tile(Cfg::BN);
  static constexpr size_t rw = v + tile(Cfg::BN);
  static constexpr size_t bias_u = rw + tile(Cfg::WIN);
  static constexpr size_t bias_vb = bias_u + floats(Cfg::DP);
  static constexpr size_t band = bias_vb + floats(Cfg::DP);
  static constexpr size_t common_end = band + floats(Cfg::NW * 16 * Cfg::LDBAND);
  static constexpr size_t fwd_bytes = common_end;

  // Backward extras: dout tile, lse and delta of the query rows.
  static constexpr size_t dout = common_end;
  static constexpr size_t lse = dout + tile(Cfg::BM);
  static constexpr size_t delta = lse + floats(Cfg::BM);
  static constexpr size_t bwd_end = delta + floats(Cfg::BM);

  // dq kernel: dS band, the clamp row of dr, per-warp column sums of the two parts of dq.
  static constexpr size_t band2 = bwd_end;
  static constexpr size_t tail = band2 + align16(size_t(Cfg::BM) * LDB2 * sizeof(Elem));
  static constexpr size_t colsum = tail + floats(Cfg::DP);
  static constexpr size_t dq_bytes = colsum + floats(2 * Cfg::NW * Cfg::DP);

  // dkv kernel: P and dS tiles.
  static constexpr size_t p_tile = bwd_end;
  static constexpr size_t ds_tile = p_tile + align16(size_t(Cfg::BM) * LDP * sizeof(Elem));
  static constexpr size_t dkv_bytes = ds_tile + align16(size_t(Cfg::BM) * LDP * sizeof(Elem));
};

// Largest dynamic shared memory per block on sm_80 (A100, 163 KB); every configuration fits it.
constexpr size_t kMaxSmemBytes = 166912;

// Pointers to the regions of SmemLayout inside the dynamic shared memory.
template <class Elem, class Cfg>
struct Smem {
  using Lay = SmemLayout<Elem, Cfg>;
  unsigned char* base;
  MEMTX_DEVICE Elem* elems(size_t off) const { return reinterpret_cast<Elem*>(base + off); }
  MEMTX_DEVICE float* floats(size_t off) const { return reinterpret_cast<float*>(base + off); }
  MEMTX_DEVICE Elem* q() const { return elems(Lay::q); }
  MEMTX_DEVICE Elem* k() const { return elems(Lay::k); }
  MEMTX_DEVICE Elem* v() const { return elems(Lay::v); }
  MEMTX_DEVICE Elem* rw() const { return elems(Lay::rw); }
  MEMTX_DEVICE float* bias_u() const { return floats(Lay::bias_u); }
  MEMTX_DEVICE float* bias_vb() const { return floats(Lay::bias_vb); }
  MEMTX_DEVICE float* band(int warp) const { return floats(Lay::band) + warp * 16 * Cfg::LDBAND; }
  MEMTX_DEVICE Elem* dout() const { return elems(Lay::dout); }
  MEMTX_DEVICE float* lse() const { return floats(Lay::lse); }
  MEMTX_DEVICE float* delta() const { return floats(Lay::delta); }
  MEMTX_DEVICE Elem* band2() const { return elems(Lay::band2); }
  MEMTX_DEVICE float* colsum(int part, int warp) const {
    return floats(Lay::colsum) + (part * Cfg::NW + warp) * Cfg::DP;
  }
  MEMTX_DEVICE float* tail() const { return floats(Lay::tail); }
  MEMTX_DEVICE Elem* p_tile() const { return elems(Lay::p_tile); }
  MEMTX_DEVICE Elem* ds_tile() const { return elems(Lay::ds_tile); }
};

// ---------------------------------------------------------------------------------------------------------
// Tile geometry
// ---------------------------------------------------------------------------------------------------------

struct KeyBlock {
  int j0, j1;      // keys [j0, j1)
  int64_t offset;  // mem_offset for memory keys, 0 for segment keys
};

MEMTX_HOST_DEVICE int num_key_blocks(const RelAttnProblem& p, int BN) {
  return (p.M + BN - 1) / BN + (p.L + BN - 1) / BN;
}

// Key block kb: memory blocks first, then segment blocks; none straddles j = M.
MEMTX_DEVICE KeyBlock key_block(const RelAttnProblem& p, int kb, int BN) {
  const int n_mem = (p.M + BN - 1) / BN;
  if (kb < n_mem) return {kb * BN, imin(kb * BN + BN, p.M), p.mem_offset};
  const int j0 = p.M + (kb - n_mem) * BN;
  return {j0, imin(j0 + BN, p.K), 0};
}

// True when some query of [i0, min(i0 + BM, L)) sees some key of the block (exact, see SPEC visible()).
MEMTX_DEVICE bool tile_visible(const RelAttnProblem& p, int i0, int BM, const KeyBlock& kb) {
  const int i_last = imin(i0 + BM, p.L) - 1;
  if (kb.j0 > p.M + i_last) return false;
  if (p.window > 0 && kb.j1 - 1 <= p.M + i0 - p.window) return false;
  return true;
}

// Key blocks [first, end) of those some query of [i0, min(i0 + BM, L)) sees: tile_visible holds on a prefix (keys
// up to M + i_last) and a suffix (keys past the window) of the blocks, so on a contiguous range. Empty: first = end.
struct KeyBlockRange {
  int first, end;
};

MEMTX_DEVICE KeyBlockRange visible_key_blocks(const RelAttnProblem& p, int i0, int BM, int BN) {
  KeyBlockRange range{0, 0};
  const int n_kb = num_key_blocks(p, BN);
  while (range.first < n_kb && !tile_visible(p, i0, BM, key_block(p, range.first, BN))) ++range.first;
  range.end = range.first;
  while (range.end < n_kb && tile_visible(p, i0, BM, key_block(p, range.end, BN))) ++range.end;
  return range;
}

// SPEC visible(i, j), with i < L and j inside the block.
MEMTX_DEVICE bool visible(const RelAttnProblem& p, int i, int j, int j1) {
  return i < p.L && j < j1 && j <= p.M + i && (p.window == 0 || j > p.M + i - p.window);
}

// Distance of (query row 0 + BM - 1, key j0) of the tile: window row w holds r[clamp(dtop - w, 0, R - 1)].
MEMTX_DEVICE int64_t top_distance(const RelAttnProblem& p, int i0, int BM, const KeyBlock& kb) {
  return int64_t(p.M) + i0 + BM - 1 - kb.j0 + kb.offset;
}

MEMTX_DEVICE int clamp_row(int64_t d, int R) { return d < 0 ? 0 : (d >= R ? R - 1 : int(d)); }

// ---------------------------------------------------------------------------------------------------------
// Cooperative loads (all threads of the block)
// ---------------------------------------------------------------------------------------------------------

// dst[r][0, DP) <- row_ptr(r)[0, D) for r < n_rows, zero where row_ptr(r) is null and in columns >= D.
// With `vec` (D a multiple of the chunk, rows 16-byte aligned) through cp.async 16-byte copies: the caller
// runs cp_async_wait_all() and __syncthreads() before reading; `any` is a valid global address (never read)
// for the zero-filled chunks. Otherwise element by element.
template <class Elem, int DP, int LD, int THREADS, class RowPtr>
MEMTX_DEVICE void load_tile(Elem* dst, int n_rows, int D, bool vec, const Elem* any, RowPtr&& row_ptr) {
  constexpr int CH = 16 / int(sizeof(Elem));
  constexpr int CPR = DP / CH;
  for (int c = threadIdx.x; c < n_rows * CPR; c += THREADS) {
    const int r = c / CPR, col = (c % CPR) * CH;
    const Elem* src = row_ptr(r);
    Elem* d = dst + r * LD + col;
    if (vec) {
      const bool in = src != nullptr && col < D;
      cp_async_16(d, in ? src + col : any, in ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < CH; ++e) d[e] = (src != nullptr && col + e < D) ? src[col + e] : from_float<Elem>(0.f);
    }
  }
}

// dst[0, DP) <- float(src[0, D)), zero beyond D.
template <class Elem, int DP, int THREADS>
MEMTX_DEVICE void load_bias(float* dst, const Elem* src, int D) {
  for (int d = threadIdx.x; d < DP; d += THREADS) dst[d] = d < D ? to_float(src[d]) : 0.f;
}

template <class Elem>
MEMTX_DEVICE const Elem* row_of(const Strided4& t, int b, int h, int i) {
  return static_cast<const Elem*>(t.data) + b * t.sb + h * t.sh + i * t.sr;
}

// Query-side tile rows i0 .. i0 + BM - 1 of (b, h) (zero rows past L).
template <class Elem, class Cfg>
MEMTX_DEVICE void load_query_tile(Elem* dst, const Strided4& t, bool vec, const RelAttnProblem& p, int b, int h,
                                  int i0) {
  const Elem* any = static_cast<const Elem*>(t.data);
  load_tile<Elem, Cfg::DP, SmemLayout<Elem, Cfg>::LD, Cfg::THREADS>(dst, Cfg::BM, p.D, vec, any, [&](int r) {
    return i0 + r < p.L ? row_of<Elem>(t, b, h, i0 + r) : nullptr;
  });
}

// Key tile rows of block kb of (b, g) (zero rows past j1).
template <class Elem, class Cfg>
MEMTX_DEVICE void load_key_tile(Elem* dst, const Strided4& t, bool vec, const RelAttnProblem& p, int b, int g,
                                const KeyBlock& kb) {
  const Elem* any = static_cast<const Elem*>(t.data);
  load_tile<Elem, Cfg::DP, SmemLayout<Elem, Cfg>::LD, Cfg::THREADS>(dst, Cfg::BN, p.D, vec, any, [&](int r) {
    return kb.j0 + r < kb.j1 ? row_of<Elem>(t, b, g, kb.j0 + r) : nullptr;
  });
}

// The tile's window of r rows (descending distance from dtop, clamped into [0, R - 1]).
template <class Elem, class Cfg>
MEMTX_DEVICE void load_window(Elem* dst, bool vec, const RelAttnProblem& p, int g, int64_t dtop) {
  const Elem* r_head = static_cast<const Elem*>(p.r) + g * p.r_sh;
  load_tile<Elem, Cfg::DP, SmemLayout<Elem, Cfg>::LD, Cfg::THREADS>(dst, Cfg::WIN, p.D, vec, r_head, [&](int w) {
    return r_head + clamp_row(dtop - w, p.R) * p.r_sr;
  });
}

// ---------------------------------------------------------------------------------------------------------
// Warp-level pieces (one warp, its 16 query rows)
// ---------------------------------------------------------------------------------------------------------

// Scores of this warp's 16 query rows against the BN keys of the tile, in log2 units:
//   s[nt][e] = log2(e) scale ((q + u) . k_j + (q + vb) . rw[BM - 1 - ii + jj]),  -inf where invisible.
// Uses the warp's fp32 band slab as scratch. Reads sm.q, sm.k, sm.rw, the biases.
template <class P, class Cfg>
MEMTX_DEVICE void warp_scores(float (&s)[Cfg::NT][4], const Smem<typename P::Elem, Cfg>& sm,
                              const RelAttnProblem& p, int i0, const KeyBlock& kb, int warp, int lane) {
  using Elem = typename P::Elem;
  constexpr int LD = SmemLayout<Elem, Cfg>::LD;
  const Elem* qw = sm.q() + warp * 16 * LD;
  const Elem* slab = sm.rw() + (Cfg::BM - 16 - 16 * warp) * LD;
  float* band = sm.band(warp);
  const float* bias_u = sm.bias_u();
  const float* bias_vb = sm.bias_vb();
  {
    float pos[Cfg::NTB][4];
    zero_acc(pos);
    warp_mma<P, Cfg::DP, Cfg::NTB>(
        pos, [&](int k0) { return P::load_a(qw, LD, k0, bias_vb, lane); },
        [&](int k0, int nt) { return P::load_b2(slab + 8 * nt * LD, LD, k0, lane); });
#pragma unroll
    for (int nt = 0; nt < Cfg::NTB; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) band[acc_row(lane, e) * Cfg::LDBAND + acc_col(lane, nt, e)] = pos[nt][e];
  }
  zero_acc(s);
  const Elem* kt = sm.k();
  warp_mma<P, Cfg::DP, Cfg::NT>(
      s, [&](int k0) { return P::load_a(qw, LD, k0, bias_u, lane); },
      [&](int k0, int nt) { return P::load_b2(kt + 8 * nt * LD, LD, k0, lane); });
  __syncwarp();  // the band slab is complete
  const float c = p.scale * kLog2e;
#pragma unroll
  for (int nt = 0; nt < Cfg::NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int a = acc_row(lane, e), jj = acc_col(lane, nt, e);
      const float v = (s[nt][e] + band[a * Cfg::LDBAND + 15 - a + jj]) * c;
      s[nt][e] = visible(p, i0 + 16 * warp + a, kb.j0 + jj, kb.j1) ? v : kNegInf;
    }
  }
  __syncwarp();  // band reads done before the slab is written again
}

// One online-softmax step: s (log2 scores) -> unnormalised probabilities; running max m, running partial
// sums l (this thread's columns only) and the output accumulators o are rescaled. Rows r = 0, 1 are the
// accumulator rows g and g + 8.
template <int NT, int NTD>
MEMTX_DEVICE void softmax_step(float (&s)[NT][4], float (&m)[2], float (&l)[2], float (&o)[NTD][4]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = kNegInf;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
    mx = fmaxf(mx, shfl_xor(mx, 1));
    mx = fmaxf(mx, shfl_xor(mx, 2));
    const float m_new = fmaxf(m[r], mx);
    const float m_use = m_new == kNegInf ? 0.f : m_new;  // a row with nothing visible yet stays at zero
    const float alpha = exp2f(m[r] - m_use);
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
      s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
      sum += s[nt][2 * r] + s[nt][2 * r + 1];
    }
    l[r] = l[r] * alpha + sum;
    m[r] = m_new;
#pragma unroll
    for (int nt = 0; nt < NTD; ++nt) {
      o[nt][2 * r] *= alpha;
      o[nt][2 * r + 1] *= alpha;
    }
  }
}

// s (log2 scores) -> probabilities exp2(s - lse2) with the saved row statistics (lse2 = lse log2(e)).
template <int NT>
MEMTX_DEVICE void probabilities(float (&s)[NT][4], const float (&lse2)[2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = exp2f(s[nt][e] - lse2[e >> 1]);
}

// dP = dout_w v^T for this warp's 16 rows: dp[nt] (keys 8 nt ..).
template <class P, class Cfg>
MEMTX_DEVICE void warp_dprob(float (&dp)[Cfg::NT][4], const Smem<typename P::Elem, Cfg>& sm, int warp, int lane) {
  using Elem = typename P::Elem;
  constexpr int LD = SmemLayout<Elem, Cfg>::LD;
  const Elem* dow = sm.dout() + warp * 16 * LD;
  const Elem* vt = sm.v();
  zero_acc(dp);
  warp_mma<P, Cfg::DP, Cfg::NT>(
      dp, [&](int k0) { return P::load_a(dow, LD, k0, nullptr, lane); },
      [&](int k0, int nt) { return P::load_b2(vt + 8 * nt * LD, LD, k0, lane); });
}

// s <- dS = scale P (dP - delta), zero where P is zero (masked).
template <int NT>
MEMTX_DEVICE void softmax_grad(float (&s)[NT][4], const float (&dp)[NT][4], const float (&delta)[2], float scale) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = scale * s[nt][e] * (dp[nt][e] - delta[e >> 1]);
}

// This thread's two row statistics (rows g and g + 8 of the warp) from a per-block array.
MEMTX_DEVICE void row_pair(float (&out)[2], const float* rows, int warp, int lane, float factor) {
  out[0] = rows[16 * warp + (lane >> 2)] * factor;
  out[1] = rows[16 * warp + (lane >> 2) + 8] * factor;
}

// Rows i0 .. i0 + BM - 1 of (b, h) written with NaN (kv head index out of range).
template <class Elem, class Cfg>
MEMTX_DEVICE void fill_nan_rows(Elem* dst, float* rows_stat, const RelAttnProblem& p, int b, int h, int i0) {
  const float nan = quiet_nan();
  for (int c = threadIdx.x; c < Cfg::BM * p.D; c += Cfg::THREADS) {
    const int i = i0 + c / p.D;
    if (i < p.L) dst[((int64_t(b) * p.H + h) * p.L + i) * p.D + c % p.D] = from_float<Elem>(nan);
  }
  if (rows_stat != nullptr)
    for (int r = threadIdx.x; r < Cfg::BM; r += Cfg::THREADS)
      if (i0 + r < p.L) rows_stat[(int64_t(b) * p.H + h) * p.L + i0 + r] = nan;
}

}  // namespace kernels
}  // namespace cuda
}  // namespace memtx
