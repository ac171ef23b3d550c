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
// Forward: rows are spread over OpenMP threads; each row is streamed once in blocks of
// kBlock for its online log-sum-exp (contiguous float32 read in place, other rows converted
// into scratch), then each concept's variants are gathered.
// Backward, with g[n, c] the gradient of log_mass and coef[n] = h[n] - sum_c g[n, c]:
//   grad[n, v] = (coef p_v + sum_{c contains v} g[n, c] q_cv) / T
// with log p_v = (x_v - shift) / T - offset from the row's double lse, and q_cv = p_v / mass_c
// from the concept's own largest variant, as in the forward: log q_cv = (x_v - x_top) / T -
// log s_c, x_top = x[top_token], log s_c = -log top_share (exact however far the concept lies
// below the row's max).
// one pass writes coef p_v / T for every v, then every concept token is overwritten once
// with its total, read from the incidence by vocabulary id (the CSR transpose).
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

// offsets[0..count] rises from 0 to `total` without decreasing; returns the longest segment.
int64_t check_offsets(const int64_t* offsets, int64_t count, int64_t total, const char* name) {
  if (offsets[0] != 0 || offsets[count] != total)
    out_of_range(std::string(name) + " must go from 0 to " + std::to_string(total));
  int64_t longest = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t length = offsets[i + 1] - offsets[i];
    if (length < 0) out_of_range(std::string(name) + " decreases at " + std::to_string(i));
    longest = std::max(longest, length);
  }
  return longest;
}

void check_ids(const int64_t* values, int64_t count, int64_t limit, const char* name) {
  for (int64_t i = 0; i < count; ++i)
    if (values[i] < 0 || values[i] >= limit)
      out_of_range(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(values[i]) +
                   " is outside [0, " + std::to_string(limit) + ")");
}

// ---- Forward. ----------------------------------------------------------------------

struct Forward {
  const void* logits;  // [N, V], any strides
  int64_t N, V, stride_n, stride_v;
  ByConcept concepts;
  float inv_temperature;
  float* mass;         // [N, C] each, contiguous
  float* log_mass;
  float* top_share;
  float* entropy;
  int64_t* top_token;
  double* lse;         // [N] (double: the backward forms log p from it at full precision)
};

// Per-thread scratch: one block of the row, and one concept's gathered logits.
struct ForwardScratch {
  explicit ForwardScratch(int64_t longest) : block(kBlock), variants(longest) {}
  std::vector<float> block;
  std::vector<float> variants;
};

// The row's online log-sum-exp of y = x / T, folded block by block: max is the largest raw
// logit (so x - max stays exact), sum = sum_v exp((x_v - max) / T).
template <typename T>
inline LseState row_lse(const T* row, int64_t V, int64_t stride, float inv_temperature, float* block) {
  LseState state;
  for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
    const int64_t count = std::min(kBlock, V - v0);
    // contiguous float32 is read in place; other rows are converted into the block first
    lse_update(state, float_block(row + v0 * stride, stride, count, block), count, inv_temperature);
  }
  return state;
}

struct ConceptStats {
  float log_mass, mass, top_share, entropy;
  int64_t top_token;
};

// One concept from its variants' raw logits x[0..count) (ids alongside) and the row's
// log-sum-exp state.
inline ConceptStats concept_stats(const float* x, const int64_t* ids, int64_t count,
                                  const LseState& row, float inv_temperature) {
  int64_t top = 0;  // first largest logit: m_c = x[top] / T
  for (int64_t i = 1; i < count; ++i)
    if (x[i] > x[top]) top = i;
  const float x_max = x[top];
  if (x_max == kNegInf) return {kNegInf, 0.0f, 0.0f, 0.0f, ids[0]};  // all variants masked
  float s = 0.0f, e_d = 0.0f;  // s_c = sum e_v, e_d = sum e_v d_v
  for (int64_t i = 0; i < count; ++i) {
    const float d = (x[i] - x_max) * inv_temperature;  // d_v = y_v - m_c <= 0
    const float e = fast_exp(d);
    s += e;
    e_d += e > 0.0f ? e * d : 0.0f;  // 0 log 0 = 0
  }
  const float log_s = std::log(s);
  const float log_mass = (x_max - row.max) * inv_temperature + (log_s - std::log(row.sum));
  return {log_mass, std::exp(log_mass), 1.0f / s, log_s - e_d / s, ids[top]};
}

template <typename T>
FASTPROBE_ALWAYS_INLINE void forward_row(const Forward& f, int64_t n, ForwardScratch& ws) {
  const T* row = static_cast<const T*>(f.logits) + n * f.stride_n;
  const LseState lse = row_lse(row, f.V, f.stride_v, f.inv_temperature, ws.block.data());
  f.lse[n] = lse.value(f.inv_temperature);
  const ByConcept& cs = f.concepts;
  for (int64_t c = 0; c < cs.C; ++c) {
    const int64_t first = cs.offsets[c], count = cs.offsets[c + 1] - first;
    const int64_t* ids = cs.token_ids + first;
    for (int64_t i = 0; i < count; ++i) ws.variants[i] = to_float<T>(row[ids[i] * f.stride_v]);
    const ConceptStats stats = concept_stats(ws.variants.data(), ids, count, lse, f.inv_temperature);
    const int64_t at = n * cs.C + c;
    f.log_mass[at] = stats.log_mass;
    f.mass[at] = stats.mass;
    f.top_share[at] = stats.top_share;
    f.entropy[at] = stats.entropy;
    f.top_token[at] = stats.top_token;
  }
}

// One multi-versioned entry per dtype: the templates above are inlined into each clone.
using ForwardRowFn = void (*)(const Forward&, int64_t, ForwardScratch&);
FASTPROBE_SIMD_CLONES void forward_row_float32(const Forward& f, int64_t n, ForwardScratch& ws) {
  forward_row<float>(f, n, ws);
}
FASTPROBE_SIMD_CLONES void forward_row_bfloat16(const Forward& f, int64_t n, ForwardScratch& ws) {
  forward_row<bf16>(f, n, ws);
}
FASTPROBE_SIMD_CLONES void forward_row_float16(const Forward& f, int64_t n, ForwardScratch& ws) {
  forward_row<fp16>(f, n, ws);
}

// ---- Backward. ---------------------------------------------------------------------

struct Backward {
  const void* logits;  // [N, V], any strides
  int64_t N, V, stride_n, stride_v;
  ByToken tokens;
  int64_t C;
  const float* top_share;      // [N, C]  1 / s_c (0: every variant masked)
  const int64_t* top_token;    // [N, C]  the concept's largest variant (ids checked < V)
  const double* lse;           // [N]
  const float* grad_concept;   // [N, C]  g = d loss / d log_mass
  const float* coef;           // [N]     h - sum_c g[n, c]
  float inv_temperature;
  void* grad;                  // [N, V] contiguous, the logits' dtype
};

template <typename T>
// block: kBlock floats of scratch; concept_scratch: 2 C floats (each concept's x_top / T and
// log top_share for this row).
FASTPROBE_ALWAYS_INLINE void backward_row(const Backward& b, int64_t n, float* block, float* concept_scratch) {
  const T* row = static_cast<const T*>(b.logits) + n * b.stride_n;
  T* grad = static_cast<T*>(b.grad) + n * b.V;
  // log p_v = (x_v - shift) / T - offset from the double lse: exact near the row's max at any
  // magnitude (y_v - lse in float32 would lose 1e-3 relative at logits ~1e4)
  const LogSoftmax log_p = LogSoftmax::from_lse(b.lse[n], b.inv_temperature);
  const float scale = b.coef[n] * b.inv_temperature;
  // every v: coef p_v / T
  for (int64_t v0 = 0; v0 < b.V; v0 += kBlock) {
    const int64_t count = std::min(kBlock, b.V - v0);
    load_scaled(row + v0 * b.stride_v, b.stride_v, count, 1.0f, block);
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) grad[v0 + i] = from_float<T>(scale * fast_exp(log_prob(log_p, block[i])));
  }
  // each concept once: its largest variant's logit and log top_share = -log s_c
  const float* top_share = b.top_share + n * b.C;
  const int64_t* top_token = b.top_token + n * b.C;
  float* x_top = concept_scratch;
  float* log_share = concept_scratch + b.C;
  for (int64_t c = 0; c < b.C; ++c) {
    x_top[c] = to_float<T>(row[top_token[c] * b.stride_v]);
    log_share[c] = top_share[c] > 0.0f ? std::log(top_share[c]) : kNegInf;  // (all -inf: q = 0)
  }
  // concept tokens: (coef p_v + sum_{c contains v} g_c q_cv) / T
  const ByToken& ts = b.tokens;
  const float* g = b.grad_concept + n * b.C;
  for (int64_t u = 0; u < ts.U; ++u) {
    const int64_t v = ts.ids[u];
    const float x = to_float<T>(row[v * b.stride_v]);
    float total = b.coef[n] * fast_exp(log_prob(log_p, x));
    for (int64_t j = ts.offsets[u]; j < ts.offsets[u + 1]; ++j) {
      const int64_t c = ts.concepts[j];
      if (log_share[c] != kNegInf)  // q_cv = exp((x_v - x_top) / T) top_share_c
        total += g[c] * fast_exp((x - x_top[c]) * b.inv_temperature + log_share[c]);
    }
    grad[v] = from_float<T>(total * b.inv_temperature);
  }
}

using BackwardRowFn = void (*)(const Backward&, int64_t, float*, float*);
FASTPROBE_SIMD_CLONES void backward_row_float32(const Backward& b, int64_t n, float* block, float* scratch) {
  backward_row<float>(b, n, block, scratch);
}
FASTPROBE_SIMD_CLONES void backward_row_bfloat16(const Backward& b, int64_t n, float* block, float* scratch) {
  backward_row<bf16>(b, n, block, scratch);
}
FASTPROBE_SIMD_CLONES void backward_row_float16(const Backward& b, int64_t n, float* block, float* scratch) {
  backward_row<fp16>(b, n, block, scratch);
}

template <typename Fn>
Fn for_dtype(const std::string& dtype, Fn float32, Fn bfloat16, Fn float16) {
  switch (parse_dtype(dtype)) {
    case DType::Float32: return float32;
    case DType::BFloat16: return bfloat16;
    case DType::Float16: return float16;
  }
  throw std::invalid_argument("fastprobe._C: unsupported dtype");
}

void concept_mass(const std::string& dtype, uintptr_t logits_ptr, int64_t N, int64_t V,
                  int64_t stride_n, int64_t stride_v, uintptr_t token_ids_ptr, int64_t T,
                  uintptr_t offsets_ptr, int64_t C, double inv_temperature, uintptr_t mass_ptr,
                  uintptr_t log_mass_ptr, uintptr_t top_share_ptr, uintptr_t entropy_ptr,
                  uintptr_t top_token_ptr, uintptr_t lse_ptr, int64_t num_threads) {
  check_size(N, 0, "N");
  check_size(V, 1, "V");
  check_size(C, 1, "C");
  check_size(T, 1, "T");
  const int threads = clamp_threads(num_threads);
  const float inv_t = checked_inv_temperature(inv_temperature);
  const ForwardRowFn row_fn =
      for_dtype<ForwardRowFn>(dtype, forward_row_float32, forward_row_bfloat16, forward_row_float16);
  if (N == 0) return;  // empty outputs may come with null data pointers
  const ByConcept concepts{pointer<const int64_t>(token_ids_ptr, true, "token_ids"),
                           pointer<const int64_t>(offsets_ptr, true, "offsets"), T, C};
  const int64_t longest = check_offsets(concepts.offsets, C, T, "offsets");
  check_ids(concepts.token_ids, T, V, "token_ids");
  const Forward f{pointer<const void>(logits_ptr, true, "logits"), N, V, stride_n, stride_v, concepts,
                  inv_t,
                  pointer<float>(mass_ptr, true, "mass"), pointer<float>(log_mass_ptr, true, "log_mass"),
                  pointer<float>(top_share_ptr, true, "top_share"), pointer<float>(entropy_ptr, true, "entropy"),
                  pointer<int64_t>(top_token_ptr, true, "top_token"), pointer<double>(lse_ptr, true, "lse")};

#pragma omp parallel num_threads(threads)
  {
    ForwardScratch ws(longest);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) row_fn(f, n, ws);
  }
}

void concept_mass_backward(const std::string& dtype, uintptr_t logits_ptr, int64_t N, int64_t V,
                           int64_t stride_n, int64_t stride_v, uintptr_t vocab_ids_ptr, int64_t U,
                           uintptr_t vocab_offsets_ptr, uintptr_t vocab_concepts_ptr, int64_t M,
                           int64_t C, uintptr_t top_share_ptr, uintptr_t top_token_ptr, uintptr_t lse_ptr,
                           uintptr_t grad_concept_ptr, uintptr_t coef_ptr, double inv_temperature,
                           uintptr_t grad_ptr, int64_t num_threads) {
  check_size(N, 0, "N");
  check_size(V, 1, "V");
  check_size(U, 1, "U");
  check_size(M, 1, "M");
  check_size(C, 1, "C");
  const int threads = clamp_threads(num_threads);
  const float inv_t = checked_inv_temperature(inv_temperature);
  const BackwardRowFn row_fn =
      for_dtype<BackwardRowFn>(dtype, backward_row_float32, backward_row_bfloat16, backward_row_float16);
  if (N == 0) return;
  const ByToken tokens{pointer<const int64_t>(vocab_ids_ptr, true, "vocab_ids"),
                       pointer<const int64_t>(vocab_offsets_ptr, true, "vocab_offsets"),
                       pointer<const int64_t>(vocab_concepts_ptr, true, "vocab_concepts"), U, M};
  check_offsets(tokens.offsets, U, M, "vocab_offsets");
  check_ids(tokens.ids, U, V, "vocab_ids");
  check_ids(tokens.concepts, M, C, "vocab_concepts");
  const int64_t* top_token = pointer<const int64_t>(top_token_ptr, true, "top_token");
  check_ids(top_token, N * C, V, "top_token");
  const Backward b{pointer<const void>(logits_ptr, true, "logits"), N, V, stride_n, stride_v, tokens, C,
                   pointer<const float>(top_share_ptr, true, "top_share"), top_token,
                   pointer<const double>(lse_ptr, true, "lse"),
                   pointer<const float>(grad_concept_ptr, true, "grad_concept"),
                   pointer<const float>(coef_ptr, true, "coef"), inv_t,
                   pointer<void>(grad_ptr, true, "grad")};

#pragma omp parallel num_threads(threads)
  {
    std::vector<float> block(kBlock), concept_scratch(size_t(2 * C));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) row_fn(b, n, block.data(), concept_scratch.data());
  }
}

}  // namespace

void bind_concepts(py::module_& m) {
  m.def("concept_mass", &concept_mass, py::call_guard<py::gil_scoped_release>(),
        "Concept statistics per row (see fastprobe.reference.concept_mass). Pointers are\n"
        "data_ptr() values, strides in elements; token_ids [T] and offsets [C + 1] int64 are\n"
        "checked (IndexError) before any row is read; writes mass, log_mass, top_share,\n"
        "entropy [N, C] float32, top_token [N, C] int64 and lse [N] float64, all contiguous.",
        py::arg("dtype"), py::arg("logits_ptr"), py::arg("N"), py::arg("V"), py::arg("stride_n"),
        py::arg("stride_v"), py::arg("token_ids_ptr"), py::arg("T"), py::arg("offsets_ptr"),
        py::arg("C"), py::arg("inv_temperature"), py::arg("mass_ptr"), py::arg("log_mass_ptr"),
        py::arg("top_share_ptr"), py::arg("entropy_ptr"), py::arg("top_token_ptr"),
        py::arg("lse_ptr"), py::arg("num_threads"));
  m.def("concept_mass_backward", &concept_mass_backward, py::call_guard<py::gil_scoped_release>(),
        "Gradient of (log_mass, lse) w.r.t. the logits: grad [N, V] (contiguous, the logits'\n"
        "dtype) = (coef p + sum_{c contains v} g_c q_cv) / T, p from lse [N] float64.\n"
        "vocab_ids [U], vocab_offsets [U + 1], vocab_concepts [M] int64 (the incidence by\n"
        "vocabulary id) and top_token [N, C] int64 are checked first; top_share [N, C] float32.",
        py::arg("dtype"), py::arg("logits_ptr"), py::arg("N"), py::arg("V"), py::arg("stride_n"),
        py::arg("stride_v"), py::arg("vocab_ids_ptr"), py::arg("U"), py::arg("vocab_offsets_ptr"),
        py::arg("vocab_concepts_ptr"), py::arg("M"), py::arg("C"), py::arg("top_share_ptr"),
        py::arg("top_token_ptr"), py::arg("lse_ptr"), py::arg("grad_concept_ptr"), py::arg("coef_ptr"),
        py::arg("inv_temperature"), py::arg("grad_ptr"), py::arg("num_threads"));
}

}  // namespace fastprobe
