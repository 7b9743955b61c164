// Fused relative-position memory attention on the CPU (SPEC §1), forward and backward.
//
// Flash-style: a query block of kBlockM rows streams over key blocks (kBlockN keys in the backward; 1024 to 4096 in
// the forward, the more the fewer its query rows) with an online softmax; the backward recomputes the probabilities
// from the saved log-sum-exp. Within a tile the distances form a band of bm + n - 1 consecutive values; clamped to
// [0, R - 1] they are `cols` consecutive rows of r, which BLAS reads in place: the position term of a tile is one
// GEMM of the query block against those rows, read back along each row's diagonal (the last column stands for every
// distance >= R - 1). The backward folds dS onto the same band, so dq's position part and dr's rows are two more
// GEMMs against r and into dr in place.
// With a memory offset, key blocks never straddle the memory/segment boundary (memory keys carry mem_offset);
// blocks with no visible key are skipped.
//
// Short queries (decoding, evaluation with a long memory): when the (batch, head, query block) tasks cannot
// occupy the threads, the forward also splits each tile's key blocks into contiguous ranges (split-K); every
// range keeps its own running max, sum and unnormalised output, merged by their log-sum-exp at the end. Each
// key, value and r row is then read once per (batch, head). Tiles of few query rows skip BLAS for the content and
// value products, whose setup and packing cost as much as the work there: up to 4 rows (decoding), fused_key_block
// scores, exponentiates and accumulates key by key. Float32 tiles of more rows, under AVX-512, run as lane tiles
// (lane_rows_block): a key's scores for the tile's up to 64 rows are up to four vectors, and k and v stream with
// software prefetch. The BLAS tiles serve float64 and builds without AVX-512. Decoding over time-major keys (views
// of a [K, B, ...] projection), a task takes every head of a group of batches over chunks of keys
// (staged_heads_block), so that the heads read each key's neighbouring rows one after another; lane tiles of one
// query block take every head in turn over each key block (TimeMajorTiles). Under float32
// arithmetic the forward also reads bfloat16 or float16 k and v rows (inference of a half-precision model), widening
// them as it reads: the key-by-key tiles a vector at a time, the lane tiles a chunk of keys at a time.
//
// The saved log-sum-exp is float64 in every dtype, one double per query row. Rounded to float32 it would be off by
// up to half an ulp of |lse|, 16 eps at |lse| ~ 40 (a large score that every key of a row shares), and the
// backward's exp(s - lse) would scale all of that row's probabilities by as much. Measured at B=2 H=4 L=64 M=500
// D=64, every key equal and that shared score 40 (medians of 3 draws, relative L2 against float64): dv, dq, dr
// 9.9 / 11.0 / 10.1 eps with a float32 lse, 7.2 / 8.6 / 7.2 eps now, float32 PyTorch 7.1 / 7.5 / 7.1. The
// backward reads it as two T (exp_sub_pair).
//
// Scratch is a few tiles per thread (and, with split-K, one [bm, D] partial per range), plus one [Hk, R, D] partial
// of dr per batch chunk in the backward: nothing L x K.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/rel_memory_attention.h"
#include "blas.h"
#include "vec_ops.h"

namespace memtx {
namespace cpu {
namespace {

constexpr int64_t kBlockM = 64;                  // queries per tile
constexpr int64_t kBlockN = 512;                 // keys per tile of the backward and of split-K ranges
// Keys per tile of the forward otherwise: kScoreTile scores a tile, between kForwardBlockN and kMaxBlockN keys, so
// that a tile of few query rows (decoding, short segments) makes a few long BLAS calls per (batch, head) instead of
// many short ones. Measured side by side in one process (B=8 H=8 D=64): at L = 1, 4096-key blocks took 1.10-1.14x
// SDPA's time where 512-key ones took 1.16-1.23x; at L = 64 and L = 512, 1024 keys beat 512 by 3-5%.
constexpr int64_t kForwardBlockN = 1024;
constexpr int64_t kScoreTile = kBlockM * kForwardBlockN;
constexpr int64_t kMaxBlockN = 4096;

// Most r rows a tile with key blocks of block_n keys reads (bm + n - 1): the row stride of its band tiles.
constexpr int64_t band_columns(int64_t block_n) { return kBlockM + block_n - 1; }

struct KeyBlock {
  int64_t j0, j1;  // keys [j0, j1)
  int64_t offset;  // mem_offset for memory keys, 0 for segment keys
};

// Key blocks of [memory ; segment], of at most block_n keys. With a memory offset none straddles j = M (memory keys
// carry it); without one every key has the same distance formula and the blocks tile [0, K) evenly (no short block at
// the boundary).
std::vector<KeyBlock> key_blocks(const RelAttnShape& s, int64_t block_n) {
  std::vector<KeyBlock> blocks;
  const int64_t split = s.mem_offset > 0 ? s.M : 0;
  for (int64_t j0 = 0; j0 < split; j0 += block_n)
    blocks.push_back({j0, std::min(j0 + block_n, split), s.mem_offset});
  for (int64_t j0 = split; j0 < s.K; j0 += block_n) blocks.push_back({j0, std::min(j0 + block_n, s.K), 0});
  return blocks;
}

// Strided view of one [*, *, rows, D] tensor (last dim contiguous).
template <typename T>
struct Strided4 {
  T* data;
  int64_t s0, s1, s2;
  explicit Strided4(const at::Tensor& t)
      : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  T* row(int64_t a, int64_t b, int64_t i) const { return data + a * s0 + b * s1 + i * s2; }
};

// The r rows [d0, d0 + cols) a tile reads, every one of them in [0, R - 1].
struct Band {
  int64_t d0, cols;
};

// The position term of a tile's query rows against its band: element (row, c) at data[row * row_stride + c *
// col_stride] (rows by band columns, or band columns by rows when the rows are few: see QueryTile::position).
template <typename T>
struct PositionScores {
  const T* data;
  int64_t row_stride, col_stride;
  PositionScores rows_from(int64_t row) const { return {data + row * row_stride, row_stride, col_stride}; }
  T at(int64_t row, int64_t c) const { return data[row * row_stride + c * col_stride]; }
};

// At most this many query rows make the position GEMM stream the band's r rows as its large operand (BLAS packs the
// small one): with few rows, packing the r rows each tile would cost as much as the GEMM itself.
constexpr int64_t kFewRows = 32;

// One query block of one (batch, head) against the key blocks it can see.
template <typename T>
struct QueryTile {
  const RelAttnShape& s;
  int64_t i0, bm;  // queries [i0, i0 + bm)
  int64_t g;       // kv head
  int64_t block_n;  // longest key block: row stride of the score tiles; band tiles have band_columns(block_n)

  int64_t band_stride() const { return band_columns(block_n); }
  // The same query block against the keys of kv head `kv_head`.
  QueryTile with_kv_head(int64_t kv_head) const { return {s, i0, bm, kv_head, block_n}; }

  int64_t first_visible(int64_t i) const { return s.window > 0 ? std::max<int64_t>(0, s.M + i - s.window + 1) : 0; }
  bool sees(const KeyBlock& kb) const {
    return kb.j0 <= s.M + i0 + bm - 1 && kb.j1 - 1 >= first_visible(i0);
  }
  // kb narrowed to the keys some row of the tile sees (no work on columns masked for every row).
  KeyBlock clip(const KeyBlock& kb) const {
    return {std::max(kb.j0, first_visible(i0)), std::min(kb.j1, s.M + i0 + bm), kb.offset};
  }
  // Visible keys of row ii inside kb, relative to kb.j0, inclusive; lo > hi when none.
  void visible_range(const KeyBlock& kb, int64_t ii, int64_t& lo, int64_t& hi) const {
    const int64_t i = i0 + ii;
    lo = std::max(kb.j0, first_visible(i)) - kb.j0;
    hi = std::min(kb.j1 - 1, s.M + i) - kb.j0;
  }
  // Distance of row ii to the first key of kb; to key jj it is row_top - jj.
  int64_t row_top(const KeyBlock& kb, int64_t ii) const { return s.M + i0 + ii - kb.j0 + kb.offset; }
  // The tile's distances clamped to [0, R - 1]: every visible (ii, jj) reads column min(d, R - 1) - d0.
  Band band(const KeyBlock& kb) const {
    const int64_t top = row_top(kb, bm - 1), bottom = row_top(kb, 0) - (kb.j1 - kb.j0 - 1);
    const int64_t d1 = std::min(top, s.R - 1);
    const int64_t d0 = std::min(std::max<int64_t>(bottom, 0), d1);
    return {d0, d1 - d0 + 1};
  }
  // Keys jj <= clamped_until(kb, ii) sit at a distance >= R - 1 (they read the band's last column R - 1 - d0).
  int64_t clamped_until(const KeyBlock& kb, int64_t ii) const { return row_top(kb, ii) - (s.R - 1); }

  // The position term of every (query row, band row): qv [rows, D] times the band's r rows (r_head: kv head g's
  // rows, row stride r_stride), into pos (room for rows x band_stride()); rows = bm, or bm per batch of a group.
  PositionScores<T> position(const Band& band, const T* qv, int64_t rows, const T* r_head, int64_t r_stride,
                             T* pos) const {
    const T* r_rows = r_head + band.d0 * r_stride;
    if (rows <= kFewRows) {  // [cols, rows] = r_rows qv^T
      gemm<T>(false, true, band.cols, rows, s.D, T(1), r_rows, r_stride, qv, s.D, T(0), pos, rows);
      return {pos, 1, rows};
    }
    gemm<T>(false, true, rows, band.cols, s.D, T(1), qv, s.D, r_rows, r_stride, T(0), pos, band_stride());
    return {pos, band_stride(), 1};
  }

  // score [bm, block_n] = (q+u)'k^T on every key of kb; qu are the scaled biased queries [bm, D]. Each row then
  // gains its position term (add_position) just before its softmax, while it is in L1.
  void content_scores(const KeyBlock& kb, const T* qu, const T* k_rows, int64_t k_stride, T* score) const {
    gemm<T>(false, true, bm, kb.j1 - kb.j0, s.D, T(1), qu, s.D, k_rows, k_stride, T(0), score, block_n);
  }

  // Score row ii gains the position term pos (the tile's rows) read along its diagonal, on its visible keys [lo, hi]
  // (visible_range; lo <= hi).
  void add_position(const KeyBlock& kb, const Band& band, const PositionScores<T>& pos, int64_t ii, int64_t lo,
                    int64_t hi, T* row) const {
    const int64_t split = std::min(hi, clamped_until(kb, ii));
    const T clamped = pos.at(ii, s.R - 1 - band.d0 < band.cols ? s.R - 1 - band.d0 : 0);
    for (int64_t jj = lo; jj <= split; ++jj) row[jj] += clamped;
    const int64_t top = row_top(kb, ii) - band.d0;  // column of key jj: top - jj
    const T* p = pos.data + ii * pos.row_stride;
    const int64_t first = std::max(lo, split + 1);
    if (pos.col_stride == 1) {
      if (first <= hi) add_reversed_into(row + first, p + top - first, hi - first + 1);
    } else {
      for (int64_t jj = first; jj <= hi; ++jj) row[jj] += p[(top - jj) * pos.col_stride];
    }
  }

  // band_rows [bm, band_stride()] (first cols columns) = dS [bm, block_n] folded onto the band: column c sums dS over
  // the keys that read r row d0 + c (one key each, but the last column takes every clamped key).
  void fold_band(const KeyBlock& kb, const Band& band, const T* ds, const int64_t* lo, const int64_t* hi,
                 T* band_rows) const {
    for (int64_t ii = 0; ii < bm; ++ii) {
      T* brow = band_rows + ii * band_stride();
      std::fill(brow, brow + band.cols, T(0));
      if (lo[ii] > hi[ii]) continue;
      const T* row = ds + ii * block_n;
      const int64_t split = std::min(hi[ii], clamped_until(kb, ii));
      T clamped = 0;
      for (int64_t jj = lo[ii]; jj <= split; ++jj) clamped += row[jj];
      if (split >= lo[ii]) brow[s.R - 1 - band.d0] += clamped;
      const int64_t top = row_top(kb, ii) - band.d0;
      for (int64_t jj = std::max(lo[ii], split + 1); jj <= hi[ii]; ++jj) brow[top - jj] = row[jj];
    }
  }
};

// qu = scale * (q + u), qv = scale * (q + vb) for the bm rows of a query block.
template <typename T>
void biased_queries(const T* q_rows, int64_t q_stride, const T* u, const T* vb, T scale, int64_t bm, int64_t D,
                    T* qu, T* qv) {
  for (int64_t ii = 0; ii < bm; ++ii) {
    const T* qr = q_rows + ii * q_stride;
    add(qu + ii * D, qr, u, D);
    add(qv + ii * D, qr, vb, D);
    scale_inplace(qu + ii * D, scale, D);
    scale_inplace(qv + ii * D, scale, D);
  }
}

template <typename T>
void zero_outside(T* row, int64_t lo, int64_t hi, int64_t n) {
  std::fill(row, row + std::min(lo, n), T(0));
  if (hi + 1 < n) std::fill(row + std::max<int64_t>(hi + 1, 0), row + n, T(0));
}

// The running softmax of one tile over one range of key blocks: out rows (unnormalised), row max, row sum.
template <typename T>
struct OnlineSoftmax {
  T* out;  // [bm, D]
  T* m;    // [bm]
  T* l;    // [bm]

  // Row ii takes the scores x[0, n) of its visible keys: x becomes exp(x - new max), their sum joins l and the
  // output row out[ii] (D wide) is rescaled to the new max.
  void absorb(int64_t ii, T* x, int64_t n, int64_t D) const {
    const T m_new = std::max(m[ii], row_max(x, n));
    const T sum = exp_sub_sum(x, m_new, n);
    const T alpha = std::exp(m[ii] - m_new);
    l[ii] = l[ii] * alpha + sum;
    m[ii] = m_new;
    if (alpha != T(1)) scale_inplace(out + ii * D, alpha, D);
  }
};

// Query rows of a tile, at most, that the forward streams key by key (fused_key_block); more rows take lane tiles
// (float32, AVX-512), else BLAS tiles. Measured side by side (B=8 H=8 M=1600 D=64, time over SDPA's, key by key /
// lane tiles / BLAS): L = 1 0.96x / 2.2x / 1.16x; L = 2 1.39x / 2.4x / 1.38x; L = 4 1.35x / 1.72x / 1.53x; L = 8
// 1.68x / 1.40x / 1.41x; L = 16 1.88x / 1.03x / 1.34x. Lane tiles of several registers against BLAS tiles (bench
// harness, one process each): L = 24 1.04x / 1.23x, L = 32 0.95x / 1.23x, L = 48 1.01x / 1.15x, L = 64 M = 640 1.19x /
// 1.23x, L = 64 M = 3800 0.93x / 1.09x, L = 128 1.10x / 1.27x, L = 512 M = 512 1.07x / 1.15x.
constexpr int64_t kFusedRows = 4;
// Keys per chunk of fused_key_block: its probabilities (a stack row) stay in L1 from the scoring to the
// accumulation; its k rows (32 KB at D = 64) stay in L2 for the tile's other rows, its r rows for every batch.
constexpr int64_t kFusedChunk = 128;

// One key block of a tile of few query rows (decoding), fused in one pass over the keys: for each chunk of keys,
// every batch of the group and every row scores each visible key as (q+u)'k + (q+vb)'r_d in one reduction, updates
// its online softmax and adds p v into its output. Each k and v row comes from memory once per (batch, head) and
// each r row once per group, with no score tile and no BLAS call (at L = 1 their setup costs as much as the work).
template <typename T, typename E>
void fused_key_block(const QueryTile<T>& tile, const KeyBlock& kb, const T* qu, const T* qv, int64_t b0, int64_t nb,
                     const Strided4<E>& K, const Strided4<E>& V, const T* r_head, int64_t r_stride,
                     const OnlineSoftmax<T>* acc) {
  const RelAttnShape& s = tile.s;
  const int64_t D = s.D, bm = tile.bm;
  T p[kFusedChunk];
  for (int64_t c0 = kb.j0; c0 < kb.j1; c0 += kFusedChunk) {
    const KeyBlock chunk{c0, std::min(c0 + kFusedChunk, kb.j1), kb.offset};
    for (int64_t gb = 0; gb < nb; ++gb) {
      const E* k_rows = K.row(b0 + gb, tile.g, c0);
      const E* v_rows = V.row(b0 + gb, tile.g, c0);
      const OnlineSoftmax<T>& a = acc[gb];
      for (int64_t ii = 0; ii < bm; ++ii) {
        int64_t lo, hi;
        tile.visible_range(chunk, ii, lo, hi);
        if (lo > hi) continue;
        const T* qu_row = qu + (gb * bm + ii) * D;
        const T* qv_row = qv + (gb * bm + ii) * D;
        const int64_t top = tile.row_top(chunk, ii);  // distance of key jj: top - jj, clamped to R - 1
        auto r_row = [&](int64_t jj) { return r_head + std::min(top - jj, s.R - 1) * r_stride; };
        int64_t jj = lo;
        for (; jj + 16 <= hi + 1; jj += 16) {
          const E* k16[16];
          const T* r16[16];
          for (int t = 0; t < 16; ++t) {
            k16[t] = k_rows + (jj + t) * K.s2;
            r16[t] = r_row(jj + t);
          }
          dot2_rows16(qu_row, k16, qv_row, r16, D, p + jj);
        }
        for (; jj <= hi; ++jj) p[jj] = dot2(qu_row, k_rows + jj * K.s2, qv_row, r_row(jj), D);
        a.absorb(ii, p + lo, hi - lo + 1, D);
        T* out_row = a.out + ii * D;
        for (jj = lo; jj + 4 <= hi + 1; jj += 4) {
          const E* v0 = v_rows + jj * V.s2;
          if (c0 + kFusedChunk < kb.j1 && ii + 1 == bm) {  // the next chunk's k rows, while v streams
            for (int t = 0; t < 4; ++t) prefetch_row(k_rows + (kFusedChunk + jj + t) * K.s2, D);
          }
          axpy4_into(out_row, p + jj, v0, v0 + V.s2, v0 + 2 * V.s2, v0 + 3 * V.s2, D);
        }
        for (; jj <= hi; ++jj) axpy_into(out_row, p[jj], v_rows + jj * V.s2, D);
      }
    }
  }
}

// Keys outermost in memory: the rows of one key for every (batch, head) of t [B, Hk, K, D] lie within one key
// stride, as in time-major views ([K, B, Hk, D], or a fused projection [K, B, 2, Hk, D] of [memory ; segment]),
// and the rows of one (batch, head) are not one dense stream.
template <typename T>
bool keys_outermost(const Strided4<T>& t, const RelAttnShape& s) {
  return t.s2 > s.D && (s.B - 1) * t.s0 + (s.Hk - 1) * t.s1 + s.D <= t.s2;
}

// Keys per chunk of staged_heads_block, and the bytes of k and v rows a chunk may span: a group's chunk stays in
// the 1 MB L2 of a Zen 4 or Sapphire Rapids core while each head reads its part.
constexpr int64_t kStagedKeys = 32;
constexpr int64_t kStagedBytes = 512 * 1024;

// Decoding over time-major keys (keys_outermost). There the rows of one (batch, head) are a key stride apart, each
// in a page of its own, which the hardware prefetchers do not follow: streaming one head at a time (fused_key_block
// per head over its whole key block) read k and v about 1.4x slower than dense rows. Here a task takes every head
// of a group of batches over a key block, in chunks of kStagedKeys keys, and runs each head over the chunk in turn
// (fused_key_block): the heads read neighbouring lines of the same pages one after another, which the prefetchers
// stream. qu, qv and acc hold the group's rows of each head in turn (`rows` query rows and `group` entries per
// head). Measured side by side (B=8 H=8 D=64, L=1, a fused [K, B, 2, H, D] projection, 2-core AMD EPYC): M=640 /
// 1600 / 3800 took 1.58-1.88 / 4.74-5.17 / 9.77-11.90 ms, per head 2.08-2.50 / 6.30-6.70 / 14.19-14.97 ms. Software
// prefetches of the next chunk, key by key in address order, made no difference that rose above the noise.
template <typename T, typename E>
void staged_heads_block(const QueryTile<T>& tile, const KeyBlock& kb, const int64_t* kv_head, int64_t n_heads,
                        const T* qu, const T* qv, int64_t rows, int64_t b0, int64_t nb, const Strided4<E>& K,
                        const Strided4<E>& V, const T* r_data, int64_t r_head_stride, int64_t r_stride,
                        const OnlineSoftmax<T>* acc, int64_t group) {
  const RelAttnShape& s = tile.s;
  for (int64_t c0 = kb.j0; c0 < kb.j1; c0 += kStagedKeys) {
    const KeyBlock chunk{c0, std::min(c0 + kStagedKeys, kb.j1), kb.offset};
    for (int64_t hh = 0; hh < n_heads; ++hh) {
      const QueryTile<T> head_tile = tile.with_kv_head(kv_head[hh]);
      fused_key_block(head_tile, chunk, qu + hh * rows * s.D, qv + hh * rows * s.D, b0, nb, K, V,
                      r_data + head_tile.g * r_head_stride, r_stride, acc + hh * group);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Tiles of more than kFusedRows query rows, float32 under AVX-512: the tile's rows are the lanes of R registers (R =
// 1 to 4, 16 rows each), so a key's scores for every row are R vectors. Per key block and batch: q' is transposed
// once to [D, 16 R]; the scores of a group of keys are 16 accumulators, summed over d as broadcast(k[t][d]) * q'[d]
// (no reduction, no packing of k; with R registers one broadcast feeds R FMAs); the position term comes from the
// group's band GEMM, where lane ii reads its own diagonal column: laid out by rows, 16 rows' columns for 16 keys
// load as vectors and transpose to the keys' lanes (transposed_diagonals), else a gather per key; the online softmax
// runs lane-wise over chunks of kLaneChunk keys; the output, transposed to [D, 16 R], gains broadcast(v[t][d]) *
// p[t] (a block of 16 / R output columns held in registers over the chunk's keys). MKL's GEMMs for 16-row tiles ran
// at about 37% (q k^T) and 60% (p v) of the FMA peak, and packed k on every 64-row tile (a tenth of the time at L =
// 64). Element-wise broadcasts stall on a missed line where BLAS's vector loads do not, so the next chunk's k and v
// rows are prefetched a line at a time between the FMAs that use the matching rows of this chunk (LinePrefetcher):
// side by side at L = 16, M = 1600 no prefetch took 1.52x SDPA's time, a burst of prefetches per 16 keys 1.05x (the
// samples sat on the prefetches: they filled the line fill buffers), spread ones 0.88x; at M = 640, 1.26x and 1.12x
// for the last two.
constexpr int64_t kLaneRegisters = 4;  // registers of a lane tile, at most: 64 rows, every forward tile
static_assert(kBlockM <= 16 * kLaneRegisters, "a forward tile fits the lane tiles' registers");
constexpr int64_t kLaneChunk = 64;    // keys per softmax update: their scores, [kLaneChunk, 16 R], stay in L1

// v[i] <- column i of the 16 x 16 matrix whose rows are v: lane j of the result is lane i of the input row j.
inline void transpose16x16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    v[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    v[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    v[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    v[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(v[h + i], v[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(v[h + i], v[h + i + 4], 0xDD);
    }
  }
  for (int i = 0; i < 8; ++i) {
    v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
  }
}

// Scratch of lane_rows_block, in 64-byte aligned rows of 16 floats (its aligned loads and stores): q' and the output
// transposed ([D, 16 R] each), the chunk's scores [kLaneChunk, 16 R].
struct alignas(64) LaneRow {
  float v[16];
};
// With `widened` (rows narrower than float32) also a chunk's k and v rows widened, [kLaneChunk, D] each.
inline int64_t lane_scratch_rows(int64_t D, int64_t R, bool widened) {
  return (2 * D + kLaneChunk) * R + (widened ? (2 * kLaneChunk * D + 15) / 16 : 0);
}

// One key block of a tile of at most 16 R rows (R registers of lanes) for one batch: a.out, a.m, a.l updated as the
// BLAS path does. pos holds the tile's rows of the group's position GEMM against band; k_rows, v_rows are the rows of
// key kb.j0. Rows narrower than float32 (E) are widened a chunk at a time into scratch, where the FMAs' broadcasts
// read them. Never inlined: inlined into the forward's task loop (as GCC did for bfloat16 rows) its accumulators
// spilled to the stack, and bfloat16 rows took 1.5-1.8x the float32 time at L = 8 and 16 (B=8 H=8 M=1600 D=64, the
// kernel alone); out of line, 0.94x at L = 16.
template <int R, typename E>
[[gnu::noinline]] void lane_rows_block(const QueryTile<float>& tile, const KeyBlock& kb, const Band& band, const float* qu,
                     const PositionScores<float>& pos, const E* k_rows, int64_t k_stride, const E* v_rows,
                     int64_t v_stride, const OnlineSoftmax<float>& a, float* scratch) {
  constexpr int W = 16 * R;                    // lanes: the tile's rows
  constexpr int kCallKeys = R == 1 ? 8 : 16 / R;  // keys per lanes_dot call: at most 16 accumulators
  constexpr int kGroupKeys = R == 1 ? 16 : kCallKeys;  // keys scored before their position terms are gathered
  const RelAttnShape& s = tile.s;
  const int64_t D = s.D, bm = tile.bm, n = kb.j1 - kb.j0;
  float* q_cols = scratch;           // [D, W]
  float* out_cols = q_cols + D * W;  // [D, W]
  float* chunk = out_cols + D * W;   // [kLaneChunk, W]
  float* k_widened = chunk + kLaneChunk * W;  // [kLaneChunk, D] (E narrower than float32 only), then v's
  float* v_widened = k_widened + kLaneChunk * D;
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t ii = 0; ii < W; ++ii) {
      q_cols[d * W + ii] = ii < bm ? qu[ii * D + d] : 0.f;
      out_cols[d * W + ii] = ii < bm ? a.out[ii * D + d] : 0.f;
    }
  }
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const int64_t top0 = tile.row_top(kb, 0) - band.d0;
  // key j is visible to row ii when j - (M + i0) <= ii (causal) and ii <= j - (M + i0) + window - 1 (window)
  const int64_t diag0 = kb.j0 - (s.M + tile.i0);
  const int64_t window = s.window > 0 ? s.window : std::numeric_limits<int32_t>::max() / 2;
  // per register r: its rows 16 r + lane, which of them the tile holds, their running max and sum, and the gather
  // offsets of their pos rows (row ii reads column min(top0 + ii - jj, R - 1) - d0)
  __m512i rows[R], pos_rows[R];
  __mmask16 row_lanes[R];
  __m512 m[R], l[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = _mm512_add_epi32(lane, _mm512_set1_epi32(16 * r));
    row_lanes[r] = _mm512_cmp_epi32_mask(rows[r], _mm512_set1_epi32(static_cast<int>(bm)), _MM_CMPINT_LT);
    pos_rows[r] = _mm512_mullo_epi32(rows[r], _mm512_set1_epi32(static_cast<int>(pos.row_stride)));
    m[r] = _mm512_mask_loadu_ps(minus_inf, row_lanes[r], a.m + 16 * r);
    l[r] = _mm512_maskz_loadu_ps(row_lanes[r], a.l + 16 * r);
  }
  const __m512i col_stride = _mm512_set1_epi32(static_cast<int>(pos.col_stride));
  const __m512i last_col = _mm512_set1_epi32(static_cast<int>(s.R - 1 - band.d0));
  // Whether register r takes the position term of keys [j, j + 16) by rows (16 vector loads and a transpose) rather
  // than by a gather per key: when the band is laid out by rows and no distance there is clamped (each row's 16
  // columns are then consecutive). Side by side (B=8 H=8 D=64, dense rows, 5 alternations of the builds, medians):
  // at L = 64 the forward went from 9.51 to 8.56 ms at M = 640 (1.28x to 1.14x SDPA's time), 47.6 to 46.1 ms at
  // M = 3800; tiles of at most kFewRows rows lay the band out by columns and keep the gathers.
  const auto diagonals_by_rows = [&](int64_t j, int r) {
    return pos.col_stride == 1 && top0 + 16 * r + 15 - j <= s.R - 1 - band.d0;
  };
  // block_pos [16, W] <- the position term of keys [j, j + 16) for the registers that take it by rows (block_by_rows):
  // row ii's band row holds the 16 keys' terms in consecutive columns, the last key's first, so 16 rows load as 16
  // vectors whose transpose is the keys' lanes (columns outside the band read 0: no visible pair reads them).
  alignas(64) float block_pos[16 * W];
  bool block_by_rows[R];
  const auto transposed_diagonals = [&](int64_t j) {
    for (int r = 0; r < R; ++r) {
      block_by_rows[r] = diagonals_by_rows(j, r);
      if (!block_by_rows[r]) continue;
      const int64_t first = top0 + 16 * r - (j + 15);  // column of row 16 r's lane 0
      __m512 v[16];
      for (int b = 0; b < 16; ++b) {
        const int64_t ii = 16 * r + b, c = first + b;  // lane e: column c + e, key j + 15 - e
        const int64_t lo = std::clamp<int64_t>(-c, 0, 16), hi = std::clamp<int64_t>(band.cols - c, 0, 16);
        const __mmask16 in_band =
            ii < bm && lo < hi ? static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1)) : __mmask16(0);
        v[b] = in_band ? _mm512_maskz_loadu_ps(in_band, pos.data + ii * pos.row_stride + c) : _mm512_setzero_ps();
      }
      transpose16x16(v);
      for (int e = 0; e < 16; ++e) _mm512_store_ps(block_pos + (15 - e) * W + 16 * r, v[e]);
    }
  };

  // The `count` rows of the next chunk that match rows [row, row + count) of this one, prefetched while these are
  // used.
  const auto next_chunk_rows = [&](const E* base, int64_t stride, int64_t row, int64_t count) {
    const int64_t next = row + kLaneChunk;
    if (next >= n) return LinePrefetcher();
    return LinePrefetcher(base + next * stride, stride * static_cast<int64_t>(sizeof(E)),
                          D * static_cast<int64_t>(sizeof(E)), std::min(n - next, count));
  };
  LinePrefetcher none;
  for (int64_t c0 = 0; c0 < n; c0 += kLaneChunk) {
    const int64_t cn = std::min(kLaneChunk, n - c0);
    // the chunk's k and v rows in float32: in place, or widened into the scratch
    const float *k_chunk, *v_chunk;
    int64_t k_step, v_step;
    if constexpr (std::is_same_v<E, float>) {
      k_chunk = k_rows + c0 * k_stride, v_chunk = v_rows + c0 * v_stride, k_step = k_stride, v_step = v_stride;
    } else {
      widen_rows(k_rows + c0 * k_stride, k_stride, cn, D, k_widened);
      widen_rows(v_rows + c0 * v_stride, v_stride, cn, D, v_widened);
      k_chunk = k_widened, v_chunk = v_widened, k_step = v_step = D;
    }
    for (int64_t t0 = 0; t0 < cn; t0 += kGroupKeys) {
      const int64_t tn = std::min<int64_t>(kGroupKeys, cn - t0);
      __m512 acc[kGroupKeys * R];
      const float* k0 = k_chunk + t0 * k_step;
      if (tn == kGroupKeys) {
        for (int part = 0; part < kGroupKeys / kCallKeys; ++part) {
          LinePrefetcher next_k = next_chunk_rows(k_rows, k_stride, c0 + t0 + part * kCallKeys, kCallKeys);
          lanes_dot<kCallKeys, R>(q_cols, k0 + part * kCallKeys * k_step, k_step, D, acc + part * kCallKeys * R,
                                  next_k);
        }
      } else {
        for (int64_t t = 0; t < tn; ++t) lanes_dot<1, R>(q_cols, k0 + t * k_step, k_step, D, acc + t * R, none);
      }
      for (int64_t t = 0; t < tn; ++t) {
        const int64_t jj = c0 + t0 + t, key = t0 + t;
        if (key % 16 == 0) transposed_diagonals(jj);
        const __m512i diag = _mm512_set1_epi32(static_cast<int>(diag0 + jj));
        const __m512i diag_end = _mm512_set1_epi32(static_cast<int>(diag0 + jj + window - 1));
        const __m512i top = _mm512_set1_epi32(static_cast<int>(top0 - jj));
        for (int r = 0; r < R; ++r) {
          const __mmask16 visible = row_lanes[r] & _mm512_cmp_epi32_mask(diag, rows[r], _MM_CMPINT_LE) &
                                    _mm512_cmp_epi32_mask(rows[r], diag_end, _MM_CMPINT_LE);
          __m512 p;
          if (block_by_rows[r]) {
            p = _mm512_load_ps(block_pos + (key % 16) * W + 16 * r);
          } else {
            const __m512i col = _mm512_min_epi32(_mm512_add_epi32(top, rows[r]), last_col);
            const __m512i offset = _mm512_add_epi32(pos_rows[r], _mm512_mullo_epi32(col, col_stride));
            p = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), visible, offset, pos.data, 4);
          }
          _mm512_store_ps(chunk + key * W + 16 * r, _mm512_mask_add_ps(minus_inf, visible, acc[t * R + r], p));
        }
      }
    }
    // lane-wise online softmax over the chunk (a lane that has seen no key keeps m = -inf: its exponent base is 0)
    __m512 alpha[R];
    for (int r = 0; r < R; ++r) {
      __m512 m_new = m[r];
      for (int64_t t = 0; t < cn; ++t) m_new = _mm512_max_ps(m_new, _mm512_load_ps(chunk + t * W + 16 * r));
      const __m512 base = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_new, minus_inf, _CMP_NEQ_OQ), m_new);
      alpha[r] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m[r], minus_inf, _CMP_NEQ_OQ),
                                     static_cast<__m512>(Vectorized<float>(_mm512_sub_ps(m[r], base)).exp_u20()));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < cn; ++t) {
        float* e_row = chunk + t * W + 16 * r;
        const __m512 e = Vectorized<float>(_mm512_sub_ps(_mm512_load_ps(e_row), base)).exp_u20();
        _mm512_store_ps(e_row, e);
        sum = _mm512_add_ps(sum, e);
      }
      l[r] = _mm512_fmadd_ps(l[r], alpha[r], sum);
      m[r] = m_new;
    }
    for (int64_t d = 0; d < D; ++d) {
      for (int r = 0; r < R; ++r) {
        float* o = out_cols + d * W + 16 * r;
        _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), alpha[r]));
      }
    }
    LinePrefetcher next_v = next_chunk_rows(v_rows, v_stride, c0, kLaneChunk);
    lanes_pv<R>(out_cols, chunk, v_chunk, v_step, cn, D, next_v);
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(a.m + 16 * r, row_lanes[r], m[r]);
    _mm512_mask_storeu_ps(a.l + 16 * r, row_lanes[r], l[r]);
  }
  for (int64_t ii = 0; ii < bm; ++ii)
    for (int64_t d = 0; d < D; ++d) a.out[ii * D + d] = out_cols[d * W + ii];
}

// lane_rows_block with `registers` (1 to kLaneRegisters) registers of lanes.
template <typename E>
void lane_rows_block_for(int64_t registers, const QueryTile<float>& tile, const KeyBlock& kb, const Band& band,
                         const float* qu, const PositionScores<float>& pos, const E* k_rows, int64_t k_stride,
                         const E* v_rows, int64_t v_stride, const OnlineSoftmax<float>& a, float* scratch) {
  switch (registers) {
    case 1: return lane_rows_block<1, E>(tile, kb, band, qu, pos, k_rows, k_stride, v_rows, v_stride, a, scratch);
    case 2: return lane_rows_block<2, E>(tile, kb, band, qu, pos, k_rows, k_stride, v_rows, v_stride, a, scratch);
    case 3: return lane_rows_block<3, E>(tile, kb, band, qu, pos, k_rows, k_stride, v_rows, v_stride, a, scratch);
    default: return lane_rows_block<4, E>(tile, kb, band, qu, pos, k_rows, k_stride, v_rows, v_stride, a, scratch);
  }
}
#endif

// How the forward cuts its work: a task is one query block of `heads` heads, for a group of `group` batches (they
// share one GEMM against the band's r rows, so r is read once per group), over one of `splits` ranges of key
// blocks of at most block_n keys. Groups of kGroupRows query rows first; smaller groups, then split-K ranges (of
// kBlockN-key blocks), only when the tasks would not give every thread four. Without split-K, key blocks hold
// kScoreTile scores of a tile (kForwardBlockN to kMaxBlockN keys). A task takes one head, but when decoding over
// time-major keys (staged_heads_block): then it takes every head, of a group of batches whose chunk of k and v rows
// fits kStagedBytes, over one of enough split-K ranges (of kBlockN-key blocks) to give every thread four tasks.
// Lane tiles of one query block over time-major keys take every head too, of a group of at most kFewRows query
// rows per head, over enough split-K ranges (of kForwardBlockN-key blocks) for four tasks per thread.
struct ForwardPlan {
  int64_t group, groups, splits, block_n, heads;
};

// How the forward's tasks read time-major keys (keys_outermost), by the kind of its tiles.
// interleaved_heads: the rows of a (batch, head) sit a key stride apart, a page each, as for staged_heads_block.
// Streamed head by head over key blocks of 4096 keys, one head's pass at M = 3800 touched 7.6k pages, more than the
// 3072-entry L2 TLB of a Zen 4 holds. Instead every head of the task takes each key block of kForwardBlockN keys in
// turn: 1024 pages for a group of two batches, still mapped for the next head. Measured side by side in three
// alternations of the two builds (B=8 H=8 D=64, float32, 2-core AMD EPYC; medians of the time over that of dense
// rows): L = 16 M = 3800 1.23x (head by head 1.38x), L = 64 M = 3800 1.15x (1.25x); at M = 640 1.18x and 1.16x
// (1.22x and 1.14x: within the noise). Key blocks of 512 keys did as well within the noise; of 128, the setup of
// each call made L = 16 M = 640 1.58x.
enum class TimeMajorTiles {
  none,               // dense keys, or tiles that stream each head on its own
  staged_heads,       // key-by-key tiles: staged_heads_block
  interleaved_heads,  // lane tiles of one query block: every head in turn over each key block
};

// Query rows of a group's position GEMM, at most: its scores (kGroupRows x the band) stay in the L2 cache. Measured
// side by side (B=8 H=8 D=64): at L = 64 groups of all 8 batches took 1.17-1.20x SDPA's time, groups of 2 (128 rows)
// 1.11-1.12x; at L = 512 1.20x and 1.13x; at L = 1 every batch still shares one GEMM.
constexpr int64_t kGroupRows = 128;

ForwardPlan forward_plan(const RelAttnShape& s, int64_t n_qblocks, TimeMajorTiles time_major,
                         int64_t element_bytes) {
  const int64_t wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  const int64_t n_blocks = static_cast<int64_t>(key_blocks(s, kBlockN).size());
  // Every head per task, groups of `group` batches, over enough split-K ranges of block_n-key blocks.
  const auto every_head = [&](int64_t group, int64_t block_n) -> ForwardPlan {
    group = std::clamp<int64_t>(group, 1, s.B);
    const int64_t groups = (s.B + group - 1) / group;
    const int64_t blocks = static_cast<int64_t>(key_blocks(s, block_n).size());
    const int64_t splits = std::clamp<int64_t>((wanted + n_qblocks * groups - 1) / (n_qblocks * groups), 1, blocks);
    return {group, groups, splits, block_n, s.H};
  };
  if (time_major == TimeMajorTiles::interleaved_heads)  // groups of at most kFewRows rows per head
    return every_head(kFewRows / std::min(kBlockM, s.L), kForwardBlockN);
  if (time_major == TimeMajorTiles::staged_heads)  // k and v rows of a group's chunk within kStagedBytes
    return every_head(kStagedBytes / (2 * kStagedKeys * s.Hk * s.D * element_bytes), kBlockN);
  const int64_t tiles = s.H * n_qblocks;
  const int64_t tile_rows = std::min(kBlockM, s.L);
  const int64_t long_block_n =
      std::clamp<int64_t>(kScoreTile / tile_rows / kForwardBlockN * kForwardBlockN, kForwardBlockN, kMaxBlockN);
  const int64_t widest = std::clamp<int64_t>(kGroupRows / tile_rows, 1, s.B);
  const int64_t widest_groups = (s.B + widest - 1) / widest;
  if (tiles * widest_groups >= wanted) return {widest, widest_groups, 1, long_block_n, 1};
  if (tiles * s.B >= wanted) {
    const int64_t groups = std::min(s.B, (wanted + tiles - 1) / tiles), group = (s.B + groups - 1) / groups;
    return {group, (s.B + group - 1) / group, 1, long_block_n, 1};
  }
  const int64_t splits = std::clamp<int64_t>((wanted + tiles * s.B - 1) / (tiles * s.B), 1, n_blocks);
  return {1, s.B, splits, splits > 1 ? kBlockN : long_block_n, 1};
}

// The forward, in T arithmetic, reading k and v rows of element type E: T, or bfloat16 / float16 rows under float32
// arithmetic (lane tiles and key-by-key tiles only, so AVX-512 builds only: rel_memory_attention_fwd_cpu).
template <typename T, typename E>
void forward_impl(const RelAttnShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& r, const at::Tensor& u, const at::Tensor& vb, const int64_t* kv_head,
                  T scale, at::Tensor& out, at::Tensor& lse) {
  const Strided4<T> Q(q);
  const Strided4<E> Kt(k), V(v);
  const T* r_data = r.data_ptr<T>();
  const T* u_data = u.data_ptr<T>();
  const T* vb_data = vb.data_ptr<T>();
  T* out_data = out.data_ptr<T>();
  double* lse_data = lse.data_ptr<double>();
  const int64_t n_qblocks = (s.L + kBlockM - 1) / kBlockM;
  // query rows of a task: bm <= min(kBlockM, L) per batch of the group (sized to L, so that a decoding step does not
  // allocate and clear tiles of kBlockM rows)
  const int64_t tile_rows = std::min(kBlockM, s.L);
  const bool fused = tile_rows <= kFusedRows;
  // lane tiles: float32 under AVX-512 only (lane_rows_block); otherwise BLAS tiles
#if defined(CPU_CAPABILITY_AVX512)
  const bool lanes = std::is_same_v<T, float> && !fused;
#else
  const bool lanes = false;
#endif
  const TimeMajorTiles time_major =
      !(keys_outermost(Kt, s) && keys_outermost(V, s)) ? TimeMajorTiles::none
      : fused                                           ? TimeMajorTiles::staged_heads
      : lanes && n_qblocks == 1                         ? TimeMajorTiles::interleaved_heads
                                                        : TimeMajorTiles::none;
  const ForwardPlan plan = forward_plan(s, n_qblocks, time_major, sizeof(E));
  // no key block is longer than K: the tiles are sized to it
  const int64_t block_n = std::min(plan.block_n, std::max<int64_t>(s.K, 1));
  const auto blocks = key_blocks(s, block_n);
  const int64_t n_blocks = static_cast<int64_t>(blocks.size());
  const int64_t splits = plan.splits;
  // split-K partials, per (batch, head, query block, range): kBlockM rows of D (out) and of 1 (max, sum)
  const int64_t n_parts = splits > 1 ? s.B * s.H * n_qblocks * splits : 0;
  std::vector<T> part_out(n_parts * kBlockM * s.D), part_m(n_parts * kBlockM), part_l(n_parts * kBlockM);
  auto part_row = [&](int64_t b, int64_t h, int64_t qb, int64_t split) {
    return (((b * s.H + h) * n_qblocks + qb) * splits + split) * kBlockM;
  };

  const int64_t head_tasks = s.H / plan.heads;
  at::parallel_for(0, head_tasks * n_qblocks * plan.groups * splits, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = plan.group * tile_rows;  // of one head
#if defined(CPU_CAPABILITY_AVX512)
    const int64_t lane_registers = (tile_rows + 15) / 16;  // the fewest that hold the tile's rows
    std::vector<LaneRow> lane_scratch(lanes ? lane_scratch_rows(s.D, lane_registers, !std::is_same_v<E, T>) : 0);
    float* lane_buffer = lane_scratch.empty() ? nullptr : lane_scratch.front().v;
#endif
    std::vector<T> qu(plan.heads * rows * s.D), qv(plan.heads * rows * s.D);
    std::vector<T> score(fused || lanes ? 0 : tile_rows * block_n), pos(fused ? 0 : rows * band_columns(block_n));
    std::vector<T> m_own(plan.heads * rows), l_own(plan.heads * rows);
    std::vector<OnlineSoftmax<T>> acc(plan.heads * plan.group);  // per head of the task, per batch of the group
    for (int64_t task = begin; task < end; ++task) {
      const int64_t split = task % splits, group = (task / splits) % plan.groups;
      const int64_t qb = (task / (splits * plan.groups)) % n_qblocks;
      const int64_t h0 = task / (splits * plan.groups * n_qblocks) * plan.heads;  // the task's first head
      const QueryTile<T> tile{s, qb * kBlockM, std::min(kBlockM, s.L - qb * kBlockM), kv_head[h0], block_n};
      const int64_t bm = tile.bm, b0 = group * plan.group, nb = std::min(plan.group, s.B - b0);
      for (int64_t hh = 0; hh < plan.heads; ++hh) {
        const int64_t h = h0 + hh;
        for (int64_t gb = 0; gb < nb; ++gb) {
          const int64_t b = b0 + gb;
          OnlineSoftmax<T>& a = acc[hh * plan.group + gb];
          a = splits > 1 ? OnlineSoftmax<T>{part_out.data() + part_row(b, h, qb, split) * s.D,
                                            part_m.data() + part_row(b, h, qb, split),
                                            part_l.data() + part_row(b, h, qb, split)}
                         : OnlineSoftmax<T>{out_data + ((b * s.H + h) * s.L + tile.i0) * s.D,  // in place
                                            m_own.data() + hh * rows + gb * tile_rows,
                                            l_own.data() + hh * rows + gb * tile_rows};
          std::fill(a.out, a.out + bm * s.D, T(0));
          std::fill(a.m, a.m + bm, -std::numeric_limits<T>::infinity());
          std::fill(a.l, a.l + bm, T(0));
          // the group's biased queries, bm rows per batch, back to back (one position GEMM for all of them)
          biased_queries(Q.row(b, h, tile.i0), Q.s2, u_data + h * s.D, vb_data + h * s.D, scale, bm, s.D,
                         qu.data() + (hh * rows + gb * bm) * s.D, qv.data() + (hh * rows + gb * bm) * s.D);
        }
      }
      const T* r_head = r_data + tile.g * r.stride(0);

      for (int64_t index = split * n_blocks / splits; index < (split + 1) * n_blocks / splits; ++index) {
        if (!tile.sees(blocks[index])) continue;
        const KeyBlock kb = tile.clip(blocks[index]);
        if (time_major == TimeMajorTiles::staged_heads) {
          staged_heads_block(tile, kb, kv_head + h0, plan.heads, qu.data(), qv.data(), rows, b0, nb, Kt, V, r_data,
                             r.stride(0), r.stride(1), acc.data(), plan.group);
          continue;
        }
        if (fused) {
          fused_key_block(tile, kb, qu.data(), qv.data(), b0, nb, Kt, V, r_head, r.stride(1), acc.data());
          continue;
        }
        const int64_t n = kb.j1 - kb.j0;
        const Band band = tile.band(kb);
        for (int64_t hh = 0; hh < plan.heads; ++hh) {  // the heads of a task in turn over the block
          const QueryTile<T> head = tile.with_kv_head(kv_head[h0 + hh]);
          const T* head_qu = qu.data() + hh * rows * s.D;
          const PositionScores<T> group_pos = head.position(band, qv.data() + hh * rows * s.D, nb * bm,
                                                            r_data + head.g * r.stride(0), r.stride(1), pos.data());
          for (int64_t gb = 0; gb < nb; ++gb) {
            const int64_t b = b0 + gb;
            const OnlineSoftmax<T>& a = acc[hh * plan.group + gb];
#if defined(CPU_CAPABILITY_AVX512)
            if constexpr (std::is_same_v<T, float>) {
              if (lanes) {
                lane_rows_block_for(lane_registers, head, kb, band, head_qu + gb * bm * s.D,
                                    group_pos.rows_from(gb * bm), Kt.row(b, head.g, kb.j0), Kt.s2,
                                    V.row(b, head.g, kb.j0), V.s2, a, lane_buffer);
                continue;
              }
            }
#endif
            if constexpr (std::is_same_v<E, T>) {  // BLAS tiles: rows of T (narrower ones take the lane tiles)
              head.content_scores(kb, head_qu + gb * bm * s.D, Kt.row(b, head.g, kb.j0), Kt.s2, score.data());
              const PositionScores<T> batch_pos = group_pos.rows_from(gb * bm);
              for (int64_t ii = 0; ii < bm; ++ii) {
                T* row = score.data() + ii * block_n;
                int64_t lo, hi;
                head.visible_range(kb, ii, lo, hi);
                if (lo > hi) {
                  std::fill(row, row + n, T(0));
                  continue;
                }
                head.add_position(kb, band, batch_pos, ii, lo, hi, row);
                a.absorb(ii, row + lo, hi - lo + 1, s.D);
                zero_outside(row, lo, hi, n);
              }
              gemm<T>(false, false, bm, s.D, n, T(1), score.data(), block_n, V.row(b, head.g, kb.j0), V.s2, T(1),
                      a.out, s.D);
            }
          }
        }
      }
      if (splits > 1) continue;
      for (int64_t hh = 0; hh < plan.heads; ++hh) {
        for (int64_t gb = 0; gb < nb; ++gb) {
          const OnlineSoftmax<T>& a = acc[hh * plan.group + gb];
          double* lse_rows = lse_data + ((b0 + gb) * s.H + h0 + hh) * s.L + tile.i0;
          for (int64_t ii = 0; ii < bm; ++ii) {
            scale_inplace(a.out + ii * s.D, T(1) / a.l[ii], s.D);
            lse_rows[ii] = static_cast<double>(a.m[ii]) + std::log(static_cast<double>(a.l[ii]));
          }
        }
      }
    }
  });
  if (splits == 1) return;

  // Merge the ranges of every tile by their log-sum-exp (a range that saw no visible key has m = -inf, l = 0).
  at::parallel_for(0, s.B * s.H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile_index = begin; tile_index < end; ++tile_index) {
      const int64_t b = tile_index / (s.H * n_qblocks), h = (tile_index / n_qblocks) % s.H, qb = tile_index % n_qblocks;
      const int64_t i0 = qb * kBlockM, bm = std::min(kBlockM, s.L - i0);
      T* o = out_data + ((b * s.H + h) * s.L + i0) * s.D;
      double* lse_rows = lse_data + (b * s.H + h) * s.L + i0;
      for (int64_t ii = 0; ii < bm; ++ii) {
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, part_m[part_row(b, h, qb, sp) + ii]);
        T l = 0;
        std::fill(o + ii * s.D, o + (ii + 1) * s.D, T(0));
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t row = part_row(b, h, qb, sp) + ii;
          if (part_l[row] == T(0)) continue;
          const T w = std::exp(part_m[row] - m);
          l += part_l[row] * w;
          const T* po = part_out.data() + row * s.D;
          for (int64_t d = 0; d < s.D; ++d) o[ii * s.D + d] += w * po[d];
        }
        scale_inplace(o + ii * s.D, T(1) / l, s.D);
        lse_rows[ii] = static_cast<double>(m) + std::log(static_cast<double>(l));
      }
    }
  });
}

template <typename T>
void backward_impl(const RelAttnShape& s, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& r, const at::Tensor& u, const at::Tensor& vb,
                   const at::Tensor& out, const at::Tensor& lse, const int64_t* kv_head, T scale, at::Tensor& dq,
                   at::Tensor& dk, at::Tensor& dv, at::Tensor& dr_partial, at::Tensor& du_partial,
                   at::Tensor& dvb_partial) {
  const Strided4<T> Q(q), Kt(k), V(v);
  const T* r_data = r.data_ptr<T>();
  const T* u_data = u.data_ptr<T>();
  const T* vb_data = vb.data_ptr<T>();
  const T* dout_data = grad_out.data_ptr<T>();
  const T* out_data = out.data_ptr<T>();
  const double* lse_data = lse.data_ptr<double>();
  T* dq_data = dq.data_ptr<T>();
  T* dk_data = dk.data_ptr<T>();
  T* dv_data = dv.data_ptr<T>();
  const auto blocks = key_blocks(s, kBlockN);
  const int64_t n_qblocks = (s.L + kBlockM - 1) / kBlockM;
  const int64_t n_chunks = dr_partial.size(0);

  std::vector<std::vector<int64_t>> heads_of(s.Hk);  // query heads reading each kv head
  for (int64_t h = 0; h < s.H; ++h) heads_of[kv_head[h]].push_back(h);

  // One task per (kv head, batch chunk) owns dk, dv of its rows, dq of its query heads, and its partials.
  at::parallel_for(0, s.Hk * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qu(kBlockM * s.D), qv(kBlockM * s.D);
    std::vector<T> dq_content(kBlockM * s.D), dq_position(kBlockM * s.D), delta(kBlockM);
    std::vector<T> score(kBlockM * kBlockN), dprob(kBlockM * kBlockN), band_rows(kBlockM * band_columns(kBlockN));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / n_chunks, chunk = task % n_chunks;
      T* dr_g = dr_partial.data_ptr<T>() + (chunk * s.Hk + g) * s.R * s.D;
      const T* r_head = r_data + g * r.stride(0);
      for (int64_t b = chunk * s.B / n_chunks; b < (chunk + 1) * s.B / n_chunks; ++b) {
        T* dk_rows = dk_data + (b * s.Hk + g) * s.K * s.D;
        T* dv_rows = dv_data + (b * s.Hk + g) * s.K * s.D;
        for (int64_t h : heads_of[g]) {
          T* du_h = du_partial.data_ptr<T>() + (chunk * s.H + h) * s.D;
          T* dvb_h = dvb_partial.data_ptr<T>() + (chunk * s.H + h) * s.D;
          for (int64_t qb = 0; qb < n_qblocks; ++qb) {
            const QueryTile<T> tile{s, qb * kBlockM, std::min(kBlockM, s.L - qb * kBlockM), g, kBlockN};
            const int64_t bm = tile.bm, row0 = (b * s.H + h) * s.L + tile.i0;
            const T* dout = dout_data + row0 * s.D;
            const double* lse_rows = lse_data + row0;
            biased_queries(Q.row(b, h, tile.i0), Q.s2, u_data + h * s.D, vb_data + h * s.D, scale, bm, s.D,
                           qu.data(), qv.data());
            for (int64_t ii = 0; ii < bm; ++ii) delta[ii] = dot(dout + ii * s.D, out_data + (row0 + ii) * s.D, s.D);
            std::fill(dq_content.begin(), dq_content.end(), T(0));
            std::fill(dq_position.begin(), dq_position.end(), T(0));

            for (const KeyBlock& block : blocks) {
              if (!tile.sees(block)) continue;
              const KeyBlock kb = tile.clip(block);
              const int64_t n = kb.j1 - kb.j0;
              const T* k_rows = Kt.row(b, g, kb.j0);
              const Band band = tile.band(kb);
              // band_rows holds the position term here, then the folded dS below
              const PositionScores<T> pos = tile.position(band, qv.data(), bm, r_head, r.stride(1), band_rows.data());
              tile.content_scores(kb, qu.data(), k_rows, Kt.s2, score.data());
              // score <- probabilities (zero where masked)
              int64_t lo[kBlockM], hi[kBlockM];
              for (int64_t ii = 0; ii < bm; ++ii) {
                T* row = score.data() + ii * kBlockN;
                tile.visible_range(kb, ii, lo[ii], hi[ii]);
                if (lo[ii] <= hi[ii]) {
                  tile.add_position(kb, band, pos, ii, lo[ii], hi[ii], row);
                  const T lse_high = static_cast<T>(lse_rows[ii]);
                  exp_sub_pair(row + lo[ii], lse_high, static_cast<T>(lse_rows[ii] - lse_high), hi[ii] - lo[ii] + 1);
                }
                zero_outside(row, lo[ii], hi[ii], n);
              }
              // dv += P^T dO;  dP = dO v^T;  score <- dS = P * (dP - delta)
              gemm<T>(true, false, n, s.D, bm, T(1), score.data(), kBlockN, dout, s.D, T(1), dv_rows + kb.j0 * s.D, s.D);
              gemm<T>(false, true, bm, n, s.D, T(1), dout, s.D, V.row(b, g, kb.j0), V.s2, T(0), dprob.data(), kBlockN);
              for (int64_t ii = 0; ii < bm; ++ii) {
                if (lo[ii] <= hi[ii])
                  softmax_grad_inplace(score.data() + ii * kBlockN + lo[ii], dprob.data() + ii * kBlockN + lo[ii],
                                       delta[ii], hi[ii] - lo[ii] + 1);
              }
              // content term: dq_c += dS k;  dk += dS^T (q+u)'
              gemm<T>(false, false, bm, s.D, n, T(1), score.data(), kBlockN, k_rows, Kt.s2, T(1), dq_content.data(), s.D);
              gemm<T>(true, false, n, s.D, bm, T(1), score.data(), kBlockN, qu.data(), s.D, T(1), dk_rows + kb.j0 * s.D, s.D);
              // position term through the band, r and dr rows in place: dq_p += band r_rows;  dr_rows += band^T (q+vb)'
              tile.fold_band(kb, band, score.data(), lo, hi, band_rows.data());
              const int64_t rs = r.stride(1);
              gemm<T>(false, false, bm, s.D, band.cols, T(1), band_rows.data(), tile.band_stride(),
                      r_head + band.d0 * rs, rs, T(1), dq_position.data(), s.D);
              gemm<T>(true, false, band.cols, s.D, bm, T(1), band_rows.data(), tile.band_stride(), qv.data(), s.D, T(1),
                      dr_g + band.d0 * s.D, s.D);
            }
            // dq = scale (dq_c + dq_p); du += scale colsum(dq_c); dvb += scale colsum(dq_p)
            T* dq_rows = dq_data + row0 * s.D;
            for (int64_t ii = 0; ii < bm; ++ii) {
              const T* c = dq_content.data() + ii * s.D;
              const T* p = dq_position.data() + ii * s.D;
              add(dq_rows + ii * s.D, c, p, s.D);
              scale_inplace(dq_rows + ii * s.D, scale, s.D);
              add_into(du_h, c, s.D);
              add_into(dvb_h, p, s.D);
            }
          }
        }
      }
    }
  });
  du_partial.mul_(scale);
  dvb_partial.mul_(scale);
}

// k, v and r rows go to BLAS with leading dimension stride(-2), which must be >= D and fit an int. Any other
// layout (rows expanded with stride 0, overlapping as_strided views, huge strides) is copied first;
// rows padded past D and views of time-major buffers are read in place.
at::Tensor blas_rows(const at::Tensor& t) {
  const int64_t ld = t.stride(-2);
  if (ld >= t.size(-1) && ld <= std::numeric_limits<int>::max()) return t;
  return at::empty(t.sizes(), t.options()).copy_(t);
}

void check_cpu(const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), "rel_memory_attention_fwd_cpu: expected CPU tensors");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "rel_memory_attention (cpu backend): supports float32 and float64, got ", q.scalar_type());
}

}  // namespace
}  // namespace cpu

// float32_out asks 16-bit inputs for a float32 out (the one the backward reads). The CPU kernels take 16-bit q as
// float32 (memtx_ops converts it: Backend.compute_dtypes), so out, in q's float32 or float64, always is one.
std::tuple<at::Tensor, at::Tensor> rel_memory_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r, const at::Tensor& u,
    const at::Tensor& vb, const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset, double scale,
    bool /*float32_out*/) {
  const RelAttnShape s =
      check_rel_attn_inputs(q, k, v, r, u, vb, kv_head_index, window, mem_offset, /*narrow_keys=*/true);
  cpu::check_cpu(q);
  auto out = at::empty({s.B, s.H, s.L, s.D}, q.options());
  auto lse = at::empty({s.B, s.H, s.L}, q.options().dtype(at::kDouble));  // float64 in every dtype: header
  const auto kv_head = kv_head_index.contiguous();
  const auto uc = u.contiguous(), vbc = vb.contiguous();
  const auto rc = cpu::blas_rows(r);
  auto kc = cpu::blas_rows(k), vc = cpu::blas_rows(v);
  if (k.scalar_type() != q.scalar_type()) {  // float16 / bfloat16 rows under float32 arithmetic
#if defined(CPU_CAPABILITY_AVX512)
    AT_DISPATCH_REDUCED_FLOATING_TYPES(k.scalar_type(), "rel_memory_attention_fwd_cpu", [&] {
      cpu::forward_impl<float, scalar_t>(s, q, kc, vc, rc, uc, vbc, kv_head.data_ptr<int64_t>(),
                                         static_cast<float>(scale), out, lse);
    });
    return {out, lse};
#else
    kc = kc.to(at::kFloat), vc = vc.to(at::kFloat);  // the BLAS tiles read float32 rows
#endif
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rel_memory_attention_fwd_cpu", [&] {
    cpu::forward_impl<scalar_t, scalar_t>(s, q, kc, vc, rc, uc, vbc, kv_head.data_ptr<int64_t>(),
                                          static_cast<scalar_t>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rel_memory_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r,
    const at::Tensor& u, const at::Tensor& vb, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& kv_head_index, int64_t window, int64_t mem_offset, double scale) {
  const RelAttnShape s = check_rel_attn_inputs(q, k, v, r, u, vb, kv_head_index, window, mem_offset);
  cpu::check_cpu(q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && lse.numel() == s.B * s.H * s.L,
              "rel_memory_attention_bwd_cpu: grad_out/out/lse do not match q");
  const auto dout = grad_out.contiguous(), outc = out.contiguous(), lsec = lse.contiguous().to(at::kDouble);
  const auto kv_head = kv_head_index.contiguous();
  const auto uc = u.contiguous(), vbc = vb.contiguous();
  const auto kc = cpu::blas_rows(k), vc = cpu::blas_rows(v), rc = cpu::blas_rows(r);
  // Enough (kv head, batch chunk) tasks for every thread; each chunk keeps its own dr, du, dvb partials.
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks = std::clamp<int64_t>((2 * threads + s.Hk - 1) / s.Hk, 1, s.B);
  auto dq = at::empty({s.B, s.H, s.L, s.D}, q.options());
  auto dk = at::zeros({s.B, s.Hk, s.K, s.D}, q.options());
  auto dv = at::zeros({s.B, s.Hk, s.K, s.D}, q.options());
  auto dr_partial = at::zeros({n_chunks, s.Hk, s.R, s.D}, q.options());
  auto du_partial = at::zeros({n_chunks, s.H, s.D}, q.options());
  auto dvb_partial = at::zeros({n_chunks, s.H, s.D}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "rel_memory_attention_bwd_cpu", [&] {
    cpu::backward_impl<scalar_t>(s, dout, q, kc, vc, rc, uc, vbc, outc, lsec, kv_head.data_ptr<int64_t>(),
                                 static_cast<scalar_t>(scale), dq, dk, dv, dr_partial, du_partial, dvb_partial);
  });
  return {dq, dk, dv, dr_partial.sum(0), du_partial.sum(0), dvb_partial.sum(0)};
}

}  // namespace memtx
