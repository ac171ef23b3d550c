// draft_divergence: per-token uncertainty of K draft distributions against a
// target (the math of fastprobe.reference.draft_divergence).
//
// Per token n, with s_kv = draft[k, n, v] / T and t_v = target[n, v] / T:
//   q_k = softmax(s_k), p = softmax(t), m = sum_k w_k q_k
//   stats[0] = JSD      = sum_v sum_k w_k q_kv (log q_kv - log m_v)
//   stats[1] = KL(m||p) = sum_v m_v (log m_v - log p_v), +inf if p masks (-inf) a column
//              that some draft of weight > 0 has (finite logit), however small m_v is there
//   Each KL(a || b) is summed as sum_v b_v psi(log a_v - log b_v) (kl_term below), whose
//   terms are >= 0 and second order in the difference, so near-equal distributions keep
//   their relative precision (the plain a (log a - log b) terms cancel to first order). That
//   is KL(a || b) for normalised a and b: the weights sum to 1 (the op rescales them).
//   A run of kLseRun columns with one of the mixture's whose float32 log p_v is below
//   exact_kl_threshold (-inf included: log p_v below -float max at T <= 1 for logits 3e38 and -3e38,
//   where m_v (log m_v - log p_v) can still be finite) has its KL summed again in double
//   (exact_target_kl): a rare path that no row with logits within +-2^100 takes at T >= 1 unless
//   p masks a column the drafts have (below 1, rows with logits ~2^102 T apart: a tiny T).
//   stats[2] = epistemic = stats[0] + stats[1]
//   stats[3] = H(m), stats[4] = H(p), stats[5 + k] = H(q_k)
//   lse[k] = logsumexp(s_k), lse[K] = logsumexp(t)   (float64)
// Without a target, stats rows 1, 2, 4 and lse row K are 0.
//
// Two more modes serve the vocabulary-sharded (tensor-parallel) form, where the input
// holds one shard of the vocabulary and every statistic above is a sum over it:
//   lse_only: pass 1 only; writes the shard's lse in two parts, lse [2, K + 1, N] = (max, log
//             sum) with lse = max / T + log sum, max the row's largest logit, and 0 for every stat.
//   lse_in:   each row's lse over the WHOLE vocabulary is given in the same two parts (float64
//             [2, K + 1, N]), so pass 1 is skipped; pass 2 writes the shard's share of every sum
//             (shares add up over the shards) and lse [K + 1, N] from the parts.
//   (Two parts: a float64 lse holds log sum only to |max / T| 2^-53, and a row with two tied
//   maxima at T = 1e-30 lost its ln 2 in it: p = 1 for each.)
//
// Tokens are spread over OpenMP threads (with few tokens, ranges of a token's vocabulary: see
// kRange). Each token takes two streaming passes over the vocabulary in
// blocks of kBlock: pass 1 folds every row into an online log-sum-exp, pass 2 forms q, m and p
// from it and accumulates all the sums.
// Blocks of 16-bit or strided rows are converted to float32 (unscaled) into per-thread
// buffers of O((K + 1) kBlock) floats; contiguous float32 rows are read in place (RowReader::block).
// The drafts and the target have a dtype each (a float32 draft with a bfloat16 target, or the
// reverse): each is loaded by its own loader, so neither is copied, and the float32 values
// the sums see are those of the input cast up beforehand (the same bits).
// Log-probabilities are formed as (x - max) / T - log(sum)
// with max the row's largest raw logit: x - max is exact near the max, so the
// result keeps float32 precision however large the logits are. A given lse is used the
// same way: (x - shift) / T - offset with shift = lse T rounded to float (near the max)
// and offset the rounding's remainder over T. Block sums are float32 over runs of
// kLseRun terms (common.h: a build that does not vectorise them adds each run's terms in order),
// added in double, as are the per-token accumulators.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace py = pybind11;

namespace fastprobe {
namespace {

// ---- Block kernels: float32 buffers of `count` raw logits, float32 sums. -------

// One draft row: q_v = exp(log q_v) into q, m_v += w q_v, in_m_v = 1 where the row puts
// mass (finite logit, w > 0; q_v itself may underflow); returns sum_v q_v log q_v.
FASTPROBE_SIMD_CLONES static float draft_block(const float* x, LogSoftmax row, float w,
                                               int64_t count, float* q, float* m, float* in_m) {
  float q_log_q = 0.0f;
  const bool weighted = w > 0.0f;
#pragma omp simd reduction(+ : q_log_q)
  for (int64_t v = 0; v < count; ++v) {
    const float log_q = log_prob(row, x[v]);    // log q_v (-inf where masked)
    const float qv = fast_exp(log_q);           // q_v
    q[v] = qv;
    m[v] += w * qv;                             // m_v = sum_k w_k q_kv
    in_m[v] = weighted && x[v] != kNegInf ? 1.0f : in_m[v];  // (log q_v may overflow to -inf)
    q_log_q += qv > 0.0f ? qv * log_q : 0.0f;   // 0 log 0 = 0
  }
  return q_log_q;
}

// Mixture: log m_v into log_m (0 where m_v = 0, never read there); returns sum_v m_v log m_v.
FASTPROBE_SIMD_CLONES static float mixture_block(const float* m, int64_t count, float* log_m) {
  float m_log_m = 0.0f;
#pragma omp simd reduction(+ : m_log_m)
  for (int64_t v = 0; v < count; ++v) {
    const bool positive = m[v] > 0.0f;
    const float lm = positive ? fast_log(m[v]) : 0.0f;  // log m_v
    log_m[v] = lm;
    m_log_m += positive ? m[v] * lm : 0.0f;             // 0 log 0 = 0
  }
  return m_log_m;
}

// KL(a || b) at one v, a (log a - log b) - a + b = b psi(d), d = log a - log b, with
// psi(d) = e^d (d - 1) + 1 = d^2/2 + d^3/3 + d^4/8 + d^5/30 + d^6/144 + d^7/840 + ...
// (sum_v (b_v - a_v) = 0, so the terms add up to KL(a || b)). For |d| < 1/4 the series (to
// d^7: 8e-8 relative); elsewhere a (d - 1) + b, which cancels by at most 1 / psi(-1/4) = 38x
// (a = 0: b, d not read; b = 0 with d finite, b underflowed: a (d - 1); d = +inf: +inf).
// (F = double: exact_target_kl's.)
template <typename F>
FASTPROBE_ALWAYS_INLINE F kl_term(F a, F b, F d) {
  const F series = d * d * (F(0.5) + d * (F(1) / 3 + d * (F(0.125) + d * (F(1) / 30 + d * (F(1) / 144 + d * (F(1) / 840))))));
  const bool near = b > 0 && d < F(0.25) && d > F(-0.25);
  return near ? b * series : (a > 0 ? a * (d - 1) : F(0)) + b;
}

// One draft row against the mixture: returns KL(q || m) = sum_v m_v psi(log q_v - log m_v).
FASTPROBE_SIMD_CLONES static float jsd_block(const float* x, LogSoftmax row, const float* q, const float* m,
                                             const float* log_m, int64_t count) {
  float kl = 0.0f;
#pragma omp simd reduction(+ : kl)
  for (int64_t v = 0; v < count; ++v)  // (m_v = 0: q_v = 0 unless w_k = 0, which weighs the sum 0)
    kl += kl_term(q[v], m[v], log_prob(row, x[v]) - log_m[v]);
  return kl;
}

struct TargetSums {
  float kl;       // sum_v p_v psi(log m_v - log p_v)
  float p_log_p;  // sum_v p_v log p_v
};

// The threshold on log p_v below which target_block leaves a column of the mixture's to
// exact_target_kl, which sums its run's KL again in double: -(2^102 min(scale, 1) + 2^64).
// There log p_v may be -inf though the exact value is finite
// (below -float max: logits more than float max / scale apart), and m_v may have underflowed to 0
// (fast_exp flushes below e^-87) though m_v |log p_v| is not negligible; above it such a term is
// under e^-87 (2^102 + 2^64) ~ 8e-8. (Not capped at scale 1, the bound grew with 1 / T: at
// T = 1e-30 a mass m_v ~ e^-88 where log p_v ~ -2e38, logits 1e8 apart, was dropped from a KL of
// 0.8.) At T >= 1 no row whose logits are all within +-2^100 has a finite log p_v below it
// (>= -(2^101 scale + ln V)), so such rows reach exact_target_kl only for a -inf log p_v, which
// was +inf before; at T < 1 so do rows whose logits are more than ~2^102 T apart (rare: T = 0.5,
// 2.5e30 apart; a tiny T makes them common).
inline float exact_kl_threshold(const LogSoftmax& row) {
  return -(0x1p102f * std::min(row.scale, 1.0f) + 0x1p64f);
}

// Target row against the mixture: p_v = exp(log p_v). A column the mixture has (in_m_v) with
// log p_v below exact_kl_threshold (-inf included: a column the target masks) adds +inf: the
// caller then sums the whole run's KL again by exact_target_kl.
FASTPROBE_SIMD_CLONES static TargetSums target_block(const float* x, LogSoftmax row,
                                                     const float* m, const float* log_m,
                                                     const float* in_m, int64_t count) {
  float kl = 0.0f, p_log_p = 0.0f;
  const float exact_below = exact_kl_threshold(row);
#pragma omp simd reduction(+ : kl, p_log_p)
  for (int64_t v = 0; v < count; ++v) {
    const float log_p = log_prob(row, x[v]);                   // log p_v (-inf where masked)
    const float pv = fast_exp(log_p);                          // p_v
    p_log_p += pv > 0.0f ? pv * log_p : 0.0f;                  // 0 log 0 = 0
    const bool exact_column = in_m[v] > 0.0f && log_p < exact_below;  // (exact_target_kl's)
    // m_v = 0: the term is p_v (log m_v is not formed there)
    const float term = m[v] > 0.0f ? kl_term(m[v], pv, log_m[v] - log_p) : pv;
    kl += exact_column ? kInf : term;
  }
  return {kl, p_log_p};
}

// KL(m || p) over one run, columns [first, first + count) of the draft rows x[k] and the target
// x[K] (in_m: the run's own), whose target_block sum was +inf,
// in double: +inf if the target masks a column the mixture has (a finite logit in a draft of
// weight > 0, however small m_v is there); else every term from log q_kv and log p_v as
// (x - shift) scale - offset and m_v = sum_k w_k q_kv down to e^-745 (a smaller m_v's term
// m_v (log m_v - log p_v) is < 1e-284). A rare path: rows with logits beyond +-2^100, or a tiny T.
static double exact_target_kl(const float* const* x, int64_t first, const LogSoftmax* rows, const float* weights,
                              int64_t K, const float* in_m, int64_t count) {
  auto exact_log_prob = [&](int64_t r, int64_t v) {
    return (double(x[r][first + v]) - double(rows[r].shift)) * double(rows[r].scale) - double(rows[r].offset);
  };
  double kl = 0.0;
  for (int64_t v = 0; v < count; ++v) {
    if (in_m[v] > 0.0f && x[K][first + v] == kNegInf) return kInf;
    double m = 0.0;
    for (int64_t k = 0; k < K; ++k) m += double(weights[k]) * std::exp(exact_log_prob(k, v));
    const double log_p = exact_log_prob(K, v), p = std::exp(log_p);
    kl += m > 0.0 ? kl_term(m, p, std::log(m) - log_p) : p;
  }
  return kl;
}

// ---- Per-token driver. ----------------------------------------------------------

struct Problem {
  RowReader draft_input, target_input;  // each input's own dtype
  const void* draft;  // [K, N, V]
  int64_t K, N, V, stride_dk, stride_dn, stride_dv;
  const void* target;  // [N, V] or nullptr
  int64_t stride_tn, stride_tv;
  const float* weights;  // [K]
  float inv_temperature;
  const double* lse_in;  // [2, K + 1, N] each row's lse over the whole vocabulary (max, log sum), or nullptr
  bool lse_only;         // pass 1 only: stats are 0
  float* stats;  // [5 + K, N]
  double* lse;   // [K + 1, N] (lse_only: [2, K + 1, N], the parts)

  bool has_target() const { return target != nullptr; }
  int64_t rows() const { return has_target() ? K + 1 : K; }  // draft rows, then the target

  // Logits of row r (draft k = r < K, else the target) of token n, elements
  // [v0, v0 + count) of the vocabulary: the row itself for contiguous float32, else
  // converted into scratch.
  const float* load_row(int64_t r, int64_t n, int64_t v0, int64_t count, float* scratch) const {
    const bool is_draft = r < K;
    const RowReader& input = is_draft ? draft_input : target_input;
    const void* base = is_draft ? draft : target;
    const int64_t first =
        is_draft ? r * stride_dk + n * stride_dn + v0 * stride_dv : n * stride_tn + v0 * stride_tv;
    return input.block(base, first, is_draft ? stride_dv : stride_tv, count, scratch);
  }
};

// A token's vocabulary is folded in ranges of kRange logits (common.h): each range's lse states
// (pass 1) and sums (pass 2) start afresh and are merged in range order, so a token's
// statistics are the same bits however many tokens share the call and however many threads
// run it. With few tokens (split_rows in common.h; decoding: one token a call), the ranges of one
// token run on different threads instead of one thread taking the whole vocabulary.

// The sums of a range, or of a token (every one 0 until pass 2 adds to it): slots
// jsd, m_log_m, kl_mt, p_log_p, then sum_v q_kv log q_kv for every draft k.
enum SumSlot : int64_t { kJsd, kMLogM, kKlMt, kPLogP, kQLogQ };

// Per-thread scratch, allocated once per thread.
struct Workspace {
  explicit Workspace(int64_t K)
      : logits(scratch_floats((K + 1) * kBlock)), q(scratch_floats(K * kBlock)), m(scratch_floats(kBlock)),
        log_m(scratch_floats(kBlock)), in_m(scratch_floats(kBlock)), rows(size_t(K + 1)) {}

  float* logits_row(int64_t r) { return logits.data() + r * kBlock; }
  float* q_row(int64_t k) { return q.data() + k * kBlock; }

  std::vector<float> logits;  // [K + 1, kBlock] converted logits of the current block
  std::vector<float> q;       // [K, kBlock] q_kv of the current block
  std::vector<float> m;       // [kBlock] m_v
  std::vector<float> log_m;   // [kBlock] log m_v
  std::vector<float> in_m;    // [kBlock] 1 where some draft of weight > 0 has a finite logit
  std::vector<const float*> rows;  // [K + 1] the current block's logits (load_row)
};

// Pass 1 over range `range` of token n: a fresh online log-sum-exp of every row into lse[r].
static void range_lse(const Problem& p, int64_t n, int64_t range, Workspace& ws, LseState* lse) {
  std::fill(lse, lse + p.rows(), LseState{});
  for_blocks(p.V, range, [&](int64_t v0, int64_t count) {
    for (int64_t r = 0; r < p.rows(); ++r)
      lse_block(lse[r], p.load_row(r, n, v0, count, ws.logits_row(r)), count, p.inv_temperature);
  });
}

// Pass 2 over range `range` of token n, from the rows' log-softmax: every sum into sums[slot].
static void range_sums(const Problem& p, int64_t n, int64_t range, const LogSoftmax* log_softmax,
                       Workspace& ws, double* sums) {
  std::fill(sums, sums + kQLogQ + p.K, 0.0);
  for_blocks(p.V, range, [&](int64_t v0, int64_t count) {
    for (int64_t r = 0; r < p.rows(); ++r) ws.rows[r] = p.load_row(r, n, v0, count, ws.logits_row(r));

    // Every term is of one v: the kernels take the block in runs of kLseRun (common.h), each
    // run's float32 sums added in double.
    for_runs(count, [&](int64_t first, int64_t run) {
      float *m = ws.m.data() + first, *log_m = ws.log_m.data() + first, *in_m = ws.in_m.data() + first;
      std::fill(m, m + run, 0.0f);
      std::fill(in_m, in_m + run, 0.0f);
      for (int64_t k = 0; k < p.K; ++k)
        sums[kQLogQ + k] +=
            draft_block(ws.rows[k] + first, log_softmax[k], p.weights[k], run, ws.q_row(k) + first, m, in_m);
      sums[kMLogM] += mixture_block(m, run, log_m);
      // JSD = sum_k w_k KL(q_k || m)
      for (int64_t k = 0; k < p.K; ++k)
        sums[kJsd] += double(p.weights[k]) *
                      jsd_block(ws.rows[k] + first, log_softmax[k], ws.q_row(k) + first, m, log_m, run);
      if (p.has_target()) {
        const TargetSums t = target_block(ws.rows[p.K] + first, log_softmax[p.K], m, log_m, in_m, run);
        // a column below exact_kl_threshold, or float32 overflow: summed again exactly
        sums[kKlMt] += t.kl == kInf ? exact_target_kl(ws.rows.data(), first, log_softmax, p.weights, p.K, in_m, run)
                                    : double(t.kl);
        sums[kPLogP] += t.p_log_p;
      }
    });
  });
}

// Token n's lse (float64, in two parts: [r] the row's max, [rows + r] log sum; lse = max / T +
// log sum) and log-softmax of every row from its ranges' lse states (lse_parts[range * rows +
// r]), or from the given parts (lse_in mode; a sharded row's max is one of its float32 logits).
static void token_log_softmax(const Problem& p, int64_t n, int64_t ranges, const LseState* lse_parts,
                              double* row_lse, LogSoftmax* log_softmax) {
  const int64_t rows = p.rows();
  for (int64_t r = 0; r < rows; ++r) {
    if (p.lse_in != nullptr) {
      row_lse[r] = p.lse_in[r * p.N + n];
      row_lse[rows + r] = p.lse_in[(p.K + 1 + r) * p.N + n];
      log_softmax[r] = LogSoftmax::make(float(row_lse[r]), p.inv_temperature, float(row_lse[rows + r]));
      continue;
    }
    LseState state = lse_parts[r];
    for (int64_t range = 1; range < ranges; ++range)
      merge_lse(state, lse_parts[range * rows + r], p.inv_temperature);
    row_lse[r] = state.max;  // (a row of -inf: max -inf, log sum -inf)
    row_lse[rows + r] = std::log(double(state.sum));
    log_softmax[r] = LogSoftmax::from_state(state, p.inv_temperature);
  }
}

// lse = max / T + log sum from its parts, as LseState::value forms it (the same bits).
static double lse_from_parts(double max, double log_sum, float scale) {
  return log_sum == -std::numeric_limits<double>::infinity() ? log_sum : double(scale) * max + log_sum;
}

// Writes token n's column of stats and lse from its ranges' sums (sum_parts[range * slots +
// slot], slots = kQLogQ + K; none in lse_only mode: every stat 0).
static void write_token(const Problem& p, int64_t n, int64_t ranges, const double* sum_parts,
                        const double* row_lse) {
  const int64_t slots = kQLogQ + p.K;
  auto total = [&](int64_t slot) {
    double sum = 0.0;
    for (int64_t range = 0; sum_parts != nullptr && range < ranges; ++range) sum += sum_parts[range * slots + slot];
    return sum;
  };
  // JSD >= 0, and so is a shard's share of it (terms >= 0); KL(m || p) >= 0 over the whole
  // vocabulary (a shard's share is clamped by the caller once they are added up). Clamped, as
  // rounding can leave a small negative where they are 0 (K = 1, equal drafts); std::max keeps
  // a NaN.
  const double jsd = std::max(total(kJsd), 0.0);
  const double kl_mt = p.lse_in == nullptr ? std::max(total(kKlMt), 0.0) : total(kKlMt);
  auto stat = [&](int64_t row) -> float& { return p.stats[row * p.N + n]; };
  stat(0) = float(jsd);
  stat(1) = p.has_target() ? float(kl_mt) : 0.0f;
  stat(2) = p.has_target() ? float(jsd + kl_mt) : 0.0f;  // = sum_k w_k KL(q_k || p)
  stat(3) = float(-total(kMLogM));                        // H(m)
  stat(4) = p.has_target() ? float(-total(kPLogP)) : 0.0f;  // H(p)
  for (int64_t k = 0; k < p.K; ++k) stat(5 + k) = float(-total(kQLogQ + k));  // H(q_k)
  // the lse (lse_only: its two parts) of each row, 0 for a missing target
  const int64_t rows = p.rows();
  for (int64_t r = 0; r <= p.K; ++r) {
    const bool has = r < rows;
    if (p.lse_only) {
      p.lse[r * p.N + n] = has ? row_lse[r] : 0.0;
      p.lse[(p.K + 1 + r) * p.N + n] = has ? row_lse[rows + r] : 0.0;
    } else {
      p.lse[r * p.N + n] = has ? lse_from_parts(row_lse[r], row_lse[rows + r], p.inv_temperature) : 0.0;
    }
  }
}

// Every token in ranges (run_rows): pass 1 of each range, the token's log-softmax, pass 2 of each
// range, its statistics written.
static void run(const Problem& p, int threads) {
  const int64_t ranges = range_count(p.V), slots = row_slots(p.N, threads), rows = p.rows(), sums = kQLogQ + p.K;
  std::vector<LseState> lse_parts(size_t(slots * ranges * rows));
  std::vector<double> sum_parts(size_t(slots * ranges * sums)), row_lse(size_t(slots * 2 * rows));
  std::vector<LogSoftmax> log_softmax(size_t(slots * rows));
  run_rows(
      p.N, threads, double(rows) * double(p.N) * double(p.V), [&] { return Workspace(p.K); },
      each_part(p.lse_in == nullptr ? ranges : 0,
                [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
                  range_lse(p, n, range, ws, lse_parts.data() + (slot * ranges + range) * rows);
                }),
      each_row([&](int64_t n, int64_t slot, Workspace&) {
        token_log_softmax(p, n, ranges, lse_parts.data() + slot * ranges * rows, row_lse.data() + slot * 2 * rows,
                          log_softmax.data() + slot * rows);
      }),
      each_part(p.lse_only ? 0 : ranges,
                [&](int64_t n, int64_t range, int64_t slot, Workspace& ws) {
                  range_sums(p, n, range, log_softmax.data() + slot * rows, ws,
                             sum_parts.data() + (slot * ranges + range) * sums);
                }),
      each_row([&](int64_t n, int64_t slot, Workspace&) {
        write_token(p, n, ranges, p.lse_only ? nullptr : sum_parts.data() + slot * ranges * sums,
                    row_lse.data() + slot * 2 * rows);
      }));
}

void draft_divergence(const std::string& draft_dtype, const std::string& target_dtype, uintptr_t draft_ptr,
                      int64_t K, int64_t N, int64_t V, int64_t stride_dk, int64_t stride_dn, int64_t stride_dv,
                      uintptr_t target_ptr, int64_t stride_tn, int64_t stride_tv,
                      uintptr_t weights_ptr, double inv_temperature, uintptr_t lse_in_ptr,
                      bool lse_only, uintptr_t stats_ptr, uintptr_t lse_ptr, int64_t num_threads) {
  check_size(K, 1, "K");
  check_size(N, 0, "N");
  check_size(V, 1, "V");
  const int threads = clamp_threads(num_threads);
  const float inv_t = checked_inv_temperature(inv_temperature);
  if (lse_only && lse_in_ptr != 0)
    throw std::invalid_argument("fastprobe._C: lse_only computes the lse, so lse_in must be 0");
  check_layout("draft", {K, N, V}, {stride_dk, stride_dn, stride_dv});
  if (target_ptr != 0) check_layout("target", {N, V}, {stride_tn, stride_tv});
  check_layout("stats", {5 + K, N});
  check_layout("lse", {lse_only ? 2 * (K + 1) : K + 1, N});
  const bool any = N > 0;  // empty outputs may come with null data pointers
  const DType draft_type = parse_dtype(draft_dtype);
  const DType target_type = parse_dtype(target_dtype);  // (checked, and unused, without a target)
  const Problem p{RowReader::of(draft_type),
                  RowReader::of(target_type),
                  pointer<const void>(draft_ptr, any, "draft", element_size(draft_type)),
                  K, N, V, stride_dk, stride_dn, stride_dv,
                  pointer<const void>(target_ptr, false, "target", element_size(target_type)),
                  stride_tn, stride_tv,
                  pointer<const float>(weights_ptr, any, "weights"),
                  inv_t,
                  pointer<const double>(lse_in_ptr, false, "lse_in"),
                  lse_only,
                  pointer<float>(stats_ptr, any, "stats"),
                  pointer<double>(lse_ptr, any, "lse")};

  if (N > 0) run(p, threads);
}

}  // namespace

void bind_divergence(py::module_& m) {
  m.def("draft_divergence", &draft_divergence, py::call_guard<py::gil_scoped_release>(),
        "Draft/target divergence statistics per token (see fastprobe.reference.draft_divergence).\n"
        "draft_dtype and target_dtype name each input's dtype (float32, bfloat16, float16; they may\n"
        "differ, each is read in its own; without a target (target_ptr 0) pass any of them, e.g. the\n"
        "draft's). Pointers are data_ptr() values, strides are in elements; writes stats [5 + K, N]\n"
        "(float32) and lse [K + 1, N] (float64), both contiguous. lse_in_ptr (0: compute it)\n"
        "gives each row's float64 lse over the whole vocabulary, of which the input is one\n"
        "shard, in two parts [2, K + 1, N] (max, log sum: lse = max / T + log sum): stats are\n"
        "then this shard's shares of every sum. lse_only: pass 1 only, stats are 0 and lse is\n"
        "[2, K + 1, N], the two parts.",
        py::arg("draft_dtype"), py::arg("target_dtype"), py::arg("draft_ptr"), py::arg("K"), py::arg("N"),
        py::arg("V"),
        py::arg("stride_dk"), py::arg("stride_dn"), py::arg("stride_dv"), py::arg("target_ptr"),
        py::arg("stride_tn"), py::arg("stride_tv"), py::arg("weights_ptr"),
        py::arg("inv_temperature"), py::arg("lse_in_ptr"), py::arg("lse_only"),
        py::arg("stats_ptr"), py::arg("lse_ptr"),
        py::arg("num_threads"));
}

}  // namespace fastprobe
