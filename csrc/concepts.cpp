// concept_mass: probability mass of concepts (sets of variant token ids) per row of
// logits, and its gradient (the math of fastprobe.reference.concept_mass).
//
// Per row n, with y_v = z[n, v] / T, lse = log sum_v exp(y_v) and, per concept c,
// m_c = max_{v in c} y_v, s_c = sum_{v in c} exp(y_v - m_c), lse_c = m_c + log s_c:
//   log_mass = lse_c - lse = (m_c - M) + (log s_c - log S)    mass = exp(log_mass)
//     (M, S: the row's max and sum of the lse; no large lse values are subtracted)
//   top_share = exp(m_c - lse_c) = 1 / s_c
//   concentration_entropy = -sum_{v in c} q_v log q_v, q_v = exp(y_v - lse_c)
//                         = log s_c - (sum_{v in c} e_v d_v) / s_c,  d_v = y_v - m_c, e_v = exp(d_v)
//   top_token = argmax_{v in c} y_v (first in concept order on ties)
// A concept whose variants are all -inf gets mass 0, log_mass -inf, top_share 0,
// concentration_entropy 0 and top_token its first variant.
//
// Backward, with g[n, c] the gradient of log_mass and coef[n] = h[n] - sum_c g[n, c]:
//   grad[n, v] = (coef p_v + sum_{c contains v} g[n, c] q_cv) / T
// with log p_v = (x_v - M) / T - log S from the forward's row state (M and log S kept apart: the
// double lse = M / T + log S holds log S only to |M / T| 2^-53, which gave p = 1, not 1/2, for a
// max tied at |M / T| = 1e17), and q_cv = p_v / mass_c from the concept's own largest variant, as
// in the forward: log q_cv = (x_v - x_top) / T - log s_c, x_top = x[top_token], log s_c = -log
// top_share (exact however far the concept lies below the row's max).
//
// Work: each row's vocabulary is taken in ranges of kRange logits (common.h), its concepts (in
// the backward, its concept tokens) in chunks of at most kChunk. Forward: each range folds into a
// fresh online log-sum-exp (contiguous float32 read in place, other rows converted block by
// block), merged in range order; then each chunk gathers its variants' logits and forms its
// concepts' statistics, the exp and log vectorised across the chunk. Backward: each range writes
// coef p_v / T for its v; then each chunk overwrites its concept tokens with their totals, read
// from the incidence by vocabulary id (the CSR transpose). A thread takes whole rows, or with few
// rows (decoding: one row a call; split_rows in common.h) the ranges and chunks of a row run on
// different threads. A row's results are the same bits either way.
//
// Every index read from the concept arrays is checked before any row is processed: the
// kernels never read or write outside their buffers, whatever the caller passed.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace py = pybind11;

namespace fastprobe {
namespace {

// ---- The concept-token incidence, checked once per call. ------------------------

// CSR by concept: concept c owns token_ids[offsets[c]:offsets[c + 1]].
struct ByConcept {
  const int64_t* token_ids;  // [T]
  const int64_t* offsets;    // [C + 1]
  int64_t T, C;
};

// The transpose, by vocabulary id: id ids[u] belongs to concepts[offsets[u]:offsets[u + 1]].
struct ByToken {
  const int64_t* ids;       // [U]
  const int64_t* offsets;   // [U + 1]
  const int64_t* concepts;  // [M]
  int64_t U, M;
};

[[noreturn]] void out_of_range(const std::string& what) {
  throw std::out_of_range("fastprobe._C.concept_mass: " + what);
}

// offsets[0..count] rises from 0 to `total`, each step at least `min_length`; returns the
// longest step. Each entry is checked to lie in [offsets[i], total] before a difference is taken,
// so no subtraction overflows (entries near -2^63 and 2^63 once wrapped into steps that passed).
int64_t check_offsets(const int64_t* offsets, int64_t count, int64_t total, int64_t min_length, const char* name) {
  if (offsets[0] != 0 || offsets[count] != total)
    out_of_range(std::string(name) + " must go from 0 to " + std::to_string(total));
  int64_t longest = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t next = offsets[i + 1];  // offsets[i] is in [0, total]: checked a step before
    const char* wrong = next < offsets[i]                ? " decreases"
                        : next > total                   ? " goes past the end"
                        : next - offsets[i] < min_length ? " has an empty entry"
                                                         : nullptr;
    if (wrong != nullptr) out_of_range(std::string(name) + wrong + " at " + std::to_string(i));
    longest = std::max(longest, next - offsets[i]);
  }
  return longest;
}

void check_ids(const int64_t* values, int64_t count, int64_t limit, const char* name) {
  for (int64_t i = 0; i < count; ++i)
    if (values[i] < 0 || values[i] >= limit)
      out_of_range(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(values[i]) +
                   " is outside [0, " + std::to_string(limit) + ")");
}

// ---- Reading and writing the logits' dtype, picked once per call. -----------------

// out[i] = float(base[first + ids[i] * stride]) for i < count.
using GatherFn = void (*)(const void* base, int64_t first, int64_t stride, const int64_t* ids, int64_t count,
                          float* out);
// base[first + ids[i]] = T(in[i]) for i < count.
using ScatterFn = void (*)(const float* in, const int64_t* ids, int64_t count, void* base, int64_t first);

template <typename T>
void gather(const void* base, int64_t first, int64_t stride, const int64_t* ids, int64_t count, float* out) {
  const T* row = static_cast<const T*>(base) + first;
  for (int64_t i = 0; i < count; ++i) out[i] = to_float<T>(row[ids[i] * stride]);
}

template <typename T>
void scatter(const float* in, const int64_t* ids, int64_t count, void* base, int64_t first) {
  T* row = static_cast<T*>(base) + first;
  for (int64_t i = 0; i < count; ++i) row[ids[i]] = from_float<T>(in[i]);
}

struct DTypeIo {
  RowReader rows;  // float32 rows with a unit stride are read in place
  GatherFn gather;
  StoreFn store;  // nullptr for float32: grads are written in place
  ScatterFn scatter;
};

template <typename T>
DTypeIo io_of(DType type) {
  return {RowReader::of(type), gather<T>, storer_for(type), scatter<T>};
}

DTypeIo io_for(const std::string& dtype) {
  const DType type = parse_dtype(dtype);
  switch (type) {
    case DType::Float32: return io_of<float>(type);
    case DType::BFloat16: return io_of<bf16>(type);
    case DType::Float16: return io_of<fp16>(type);
  }
  throw std::invalid_argument("fastprobe._C: unsupported dtype");
}

// ---- Splitting a row's work. --------------------------------------------------------

// Item c owns members [offsets[c], offsets[c + 1]) (concepts and their variants; vocabulary
// ids and their memberships). Returns chunk starts 0 = s_0 < ... < s_k = count: a chunk holds
// at most kChunk items and at most max(kChunk, longest) members.
constexpr int64_t kChunk = 2048;

std::vector<int64_t> chunk_starts(const int64_t* offsets, int64_t count) {
  std::vector<int64_t> starts{0};
  for (int64_t c = 0; c < count; ++c) {
    const int64_t first = starts.back();
    if (c > first && (c - first == kChunk || offsets[c + 1] - offsets[first] > kChunk)) starts.push_back(c);
  }
  starts.push_back(count);
  return starts;
}

// ---- Forward. ----------------------------------------------------------------------

struct Forward {
  DTypeIo io;
  const void* logits;  // [N, V], any strides
  int64_t N, V, stride_n, stride_v;
  ByConcept concepts;
  float inv_temperature;
  float* mass;         // [N, C] each, contiguous
  float* log_mass;
  float* top_share;
  float* entropy;
  int64_t* top_token;
  double* lse;         // [N] M / T + log S (double: M / T is exact in it at any magnitude)
  float* row_state;    // [2, N] M, then log S: the backward's log p, kept apart
};

// Per-thread scratch: one block of a row; a chunk's variants (their logits, then d_v and
// e_v d_v; e_v) and concepts (x_top, s_c, sum e_v d_v).
struct ForwardScratch {
  explicit ForwardScratch(int64_t members)
      : block(scratch_floats(kBlock)), d(scratch_floats(members)), e(scratch_floats(members)),
        x_top(scratch_floats(kChunk)), sum_e(scratch_floats(kChunk)), sum_e_d(scratch_floats(kChunk)) {}
  std::vector<float> block, d, e, x_top, sum_e, sum_e_d;
};

// Range `range` of row n folded into a fresh online log-sum-exp of y = x / T: max is the largest
// raw logit (so x - max stays exact), sum = sum_v exp((x_v - max) / T).
LseState range_lse(const Forward& f, int64_t n, int64_t range, float* block) {
  LseState state;
  for_blocks(f.V, range, [&](int64_t v0, int64_t count) {
    lse_block(state, f.io.rows.block(f.logits, n * f.stride_n + v0 * f.stride_v, f.stride_v, count, block), count,
              f.inv_temperature);
  });
  return state;
}

// Statistics of concepts [c0, c1) of row n, from the row's log-sum-exp.
FASTPROBE_SIMD_CLONES void concept_chunk(const Forward& f, int64_t n, int64_t c0, int64_t c1, const LseState& row,
                                         ForwardScratch& ws) {
  const ByConcept& cs = f.concepts;
  const int64_t* offsets = cs.offsets + c0;
  const int64_t t0 = offsets[0], tokens = cs.offsets[c1] - t0, count = c1 - c0;
  const int64_t* ids = cs.token_ids + t0;
  float* d = ws.d.data();
  float* e = ws.e.data();
  float* x_top = ws.x_top.data();
  f.io.gather(f.logits, n * f.stride_n, f.stride_v, ids, tokens, d);  // x_v
  const float inv_t = f.inv_temperature;
  // each concept's first largest variant (m_c = x_top / T), and d_v = (x_v - x_top) / T <= 0
  for (int64_t c = 0; c < count; ++c) {
    const int64_t first = offsets[c] - t0, last = offsets[c + 1] - t0;
    int64_t top = first;
    float largest = d[first];
    for (int64_t t = first + 1; t < last; ++t) {  // (selects, not branches: random logits mispredict)
      const bool larger = d[t] > largest;
      largest = larger ? d[t] : largest;
      top = larger ? t : top;
    }
    x_top[c] = largest;
    f.top_token[n * cs.C + c0 + c] = ids[top];
    for (int64_t t = first; t < last; ++t) d[t] = (d[t] - x_top[c]) * inv_t;
  }
  // e_v = exp(d_v) and e_v d_v (0 log 0 = 0); NaN where the concept is all -inf (not used)
#pragma omp simd
  for (int64_t t = 0; t < tokens; ++t) {
    e[t] = fast_exp(d[t]);
    d[t] = e[t] > 0.0f ? e[t] * d[t] : 0.0f;
  }
  for (int64_t c = 0; c < count; ++c) {  // s_c = sum e_v, sum e_v d_v
    float s = 0.0f, e_d = 0.0f;
    for (int64_t t = offsets[c] - t0; t < offsets[c + 1] - t0; ++t) {
      s += e[t];
      e_d += d[t];
    }
    ws.sum_e[c] = s;
    ws.sum_e_d[c] = e_d;
  }
  const float log_row_sum = std::log(row.sum);
  const LogSoftmax top = LogSoftmax::make(row.max, inv_t, 0.0f);  // (x_top - max) / T
  const int64_t at = n * cs.C + c0;
#pragma omp simd
  for (int64_t c = 0; c < count; ++c) {
    const float s = ws.sum_e[c];  // >= 1, or NaN
    const float log_s = s == s ? fast_log(s) : s;
    const float log_mass = log_prob(top, x_top[c]) + (log_s - log_row_sum);
    const bool masked = x_top[c] == kNegInf;  // every variant -inf
    f.log_mass[at + c] = masked ? kNegInf : log_mass;
    f.mass[at + c] = masked ? 0.0f : fast_exp(log_mass);
    f.top_share[at + c] = masked ? 0.0f : 1.0f / s;
    f.entropy[at + c] = masked ? 0.0f : log_s - ws.sum_e_d[c] / s;
  }
  for (int64_t c = 0; c < count; ++c)  // fast_exp flushes below -87: the subnormal masses from exp
    if (f.log_mass[at + c] < -87.0f) f.mass[at + c] = std::exp(f.log_mass[at + c]);
}

// ---- Backward. ---------------------------------------------------------------------

struct Backward {
  DTypeIo io;
  const void* logits;  // [N, V], any strides
  int64_t N, V, stride_n, stride_v;
  ByToken tokens;
  int64_t C;
  const float* top_share;      // [N, C]  1 / s_c (0: every variant masked)
  const int64_t* top_token;    // [N, C]  the concept's largest variant (ids checked < V)
  const float* row_state;      // [2, N]  the forward's M, then log S
  const float* grad_concept;   // [N, C]  g = d loss / d log_mass
  const float* coef;           // [N]     h - sum_c g[n, c]
  float inv_temperature;
  void* grad;                  // [N, V] contiguous, the logits' dtype
};

// Per-thread scratch: a block of a row in and out; a chunk's ids (their logits x_u, then their
// totals) and memberships (their exponents and weights).
struct BackwardScratch {
  explicit BackwardScratch(int64_t members)
      : block(scratch_floats(kBlock)), out(scratch_floats(kBlock)), x(scratch_floats(kChunk)),
        arg(scratch_floats(members)), weight(scratch_floats(members)) {}
  std::vector<float> block, out, x, arg, weight;
};

// log p_v = (x_v - M) / T - log S of row n: exact near the row's max at any magnitude (y_v - lse
// in float32 would lose 1e-3 relative at logits ~1e4; the double lse, log S from |M / T| ~ 1e17)
LogSoftmax row_log_softmax(const Backward& b, int64_t n) {
  return LogSoftmax::make(b.row_state[n], b.inv_temperature, b.row_state[b.N + n]);
}

// Range `range` of row n: grad_v = coef p_v / T.
FASTPROBE_SIMD_CLONES void grad_range(const Backward& b, int64_t n, int64_t range, BackwardScratch& ws) {
  const LogSoftmax log_p = row_log_softmax(b, n);
  const float scale = b.coef[n] * b.inv_temperature;
  // (for_blocks' loop written out: in a multi-versioned kernel its lambda is compiled for the
  // clone's target only if GCC inlines it, and for_blocks is not forced inline: bridge_loss's
  // range loops ran ~3% slower forced)
  for (int64_t v0 = range * kRange; v0 < range_end(b.V, range); v0 += kBlock) {
    const int64_t count = block_size(b.V, v0);
    const float* x = b.io.rows.block(b.logits, n * b.stride_n + v0 * b.stride_v, b.stride_v, count, ws.block.data());
    float* out = b.io.store == nullptr ? static_cast<float*>(b.grad) + n * b.V + v0 : ws.out.data();
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) out[i] = scale * fast_exp(log_prob(log_p, x[i]));
    if (b.io.store != nullptr) b.io.store(out, count, b.grad, n * b.V + v0);
  }
}

// Row n's concepts: x_top[c] (the logit of the largest variant) and log_share[c] = log top_share
// = -log s_c (-inf where every variant is masked: q = 0).
FASTPROBE_SIMD_CLONES void concept_tops(const Backward& b, int64_t n, float* x_top, float* log_share) {
  b.io.gather(b.logits, n * b.stride_n, b.stride_v, b.top_token + n * b.C, b.C, x_top);
  const float* top_share = b.top_share + n * b.C;
#pragma omp simd
  for (int64_t c = 0; c < b.C; ++c) log_share[c] = top_share[c] > 0.0f ? fast_log(top_share[c]) : kNegInf;
}

// Concept tokens u in [u0, u1) of row n: grad_v = (coef p_v + sum_{c contains v} g_c q_cv) / T.
FASTPROBE_SIMD_CLONES void grad_chunk(const Backward& b, int64_t n, int64_t u0, int64_t u1, const float* x_top,
                                      const float* log_share, BackwardScratch& ws) {
  const ByToken& ts = b.tokens;
  const int64_t count = u1 - u0, j0 = ts.offsets[u0], members = ts.offsets[u1] - j0;
  const float inv_t = b.inv_temperature;
  const float* g = b.grad_concept + n * b.C;
  float* x = ws.x.data();
  float* arg = ws.arg.data();
  float* weight = ws.weight.data();
  b.io.gather(b.logits, n * b.stride_n, b.stride_v, ts.ids + u0, count, x);  // x_u
  // membership j of id u in concept c: g_c q_cv = g_c exp((x_u - x_top) / T + log top_share)
  for (int64_t u = 0; u < count; ++u)
    for (int64_t j = ts.offsets[u0 + u] - j0; j < ts.offsets[u0 + u + 1] - j0; ++j) {
      const int64_t c = ts.concepts[j0 + j];
      const bool masked = log_share[c] == kNegInf;
      arg[j] = masked ? kNegInf : (x[u] - x_top[c]) * inv_t + log_share[c];
      weight[j] = masked ? 0.0f : g[c];
    }
#pragma omp simd
  for (int64_t j = 0; j < members; ++j) arg[j] = weight[j] * fast_exp(arg[j]);
  const LogSoftmax log_p = row_log_softmax(b, n);
  const float coef = b.coef[n];
#pragma omp simd
  for (int64_t u = 0; u < count; ++u) x[u] = coef * fast_exp(log_prob(log_p, x[u]));  // coef p_v
  // an id's sum in double: an id in thousands of concepts (a common first token) adds thousands of
  // terms of either sign, whose float32 sum would lose ~1e-4 of their size
  for (int64_t u = 0; u < count; ++u) {
    double total = x[u];
    for (int64_t j = ts.offsets[u0 + u] - j0; j < ts.offsets[u0 + u + 1] - j0; ++j) total += arg[j];
    x[u] = float(total * inv_t);
  }
  b.io.scatter(x, ts.ids + u0, count, b.grad, n * b.V);
}

void concept_mass(const std::string& dtype, uintptr_t logits_ptr, int64_t N, int64_t V,
                  int64_t stride_n, int64_t stride_v, uintptr_t token_ids_ptr, int64_t T,
                  uintptr_t offsets_ptr, int64_t C, double inv_temperature, uintptr_t mass_ptr,
                  uintptr_t log_mass_ptr, uintptr_t top_share_ptr, uintptr_t entropy_ptr,
                  uintptr_t top_token_ptr, uintptr_t lse_ptr, uintptr_t row_state_ptr, int64_t num_threads) {
  check_size(N, 0, "N");
  check_size(V, 1, "V");
  check_size(C, 1, "C");
  check_size(T, 1, "T");
  const int threads = clamp_threads(num_threads);
  const float inv_t = checked_inv_temperature(inv_temperature);
  check_layout("logits", {N, V}, {stride_n, stride_v});
  check_layout("outputs", {N, C});
  const DTypeIo io = io_for(dtype);
  const uintptr_t logits_alignment = element_size(parse_dtype(dtype));  // (the gradient's too)
  if (N == 0) return;  // empty outputs may come with null data pointers
  const ByConcept concepts{pointer<const int64_t>(token_ids_ptr, true, "token_ids"),
                           pointer<const int64_t>(offsets_ptr, true, "offsets"), T, C};
  const int64_t longest = check_offsets(concepts.offsets, C, T, 1, "offsets");
  check_ids(concepts.token_ids, T, V, "token_ids");
  const Forward f{io, pointer<const void>(logits_ptr, true, "logits", logits_alignment), N, V, stride_n, stride_v,
                  concepts, inv_t,
                  pointer<float>(mass_ptr, true, "mass"), pointer<float>(log_mass_ptr, true, "log_mass"),
                  pointer<float>(top_share_ptr, true, "top_share"), pointer<float>(entropy_ptr, true, "entropy"),
                  pointer<int64_t>(top_token_ptr, true, "top_token"), pointer<double>(lse_ptr, true, "lse"),
                  pointer<float>(row_state_ptr, true, "row_state")};

  const std::vector<int64_t> chunks = chunk_starts(concepts.offsets, C);
  const int64_t ranges = range_count(V), slots = row_slots(N, threads);
  std::vector<LseState> range_parts(static_cast<size_t>(slots * ranges)), row_states(static_cast<size_t>(slots));
  run_rows(
      N, threads, double(N) * double(V), [&] { return ForwardScratch(std::max(kChunk, longest)); },
      each_part(ranges,
                [&](int64_t n, int64_t range, int64_t slot, ForwardScratch& ws) {
                  range_parts[slot * ranges + range] = range_lse(f, n, range, ws.block.data());
                }),
      each_row([&](int64_t n, int64_t slot, ForwardScratch&) {  // the ranges merged in order
        LseState state = range_parts[slot * ranges];
        for (int64_t range = 1; range < ranges; ++range) merge_lse(state, range_parts[slot * ranges + range], inv_t);
        row_states[slot] = state;
        f.lse[n] = state.value(inv_t);
        f.row_state[n] = state.max;
        f.row_state[N + n] = std::log(state.sum);
      }),
      each_part(int64_t(chunks.size()) - 1, [&](int64_t n, int64_t chunk, int64_t slot, ForwardScratch& ws) {
        concept_chunk(f, n, chunks[chunk], chunks[chunk + 1], row_states[slot], ws);
      }));
}

void concept_mass_backward(const std::string& dtype, uintptr_t logits_ptr, int64_t N, int64_t V,
                           int64_t stride_n, int64_t stride_v, uintptr_t vocab_ids_ptr, int64_t U,
                           uintptr_t vocab_offsets_ptr, uintptr_t vocab_concepts_ptr, int64_t M,
                           int64_t C, uintptr_t top_share_ptr, uintptr_t top_token_ptr, uintptr_t row_state_ptr,
                           uintptr_t grad_concept_ptr, uintptr_t coef_ptr, double inv_temperature,
                           uintptr_t grad_ptr, int64_t num_threads) {
  check_size(N, 0, "N");
  check_size(V, 1, "V");
  check_size(U, 1, "U");
  check_size(M, 1, "M");
  check_size(C, 1, "C");
  const int threads = clamp_threads(num_threads);
  const float inv_t = checked_inv_temperature(inv_temperature);
  check_layout("logits", {N, V}, {stride_n, stride_v});
  check_layout("grad", {N, V});
  check_layout("top_token", {N, C});
  const DTypeIo io = io_for(dtype);
  const uintptr_t logits_alignment = element_size(parse_dtype(dtype));  // (the gradient's too)
  if (N == 0) return;
  const ByToken tokens{pointer<const int64_t>(vocab_ids_ptr, true, "vocab_ids"),
                       pointer<const int64_t>(vocab_offsets_ptr, true, "vocab_offsets"),
                       pointer<const int64_t>(vocab_concepts_ptr, true, "vocab_concepts"), U, M};
  const int64_t longest = check_offsets(tokens.offsets, U, M, 0, "vocab_offsets");
  check_ids(tokens.ids, U, V, "vocab_ids");
  check_ids(tokens.concepts, M, C, "vocab_concepts");
  const int64_t* top_token = pointer<const int64_t>(top_token_ptr, true, "top_token");
  check_ids(top_token, N * C, V, "top_token");
  const Backward b{io, pointer<const void>(logits_ptr, true, "logits", logits_alignment), N, V, stride_n, stride_v,
                   tokens, C,
                   pointer<const float>(top_share_ptr, true, "top_share"), top_token,
                   pointer<const float>(row_state_ptr, true, "row_state"),
                   pointer<const float>(grad_concept_ptr, true, "grad_concept"),
                   pointer<const float>(coef_ptr, true, "coef"), inv_t,
                   pointer<void>(grad_ptr, true, "grad", logits_alignment)};

  const std::vector<int64_t> chunks = chunk_starts(tokens.offsets, U);
  const int64_t slots = row_slots(N, threads);
  std::vector<float> tops = scratch_floats(slots * 2 * C);  // per slot: x_top [C], then log_share [C]
  run_rows(
      N, threads, double(N) * double(V), [&] { return BackwardScratch(std::max(kChunk, longest)); },
      each_part(range_count(V), [&](int64_t n, int64_t range, int64_t, BackwardScratch& ws) { grad_range(b, n, range, ws); }),
      each_row([&](int64_t n, int64_t slot, BackwardScratch&) {
        concept_tops(b, n, tops.data() + slot * 2 * C, tops.data() + (slot * 2 + 1) * C);
      }),
      each_part(int64_t(chunks.size()) - 1, [&](int64_t n, int64_t chunk, int64_t slot, BackwardScratch& ws) {
        grad_chunk(b, n, chunks[chunk], chunks[chunk + 1], tops.data() + slot * 2 * C,
                   tops.data() + (slot * 2 + 1) * C, ws);
      }));
}

}  // namespace

void bind_concepts(py::module_& m) {
  m.def("concept_mass", &concept_mass, py::call_guard<py::gil_scoped_release>(),
        "Concept statistics per row (see fastprobe.reference.concept_mass). Pointers are\n"
        "data_ptr() values, strides in elements; token_ids [T] and offsets [C + 1] int64 are\n"
        "checked (IndexError) before any row is read; writes mass, log_mass, top_share,\n"
        "entropy [N, C] float32, top_token [N, C] int64, lse [N] float64 and row_state [2, N]\n"
        "float32 (each row's largest logit M, then log S: lse = M / T + log S), all contiguous.",
        py::arg("dtype"), py::arg("logits_ptr"), py::arg("N"), py::arg("V"), py::arg("stride_n"),
        py::arg("stride_v"), py::arg("token_ids_ptr"), py::arg("T"), py::arg("offsets_ptr"),
        py::arg("C"), py::arg("inv_temperature"), py::arg("mass_ptr"), py::arg("log_mass_ptr"),
        py::arg("top_share_ptr"), py::arg("entropy_ptr"), py::arg("top_token_ptr"),
        py::arg("lse_ptr"), py::arg("row_state_ptr"), py::arg("num_threads"));
  m.def("concept_mass_backward", &concept_mass_backward, py::call_guard<py::gil_scoped_release>(),
        "Gradient of (log_mass, lse) w.r.t. the logits: grad [N, V] (contiguous, the logits'\n"
        "dtype) = (coef p + sum_{c contains v} g_c q_cv) / T, log p = (x - M) / T - log S from\n"
        "the forward's row_state [2, N] float32 (M and log S).\n"
        "vocab_ids [U], vocab_offsets [U + 1], vocab_concepts [M] int64 (the incidence by\n"
        "vocabulary id) and top_token [N, C] int64 are checked first; top_share [N, C] float32.",
        py::arg("dtype"), py::arg("logits_ptr"), py::arg("N"), py::arg("V"), py::arg("stride_n"),
        py::arg("stride_v"), py::arg("vocab_ids_ptr"), py::arg("U"), py::arg("vocab_offsets_ptr"),
        py::arg("vocab_concepts_ptr"), py::arg("M"), py::arg("C"), py::arg("top_share_ptr"),
        py::arg("top_token_ptr"), py::arg("row_state_ptr"), py::arg("grad_concept_ptr"), py::arg("coef_ptr"),
        py::arg("inv_temperature"), py::arg("grad_ptr"), py::arg("num_threads"));
}

}  // namespace fastprobe
