// dual_path_attention: attention with and without the dropped (image) keys in one pass, merged
// into contrastive guidance (the math of fastprobe.reference.dual_path_attention).
//
// Per batch b, query head h and query i at position p = Lk - Lq + i (visible as in
// attention_core.h: real, lo_p <= j <= hi_p, and in the window, without sink keys), two
// running softmax states over the visible keys: state 0 over the kept keys, state 1 over the
// dropped ones (each key feeds exactly one). With their (m_1, l_1, O_1) and (m_2, l_2, O_2) and m = max(m_1, m_2):
//   o_uncond = O_1 / l_1                                              (0 when l_1 = 0)
//   o_cond   = (O_1 e^(m_1 - m) + O_2 e^(m_2 - m)) / (l_1 e^(m_1 - m) + l_2 e^(m_2 - m))
//   dO = o_cond - o_uncond, orthogonalize: dO -= <dO, u> u with u = o_uncond / (||o_uncond|| + eps)
//   out = o_cond + gamma dO on guided rows (rows[b, i] and l_1 > 0), else o_cond
// all in float32, each output rounded once to the input dtype.
//
// The shared driver (attention_core.h) computes the scores of a key block once; a block whose
// real keys are all kept (or all dropped) feeds one state, a block at the edge of the image
// feeds its two runs of keys to their states in place, and a block whose keys alternate is
// loaded reordered (kept keys first). Each key's e v goes to one accumulator, so the cost is
// that of one attention call; decoding (one query) and key splitting are the driver's.
#include <pybind11/pybind11.h>

#include "attention_core.h"

namespace py = pybind11;

namespace fastprobe {
namespace {

struct DualPathAttention {
  static constexpr int64_t kStates = 2;  // 0: kept keys, 1: dropped keys
  Problem p;
  const uint8_t* drop;  // [B, Lk]: 1 = dropped
  const uint8_t* rows;  // [B, Lq]: 1 = guided
  float gamma;
  bool orthogonalize;
  double eps;           // > 0
  void* o_cond;         // out's shape and strides, or null
  void* o_uncond;

  float start_logit(int64_t) const { return kNegInf; }
  void begin_item(const ItemRows&, Scratch&) const {}
  void transform_scores(float*, int64_t) const {}

  // Kept keys feed state 0, dropped keys state 1. Padding keys are -inf in either state, so
  // they do not make a block mixed.
  Route route(const ItemRows& it, int64_t j0, int64_t count, const uint8_t* real_row,
              Scratch& ws) const {
    const uint8_t* dropped = drop + it.b * p.Lk + j0;
    int64_t kept = 0, gone = 0;
    for (int64_t c = 0; c < count; ++c) {
      const bool real = real_row == nullptr || real_row[j0 + c] != 0;
      const bool is_dropped = dropped[c] != 0;
      kept += real && !is_dropped;
      gone += real && is_dropped;
    }
    if (gone == 0) return Route::one(0, count);
    if (kept == 0) return Route::one(1, count);
    // both kinds: two runs (the edge of an image) feed their states where they are
    const bool first = dropped[0] != 0;
    int64_t edge = 1;
    while (edge < count && (dropped[edge] != 0) == first) ++edge;
    int64_t end = edge;
    while (end < count && (dropped[end] != 0) != first) ++end;
    if (end == count) return {2, {{int64_t(first), 0, edge}, {int64_t(!first), edge, count}}, false};
    // alternating keys: load the kept ones first
    int64_t n = 0;
    for (int64_t c = 0; c < count; ++c)
      if (dropped[c] == 0) ws.order[n++] = c;
    const int64_t split = n;
    for (int64_t c = 0; c < count; ++c)
      if (dropped[c] != 0) ws.order[n++] = c;
    return {2, {{0, 0, split}, {1, split, count}}, true};
  }

  void fold(const ItemRows& it, int64_t, const Segment& seg, float* eT, const RowState& st,
            Scratch& ws) const {
    fold_softmax(it, eT, seg.end - seg.begin, StatKeys{}, false, st, ws);
  }

  template <typename T>
  void write_pruned(const Plan&, const ItemRows&) const {}  // no head mask

  template <typename T>
  FASTPROBE_ALWAYS_INLINE void store(void* base, const ItemRows& it, int64_t h, int64_t i,
                                     const float* x) const {
    T* row = static_cast<T*>(base) + it.b * p.o_s0 + h * p.o_s1 + i * p.o_s2;
    store_run(x, p.Dv, row);
  }

  // cond becomes out = o_cond + gamma (dO - <dO, u> u) = o_cond + gamma (dO - coef o_uncond),
  // dO = o_cond - o_uncond, coef = <dO, o_uncond> / (||o_uncond|| + eps)^2 (0 without
  // orthogonalize): dO, coef and out's terms in F (float, or double where float's dO overflows).
  template <typename F>
  FASTPROBE_ALWAYS_INLINE void guide(float* cond, const float* uncond, int64_t D) const {
    F coef = 0;
    if (orthogonalize) {
      double dot = 0.0, norm2 = 0.0;  // double: no underflow of tiny o_uncond
      for (int64_t d = 0; d < D; ++d) {
        dot += double(F(cond[d]) - F(uncond[d])) * uncond[d];
        norm2 += double(uncond[d]) * uncond[d];
      }
      const double denominator = std::sqrt(norm2) + eps;
      coef = F(dot / (denominator * denominator));
    }
    for (int64_t d = 0; d < D; ++d) {
      const F delta = F(cond[d]) - F(uncond[d]);
      cond[d] = float(F(cond[d]) + F(gamma) * (delta - coef * F(uncond[d])));
    }
  }

  template <typename T>
  FASTPROBE_ALWAYS_INLINE void write_rows(const ItemRows& it, Scratch& ws,
                                          const std::array<RowState, kStates>& st) const {
    const int64_t R = it.R, D = p.Dv;  // the output's width (v's)
    float* cond = ws.row_out;
    float* uncond = ws.row_out + D;
    for (int64_t r = 0; r < it.rows; ++r) {
      const int64_t h = ws.row_head[r], i = ws.row_query[r];
      const float m1 = st[0].m[r], l1 = st[0].sum(r), m2 = st[1].m[r], l2 = st[1].sum(r);
      const float m = std::max(m1, m2);
      const float f1 = l1 > 0.0f ? std::exp(m1 - m) : 0.0f;
      const float f2 = l2 > 0.0f ? std::exp(m2 - m) : 0.0f;
      const float l = l1 * f1 + l2 * f2;
      const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
      const float inv_l1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
      const float* o1 = st[0].oT + r;
      const float* o2 = st[1].oT + r;
      for (int64_t d = 0; d < D; ++d) {
        cond[d] = (o1[d * R] * f1 + o2[d * R] * f2) * inv_l;
        uncond[d] = o1[d * R] * inv_l1;
      }
      if (ws.value_unscale != nullptr)  // values scaled by 1 / unscale (rescue_item, attention_core.h)
        for (int64_t d = 0; d < D; ++d) {
          cond[d] *= ws.value_unscale[d];
          uncond[d] *= ws.value_unscale[d];
        }
      if (o_cond != nullptr) store<T>(o_cond, it, h, i, cond);
      if (o_uncond != nullptr) store<T>(o_uncond, it, h, i, uncond);
      if (gamma != 0.0f && rows[it.b * p.Lq + i] != 0 && l1 > 0.0f) {
        // in float, unless some dO = o_cond - o_uncond overflows it (paths near float max of
        // opposite signs, where out itself may be finite)
        float probe = 0.0f;  // 0, or NaN where some dO is not finite (values_overflowed's probe)
#pragma omp simd reduction(+ : probe)
        for (int64_t d = 0; d < D; ++d) probe += (cond[d] - uncond[d]) * 0.0f;
        if (probe == 0.0f)
          guide<float>(cond, uncond, D);
        else
          guide<double>(cond, uncond, D);
      }
      store<T>(p.out, it, h, i, cond);
    }
  }
};

FASTPROBE_ATTENTION_ENTRIES(DualPathAttention)

void dual_path_attention(const std::string& dtype, uintptr_t q, uintptr_t k, uintptr_t v,
                         uintptr_t out, int64_t batch, int64_t num_heads, int64_t num_kv_heads,
                         int64_t num_queries, int64_t num_keys, int64_t head_dim,
                         int64_t value_dim, int64_t q_s0, int64_t q_s1, int64_t q_s2,
                         int64_t q_s3, int64_t k_s0, int64_t k_s1, int64_t k_s2, int64_t k_s3,
                         int64_t v_s0, int64_t v_s1, int64_t v_s2, int64_t v_s3, int64_t out_s0, int64_t out_s1, int64_t out_s2,
                         int64_t out_s3, double scale, bool causal, uintptr_t key_real,
                         uintptr_t drop, uintptr_t rows, double gamma, bool orthogonalize,
                         double eps, uintptr_t o_cond, uintptr_t o_uncond, int64_t num_threads,
                         uintptr_t horizon, int64_t window, uintptr_t start) {
  const char* op = "dual_path_attention";
  const DType type = parse_dtype(dtype);
  const int threads = clamp_threads(num_threads);
  Problem p = attention_problem(op, type, q, k, v, out, batch, num_heads, num_kv_heads,
                                num_queries, num_keys, head_dim, value_dim, q_s0, q_s1,
                                q_s2, q_s3, k_s0, k_s1, k_s2, k_s3, v_s0, v_s1, v_s2, v_s3,
                                out_s0, out_s1, out_s2, out_s3, scale, causal, key_real);
  const float gamma_f = float(gamma);
  if (!std::isfinite(gamma_f)) invalid(op, "gamma must be finite in float32");
  if (!(eps > 0.0 && std::isfinite(eps))) invalid(op, "eps must be finite and > 0");
  if (window < 0) invalid(op, "window must be >= 0 (0: none), got " + std::to_string(window));
  if (batch == 0 || num_queries == 0) return;  // empty outputs may come with null data pointers

  p.start = pointer<const int64_t>(start, false, "start");
  p.horizon = pointer<const int64_t>(horizon, false, "horizon");
  p.window = window >= num_keys ? 0 : window;  // a window of Lk keys or more hides nothing
  const DualPathAttention attention{p,
                                    pointer<const uint8_t>(drop, true, "drop"),
                                    pointer<const uint8_t>(rows, true, "rows"),
                                    gamma_f,
                                    orthogonalize,
                                    eps,
                                    pointer<void>(o_cond, false, "o_cond", element_size(type)),
                                    pointer<void>(o_uncond, false, "o_uncond", element_size(type))};
  run_attention(attention, entries_for(attention, type, call_lanes()), threads);
}

}  // namespace

void bind_dual_attention(py::module_& m) {
  m.def("dual_path_attention", &dual_path_attention, py::call_guard<py::gil_scoped_release>(),
        "o_cond (every visible key), o_uncond (no dropped key) and out = o_cond + gamma dO in one pass\n"
        "(see fastprobe.reference.dual_path_attention). q, k, v, out as in sink_attention; key_real\n"
        "uint8 [B, Lk] (0: all real), drop uint8 [B, Lk] (1: dropped), rows uint8 [B, Lq] (1: guided),\n"
        "contiguous; o_cond and o_uncond (0: not written) have out's shape and strides. start and\n"
        "horizon int64 [B, Lk] (0: none), both paths: the keys of each query as in sink_attention. window\n"
        "(0: none) as in sink_attention, without sink keys.",
        FASTPROBE_ATTENTION_ARGS, py::arg("key_real"), py::arg("drop"),
        py::arg("rows"), py::arg("gamma"), py::arg("orthogonalize"), py::arg("eps"),
        py::arg("o_cond"), py::arg("o_uncond"), py::arg("num_threads"), py::arg("horizon") = 0,
        py::arg("window") = 0, py::arg("start") = 0);
}

}  // namespace fastprobe
