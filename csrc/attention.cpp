// sink_attention: attention with sink keys, a sliding window, head masks and a per-head sink
// logit, plus the attention statistics, from the running softmax (the math of
// fastprobe.reference.sink_attention).
//
// Per batch b, query head h (kv head h / (Hq / Hkv), never expanded) and query i at
// position p = Lk - Lq + i:
//   visible(j) = real_j and (not causal or j <= p) and (no window or in_window or j < sink_end)
//     in_window: causal j > p - window, bidirectional |p - j| < window
//   s_j = scale q_i . k_j on visible keys (with a soft cap c: s_j = c tanh(scale q_i . k_j / c));
//   a sink logit c_h is one more, value-less entry:
//   lse = log(sum_j exp(s_j) + exp(c_h)),   p_j = exp(s_j - lse)
//   out = sum_j p_j v_j,   sink_mass = sum_{j < stat_end} p_j,   group_mass[g] = sum_{group_j = g} p_j
//   entropy = -sum_j p_j log p_j - p_sink log p_sink          (p_sink = exp(c_h - lse))
// A row with nothing in its softmax, and every row of a pruned head, gets out 0, lse -inf,
// masses 0 and entropy 0 (a pruned head costs no compute).
//
// Online softmax per row over blocks of keys, with the running max m, l = sum_j e_j,
// e_j = exp(s_j - m), and A = sum_j e_j (s_j - m); the sink logit starts the state as a
// value-less key (m = c_h, l = 1, A = 0). A block with max s_max folds in as
//   m' = max(m, s_max), alpha = exp(m - m')
//   l' = alpha l + sum_new e_j            A' = alpha (A + (m - m') l) + sum_new e_j (s_j - m')
//   O' = alpha O + sum_new e_j v_j         (the sink and group sums rescale like l)
// and at the end out = O / l, lse = m + log l, entropy = log l - A / l.
//
// Work: one item is (b, kv head, block of queries), with the query heads that share the kv
// head stacked as rows, so each key/value block is read (and converted to float32) once for
// all of them. Rows are the vector lanes: the scores of a key block are kept transposed,
// sT[key][row], so Q K^T is an outer-product update (a key element times a vector of query
// rows), the softmax is elementwise across rows, and P V updates the transposed output
// oT[d][row] by a value element times a vector of probabilities. K and V are read in place
// (float32) or converted block by block, never transposed. Items run over OpenMP, heaviest
// (latest causal query blocks) first; when there are fewer than two items per thread, each
// item's keys are split into ranges whose partial states are merged by their max.
//
// An item of at most kNarrowRows rows (decoding: one query per head) would leave most lanes
// idle, so it puts the lanes along head_dim instead: scores are dot products of q and k rows,
// and the output is updated row by row (O += e_j v_j), then stored transposed like the others.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <memory>
#include <type_traits>
#include <vector>

#include "common.h"

namespace py = pybind11;

namespace fastprobe {
namespace {

#define FASTPROBE_ALWAYS_INLINE inline __attribute__((always_inline))

// Keys per block: the scores of a block are kKeyBlock x rows floats (16 KiB for 64 rows).
constexpr int64_t kKeyBlock = 64;
// Query rows an item aims for (all its heads together): enough to amortise each key/value
// block over many rows, small enough that the block's scores and output stay in L1/L2.
constexpr int64_t kItemRows = 64;

// A vector of kLanes query rows (GCC vector extension): one AVX2 register, two SSE registers.
// The register tiles below (6 x 2 accumulators + 2 loads) fit the 16 registers of AVX2.
constexpr int64_t kLanes = 8;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
// Loads and stores of float buffers go through this one: any alignment, may alias float.
typedef float UnalignedLanes
    __attribute__((vector_size(kLanes * sizeof(float)), aligned(4), may_alias));
constexpr int kTileVectors = 2;  // row vectors per register tile
constexpr int kTileWidth = 6;    // keys (scores) or value dimensions (output) per register tile

#define LOAD_LANES(ptr) (*reinterpret_cast<const UnalignedLanes*>(ptr))
#define STORE_LANES(ptr, x) (*reinterpret_cast<UnalignedLanes*>(ptr) = (x))

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// ---- Register tiles (inlined into the multi-versioned block kernels below). ---------------

// sT[c][r] = sum_d keys[c][d] qT[d][r] for NC keys and MV vectors of rows (qT, sT and keys
// offset to the tile; R is the row stride of qT and sT).
template <int NC, int MV>
FASTPROBE_ALWAYS_INLINE void score_tile(const float* qT, int64_t R, const float* keys, int64_t ldk,
                                        int64_t D, float* sT) {
  Lanes acc[NC][MV];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) acc[c][v] = Lanes{};
  for (int64_t d = 0; d < D; ++d) {
    Lanes q[MV];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) q[v] = LOAD_LANES(qT + d * R + v * kLanes);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const float key = keys[c * ldk + d];
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[c][v] += key * q[v];
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) STORE_LANES(sT + c * R + v * kLanes, acc[c][v]);
}

// oT[d][r] = alpha[r] oT[d][r] + sum_c vals[c][d] eT[c][r] for ND dimensions and MV vectors
// of rows (oT, eT, alpha and vals offset to the tile).
template <int ND, int MV>
FASTPROBE_ALWAYS_INLINE void value_tile(const float* eT, int64_t R, int64_t count, const float* vals,
                                        int64_t ldv, const float* alpha, float* oT) {
  Lanes acc[ND][MV];
#pragma GCC unroll 4
  for (int v = 0; v < MV; ++v) {
    const Lanes a = LOAD_LANES(alpha + v * kLanes);
#pragma GCC unroll 8
    for (int t = 0; t < ND; ++t) acc[t][v] = LOAD_LANES(oT + t * R + v * kLanes) * a;
  }
  for (int64_t c = 0; c < count; ++c) {
    Lanes e[MV];
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) e[v] = LOAD_LANES(eT + c * R + v * kLanes);
#pragma GCC unroll 8
    for (int t = 0; t < ND; ++t) {
      const float value = vals[c * ldv + t];
#pragma GCC unroll 4
      for (int v = 0; v < MV; ++v) acc[t][v] += value * e[v];
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < ND; ++t)
#pragma GCC unroll 4
    for (int v = 0; v < MV; ++v) STORE_LANES(oT + t * R + v * kLanes, acc[t][v]);
}

// All count keys of one row tile, kTileWidth at a time, then the remainder.
template <int MV>
FASTPROBE_ALWAYS_INLINE void score_row_tile(const float* qT, int64_t R, const float* keys,
                                            int64_t ldk, int64_t count, int64_t D, float* sT) {
  int64_t c = 0;
  for (; c + kTileWidth <= count; c += kTileWidth)
    score_tile<kTileWidth, MV>(qT, R, keys + c * ldk, ldk, D, sT + c * R);
  switch (count - c) {
    case 1: score_tile<1, MV>(qT, R, keys + c * ldk, ldk, D, sT + c * R); break;
    case 2: score_tile<2, MV>(qT, R, keys + c * ldk, ldk, D, sT + c * R); break;
    case 3: score_tile<3, MV>(qT, R, keys + c * ldk, ldk, D, sT + c * R); break;
    case 4: score_tile<4, MV>(qT, R, keys + c * ldk, ldk, D, sT + c * R); break;
    case 5: score_tile<5, MV>(qT, R, keys + c * ldk, ldk, D, sT + c * R); break;
    default: break;
  }
}

// All D dimensions of one row tile, kTileWidth at a time, then the remainder.
template <int MV>
FASTPROBE_ALWAYS_INLINE void value_row_tile(const float* eT, int64_t R, int64_t count,
                                            const float* vals, int64_t ldv, int64_t D,
                                            const float* alpha, float* oT) {
  int64_t d = 0;
  for (; d + kTileWidth <= D; d += kTileWidth)
    value_tile<kTileWidth, MV>(eT, R, count, vals + d, ldv, alpha, oT + d * R);
  switch (D - d) {
    case 1: value_tile<1, MV>(eT, R, count, vals + d, ldv, alpha, oT + d * R); break;
    case 2: value_tile<2, MV>(eT, R, count, vals + d, ldv, alpha, oT + d * R); break;
    case 3: value_tile<3, MV>(eT, R, count, vals + d, ldv, alpha, oT + d * R); break;
    case 4: value_tile<4, MV>(eT, R, count, vals + d, ldv, alpha, oT + d * R); break;
    case 5: value_tile<5, MV>(eT, R, count, vals + d, ldv, alpha, oT + d * R); break;
    default: break;
  }
}

// ---- Narrow items (at most kNarrowRows rows, e.g. decoding one query per head): the lanes
// run along head_dim instead of rows, so no lane is idle. q, k and v rows are padded with
// zeros to Dp (a multiple of kLanes) so that every load is a whole vector.

constexpr int64_t kNarrowRows = 4;
typedef int32_t LaneIndex __attribute__((vector_size(kLanes * sizeof(int32_t))));

// x[0] + ... + x[kLanes - 1], by halving (GCC's generic shuffles; a plain sum elsewhere).
FASTPROBE_ALWAYS_INLINE float lane_sum(const Lanes& x) {
#if defined(__GNUC__) && !defined(__clang__)
#define HALVE(x, ...) ((x) + __builtin_shuffle((x), LaneIndex{__VA_ARGS__}))
  const Lanes quads = HALVE(x, 4, 5, 6, 7, 0, 1, 2, 3);
  const Lanes pairs = HALVE(quads, 2, 3, 0, 1, 6, 7, 4, 5);
  const Lanes total = HALVE(pairs, 1, 0, 3, 2, 5, 4, 7, 6);
#undef HALVE
  return total[0];
#else
  float total = 0.0f;
  for (int i = 0; i < kLanes; ++i) total += x[i];
  return total;
#endif
}

// sT[c][r] = q_rows[r] . keys[c] for NC keys and ROWS rows (rows of Dp floats).
template <int NC, int ROWS>
FASTPROBE_ALWAYS_INLINE void dot_tile(const float* q_rows, int64_t Dp, const float* keys, int64_t ldk,
                                      float* sT, int64_t R) {
  Lanes acc[NC][ROWS];
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) acc[c][r] = Lanes{};
  for (int64_t d = 0; d < Dp; d += kLanes) {
    Lanes q[ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) q[r] = LOAD_LANES(q_rows + r * Dp + d);
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
      const Lanes key = LOAD_LANES(keys + c * ldk + d);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) acc[c][r] += key * q[r];
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < NC; ++c)
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) sT[c * R + r] = lane_sum(acc[c][r]);
}

// o_rows[r][d] = alpha[r] o_rows[r][d] + sum_c eT[c][r] vals[c][d] for ROWS rows and NV
// vectors of d (o_rows and vals offset to the tile).
template <int ROWS, int NV>
FASTPROBE_ALWAYS_INLINE void axpy_tile(const float* eT, int64_t R, int64_t count, const float* vals,
                                       int64_t ldv, const float* alpha, float* o_rows, int64_t Dp) {
  Lanes acc[ROWS][NV];
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = LOAD_LANES(o_rows + r * Dp + v * kLanes) * alpha[r];
  for (int64_t c = 0; c < count; ++c) {
    Lanes x[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) x[v] = LOAD_LANES(vals + c * ldv + v * kLanes);
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const float e = eT[c * R + r];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += e * x[v];
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) STORE_LANES(o_rows + r * Dp + v * kLanes, acc[r][v]);
}

// Tiles of 8 accumulators: NC keys x ROWS rows (scores), ROWS rows x NV vectors (values).
template <int ROWS>
FASTPROBE_ALWAYS_INLINE void dot_rows(const float* q_rows, int64_t Dp, const float* keys,
                                      int64_t ldk, int64_t count, float* sT, int64_t R) {
  constexpr int NC = ROWS == 1 ? 8 : ROWS == 2 ? 4 : 2;
  int64_t c = 0;
  for (; c + NC <= count; c += NC) dot_tile<NC, ROWS>(q_rows, Dp, keys + c * ldk, ldk, sT + c * R, R);
  for (; c < count; ++c) dot_tile<1, ROWS>(q_rows, Dp, keys + c * ldk, ldk, sT + c * R, R);
}

template <int ROWS>
FASTPROBE_ALWAYS_INLINE void axpy_rows(const float* eT, int64_t R, int64_t count, const float* vals,
                                       int64_t ldv, const float* alpha, float* o_rows, int64_t Dp) {
  constexpr int NV = ROWS == 1 ? 8 : ROWS == 2 ? 4 : 2;
  int64_t d = 0;
  for (; d + NV * kLanes <= Dp; d += NV * kLanes)
    axpy_tile<ROWS, NV>(eT, R, count, vals + d, ldv, alpha, o_rows + d, Dp);
  for (; d < Dp; d += kLanes) axpy_tile<ROWS, 1>(eT, R, count, vals + d, ldv, alpha, o_rows + d, Dp);
}

// ---- Block kernels (multi-versioned). R, the row count, is a multiple of kLanes. ----------

// Scores of one key block: sT [count][R] = keys [count][D] (row stride ldk) times qT [D][R]
// (the queries, already multiplied by the scale).
FASTPROBE_SIMD_CLONES static void scores_block(const float* qT, int64_t R, int64_t D,
                                               const float* keys, int64_t ldk, int64_t count,
                                               float* sT) {
  const int64_t tile_rows = kTileVectors * kLanes;
  int64_t r = 0;
  for (; r + tile_rows <= R; r += tile_rows)
    score_row_tile<kTileVectors>(qT + r, R, keys, ldk, count, D, sT + r);
  if (r < R) score_row_tile<1>(qT + r, R, keys, ldk, count, D, sT + r);
}

// Output update of one key block: oT [D][R] = alpha oT + vals^T eT, with eT [count][R] the
// block's e = exp(s - m') and vals [count][D] (row stride ldv).
FASTPROBE_SIMD_CLONES static void values_block(const float* eT, int64_t R, int64_t count,
                                               const float* vals, int64_t ldv, int64_t D,
                                               const float* alpha, float* oT) {
  const int64_t tile_rows = kTileVectors * kLanes;
  int64_t r = 0;
  for (; r + tile_rows <= R; r += tile_rows)
    value_row_tile<kTileVectors>(eT + r, R, count, vals, ldv, D, alpha + r, oT + r);
  if (r < R) value_row_tile<1>(eT + r, R, count, vals, ldv, D, alpha + r, oT + r);
}

// Narrow scores: sT [count][R] (rows < `rows` written) = keys [count][Dp] . q_rows [rows][Dp].
FASTPROBE_SIMD_CLONES static void dots_block(const float* q_rows, int64_t rows, int64_t Dp,
                                             const float* keys, int64_t ldk, int64_t count,
                                             float* sT, int64_t R) {
  switch (rows) {
    case 1: dot_rows<1>(q_rows, Dp, keys, ldk, count, sT, R); break;
    case 2: dot_rows<2>(q_rows, Dp, keys, ldk, count, sT, R); break;
    case 3: dot_rows<3>(q_rows, Dp, keys, ldk, count, sT, R); break;
    default: dot_rows<4>(q_rows, Dp, keys, ldk, count, sT, R); break;
  }
}

// Narrow output update: o_rows [rows][Dp] = alpha o_rows + eT^T vals, vals [count][Dp].
FASTPROBE_SIMD_CLONES static void axpys_block(const float* eT, int64_t R, int64_t rows,
                                              int64_t count, const float* vals, int64_t ldv,
                                              const float* alpha, float* o_rows, int64_t Dp) {
  switch (rows) {
    case 1: axpy_rows<1>(eT, R, count, vals, ldv, alpha, o_rows, Dp); break;
    case 2: axpy_rows<2>(eT, R, count, vals, ldv, alpha, o_rows, Dp); break;
    case 3: axpy_rows<3>(eT, R, count, vals, ldv, alpha, o_rows, Dp); break;
    default: axpy_rows<4>(eT, R, count, vals, ldv, alpha, o_rows, Dp); break;
  }
}

// tanh(x) for float32, vectorisable: the odd Taylor series to x^11 for |x| < 0.3 (error
// < 1e-9), else sign(x) (1 - 2 / (exp(2|x|) + 1)) (absolute error ~1e-7; 1 for |x| > 44).
inline float fast_tanh(float x) {
  const float x2 = x * x;
  float p = -1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  const float series = x + x * x2 * p;
  const float magnitude = x < 0.0f ? -x : x;
  const float saturating = 1.0f - 2.0f / (fast_exp(2.0f * magnitude) + 1.0f);
  const float far = x < 0.0f ? -saturating : saturating;
  return magnitude < 0.3f ? series : far;  // NaN: far is NaN
}

// Soft cap of one block's scores (Gemma 2): s = cap tanh(s / cap).
FASTPROBE_SIMD_CLONES static void softcap_block(float* sT, int64_t size, float cap) {
  const float inv_cap = 1.0f / cap;
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) sT[i] = cap * fast_tanh(sT[i] * inv_cap);
}

// The mask of a block that needs one: sT[c][r] = -inf where key j0 + c is invisible to the
// query at position[r]. key_real[c]: the key is not padding; keys below sink_end are sinks.
struct MaskRule {
  bool causal;
  int64_t window;    // 0: none
  int64_t sink_end;  // clamped to [0, Lk]
};

FASTPROBE_SIMD_CLONES static void mask_block(float* sT, int64_t R, int64_t count, int64_t j0,
                                             const uint8_t* key_real, const int64_t* position,
                                             MaskRule rule) {
  for (int64_t c = 0; c < count; ++c) {
    float* s = sT + c * R;
    const int64_t j = j0 + c;
    if (!key_real[c]) {
#pragma omp simd
      for (int64_t r = 0; r < R; ++r) s[r] = kNegInf;
      continue;
    }
    const bool sink = j < rule.sink_end;
    if (rule.window == 0 || sink) {  // only the causal order can hide it
      if (rule.causal) {
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) s[r] = j <= position[r] ? s[r] : kNegInf;
      }
    } else if (rule.causal) {  // p - window < j <= p
#pragma omp simd
      for (int64_t r = 0; r < R; ++r)
        s[r] = (j <= position[r] && j > position[r] - rule.window) ? s[r] : kNegInf;
    } else {  // |p - j| < window
#pragma omp simd
      for (int64_t r = 0; r < R; ++r)
        s[r] = (j > position[r] - rule.window && j < position[r] + rule.window) ? s[r] : kNegInf;
    }
  }
}

// The running softmax state of R rows, each array [R] (groups [G][R], oT [D][R]).
struct RowState {
  float* m;       // running max (the sink logit to start with, or -inf)
  float* l;       // sum_j exp(s_j - m)
  float* a;       // sum_j exp(s_j - m) (s_j - m), for the entropy
  float* sink;    // sum over stat keys of exp(s_j - m)
  float* groups;  // per group, sum of exp(s_j - m)
  float* oT;      // sum_j exp(s_j - m) v_j, transposed

  static int64_t floats(int64_t R, int64_t G, int64_t D) { return R * (4 + G + D); }
  static RowState over(float* base, int64_t R, int64_t G) {
    return {base, base + R, base + 2 * R, base + 3 * R, base + 4 * R, base + (4 + G) * R};
  }
};

// Folds one key block's scores sT [count][R] (-inf where masked) into the state's m, l, a
// and sink (keys c < stat_count are stat keys). sT becomes e = exp(s - m'); alpha gets
// exp(m - m') and block_sum sum_c e (oT and the groups are rescaled by their own kernels).
// `shift`, `new_max` and `stat_sum` are [R] scratch.
FASTPROBE_SIMD_CLONES static void softmax_block(float* sT, int64_t R, int64_t count,
                                                int64_t stat_count, bool with_entropy,
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
    const float m_old = state.m[r];
    const float m_new = m_old > shift[r] ? m_old : shift[r];
    alpha[r] = m_old == kNegInf ? 0.0f : fast_exp(m_old - m_new);
    new_max[r] = m_new;  // m', stored in the state at the end
    shift[r] = m_new == kNegInf ? 0.0f : m_new;
    block_sum[r] = 0.0f;
    stat_sum[r] = 0.0f;
  }
  if (with_entropy) {
    // A' = alpha (A + (m - m') l) + sum_c e_c (s_c - m'), in place: the old part first
    float* entropy_sum = state.a;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      const float m_old = state.m[r];
      entropy_sum[r] = m_old == kNegInf ? 0.0f : alpha[r] * (state.a[r] + (m_old - new_max[r]) * state.l[r]);
    }
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
      if (c < stat_count) {
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
      if (c < stat_count) {
#pragma omp simd
        for (int64_t r = 0; r < R; ++r) stat_sum[r] += s[r];
      }
    }
  }
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) {
    state.l[r] = alpha[r] * state.l[r] + block_sum[r];
    state.sink[r] = alpha[r] * state.sink[r] + stat_sum[r];
    state.m[r] = new_max[r];
  }
}

// Group sums of one block: groups[g] = alpha groups[g] for the groups seen so far, then
// groups[group_c] += e_c. A block whose keys are all in one group adds block_sum at once.
FASTPROBE_SIMD_CLONES static void groups_block(const float* eT, int64_t R, int64_t count,
                                               const int32_t* key_group, const float* alpha,
                                               const float* block_sum, float* groups,
                                               uint8_t* seen, int64_t* seen_list,
                                               int64_t& seen_count) {
  for (int64_t i = 0; i < seen_count; ++i) {
    float* g = groups + seen_list[i] * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) g[r] *= alpha[r];
  }
  auto mark = [&](int32_t id) {
    if (!seen[id]) {
      seen[id] = 1;
      seen_list[seen_count++] = id;
    }
  };
  bool uniform = true;
  for (int64_t c = 1; c < count; ++c) uniform &= key_group[c] == key_group[0];
  if (uniform) {
    mark(key_group[0]);
    float* g = groups + int64_t(key_group[0]) * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) g[r] += block_sum[r];
    return;
  }
  for (int64_t c = 0; c < count; ++c) {
    mark(key_group[c]);
    float* g = groups + int64_t(key_group[c]) * R;
    const float* e = eT + c * R;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) g[r] += e[r];
  }
}

// Merges partial states (the same rows, disjoint key ranges) into `into`, by their max:
// M = max_s m_s, f_s = exp(m_s - M): l = sum_s f_s l_s, A = sum_s f_s (A_s + (m_s - M) l_s),
// sums and O likewise.
FASTPROBE_SIMD_CLONES static void merge_states(const float* partials, int64_t parts,
                                               int64_t part_floats, int64_t R, int64_t G,
                                               int64_t D, RowState into, float* factor) {
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) into.m[r] = kNegInf;
  for (int64_t s = 0; s < parts; ++s) {
    const float* m = partials + s * part_floats;
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) into.m[r] = m[r] > into.m[r] ? m[r] : into.m[r];
  }
  const int64_t tail_rows = 2 + G + D;  // a, sink, groups, oT: R floats each, after m, l
  std::fill(into.l, into.l + R, 0.0f);
  std::fill(into.a, into.a + R * tail_rows, 0.0f);  // a, sink, groups, oT
  for (int64_t s = 0; s < parts; ++s) {
    const RowState part = RowState::over(const_cast<float*>(partials + s * part_floats), R, G);
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) {
      const bool empty = part.m[r] == kNegInf;
      const float f = empty ? 0.0f : fast_exp(part.m[r] - into.m[r]);
      factor[r] = f;
      into.l[r] += f * part.l[r];
      into.a[r] += empty ? 0.0f : f * (part.a[r] + (part.m[r] - into.m[r]) * part.l[r]);
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

struct Attention {
  const void* q;  // [B, Hq, Lq, D]
  const void* k;  // [B, Hkv, Lk, D]
  const void* v;
  void* out;  // [B, Hq, Lq, D]
  int64_t B, Hq, Hkv, Lq, Lk, D;
  int64_t q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, o_s0, o_s1, o_s2;
  float scale;
  float softcap;  // 0: none
  bool causal;
  int64_t window;
  const uint8_t* key_real;   // [B, Lk] or null (all real)
  const int64_t* sink_end;   // [B]
  const int64_t* stat_end;   // [B]
  const uint8_t* head_mask;  // [Hq] or null
  const float* sink_logit;   // [Hq] or null
  const int32_t* key_groups; // [B, Lk] or null
  int64_t G;                 // groups (0 without key_groups)
  float* lse;                // [B, Hq, Lq]
  float* sink_mass;          // [B, Hq, Lq]
  float* group_mass;         // [B, Hq, Lq, G] or null
  float* entropy;            // [B, Hq, Lq] or null

  int64_t clamped_end(const int64_t* ends, int64_t b) const {
    return std::min(std::max(ends[b], int64_t(0)), Lk);
  }
  bool pruned(int64_t h) const { return head_mask != nullptr && head_mask[h] == 0; }
};

struct Plan {
  int64_t group;         // query heads per kv head
  int64_t block_queries; // queries per item
  int64_t query_blocks;
  int64_t max_rows;      // group * block_queries
  int64_t max_R;         // max_rows rounded up to whole vectors
  int64_t key_blocks;
  int64_t items;         // B * Hkv * query_blocks
  int64_t splits;        // key ranges per item
  int64_t state_floats;  // one RowState of max_R rows
  int64_t padded_dim;    // head_dim rounded up to whole vectors (narrow items)

  Plan(const Attention& p, int threads) {
    group = p.Hq / p.Hkv;
    block_queries = std::min(p.Lq, std::max<int64_t>(1, kItemRows / group));
    query_blocks = (p.Lq + block_queries - 1) / block_queries;
    max_rows = group * block_queries;
    max_R = round_up(max_rows, kLanes);
    key_blocks = (p.Lk + kKeyBlock - 1) / kKeyBlock;
    items = p.B * p.Hkv * query_blocks;
    // Few items (decoding): split each item's keys so that every thread has work; ranges of
    // at least 4 blocks keep the merge cheap.
    splits = 1;
    if (items < 2 * int64_t(threads)) {
      const int64_t wanted = (2 * int64_t(threads) + items - 1) / items;
      splits = std::max<int64_t>(1, std::min(wanted, key_blocks / 4));
    }
    state_floats = RowState::floats(max_R, p.G, p.D);
    padded_dim = round_up(p.D, kLanes);
  }
};

// One item's rows: the unpruned heads of its kv head times its queries, head-major.
struct ItemRows {
  int64_t b, kv_head, first_query, queries;
  int64_t rows, R;
  int64_t first_position, last_position;  // of its queries
};

ItemRows item_rows(const Attention& p, const Plan& plan, int64_t item, int64_t* row_head,
                   int64_t* row_query, int64_t* position) {
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
  int64_t rows = 0;
  for (int64_t g = 0; g < plan.group; ++g) {
    const int64_t h = it.kv_head * plan.group + g;
    if (p.pruned(h)) continue;
    for (int64_t i = 0; i < it.queries; ++i, ++rows) {
      row_head[rows] = h;
      row_query[rows] = it.first_query + i;
      position[rows] = it.first_position + i;
    }
  }
  it.rows = rows;
  it.R = round_up(rows, kLanes);
  for (int64_t r = rows; r < it.R; ++r) {  // padding rows: a copy of the last row's position
    row_head[r] = rows > 0 ? row_head[rows - 1] : 0;
    row_query[r] = 0;
    position[r] = it.last_position;
  }
  return it;
}

// Per-thread scratch, sized once per call.
struct Scratch {
  std::vector<float> storage;
  float *qT, *sT, *keys, *vals, *alpha, *block_sum, *shift, *new_max, *stat_sum, *state;
  float *q_rows, *o_rows;  // narrow items: [kNarrowRows][Dp]
  std::vector<int64_t> row_head, row_query, position, seen_list;
  std::vector<uint8_t> key_real, seen;

  Scratch(const Attention& p, const Plan& plan)
      : row_head(plan.max_R), row_query(plan.max_R), position(plan.max_R),
        seen_list(std::max<int64_t>(p.G, 1)), key_real(kKeyBlock), seen(std::max<int64_t>(p.G, 1)) {
    const int64_t R = plan.max_R, D = p.D, Dp = plan.padded_dim;
    const int64_t sizes[] = {D * R, kKeyBlock * R, kKeyBlock * Dp, kKeyBlock * Dp, R, R, R, R, R,
                             plan.state_floats, kNarrowRows * Dp, kNarrowRows * Dp};
    float** slots[] = {&qT, &sT, &keys, &vals, &alpha, &block_sum, &shift, &new_max, &stat_sum, &state,
                       &q_rows, &o_rows};
    int64_t total = 16;
    for (int64_t size : sizes) total += round_up(size, 16);
    storage.assign(total, 0.0f);
    // 64-byte aligned slots
    float* base = storage.data();
    base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); ++i) {
      *slots[i] = base;
      base += round_up(sizes[i], 16);
    }
  }
};

// Which key blocks an item needs, and which need an elementwise mask.
enum class BlockKind { Skip, Full, Masked };

BlockKind classify_block(const Attention& p, const ItemRows& it, int64_t j0, int64_t count,
                         int64_t sink_end, const uint8_t* real_row) {
  const int64_t j1 = j0 + count;  // keys [j0, j1)
  const int64_t first = it.first_position, last = it.last_position;
  if (p.causal && j0 > last) return BlockKind::Skip;
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
  const bool has_sinks = j0 < sink_end;
  if (!any_in_window && !has_sinks) return BlockKind::Skip;
  int64_t real = count;
  if (real_row != nullptr) {
    real = 0;
    for (int64_t c = 0; c < count; ++c) real += real_row[j0 + c] != 0;
    if (real == 0) return BlockKind::Skip;
  }
  const bool all_visible = real == count && (!p.causal || j1 - 1 <= first) &&
                           (all_in_window || j1 <= sink_end);
  return all_visible ? BlockKind::Full : BlockKind::Masked;
}

// count rows of D elements (row stride ld) as float32 rows of Dp >= D elements (zeros after
// D): the rows themselves when they are float32 and Dp = D, else converted into dst.
template <typename T>
FASTPROBE_ALWAYS_INLINE const float* block_rows(const void* base, int64_t first, int64_t ld,
                                                int64_t count, int64_t D, int64_t Dp, float* dst,
                                                int64_t& ld_out) {
  const T* src = static_cast<const T*>(base) + first;
  if (std::is_same_v<T, float> && Dp == D) {
    ld_out = ld;
    return reinterpret_cast<const float*>(src);
  }
  for (int64_t c = 0; c < count; ++c) {
    const T* row = src + c * ld;
    float* out = dst + c * Dp;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = to_float<T>(row[d]);
    for (int64_t d = D; d < Dp; ++d) out[d] = 0.0f;
  }
  ld_out = Dp;
  return dst;
}

// Writes the outputs of an item's pruned heads: out 0, lse -inf, masses and entropy 0.
template <typename T>
void write_pruned(const Attention& p, const Plan& plan, const ItemRows& it) {
  for (int64_t g = 0; g < plan.group; ++g) {
    const int64_t h = it.kv_head * plan.group + g;
    if (!p.pruned(h)) continue;
    for (int64_t i = it.first_query; i < it.first_query + it.queries; ++i) {
      T* out = static_cast<T*>(p.out) + it.b * p.o_s0 + h * p.o_s1 + i * p.o_s2;
      for (int64_t d = 0; d < p.D; ++d) out[d] = from_float<T>(0.0f);
      const int64_t at = (it.b * p.Hq + h) * p.Lq + i;
      p.lse[at] = kNegInf;
      p.sink_mass[at] = 0.0f;
      if (p.entropy != nullptr) p.entropy[at] = 0.0f;
      if (p.group_mass != nullptr)
        for (int64_t gi = 0; gi < p.G; ++gi) p.group_mass[at * p.G + gi] = 0.0f;
    }
  }
}

// Writes an item's outputs from its final state: out = O / l, lse = m + log l, the sums / l,
// entropy = log l - A / l; an empty row (l = 0) gets out 0, lse -inf, masses and entropy 0.
template <typename T>
void write_rows(const Attention& p, const ItemRows& it, const Scratch& ws, RowState st) {
  const int64_t R = it.R;
  for (int64_t r = 0; r < it.rows; ++r) {
    const int64_t h = ws.row_head[r], i = ws.row_query[r];
    T* out = static_cast<T*>(p.out) + it.b * p.o_s0 + h * p.o_s1 + i * p.o_s2;
    const int64_t at = (it.b * p.Hq + h) * p.Lq + i;
    const float l = st.l[r];
    const bool empty = l == 0.0f;
    const float inv_l = empty ? 0.0f : 1.0f / l;
    for (int64_t d = 0; d < p.D; ++d) out[d] = from_float<T>(st.oT[d * R + r] * inv_l);
    const float log_l = empty ? 0.0f : std::log(l);
    p.lse[at] = empty ? kNegInf : st.m[r] + log_l;
    p.sink_mass[at] = st.sink[r] * inv_l;
    if (p.entropy != nullptr) {
      const float h_row = empty ? 0.0f : log_l - st.a[r] * inv_l;
      p.entropy[at] = h_row < 0.0f ? 0.0f : h_row;  // rounding can leave -1e-7; NaN stays
    }
    if (p.group_mass != nullptr)
      for (int64_t g = 0; g < p.G; ++g) p.group_mass[at * p.G + g] = st.groups[g * R + r] * inv_l;
  }
}

// One item's key blocks [kb_begin, kb_end) folded into a fresh state in ws.state; returns
// the item's rows. with_sink_logit: the state starts from the sink logit (only one of the
// key ranges of an item does).
template <typename T>
ItemRows attend_item(const Attention& p, const Plan& plan, int64_t item, int64_t kb_begin,
                     int64_t kb_end, bool with_sink_logit, Scratch& ws) {
  const ItemRows it = item_rows(p, plan, item, ws.row_head.data(), ws.row_query.data(),
                                ws.position.data());
  if (it.rows == 0) return it;
  const int64_t R = it.R, D = p.D, G = p.G;
  const RowState st = RowState::over(ws.state, R, G);
  // narrow: lanes along head_dim (rows of Dp floats), else along rows (transposed, D floats)
  const bool narrow = it.rows <= kNarrowRows;
  const int64_t Dp = narrow ? plan.padded_dim : D;

  // scale q: q_rows [rows][Dp] (narrow) or qT [D][R] (padding rows 0)
  for (int64_t r = 0; r < R; ++r) {
    const T* q = static_cast<const T*>(p.q) + it.b * p.q_s0 + ws.row_head[r] * p.q_s1 +
                 ws.row_query[r] * p.q_s2;
    if (narrow) {
      if (r >= it.rows) break;
      for (int64_t d = 0; d < Dp; ++d) ws.q_rows[r * Dp + d] = d < D ? to_float<T>(q[d]) * p.scale : 0.0f;
    } else {
      for (int64_t d = 0; d < D; ++d) ws.qT[d * R + r] = r < it.rows ? to_float<T>(q[d]) * p.scale : 0.0f;
    }
  }
  // the state: m = c_h, l = 1 with a sink logit, else m = -inf, l = 0; sums 0
  for (int64_t r = 0; r < R; ++r) {
    const float c = with_sink_logit && p.sink_logit != nullptr ? p.sink_logit[ws.row_head[r]] : kNegInf;
    st.m[r] = c;
    st.l[r] = c == kNegInf ? 0.0f : 1.0f;
  }
  std::fill(st.a, st.a + R * (2 + G + D), 0.0f);  // a, sink, groups, oT
  if (narrow) std::fill(ws.o_rows, ws.o_rows + it.rows * Dp, 0.0f);
  std::fill(ws.seen.begin(), ws.seen.end(), uint8_t(0));
  int64_t seen_count = 0;

  const int64_t sink_end = p.clamped_end(p.sink_end, it.b);
  const int64_t stat_end = p.clamped_end(p.stat_end, it.b);
  const uint8_t* real_row = p.key_real != nullptr ? p.key_real + it.b * p.Lk : nullptr;
  const int32_t* group_row = p.key_groups != nullptr ? p.key_groups + it.b * p.Lk : nullptr;
  const MaskRule rule{p.causal, p.window, sink_end};
  const int64_t k_base = it.b * p.k_s0 + it.kv_head * p.k_s1;
  const int64_t v_base = it.b * p.v_s0 + it.kv_head * p.v_s1;

  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t j0 = kb * kKeyBlock;
    const int64_t count = std::min(kKeyBlock, p.Lk - j0);
    const BlockKind kind = classify_block(p, it, j0, count, sink_end, real_row);
    if (kind == BlockKind::Skip) continue;
    int64_t ldk, ldv;
    const float* keys = block_rows<T>(p.k, k_base + j0 * p.k_s2, p.k_s2, count, D, Dp, ws.keys, ldk);
    if (narrow)
      dots_block(ws.q_rows, it.rows, Dp, keys, ldk, count, ws.sT, R);
    else
      scores_block(ws.qT, R, D, keys, ldk, count, ws.sT);
    if (p.softcap > 0.0f) softcap_block(ws.sT, count * R, p.softcap);
    if (kind == BlockKind::Masked) {
      for (int64_t c = 0; c < count; ++c) ws.key_real[c] = real_row == nullptr || real_row[j0 + c];
      mask_block(ws.sT, R, count, j0, ws.key_real.data(), ws.position.data(), rule);
    }
    const int64_t stat_count = std::min(std::max(stat_end - j0, int64_t(0)), count);
    softmax_block(ws.sT, R, count, stat_count, p.entropy != nullptr, st, ws.alpha, ws.block_sum,
                  ws.shift, ws.new_max, ws.stat_sum);
    if (group_row != nullptr)
      groups_block(ws.sT, R, count, group_row + j0, ws.alpha, ws.block_sum, st.groups,
                   ws.seen.data(), ws.seen_list.data(), seen_count);
    const float* vals = block_rows<T>(p.v, v_base + j0 * p.v_s2, p.v_s2, count, D, Dp, ws.vals, ldv);
    if (narrow)
      axpys_block(ws.sT, R, it.rows, count, vals, ldv, ws.alpha, ws.o_rows, Dp);
    else
      values_block(ws.sT, R, count, vals, ldv, D, ws.alpha, st.oT);
  }
  if (narrow)  // the state keeps O transposed
    for (int64_t r = 0; r < it.rows; ++r)
      for (int64_t d = 0; d < D; ++d) st.oT[d * R + r] = ws.o_rows[r * Dp + d];
  return it;
}

// One item, whole: attend over all its keys and write its outputs.
template <typename T>
void run_item(const Attention& p, const Plan& plan, int64_t item, Scratch& ws) {
  const ItemRows it = attend_item<T>(p, plan, item, 0, plan.key_blocks, true, ws);
  write_pruned<T>(p, plan, it);
  if (it.rows > 0) write_rows<T>(p, it, ws, RowState::over(ws.state, it.R, p.G));
}

// One key range of an item, its state kept in `partial` for the merge.
template <typename T>
void run_item_range(const Attention& p, const Plan& plan, int64_t item, int64_t split,
                    float* partial, Scratch& ws) {
  const int64_t per_split = (plan.key_blocks + plan.splits - 1) / plan.splits;
  const int64_t kb_begin = std::min(split * per_split, plan.key_blocks);
  const int64_t kb_end = std::min(kb_begin + per_split, plan.key_blocks);
  const ItemRows it = attend_item<T>(p, plan, item, kb_begin, kb_end, split == 0, ws);
  if (split == 0) write_pruned<T>(p, plan, it);
  if (it.rows > 0)
    std::copy(ws.state, ws.state + RowState::floats(it.R, p.G, p.D), partial);
}

// Merges an item's key ranges and writes its outputs.
template <typename T>
void merge_item(const Attention& p, const Plan& plan, int64_t item, const float* partials,
                Scratch& ws) {
  const ItemRows it = item_rows(p, plan, item, ws.row_head.data(), ws.row_query.data(),
                                ws.position.data());
  if (it.rows == 0) return;
  const RowState st = RowState::over(ws.state, it.R, p.G);
  merge_states(partials, plan.splits, plan.state_floats, it.R, p.G, p.D, st, ws.alpha);
  write_rows<T>(p, it, ws, st);
}

// Entries per dtype, so that the loads and stores are compiled for each target.
struct Entries {
  void (*run)(const Attention&, const Plan&, int64_t, Scratch&);
  void (*run_range)(const Attention&, const Plan&, int64_t, int64_t, float*, Scratch&);
  void (*merge)(const Attention&, const Plan&, int64_t, const float*, Scratch&);
};

#define FASTPROBE_ATTENTION_ENTRIES(name, T)                                                      \
  FASTPROBE_SIMD_CLONES void run_##name(const Attention& p, const Plan& plan, int64_t item,     \
                                        Scratch& ws) {                                         \
    run_item<T>(p, plan, item, ws);                                                             \
  }                                                                                             \
  FASTPROBE_SIMD_CLONES void run_range_##name(const Attention& p, const Plan& plan, int64_t item, \
                                              int64_t split, float* partial, Scratch& ws) {    \
    run_item_range<T>(p, plan, item, split, partial, ws);                                       \
  }                                                                                             \
  FASTPROBE_SIMD_CLONES void merge_##name(const Attention& p, const Plan& plan, int64_t item,   \
                                          const float* partials, Scratch& ws) {                \
    merge_item<T>(p, plan, item, partials, ws);                                                 \
  }

FASTPROBE_ATTENTION_ENTRIES(float32, float)
FASTPROBE_ATTENTION_ENTRIES(bfloat16, bf16)
FASTPROBE_ATTENTION_ENTRIES(float16, fp16)

Entries entries_for(DType dtype) {
  switch (dtype) {
    case DType::Float32: return {run_float32, run_range_float32, merge_float32};
    case DType::BFloat16: return {run_bfloat16, run_range_bfloat16, merge_bfloat16};
    case DType::Float16: return {run_float16, run_range_float16, merge_float16};
  }
  throw std::invalid_argument("fastprobe._C: unsupported dtype");
}

// Runs body(i, scratch) for i < count over the threads. An exception (bad_alloc) is kept and
// rethrown after the parallel region, never let out of it; every thread still goes through
// the loop (its barrier), skipping the work once anything has failed.
template <typename Body>
void parallel_items(int threads, int64_t count, const Attention& p, const Plan& plan, Body body) {
  std::exception_ptr error = nullptr;
  std::atomic<bool> failed{false};
  auto keep = [&]() {
#ifdef FASTPROBE_OPENMP
#pragma omp critical(fastprobe_attention_error)
#endif
    if (!error) error = std::current_exception();
    failed.store(true, std::memory_order_relaxed);
  };
#pragma omp parallel num_threads(threads)
  {
    std::unique_ptr<Scratch> ws;
    try {
      ws = std::make_unique<Scratch>(p, plan);
    } catch (...) {
      keep();
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < count; ++i) {
      if (ws == nullptr || failed.load(std::memory_order_relaxed)) continue;
      try {
        body(i, *ws);
      } catch (...) {
        keep();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

[[noreturn]] void invalid(const std::string& what) {
  throw std::invalid_argument("fastprobe._C.sink_attention: " + what);
}

void check_groups(const int32_t* key_groups, int64_t count, int64_t G, int64_t Lk) {
  for (int64_t n = 0; n < count; ++n)
    if (key_groups[n] < 0 || key_groups[n] >= G)
      throw std::out_of_range("fastprobe._C.sink_attention: key_groups[" + std::to_string(n / Lk) +
                              ", " + std::to_string(n % Lk) + "] = " + std::to_string(key_groups[n]) +
                              " is outside [0, " + std::to_string(G) + ")");
}

void sink_attention(const std::string& dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                    int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t num_queries,
                    int64_t num_keys, int64_t head_dim, int64_t q_s0, int64_t q_s1, int64_t q_s2,
                    int64_t q_s3, int64_t k_s0, int64_t k_s1, int64_t k_s2, int64_t k_s3,
                    int64_t v_s0, int64_t v_s1, int64_t v_s2, int64_t v_s3, int64_t out_s0,
                    int64_t out_s1, int64_t out_s2, int64_t out_s3, double scale, bool causal,
                    int64_t window, uintptr_t key_real, uintptr_t sink_end, uintptr_t stat_end,
                    uintptr_t head_mask, uintptr_t sink_logit, uintptr_t key_groups,
                    int64_t num_groups, uintptr_t lse, uintptr_t sink_mass, uintptr_t group_mass,
                    uintptr_t entropy, int64_t num_threads, double softcap) {
  const DType type = parse_dtype(dtype);
  check_size(batch, 0, "batch");
  check_size(num_heads, 1, "num_heads");
  check_size(num_kv_heads, 1, "num_kv_heads");
  check_size(num_queries, 0, "num_queries");
  check_size(num_keys, 0, "num_keys");
  check_size(head_dim, 1, "head_dim");
  check_size(window, 0, "window");
  check_size(num_groups, 0, "num_groups");
  const int threads = clamp_threads(num_threads);
  if (num_heads % num_kv_heads != 0)
    invalid("num_heads (" + std::to_string(num_heads) + ") must be a multiple of num_kv_heads (" +
            std::to_string(num_kv_heads) + ")");
  if (num_queries > num_keys)
    invalid("num_queries (" + std::to_string(num_queries) + ") must be <= num_keys (" +
            std::to_string(num_keys) + ")");
  if (q_s3 != 1 || k_s3 != 1 || v_s3 != 1 || out_s3 != 1)
    invalid("the last (head_dim) stride of q, k, v and out must be 1");
  const float scale_f = float(scale);
  if (!(scale_f > 0.0f && std::isfinite(scale_f))) invalid("scale must be finite and > 0 in float32");
  const float softcap_f = float(softcap);
  if (!(softcap_f >= 0.0f && std::isfinite(softcap_f)) || (softcap > 0.0 && softcap_f == 0.0f))
    invalid("softcap must be 0 (none) or finite and > 0 in float32");
  if (num_groups > std::numeric_limits<int32_t>::max())
    invalid("num_groups must fit the int32 group ids, got " + std::to_string(num_groups));
  if ((key_groups != 0) != (num_groups > 0))
    invalid("key_groups and num_groups > 0 go together (num_groups is 0 without key_groups)");
  if (batch == 0 || num_queries == 0) return;  // empty outputs may come with null data pointers

  const Attention p{pointer<const void>(q, true, "q"),
                    pointer<const void>(k, true, "k"),
                    pointer<const void>(v, true, "v"),
                    pointer<void>(out, true, "out"),
                    batch, num_heads, num_kv_heads, num_queries, num_keys, head_dim,
                    q_s0, q_s1, q_s2, k_s0, k_s1, k_s2, v_s0, v_s1, v_s2, out_s0, out_s1, out_s2,
                    scale_f, softcap_f, causal,
                    window >= num_keys ? 0 : window,  // a window of Lk keys or more hides nothing
                    pointer<const uint8_t>(key_real, false, "key_real"),
                    pointer<const int64_t>(sink_end, true, "sink_end"),
                    pointer<const int64_t>(stat_end, true, "stat_end"),
                    pointer<const uint8_t>(head_mask, false, "head_mask"),
                    pointer<const float>(sink_logit, false, "sink_logit"),
                    pointer<const int32_t>(key_groups, false, "key_groups"),
                    num_groups,
                    pointer<float>(lse, true, "lse"),
                    pointer<float>(sink_mass, true, "sink_mass"),
                    pointer<float>(group_mass, key_groups != 0, "group_mass"),
                    pointer<float>(entropy, false, "entropy")};
  if (p.key_groups == nullptr && group_mass != 0) invalid("group_mass is given without key_groups");
  if (p.key_groups != nullptr) check_groups(p.key_groups, batch * num_keys, num_groups, num_keys);

  const Plan plan(p, threads);
  const Entries run = entries_for(type);
  if (plan.splits == 1) {
    parallel_items(threads, plan.items, p, plan,
                   [&](int64_t item, Scratch& ws) { run.run(p, plan, item, ws); });
    return;
  }
  std::vector<float> partials(size_t(plan.items * plan.splits * plan.state_floats));
  parallel_items(threads, plan.items * plan.splits, p, plan, [&](int64_t unit, Scratch& ws) {
    run.run_range(p, plan, unit / plan.splits, unit % plan.splits,
                  partials.data() + unit * plan.state_floats, ws);
  });
  parallel_items(threads, plan.items, p, plan, [&](int64_t item, Scratch& ws) {
    run.merge(p, plan, item, partials.data() + item * plan.splits * plan.state_floats, ws);
  });
}

}  // namespace

void bind_attention(py::module_& m) {
  m.def("sink_attention", &sink_attention, py::call_guard<py::gil_scoped_release>(),
        "Attention with sink keys, a window, head masks and a sink logit, and its statistics\n"
        "(see fastprobe.reference.sink_attention). Pointers are data_ptr() values, sizes and\n"
        "strides (in elements, the last one 1) int64: q [B, Hq, Lq, D], k and v [B, Hkv, Lk, D],\n"
        "out [B, Hq, Lq, D] (any strides), all of `dtype`. key_real uint8 [B, Lk] (0: all real),\n"
        "sink_end and stat_end int64 [B] (real keys below them are sinks / count in sink_mass),\n"
        "head_mask uint8 [Hq] (0: none), sink_logit float32 [Hq] (0: none), key_groups int32\n"
        "[B, Lk] in [0, num_groups) (0: none; checked, IndexError). Writes lse and sink_mass\n"
        "[B, Hq, Lq], group_mass [B, Hq, Lq, G] (with key_groups) and entropy [B, Hq, Lq]\n"
        "(0: skipped), float32 and contiguous. softcap > 0 caps the scores: s = softcap\n"
        "tanh(s / softcap) (0: none).",
        py::arg("dtype"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("batch"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("num_queries"),
        py::arg("num_keys"), py::arg("head_dim"), py::arg("q_s0"), py::arg("q_s1"),
        py::arg("q_s2"), py::arg("q_s3"), py::arg("k_s0"), py::arg("k_s1"), py::arg("k_s2"),
        py::arg("k_s3"), py::arg("v_s0"), py::arg("v_s1"), py::arg("v_s2"), py::arg("v_s3"),
        py::arg("out_s0"), py::arg("out_s1"), py::arg("out_s2"), py::arg("out_s3"),
        py::arg("scale"), py::arg("causal"), py::arg("window"), py::arg("key_real"),
        py::arg("sink_end"), py::arg("stat_end"), py::arg("head_mask"), py::arg("sink_logit"),
        py::arg("key_groups"), py::arg("num_groups"), py::arg("lse"), py::arg("sink_mass"),
        py::arg("group_mass"), py::arg("entropy"), py::arg("num_threads"), py::arg("softcap") = 0.0);
}

}  // namespace fastprobe
