// sink_attention: attention with sink keys, a sliding window, head masks and a per-head sink
// logit, plus the attention statistics, from the running softmax (the math of
// fastprobe.reference.sink_attention).
//
// Per batch b, query head h (kv head h / (Hq / Hkv), never expanded) and query i at
// position p = Lk - Lq + i:
//   visible(j) = real_j and lo_p <= j <= hi_p and (no window or in_window or j < sink_end_p)
//     in_window: causal j > p - window, bidirectional |p - j| < window
//     [lo_p, hi_p]: p's segment from start and horizon (attention_core.h); without them
//       [0, p] when causal, [0, Lk - 1] when not
//     sink_end_p, stat_end_p: sink_end[b] and stat_end[b], or with row ends sink_end[b, p] and
//       stat_end[b, p] (the first real keys of p's segment), clamped to [0, Lk]
//   s_j = scale q_i . k_j on visible keys (with a soft cap c: s_j = c tanh(scale q_i . k_j / c));
//   a sink logit c_h is one more, value-less entry:
//   lse = log(sum_j exp(s_j) + exp(c_h)),   p_j = exp(s_j - lse)
//   out = sum_j p_j v_j,   sink_mass = sum_{j < stat_end_p} p_j,   group_mass[g] = sum_{group_j = g} p_j
//   entropy = -sum_j p_j log p_j - p_sink log p_sink          (p_sink = exp(c_h - lse))
// A row with nothing in its softmax, and every row of a pruned head, gets out 0, lse -inf,
// masses 0 and entropy 0 (a pruned head costs no compute).
//
// The running softmax, the work items (rows = the query heads sharing a kv head), the Q K^T
// and P V kernels, the band / padding mask, the decode (narrow) mode and the key splitting
// are attention_core.h's; this file is its op: one state per row, started from the sink logit
// (m = c_h, l = 1, A = 0), the soft cap, the sink / group / entropy sums, and at the end
// out = O / l, lse = m + log l, entropy = log l - A / l.
#include <pybind11/pybind11.h>

#include "attention_core.h"

namespace py = pybind11;

namespace fastprobe {
namespace {

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

// Soft cap of one block's dot products x = q . k (Gemma 2): s = cap tanh(x factor), factor =
// scale / cap (q is not scaled first, see sink_attention).
FASTPROBE_SIMD_CLONES static void softcap_block(float* sT, int64_t size, float cap, float factor) {
#pragma omp simd
  for (int64_t i = 0; i < size; ++i) sT[i] = cap * fast_tanh(sT[i] * factor);
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

// The op for the shared driver (attention_core.h): one state per row, from the sink logit.
struct SinkAttention {
  static constexpr int64_t kStates = 1;
  Problem p;
  float softcap;             // 0: none
  float cap_factor;          // with a soft cap: scale / softcap, at most float max
  const float* sink_logit;   // [Hq] or null
  const int32_t* key_groups; // [B, Lk] or null
  float* lse;                // [B, Hq, Lq]
  float* sink_mass;          // [B, Hq, Lq]
  float* group_mass;         // [B, Hq, Lq, G] or null
  float* entropy;            // [B, Hq, Lq] or null

  float start_logit(int64_t head) const { return sink_logit != nullptr ? sink_logit[head] : kNegInf; }

  void begin_item(const ItemRows&, Scratch& ws) const {
    std::fill_n(ws.seen, p.G, uint8_t(0));
    ws.seen_count = 0;
  }

  Route route(const ItemRows&, int64_t, int64_t count, const uint8_t*, Scratch&) const {
    return Route::one(0, count);
  }

  void transform_scores(float* sT, int64_t size) const {
    if (softcap > 0.0f) softcap_block(sT, size, softcap, cap_factor);
  }

  // The whole block (one segment from key j0): softmax with the sink / entropy sums, groups.
  void fold(const ItemRows& it, int64_t j0, const Segment& seg, float* eT, const RowState& st,
            Scratch& ws) const {
    const int64_t count = seg.end - seg.begin;
    fold_softmax(it, eT, count, stat_keys(it, j0, count, ws), entropy != nullptr, st, ws);
    if (key_groups != nullptr)
      groups_block(eT, it.R, count, key_groups + it.b * p.Lk + j0, ws.alpha, ws.block_sum,
                   st.groups, ws.seen, ws.seen_list, ws.seen_count);
  }

  // The outputs of an item's pruned heads: out 0, lse -inf, masses and entropy 0.
  template <typename T>
  FASTPROBE_ALWAYS_INLINE void write_pruned(const Plan& plan, const ItemRows& it) const {
    for (int64_t g = 0; g < plan.group; ++g) {
      const int64_t h = it.kv_head * plan.group + g;
      if (!p.pruned(h)) continue;
      for (int64_t i = it.first_query; i < it.first_query + it.queries; ++i) {
        T* out = static_cast<T*>(p.out) + it.b * p.o_s0 + h * p.o_s1 + i * p.o_s2;
        for (int64_t d = 0; d < p.Dv; ++d) out[d] = from_float<T>(0.0f);
        const int64_t at = (it.b * p.Hq + h) * p.Lq + i;
        lse[at] = kNegInf;
        sink_mass[at] = 0.0f;
        if (entropy != nullptr) entropy[at] = 0.0f;
        if (group_mass != nullptr)
          for (int64_t gi = 0; gi < p.G; ++gi) group_mass[at * p.G + gi] = 0.0f;
      }
    }
  }

  // An item's outputs from its final state: out = O / l, lse = m + log l, the sums / l,
  // entropy = log l - A / l; an empty row (l = 0) gets out 0, lse -inf, masses and entropy 0.
  template <typename T>
  FASTPROBE_ALWAYS_INLINE void write_rows(const ItemRows& it, Scratch& ws,
                                          const std::array<RowState, kStates>& states) const {
    const RowState& st = states[0];
    const int64_t R = it.R;
    for (int64_t r = 0; r < it.rows; ++r) {
      const int64_t h = ws.row_head[r], i = ws.row_query[r];
      T* out = static_cast<T*>(p.out) + it.b * p.o_s0 + h * p.o_s1 + i * p.o_s2;
      const int64_t at = (it.b * p.Hq + h) * p.Lq + i;
      // l's two parts summed in double: 1 - sink_mass and log l keep l_lo's digits (both
      // ~1e-6 in a sink head, where l ~ 1 + 1e-6 in float32 has 5% steps)
      const double l = double(st.l[r]) + double(st.l_lo[r]);
      const bool empty = l == 0.0;
      const double inv_l = empty ? 0.0 : 1.0 / l;
      const float inv_l_f = float(inv_l);
      if (ws.value_unscale == nullptr)
        for (int64_t d = 0; d < p.Dv; ++d) out[d] = from_float<T>(st.oT[d * R + r] * inv_l_f);
      else  // values scaled by 1 / unscale (rescue_item, attention_core.h): out = (O / l) unscale
        for (int64_t d = 0; d < p.Dv; ++d)
          out[d] = from_float<T>(st.oT[d * R + r] * inv_l_f * ws.value_unscale[d]);
      const double log_l = empty ? 0.0 : std::log(l);
      lse[at] = empty ? kNegInf : float(st.m[r] + log_l);
      sink_mass[at] = float(st.sink[r] * inv_l);
      if (entropy != nullptr) {
        const float h_row = empty ? 0.0f : float(log_l - st.a[r] * inv_l);
        entropy[at] = h_row < 0.0f ? 0.0f : h_row;  // rounding can leave -1e-7; NaN stays
      }
      if (group_mass != nullptr)
        for (int64_t g = 0; g < p.G; ++g) group_mass[at * p.G + g] = st.groups[g * R + r] * inv_l_f;
    }
  }
};

FASTPROBE_ATTENTION_ENTRIES(SinkAttention)

void check_groups(const int32_t* key_groups, int64_t count, int64_t G, int64_t Lk) {
  for (int64_t n = 0; n < count; ++n)
    if (key_groups[n] < 0 || key_groups[n] >= G)
      throw std::out_of_range("fastprobe._C.sink_attention: key_groups[" + std::to_string(n / Lk) +
                              ", " + std::to_string(n % Lk) + "] = " + std::to_string(key_groups[n]) +
                              " is outside [0, " + std::to_string(G) + ")");
}

void sink_attention(const std::string& dtype, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t out,
                    int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t num_queries,
                    int64_t num_keys, int64_t head_dim, int64_t value_dim, int64_t q_s0,
                    int64_t q_s1, int64_t q_s2, int64_t q_s3, int64_t k_s0, int64_t k_s1,
                    int64_t k_s2, int64_t k_s3, int64_t v_s0, int64_t v_s1, int64_t v_s2, int64_t v_s3, int64_t out_s0,
                    int64_t out_s1, int64_t out_s2, int64_t out_s3, double scale, bool causal,
                    int64_t window, uintptr_t key_real, uintptr_t sink_end, uintptr_t stat_end,
                    uintptr_t head_mask, uintptr_t sink_logit, uintptr_t key_groups,
                    int64_t num_groups, uintptr_t lse, uintptr_t sink_mass, uintptr_t group_mass,
                    uintptr_t entropy, int64_t num_threads, double softcap, uintptr_t horizon,
                    uintptr_t start, bool row_ends) {
  const char* op = "sink_attention";
  const DType type = parse_dtype(dtype);
  const int threads = clamp_threads(num_threads);
  Problem p = attention_problem(op, type, q, k, v, out, batch, num_heads, num_kv_heads, num_queries,
                                num_keys, head_dim, value_dim, q_s0, q_s1, q_s2, q_s3, k_s0, k_s1,
                                k_s2, k_s3, v_s0, v_s1, v_s2, v_s3, out_s0, out_s1, out_s2, out_s3,
                                scale, causal, key_real);
  if (window < 0) invalid(op, "window must be >= 0 (0: none), got " + std::to_string(window));
  check_size(num_groups, 0, "num_groups");
  const float softcap_f = float(softcap);
  if (!(softcap_f >= 0.0f && std::isfinite(softcap_f)) || (softcap > 0.0 && softcap_f == 0.0f))
    invalid(op, "softcap must be 0 (none) or finite and > 0 in float32");
  if (num_groups > std::numeric_limits<int32_t>::max())
    invalid(op, "num_groups must fit the int32 group ids, got " + std::to_string(num_groups));
  check_layout("group_mass", {batch, num_heads, num_queries, num_groups});
  if ((key_groups != 0) != (num_groups > 0))
    invalid(op, "key_groups and num_groups > 0 go together (num_groups is 0 without key_groups)");
  if (batch == 0 || num_queries == 0) return;  // empty outputs may come with null data pointers

  p.window = window >= num_keys ? 0 : window;  // a window of Lk keys or more hides nothing
  p.sink_end = pointer<const int64_t>(sink_end, true, "sink_end");
  p.stat_end = pointer<const int64_t>(stat_end, true, "stat_end");
  p.row_ends = row_ends;
  p.head_mask = pointer<const uint8_t>(head_mask, false, "head_mask");
  p.start = pointer<const int64_t>(start, false, "start");
  p.horizon = pointer<const int64_t>(horizon, false, "horizon");
  p.G = num_groups;
  // With a soft cap the scale goes after the dot, into the cap's factor scale / c (as Triton's):
  // q scaled first can overflow q . k (inf - inf = NaN) where the capped score is within +-c. A
  // factor past float max becomes float max: tanh(x float max) rounds to +-1 as with the true
  // factor where |x| >= 2^-124, and is 0 for x = 0.
  float cap_factor = 0.0f;
  if (softcap_f > 0.0f) {
    cap_factor = float(std::min(scale / double(softcap_f), double(std::numeric_limits<float>::max())));
    p.scale = 1.0f;
    p.score_scale = 1.0f;
  }
  const SinkAttention attention{p,
                                softcap_f,
                                cap_factor,
                                pointer<const float>(sink_logit, false, "sink_logit"),
                                pointer<const int32_t>(key_groups, false, "key_groups"),
                                pointer<float>(lse, true, "lse"),
                                pointer<float>(sink_mass, true, "sink_mass"),
                                pointer<float>(group_mass, key_groups != 0, "group_mass"),
                                pointer<float>(entropy, false, "entropy")};
  if (attention.key_groups == nullptr && group_mass != 0)
    invalid(op, "group_mass is given without key_groups");
  if (attention.key_groups != nullptr)
    check_groups(attention.key_groups, batch * num_keys, num_groups, num_keys);
  run_attention(attention, entries_for(attention, type, call_lanes()), threads);
}

}  // namespace


void bind_attention(py::module_& m) {
  m.def("attention_lanes", &call_lanes,
        "Floats per vector in the CPU attention kernels (sink_attention, dual_path_attention): 16\n"
        "where the CPU runs the x86-64-v4 (AVX-512) code, else 8.");
  m.def(
      "set_attention_lanes",
      [](int lanes) {
        if (lanes != 8 && lanes != 16)
          throw std::invalid_argument("fastprobe._C.set_attention_lanes: lanes must be 8 or 16");
        return attention_lane_limit.exchange(lanes);
      },
      "Caps the lane width of attention_lanes() at 8 or 16 (16, the default, takes effect only where\n"
      "the CPU has AVX-512), for the whole process: tests and comparisons run the 8-lane (AVX2 and\n"
      "baseline) kernels on an AVX-512 CPU this way. Returns the previous cap. Not for use while\n"
      "another thread runs attention.");
  m.def("attention_bf16_pairs", [] { return call_pair_scores(call_lanes()); },
        "Whether bfloat16 calls of the CPU attention kernels score Q K^T by AVX512-BF16 pairs\n"
        "(VDPBF16PS): at 16 lanes, on a CPU with AVX512-BF16, unless set_attention_bf16_pairs(False).");
  m.def(
      "set_attention_bf16_pairs",
      [](bool allowed) { return attention_pairs_allowed.exchange(allowed); },
      "Allows (True, the default) or forbids the AVX512-BF16 pair scores of attention_bf16_pairs()\n"
      "for the whole process: tests and comparisons run the float32 scores of bfloat16 inputs on\n"
      "such a CPU this way. Returns the previous setting. Not for use while another thread runs\n"
      "attention.");
  m.def("sink_attention", &sink_attention, py::call_guard<py::gil_scoped_release>(),
        "Attention with sink keys, a window, head masks and a sink logit, and its statistics\n"
        "(see fastprobe.reference.sink_attention). Pointers are data_ptr() values, sizes and\n"
        "strides (in elements, the last one 1) int64: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v\n"
        "[B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv] (any strides), all of `dtype`. key_real uint8\n"
        "[B, Lk] (0: all real), sink_end and stat_end int64 [B] (real keys below them are sinks /\n"
        "count in sink_mass; with row_ends [B, Lk]: those of the query at position p are the real\n"
        "keys start[b, p] <= j < sink_end[b, p] / stat_end[b, p]; clamped to [0, Lk]),\n"
        "head_mask uint8 [Hq] (0: none), sink_logit float32 [Hq] (0: none), key_groups int32\n"
        "[B, Lk] in [0, num_groups) (0: none; checked, IndexError). Writes lse and sink_mass\n"
        "[B, Hq, Lq], group_mass [B, Hq, Lq, G] (with key_groups) and entropy [B, Hq, Lq]\n"
        "(0: skipped), float32 and contiguous. softcap > 0 caps the scores: s = softcap\n"
        "tanh(s / softcap) (0: none). start and horizon int64 [B, Lk] (0: none): the query at\n"
        "position p sees only keys start[b, p] <= j <= horizon[b, p], sinks included (clamped to\n"
        "[0, p] and [p, Lk - 1]; no start: 0, no horizon: p when causal, else Lk - 1).",
        FASTPROBE_ATTENTION_ARGS, py::arg("window"), py::arg("key_real"),
        py::arg("sink_end"), py::arg("stat_end"), py::arg("head_mask"), py::arg("sink_logit"),
        py::arg("key_groups"), py::arg("num_groups"), py::arg("lse"), py::arg("sink_mass"),
        py::arg("group_mass"), py::arg("entropy"), py::arg("num_threads"), py::arg("softcap") = 0.0,
        py::arg("horizon") = 0, py::arg("start") = 0, py::arg("row_ends") = false);
}

}  // namespace fastprobe
