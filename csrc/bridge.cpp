// bridge_loss: the logit-bridge distillation loss per row and its gradient with respect
// to the student logits (the math of fastprobe.reference.bridge_rows).
//
// Per row n, with s_v = z_S,v / T, t_v = (z_T,v + beta z_S,v) / T, P = softmax(s) and
// Q = softmax(t), Q a constant (stop-gradient). beta z_S is taken as 0 when beta = 0 (so a -inf
// student logit makes no NaN), and for beta != 0 a -inf student logit gives t_v = -inf (masked
// in Q too: beta < 0 would otherwise make +inf):
//   forward: loss = KL(Q || P) = sum_v Q_v (log Q_v - log P_v)    grad_v = (P_v - Q_v) / T
//   reverse: loss = KL(P || Q) = sum_v P_v g_v, g_v = log P_v - log Q_v
//            grad_v = P_v (g_v - loss) / T                        (sum_v P_v g_v = loss)
// with 0 log 0 = 0: a -inf logit is a masked entry; an entry that only the distribution in
// the log's denominator masks (Q_v > 0 = P_v forward, P_v > 0 = Q_v reverse) makes the loss
// +inf. Such a loss stays +inf for every nearby z_S (the supports do not move), so its row's
// gradient is 0 (as the reference's autograd gives). A row whose labels[n] == ignore_index has
// loss 0 and gradient 0.
//
// Each row is streamed over its vocabulary in ranges of kRange logits, blocks of kBlock within:
// pass 1 folds s and t into online log-sum-exps (fresh per range, merged in range order), pass 2
// sums the loss (and forward writes the gradient), pass 3 (reverse, with a gradient) writes the
// gradient, which needs the row's loss (and zeroes the gradient of a +inf loss, either
// direction). Whole rows go to OpenMP threads, or with few rows each
// pass's ranges (run_rows, split_rows in common.h); a row's results are the same bits either way.
// Contiguous float32 rows are read in place, other rows' blocks converted to float32 (unscaled)
// into per-thread buffers; the gradient is formed in float32 and stored in the logits' dtype
// (round to nearest even).
//
// Precision: log-probabilities are (x - max) / T - log(sum) with max the row's largest raw
// value, so x - max is exact near the max and logits ~1e4 keep float32 precision. The bridge's
// raw value is taken relative to an anchor token a of the row (r_T = z_T,a, r_S = z_S,a):
// c_v = (z_T,v - r_T) + beta (z_S,v - r_S) = z_T,v + beta z_S,v - const, the constant dropping
// out of Q. Both differences are exact for tokens near the anchor, so it must sit where Q's mass
// is, at the bridge's largest c, not at the largest logits (with beta < 0 that is among the
// student's lowest; anywhere, an outlier may lie past the first block). The anchor is first the
// token of the row's first block with the largest c; if pass 1 finds a c more than kReanchor T
// above it, the row is re-anchored at that c's token and pass 1 runs again for that row (rare:
// ordinary rows' largest c is within tens of T of their first block's). Then rounding
// z_T + beta z_S at magnitude 1e4 (and beta to float) never reaches Q's large entries. Block
// sums are float32, range and row accumulators double.
#include <pybind11/pybind11.h>

#include <vector>

#include "common.h"

namespace py = pybind11;

namespace fastprobe {
namespace {

static int64_t element_size(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

// ---- Block kernels: float32 buffers of `count` raw logits, float32 sums. -------

// The bridge's raw logit relative to the row's anchor (r_T, r_S):
//   c = (z_T - r_T) + beta (z_S - r_S)        (beta = 0: c = z_T - r_T, whatever z_S)
// A masked student entry (z_S = -inf) is masked in Q too for beta != 0 (beta < 0 would
// otherwise give +inf).
struct Bridge {
  float beta, ref_s, ref_t;
  float logit(float s, float t) const {
    const float shifted_s = beta == 0.0f ? 0.0f : beta * (s - ref_s);
    const float c = (t - ref_t) + shifted_s;
    return s == kNegInf && beta != 0.0f ? kNegInf : c;
  }
};

// A row is re-anchored when pass 1 finds a bridge logit this many temperatures above its anchor:
// below, c is rounded by at most 2^-24 kReanchor T, moving log Q by at most 2^-24 kReanchor = 4e-6
// (as the old anchor, the first block's maxima, did for ordinary rows). Ordinary LLM rows stay
// well below it (their largest logits are tens, not 64 T, above their first block's); outliers
// of ~1e4 (beta < 0: the student's masked-like tokens) are far above it.
constexpr float kReanchor = 64.0f;

// A block's largest value and where it is (-1: none): a position in the row, or in pass 1 the
// block's first position (found in the block only when a row is re-anchored there).
struct BlockMax {
  float value;
  int64_t at;
};

// The first position of `value` in a block (count if absent).
FASTPROBE_SIMD_CLONES static int64_t first_index(const float* x, int64_t count, float value) {
  int64_t first = count;
#pragma omp simd reduction(min : first)
  for (int64_t i = 0; i < count; ++i) first = x[i] == value && i < first ? i : first;
  return first;
}

// The largest finite value of a block and its first position (-inf, -1 if it has none).
FASTPROBE_SIMD_CLONES static BlockMax largest_finite(const float* x, int64_t count) {
  float largest = kNegInf;
#pragma omp simd reduction(max : largest)
  for (int64_t i = 0; i < count; ++i)
    largest = x[i] > largest && x[i] < kInf ? x[i] : largest;
  return largest == kNegInf ? BlockMax{kNegInf, -1} : BlockMax{largest, first_index(x, count, largest)};
}

// The bridge's raw logits c of a block from its student and teacher logits (c may be t).
// Every pass forms c here, so all see the same rounding (the row's largest c gives log Q
// exactly -log(sum)).
FASTPROBE_SIMD_CLONES static void bridge_block(const float* s, const float* t, Bridge bridge,
                                               int64_t count, float* c) {
#pragma omp simd
  for (int64_t v = 0; v < count; ++v) c[v] = bridge.logit(s[v], t[v]);
}

// Forward, one block: grad_v = (P_v - Q_v) / T; returns sum_v Q_v (log Q_v - log P_v).
FASTPROBE_SIMD_CLONES static float forward_block(const float* s, const float* c,
                                                 LogSoftmax log_p, LogSoftmax log_q,
                                                 int64_t count, float* grad) {
  float kl = 0.0f;
#pragma omp simd reduction(+ : kl)
  for (int64_t v = 0; v < count; ++v) {
    const float lp = log_prob(log_p, s[v]);  // log P_v (-inf: masked)
    const float lq = log_prob(log_q, c[v]);  // log Q_v
    const float p = fast_exp(lp), q = fast_exp(lq);
    grad[v] = (p - q) * log_p.scale;                           // (P_v - Q_v) / T
    const float term = lp == kNegInf ? kInf : q * (lq - lp);  // P_v = 0 < Q_v: +inf
    kl += lq == kNegInf ? 0.0f : term;                         // Q_v = 0: 0 log 0 = 0
  }
  return kl;
}

// Reverse, one block: returns sum_v P_v g_v, g_v = log P_v - log Q_v.
FASTPROBE_SIMD_CLONES static float reverse_block(const float* s, const float* c,
                                                 LogSoftmax log_p, LogSoftmax log_q,
                                                 int64_t count) {
  float kl = 0.0f;
#pragma omp simd reduction(+ : kl)
  for (int64_t v = 0; v < count; ++v) {
    const float lp = log_prob(log_p, s[v]);  // log P_v
    const float lq = log_prob(log_q, c[v]);  // log Q_v
    const float term = lq == kNegInf ? kInf : fast_exp(lp) * (lp - lq);  // Q_v = 0 < P_v: +inf
    kl += lp == kNegInf ? 0.0f : term;                                   // P_v = 0: 0 log 0 = 0
  }
  return kl;
}

// Reverse gradient, one block, given the row's loss: grad_v = P_v (g_v - loss) / T.
FASTPROBE_SIMD_CLONES static void reverse_grad_block(const float* s, const float* c,
                                                     LogSoftmax log_p, LogSoftmax log_q,
                                                     float loss, int64_t count, float* grad) {
#pragma omp simd
  for (int64_t v = 0; v < count; ++v) {
    const float lp = log_prob(log_p, s[v]);  // log P_v
    const float lq = log_prob(log_q, c[v]);  // log Q_v
    const float g = fast_exp(lp) * ((lp - lq) - loss) * log_p.scale;  // P_v (g_v - loss) / T
    grad[v] = lp == kNegInf ? 0.0f : g;                                 // P_v = 0: no gradient
  }
}

// ---- Per-row driver. ------------------------------------------------------------

struct Problem {
  LoadFn load;
  bool float32;  // float32 logits: rows with a unit vocabulary stride are read in place
  StoreFn store;  // nullptr for float32: blocks are formed in the output
  const void* student;  // [N, V], any strides
  const void* teacher;  // [N, V], any strides
  int64_t N, V, stride_sn, stride_sv, stride_tn, stride_tv;
  const int64_t* labels;  // [N] or nullptr
  int64_t ignore_index;
  float beta, inv_temperature;
  bool reverse;
  float* loss;         // [N]
  void* grad;          // [N, V] contiguous, the logits' dtype; nullptr: no gradient
  int64_t grad_bytes;  // bytes per gradient element

  bool ignored(int64_t n) const { return labels != nullptr && labels[n] == ignore_index; }

  // Elements [v0, v0 + count) of row n as float32 (float_block: in place or into scratch).
  const float* student_block(int64_t n, int64_t v0, int64_t count, float* scratch) const {
    return float_block(load, float32, student, n * stride_sn + v0 * stride_sv, stride_sv, count, scratch);
  }
  const float* teacher_block(int64_t n, int64_t v0, int64_t count, float* scratch) const {
    return float_block(load, float32, teacher, n * stride_tn + v0 * stride_tv, stride_tv, count, scratch);
  }

  // Where the float32 gradient of a block is formed: the output itself for float32,
  // else (or with no gradient wanted) the given scratch.
  float* grad_block(int64_t n, int64_t v0, float* scratch) const {
    return grad != nullptr && store == nullptr ? static_cast<float*>(grad) + n * V + v0
                                               : scratch;
  }
  void store_grad(int64_t n, int64_t v0, int64_t count, const float* block) const {
    if (grad != nullptr && store != nullptr) store(block, count, grad, n * V + v0);
  }
  void zero_grad(int64_t n, int64_t v0, int64_t v1) const {  // [v0, v1); +0 is all zero bits in every dtype
    std::memset(static_cast<char*>(grad) + (n * V + v0) * grad_bytes, 0, size_t((v1 - v0) * grad_bytes));
  }
};

// Per-thread scratch, allocated once per thread.
struct Workspace {
  Workspace() : s(scratch_floats(kBlock)), c(scratch_floats(kBlock)), grad(scratch_floats(kBlock)) {}
  std::vector<float> s;     // [kBlock] student logits of the current block (when converted)
  std::vector<float> c;     // [kBlock] teacher logits (when converted), then the bridge's
  std::vector<float> grad;  // [kBlock] gradient of the current block (not float32)
};

// What a row keeps between its stages: the bridge's anchor (and whether pass 1 runs again at a
// new one), both log-softmaxes and the loss (the reverse gradient's).
struct RowSoftmax {
  Bridge bridge;
  bool reanchored;
  LogSoftmax log_p, log_q;
  float loss;
};

// What pass 1 finds in a range (or, merged, in a row): the online log-sum-exps of s and of the
// bridge c, and c's largest finite value and its (first) vocabulary id.
struct RangeLse {
  LseState s, c;
  BlockMax c_max;
};

// Block [v0, v0 + count) of row n: returns its student logits, the bridge c into ws.c.
static const float* load_block(const Problem& p, int64_t n, int64_t v0, int64_t count,
                               Bridge bridge, Workspace& ws) {
  const float* s = p.student_block(n, v0, count, ws.s.data());
  bridge_block(s, p.teacher_block(n, v0, count, ws.c.data()), bridge, count, ws.c.data());
  return s;
}

// The blocks of vocabulary range `range`: f(v0, count) for each.
template <typename F>
static void for_blocks(int64_t V, int64_t range, F&& f) {
  for (int64_t v0 = range * kRange; v0 < range_end(V, range); v0 += kBlock) f(v0, block_size(V, v0));
}

// The bridge anchored at token v of row n (r_S = 0 where z_S,v is not finite: beta = 0).
static Bridge anchored_at(const Problem& p, int64_t n, int64_t v, Workspace& ws) {
  if (v < 0) return {p.beta, 0.0f, 0.0f};  // (no finite bridge logit: the row has no Q)
  const float s = *p.student_block(n, v, 1, ws.s.data()), t = *p.teacher_block(n, v, 1, ws.c.data());
  return {p.beta, std::isfinite(s) ? s : 0.0f, t};
}

// The row's first anchor: the token of its first block with the largest bridge logit.
static Bridge row_bridge(const Problem& p, int64_t n, Workspace& ws) {
  const int64_t count = block_size(p.V, 0);
  load_block(p, n, 0, count, Bridge{p.beta, 0.0f, 0.0f}, ws);
  return anchored_at(p, n, largest_finite(ws.c.data(), count).at, ws);
}

// The row re-anchored at its largest bridge logit, which pass 1 found in the block at c_max.at.
static Bridge reanchored(const Problem& p, int64_t n, Bridge bridge, BlockMax c_max, Workspace& ws) {
  const int64_t count = block_size(p.V, c_max.at);
  load_block(p, n, c_max.at, count, bridge, ws);
  return anchored_at(p, n, c_max.at + first_index(ws.c.data(), count, c_max.value), ws);
}

// Pass 1 over a range: fresh online log-sum-exps of s and of the bridge, and the bridge's largest
// value (folded in locals: the slots of other threads' rows may share part's cache line).
static void range_lse(const Problem& p, int64_t n, int64_t range, Bridge bridge, Workspace& ws, RangeLse* part) {
  RangeLse found{LseState{}, LseState{}, BlockMax{kNegInf, -1}};
  for_blocks(p.V, range, [&](int64_t v0, int64_t count) {
    const float* s = load_block(p, n, v0, count, bridge, ws);
    lse_block(found.s, s, count, p.inv_temperature);            // log sum_v exp(s_v / T)
    const float c_max = found.c.max;
    lse_block(found.c, ws.c.data(), count, p.inv_temperature);  // log sum_v exp(c_v / T)
    if (found.c.max > c_max && found.c.max < kInf) found.c_max = {found.c.max, v0};  // (in this block)
  });
  *part = found;
}

// A row's ranges of pass 1 merged in order.
static RangeLse merge_ranges(const RangeLse* parts, int64_t ranges, float inv_temperature) {
  RangeLse row = parts[0];
  for (int64_t range = 1; range < ranges; ++range) {
    merge_lse(row.s, parts[range].s, inv_temperature);
    merge_lse(row.c, parts[range].c, inv_temperature);
    if (parts[range].c_max.value > row.c_max.value) row.c_max = parts[range].c_max;
  }
  return row;
}

// Pass 2 over a range: its share of the loss; forward writes its gradient too.
static double range_loss(const Problem& p, int64_t n, int64_t range, const RowSoftmax& r, Workspace& ws) {
  double kl = 0.0;
  for_blocks(p.V, range, [&](int64_t v0, int64_t count) {
    const float* s = load_block(p, n, v0, count, r.bridge, ws);
    if (p.reverse) {
      kl += reverse_block(s, ws.c.data(), r.log_p, r.log_q, count);  // KL(P || Q)
      return;
    }
    float* grad = p.grad_block(n, v0, ws.grad.data());
    kl += forward_block(s, ws.c.data(), r.log_p, r.log_q, count, grad);  // KL(Q || P)
    p.store_grad(n, v0, count, grad);
  });
  return kl;
}

// Pass 3 over a range, reverse: its gradient, from the row's loss.
static void range_reverse_grad(const Problem& p, int64_t n, int64_t range, const RowSoftmax& r, Workspace& ws) {
  for_blocks(p.V, range, [&](int64_t v0, int64_t count) {
    const float* s = load_block(p, n, v0, count, r.bridge, ws);
    float* grad = p.grad_block(n, v0, ws.grad.data());
    reverse_grad_block(s, ws.c.data(), r.log_p, r.log_q, r.loss, count, grad);
    p.store_grad(n, v0, count, grad);
  });
}

// Every row in ranges (run_rows): its anchor, pass 1 of each range, then (only for a row whose
// largest bridge logit is far above its anchor) a new anchor there and pass 1 again, its
// log-softmaxes, pass 2 of each range, its loss, then (with a gradient) pass 3 of each range:
// reverse, the gradient; either direction, zeros for a loss of +inf. An ignored row reads
// nothing: loss 0, gradient 0.
static void run(const Problem& p, int threads) {
  const int64_t ranges = range_count(p.V), slots = row_slots(p.N, threads);
  std::vector<RowSoftmax> rows(size_t(slots), RowSoftmax{});
  std::vector<RangeLse> lse_parts(size_t(slots * ranges));
  std::vector<double> loss_parts(size_t(slots * ranges));
  const auto pass1 = [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
    range_lse(p, n, range, rows[slot].bridge, ws, &lse_parts[slot * ranges + range]);
  };
  const auto set_softmax = [&](int64_t slot, const RangeLse& row) {
    rows[slot].log_p = LogSoftmax::from_state(row.s, p.inv_temperature);
    rows[slot].log_q = LogSoftmax::from_state(row.c, p.inv_temperature);
  };
  run_rows(
      p.N, threads, [] { return Workspace(); },
      each_row([&](int64_t n, int64_t slot, Workspace& ws) {
        if (!p.ignored(n)) rows[slot].bridge = row_bridge(p, n, ws);
      }),
      each_part(ranges, [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
        if (!p.ignored(n)) pass1(n, range, slot, ws);
      }),
      each_row([&](int64_t n, int64_t slot, Workspace& ws) {
        if (p.ignored(n)) return;
        const RangeLse row = merge_ranges(&lse_parts[slot * ranges], ranges, p.inv_temperature);
        // c_max / T > kReanchor (a NaN row, with no c_max, keeps its anchor)
        rows[slot].reanchored = row.c_max.at >= 0 && row.c_max.value * p.inv_temperature > kReanchor;
        if (rows[slot].reanchored) {
          rows[slot].bridge = reanchored(p, n, rows[slot].bridge, row.c_max, ws);
        } else {
          set_softmax(slot, row);
        }
      }),
      each_part(ranges, [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
        if (!p.ignored(n) && rows[slot].reanchored) pass1(n, range, slot, ws);
      }),
      each_row([&](int64_t n, int64_t slot, Workspace&) {
        if (!p.ignored(n) && rows[slot].reanchored)
          set_softmax(slot, merge_ranges(&lse_parts[slot * ranges], ranges, p.inv_temperature));
      }),
      each_part(ranges, [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
        if (p.ignored(n)) {
          if (p.grad != nullptr) p.zero_grad(n, range * kRange, range_end(p.V, range));
          return;
        }
        loss_parts[slot * ranges + range] = range_loss(p, n, range, rows[slot], ws);
      }),
      each_row([&](int64_t n, int64_t slot, Workspace&) {
        double kl = 0.0;
        for (int64_t range = 0; range < ranges && !p.ignored(n); ++range) kl += loss_parts[slot * ranges + range];
        rows[slot].loss = float(kl);
        // KL >= 0; rounding can leave -1e-7 where it is 0 (equal distributions). std::max keeps NaN.
        p.loss[n] = float(std::max(kl, 0.0));
      }),
      each_part(p.grad != nullptr ? ranges : 0, [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
        if (p.ignored(n)) return;  // (zeroed above)
        if (rows[slot].loss == kInf) {
          p.zero_grad(n, range * kRange, range_end(p.V, range));  // (a constant +inf: no gradient)
        } else if (p.reverse) {
          range_reverse_grad(p, n, range, rows[slot], ws);
        }
      }));
}

void bridge_loss(const std::string& dtype, uintptr_t student_ptr, uintptr_t teacher_ptr,
                 int64_t N, int64_t V, int64_t stride_sn, int64_t stride_sv, int64_t stride_tn,
                 int64_t stride_tv, uintptr_t labels_ptr, int64_t ignore_index, double beta,
                 double inv_temperature, bool reverse, uintptr_t loss_ptr, uintptr_t grad_ptr,
                 bool compute_grad, int64_t num_threads) {
  check_size(N, 0, "N");
  check_size(V, 1, "V");
  const int threads = clamp_threads(num_threads);
  const float beta_f = float(beta);
  if (!std::isfinite(beta_f))
    throw std::invalid_argument("fastprobe._C: beta must be finite in float32");
  const float inv_t = checked_inv_temperature(inv_temperature);
  check_layout("student", {N, V}, {stride_sn, stride_sv});
  check_layout("teacher", {N, V}, {stride_tn, stride_tv});
  if (compute_grad) check_layout("grad", {N, V});
  const DType type = parse_dtype(dtype);
  const bool any = N > 0;  // empty outputs may come with null data pointers
  const Problem p{loader_for(type),
                  type == DType::Float32,
                  storer_for(type),
                  pointer<const void>(student_ptr, any, "student"),
                  pointer<const void>(teacher_ptr, any, "teacher"),
                  N, V, stride_sn, stride_sv, stride_tn, stride_tv,
                  pointer<const int64_t>(labels_ptr, false, "labels"),
                  ignore_index,
                  beta_f,
                  inv_t,
                  reverse,
                  pointer<float>(loss_ptr, any, "loss"),
                  compute_grad ? pointer<void>(grad_ptr, any, "grad") : nullptr,
                  element_size(type)};

  if (N > 0) run(p, threads);
}

}  // namespace

void bind_bridge(py::module_& m) {
  m.def("bridge_loss", &bridge_loss, py::call_guard<py::gil_scoped_release>(),
        "Logit-bridge distillation loss per row (see fastprobe.reference.bridge_rows), with\n"
        "Q = softmax((z_T + beta z_S) / T) a constant: forward KL(Q || P_S), reverse\n"
        "KL(P_S || Q). Pointers are data_ptr() values, strides in elements; labels_ptr (0: none)\n"
        "is int64 [N], rows equal to ignore_index get loss 0 and gradient 0. Writes loss [N]\n"
        "(float32) and, with compute_grad, grad [N, V] (contiguous, the logits' dtype): the\n"
        "gradient of each row's loss w.r.t. the student logits.",
        py::arg("dtype"), py::arg("student_ptr"), py::arg("teacher_ptr"), py::arg("N"),
        py::arg("V"), py::arg("stride_sn"), py::arg("stride_sv"), py::arg("stride_tn"),
        py::arg("stride_tv"), py::arg("labels_ptr"), py::arg("ignore_index"), py::arg("beta"),
        py::arg("inv_temperature"), py::arg("reverse"), py::arg("loss_ptr"), py::arg("grad_ptr"),
        py::arg("compute_grad"), py::arg("num_threads"));
}

}  // namespace fastprobe
