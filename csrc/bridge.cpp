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
//            formed centred at a token a (see Precision): d_v = g_v - g_a,
//            D = sum_v P_v d_v = loss - g_a,   grad_v = P_v (d_v - D) / T
// Each loss is summed from the exps P~, Q~ of the log-probabilities as formed (see Precision):
//   forward: loss = sum_v Q~_v (log Q~_v - log P~_v) - Q~_v + P~_v
//   reverse: loss = (sum_v P~_v (log P~_v - log Q~_v) - P~_v + Q~_v) / M,  M = sum_v P~_v
// with 0 log 0 = 0: a -inf logit is a masked entry; an entry that only the distribution in
// the log's denominator masks (Q_v > 0 = P_v forward, P_v > 0 = Q_v reverse) makes the loss
// +inf. Such a loss stays +inf for every nearby z_S (the supports do not move), so its row's
// gradient is 0 (as the reference's autograd gives). A row whose labels[n] == ignore_index has
// loss 0 and gradient 0.
//
// Each row is streamed over its vocabulary in ranges of kRange logits, blocks of kBlock within:
// pass 1 folds s and c into online log-sum-exps (fresh per range, merged in range order), pass 2
// sums the loss (and forward writes the gradient), pass 3 (reverse, with a gradient) writes the
// gradient, which needs the row's loss (and zeroes the gradient of a +inf loss, either
// direction). Whole rows go to OpenMP threads, or with few rows each
// pass's ranges (run_rows, split_rows in common.h); a row's results are the same bits either way.
// Student and teacher may differ in dtype (float32, bfloat16, float16; e.g. a bfloat16 student
// under autocast, a float32 teacher): each is read in its own dtype by its own loader, never
// copied whole. Contiguous float32 rows (of either) are read in place, other rows' blocks
// converted to float32 (unscaled, exactly) into per-thread buffers, so a call gives the bits it
// gives with the narrower input cast up beforehand; the gradient is formed in float32 and stored
// in the student's dtype (round to nearest even).
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
// ordinary rows' largest c is within tens of T of their first block's; the rerun folds only c,
// as s does not depend on the anchor). Then rounding z_T + beta z_S at magnitude 1e4 (and beta to
// float) never reaches Q's large entries.
// The reverse direction's g_v and loss are of the KL's size (~1e4 when beta < 0 puts Q's mass far
// from P's), so P_v (g_v - loss) would cancel numbers of that size (errors ~1e-3). Its passes 2
// and 3 are centred at a token a where P's mass is, its student's largest logit, with the bridge
// anchored at a (c'_v = (z_T,v - z_T,a) + beta (z_S,v - z_S,a)):
//   d_v = g_v - g_a = ((z_S,v - z_S,a) - c'_v) / T,  D = sum_v P_v d_v,  grad_v = P_v (d_v - D) / T
// (the loss's log Q~_v stay those of pass 1's bridge c, whose exps its log-sum-exp summed: c'_v
// is c_v - c_a rounded otherwise, by ~2^-24 |c'_v|, which is many T at small T, and log Q's shift
// moved by c_a would make Q's top exp e^(+-2^-24 |c'| / T), inf or 0). d_v and D are differences of
// logits near a where P has mass, exact there. a is the token of the row's largest student logit
// (its first; found in the block where pass 1 saw it), where P's mass is: a token with little of it
// (say the first block's largest, 20 below the row's) can have a g_a far from the loss (a teacher
// logit 1e3 below there: g_a ~ 1e3 for a loss of ~5), and then d_v ~ g_a would be rounded by ~1e-4
// where P has mass. Even at the largest logit D can be larger than the loss (P_a ~ 0.1), and the
// float32 log-sum-exp's relative error e (P~ = P (1 + e), log P~ = log P + e) would reach the
// gradient through D~ = D (1 + e): pass 2 also sums the mass it forms, M = sum_v P~_v, and normalises
// by it (exact to first order in e):  grad_v = (P~_v / M) (d_v - D~ / M) / T,  D~ = sum_v P~_v d_v.
// The losses: the float32 log-sum-exps make P~ = P e^f and Q~ = Q e^e for constants f, e of the
// row. The terms A~ (log A~ - log B~) - A~ + B~ (A = Q, B = P forward; A = P, B = Q reverse) sum to
// KL (1 + f_A) + O(f^2): the constants cancel to first order, and the reverse, which sums M = sum P~
// for its gradient anyway, divides by it, which leaves O(f^2) only. The forward keeps its relative
// error f_A (~5e-7 where the loss is ~1e4: up to ~10 float32 roundings there, the reverse's ~4);
// summing M_Q too would cost its block a third of its sums. In both, the derivatives in each
// log-probability (A_v x_v and B_v - A_v, x_v = log A_v - log B_v) vanish where P and Q are near, so
// each one's own rounding reaches the loss to second order only. A student 1e-3 from its teacher
// (KL ~5e-7, V = 16384): the median row 0.4-1% off either way (summed as Q (log Q - log P) alone
// the forward loss was 7-40% off; the reverse formed as g~_a + D, 8-22%); what is left is each
// exp's own rounding (~1e-7 of the largest P~_v or Q~_v: a row whose mass sits on a few tokens can
// still be 15-30% off).
// Reverse pass 2's block sums are double: float32 terms added in order would let a large P_v d_v
// swallow the small same-signed ones after it (6e-5 of a loss of 1.4 where a block is summed
// sequentially, as in the sanitizer's build), and where g_a is ~1e3 from the loss (a near-uniform
// P) float32 sums of D~ ~ 1e3 would be off by ~5e-5 even summed in SIMD lanes. Forward's block
// sums are double too: in float32 runs of kLseRun terms a term of ~1e4 (a KL of ~1e4) swallowed
// the small ones after it in its lane, 7.6 float32 roundings of the loss at 16 lanes, 24.7 at 4
// (baseline x86-64), 92 in the sanitizer's build, against 3.9 now at any width. Pass 1's are float32
// over runs of kLseRun terms (common.h), added in double, as are the range and row accumulators.
// Wide rows: logits more than float32's largest value apart (3e38 and -3e38, a student's or a
// teacher's) make the float32 differences above overflow to -inf for finite logits, c_v - r or
// log P_v, Q_v below -3.4e38 (T <= 1), which the supports read as masked: the reverse loss +inf
// where the reference's is 1.5e38, or (beta = 0.5, the student's: c = -inf at its -3e38 where P
// has the entry) +inf where it is 0; beta z_S - r overflowing to +inf (beta = 2) made it NaN. Pass 1
// also notes each row's largest finite |z_S| and |z_T| (bridge_block_magnitude, in the loop that
// forms c); a row where it times (1 + |beta|) max(1, 1 / T) is over kWide = 2^100 (is_wide; ordinary
// rows are ~2^90 below it) is done whole in double by wide_row, the reference's math (nothing
// overflows there: no anchor or centre, and the supports are the finite logits), right after pass
// 1, and skips the other stages (four scalar sweeps over the row on one thread: rare rows only). Its
// loss and gradient are the reference's rounded to float32 (+inf where that is past float32's
// range); other rows run as before.
#include <pybind11/pybind11.h>

#include <vector>

#include "common.h"

namespace py = pybind11;

namespace fastprobe {
namespace {

// ---- Block kernels: float32 buffers of `count` raw logits, float32 sums. -------

// The bridge's raw logit relative to the row's anchor (r_T, r_S):
//   c = (z_T - r_T) + beta (z_S - r_S)        (beta = 0: c = z_T - r_T, whatever z_S)
// A masked student entry (z_S = -inf) is masked in Q too for beta != 0 (beta < 0 would
// otherwise give +inf). In double (wide_row's) c is exact for float logits.
struct Bridge {
  float beta, ref_s, ref_t;
  template <typename Real = float>
  Real logit(float s, float t) const {
    const Real shifted_s = beta == 0.0f ? Real(0) : Real(beta) * (Real(s) - Real(ref_s));
    const Real c = (Real(t) - Real(ref_t)) + shifted_s;
    return s == kNegInf && beta != 0.0f ? Real(kNegInf) : c;
  }
};

// A row is re-anchored when pass 1 finds a bridge logit this many temperatures above its anchor:
// below, c is rounded by at most 2^-24 kReanchor T, moving log Q by at most 2^-24 kReanchor = 4e-6.
// Ordinary LLM rows stay well below it (their largest logits are tens, not 64 T, above their first
// block's); outliers of ~1e4 (beta < 0: the student's masked-like tokens) are far above it.
constexpr float kReanchor = 64.0f;

// A block's largest value and where it is (-1: none): a position in the row, or in pass 1 the
// block's first position (found in the block only where a row is re-anchored or centred there).
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

// bridge_block, returning the largest magnitude of the block's finite student and teacher logits
// (0 if none): pass 1 notes it to find a wide row (see Precision). (A loop of its own over the
// block cost ordinary rows 5-9%; in bridge_block's loop it is within noise: bench/paired_cpu.py
// bridge_f32 and bridge_reverse_f32, 11 repeats, 2026-12-07.)
FASTPROBE_SIMD_CLONES static float bridge_block_magnitude(const float* s, const float* t, Bridge bridge,
                                                          int64_t count, float* c) {
  float largest = 0.0f;
#pragma omp simd reduction(max : largest)
  for (int64_t v = 0; v < count; ++v) {
    const float a = std::fabs(s[v]), b = std::fabs(t[v]);
    largest = std::max(largest, std::max(a < kInf ? a : 0.0f, b < kInf ? b : 0.0f));
    c[v] = bridge.logit(s[v], t[v]);
  }
  return largest;
}

// Forward, one block: grad_v = (P_v - Q_v) / T; returns KL(Q || P)'s terms over the block as
// Q~_v (log Q~_v - log P~_v) - Q~_v + P~_v (>= 0, adding up to the KL since both sum to 1), Q~_v
// and P~_v the exps of the very log-probabilities the log ratio is formed from (see Precision:
// the two log-sum-exps' rounding cancels to first order). draft_divergence's second-order series
// (kl_term) would give ~1e-4, at ~1.5x the Triton pass 2's instructions: not taken for a
// training loss whose gradient it does not change.
FASTPROBE_SIMD_CLONES static double forward_block(const float* s, const float* c,
                                                  LogSoftmax log_p, LogSoftmax log_q,
                                                  int64_t count, float* grad) {
  double kl = 0.0;
#pragma omp simd reduction(+ : kl)
  for (int64_t v = 0; v < count; ++v) {
    const float lp = log_prob(log_p, s[v]);  // log P_v (-inf: masked)
    const float lq = log_prob(log_q, c[v]);  // log Q_v
    const float p = fast_exp(lp), q = fast_exp(lq);
    grad[v] = (p - q) * log_p.scale;                                 // (P_v - Q_v) / T
    const float term = lp == kNegInf ? kInf : q * ((lq - lp) - 1.0f) + p;  // P_v = 0 < Q_v: +inf
    kl += double(lq == kNegInf ? p : term);                          // Q_v = 0: P_v
  }
  return kl;
}

// Pass 2's sums over a block or range (double, see Precision): the KL's terms; reverse also the mass
// M = sum_v P~_v and (for the gradient) D~ = sum_v P~_v d_v.
struct Pass2Sums {
  double kl = 0.0, mass = 0.0, spread = 0.0;
  Pass2Sums& operator+=(const Pass2Sums& other) {
    kl += other.kl, mass += other.mass, spread += other.spread;
    return *this;
  }
};

// Reverse, centred at token a (z_S,a = centre_s; c the bridge anchored as in pass 1, centred_c at a):
// KL(P || Q)'s terms P~_v (log P~_v - log Q~_v) - P~_v + Q~_v (forward_block's, the roles swapped),
// M, and D~ = sum_v P~_v d_v, d_v = g_v - g_a = ((z_S,v - z_S,a) - centred_c_v) / T.
FASTPROBE_SIMD_CLONES static Pass2Sums reverse_block(const float* s, const float* c, const float* centred_c,
                                                     LogSoftmax log_p, LogSoftmax log_q, float centre_s,
                                                     int64_t count) {
  double kl = 0.0, mass = 0.0, spread = 0.0;
#pragma omp simd reduction(+ : kl, mass, spread)
  for (int64_t v = 0; v < count; ++v) {
    const float lp = log_prob(log_p, s[v]);                    // log P~_v (-inf: masked)
    const float lq = log_prob(log_q, c[v]);                    // log Q~_v
    const float p = fast_exp(lp), q = fast_exp(lq);            // P~_v, Q~_v
    const float d = ((s[v] - centre_s) - centred_c[v]) * log_p.scale;  // g_v - g_a
    const float weighted = centred_c[v] == kNegInf ? kInf : p * d;     // Q_v = 0 < P_v: +inf
    // +inf where P has the entry (even if P~_v underflows) and Q masks it (a row without Q: NaN); P~_v = 0: Q~_v
    const float term = lq == kNegInf && s[v] > kNegInf ? kInf : p == 0.0f ? q : p * ((lp - lq) - 1.0f) + q;
    kl += double(term);
    mass += double(p);
    spread += double(lp == kNegInf ? 0.0f : weighted);         // P_v = 0: 0 log 0 = 0
  }
  return {kl, mass, spread};
}

// Reverse gradient, one block, centred as reverse_block, given the row's D = sum_v P_v d_v and
// grad_scale = 1 / (M T) (P_v = P~_v / M): grad_v = P_v (g_v - loss) / T = P~_v (d_v - D) / (M T).
// A row whose loss is NaN comes with D = NaN: its gradient is NaN, masked tokens' too.
FASTPROBE_SIMD_CLONES static void reverse_grad_block(const float* s, const float* c,
                                                     LogSoftmax log_p, float centre_s, float spread,
                                                     float grad_scale, int64_t count, float* grad) {
  const bool nan_row = std::isnan(spread);
#pragma omp simd
  for (int64_t v = 0; v < count; ++v) {
    const float lp = log_prob(log_p, s[v]);                     // log P~_v
    const float d = ((s[v] - centre_s) - c[v]) * log_p.scale;   // g_v - g_a
    const float g = fast_exp(lp) * (d - spread) * grad_scale;   // P~_v (d_v - D) / (M T)
    grad[v] = lp == kNegInf && !nan_row ? 0.0f : g;             // P_v = 0: no gradient
  }
}

// ---- Per-row driver. ------------------------------------------------------------

struct Problem {
  RowReader student_input, teacher_input;  // each input's own dtype
  StoreFn store;  // the gradient's (the student's dtype); nullptr for float32: blocks are formed in the output
  const void* student;  // [N, V], any strides
  const void* teacher;  // [N, V], any strides
  int64_t N, V, stride_sn, stride_sv, stride_tn, stride_tv;
  const int64_t* labels;  // [N] or nullptr
  int64_t ignore_index;
  float beta, inv_temperature;
  bool reverse;
  float* loss;         // [N]
  void* grad;          // [N, V] contiguous, the student's dtype; nullptr: no gradient
  int64_t grad_bytes;  // bytes per gradient element

  bool ignored(int64_t n) const { return labels != nullptr && labels[n] == ignore_index; }

  // Elements [v0, v0 + count) of row n as float32 (RowReader::block: in place or into scratch).
  const float* student_block(int64_t n, int64_t v0, int64_t count, float* scratch) const {
    return student_input.block(student, n * stride_sn + v0 * stride_sv, stride_sv, count, scratch);
  }
  const float* teacher_block(int64_t n, int64_t v0, int64_t count, float* scratch) const {
    return teacher_input.block(teacher, n * stride_tn + v0 * stride_tv, stride_tv, count, scratch);
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
  std::vector<float> grad;  // [kBlock] gradient of the current block (not float32); reverse pass 2: c
};

// ---- Wide rows (rare, see Precision): the whole row in double. -----------------

// A row is wide where its logits, the bridge's or their differences scaled by 1 / T could reach
// float32's largest value: its largest finite |z_S| or |z_T| times (1 + |beta|) max(1, 1 / T) is
// over kWide. Ordinary rows (|z| ~ 1e2) are ~2^90 below it.
constexpr double kWide = 0x1p100;
static bool is_wide(const Problem& p, float magnitude) {
  return double(magnitude) * (1.0 + std::fabs(double(p.beta))) * std::max(1.0, double(p.inv_temperature)) > kWide;
}

// A wide row's loss and gradient, the reference's math in double (c_v = z_T,v + beta z_S,v as it
// forms it: nothing overflows, so no anchor is needed and the supports are the finite logits):
//   log P_v = (z_S,v - max z_S) / T - log sum_u e^((z_S,u - max z_S) / T), log Q_v likewise from c
//   forward: loss = sum_v Q_v (log Q_v - log P_v), grad_v = (P_v - Q_v) / T
//   reverse: loss = sum_v P_v (log P_v - log Q_v), grad_v = P_v (log P_v - log Q_v - loss) / T
// with 0 log 0 = 0, +inf where only the log's denominator masks an entry (gradient 0), and NaN (loss
// and gradient) for a row with a NaN or +inf logit or without a finite one (no P or no Q).
static void wide_row(const Problem& p, int64_t n, Workspace& ws) {
  const double inv_t = p.inv_temperature, inf = std::numeric_limits<double>::infinity();
  const Bridge bridge{p.beta, 0.0f, 0.0f};
  std::vector<double> c(static_cast<size_t>(kBlock));  // a block's bridge logits
  const auto for_row_blocks = [&](auto&& f) {  // f(v0, count, s) with c formed
    for (int64_t v0 = 0; v0 < p.V; v0 += kBlock) {
      const int64_t count = block_size(p.V, v0);
      const float* s = p.student_block(n, v0, count, ws.s.data());
      const float* t = p.teacher_block(n, v0, count, ws.c.data());
      for (int64_t i = 0; i < count; ++i) c[size_t(i)] = bridge.logit<double>(s[i], t[i]);
      f(v0, count, s);
    }
  };
  double max_s = -inf, max_c = -inf, sum_s = 0.0, sum_c = 0.0;
  bool undefined = false;
  for_row_blocks([&](int64_t, int64_t count, const float* s) {
    for (int64_t i = 0; i < count; ++i) {
      undefined |= !(s[i] < kInf) && s[i] != kNegInf;  // NaN or +inf (c: NaN or +inf too)
      undefined |= !(c[size_t(i)] < inf) && c[size_t(i)] != -inf;
      max_s = std::max(max_s, double(s[i])), max_c = std::max(max_c, c[size_t(i)]);
    }
  });
  undefined |= max_s == -inf || max_c == -inf;  // no P or no Q
  for_row_blocks([&](int64_t, int64_t count, const float* s) {
    for (int64_t i = 0; i < count; ++i)
      sum_s += std::exp((s[i] - max_s) * inv_t), sum_c += std::exp((c[size_t(i)] - max_c) * inv_t);
  });
  const double offset_s = std::log(sum_s), offset_c = std::log(sum_c);
  const auto log_p = [&](float s) { return (s - max_s) * inv_t - offset_s; };
  const auto log_q = [&](double bridged) { return (bridged - max_c) * inv_t - offset_c; };
  double kl = 0.0;
  for_row_blocks([&](int64_t, int64_t count, const float* s) {
    for (int64_t i = 0; i < count; ++i) {
      const double lp = log_p(s[i]), lq = log_q(c[size_t(i)]);
      kl += p.reverse ? (s[i] == kNegInf ? 0.0 : c[size_t(i)] == -inf ? inf : std::exp(lp) * (lp - lq))
                      : (c[size_t(i)] == -inf ? 0.0 : s[i] == kNegInf ? inf : std::exp(lq) * (lq - lp));
    }
  });
  if (undefined) kl = std::numeric_limits<double>::quiet_NaN();
  p.loss[n] = float(std::max(kl, 0.0));  // (std::max keeps NaN)
  if (p.grad == nullptr) return;
  for_row_blocks([&](int64_t v0, int64_t count, const float* s) {
    float* grad = p.grad_block(n, v0, ws.grad.data());
    for (int64_t i = 0; i < count; ++i) {
      const double lp = log_p(s[i]), lq = log_q(c[size_t(i)]), prob = std::exp(lp);
      const double g = p.reverse ? (s[i] == kNegInf ? 0.0 : prob * (lp - lq - kl) * inv_t)
                                 : (prob - std::exp(lq)) * inv_t;
      grad[i] = float(kl == inf ? 0.0 : std::isnan(kl) ? kl : g);  // (a NaN loss: a NaN row)
    }
    p.store_grad(n, v0, count, grad);
  });
}

// What a row keeps between its stages: the bridge's anchor (and whether pass 1 runs again at a
// new one), whether it is wide, both log-softmaxes and the loss; reverse: its centre (see Precision).
struct BridgeRow {
  Bridge bridge;  // anchored for pass 1 (and pass 2's log Q)
  Bridge centred;  // reverse: anchored at the centre a (d_v, passes 2 and 3)
  bool reanchored;
  bool wide;  // computed whole in double by wide_row (see Precision)
  LogSoftmax log_p, log_q;
  BlockMax s_max;           // reverse: the row's largest s (its block)
  float centre_s;           // reverse: z_S,a
  float spread;             // reverse: D = sum_v P_v d_v, d_v = g_v - g_a
  float grad_scale;         // reverse: 1 / (M T), M = sum_v P~_v
  float loss;
};

// What pass 1 finds in a range (or, merged, in a row): the online log-sum-exps of s and of the
// bridge c, and the largest finite value of each with the block it is in (pass 1's BlockMax).
struct RangeLse {
  LseState s, c;
  BlockMax s_max, c_max;
  float magnitude;  // the largest finite |z_S|, |z_T| (only with the student's log-sum-exp)
};

// Block [v0, v0 + count) of row n: returns its student logits, the bridge c into ws.c.
static const float* load_block(const Problem& p, int64_t n, int64_t v0, int64_t count,
                               Bridge bridge, Workspace& ws) {
  const float* s = p.student_block(n, v0, count, ws.s.data());
  bridge_block(s, p.teacher_block(n, v0, count, ws.c.data()), bridge, count, ws.c.data());
  return s;
}

// A token's student and teacher logits.
struct Token {
  float s, t;
};
static Token token_at(const Problem& p, int64_t n, int64_t v, Workspace& ws) {
  return {*p.student_block(n, v, 1, ws.s.data()), *p.teacher_block(n, v, 1, ws.c.data())};
}

// The bridge anchored at token v of row n (r_S = 0 where z_S,v is not finite: beta = 0; r_T = 0
// where z_T,v is not: a reverse centre the teacher masks, whose row's loss is +inf).
static Bridge anchored_at(const Problem& p, int64_t n, int64_t v, Workspace& ws) {
  if (v < 0) return {p.beta, 0.0f, 0.0f};  // (no finite bridge logit: the row has no Q)
  const Token a = token_at(p, n, v, ws);
  return {p.beta, std::isfinite(a.s) ? a.s : 0.0f, std::isfinite(a.t) ? a.t : 0.0f};
}

// The row's first anchor: the token of its first block with the largest bridge logit.
static void row_bridge(const Problem& p, int64_t n, BridgeRow& r, Workspace& ws) {
  const int64_t count = block_size(p.V, 0);
  load_block(p, n, 0, count, Bridge{p.beta, 0.0f, 0.0f}, ws);
  r.bridge = anchored_at(p, n, largest_finite(ws.c.data(), count).at, ws);
}

// A row's logits: the student's z_S or the bridge's c.
enum class Logits { Student, Bridge };

// The first position in row n of `largest`'s value among `among`, found in its block (largest.at).
static int64_t located(const Problem& p, int64_t n, Bridge bridge, BlockMax largest, Logits among, Workspace& ws) {
  const int64_t count = block_size(p.V, largest.at);
  const float* s = load_block(p, n, largest.at, count, bridge, ws);
  return largest.at + first_index(among == Logits::Student ? s : ws.c.data(), count, largest.value);
}

// Reverse: the row's centre a (see Precision), its largest student logit, and the bridge anchored at
// a for d_v in passes 2 and 3. No finite student logit: no P, the loss is NaN.
static void centre_row(const Problem& p, int64_t n, BridgeRow& r, Workspace& ws) {
  const int64_t a = r.s_max.at >= 0 ? located(p, n, r.bridge, r.s_max, Logits::Student, ws) : -1;
  r.centre_s = a < 0 ? 0.0f : token_at(p, n, a, ws).s;
  r.centred = a < 0 ? r.bridge : anchored_at(p, n, a, ws);  // c'_v = (z_T,v - z_T,a) + beta (z_S,v - z_S,a)
}

// Folds a block of x (starting at v0) into an online log-sum-exp of x / T, and notes the block
// where its largest finite value rose.
static void fold_block(LseState& lse, BlockMax& largest, const float* x, int64_t v0, int64_t count, float inv_t) {
  const float before = lse.max;
  lse_block(lse, x, count, inv_t);  // log sum_v exp(x_v / T)
  if (lse.max > before && lse.max < kInf) largest = {lse.max, v0};  // (in this block)
}

// Which run of pass 1 over a row: the first (s and the bridge c), or the rerun at a new anchor (c
// only: s does not depend on the anchor).
enum class Pass1 { First, Reanchored };

// Pass 1 over a range: fresh online log-sum-exps of the bridge and (Pass1::First) of s, or (a
// rerun) the range's s kept, with their largest values (folded in locals: the slots of other
// threads' rows may share part's cache line).
static void range_lse(const Problem& p, int64_t n, int64_t range, Bridge bridge, Pass1 run, Workspace& ws,
                      RangeLse* part) {
  const bool first = run == Pass1::First;  // s folded too
  const BlockMax none{kNegInf, -1};
  RangeLse found{first ? LseState{} : part->s, LseState{}, first ? none : part->s_max, none,
                 first ? 0.0f : part->magnitude};
  for_blocks(p.V, range, [&](int64_t v0, int64_t count) {
    const float* s = p.student_block(n, v0, count, ws.s.data());
    const float* t = p.teacher_block(n, v0, count, ws.c.data());
    if (first) {
      found.magnitude = std::max(found.magnitude, bridge_block_magnitude(s, t, bridge, count, ws.c.data()));
      fold_block(found.s, found.s_max, s, v0, count, p.inv_temperature);
    } else {
      bridge_block(s, t, bridge, count, ws.c.data());
    }
    fold_block(found.c, found.c_max, ws.c.data(), v0, count, p.inv_temperature);
  });
  *part = found;
}

// A row's ranges of pass 1 merged in order.
static RangeLse merge_ranges(const RangeLse* parts, int64_t ranges, float inv_temperature) {
  RangeLse row = parts[0];
  for (int64_t range = 1; range < ranges; ++range) {
    merge_lse(row.s, parts[range].s, inv_temperature);
    merge_lse(row.c, parts[range].c, inv_temperature);
    if (parts[range].s_max.value > row.s_max.value) row.s_max = parts[range].s_max;
    if (parts[range].c_max.value > row.c_max.value) row.c_max = parts[range].c_max;
    row.magnitude = std::max(row.magnitude, parts[range].magnitude);
  }
  return row;
}

// Pass 2 over a range: its share of the loss's sums (forward writes its gradient too).
static Pass2Sums range_loss(const Problem& p, int64_t n, int64_t range, const BridgeRow& r, Workspace& ws) {
  Pass2Sums sums;
  for_blocks(p.V, range, [&](int64_t v0, int64_t count) {
    if (p.reverse) {  // c as pass 1 formed it into ws.grad (unused here), c' in place of t
      const float* s = p.student_block(n, v0, count, ws.s.data());
      const float* t = p.teacher_block(n, v0, count, ws.c.data());
      bridge_block(s, t, r.bridge, count, ws.grad.data());
      bridge_block(s, t, r.centred, count, ws.c.data());
      sums += reverse_block(s, ws.grad.data(), ws.c.data(), r.log_p, r.log_q, r.centre_s, count);
      return;
    }
    const float* s = load_block(p, n, v0, count, r.bridge, ws);
    float* grad = p.grad_block(n, v0, ws.grad.data());
    sums.kl += forward_block(s, ws.c.data(), r.log_p, r.log_q, count, grad);  // KL(Q || P), summed in double
    p.store_grad(n, v0, count, grad);
  });
  return sums;
}

// Pass 3 over a range, reverse: its gradient, from the row's D.
static void range_reverse_grad(const Problem& p, int64_t n, int64_t range, const BridgeRow& r, Workspace& ws) {
  for_blocks(p.V, range, [&](int64_t v0, int64_t count) {
    const float* s = load_block(p, n, v0, count, r.centred, ws);
    float* grad = p.grad_block(n, v0, ws.grad.data());
    reverse_grad_block(s, ws.c.data(), r.log_p, r.centre_s, r.spread, r.grad_scale, count, grad);
    p.store_grad(n, v0, count, grad);
  });
}

// Every row in ranges (run_rows): its anchor, pass 1 of each range (a wide row: then all of it in
// double, wide_row, and no more stages), then (only for a row whose
// largest bridge logit is far above its anchor) a new anchor there and pass 1's bridge half
// again, its log-softmaxes (reverse: its centre), pass 2 of each range, its loss, then (with a
// gradient) pass 3 of each range: reverse, the gradient; either direction, zeros for a loss of
// +inf. An ignored row reads nothing: loss 0, gradient 0.
static void run(const Problem& p, int threads) {
  const int64_t ranges = range_count(p.V), slots = row_slots(p.N, threads);
  std::vector<BridgeRow> rows(size_t(slots), BridgeRow{});
  std::vector<RangeLse> lse_parts(size_t(slots * ranges));
  std::vector<Pass2Sums> loss_parts(size_t(slots * ranges));
  const auto pass1 = [&](int64_t n, int64_t range, int64_t slot, Pass1 run, Workspace& ws) {
    range_lse(p, n, range, rows[slot].bridge, run, ws, &lse_parts[slot * ranges + range]);
  };
  const auto set_softmax = [&](int64_t slot, const RangeLse& row) {
    rows[slot].log_p = LogSoftmax::from_state(row.s, p.inv_temperature);
    rows[slot].log_q = LogSoftmax::from_state(row.c, p.inv_temperature);
    rows[slot].s_max = row.s_max;
  };
  run_rows(
      p.N, threads, 2.0 * double(p.N) * double(p.V), [] { return Workspace(); },
      each_row([&](int64_t n, int64_t slot, Workspace& ws) {
        if (!p.ignored(n)) row_bridge(p, n, rows[slot], ws);
      }),
      each_part(ranges, [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
        if (!p.ignored(n)) pass1(n, range, slot, Pass1::First, ws);
      }),
      each_row([&](int64_t n, int64_t slot, Workspace& ws) {
        if (p.ignored(n)) return;
        const RangeLse row = merge_ranges(&lse_parts[slot * ranges], ranges, p.inv_temperature);
        rows[slot].wide = is_wide(p, row.magnitude);
        // c_max / T > kReanchor (a NaN row, with no c_max, keeps its anchor; a wide row is done below)
        rows[slot].reanchored =
            !rows[slot].wide && row.c_max.at >= 0 && row.c_max.value * p.inv_temperature > kReanchor;
        if (rows[slot].wide) {
          wide_row(p, n, ws);  // (the rare path: the row is done)
        } else if (rows[slot].reanchored) {
          rows[slot].bridge = anchored_at(p, n, located(p, n, rows[slot].bridge, row.c_max, Logits::Bridge, ws), ws);
        } else {
          set_softmax(slot, row);
        }
      }),
      each_part(ranges, [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
        if (!p.ignored(n) && rows[slot].reanchored) pass1(n, range, slot, Pass1::Reanchored, ws);
      }),
      each_row([&](int64_t n, int64_t slot, Workspace& ws) {
        if (p.ignored(n) || rows[slot].wide) return;
        if (rows[slot].reanchored)
          set_softmax(slot, merge_ranges(&lse_parts[slot * ranges], ranges, p.inv_temperature));
        if (p.reverse) centre_row(p, n, rows[slot], ws);
      }),
      each_part(ranges, [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
        if (p.ignored(n)) {
          if (p.grad != nullptr) p.zero_grad(n, range * kRange, range_end(p.V, range));
          return;
        }
        if (rows[slot].wide) return;
        loss_parts[slot * ranges + range] = range_loss(p, n, range, rows[slot], ws);
      }),
      each_row([&](int64_t n, int64_t slot, Workspace&) {
        if (p.ignored(n)) {
          p.loss[n] = 0.0f;
          return;
        }
        if (rows[slot].wide) return;
        Pass2Sums row;
        for (int64_t range = 0; range < ranges; ++range) row += loss_parts[slot * ranges + range];
        // reverse: KL = (its terms' sum) / M (see Precision); the gradient's D = D~ / M (NaN with a NaN
        // loss: a NaN gradient) and 1 / (M T)
        const double kl = p.reverse ? row.kl / row.mass : row.kl;
        if (p.reverse) {
          rows[slot].spread = std::isnan(kl) ? std::numeric_limits<float>::quiet_NaN() : float(row.spread / row.mass);
          rows[slot].grad_scale = float(p.inv_temperature / row.mass);
        }
        rows[slot].loss = float(kl);
        // KL >= 0; rounding can leave -1e-7 where it is 0 (equal distributions). std::max keeps NaN.
        p.loss[n] = float(std::max(kl, 0.0));
      }),
      each_part(p.grad != nullptr ? ranges : 0, [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
        if (p.ignored(n) || rows[slot].wide) return;  // (zeroed above; a wide row's written)
        if (rows[slot].loss == kInf) {
          p.zero_grad(n, range * kRange, range_end(p.V, range));  // (a constant +inf: no gradient)
        } else if (p.reverse) {
          range_reverse_grad(p, n, range, rows[slot], ws);
        }
      }));
}

void bridge_loss(const std::string& student_dtype, const std::string& teacher_dtype, uintptr_t student_ptr,
                 uintptr_t teacher_ptr,
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
  const DType type = parse_dtype(student_dtype);  // (the gradient's too)
  const DType teacher_type = parse_dtype(teacher_dtype);
  const bool any = N > 0;  // empty outputs may come with null data pointers
  const Problem p{RowReader::of(type),
                  RowReader::of(teacher_type),
                  storer_for(type),
                  pointer<const void>(student_ptr, any, "student", element_size(type)),
                  pointer<const void>(teacher_ptr, any, "teacher", element_size(teacher_type)),
                  N, V, stride_sn, stride_sv, stride_tn, stride_tv,
                  pointer<const int64_t>(labels_ptr, false, "labels"),
                  ignore_index,
                  beta_f,
                  inv_t,
                  reverse,
                  pointer<float>(loss_ptr, any, "loss"),
                  compute_grad ? pointer<void>(grad_ptr, any, "grad", element_size(type)) : nullptr,
                  element_size(type)};

  if (N > 0) run(p, threads);
}

}  // namespace

void bind_bridge(py::module_& m) {
  m.def("bridge_loss", &bridge_loss, py::call_guard<py::gil_scoped_release>(),
        "Logit-bridge distillation loss per row (see fastprobe.reference.bridge_rows), with\n"
        "Q = softmax((z_T + beta z_S) / T) a constant: forward KL(Q || P_S), reverse\n"
        "KL(P_S || Q). student_dtype and teacher_dtype name each input's dtype (float32,\n"
        "bfloat16, float16; they may differ). Pointers are data_ptr() values, strides in elements;\n"
        "labels_ptr (0: none) is int64 [N], rows equal to ignore_index get loss 0 and gradient 0.\n"
        "Writes loss [N] (float32) and, with compute_grad, grad [N, V] (contiguous, the student's\n"
        "dtype): the gradient of each row's loss w.r.t. the student logits.",
        py::arg("student_dtype"), py::arg("teacher_dtype"), py::arg("student_ptr"),
        py::arg("teacher_ptr"), py::arg("N"), py::arg("V"), py::arg("stride_sn"),
        py::arg("stride_sv"), py::arg("stride_tn"), py::arg("stride_tv"), py::arg("labels_ptr"),
        py::arg("ignore_index"), py::arg("beta"),
        py::arg("inv_temperature"), py::arg("reverse"), py::arg("loss_ptr"), py::arg("grad_ptr"),
        py::arg("compute_grad"), py::arg("num_threads"));
}

}  // namespace fastprobe
