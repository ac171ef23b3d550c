"""Fused logit-bridge distillation loss kernel (Triton): the math of ``fastprobe.reference.bridge_rows``.

One program per row n, with student logits x = z_S, teacher logits y = z_T, c = inv_T * log2(e).
The bridge target is Q = softmax(t), t = (y + beta x) / T (x stop-gradient), P = softmax(x / T).
The kernel works in base 2 and converts to natural units (times ln 2) only where it stores:

  pass 1 (vocabulary blocks, forward): online log-sum-exp of x and of the bridged logit
        u = (y - a_T) + beta (x - a_S)          (= T t less a constant, which softmax ignores)
        kept PER LANE (running max m_j and sum s_j = sum 2^((x - m_j) c), one exp2 per element),
        reduced across lanes once after the loop: M = max_j m_j, S = sum_j s_j 2^((m_j - M) c);
        then log2 P_v = (x_v - M_x) c - log2 S_x and log2 Q_v = (u_v - M_u) c - log2 S_u
        (rare: a row whose M_u lies more than 64 T above its anchor is re-anchored at a token
        within T of M_u, and u's log-sum-exp taken again, see Precision); reverse, also the
        token of the row's first largest x (per lane the block where its maximum last rose)
  pass 2 (vocabulary blocks, REVERSE order, so the last blocks of pass 1 are L2 hits):
        the loss, from the exps P~ = 2^(log2 P), Q~ = 2^(log2 Q) as formed (see Precision):
        forward: loss = sum_v Q~_v ln(Q~_v / P~_v) - Q~_v + P~_v,  grad_v = (P_v - Q_v) / T (stored here)
        reverse: loss = (sum_v P~_v ln(P~_v / Q~_v) - P~_v + Q~_v) / M,  M = sum_v P~_v  (per-lane
                 float32 sums, one float64 reduce); and for pass 3, g = log P - log Q centred at a
                 token e (see Precision): D = sum_v P_v d_v, d_v = g_v - g_e, summed as
                 D~ = sum_v P~_v d_v, D = D~ / M
  pass 3 (reverse direction with a gradient only, forward order: pass 2 ended at block 0):
        grad_v = P_v (g_v - loss) / T = P~_v (d_v - D) / (M T),  D = D~ / M

Precision: the maxima are subtracted from RAW logits before scaling (x - M is exact for nearby
values). The bridged logit is formed from logits less the anchors a_T = y_a, a_S = x_a of one
token a (a_S = 0 where x_a = -inf, beta = 0), so both differences are exact for tokens near a,
and a must sit where Q's mass is: at the largest y + beta x, not at the largest logits (with
beta < 0 those are among the student's lowest; for any beta an outlier may lie past the first
block). a is first the token of the row's first block with the largest y + beta x (none finite:
a_T = a_S = 0); if pass 1 finds M_u more than 64 T above it, a rare path finds the first token
whose u is within T of M_u (M_u's own, or one as good), makes it the anchor and takes u's
log-sum-exp again (ordinary rows' largest bridged logit lies within tens of T of their first
block's). Below 64 T, u is rounded by at most 2^-24 64 T, moving log Q by 4e-6; so rows with
logits ~1e4 keep float32 accuracy. (As the C++ kernel, csrc/bridge.cpp, which re-anchors at M_u's
own token: the margin of T keeps the search from depending on recomputing M_u to the bit.)
The reverse direction's g and loss are of the KL's size (~1e4 when beta < 0 puts Q's mass far from
P's), so P (g - loss) would cancel numbers of that size (errors ~1e-3). Its passes 2 and 3 centre g
at a token e where P's mass is, with the bridge anchored at e (e_T = y_e, e_S = x_e):
        d_v = g_v - g_e = ((x_v - e_S) - u'_v) / T,  u'_v = (y_v - e_T) + beta (x_v - e_S)
so d and D are differences of logits near e where P has mass, exact there (the loss's log Q~ stay
those of pass 1's u, whose exps its log-sum-exp summed: u' is u - u_e rounded otherwise, by ~2^-24
|u'|, many T at small T, and M_u moved by u_e would make Q's top exp 2^(+-2^-24 |u'| c): inf or 0).
e is the token of the row's largest x (its first), found in pass 1: a token with little of P's mass
(the first block's largest x, 20 below the row's, as this kernel took before) can have g_e far from
the loss (a teacher logit 1e3 below there: g_e ~ 1e3 for a loss of ~5), and d ~ g_e is then rounded
by ~1e-4 where P has mass.
Even at the largest x, D can be larger than the loss, and the float32 log-sum-exp's relative error
r (P~ = P (1 + r), log P~ = log P + r) would reach the gradient through D~ = D (1 + r): pass 2 also
sums the mass it forms, M = sum_v P~_v, and normalises by it (exact to first order in r):
grad_v = P~_v (d_v - D~ / M) / (M T).
The losses: the float32 log-sum-exps make P~ = P e^f, Q~ = Q e^r for constants f, r of the row.
The terms A~ ln(A~ / B~) - A~ + B~ (A = Q, B = P forward; A = P, B = Q reverse) sum to KL (1 + f_A)
+ O(f^2): the constants cancel to first order, and the reverse, which sums M = sum P~ for its
gradient anyway, divides by it, leaving O(f^2). In both, the derivatives in each log-probability
(A_v x_v and B_v - A_v, x_v = ln A_v - ln B_v) vanish where P and Q are near, so each one's own
rounding reaches the loss to second order only: a student 1e-3 from its teacher (KL ~5e-7) is
typically 0.4-1% off, where Q ln(Q / P) summed alone was 7-40% off and the reverse formed as
g~_e + D 8-22% (what is left is each exp's own rounding). As the C++ kernel (csrc/bridge.cpp).
Pass 2's sums are per lane in float32 (each lane adds one term per block), their lanes reduced in
float64 (a float32 tree's top levels round D~ ~ 1e3 by ~5e-5); the float32 roundings of d_v ~ 1e3
remain (~1e-4 each, averaging out over the row).
Wide logits (not handled here; the C++ kernel computes such rows in double): logits more than
float32's largest value apart (3e38 and -3e38, a student's or a teacher's) make the float32
differences above overflow for finite logits, and the supports are read from the results. So
where a log-probability lies below -3.4e38 (log2 P or log2 Q -inf) and the other distribution's
probability there is > 0, the loss is +inf where the reference's is finite (teacher [3e38, -3e38, 0],
student [0, -100, 0]: reverse 1.5e38, any beta; the student's, forward, beta = 0); u less its anchor
overflowing to -inf at a finite student logit (student [3e38, -3e38, 0], beta = 0.5) masks Q there,
so a reverse loss +inf (forward: +inf at T = 1) where the reference's is 0; and beta x overflowing
to +inf (the same student, beta = 2) makes the row's loss and gradient NaN where the reference's
are 0. Fixing this here costs ordinary rows: a per-row wide test in pass 1 (the largest finite |x|,
|y| per lane) added ~18% to pass 1's loop body on sm_90 and, with a float64 rare path in the
kernel, 71 -> 126 registers; reading Q's and P's masks from x and y in pass 2 (fixes the beta = 0.5
rows only) +1 to +20 instructions in its loop body and a 4-8 byte spill (float32 reverse).

Dtypes: student and teacher may differ (float32, bfloat16, float16 each): Triton specialises the
kernel on each pointer's element type, every load is in that input's own dtype and is converted to
float32 (exactly) before any arithmetic, so a launch gives the bits of one with the narrower input
cast up beforehand (with the same block size). The gradient is stored in the student's dtype.

Conventions: 0 log 0 = 0 (every x log y is guarded by x == 0); -inf logits are masked
vocabulary. A student -inf contributes beta x = 0 to the bridge when beta == 0 (t = y / T:
plain distillation, so Q > 0 with P = 0 there and the forward loss is +inf, correctly), and
makes t = -inf (Q = 0) when beta != 0 (for beta > 0 that is the limit P_S^beta -> 0; for
beta < 0 it keeps masked vocabulary masked instead of giving the bridge +inf logits). A row with
no finite logit (student or bridge) has no P or no Q: its loss and gradient are NaN (as in the
C++ kernel and the reference; in reverse, entries where P = 0 keep gradient 0), found without a
host synchronisation.
A loss of +inf (reverse: Q = 0 where P > 0; forward, beta = 0: P = 0 where Q > 0) stays +inf
for every nearby z_S (its supports do not move), so the row's gradient is 0 (as the reference's
autograd gives). On a GPU exp2 flushes results below 2^-126 to 0, so such probabilities count
as 0.
NaN input gives a NaN loss. Rows with labels[n] == ignore_index get loss 0 and a zero gradient
row. beta, inv_temperature and ignore_index are runtime scalars (never tl.constexpr).
"""

# No `from __future__ import annotations`: Triton 3.0's interpreter takes a parameter as
# constexpr only when its annotation is the tl.constexpr object, not the string "tl.constexpr".

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backend import autotune_enabled, interpreter_enabled
from ..ops._common import check_float32_range
from ._launch import FP_FUSION, LOGIT_DTYPES, autotune, check_inv_temperature, launch_tuned, next_pow2, settle_cache_keys

__all__ = ["bridge_loss"]

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)
# A row is re-anchored when pass 1 finds a bridged logit this many temperatures above its anchor
# (csrc/bridge.cpp's kReanchor): below, u is rounded by at most 2^-24 * 64 T (log Q by 4e-6).
_REANCHOR = tl.constexpr(64.0)


@triton.jit
def _block_columns(start, V, BLOCK_V: tl.constexpr):
    """Vocabulary ids [start, start + BLOCK_V) as int64, and which of them are < V."""
    offs_v = start + tl.arange(0, BLOCK_V)
    return offs_v.to(tl.int64), offs_v < V


@triton.jit
def _load_row(row, col, v_ok, stride_v):
    """A [BLOCK_V] block of one row's logits, in their dtype, -inf past V (none loads past V)."""
    return tl.load(row + col * stride_v, mask=v_ok, other=float("-inf"))


@triton.jit
def _load_pair(s_row, t_row, start, V, stride_sv, stride_tv, BLOCK_V: tl.constexpr):
    """Block [start, start + BLOCK_V) of the student's and the teacher's row, in their dtype;
    columns outside [0, V) load nothing (-inf)."""
    col, v_ok = _block_columns(start, V, BLOCK_V)
    v_ok = v_ok & (col >= 0)
    return _load_row(s_row, col, v_ok, stride_sv), _load_row(t_row, col, v_ok, stride_tv)


@triton.jit
def _bridged(y, x, a_t, a_s, beta, masked_bx):
    """u = (y - a_T) + beta (x - a_S): the raw bridged logit y + beta x less a_T + beta a_S,
    formed from small differences so it is never rounded at the logits' magnitude.
    A masked student logit (x = -inf) contributes masked_bx: 0 if beta == 0, else -inf; with
    beta == 0 every x contributes 0 (x - a_S overflows to +-inf for logits more than float max
    apart, and 0 inf would be NaN)."""
    bx = tl.where((x == float("-inf")) | (beta == 0.0), masked_bx, beta * (x - a_s))
    return (y - a_t) + bx


@triton.jit
def _lse_step_lanes(x, mx, s, c):
    """Online log-sum-exp kept per lane, with one exp2 per element:
    mx_j = max seen x_j, s_j = sum seen 2^((x_j - mx_j) c).
    If x > mx: s = s 2^((mx - x) c) + 1, else s = s + 2^((x - mx) c), i.e. 2^(-|x - mx| c) either
    way; x = -inf adds 0 (so -inf - -inf never appears); a NaN x makes s NaN."""
    e = tl.exp2(tl.where(x == float("-inf"), float("-inf"), -tl.abs(x - mx)) * c)
    s = tl.where(x > mx, s * e + 1.0, s + e)
    return tl.maximum(mx, x), s


@triton.jit
def _anchors_at(s_row, t_row, col, V, a_t, a_s, stride_sv, stride_tv):
    """The anchors (a_T, a_S) = (y_col, x_col) at vocabulary id col (a_S = 0 where x_col = -inf:
    only beta = 0 takes such a token; a_T = 0 where y_col is not finite: only a reverse centre the
    teacher masks, whose row's loss is +inf), or the given ones when col >= V (no token found)."""
    found = col < V
    col = col.to(tl.int64)  # (col * stride in int64, as every address)
    x_a = tl.load(s_row + col * stride_sv, mask=found, other=0.0).to(tl.float32)
    y_a = tl.load(t_row + col * stride_tv, mask=found, other=0.0).to(tl.float32)
    y_a = tl.where(tl.abs(y_a) < float("inf"), y_a, 0.0)
    return tl.where(found, y_a, a_t), tl.where(found, tl.where(x_a == float("-inf"), 0.0, x_a), a_s)


@triton.jit
def _first_largest(w, V):
    """The largest finite value of a first block's w and its first vocabulary id (-inf and V if w has
    no finite value; NaN and +inf are left out)."""
    finite = tl.where(tl.abs(w) < float("inf"), w, float("-inf"))
    largest = tl.max(finite, axis=0)
    at = tl.argmax(finite, axis=0).to(tl.int64)  # (the first of equal values)
    return largest, tl.where(largest > float("-inf"), at, V)


@triton.jit
def _first_anchors(s_row, t_row, x, y, V, beta, masked_bx, stride_sv, stride_tv):
    """The anchors at the first block's first token (x, y: its logits) with the largest finite
    y + beta x (formed as u with zero anchors: rounded, it only locates the token); (0, 0) if none
    is finite (the row has no Q)."""
    _, at = _first_largest(_bridged(y, x, 0.0, 0.0, beta, masked_bx), V)
    return _anchors_at(s_row, t_row, at, V, 0.0, 0.0, stride_sv, stride_tv)


# (not inlined: inlined, this loop's registers added to the whole kernel's, on sm_90 up to 40 more
# per thread where V is not a multiple of 16; called, the kernel keeps about its old count)
@triton.jit(noinline=True)
def _first_reaching(s_row, t_row, V, a_t, a_s, beta, masked_bx, stride_sv, stride_tv, threshold,
                    BLOCK_V: tl.constexpr):
    """The rare path: the row's first vocabulary id whose u is >= threshold, or 0x7FFFFFFF (>= V)
    if there is none. Per lane the first such id, one reduction after the loop (a reduction per
    block cost more registers)."""
    first = tl.full([BLOCK_V], 0x7FFFFFFF, tl.int32)
    for b in range(0, tl.cdiv(V, BLOCK_V)):
        x, y = _load_pair(s_row, t_row, b * BLOCK_V, V, stride_sv, stride_tv, BLOCK_V)
        w = _bridged(y.to(tl.float32), x.to(tl.float32), a_t, a_s, beta, masked_bx)
        first = tl.minimum(first, tl.where(w >= threshold, b * BLOCK_V + tl.arange(0, BLOCK_V), 0x7FFFFFFF))
    return tl.min(first, axis=0)


@triton.jit
def _centred_gap(x, y, e_t, e_s, beta, masked_bx, inv_temperature):
    """Reverse, centred at token e (anchors e_T = y_e, e_S = x_e): d = g - g_e = ((x - e_S) - u') / T
    (natural units), u' = (y - e_T) + beta (x - e_S), and where Q masks the entry (u' = -inf)."""
    u = _bridged(y, x, e_t, e_s, beta, masked_bx)
    return ((x - e_s) - u) * inv_temperature, u == float("-inf")


@triton.jit
def _pass1(s_row, t_row, x_next, y_next, V, a_t, a_s, beta, masked_bx, c, stride_sv, stride_tv,
           STUDENT: tl.constexpr, TOP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Pass 1 from the first block's logits (x_next, y_next, loaded by the caller): the row's
    (M, log2 S) of x (only if STUDENT, else unused values) and of u: per-lane online log-sum-exps,
    one cross-lane reduce after; and (TOP, with STUDENT, else V) the vocabulary id of the row's
    first largest finite x (V if none): per lane the block where its maximum rose last."""
    top_block = tl.zeros([BLOCK_V], tl.int32)  # (TOP) per lane: the block of its first largest x
    mx_s = tl.full([BLOCK_V], float("-inf"), tl.float32)
    sum_s = tl.zeros([BLOCK_V], tl.float32)
    mx_u = tl.full([BLOCK_V], float("-inf"), tl.float32)
    sum_u = tl.zeros([BLOCK_V], tl.float32)
    for b in range(0, tl.cdiv(V, BLOCK_V)):
        x, y = x_next.to(tl.float32), y_next.to(tl.float32)
        x_next, y_next = _load_pair(s_row, t_row, (b + 1) * BLOCK_V, V, stride_sv, stride_tv, BLOCK_V)
        if STUDENT:
            if TOP:
                top_block = tl.where(x > mx_s, b, top_block)  # (strictly above: a lane's first)
            mx_s, sum_s = _lse_step_lanes(x, mx_s, sum_s, c)
        mx_u, sum_u = _lse_step_lanes(_bridged(y, x, a_t, a_s, beta, masked_bx), mx_u, sum_u, c)
    shift_s, log2s_s = _lse_combine(mx_s, sum_s, c)
    shift_u, log2s_u = _lse_combine(mx_u, sum_u, c)
    top = tl.zeros([], tl.int64) + V
    if STUDENT and TOP:  # the least id among the lanes holding the row's largest x, if finite
        lane_top = top_block * BLOCK_V + tl.arange(0, BLOCK_V)
        top = tl.min(tl.where(mx_s == shift_s, lane_top, 0x7FFFFFFF), axis=0).to(tl.int64)
        top = tl.where(tl.abs(shift_s) < float("inf"), top, V)
    return shift_s, log2s_s, shift_u, log2s_u, top


@triton.jit
def _lse_combine(mx, s, c):
    """Reduce the per-lane (mx_j, s_j) to the row's (M, log2 S), M = max_j mx_j,
    S = sum_j s_j 2^((mx_j - M) c), to form log2 prob = (x - M) c - log2 S. A row with no finite
    value has no distribution: (0, NaN), so every log2 prob of it is NaN; a NaN S stays NaN."""
    m = tl.max(mx, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(s * tl.exp2((mx - shift) * c), axis=0)  # lanes with mx_j = -inf have s_j = 0
    return shift, tl.where(total == 0.0, float("nan"), tl.log2(total))


@triton.jit
def _xratio(a, a_has, b_masked, log_ratio):
    """a log(a / b), given log_ratio (any base), with 0 log 0 = 0; +inf where a has the entry
    (a_has: its logit is finite, even if a underflows to 0 and log2 a to -inf, for logits over
    2.4e38 below the row's largest) and b masks it: the supports decide; NaN stays NaN."""
    outside = a_has & b_masked
    return tl.where(outside, float("inf"), tl.where(a == 0.0, 0.0, a * log_ratio))


@triton.jit
def _zero_row(g_row, V, BLOCK_V: tl.constexpr):
    """A gradient row of zeros (an ignored row, or one whose loss is +inf)."""
    zero = tl.zeros([BLOCK_V], tl.float32).to(g_row.dtype.element_ty)
    for b in range(0, tl.cdiv(V, BLOCK_V)):
        col, v_ok = _block_columns(b * BLOCK_V, V, BLOCK_V)
        tl.store(g_row + col, zero, mask=v_ok)


@triton.jit
def _bridge_kernel(
    s_ptr,  # [N, V] student logits, float32 / bfloat16 / float16, any strides
    t_ptr,  # [N, V] teacher logits, float32 / bfloat16 / float16 (the student's or another), any strides
    labels_ptr,  # [N] int64 (a dummy when not HAS_LABELS)
    loss_ptr,  # [N] float32 contiguous (out)
    grad_ptr,  # [N, V] contiguous, the student's dtype (out; a dummy when not HAS_GRAD)
    beta,  # runtime float
    inv_temperature,  # runtime float
    ignore_index,  # runtime int
    V,
    stride_sn,
    stride_sv,
    stride_tn,
    stride_tv,
    HAS_LABELS: tl.constexpr,
    REVERSE: tl.constexpr,  # KL(P || Q) instead of KL(Q || P)
    HAS_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + n * stride_sn
    t_row = t_ptr + n * stride_tn
    g_row = grad_ptr + n * V
    nblk = tl.cdiv(V, BLOCK_V)

    if HAS_LABELS:
        keep = tl.load(labels_ptr + n) != ignore_index
    else:
        keep = True
    if keep:
        c = inv_temperature * _LOG2E  # x inv_T = (x c) / log2(e): base-2 exponent scale
        masked_bx = tl.where(beta == 0.0, 0.0, float("-inf"))

        # Every pass loads block b + 1 (in its order) before it works on block b, and carries
        # it into the next iteration: the loads travel while a block is worked on.
        # ---- anchors: the first block's token with the largest bridged logit y + beta x ----
        x_next, y_next = _load_pair(s_row, t_row, 0, V, stride_sv, stride_tv, BLOCK_V)
        a_t, a_s = _first_anchors(s_row, t_row, x_next.to(tl.float32), y_next.to(tl.float32), V, beta, masked_bx,
                                  stride_sv, stride_tv)

        # ---- pass 1: online log-sum-exps of x and u; reverse, the centre: the row's first largest x ----
        shift_s, log2s_s, shift_u, log2s_u, centre = _pass1(s_row, t_row, x_next, y_next, V, a_t, a_s, beta,
                                                            masked_bx, c, stride_sv, stride_tv, True, REVERSE,
                                                            BLOCK_V)
        # (rare) the largest u lies over 64 T above the anchor: re-anchor at the first token within
        # T of it (the largest u, or one as good: u ends <= T above the anchor) and take u's
        # log-sum-exp again (x's does not depend on the anchor)
        if (shift_u * inv_temperature > _REANCHOR) & (shift_u < float("inf")):
            at = _first_reaching(s_row, t_row, V, a_t, a_s, beta, masked_bx, stride_sv, stride_tv,
                                 shift_u - 1.0 / inv_temperature, BLOCK_V)
            a_t, a_s = _anchors_at(s_row, t_row, at, V, a_t, a_s, stride_sv, stride_tv)
            x_first, y_first = _load_pair(s_row, t_row, 0, V, stride_sv, stride_tv, BLOCK_V)
            _, _, shift_u, log2s_u, _ = _pass1(s_row, t_row, x_first, y_first, V, a_t, a_s, beta, masked_bx, c,
                                               stride_sv, stride_tv, False, False, BLOCK_V)

        if REVERSE:
            e_t, e_s = _anchors_at(s_row, t_row, centre, V, 0.0, 0.0, stride_sv, stride_tv)
            zero = tl.zeros([], tl.float64)  # (zero + a float32 value: that value in float64)

        # ---- pass 2 (blocks in reverse): the loss; forward also stores the gradient, reverse sums D~ for it ----
        acc = tl.zeros([BLOCK_V], tl.float32)  # per-lane sums of the loss's terms
        if REVERSE:
            mass = tl.zeros([BLOCK_V], tl.float32)  # M = sum P~
            spread = tl.zeros([BLOCK_V], tl.float32)  # D~ = sum P~ d
        x_next, y_next = _load_pair(s_row, t_row, (nblk - 1) * BLOCK_V, V, stride_sv, stride_tv, BLOCK_V)
        for i in range(0, nblk):
            col, v_ok = _block_columns((nblk - 1 - i) * BLOCK_V, V, BLOCK_V)
            x, y = x_next.to(tl.float32), y_next.to(tl.float32)
            # (the block before block 0 starts at -BLOCK_V: every column masked, nothing loads)
            x_next, y_next = _load_pair(s_row, t_row, (nblk - 2 - i) * BLOCK_V, V, stride_sv, stride_tv, BLOCK_V)
            # log Q~ from u as pass 1 formed it, whose exps its log-sum-exp summed (see Precision)
            u = _bridged(y, x, a_t, a_s, beta, masked_bx)
            log2p = (x - shift_s) * c - log2s_s
            log2q = (u - shift_u) * c - log2s_u
            p, q = tl.exp2(log2p), tl.exp2(log2q)
            if REVERSE:  # (d from u centred at e)
                # P~ ln(P~ / Q~) - P~ + Q~ (the forward's terms, the roles swapped): +inf where P has the
                # token and Q masks it (a row without Q: NaN); P~ = 0: Q~
                term = tl.where(p == 0.0, q, p * ((log2p - log2q) * _LN2 - 1.0) + q)
                acc += tl.where((log2q == float("-inf")) & (x > float("-inf")), float("inf"), term)
                mass += p
                d, q_masked = _centred_gap(x, y, e_t, e_s, beta, masked_bx, inv_temperature)
                spread += _xratio(p, x > float("-inf"), q_masked, d)
            else:  # KL(Q || P) as sum Q (ln Q - ln P) - Q + P: the lse roundings cancel to first order
                # (as in the C++ kernel's forward_block); P = 0: +inf where Q has the token, else 0;
                # Q = 0: P
                term = tl.where(log2q == float("-inf"), p, q * ((log2q - log2p) * _LN2 - 1.0) + p)
                acc += tl.where(log2p == float("-inf"), tl.where(u > float("-inf"), float("inf"), 0.0), term)
                if HAS_GRAD:  # (P - Q) / T
                    g = (p - q) * inv_temperature
                    tl.store(g_row + col, g.to(grad_ptr.dtype.element_ty), mask=v_ok)
        if REVERSE:  # loss = (sum of the terms) / M; the gradient's D = D~ / M and 1 / (M T)
            mass64 = tl.sum(mass.to(tl.float64), axis=0)
            loss = (tl.sum(acc.to(tl.float64), axis=0) / mass64).to(tl.float32)
            spread = (tl.sum(spread.to(tl.float64), axis=0) / mass64).to(tl.float32)
            grad_scale = ((zero + inv_temperature) / mass64).to(tl.float32)
        else:
            loss = tl.sum(acc, axis=0)
        # KL >= 0; rounding can leave -1e-7 where it is 0 (equal distributions): clamped as the
        # C++ kernel does (NaN passes through)
        loss = tl.where(loss < 0, 0.0, loss)
        tl.store(loss_ptr + n, loss)
        if HAS_GRAD and not REVERSE:
            if loss == float("inf"):  # (a constant +inf: no gradient)
                _zero_row(g_row, V, BLOCK_V)

        # ---- pass 3 (reverse direction only; blocks forward, pass 2 ended at block 0) ----
        if REVERSE and HAS_GRAD:
            x_next, y_next = _load_pair(s_row, t_row, 0, V, stride_sv, stride_tv, BLOCK_V)
            for b in range(0, nblk):
                col, v_ok = _block_columns(b * BLOCK_V, V, BLOCK_V)
                x, y = x_next.to(tl.float32), y_next.to(tl.float32)
                x_next, y_next = _load_pair(s_row, t_row, (b + 1) * BLOCK_V, V, stride_sv, stride_tv, BLOCK_V)
                log2p = (x - shift_s) * c - log2s_s
                d, _ = _centred_gap(x, y, e_t, e_s, beta, masked_bx, inv_temperature)
                p = tl.exp2(log2p)
                # P (g - loss) / T = P~ (d - D) / (M T); 0 where P = 0, and in a row whose loss is
                # +inf (a constant: there Q = 0 < P somewhere, which would make inf - inf); NaN in
                # a row whose loss is NaN, where P = 0 too (the reference's autograd gives NaN there)
                g = tl.where(p == 0.0, 0.0, p * (d - spread)) * grad_scale
                g = tl.where(loss == float("inf"), 0.0, g)
                g = tl.where(loss != loss, float("nan"), g)
                tl.store(g_row + col, g.to(grad_ptr.dtype.element_ty), mask=v_ok)
    else:
        # ---- an ignored row: loss 0, gradient 0 ----
        tl.store(loss_ptr + n, 0.0)
        if HAS_GRAD:
            _zero_row(g_row, V, BLOCK_V)


# On a GPU the block size and warp count are tuned per (V, REVERSE, HAS_GRAD) (and, by
# Triton, per dtype of each tensor argument: the student's and the teacher's apart). The kernel
# overwrites every output, so re-running it while tuning is safe. num_stages=1: no software
# pipelining (it gained nothing for the divergence kernel, and its shared-memory buffers would
# cost occupancy); other resident programs hide latency.
# The first config is the one used without tuning (FASTPROBE_AUTOTUNE=0): 1024 columns and
# 4 warps was the divergence kernel's best on the H200 (bench/NOTES.md).
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_V": bv}, num_warps=nw, num_stages=1)
    for bv, nw in (
        (1024, 4),
        (2048, 4),
        (2048, 8),
        (4096, 8),
        (1024, 8),
        (4096, 16),
        (2048, 16),
        (4096, 4),
    )
]
# Pass 1 keeps four float32 per-lane values per tile element (two running maxima and sums)
# besides the loaded logits; past 16 elements per thread that nears ptxas's register budget
# (checked compiling for sm_90a), so such configs are not tried.
_MAX_ELEMENTS_PER_THREAD = 16


def _prune_configs(configs, named_args, **kwargs):
    """Configs within the register budget whose block is no wider than the vocabulary needs
    (a tiny V keeps the narrowest blocks)."""
    vocab = named_args.get("V", kwargs.get("V", 1))
    kept = [cfg for cfg in configs if cfg.kwargs["BLOCK_V"] // (32 * cfg.num_warps) <= _MAX_ELEMENTS_PER_THREAD]
    narrow = [cfg for cfg in kept if cfg.kwargs["BLOCK_V"] <= next_pow2(vocab)]
    if not narrow:
        least = min(cfg.kwargs["BLOCK_V"] for cfg in kept)
        narrow = [cfg for cfg in kept if cfg.kwargs["BLOCK_V"] == least]
    return narrow


_bridge_kernel_tuned = autotune(
    configs=_AUTOTUNE_CONFIGS,
    key=["V", "REVERSE", "HAS_GRAD"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_bridge_kernel)

# Through the Triton interpreter (CPU tests): one small block, so that a tiny V still
# spans several blocks and a ragged tail.
_INTERPRET_BLOCK_V = 128


def bridge_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    beta: float,
    inv_temperature: float,
    reverse: bool,
    loss: torch.Tensor,
    grad: Optional[torch.Tensor],
) -> None:
    """Launch the fused kernel; writes every element of ``loss`` and ``grad``.

    student, teacher [N, V] float32 / bfloat16 / float16 (each its own: they may differ), any strides
    labels   [N] int64 contiguous, or None (every row kept); rows with labels == ignore_index
             get loss 0 and a zero gradient row
    beta     a float, finite in float32 (runtime argument); inv_temperature > 0, normal and finite in float32
    reverse  False: KL(Q || P_S), gradient (P_S - Q) / T; True: KL(P_S || Q), gradient
             P_S (g - KL) / T with g = log P_S - log Q (Q is a constant for the gradient)
    loss     [N] float32 contiguous (out, natural log)
    grad     [N, V] contiguous in the student's dtype (out), or None: no gradient computed
    """
    if student.dim() != 2:
        raise ValueError(f"student must be [N, V], got shape {tuple(student.shape)}")
    N, V = student.shape
    if student.dtype not in LOGIT_DTYPES:
        raise ValueError(f"student must be float32, bfloat16 or float16, got {student.dtype}")
    if teacher.shape != (N, V) or teacher.dtype not in LOGIT_DTYPES:
        raise ValueError("teacher must be [N, V], float32, bfloat16 or float16")
    if labels is not None and (labels.shape != (N,) or labels.dtype != torch.int64 or not labels.is_contiguous()):
        raise ValueError("labels must be a contiguous int64 [N] tensor")
    if loss.shape != (N,) or loss.dtype != torch.float32 or not loss.is_contiguous():
        raise ValueError("loss must be a contiguous float32 [N] tensor")
    if grad is not None and (grad.shape != (N, V) or grad.dtype != student.dtype or not grad.is_contiguous()):
        raise ValueError("grad must be a contiguous [N, V] tensor of the student's dtype")
    # float arguments (an int 0 or 1 would be specialized into the compiled kernel)
    # (the kernel takes both as float32: 1e39 would be inf there)
    beta = check_float32_range(float(beta), "beta", positive=False)
    inv_temperature = check_inv_temperature(inv_temperature)
    if N == 0:
        return

    has_labels, has_grad = labels is not None, grad is not None
    # labels and grad are dummies (never touched) when absent
    args = (
        student,
        teacher,
        labels if has_labels else loss,
        loss,
        grad if has_grad else loss,
        beta,
        inv_temperature,
        int(ignore_index),
        V,
        *student.stride(),
        *teacher.stride(),
    )
    flags = dict(HAS_LABELS=has_labels, REVERSE=bool(reverse), HAS_GRAD=has_grad)
    grid = (N,)
    if interpreter_enabled():
        _bridge_kernel[grid](*args, **flags, **FP_FUSION, BLOCK_V=_INTERPRET_BLOCK_V, num_warps=4)
    elif autotune_enabled():
        key = (student.dtype, teacher.dtype, V, *flags.values())  # (Triton's autotuner keys on both dtypes)
        launch_tuned(_bridge_kernel_tuned, _bridge_kernel, grid, args, flags, key)
    else:
        config = _prune_configs(_AUTOTUNE_CONFIGS, {"V": V})[0]
        _bridge_kernel[grid](*args, **flags, **FP_FUSION, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


settle_cache_keys(globals())  # (the same cache keys in every process, see _launch.py)
