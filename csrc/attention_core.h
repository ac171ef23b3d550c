// The machinery that sink_attention (attention.cpp) and dual_path_attention
// (dual_attention.cpp) share: the work items, key-block loading and conversion, the
// register-blocked Q K^T and P V kernels, the band / padding mask, the running softmax, the
// decode (narrow) mode and key splitting with the merge. An operation supplies an "op": how
// many running-softmax states each row keeps, which state each key of a block feeds, the
// extra per-block statistics, and how the final states become its outputs.
//
// Per batch b, query head h (kv head h / (Hq / Hkv), never expanded) and query i at
// position p = Lk - Lq + i:
//   visible(j) = real_j and lo_p <= j <= hi_p and (no window or in_window or j < sink_end_p)
//     in_window: causal j > p - window, bidirectional |p - j| < window
//     sink_end_p = sink_end[b], or sink_end[b, p] with row ends (segments: the sinks of p's
//       own segment), clamped to [0, Lk]; stat_end_p likewise: keys j < stat_end_p are the stat
//       keys (the op's sink_mass)
//     lo_p = start[b, p] clamped to [0, p] with a start, else 0: the first key of p's segment
//       (packed sequences, chunked attention); it bounds sink keys too
//     hi_p = horizon[b, p] clamped to [p, Lk - 1] with a horizon, else p when causal and Lk - 1
//       when not: the end of p's bidirectional block (Gemma 3's image tokens, PaliGemma's
//       prefix) or of its segment
//   s_j = scale q_i . k_j on visible keys (-inf elsewhere)
//
// Online softmax per row and state over blocks of keys, with the running max m,
// l = sum_j e_j, e_j = exp(s_j - m), and A = sum_j e_j (s_j - m) (for the entropy). A state may
// start from a value-less logit c (m = c, l = 1, A = 0). A block with max s_max folds in as
//   m' = max(m, s_max), alpha = exp(m - m')
//   l' = alpha l + sum_new e_j            A' = alpha (A + (m - m') l) + sum_new e_j (s_j - m')
//   O' = alpha O + sum_new e_j v_j         (other sums rescale like l)
// l is kept in two floats, l + l_lo, each block's sum added with its rounding error kept
// (add_compensated, per row and block): with a dominant key (a sink, e = 1) and the others
// 22+ below it, a block's sum is under half an ulp of l ~ 1 and a single float drops it
// whole. Only the dominant key's own block still sums its small terms into it.
// Each key of a block feeds exactly one state: a block is cut into at most two segments of
// keys (reordered when its keys alternate), and only the segment's state is rescaled and
// updated, so the P V work is that of one attention whatever the number of states.
//
// Work: one item is (b, kv head, block of queries), with the query heads that share the kv
// head stacked as rows, so each key/value block is read (and converted to float32) once for
// all of them. Rows are the vector lanes: the scores of a key block are kept transposed,
// sT[key][row], so Q K^T is an outer-product update (a key element times a vector of query
// rows), the softmax is elementwise across rows, and P V updates the transposed output
// oT[d][row] by a value element times a vector of probabilities. K and V are read in place
// (float32) or converted block by block, never transposed. Items run over OpenMP, heaviest
// (latest causal query blocks) first; a call of little work runs on the calling thread alone
// (kInlineWork). An item visits only the key blocks that hold some row's
// [lo_p, hi_p] (packed sequences cost only the block diagonal); when there are fewer than two
// items per thread, these blocks are split into ranges whose partial states are merged by
// their max.
//
// An item of at most kNarrowRows rows (decoding: one query per head) would leave most lanes
// idle, so it puts the lanes along head_dim instead: scores are dot products of q and k rows,
// the softmax runs along the keys of one row at a time, and the output is updated row by row
// (O += e_j v_j), then stored transposed like the others.
//
// bfloat16 at 16 lanes on a CPU with AVX512-BF16 (call_pair_scores) scores by VDPBF16PS
// instead: the item's query rows are packed once as bf16 pairs along the head dim,
// q_pairs[i][r] = (q[r][2i], q[r][2i + 1]) in one 32-bit word, and a wide item's tile step is
// acc[r] += q[r][2i] k[j][2i] + q[r][2i + 1] k[j][2i + 1], the key's pair broadcast from K's own
// bf16 rows (K is not converted; D / 2 steps instead of D); a narrow item's lanes hold 16 pairs
// of a row, q's times the key's read straight from K, summed over the lanes at the end. The dot is not scaled (q stays the
// exact input; the scale multiplies the sums), and the instruction flushes subnormal inputs,
// products and sums to 0, so an item with a subnormal q or a large |q| scale (where a flushed
// key could matter) scores the float32 way, and so does a block with a score that is not
// finite (q . k overflowing where scale q . k does not, or inf / NaN inputs). P V is unchanged.
//
// Everything here has internal linkage (an unnamed namespace, like common.h's static
// functions): each operation's file compiles its own multi-versioned copies.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fastprobe {

// The widest lane width the CPU attention may use (call_lanes): 16 (the default) or 8, set by
// fastprobe._C.set_attention_lanes for tests and comparisons; one for the process.
inline std::atomic<int> attention_lane_limit{16};
// Whether bfloat16 calls at 16 lanes may score by AVX512-BF16 pairs (call_pair_scores), set by
// fastprobe._C.set_attention_bf16_pairs for tests and comparisons; one for the process.
inline std::atomic<bool> attention_pairs_allowed{true};

namespace {

// Lambdas in the kernels: inlined into the multi-versioned caller, so compiled for its target
// (a lambda's own body would be compiled for the default target).
#define FASTPROBE_LAMBDA_INLINE __attribute__((always_inline))

// Keys per block: the scores of a block are kKeyBlock x rows floats (16 KiB for 64 rows).
constexpr int64_t kKeyBlock = 64;
// Query rows an item aims for (all its heads together): enough to amortise each key/value
// block over many rows, small enough that the block's scores and output stay in L1/L2.
constexpr int64_t kItemRows = 64;

// A vector of L query rows (GCC vector extension), L the lane width of a call (call_lanes):
// 16, one AVX-512 register, where the CPU runs the x86-64-v4 code; else 8, one AVX2 register or
// two SSE registers. The kernels below are templates on L; each call runs one width throughout
// (its rows R and padded head dims are multiples of it).
template <int L>
struct LaneTypes {
  typedef float Vector __attribute__((vector_size(L * sizeof(float))));
  // loads and stores of float buffers go through this one: any alignment, may alias float
  typedef float Unaligned __attribute__((vector_size(L * sizeof(float)), aligned(4), may_alias));
  typedef int32_t Index __attribute__((vector_size(L * sizeof(int32_t))));
};
template <int L>
using Lanes = typename LaneTypes<L>::Vector;

// (macros: a function returning a vector by value draws GCC's -Wpsabi note in the default target)
#define LOAD_LANES(L, ptr) (*reinterpret_cast<const typename LaneTypes<L>::Unaligned*>(ptr))
#define STORE_LANES(L, ptr, x) (*reinterpret_cast<typename LaneTypes<L>::Unaligned*>(ptr) = (x))

// The register tiles of the block kernels at lane width L: kTileVectors<L> row vectors by
// kTileWidth<L> keys (scores) or value dimensions (output), their product in accumulators plus
// the tile's row vectors in registers. 8 lanes: 2 x 6, 12 + 2 of AVX2's 16 registers. 16 lanes:
// 4 x 4, 16 + 4 of AVX-512's 32: an item's 64 rows in one tile, a key block's 64 keys in whole
// tiles. Against 2 x 6 at 16 lanes (2026-12-06, 2 Zen 4 cores, bench/paired_cpu.py, L = 2048
// causal, four runs): float32 prefill 1.01x-1.09x at D = 128, 1.01x-1.06x at D = 64, the dual
// path 1.00x-1.08x, bfloat16 0.98x-1.04x; 4 x 6, 3 x 8 and 2 x 8 gained less.
template <int L>
constexpr int kTileVectors = L == 16 ? 4 : 2;  // row vectors per register tile
template <int L>
constexpr int kTileWidth = L == 16 ? 4 : 6;  // keys (scores) or value dimensions (output) per tile

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// ---- Register tiles (inlined into the multi-versioned block kernels below). ---------------

template <int K>
using Width = std::integral_constant<int, K>;

// f(Width<K>()) for the K in [1, Max] that equals n (n < 1 or n > Max: none), so that a
// run-time count picks a compile-time tile size.
template <int Max, typename F>
FASTPROBE_ALWAYS_INLINE void with_width(int64_t n, F&& f) {
  if constexpr (Max > 0) {
    if (n == Max)
      f(Width<Max>());
    else
      with_width<Max - 1>(n, f);
  }
}

// tile(Width<W>(), i) for i = 0, W, 2W, ... while a whole tile fits in n, then one narrower
// tile for the rest.
template <int W, typename Tile>
FASTPROBE_ALWAYS_INLINE void for_tiles(int64_t n, Tile&& tile) {
  int64_t i = 0;
  for (; i + W <= n; i += W) tile(Width<W>(), i);
  with_width<W - 1>(n - i, [&](auto width) FASTPROBE_LAMBDA_INLINE { tile(width, i); });
}

// The register tile of the block kernels (all but the narrow scores): for NA scalars by NB
// vectors of L floats,
//   out[a][b] = init(a, b) + sum_{i < n} x[i x_step + a x_stride] y[i y_step + b L]
// with out[a][b] at out + a ld_out + b L and the NA x NB accumulators in registers;
// init(a, b, base) gives the term the block's sum is added to (nullptr: 0). The sum starts
// from 0, not from init: a running output (alpha o) then takes one block sum per block, as the
// softmax denominator l does, and does not stop growing once it is 2^24 times one key's term
// (2^26 near-uniform keys gave half the output). AHEAD > 0: the y of iteration i + AHEAD is
// prefetched (a cache hint, within the n rows) while iteration i computes.
template <int L, int NA, int NB, typename Init, int AHEAD = 0>
FASTPROBE_ALWAYS_INLINE void outer_tile(const float* x, int64_t x_step, int64_t x_stride,
                                        const float* y, int64_t y_step, int64_t n, float* out,
                                        int64_t ld_out, Init init) {
  Lanes<L> acc[NA][NB];
#pragma GCC unroll 8
  for (int a = 0; a < NA; ++a)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[a][b] = Lanes<L>{};
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (AHEAD > 0)
      if (i + AHEAD < n)
#pragma GCC unroll 8
        for (int b = 0; b < NB; b += 64 / int(sizeof(Lanes<L>)))  // one hint per 64-byte line
          __builtin_prefetch(y + (i + AHEAD) * y_step + b * L);
    Lanes<L> y_i[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) y_i[b] = LOAD_LANES(L, y + i * y_step + b * L);
#pragma GCC unroll 8
    for (int a = 0; a < NA; ++a) {
      const float x_i = x[i * x_step + a * x_stride];
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) acc[a][b] += x_i * y_i[b];
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < NA; ++a)
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) {
      if constexpr (!std::is_same_v<Init, std::nullptr_t>) {
        Lanes<L> base;
        init(a, b, base);
        acc[a][b] += base;
      }
      STORE_LANES(L, out + a * ld_out + b * L, acc[a][b]);
    }
}

// ---- Narrow items (at most kNarrowRows rows, e.g. decoding one query per head): the lanes
// run along head_dim instead of rows, so no lane is idle. q, k and v rows are padded with
// zeros to Dp (a multiple of L) so that every load is a whole vector.

constexpr int64_t kNarrowRows = 4;

// Tiles of 8 accumulators for ROWS narrow rows: keys (scores) or vectors of d (values).
template <int ROWS>
constexpr int kNarrowTile = ROWS == 1 ? 8 : ROWS == 2 ? 4 : 2;

// The shuffle that swaps each run of H lanes with its neighbour run: lane i takes lane i ^ H.
template <int L, int H, typename I = std::make_integer_sequence<int, L>>
struct SwapRuns;
template <int L, int H, int... I>
struct SwapRuns<L, H, std::integer_sequence<int, I...>> {
  static constexpr typename LaneTypes<L>::Index index = {(I ^ H)...};
};

template <int L, int H = L / 2>
FASTPROBE_ALWAYS_INLINE float lane_sum(const Lanes<L>& x);

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
// The lane sum of x[i] + x[i + L / 2], a vector of L / 2: x's low half plus its high half.
template <int L, int... I>
FASTPROBE_ALWAYS_INLINE float halves_sum(const Lanes<L>& x, std::integer_sequence<int, I...>) {
  return lane_sum<L / 2>(__builtin_shufflevector(x, x, I...) +
                         __builtin_shufflevector(x, x, (I + L / 2)...));
}
#endif

// x[0] + ... + x[L - 1], by halving: x + x with its halves swapped, then runs of L / 4, ..., 1
// (GCC's generic shuffles; a plain sum elsewhere). Past 8 lanes (GCC 12's __builtin_shufflevector)
// the halves are added as vectors of L / 2 first: an AVX-512 register's sum then costs an
// extract and a 256-bit add before the AVX2 sum's three steps, none on 512 bits.
template <int L, int H>
FASTPROBE_ALWAYS_INLINE float lane_sum(const Lanes<L>& x) {
#if defined(__GNUC__) && !defined(__clang__)
  if constexpr (H == 0)
    return x[0];
#if __GNUC__ >= 12
  else if constexpr (H == L / 2 && L > 8)
    return halves_sum<L>(x, std::make_integer_sequence<int, L / 2>());
#endif
  else
    return lane_sum<L, H / 2>(x + __builtin_shuffle(x, SwapRuns<L, H>::index));
#else
  float total = 0.0f;
  for (int i = 0; i < L; ++i) total += x[i];
  return total;
#endif
}

// sT[c][r] = q_rows[r] . keys[c] for NC keys and ROWS rows (rows of Dp floats); with several
// rows, the first `next` (at most NC) of the NC key rows after them are prefetched meanwhile.
template <int L, int NC, int ROWS>
FASTPROBE_ALWAYS_INLINE void dot_tile(const float* q_rows, int64_t Dp, const float* keys, int64_t ldk,
                                      float* sT, int64_t R, int64_t next) {
  Lanes<L> acc[NC][ROWS];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) acc[c][r] = Lanes<L>{};
  for (int64_t d = 0; d < Dp; d += L) {
    if (ROWS > 1 && d % (64 / sizeof(float)) == 0)  // one hint per 64-byte line (one row: its 8
                                                    // keys a tile keep enough loads in flight)
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c)
        if (c < next) __builtin_prefetch(keys + (NC + c) * ldk + d);
    Lanes<L> q[ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) q[r] = LOAD_LANES(L, q_rows + r * Dp + d);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const Lanes<L> key = LOAD_LANES(L, keys + c * ldk + d);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) acc[c][r] += key * q[r];
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) sT[c * R + r] = lane_sum<L>(acc[c][r]);
}

// ---- Block kernels (one function per lane width). R, the row count, is a multiple of L. ---

// All count keys of one row tile (MV vectors of rows), kTileWidth keys per register tile.
template <int L, int MV>
FASTPROBE_ALWAYS_INLINE void score_row_tile(const float* qT, int64_t R, const float* keys,
                                            int64_t ldk, int64_t count, int64_t D, float* sT) {
  for_tiles<kTileWidth<L>>(count, [&](auto width, int64_t c) FASTPROBE_LAMBDA_INLINE {
    outer_tile<L, width, MV>(keys + c * ldk, 1, ldk, qT, R, D, sT + c * R, R, nullptr);
  });
}

// All Dv value dimensions of one row tile (MV vectors of rows), kTileWidth per register tile.
template <int L, int MV>
FASTPROBE_ALWAYS_INLINE void value_row_tile(const float* eT, int64_t R, int64_t count,
                                            const float* vals, int64_t ldv, int64_t Dv,
                                            const float* alpha, float* oT) {
  for_tiles<kTileWidth<L>>(Dv, [&](auto width, int64_t d) FASTPROBE_LAMBDA_INLINE {
    float* out = oT + d * R;
    outer_tile<L, width, MV>(vals + d, ldv, 1, eT, R, count, out, R,
                             [&](int a, int b, Lanes<L>& acc) FASTPROBE_LAMBDA_INLINE {
                               acc = LOAD_LANES(L, out + a * R + b * L) * LOAD_LANES(L, alpha + b * L);
                             });
  });
}

// Scores of one key block: sT [count][R] = keys [count][D] (row stride ldk) times qT [D][R]
// (the queries, already multiplied by the scale). The row tiles are a plain loop: nesting
// for_tiles here costs ~10% (GCC then runs out of registers for the tile's key offsets).
template <int L>
FASTPROBE_ALWAYS_INLINE void scores_tiles(const float* qT, int64_t R, int64_t D, const float* keys,
                                          int64_t ldk, int64_t count, float* sT) {
  const int64_t tile_rows = kTileVectors<L> * L;
  int64_t r = 0;
  for (; r + tile_rows <= R; r += tile_rows)
    score_row_tile<L, kTileVectors<L>>(qT + r, R, keys, ldk, count, D, sT + r);
  for (; r < R; r += L) score_row_tile<L, 1>(qT + r, R, keys, ldk, count, D, sT + r);
}

// Output update of one key block: oT [Dv][R] = alpha oT + vals^T eT, with eT [count][R] the
// block's e = exp(s - m') and vals [count][Dv] (row stride ldv).
template <int L>
FASTPROBE_ALWAYS_INLINE void values_tiles(const float* eT, int64_t R, int64_t count,
                                          const float* vals, int64_t ldv, int64_t Dv,
                                          const float* alpha, float* oT) {
  const int64_t tile_rows = kTileVectors<L> * L;
  int64_t r = 0;
  for (; r + tile_rows <= R; r += tile_rows)
    value_row_tile<L, kTileVectors<L>>(eT + r, R, count, vals, ldv, Dv, alpha + r, oT + r);
  for (; r < R; r += L) value_row_tile<L, 1>(eT + r, R, count, vals, ldv, Dv, alpha + r, oT + r);
}

// Narrow scores: sT [count][R] (rows < `rows` written) = keys [count][Dp] . q_rows [rows][Dp].
// Decoding reads each key and value row once, from memory. With several rows per item
// (grouped-query heads) a tile holds few keys or value vectors, too few loads in flight to
// hide DRAM latency: the narrow kernels then prefetch the rows a tile ahead (2026-12-01, 2
// cores, AVX-512, K and V of 8 layers in turn, min / median of 5 alternated runs: 32 query /
// 8 kv heads, D=128, 4096 keys 2.45 / 2.74 -> 2.20 / 2.34 ms). One row (MHA) gained nothing
// from the hints, or lost up to 17%, so it takes none.
template <int L>
FASTPROBE_ALWAYS_INLINE void dots_tiles(const float* q_rows, int64_t rows, int64_t Dp,
                                        const float* keys, int64_t ldk, int64_t count, float* sT,
                                        int64_t R) {
  with_width<kNarrowRows>(rows, [&](auto rows_c) FASTPROBE_LAMBDA_INLINE {
    for_tiles<kNarrowTile<rows_c>>(count, [&](auto width, int64_t c) FASTPROBE_LAMBDA_INLINE {
      const int64_t next = count - c - int64_t(width);  // keys after the tile's
      dot_tile<L, width, rows_c>(q_rows, Dp, keys + c * ldk, ldk, sT + c * R, R, next);
    });
  });
}

// Narrow output update: o_rows [rows][Dp] = alpha o_rows + eT^T vals, vals [count][Dp].
template <int L>
FASTPROBE_ALWAYS_INLINE void axpys_tiles(const float* eT, int64_t R, int64_t rows, int64_t count,
                                         const float* vals, int64_t ldv, const float* alpha,
                                         float* o_rows, int64_t Dp) {
  with_width<kNarrowRows>(rows, [&](auto rows_c) FASTPROBE_LAMBDA_INLINE {
    for_tiles<kNarrowTile<rows_c>>(Dp / L, [&](auto vectors, int64_t v) FASTPROBE_LAMBDA_INLINE {
      float* out = o_rows + v * L;
      auto scaled_out = [&](int a, int b, Lanes<L>& acc) FASTPROBE_LAMBDA_INLINE {
        acc = LOAD_LANES(L, out + a * Dp + b * L) * alpha[a];
      };
      // several rows (grouped-query decoding): tiles of a few vectors read part of each value
      // row, rows ldv apart, prefetched 8 rows ahead; one row's wide tiles need no hints
      if (rows_c > 1 && Dp / L > kNarrowTile<rows_c>)
        outer_tile<L, rows_c, vectors, decltype(scaled_out), 8>(eT, R, 1, vals + v * L, ldv,
                                                                count, out, Dp, scaled_out);
      else
        outer_tile<L, rows_c, vectors>(eT, R, 1, vals + v * L, ldv, count, out, Dp, scaled_out);
    });
  });
}

// The kernels above as functions of their own (GCC's register allocation is per function),
// name##_block(Width<L>(), args...) running name##_tiles<L>(args...): at 8 lanes multi-versioned
// (FASTPROBE_SIMD_CLONES), at 16 compiled for AVX-512 alone (FASTPROBE_AVX512: only called where
// the CPU has it, see call_lanes). (GCC 12's target_clones on a function template miscompiles:
// two instantiations' resolvers crashed a test program, hence the plain overloads.)
#define FASTPROBE_UNPAREN(...) __VA_ARGS__
#ifdef FASTPROBE_AVX512
#define FASTPROBE_LANE_KERNEL_16(name, params, args)                     \
  FASTPROBE_AVX512 static void name##_block(Width<16>, FASTPROBE_UNPAREN params) { \
    name##_tiles<16> args;                                               \
  }
#else
#define FASTPROBE_LANE_KERNEL_16(name, params, args)
#endif
#define FASTPROBE_LANE_KERNEL(name, params, args)                             \
  FASTPROBE_SIMD_CLONES static void name##_block(Width<8>, FASTPROBE_UNPAREN params) { \
    name##_tiles<8> args;                                                     \
  }                                                                           \
  FASTPROBE_LANE_KERNEL_16(name, params, args)

FASTPROBE_LANE_KERNEL(scores, (const float* qT, int64_t R, int64_t D, const float* keys, int64_t ldk,
                               int64_t count, float* sT),
                      (qT, R, D, keys, ldk, count, sT))
FASTPROBE_LANE_KERNEL(values, (const float* eT, int64_t R, int64_t count, const float* vals,
                               int64_t ldv, int64_t Dv, const float* alpha, float* oT),
                      (eT, R, count, vals, ldv, Dv, alpha, oT))
FASTPROBE_LANE_KERNEL(dots, (const float* q_rows, int64_t rows, int64_t Dp, const float* keys,
                             int64_t ldk, int64_t count, float* sT, int64_t R),
                      (q_rows, rows, Dp, keys, ldk, count, sT, R))
FASTPROBE_LANE_KERNEL(axpys, (const float* eT, int64_t R, int64_t rows, int64_t count,
                              const float* vals, int64_t ldv, const float* alpha, float* o_rows,
                              int64_t Dp),
                      (eT, R, rows, count, vals, ldv, alpha, o_rows, Dp))

// ---- bfloat16 scores by AVX512-BF16 pairs (see top), 16 lanes, wide items. ---------------

#ifdef FASTPROBE_AVX512_BF16
typedef uint32_t Bf16Pair __attribute__((aligned(2), may_alias));  // two bf16 of a key row

// One register tile: out[a][b] = factor sum_{i < pairs} q_pairs[i][b] . keys[a][2i, 2i + 1] for
// NA keys (rows ldk apart) by NB vectors of 16 rows, out[a][b] at out + a R + b 16; check
// gains s - s of every score s (NaN where one is inf or NaN, else 0).
template <int NA, int NB>
FASTPROBE_AVX512_BF16 FASTPROBE_ALWAYS_INLINE void pair_tile(const uint16_t* keys, int64_t ldk,
                                                             const uint32_t* q_pairs, int64_t R,
                                                             int64_t pairs, float factor,
                                                             float* out, __m512& check) {
  __m512 acc[NA][NB];
#pragma GCC unroll 4
  for (int a = 0; a < NA; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[a][b] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; ++i) {
    __m512bh q[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) q[b] = (__m512bh)_mm512_loadu_si512(q_pairs + i * R + b * 16);
#pragma GCC unroll 4
    for (int a = 0; a < NA; ++a) {
      // acc += q[2i] k[2i] + q[2i + 1] k[2i + 1], the key's pair in every lane
      const __m512bh k = (__m512bh)_mm512_set1_epi32(
          int(*reinterpret_cast<const Bf16Pair*>(keys + a * ldk + 2 * i)));
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], q[b], k);
    }
  }
  const __m512 scale = _mm512_set1_ps(factor);
#pragma GCC unroll 4
  for (int a = 0; a < NA; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      const __m512 s = _mm512_mul_ps(acc[a][b], scale);
      check = _mm512_add_ps(check, _mm512_sub_ps(s, s));
      _mm512_storeu_ps(out + a * R + b * 16, s);
    }
}

// All count keys of NB vectors of rows, tiles of 4 keys and one of the rest.
template <int NB>
FASTPROBE_AVX512_BF16 FASTPROBE_ALWAYS_INLINE void pair_row_tile(const uint32_t* q_pairs, int64_t R,
                                                                 int64_t pairs, const uint16_t* keys,
                                                                 int64_t ldk, int64_t count,
                                                                 float factor, float* sT,
                                                                 __m512& check) {
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) pair_tile<4, NB>(keys + c * ldk, ldk, q_pairs, R, pairs, factor, sT + c * R, check);
  const uint16_t* rest = keys + c * ldk;
  float* out = sT + c * R;
  switch (count - c) {
    case 3: pair_tile<3, NB>(rest, ldk, q_pairs, R, pairs, factor, out, check); break;
    case 2: pair_tile<2, NB>(rest, ldk, q_pairs, R, pairs, factor, out, check); break;
    case 1: pair_tile<1, NB>(rest, ldk, q_pairs, R, pairs, factor, out, check); break;
    default: break;
  }
}

// Scores of one key block: sT [count][R] = factor (q . k), q_pairs [pairs][R], keys [count] rows
// of 2 pairs bf16 (row stride ldk); false if some score is not finite (the caller then scores
// the block the float32 way). Row tiles of 64 rows, then of 16.
FASTPROBE_AVX512_BF16 static bool pair_scores_block(const uint32_t* q_pairs, int64_t R,
                                                    int64_t pairs, const uint16_t* keys,
                                                    int64_t ldk, int64_t count, float factor,
                                                    float* sT) {
  __m512 check = _mm512_setzero_ps();
  int64_t r = 0;
  for (; r + 64 <= R; r += 64) pair_row_tile<4>(q_pairs + r, R, pairs, keys, ldk, count, factor, sT + r, check);
  for (; r < R; r += 16) pair_row_tile<1>(q_pairs + r, R, pairs, keys, ldk, count, factor, sT + r, check);
  return _mm512_cmp_ps_mask(check, check, _CMP_ORD_Q) == 0xffff;  // no lane NaN
}

// Narrow items by pairs: the lanes along the head dim as in dot_tile, a vector holding 16 pairs
// (32 bf16) of a row; q_pairs [rows][padded_pairs] (0 past D), each key row read straight from
// K, its last vector's elements past D masked off (0, and never read).

// Key c's row of a block: c, or order[c] when reordered (as block_rows).
FASTPROBE_ALWAYS_INLINE const uint16_t* key_row(const uint16_t* keys, int64_t ldk,
                                                const int64_t* order, int64_t c) {
  return keys + (order == nullptr ? c : order[c]) * ldk;
}

// sT[c][r] = factor (q_pairs[r] . key c) for NC keys from `first` and ROWS rows; with several
// rows, the first `next` (at most NC) key rows after them are prefetched meanwhile (dot_tile's).
static_assert(kNarrowRows == 4, "narrow_pair_scores_block dispatches rows 1 to 4");
template <int NC, int ROWS>
FASTPROBE_AVX512_BF16 FASTPROBE_ALWAYS_INLINE void narrow_pair_tile(
    const uint32_t* q_pairs, int64_t padded_pairs, const uint16_t* keys, int64_t ldk,
    const int64_t* order, int64_t first, int64_t D, float factor, float* sT, int64_t R,
    int64_t next, float& check) {
  const uint16_t* rows[NC];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c) rows[c] = key_row(keys, ldk, order, first + c);
  __m512 acc[NC][ROWS];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) acc[c][r] = _mm512_setzero_ps();
  for (int64_t i = 0; i < padded_pairs; i += 16) {  // elements 2i .. 2i + 31
    const int64_t left = D - 2 * i;
    const __mmask32 in_row = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
    if (ROWS > 1)  // one hint per 64-byte line: the vector's
#pragma GCC unroll 8
      for (int c = 0; c < NC; ++c)
        if (c < next) __builtin_prefetch(key_row(keys, ldk, order, first + NC + c) + 2 * i);
    __m512bh q[ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) q[r] = (__m512bh)_mm512_loadu_si512(q_pairs + r * padded_pairs + i);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const __m512bh k = (__m512bh)_mm512_maskz_loadu_epi16(in_row, rows[c] + 2 * i);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) acc[c][r] = _mm512_dpbf16_ps(acc[c][r], q[r], k);
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const float score = _mm512_reduce_add_ps(acc[c][r]) * factor;
      check += score - score;  // NaN once a score is not finite
      sT[(first + c) * R + r] = score;
    }
}

// All count keys for ROWS rows: tiles of kNarrowTile<ROWS> keys, then single keys (a block of
// kKeyBlock keys has none left over; the last block of an item may).
template <int ROWS>
FASTPROBE_AVX512_BF16 FASTPROBE_ALWAYS_INLINE void narrow_pair_rows(
    const uint32_t* q_pairs, int64_t padded_pairs, const uint16_t* keys, int64_t ldk,
    const int64_t* order, int64_t count, int64_t D, float factor, float* sT, int64_t R,
    float& check) {
  constexpr int NC = kNarrowTile<ROWS>;
  int64_t c = 0;
  for (; c + NC <= count; c += NC)
    narrow_pair_tile<NC, ROWS>(q_pairs, padded_pairs, keys, ldk, order, c, D, factor, sT, R,
                               std::min<int64_t>(NC, count - c - NC), check);
  for (; c < count; ++c)
    narrow_pair_tile<1, ROWS>(q_pairs, padded_pairs, keys, ldk, order, c, D, factor, sT, R, 0, check);
}

// Scores of one key block for a narrow item: sT [count][R] (rows < `rows` written) =
// factor (q . k), keys [count] bf16 rows (row stride ldk, in `order` when reordered); false if
// some score is not finite (the caller then scores the block the float32 way).
FASTPROBE_AVX512_BF16 static bool narrow_pair_scores_block(const uint32_t* q_pairs,
                                                           int64_t padded_pairs, int64_t rows,
                                                           const uint16_t* keys, int64_t ldk,
                                                           const int64_t* order, int64_t count,
                                                           int64_t D, float factor, float* sT,
                                                           int64_t R) {
  float check = 0.0f;
  switch (rows) {
    case 1: narrow_pair_rows<1>(q_pairs, padded_pairs, keys, ldk, order, count, D, factor, sT, R, check); break;
    case 2: narrow_pair_rows<2>(q_pairs, padded_pairs, keys, ldk, order, count, D, factor, sT, R, check); break;
    case 3: narrow_pair_rows<3>(q_pairs, padded_pairs, keys, ldk, order, count, D, factor, sT, R, check); break;
    default: narrow_pair_rows<4>(q_pairs, padded_pairs, keys, ldk, order, count, D, factor, sT, R, check); break;
  }
  return check == check;
}
#endif

// Scores scaled after the dot (Problem::score_scale): sT[i] *= factor.
FASTPROBE_SIMD_CLONES static void scale_block(float* sT, int64_t size, float factor) {
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) sT[i] *= factor;
}

// The mask of a block that needs one: sT[c][r] = -inf where key c, at position key_pos[c], is
// invisible to the query at position[r], which sees keys lo[r] <= j <= hi[r] (see top) and
// has the sinks j < sink_end[r]. key_real[c]: the key is not padding.
struct MaskRule {
  bool causal;
  int64_t window;        // 0: none
  int64_t sink_end;      // keys below it are sinks of every row: the least sink_end[r]
  int64_t max_sink_end;  // keys from it on are sinks of none (without row ends: sink_end)
  bool lower, upper;     // whether lo (with a start) and hi (causal, or with a horizon) can hide a key
};

FASTPROBE_SIMD_CLONES static void mask_block(float* sT, int64_t R, int64_t count,
                                             const int64_t* key_pos, const uint8_t* key_real,
                                             const int64_t* position, const int64_t* lo,
                                             const int64_t* hi, const int64_t* sink_end,
                                             MaskRule rule) {
  // the bounds that can hide a key, as compile-time flags: no work for the others
  auto masked = [&](auto lower, auto upper) FASTPROBE_LAMBDA_INLINE {
    auto in_bounds = [&](int64_t j, int64_t r) FASTPROBE_LAMBDA_INLINE {
      return (!lower || lo[r] <= j) && (!upper || j <= hi[r]);
    };
    for (int64_t c = 0; c < count; ++c) {
      float* s = sT + c * R;
      const int64_t j = key_pos[c];
      if (!key_real[c]) {
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) s[r] = kNegInf;
        continue;
      }
      const bool sink = j < rule.sink_end;
      if (rule.window == 0 || sink) {  // only the bounds can hide it
        if constexpr (lower || upper) {
#pragma omp simd
          for (int64_t r = 0; r < R; ++r) s[r] = in_bounds(j, r) ? s[r] : kNegInf;
        }
      } else if (j < rule.max_sink_end) {  // row ends: a sink of the rows with j < sink_end[r]
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) {
          const bool in_window =
              j > position[r] - rule.window && (rule.causal || j < position[r] + rule.window);
          s[r] = (in_bounds(j, r) && (j < sink_end[r] || in_window)) ? s[r] : kNegInf;
        }
      } else if (rule.causal) {  // p - window < j
#pragma omp simd
        for (int64_t r = 0; r < R; ++r)
          s[r] = (in_bounds(j, r) && j > position[r] - rule.window) ? s[r] : kNegInf;
      } else {  // |p - j| < window
#pragma omp simd
        for (int64_t r = 0; r < R; ++r)
          s[r] = (in_bounds(j, r) && j > position[r] - rule.window && j < position[r] + rule.window)
                     ? s[r] : kNegInf;
      }
    }
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (rule.lower)
    rule.upper ? masked(Yes(), Yes()) : masked(Yes(), No());
  else
    rule.upper ? masked(No(), Yes()) : masked(No(), No());
}

// The running softmax state of R rows, each array [R] (groups [G][R], oT [Dv][R]).
struct RowState {
  float* m;       // running max (a start logit, or -inf)
  float* l;       // sum_j exp(s_j - m), in two parts: l + l_lo (add_compensated)
  float* l_lo;    // the rounding errors of the block sums added to l
  float* a;       // sum_j exp(s_j - m) (s_j - m), for the entropy
  float* sink;    // sum over stat keys of exp(s_j - m)
  float* groups;  // per group, sum of exp(s_j - m)
  float* oT;      // sum_j exp(s_j - m) v_j, transposed

  static int64_t floats(int64_t R, int64_t G, int64_t Dv) { return R * (5 + G + Dv); }
  static RowState over(float* base, int64_t R, int64_t G) {
    return {base, base + R, base + 2 * R, base + 3 * R, base + 4 * R, base + 5 * R, base + (5 + G) * R};
  }
  // the whole sum l + l_lo of row r, in float
  float sum(int64_t r) const { return l[r] + l_lo[r]; }
  // row r's l' = alpha l + block_sum: both parts rescaled, the block's sum added compensated
  FASTPROBE_ALWAYS_INLINE void fold(int64_t r, float alpha, float block_sum);
};

// hi + lo += x, with hi + x's rounding error kept in lo (TwoSum: s = fl(hi + x) and
// err = (hi - (s - x')) + (x - x'), x' = s - hi, give hi + x = s + err exactly, whichever of hi
// and x is larger). The running sum l ~ 1 of a row with a dominant (sink) key would otherwise
// drop every block sum under half an ulp of it (6e-8: 64 keys of e < 1e-9 each).
FASTPROBE_ALWAYS_INLINE void add_compensated(float& hi, float& lo, float x) {
  const float s = hi + x;
  const float x_part = s - hi;
  const float err = (hi - (s - x_part)) + (x - x_part);
  hi = s;
  lo += err;
}

FASTPROBE_ALWAYS_INLINE void RowState::fold(int64_t r, float alpha, float block_sum) {
  l[r] *= alpha;
  l_lo[r] *= alpha;
  add_compensated(l[r], l_lo[r], block_sum);
}

// One row's step to a block whose largest score is block_max: m' = max(m, block_max),
// alpha = exp(m - m') (0 from an empty state), and the shift the block's e = exp(s - shift)
// are taken from (m', or 0 while the row has seen nothing: its e are then exp(-inf) = 0).
struct RowStep {
  float m, alpha, shift;
};

FASTPROBE_ALWAYS_INLINE RowStep row_step(float m_old, float block_max) {
  const float m_new = m_old > block_max ? m_old : block_max;
  return {m_new, m_old == kNegInf ? 0.0f : fast_exp(m_old - m_new), m_new == kNegInf ? 0.0f : m_new};
}

// The entropy sum's old part after a step: alpha (A + (m - m') l), 0 where alpha = 0 (an empty
// state, or m' - m past float max, where m - m' = -inf and 0 * -inf would be NaN).
FASTPROBE_ALWAYS_INLINE float entropy_carry(float m_old, const RowStep& step, float a, float l) {
  return step.alpha == 0.0f ? 0.0f : step.alpha * (a + (m_old - step.m) * l);
}

// The stat keys among a block's keys c < count, the first at position first: keys c < all are
// stat keys of every row, keys all <= c < any those of row r with first + c < row_end[r]
// (row ends; without them any = all and row_end is not read).
struct StatKeys {
  int64_t all = 0, any = 0;
  int64_t first = 0;
  const int64_t* row_end = nullptr;  // [R]: stat_end_p of each row (clamped)

  // the number of row r's stat keys, c < count(r)
  int64_t count(int64_t r) const {
    return any == all ? all : std::min(std::max(row_end[r] - first, all), any);
  }
};

// Folds one key block's scores sT [count][R] (-inf where masked) into the state's m, l, a
// and sink (the sum of e over the stat keys). sT becomes e = exp(s - m'); alpha gets
// exp(m - m') and block_sum sum_c e (oT and the groups are rescaled by their own kernels).
// `shift`, `new_max` and `stat_sum` are [R] scratch.
FASTPROBE_SIMD_CLONES static void softmax_block(float* sT, int64_t R, int64_t count,
                                                StatKeys stat, bool with_entropy,
                                                RowState state, float* alpha, float* block_sum,
                                                float* shift, float* new_max, float* stat_sum) {
  // shift = the block's max per row, then m' (0 for a row that has seen nothing: its e are 0)
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) shift[r] = kNegInf;
  for (int64_t c = 0; c < count; ++c) {
    const float* s = sT + c * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) shift[r] = s[r] > shift[r] ? s[r] : shift[r];
  }
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) {
    const RowStep step = row_step(state.m[r], shift[r]);
    alpha[r] = step.alpha;
    new_max[r] = step.m;  // m', stored in the state at the end
    shift[r] = step.shift;
    block_sum[r] = 0.0f;
    stat_sum[r] = 0.0f;
  }
  if (with_entropy) {
    // A' = alpha (A + (m - m') l) + sum_c e_c (s_c - m'), in place: the old part first
    float* entropy_sum = state.a;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r)
      entropy_sum[r] = entropy_carry(state.m[r], {new_max[r], alpha[r], shift[r]}, state.a[r], state.sum(r));
    for (int64_t c = 0; c < count; ++c) {
      float* s = sT + c * R;
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) {
        const float centered = s[r] - shift[r];
        const float e = fast_exp(centered);
        entropy_sum[r] += e > 0.0f ? e * centered : 0.0f;  // 0 log 0 = 0
        block_sum[r] += e;
        s[r] = e;
      }
      if (c < stat.all) {
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) stat_sum[r] += s[r];
      }
    }
  } else {
    for (int64_t c = 0; c < count; ++c) {
      float* s = sT + c * R;
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) {
        const float e = fast_exp(s[r] - shift[r]);
        block_sum[r] += e;
        s[r] = e;
      }
      if (c < stat.all) {
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) stat_sum[r] += s[r];
      }
    }
  }
  for (int64_t c = stat.all; c < stat.any; ++c) {  // row ends: the stat keys of some rows
    const float* e = sT + c * R;
    const int64_t j = stat.first + c;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) stat_sum[r] += j < stat.row_end[r] ? e[r] : 0.0f;
  }
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) {
    state.fold(r, alpha[r], block_sum[r]);
    state.sink[r] = alpha[r] * state.sink[r] + stat_sum[r];
    state.m[r] = new_max[r];
  }
}

// softmax_block for an item of few rows (decoding): the lanes run along the keys, one row at
// a time (its scores gathered from sT into x [count] and its e put back), instead of along R
// lanes that are mostly padding. Padding rows get alpha = block_sum = 0.
FASTPROBE_SIMD_CLONES static void softmax_rows_block(float* sT, int64_t R, int64_t rows,
                                                     int64_t count, StatKeys stat,
                                                     bool with_entropy, RowState state,
                                                     float* alpha, float* block_sum, float* x) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t stat_count = stat.count(r);
    for (int64_t c = 0; c < count; ++c) x[c] = sT[c * R + r];
    float block_max = kNegInf;
#pragma omp simd reduction(max : block_max)
    for (int64_t c = 0; c < count; ++c) block_max = x[c] > block_max ? x[c] : block_max;
    const RowStep step = row_step(state.m[r], block_max);
    float sum = 0.0f, entropy = 0.0f;
#pragma omp simd reduction(+ : sum, entropy)
    for (int64_t c = 0; c < count; ++c) {
      const float centered = x[c] - step.shift;
      const float e = fast_exp(centered);
      entropy += e > 0.0f ? e * centered : 0.0f;  // 0 log 0 = 0
      sum += e;
      x[c] = e;
    }
    // the stat keys' e after the loop: a `c < stat_count` select inside it gets the loop split
    // at stat_count by GCC, and the part after the stat keys (nearly all) was left scalar
    float stat = 0.0f;
    for (int64_t c = 0; c < std::min(stat_count, count); ++c) stat += x[c];
    for (int64_t c = 0; c < count; ++c) sT[c * R + r] = x[c];
    if (with_entropy) state.a[r] = entropy_carry(state.m[r], step, state.a[r], state.sum(r)) + entropy;
    alpha[r] = step.alpha;
    block_sum[r] = sum;
    state.fold(r, step.alpha, sum);
    state.sink[r] = step.alpha * state.sink[r] + stat;
    state.m[r] = step.m;
  }
  for (int64_t r = rows; r < R; ++r) alpha[r] = block_sum[r] = 0.0f;
}

// Merges partial states (the same rows, disjoint key ranges) into `into`, by their max:
// M = max_s m_s, f_s = exp(m_s - M): l = sum_s f_s l_s, A = sum_s f_s (A_s + (m_s - M) l_s),
// sums and O likewise.
FASTPROBE_SIMD_CLONES static void merge_states(const float* partials, int64_t parts,
                                               int64_t part_floats, int64_t R, int64_t G,
                                               int64_t Dv, RowState into, float* factor) {
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) into.m[r] = kNegInf;
  for (int64_t s = 0; s < parts; ++s) {
    const float* m = partials + s * part_floats;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) into.m[r] = m[r] > into.m[r] ? m[r] : into.m[r];
  }
  const int64_t tail_rows = 2 + G + Dv;  // a, sink, groups, oT: R floats each, after m, l, l_lo
  std::fill(into.l, into.l + R * (2 + tail_rows), 0.0f);  // l, l_lo, a, sink, groups, oT
  for (int64_t s = 0; s < parts; ++s) {
    const RowState part = RowState::over(const_cast<float*>(partials + s * part_floats), R, G);
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      const bool empty = part.m[r] == kNegInf;
      const float f = empty ? 0.0f : fast_exp(part.m[r] - into.m[r]);
      factor[r] = f;
      add_compensated(into.l[r], into.l_lo[r], f * part.l[r]);  // l += f l_s, l_lo += f l_lo_s
      into.l_lo[r] += f * part.l_lo[r];
      // 0 where f = 0: an empty part, or one whose m - m' overflows to -inf (0 * -inf = NaN)
      into.a[r] += f == 0.0f ? 0.0f : f * (part.a[r] + (part.m[r] - into.m[r]) * part.sum(r));
    }
    for (int64_t k = 1; k < tail_rows; ++k) {  // sink (k = 1), groups, oT
      const float* x = part.a + k * R;
      float* y = into.a + k * R;
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) y[r] += factor[r] * x[r];
    }
  }
}

// ---- The problem and its plan. -------------------------------------------------------------

// What every attention operation shares: the tensors, the visibility rule, the stat keys and
// the head mask.
struct Problem {
  const void* q;  // [B, Hq, Lq, D]
  const void* k;  // [B, Hkv, Lk, D]
  const void* v;  // [B, Hkv, Lk, Dv]
  void* out;      // [B, Hq, Lq, Dv]
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  int64_t q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, o_s0, o_s1, o_s2;
  // s = scale q . k as (q scale) . k with scale <= 1 (q . k itself may overflow where s does not),
  // and as (q . k) score_scale with scale > 1 (q scale may overflow where s does not); both 1 under
  // a soft cap, whose factor holds the scale
  float scale;
  bool causal;
  const uint8_t* key_real;             // [B, Lk] or null (all real)
  float score_scale = 1.0f;
  // the most a change of q . k moves a score: scale (under a soft cap too: c tanh(x scale / c)
  // has slope at most scale)
  float score_gain = 1.0f;
  int64_t window = 0;                  // 0: none
  const int64_t* sink_end = nullptr;   // [B] ([B, Lk] with row_ends) or null (no sink keys)
  const int64_t* stat_end = nullptr;   // [B] ([B, Lk] with row_ends) or null (no stat keys)
  bool row_ends = false;               // sink_end and stat_end per position (see top)
  const int64_t* start = nullptr;      // [B, Lk] or null: lo_p (see top)
  const int64_t* horizon = nullptr;    // [B, Lk] or null: hi_p (see top)
  const uint8_t* head_mask = nullptr;  // [Hq] or null
  int64_t G = 0;                       // group sums per state (sink_attention's key groups)

  // sink_end_p or stat_end_p (see top) of the query at position pos, clamped to [0, Lk]
  int64_t clamped_end(const int64_t* ends, int64_t b, int64_t pos) const {
    if (ends == nullptr) return 0;
    const int64_t end = row_ends ? ends[b * Lk + pos] : ends[b];
    return std::min(std::max(end, int64_t(0)), Lk);
  }
  // [lo_p, hi_p] of the query at position pos (see top), clamped: any start or horizon value
  // keeps every read inside K and V.
  std::array<int64_t, 2> key_bounds(int64_t b, int64_t pos) const {
    const int64_t lo = start == nullptr ? 0 : std::min(std::max(start[b * Lk + pos], int64_t(0)), pos);
    const int64_t hi = horizon != nullptr ? std::min(std::max(horizon[b * Lk + pos], pos), Lk - 1)
                       : causal           ? pos
                                          : Lk - 1;
    return {lo, hi};
  }
  bool pruned(int64_t h) const { return head_mask != nullptr && head_mask[h] == 0; }
};

[[noreturn]] void invalid(const char* op, const std::string& what) {
  throw std::invalid_argument(std::string("fastprobe._C.") + op + ": " + what);
}

// The checks every attention binding makes on sizes, strides and the scale, and the Problem
// without its optional parts. Null data pointers are an error unless the output is empty
// (batch or num_queries 0: the caller returns before running anything).
Problem attention_problem(const char* op, DType type, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                          int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                          int64_t num_queries, int64_t num_keys, int64_t head_dim,
                          int64_t value_dim, int64_t q_s0, int64_t q_s1, int64_t q_s2,
                          int64_t q_s3, int64_t k_s0, int64_t k_s1, int64_t k_s2, int64_t k_s3,
                          int64_t v_s0, int64_t v_s1, int64_t v_s2, int64_t v_s3, int64_t out_s0, int64_t out_s1, int64_t out_s2,
                          int64_t out_s3, double scale, bool causal, uintptr_t key_real) {
  check_size(batch, 0, "batch");
  check_size(num_heads, 1, "num_heads");
  check_size(num_kv_heads, 1, "num_kv_heads");
  check_size(num_queries, 0, "num_queries");
  check_size(num_keys, 0, "num_keys");
  check_size(head_dim, 1, "head_dim");
  check_size(value_dim, 1, "value_dim");
  if (num_heads % num_kv_heads != 0)
    invalid(op, "num_heads (" + std::to_string(num_heads) + ") must be a multiple of num_kv_heads (" +
                    std::to_string(num_kv_heads) + ")");
  if (num_queries > num_keys)
    invalid(op, "num_queries (" + std::to_string(num_queries) + ") must be <= num_keys (" +
                    std::to_string(num_keys) + ")");
  // (with a head dim of 1 the stride is never stepped: torch leaves it as it was, e.g. 2 in a view)
  if ((head_dim > 1 && (q_s3 != 1 || k_s3 != 1)) || (value_dim > 1 && (v_s3 != 1 || out_s3 != 1)))
    invalid(op, "the last (head dim) stride of q, k, v and out must be 1");
  check_layout("q", {batch, num_heads, num_queries, head_dim}, {q_s0, q_s1, q_s2, q_s3});
  check_layout("k", {batch, num_kv_heads, num_keys, head_dim}, {k_s0, k_s1, k_s2, k_s3});
  check_layout("v", {batch, num_kv_heads, num_keys, value_dim}, {v_s0, v_s1, v_s2, v_s3});
  check_layout("out", {batch, num_heads, num_queries, value_dim}, {out_s0, out_s1, out_s2, out_s3});
  check_layout("the [B, Lk] key arrays", {batch, num_keys});  // key_real, ends, start, horizon, ...
  check_layout("the [B, Hq, Lq] statistics", {batch, num_heads, num_queries});
  const float scale_f = float(scale);
  if (!(scale_f > 0.0f && std::isfinite(scale_f)))
    invalid(op, "scale must be finite and > 0 in float32");
  const bool used = batch > 0 && num_queries > 0;
  const uintptr_t alignment = element_size(type);  // (q, k, v and out are of the one dtype)
  Problem p{pointer<const void>(q, used, "q", alignment), pointer<const void>(k, used, "k", alignment),
            pointer<const void>(v, used, "v", alignment), pointer<void>(out, used, "out", alignment),
            batch, num_heads, num_kv_heads, num_queries, num_keys, head_dim, value_dim,
            q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, out_s0, out_s1, out_s2,
            std::min(scale_f, 1.0f), causal, pointer<const uint8_t>(key_real, false, "key_real")};
  p.score_scale = std::max(scale_f, 1.0f);
  p.score_gain = scale_f;
  return p;
}

// The lane width of a call's kernels: 16 where the CPU runs the x86-64-v4 (AVX-512) code and
// the limit allows it, else 8.
inline int call_lanes() {
#ifdef FASTPROBE_AVX512
  static const bool avx512 = runs_avx512_clone();
  if (avx512 && attention_lane_limit.load(std::memory_order_relaxed) >= 16) return 16;
#endif
  return 8;
}

// Whether a bfloat16 call at `lanes` lanes scores by AVX512-BF16 pairs (see top): 16 lanes, a CPU
// with AVX512-BF16, and allowed (attention_pairs_allowed).
inline bool call_pair_scores(int lanes) {
  static const bool bf16 = runs_avx512_bf16();
  return lanes == 16 && bf16 && attention_pairs_allowed.load(std::memory_order_relaxed);
}

struct Plan {
  int64_t states;        // running-softmax states per row
  int64_t group;         // query heads per kv head
  int64_t block_queries; // queries per item
  int64_t query_blocks;
  int64_t max_rows;      // group * block_queries
  int64_t lanes;         // the lane width L of the call's kernels (call_lanes)
  int64_t max_R;         // max_rows rounded up to whole vectors
  int64_t key_blocks;
  int64_t items;         // B * Hkv * query_blocks
  int64_t splits;        // key ranges per item
  int64_t state_floats;  // the states of max_R rows
  int64_t padded_dim;    // D rounded up to whole vectors (narrow items' q and k rows)
  int64_t padded_value_dim;  // Dv likewise (narrow items' v and output rows)
  bool pair_scores;      // items score by bf16 pairs (call_pair_scores)
  int64_t pairs;         // (D + 1) / 2: the pairs of a q or k row
  int64_t padded_pairs;  // pairs rounded up to whole vectors of 16 (narrow items' q rows)

  Plan(const Problem& p, int64_t states_per_row, int threads, int lane_width, bool by_pairs)
      : states(states_per_row), lanes(lane_width), pair_scores(by_pairs), pairs((p.D + 1) / 2),
        padded_pairs(round_up(pairs, 16)) {
    group = p.Hq / p.Hkv;
    block_queries = std::min(p.Lq, std::max<int64_t>(1, kItemRows / group));
    query_blocks = (p.Lq + block_queries - 1) / block_queries;
    max_rows = group * block_queries;
    max_R = round_up(max_rows, lanes);
    key_blocks = (p.Lk + kKeyBlock - 1) / kKeyBlock;
    items = p.B * p.Hkv * query_blocks;
    // Few items (decoding): split each item's keys so that every thread has work; ranges of
    // at least 4 blocks keep the merge cheap. (So the ranges, and the last bits of a decoding
    // call's results, depend on the thread count; a range's own order does not.)
    splits = 1;
    if (items < 2 * int64_t(threads)) {
      const int64_t wanted = (2 * int64_t(threads) + items - 1) / items;
      splits = std::max<int64_t>(1, std::min(wanted, key_blocks / 4));
    }
    state_floats = states * RowState::floats(max_R, p.G, p.Dv);
    padded_dim = round_up(p.D, lanes);
    padded_value_dim = round_up(p.Dv, lanes);
  }
};

// Per-thread scratch, sized once per call: one allocation (a decoding call's fixed cost was
// ~10% malloc / free when each of its twelve small arrays was a vector of its own).
struct Scratch {
  float *qT, *sT, *keys, *vals, *alpha, *block_sum, *shift, *new_max, *stat_sum, *state;
  float *q_rows, *o_rows;  // narrow items: q [kNarrowRows][Dp], o [kNarrowRows][Dvp] per state
  float* key_scores;       // narrow items: one row's scores of a block [kKeyBlock]
  float* row_out;          // [2][Dvp]: an operation's per-row results before they are stored
  uint32_t* q_pairs;       // with pair scores: q as bf16 pairs, [pairs][R] or (narrow) [rows][padded pairs]
  uint16_t* key_pairs;     // with pair scores: a block's key rows copied whole [kKeyBlock][2 pairs]
  int64_t *row_head, *row_query, *position, *lo, *hi, *sink_end, *stat_end;  // [max_R]
  int64_t *key_pos, *order;  // [kKeyBlock]
  int64_t* seen_list;        // [max(G, 1)]
  uint8_t* key_real;         // [kKeyBlock]
  uint8_t* seen;             // [max(G, 1)]
  int64_t seen_count = 0;    // groups seen by the item (sink_attention's group sums)
  // null, or while rescue_item writes an item's rows: 2^s_d, the factor its column d of O lacks
  // (the op's write_rows multiplies O_d / l by it)
  const float* value_unscale = nullptr;

  Scratch(const Problem& p, const Plan& plan) {
    const size_t bytes = lay_out(0, p, plan);  // (sizes only)
    // uninitialised: every slot is written before it is read (zeroing ~80 KB at D = 128 cost a
    // decoding call ~2 us per thread); tests/sanitize.sh builds with FASTPROBE_POISON_SCRATCH,
    // all bits set (floats NaN, indices -1), so a slot read before it is written shows in the
    // outputs or as a read outside a buffer
    storage_.reset(new char[bytes + kAlign]);
#ifdef FASTPROBE_POISON_SCRATCH
    std::memset(storage_.get(), 0xff, bytes + kAlign);
#endif
    lay_out(uintptr_t(round_up(int64_t(reinterpret_cast<uintptr_t>(storage_.get())), kAlign)), p, plan);
  }

 private:
  static constexpr int64_t kAlign = 64;  // every slot starts on a cache line
  std::unique_ptr<char[]> storage_;

  // Points every slot into the bytes from `base`, one after the other; returns their size.
  size_t lay_out(uintptr_t base, const Problem& p, const Plan& plan) {
    const int64_t R = plan.max_R, Dp = plan.padded_dim, Dvp = plan.padded_value_dim;
    const int64_t groups = std::max<int64_t>(p.G, 1);
    uintptr_t at = base;
    auto take = [&](auto*& slot, int64_t count) {
      using Element = std::remove_reference_t<decltype(*slot)>;
      slot = reinterpret_cast<Element*>(at);
      at += round_up(count * int64_t(sizeof(Element)), kAlign);
    };
    take(qT, p.D * R);
    take(sT, kKeyBlock * R);
    take(keys, kKeyBlock * Dp);
    take(vals, kKeyBlock * Dvp);
    for (float** row_slot : {&alpha, &block_sum, &shift, &new_max, &stat_sum}) take(*row_slot, R);
    take(state, plan.state_floats);
    take(q_rows, kNarrowRows * Dp);
    take(o_rows, plan.states * kNarrowRows * Dvp);
    take(key_scores, kKeyBlock);
    take(row_out, 2 * Dvp);
    take(q_pairs, plan.pair_scores ? std::max(plan.pairs * R, kNarrowRows * plan.padded_pairs) : 0);
    take(key_pairs, plan.pair_scores ? kKeyBlock * 2 * plan.pairs : 0);
    for (int64_t** row_slot : {&row_head, &row_query, &position, &lo, &hi, &sink_end, &stat_end})
      take(*row_slot, R);
    take(key_pos, kKeyBlock);
    take(order, kKeyBlock);
    take(seen_list, groups);
    take(key_real, kKeyBlock);
    take(seen, groups);
    return at - base;
  }
};

// The states of an item of R rows, one after the other from base.
template <int64_t S>
FASTPROBE_ALWAYS_INLINE std::array<RowState, S> item_states(float* base, int64_t R, int64_t G, int64_t Dv) {
  std::array<RowState, S> st;
  for (int64_t s = 0; s < S; ++s) st[s] = RowState::over(base + s * RowState::floats(R, G, Dv), R, G);
  return st;
}

// One item's rows: the unpruned heads of its kv head times its queries, head-major, with
// their positions, key bounds and sink / stat ends in ws.
struct ItemRows {
  int64_t b, kv_head, first_query, queries;
  int64_t rows, R;
  int64_t first_position, last_position;  // of its queries
  int64_t min_lo, max_hi;  // keys outside [min_lo, max_hi] are invisible to all its rows
  int64_t max_lo, min_hi;  // keys inside [max_lo, min_hi] are within every row's bounds
  // keys below min_*_end are sinks / stat keys of every row, from max_*_end on of none
  // (without row ends min = max)
  int64_t min_sink_end, max_sink_end, min_stat_end, max_stat_end;
};

ItemRows item_rows(const Problem& p, const Plan& plan, int64_t item, Scratch& ws) {
  // heaviest first: the last query blocks (most keys when causal) come first
  const int64_t per_block = p.B * p.Hkv;
  const int64_t qb = plan.query_blocks - 1 - item / per_block;
  ItemRows it;
  it.b = (item % per_block) / p.Hkv;
  it.kv_head = item % p.Hkv;
  it.first_query = qb * plan.block_queries;
  it.queries = std::min(plan.block_queries, p.Lq - it.first_query);
  it.first_position = p.Lk - p.Lq + it.first_query;
  it.last_position = it.first_position + it.queries - 1;
  it.min_lo = it.min_hi = p.Lk - 1;
  it.max_lo = it.max_hi = 0;
  it.min_sink_end = it.min_stat_end = p.Lk;
  it.max_sink_end = it.max_stat_end = 0;
  int64_t rows = 0;
  for (int64_t g = 0; g < plan.group; ++g) {
    const int64_t h = it.kv_head * plan.group + g;
    if (p.pruned(h)) continue;
    for (int64_t i = 0; i < it.queries; ++i, ++rows) {
      const int64_t pos = it.first_position + i;
      const auto [lo, hi] = p.key_bounds(it.b, pos);
      ws.row_head[rows] = h;
      ws.row_query[rows] = it.first_query + i;
      ws.position[rows] = pos;
      ws.lo[rows] = lo;
      ws.hi[rows] = hi;
      ws.sink_end[rows] = p.clamped_end(p.sink_end, it.b, pos);
      ws.stat_end[rows] = p.clamped_end(p.stat_end, it.b, pos);
      it.min_lo = std::min(it.min_lo, lo);
      it.max_lo = std::max(it.max_lo, lo);
      it.min_hi = std::min(it.min_hi, hi);
      it.max_hi = std::max(it.max_hi, hi);
      it.min_sink_end = std::min(it.min_sink_end, ws.sink_end[rows]);
      it.max_sink_end = std::max(it.max_sink_end, ws.sink_end[rows]);
      it.min_stat_end = std::min(it.min_stat_end, ws.stat_end[rows]);
      it.max_stat_end = std::max(it.max_stat_end, ws.stat_end[rows]);
    }
  }
  it.rows = rows;
  it.R = round_up(rows, plan.lanes);
  for (int64_t r = rows; r < it.R; ++r) {  // padding rows: the last row's position, bounds, ends
    ws.row_head[r] = ws.row_head[rows - 1];
    ws.row_query[r] = 0;
    ws.position[r] = ws.position[rows - 1];
    ws.lo[r] = ws.lo[rows - 1];
    ws.hi[r] = ws.hi[rows - 1];
    ws.sink_end[r] = ws.sink_end[rows - 1];
    ws.stat_end[r] = ws.stat_end[rows - 1];
  }
  return it;
}

// Which of an item's keys are real (not padding): its batch row of key_real, or null (all).
inline const uint8_t* item_key_real(const Problem& p, const ItemRows& it) {
  return p.key_real != nullptr ? p.key_real + it.b * p.Lk : nullptr;
}

// Which key blocks an item needs, and which need an elementwise mask.
enum class BlockKind { Skip, Full, Masked };

// A block within [min_lo, max_hi] (attend_item visits no other).
BlockKind classify_block(const Problem& p, const ItemRows& it, int64_t j0, int64_t count,
                         const uint8_t* real_row) {
  const int64_t j1 = j0 + count;  // keys [j0, j1)
  const int64_t first = it.first_position, last = it.last_position;
  bool any_in_window = true, all_in_window = true;
  if (p.window > 0) {
    if (p.causal) {  // p - window < j
      any_in_window = j1 - 1 > first - p.window;
      all_in_window = j0 > last - p.window;
    } else {  // |p - j| < window
      any_in_window = j1 - 1 > first - p.window && j0 < last + p.window;
      all_in_window = j0 > last - p.window && j1 - 1 < first + p.window;
    }
  }
  const bool has_sinks = std::max(j0, it.min_lo) < it.max_sink_end;  // a sink key some row may see
  if (!any_in_window && !has_sinks) return BlockKind::Skip;
  int64_t real = count;
  if (real_row != nullptr) {
    real = 0;
    for (int64_t c = 0; c < count; ++c) real += real_row[j0 + c] != 0;
    if (real == 0) return BlockKind::Skip;
  }
  const bool all_visible = real == count && it.max_lo <= j0 && j1 - 1 <= it.min_hi &&
                           (all_in_window || j1 <= it.min_sink_end);
  return all_visible ? BlockKind::Full : BlockKind::Masked;
}

// count rows of D elements (row stride ld) as float32 rows of Dp >= D elements (zeros after
// D): the rows themselves when they are float32, in order and Dp = D, else converted into dst.
// order (null: 0, 1, ...): the rows to take, each < count.
template <typename T>
FASTPROBE_ALWAYS_INLINE const float* block_rows(const void* base, int64_t first, int64_t ld,
                                                int64_t count, int64_t D, int64_t Dp,
                                                const int64_t* order, float* dst, int64_t& ld_out) {
  const T* src = static_cast<const T*>(base) + first;
  if (std::is_same_v<T, float> && Dp == D && order == nullptr) {
    ld_out = ld;
    return reinterpret_cast<const float*>(src);
  }
  for (int64_t c = 0; c < count; ++c) {
    const T* row = src + (order == nullptr ? c : order[c]) * ld;
    float* out = dst + c * Dp;
    load_floats(row, 1, D, out);
    for (int64_t d = D; d < Dp; ++d) out[d] = 0.0f;
  }
  ld_out = Dp;
  return dst;
}

// count bf16 key rows of D elements (row stride ld) as rows of whole pairs for pair_scores_block:
// the rows themselves when D is even and in order, else copied into dst (rows of 2 pairs, a 0
// after an odd D). order as in block_rows.
FASTPROBE_ALWAYS_INLINE const uint16_t* pair_rows(const void* base, int64_t first, int64_t ld,
                                                  int64_t count, int64_t D, int64_t pairs,
                                                  const int64_t* order, uint16_t* dst,
                                                  int64_t& ld_out) {
  const uint16_t* src = static_cast<const uint16_t*>(base) + first;
  if (D % 2 == 0 && order == nullptr) {
    ld_out = ld;
    return src;
  }
  for (int64_t c = 0; c < count; ++c) {
    const uint16_t* row = src + (order == nullptr ? c : order[c]) * ld;
    uint16_t* out = dst + c * 2 * pairs;
    std::copy(row, row + D, out);
    if (D % 2 != 0) out[D] = 0;
  }
  ld_out = 2 * pairs;
  return dst;
}

// Row r of an item's queries: q[b, row_head[r], row_query[r], :].
template <typename T>
FASTPROBE_ALWAYS_INLINE const T* query_row(const Problem& p, const ItemRows& it, const Scratch& ws,
                                            int64_t r) {
  return static_cast<const T*>(p.q) + it.b * p.q_s0 + ws.row_head[r] * p.q_s1 +
         ws.row_query[r] * p.q_s2;
}

// An item's query rows (bf16) as pairs along the head dim, (q[r][2i], q[r][2i + 1]) in one word,
// 0 after an odd D: wide items q_pairs[i][r] for its R rows (0 for the padding rows r >= rows),
// narrow ones q_pairs[r][i] for its rows, padded_pairs a row (0 past the pairs). Whether the item
// may score by them: no subnormal q (the instruction reads it as 0) and max|q| gain <= 2^32
// with gain <= 2^32 (a flushed key or product moves a score by less than D 2^-94: a NaN or inf
// q fails this too).
FASTPROBE_ALWAYS_INLINE bool pack_pairs(const Problem& p, const ItemRows& it, const Scratch& ws,
                                        const Plan& plan, bool narrow, uint32_t* q_pairs) {
  const int64_t rows_out = narrow ? it.rows : it.R, pairs_out = narrow ? plan.padded_pairs : plan.pairs;
  const int64_t at_row = narrow ? plan.padded_pairs : 1, at_pair = narrow ? 1 : it.R;
  uint32_t max_bits = 0;
  bool subnormal = false;
  for (int64_t r = 0; r < rows_out; ++r) {
    if (r >= it.rows) {
      for (int64_t i = 0; i < pairs_out; ++i) q_pairs[i * at_pair + r * at_row] = 0;
      continue;
    }
    const uint16_t* q = query_row<uint16_t>(p, it, ws, r);
    for (int64_t d = 0; d < p.D; ++d) {
      const uint32_t magnitude = q[d] & 0x7fffu;
      max_bits = std::max(max_bits, magnitude);
      subnormal |= magnitude != 0 && magnitude < 0x80u;  // exponent 0, mantissa not
    }
    for (int64_t i = 0; i < pairs_out; ++i) {
      const uint32_t low = 2 * i < p.D ? q[2 * i] : 0, high = 2 * i + 1 < p.D ? q[2 * i + 1] : 0;
      q_pairs[i * at_pair + r * at_row] = low | high << 16;
    }
  }
  const float limit = 4294967296.0f;  // 2^32
  return !subnormal && bf16_to_float(uint16_t(max_bits)) * p.score_gain <= limit && p.score_gain <= limit;
}


// Items of at most this many rows take softmax_rows_block. Measured on AVX-512 decoding
// (2 threads, Lk = 1024, D = 64 and 128) once its exp loop was vectorised (2026-12-01): within
// noise of softmax_block at three and four rows, so the limit stays at two; one-row items (MHA
// decoding) are 20-25% faster whole-call than before that fix.
constexpr int64_t kNarrowSoftmaxRows = 2;

// The stat keys (see top) of `count` keys in place from position j0, for the item's rows.
inline StatKeys stat_keys(const ItemRows& it, int64_t j0, int64_t count, const Scratch& ws) {
  auto keys_before = [&](int64_t end) { return std::min(std::max(end - j0, int64_t(0)), count); };
  return {keys_before(it.min_stat_end), keys_before(it.max_stat_end), j0, ws.stat_end};
}

// Folds a segment of `count` keys of an item's block (its scores eT, -inf where masked) into
// its state: softmax_block, or softmax_rows_block for items of at most kNarrowSoftmaxRows
// rows. Leaves e in eT and the state's rescale factor in ws.alpha, block_sum in ws.block_sum.
inline void fold_softmax(const ItemRows& it, float* eT, int64_t count, const StatKeys& stat,
                         bool with_entropy, const RowState& st, Scratch& ws) {
  if (it.rows <= kNarrowSoftmaxRows)
    softmax_rows_block(eT, it.R, it.rows, count, stat, with_entropy, st, ws.alpha,
                       ws.block_sum, ws.key_scores);
  else
    softmax_block(eT, it.R, count, stat, with_entropy, st, ws.alpha, ws.block_sum, ws.shift,
                  ws.new_max, ws.stat_sum);
}

// The arguments every attention binding starts with, in this order, for pybind11's m.def: the
// dtype, q, k, v and out, the sizes (head_dim D of q and k, value_dim Dv of v and out), the
// strides of q, k, v and out, the scale and causal.
#define FASTPROBE_ATTENTION_ARGS                                                                 \
  py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("batch"),  \
      py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("num_queries"), py::arg("num_keys"), \
      py::arg("head_dim"), py::arg("value_dim"), py::arg("q_s0"), py::arg("q_s1"),               \
      py::arg("q_s2"), py::arg("q_s3"), py::arg("k_s0"), py::arg("k_s1"), py::arg("k_s2"),       \
      py::arg("k_s3"), py::arg("v_s0"),                                                          \
      py::arg("v_s1"), py::arg("v_s2"), py::arg("v_s3"), py::arg("out_s0"), py::arg("out_s1"),   \
      py::arg("out_s2"), py::arg("out_s3"), py::arg("scale"), py::arg("causal")

// ---- The item driver, for an operation `op` (see SinkAttention in attention.cpp and
// DualPathAttention in dual_attention.cpp) with
//   kStates                          running-softmax states per row
//   p                                its Problem
//   start_logit(head)                the value-less logit state 0 starts from (-inf: none)
//   begin_item(it, ws)               resets its per-item scratch
//   route(it, j0, count, real, ws)   which state each key of a block feeds (a Route)
//   transform_scores(sT, size)       applied to a block's scores before the mask
//   fold(it, j0, segment, eT, state, ws)
//                                    folds a segment's scores into its state (fold_softmax):
//                                    eT becomes e, ws.alpha the state's rescale factor
//   write_pruned<T>(plan, it), write_rows<T>(it, ws, states)
//                                    the outputs of pruned heads, and of the rows' states

// Keys [begin, end) of a block as loaded feed state `state`.
struct Segment {
  int64_t state, begin, end;
};

// A block's segments (one or two), and whether its keys are loaded in ws.order.
struct Route {
  int segments;
  Segment segment[2];
  bool reordered;

  static Route one(int64_t state, int64_t count) { return {1, {{state, 0, count}, {0, 0, 0}}, false}; }
};

// Range `split` (of plan.splits) of an item's key blocks, those holding [min_lo, max_hi],
// folded into fresh states in ws.state; returns the item's rows. State 0 of range 0 starts
// from the op's start logit.
template <typename Op, typename T, int L>
FASTPROBE_ALWAYS_INLINE ItemRows attend_item(const Op& op, const Plan& plan, int64_t item,
                                             int64_t split, Scratch& ws) {
  const Problem& p = op.p;
  const ItemRows it = item_rows(p, plan, item, ws);
  if (it.rows == 0) return it;
  const int64_t kb_first = it.min_lo / kKeyBlock, kb_last = it.max_hi / kKeyBlock + 1;
  const int64_t per_split = (kb_last - kb_first + plan.splits - 1) / plan.splits;
  const int64_t kb_begin = std::min(kb_first + split * per_split, kb_last);
  const int64_t kb_end = std::min(kb_begin + per_split, kb_last);
  const bool first_range = split == 0;
  const int64_t R = it.R, D = p.D, Dv = p.Dv, G = p.G;
  const auto st = item_states<Op::kStates>(ws.state, R, G, Dv);
  // narrow: lanes along the head dims (rows of Dp, Dvp floats), else along rows (transposed)
  const bool narrow = it.rows <= kNarrowRows;
  const int64_t Dp = narrow ? plan.padded_dim : D;
  const int64_t Dvp = narrow ? plan.padded_value_dim : Dv;
  const int64_t o_rows_floats = kNarrowRows * Dvp;  // per state

  // scale q: q_rows [rows][Dp] (narrow) or qT [D][R] (padding rows 0)
  for (int64_t r = 0; r < R; ++r) {
    const T* q = query_row<T>(p, it, ws, r);
    if (narrow) {
      if (r >= it.rows) break;
      for (int64_t d = 0; d < Dp; ++d) ws.q_rows[r * Dp + d] = d < D ? to_float<T>(q[d]) * p.scale : 0.0f;
    } else {
      for (int64_t d = 0; d < D; ++d) ws.qT[d * R + r] = r < it.rows ? to_float<T>(q[d]) * p.scale : 0.0f;
    }
  }
  // bfloat16 pairs (see top): the items of a call that scores by them, when pack_pairs allows
  bool by_pairs = false;
  if constexpr (std::is_same_v<T, bf16> && L == 16)
    by_pairs = plan.pair_scores && pack_pairs(p, it, ws, plan, narrow, ws.q_pairs);
  // the states: m = c, l = 1 from a start logit c, else m = -inf, l = 0; sums 0
  for (int64_t s = 0; s < Op::kStates; ++s) {
    for (int64_t r = 0; r < R; ++r) {
      const float c = s == 0 && first_range ? op.start_logit(ws.row_head[r]) : kNegInf;
      st[s].m[r] = c;
      st[s].l[r] = c == kNegInf ? 0.0f : 1.0f;
    }
    std::fill(st[s].l_lo, st[s].l_lo + R * (3 + G + Dv), 0.0f);  // l_lo, a, sink, groups, oT
  }
  if (narrow) std::fill(ws.o_rows, ws.o_rows + Op::kStates * o_rows_floats, 0.0f);
  op.begin_item(it, ws);

  const uint8_t* real_row = item_key_real(p, it);
  const MaskRule rule{p.causal, p.window, it.min_sink_end, it.max_sink_end, p.start != nullptr,
                      p.causal || p.horizon != nullptr};
  const int64_t k_base = it.b * p.k_s0 + it.kv_head * p.k_s1;
  const int64_t v_base = it.b * p.v_s0 + it.kv_head * p.v_s1;

  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t j0 = kb * kKeyBlock;
    const int64_t count = std::min(kKeyBlock, p.Lk - j0);
    const BlockKind kind = classify_block(p, it, j0, count, real_row);
    if (kind == BlockKind::Skip) continue;
    const Route route = op.route(it, j0, count, real_row, ws);
    const int64_t* order = route.reordered ? ws.order : nullptr;
    // s = (q scale) . k or (q . k) score_scale; by pairs, (q . k) scale score_scale
    bool scored = false;
#ifdef FASTPROBE_AVX512_BF16
    if (by_pairs && narrow) {
      scored = narrow_pair_scores_block(ws.q_pairs, plan.padded_pairs, it.rows,
                                        static_cast<const uint16_t*>(p.k) + k_base + j0 * p.k_s2,
                                        p.k_s2, order, count, D, p.scale * p.score_scale, ws.sT, R);
    } else if (by_pairs) {
      int64_t ldp;
      const uint16_t* key_pairs = pair_rows(p.k, k_base + j0 * p.k_s2, p.k_s2, count, D,
                                            plan.pairs, order, ws.key_pairs, ldp);
      scored = pair_scores_block(ws.q_pairs, R, plan.pairs, key_pairs, ldp, count,
                                 p.scale * p.score_scale, ws.sT);
    }
#endif
    if (!scored) {
      int64_t ldk;
      const float* keys =
          block_rows<T>(p.k, k_base + j0 * p.k_s2, p.k_s2, count, D, Dp, order, ws.keys, ldk);
      if (narrow)
        dots_block(Width<L>(), ws.q_rows, it.rows, Dp, keys, ldk, count, ws.sT, R);
      else
        scores_block(Width<L>(), ws.qT, R, D, keys, ldk, count, ws.sT);
      if (p.score_scale != 1.0f) scale_block(ws.sT, count * R, p.score_scale);
    }
    op.transform_scores(ws.sT, count * R);
    if (kind == BlockKind::Masked) {
      for (int64_t c = 0; c < count; ++c) {
        const int64_t j = j0 + (order == nullptr ? c : order[c]);
        ws.key_pos[c] = j;
        ws.key_real[c] = real_row == nullptr || real_row[j];
      }
      mask_block(ws.sT, R, count, ws.key_pos, ws.key_real, ws.position,
                 ws.lo, ws.hi, ws.sink_end, rule);
    }
    int64_t ldv;
    const float* vals =
        block_rows<T>(p.v, v_base + j0 * p.v_s2, p.v_s2, count, Dv, Dvp, order, ws.vals, ldv);
    for (int g = 0; g < route.segments; ++g) {
      const Segment& seg = route.segment[g];
      float* eT = ws.sT + seg.begin * R;
      const int64_t n = seg.end - seg.begin;
      op.fold(it, j0, seg, eT, st[seg.state], ws);
      if (narrow)
        axpys_block(Width<L>(), eT, R, it.rows, n, vals + seg.begin * ldv, ldv, ws.alpha,
                    ws.o_rows + seg.state * o_rows_floats, Dvp);
      else
        values_block(Width<L>(), eT, R, n, vals + seg.begin * ldv, ldv, Dv, ws.alpha,
                     st[seg.state].oT);
    }
  }
  if (narrow)  // the states keep O transposed
    for (int64_t s = 0; s < Op::kStates; ++s)
      for (int64_t r = 0; r < it.rows; ++r)
        for (int64_t d = 0; d < Dv; ++d) st[s].oT[d * R + r] = ws.o_rows[s * o_rows_floats + r * Dvp + d];
  return it;
}

// ---- Values near float max. ---------------------------------------------------------------
// O = sum_j e_j v_j (e_j <= 1) of a row's n visible keys is at most n max_j |v_j| (and the
// merged O of key ranges likewise), so it can overflow float32 where out = O / l, a convex
// combination of the values, is finite (|v| ~ 1e38 and a few keys of similar score). An item
// whose final O is not finite somewhere is attended again (rescue_item; ordinary inputs never
// get there, so they keep their bits and cost one isfinite scan of O per item) on a copy of its
// values with column d scaled by 2^-s_d, the least s_d >= 0 with n max_j |v_jd| 2^-s_d <= 2^126:
// O_d 2^-s_d is then finite, and the op's write_rows multiplies O_d / l back by 2^s_d
// (Scratch::value_unscale). Powers of two scale exactly (but for subnormals, which a column of
// values within 2^126 / n of float max only holds below 2^-125 |v|_max of the column's own scale).
// Columns that cannot overflow (s_d = 0) and the statistics (which do not read the values) keep
// their bits; the rescue attends the same key ranges and merges them as the first pass did.
// inf / NaN among the values (or scores) stay what they were: their s_d come from the finite
// values, and an item whose every s_d is 0 is left as it was.

// Merges an item's key ranges (partials: plan.splits of them, plan.state_floats apart), state by
// state, into its states st.
template <size_t S>
FASTPROBE_ALWAYS_INLINE void merge_parts(const Problem& p, const Plan& plan, const ItemRows& it,
                                         const float* partials, const std::array<RowState, S>& st, Scratch& ws) {
  for (size_t s = 0; s < S; ++s)
    merge_states(partials + s * RowState::floats(it.R, p.G, p.Dv), plan.splits, plan.state_floats,
                 it.R, p.G, p.Dv, st[s], ws.alpha);
}

// Whether some row's O, in any state, is not finite: x * 0 is 0 for finite x, NaN for inf / NaN
// (a sum that vectorises, where a loop of isfinite ran scalar: +13% instructions in a 512-key
// dual_path_attention).
template <size_t S>
FASTPROBE_ALWAYS_INLINE bool values_overflowed(const std::array<RowState, S>& st, const ItemRows& it, int64_t Dv) {
  float probe = 0.0f;
  // oT is [Dv][R]: whole when the item has R rows, its first `rows` entries of each column if not
  const int64_t runs = it.rows == it.R ? 1 : Dv, run = it.rows == it.R ? Dv * it.R : it.rows;
  for (const RowState& state : st)
    for (int64_t d = 0; d < runs; ++d) {
      const float* values = state.oT + d * it.R;
#pragma omp simd reduction(+ : probe)
      for (int64_t r = 0; r < run; ++r) probe += values[r] * 0.0f;
    }
  return probe != 0.0f;
}

// Attends item `item` again with its values' columns scaled (see above) and writes its rows;
// false, with nothing done, when no column needs a scale (the O that is not finite comes from
// inf / NaN inputs). Inlined into its entry (rescue_<dtype>_<L>, out of line and cold), so
// compiled for the entry's target as the first pass was.
template <typename Op, typename T, int L>
FASTPROBE_ALWAYS_INLINE bool rescue_item(const Op& op, const Plan& plan, int64_t item, Scratch& ws) {
  const Problem& p = op.p;
  const ItemRows it = item_rows(p, plan, item, ws);
  const T* values = static_cast<const T*>(p.v) + it.b * p.v_s0 + it.kv_head * p.v_s1;
  // the blocks attend_item reads (of those holding [min_lo, max_hi], the ones classify_block, called
  // as attend_item calls it, does not skip: with sinks and a window, the sink blocks and the
  // window's); no row sees a key outside them
  const uint8_t* real_row = item_key_real(p, it);
  std::vector<int64_t> block_starts;
  for (int64_t j0 = it.min_lo / kKeyBlock * kKeyBlock; j0 <= it.max_hi; j0 += kKeyBlock)
    if (classify_block(p, it, j0, std::min(kKeyBlock, p.Lk - j0), real_row) != BlockKind::Skip)
      block_starts.push_back(j0);
  // s_d from the largest finite |v_jd| over the keys some row may see (those of these blocks
  // within [min_lo, max_hi], not padding), n of them <= 2^ceil_log2_n; frexp: max = f 2^e, f < 1,
  // so n max < 2^(e + ceil_log2_n) <= 2^126 when s_d = e + ceil_log2_n - 126
  std::vector<float> largest(size_t(p.Dv), 0.0f);
  int64_t n = 0;
  for (const int64_t j0 : block_starts)
    for (int64_t j = std::max(j0, it.min_lo); j < std::min(j0 + kKeyBlock, it.max_hi + 1); ++j) {
      if (real_row != nullptr && !real_row[j]) continue;
      ++n;
      for (int64_t d = 0; d < p.Dv; ++d) {
        const float x = std::fabs(to_float<T>(values[j * p.v_s2 + d]));
        if (std::isfinite(x)) largest[d] = std::max(largest[d], x);
      }
    }
  int ceil_log2_n = 0;
  while ((int64_t(1) << ceil_log2_n) < n) ++ceil_log2_n;
  std::vector<int> shift(size_t(p.Dv), 0);
  std::vector<float> unscale(size_t(p.Dv), 1.0f);
  bool scaled = false;
  for (int64_t d = 0; d < p.Dv; ++d) {
    int exponent;
    std::frexp(largest[d], &exponent);
    shift[d] = std::max(0, exponent + ceil_log2_n - 126);
    unscale[d] = std::ldexp(1.0f, shift[d]);
    scaled |= shift[d] > 0;
  }
  if (!scaled) return false;
  // the scaled copy, [keys][Dv], of keys [0, end) (the end of the last block), with only these
  // blocks written, whole (attend_item reads whole blocks): the other keys are never read and
  // stay unwritten (new T[], not a vector's zeros), so a long cache's pages between the sinks and
  // a window are never touched and take no memory
  const int64_t end = std::min(p.Lk, block_starts.back() + kKeyBlock);
  std::unique_ptr<T[]> copy(new T[size_t(end * p.Dv)]);
  for (const int64_t j0 : block_starts)
    for (int64_t j = j0; j < std::min(j0 + kKeyBlock, end); ++j)
      for (int64_t d = 0; d < p.Dv; ++d)
        copy[j * p.Dv + d] = from_float<T>(std::ldexp(to_float<T>(values[j * p.v_s2 + d]), -shift[d]));
  Op rescaled = op;
  rescaled.p.v = copy.get();
  rescaled.p.v_s0 = rescaled.p.v_s1 = 0;
  rescaled.p.v_s2 = p.Dv;
  // the key ranges of the first pass, merged as merge_item does
  const int64_t item_floats = Op::kStates * RowState::floats(it.R, p.G, p.Dv);
  std::vector<float> partials(plan.splits > 1 ? size_t(plan.splits * plan.state_floats) : 0);
  for (int64_t split = 0; split < plan.splits; ++split) {
    attend_item<Op, T, L>(rescaled, plan, item, split, ws);
    if (plan.splits > 1) std::copy(ws.state, ws.state + item_floats, partials.data() + split * plan.state_floats);
  }
  const auto st = item_states<Op::kStates>(ws.state, it.R, p.G, p.Dv);
  if (plan.splits > 1) merge_parts(p, plan, it, partials.data(), st, ws);
  ws.value_unscale = unscale.data();
  op.template write_rows<T>(it, ws, st);
  ws.value_unscale = nullptr;
  return true;
}

// The rescue of an item (rescue_item at the call's dtype and lane width).
template <typename Op>
using Rescue = bool (*)(const Op&, const Plan&, int64_t, Scratch&);

// An item's rows from its final states in ws.state: write_rows, or the rescue where O is not finite.
template <typename Op, typename T>
FASTPROBE_ALWAYS_INLINE void finish_item(const Op& op, const Plan& plan, int64_t item,
                                         const ItemRows& it, Scratch& ws, Rescue<Op> rescue) {
  const auto st = item_states<Op::kStates>(ws.state, it.R, op.p.G, op.p.Dv);
  if (__builtin_expect(!values_overflowed(st, it, op.p.Dv), 1) || !rescue(op, plan, item, ws))
    op.template write_rows<T>(it, ws, st);
}

// One item, whole: attend over all its keys and write its outputs.
template <typename Op, typename T, int L>
FASTPROBE_ALWAYS_INLINE void run_item(const Op& op, const Plan& plan, int64_t item, Scratch& ws,
                                      Rescue<Op> rescue) {
  const ItemRows it = attend_item<Op, T, L>(op, plan, item, 0, ws);
  op.template write_pruned<T>(plan, it);
  if (it.rows > 0) finish_item<Op, T>(op, plan, item, it, ws, rescue);
}

// One key range of an item, its states kept in `partial` for the merge.
template <typename Op, typename T, int L>
FASTPROBE_ALWAYS_INLINE void run_item_range(const Op& op, const Plan& plan, int64_t item,
                                            int64_t split, float* partial, Scratch& ws) {
  const ItemRows it = attend_item<Op, T, L>(op, plan, item, split, ws);
  if (split == 0) op.template write_pruned<T>(plan, it);
  if (it.rows > 0)
    std::copy(ws.state, ws.state + Op::kStates * RowState::floats(it.R, op.p.G, op.p.Dv), partial);
}

// Merges an item's key ranges, state by state, and writes its outputs.
template <typename Op, typename T>
FASTPROBE_ALWAYS_INLINE void merge_item(const Op& op, const Plan& plan, int64_t item,
                                        const float* partials, Scratch& ws, Rescue<Op> rescue) {
  const Problem& p = op.p;
  const ItemRows it = item_rows(p, plan, item, ws);
  if (it.rows == 0) return;
  const auto st = item_states<Op::kStates>(ws.state, it.R, p.G, p.Dv);
  merge_parts(p, plan, it, partials, st, ws);
  finish_item<Op, T>(op, plan, item, it, ws, rescue);
}

// Entries of an operation per dtype and lane width, multi-versioned so that the loads and stores
// are compiled for each target: FASTPROBE_ATTENTION_ENTRIES(Op) defines them and
// entries_for(op, dtype, lanes). The merge works on whole rows; it is per lane width for its
// rescue (rescue_item), which attends again.
template <typename Op>
struct Entries {
  void (*run)(const Op&, const Plan&, int64_t, Scratch&);
  void (*run_range)(const Op&, const Plan&, int64_t, int64_t, float*, Scratch&);
  void (*merge)(const Op&, const Plan&, int64_t, const float*, Scratch&);
  int lanes;
  bool pair_scores = false;  // bfloat16 at 16 lanes with AVX512-BF16 (call_pair_scores)
};

#define FASTPROBE_ATTENTION_LANE_ENTRIES(Op, name, T, L, TARGET)                                \
  TARGET __attribute__((noinline, cold)) bool rescue_##name##_##L(                              \
      const Op& op, const Plan& plan, int64_t item, Scratch& ws) {                              \
    return rescue_item<Op, T, L>(op, plan, item, ws);                                           \
  }                                                                                             \
  TARGET void run_##name##_##L(const Op& op, const Plan& plan, int64_t item, Scratch& ws) {    \
    run_item<Op, T, L>(op, plan, item, ws, rescue_##name##_##L);                                \
  }                                                                                             \
  TARGET void run_range_##name##_##L(const Op& op, const Plan& plan, int64_t item,             \
                                     int64_t split, float* partial, Scratch& ws) {             \
    run_item_range<Op, T, L>(op, plan, item, split, partial, ws);                               \
  }                                                                                             \
  TARGET void merge_##name##_##L(const Op& op, const Plan& plan, int64_t item,                 \
                                 const float* partials, Scratch& ws) {                         \
    merge_item<Op, T>(op, plan, item, partials, ws, rescue_##name##_##L);                       \
  }

#ifdef FASTPROBE_AVX512
#define FASTPROBE_ATTENTION_ENTRIES_16(Op, name, T) \
  FASTPROBE_ATTENTION_LANE_ENTRIES(Op, name, T, 16, FASTPROBE_AVX512)
#define FASTPROBE_ENTRIES_CASE_16(name, T)                                                       \
  if (lanes == 16)                                                                              \
    return {run_##name##_16, run_range_##name##_16, merge_##name##_16, 16,                      \
            std::is_same_v<T, bf16> && call_pair_scores(16)};
#else
#define FASTPROBE_ATTENTION_ENTRIES_16(Op, name, T)
#define FASTPROBE_ENTRIES_CASE_16(name, T)
#endif

#define FASTPROBE_ATTENTION_DTYPE_ENTRIES(Op, name, T)                                           \
  FASTPROBE_ATTENTION_LANE_ENTRIES(Op, name, T, 8, FASTPROBE_SIMD_CLONES)                       \
  FASTPROBE_ATTENTION_ENTRIES_16(Op, name, T)

#define FASTPROBE_ENTRIES_CASE(name, T)                                                          \
  {                                                                                             \
    FASTPROBE_ENTRIES_CASE_16(name, T)                                                          \
    return {run_##name##_8, run_range_##name##_8, merge_##name##_8, 8};                         \
  }

#define FASTPROBE_ATTENTION_ENTRIES(Op)                                                          \
  FASTPROBE_ATTENTION_DTYPE_ENTRIES(Op, float32, float)                                         \
  FASTPROBE_ATTENTION_DTYPE_ENTRIES(Op, bfloat16, bf16)                                         \
  FASTPROBE_ATTENTION_DTYPE_ENTRIES(Op, float16, fp16)                                          \
  Entries<Op> entries_for(const Op&, DType dtype, int lanes) {                                  \
    switch (dtype) {                                                                            \
      case DType::Float32: FASTPROBE_ENTRIES_CASE(float32, float)                               \
      case DType::BFloat16: FASTPROBE_ENTRIES_CASE(bfloat16, bf16)                              \
      case DType::Float16: FASTPROBE_ENTRIES_CASE(float16, fp16)                                \
    }                                                                                           \
    throw std::invalid_argument("fastprobe._C: unsupported dtype");                            \
  }

// Runs body(i, scratch) for i < count over at most `threads` threads, inline when that is one
// (team_size, common.h). An exception (bad_alloc) is kept and rethrown after the parallel
// region, never let out of it (ThreadErrors, common.h); inline it leaves as it came.
template <typename Body>
void parallel_items(int threads, int64_t count, const Problem& p, const Plan& plan, Body body) {
  const int team = team_size(threads, count);
  if (team == 1) {
    Scratch ws(p, plan);
    for (int64_t i = 0; i < count; ++i) body(i, ws);
    return;
  }
  ThreadErrors errors;
#pragma omp parallel num_threads(team)
  {
    std::unique_ptr<Scratch> ws;
    errors.run([&] { ws = std::make_unique<Scratch>(p, plan); });
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < count; ++i)
      if (ws != nullptr) errors.run([&] { body(i, *ws); });
  }
  errors.rethrow();
}

// A call of fewer multiply-adds than this, B Hq Lq Lk (D + Dv) (a bound: masked keys are skipped),
// runs on the calling thread: below it, two threads were no faster, having to start a parallel
// region and a second scratch (2026-12-02, 2 shared cores, decoding 8 heads, D = 64, us on 1 / 2
// threads, two runs: float32 2^15 3.1 / 5.7 and 3.6 / 4.4, 2^16 4.2 / 6.2 and 5.1 / 5.3, 2^17
// 6.8 / 7.9 and 8.8 / 7.7; bfloat16 2^15 4.0 / 6.2 and 4.5 / 4.9, 2^16 5.9 / 7.2 and 7.0 / 6.5).
constexpr double kInlineWork = double(1 << 16);

// Runs an operation over all its items: whole items, or (few items) key ranges merged after.
// The plan comes from `threads` even when the call runs inline: its results are those of any
// other call on as many threads.
template <typename Op>
void run_attention(const Op& op, const Entries<Op>& run, int threads) {
  const Problem& p = op.p;
  const Plan plan(p, Op::kStates, threads, run.lanes, run.pair_scores);
  const double work = double(p.B) * double(p.Hq) * double(p.Lq) * double(p.Lk) * double(p.D + p.Dv);
  const int team = work < kInlineWork ? 1 : threads;
  if (plan.splits == 1) {
    parallel_items(team, plan.items, p, plan,
                   [&](int64_t item, Scratch& ws) { run.run(op, plan, item, ws); });
    return;
  }
  std::vector<float> partials(size_t(plan.items * plan.splits * plan.state_floats));
  parallel_items(team, plan.items * plan.splits, p, plan, [&](int64_t unit, Scratch& ws) {
    run.run_range(op, plan, unit / plan.splits, unit % plan.splits,
                  partials.data() + unit * plan.state_floats, ws);
  });
  parallel_items(team, plan.items, p, plan, [&](int64_t item, Scratch& ws) {
    run.merge(op, plan, item, partials.data() + item * plan.splits * plan.state_floats, ws);
  });
}

}  // namespace
}  // namespace fastprobe
