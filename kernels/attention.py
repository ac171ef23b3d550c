"""Attention with sinks, windows, head masks and attention statistics (Triton): the math of
``fastprobe.reference.sink_attention``, by an online softmax over key blocks (FlashAttention
style), never materialising the [Lq, Lk] attention weights.

Query i of a (batch b, head h) row sits at position p = Lk - Lq + i. Key j is visible iff
  real[b, j]  and  f_p <= j <= r_p  and  (no window or in_window(p, j) or j < e_p)
with in_window = j > p - w (causal) or |p - j| < w (bidirectional); the first key
f_p = clamp(start[b, p], 0, p) with a start (HAS_START: a segment's first position, packed
sequences, Llama 4's chunks; it bounds sink keys too), else 0; the reach
r_p = clamp(horizon[b, p], p, Lk - 1) with a horizon (HAS_HORIZON: a bidirectional block, Gemma 3
image tokens, a PaliGemma prefix, or a segment's last position), else p (causal) or Lk - 1. The
window stays j > p - w. The sink end e_p = sink_end[b], or per position e_p = sink_end[b, p]
(ROW_ENDS: segments, each a sequence of its own whose sink and statistics keys are its first
real keys); the statistics end s_p likewise from stat_end; both clamped to [0, Lk]. Scores are
kept in base 2, t_j = s_j log2(e) with s_j = scale q . k_j (t_j = (scale log2(e)) (q . k_j)), or
with a soft cap c > 0 (Gemma 2, HAS_SOFTCAP) s_j = c tanh(scale q . k_j / c) on every key before
masking (t_j = (c tanh((scale / c) (q . k_j))) log2(e): c log2(e) may overflow float32), and per
query row the kernel keeps
  m = max_j t_j,  l = sum_j 2^(t_j - m),  acc = sum_j 2^(t_j - m) v_j,
  stat = sum_{j < s_p} 2^(t_j - m),  grp[g] = sum_{group_j = g} 2^(t_j - m),
  A = sum_j 2^(t_j - m) (t_j - m)                                     (entropy, on request)
over the visible keys. When a key block raises the max from m_old to m_new every sum is
rescaled by alpha = 2^(m_old - m_new); A moves to the new reference point as
  A <- alpha (A + (m_old - m_new) l_old)      (0 where alpha = 0: m_old - m_new may be -inf)
and a weight 2^(t_j - m) = 0 adds 0 to A (t_j - m may be -inf: scores of both signs near
float max / 2). At the end the keys' state meets a per-head sink logit c (one more, value-less
key), in natural units (ln 2 = 1 / log2(e); c log2(e) may overflow float32 where c does not):
  M = max(m ln 2, c),  w = e^(m ln 2 - M),  w_c = e^(c - M),  L = w l + w_c,
  out = w acc / L,  lse = M + ln L,  sink_mass = w stat / L,  group_mass = w grp / L,
  entropy = -sum_j p_j ln p_j - p_c ln p_c = ln L - (w (A ln 2 + (m ln 2 - M) l) + w_c (c - M)) / L.
A row with nothing in its softmax (L = 0: no visible key, no sink logit) gets out 0,
lse -inf, masses 0, entropy 0; so does a pruned head (head_mask[h] == 0), whose programs
load no K / V: their key loops are empty. Shifts by m are guarded so that -inf - -inf never
appears (a row that has seen only masked keys shifts by 0).

Two paths:
  * prefill: one program per (query block, b, h). It loops only over the key blocks that meet
    the band of its query block (keys in [min f_p, max r_p] and in some query's window), plus
    (with a window) the blocks holding sink keys >= min f_p before the band (to the largest
    e_p of the rows with sink keys there). Blocks inside the band for every query of the block
    (and with no padding mask) run without elementwise masks.
  * decode (few queries, long keys; split-K, "flash decoding"): one program per (key split,
    b, kv head) handles all Hq / Hkv query heads of its kv head at once (K / V read once per
    kv head), writing unnormalised partial states (m, l, stat, A, acc, grp) to float32
    scratch; a second kernel merges the splits of each query row by their max, adds the sink
    logit (_finish, as at the prefill kernel's end) and writes the outputs. The splits cover
    the window's band to Lk, less the keys below every row's f_p (f_p and r_p are masked per
    key). Chosen when Lq <= 4, (Hq / Hkv) Lq <= 128 rows (16 for float32) and the band holds
    >= 512 keys (see _DECODE_*); split_keys forces either path.

Products use tl.dot with float32 accumulation: 16-bit inputs on tensor cores (P rounded to
the input dtype for P V, as FlashAttention does; the statistics use the float32 P), float32
inputs in full float32 ("ieee"). Under the Triton interpreter bfloat16 operands are upcast
first (UPCAST), since its dot multiplies bfloat16 as raw bits.

Known limit: acc = sum_j 2^(t_j - m) v_j reaches n max |v| over n keys of near-equal scores, so
values near float max (|v| ~1e38 and up, float32 or bfloat16) overflow it to +-inf (or NaN)
where out, a convex combination of the values, is finite (tests/test_attention_extremes.py
marks these cases xfail for Triton). The C++ kernels rescue such rows (attention_core.h,
"Values near float max"); here nothing does.

dual_attention.py builds on this module: it imports the jit helpers (block scores, the
online-softmax step, program / band / split decomposition, partial-state store and merge) and
the launch plumbing (config lists, register-model pruning, decode plan, launch).
"""

# No `from __future__ import annotations`: Triton 3.0's interpreter takes a parameter as
# constexpr only when its annotation is the tl.constexpr object, not the string "tl.constexpr".

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..backend import autotune_enabled, interpreter_enabled
from ._launch import FP_FUSION, autotune, cdiv, launch_tuned, next_pow2, settle_cache_keys

__all__ = ["sink_attention"]

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)
_NEG_INF = tl.constexpr(float("-inf"))
# Triton < 3.3 (torch < 2.7) fails to compile the prefill kernel's one-hot group product (key_groups;
# "'arith.select' op expected condition type to have the same shape as the result type"): there it
# sums the groups by masked row sums, as the decode kernel does.
_GROUP_DOT = tl.constexpr(tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 3))


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, BLOCK_D] tile, zero outside the rows / head dim (masks only where needed)."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b, float32 accumulation. UPCAST (Triton interpreter only, whose dot multiplies
    bfloat16 operands as their raw bits): exact float32 copies of the operands, same result."""
    if acc is None:  # Triton 3.0's tl.dot takes acc=None, but not a None passed down to here
        acc = tl.zeros([a.shape[0], b.shape[1]], tl.float32)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc=acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc=acc, input_precision=DOT_PRECISION)


@triton.jit
def _mass_dot(p, p_in, onehot, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + p @ onehot: per-group sums of the float32 weights p [R, N] (onehot [N, G]).
    p_in is p rounded to the input dtype (as the P @ V product uses it). For bfloat16 inputs
    p = hi + lo with hi = p_in and lo the rounding remainder, also 16-bit: two tensor-core
    products give the sums to ~16 mantissa bits instead of 8. float16 ends at 6e-8 (2^-24, and
    keeps fewer bits below 6e-5): its hi and lo would flush the weights of keys 17+ below the max,
    a whole low group's mass. There p = hi + lo in float32 products at tf32 (DOT_PRECISION):
    hi = p's top 10 mantissa bits (exact in tf32), lo = p - hi (exact, rounded to tf32's 10 bits):
    ~21 bits, with float32's range."""
    if p_in.dtype == tl.float32:
        return _dot(p_in, onehot.to(tl.float32), acc, DOT_PRECISION, UPCAST)
    elif p_in.dtype == tl.float16:
        hi = (p.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # 0xFFFFE000: 10 bits
        oh = onehot.to(tl.float32)
        acc = _dot(hi, oh, acc, DOT_PRECISION, UPCAST)
        return _dot(p - hi, oh, acc, DOT_PRECISION, UPCAST)
    else:
        lo = (p - p_in.to(tl.float32)).to(p_in.dtype)
        if UPCAST:  # (the interpreter turns a bool into bfloat16 as raw bits)
            oh = onehot.to(tl.float32)
        else:
            oh = onehot.to(p_in.dtype)
        acc = _dot(p_in, oh, acc, DOT_PRECISION, UPCAST)
        return _dot(lo, oh, acc, DOT_PRECISION, UPCAST)


@triton.jit
def _tanh(x):
    """tanh in float32, accurate to a few ulp for every x (no tl.tanh in every Triton version,
    and libdevice does not run under the interpreter): odd, so on |x| an exp form
    1 - 2 / (e^(2|x|) + 1) where it has no cancellation (|x| > 0.625: e^(2|x|) = inf gives 1),
    and Cephes' tanhf polynomial x + x z P(z), z = x^2, below."""
    a = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp2(a * (2.0 * _LOG2E)) + 1.0)
    big = tl.where(x < 0, -big, big)
    z = x * x
    poly = (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
    small = x + x * (poly - 3.33332819422e-1) * z
    return tl.where(a > 0.625, big, small)  # (NaN takes the polynomial: stays NaN)


@triton.jit
def _tail_columns(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr):
    """The head dim's tail columns [BLOCK_D, BLOCK_D + BLOCK_DT) and which are < HEAD_DIM."""
    offs_dt = BLOCK_D + tl.arange(0, BLOCK_DT)
    return offs_dt, offs_dt < HEAD_DIM


@triton.jit
def _tail_rows(ptr, b, h, rows, stride_b, stride_h, stride_m, stride_d, row_ok, q,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr):  # fmt: skip
    """The tail columns of rows `rows` of head (b, h) of a [B, H, L, D] tensor: [R, BLOCK_DT], 0
    outside; q (the head columns, a stand-in never read) when there is no tail (BLOCK_DT = 0)."""
    if BLOCK_DT > 0:
        offs_dt, dt_ok = _tail_columns(HEAD_DIM, BLOCK_D, BLOCK_DT)
        return _load_rows(ptr, b, h, rows, stride_b, stride_h, stride_m, stride_d, offs_dt, row_ok, dt_ok,
                          HEAD_DIM == BLOCK_D + BLOCK_DT)  # fmt: skip
    else:
        return q


@triton.jit
def _block_scores(
    q,  # [R, BLOCK_D] queries (input dtype): head-dim columns [0, BLOCK_D)
    q_t,  # [R, BLOCK_DT] columns [BLOCK_D, BLOCK_D + BLOCK_DT) (_tail_rows; q itself when BLOCK_DT = 0)
    k_base,
    v_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    start,  # first key of the block
    end,  # keys >= end are not loaded (masked blocks only)
    offs_d,
    d_ok,
    offs_dv,  # the value head dim's columns (BLOCK_DV) and which are < VALUE_DIM
    dv_ok,
    qk_scale,  # scale log2(e); with a soft cap c: scale / c
    softcap,  # c (HAS_SOFTCAP only)
    MASKED: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Load one key block [start, start + BLOCK_N) of K [N, BLOCK_D] and V [N, BLOCK_DV] (value
    heads may be narrower or wider than query / key heads); (offs_n, n_ok, rows, t, v) with
    the base-2 scores t = s log2(e) [R, BLOCK_N], before any visibility mask: s = scale q . k, or
    c tanh(scale q . k / c) with a soft cap. Keys >= end (MASKED) load as 0 (score 0)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < end
    rows = offs_n.to(tl.int64)
    k = _load_tile(k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, n_ok, d_ok, MASKED, HEAD_DIM >= BLOCK_D)
    v = _load_tile(v_base + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd, n_ok, dv_ok, MASKED, EVEN_DV)
    t = _dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST)
    if BLOCK_DT > 0:  # the head dim's tail (e.g. 192 = 128 + 64): its own product, added
        offs_dt, dt_ok = _tail_columns(HEAD_DIM, BLOCK_D, BLOCK_DT)
        k_t = _load_tile(k_base + rows[:, None] * stride_kn + offs_dt[None, :] * stride_kd, n_ok, dt_ok, MASKED,
                         HEAD_DIM == BLOCK_D + BLOCK_DT)  # fmt: skip
        t = _dot(q_t, tl.trans(k_t), t, DOT_PRECISION, UPCAST)
    t = t * qk_scale
    if HAS_SOFTCAP:  # t = (c tanh(scale q . k / c)) log2(e): |c tanh| <= c, where c log2(e) may overflow
        t = (softcap * _tanh(t)) * _LOG2E
    return offs_n, n_ok, rows, t, v


@triton.jit
def _add_compensated(hi, lo, x):
    """(hi + lo) + x as (s, lo + err) with hi + x = s + err exactly (TwoSum: s = fl(hi + x),
    x' = s - hi, err = (hi - (s - x')) + (x - x'), whichever of hi and x is larger). The running
    sum l ~ 1 of a row with a dominant (sink) key would otherwise drop every block sum under
    half an ulp of it (6e-8: 64 keys of weight < 1e-9 each)."""
    s = hi + x
    x_part = s - hi
    return s, lo + ((hi - (s - x_part)) + (x - x_part))


@triton.jit
def _sum_compensated(x, x_lo):
    """sum x + sum x_lo over [N] as (hi, lo): the largest x plus the sum of the others, that
    addition's error kept (_add_compensated), so parts far below the largest are not lost."""
    idx = tl.arange(0, x.shape[0])
    big = tl.max(x, axis=0)
    big_at = tl.min(tl.where(x == big, idx, x.shape[0]), axis=0)
    rest = tl.sum(tl.where(idx == big_at, 0.0, x), axis=0)
    return _add_compensated(big, tl.sum(x_lo, axis=0), rest)


@triton.jit
def _softmax_step(t, m_i, l_i, l_lo, acc, v, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The online-softmax update of one state (m, l + l_lo = sum 2^(t - m), acc = sum 2^(t - m) v)
    by a block of base-2 scores t [R, N] (-inf: not in this state) and its values v [N, BLOCK_DV].
    Returns the new (m, l, l_lo, acc) and, for the caller's other sums, m_use (the new reference
    point: m, or 0 while m = -inf, so that -inf - -inf never appears), alpha = 2^(m_old - m_use)
    (0 while m_old = -inf), the weights p = 2^(t - m_use) and p rounded to v's dtype."""
    m_new = tl.maximum(m_i, tl.max(t, axis=1))
    if MASKED:  # a row that has seen only masked keys shifts by 0
        m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
    else:  # every score of the block is finite
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(t - m_use[:, None])
    # l' = alpha l + sum p, in two parts: the block sum's rounding error goes to l_lo
    l_new, l_lo = _add_compensated(l_i * alpha, l_lo * alpha, tl.sum(p, axis=1))
    p_in = p.to(v.dtype)
    acc = _dot(p_in, v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
    return m_new, l_new, l_lo, acc, m_use, alpha, p, p_in


@triton.jit
def _per_row(end, ROW_ENDS: tl.constexpr):
    """A key end for comparisons with a [1, N] key tile: [R] per-row ends as a column [R, 1]
    (ROW_ENDS), a scalar as it is."""
    if ROW_ENDS:
        return end[:, None]
    else:
        return end


@triton.jit
def _block_group_ids(groups_base, stride_gn, start, end, HAS_GROUPS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The group ids of keys [start, start + BLOCK_N), -1 at keys >= end (zeros without groups,
    never read). The key loops load the next block's ids while they work on this one: read by a
    reduction in the block (_attend_block), the load would otherwise wait in every block."""
    keys = start + tl.arange(0, BLOCK_N)
    if HAS_GROUPS:
        return tl.load(groups_base + keys.to(tl.int64) * stride_gn, mask=keys < end, other=-1)
    else:
        return tl.zeros([BLOCK_N], tl.int32)


@triton.jit
def _attend_block(
    q,  # [R, BLOCK_D] queries (input dtype)
    q_t,  # [R, BLOCK_DT] their head dim's tail (see _block_scores)
    m_i,  # [R] running max of the base-2 logits (-inf: nothing seen yet)
    l_i,  # [R] sum 2^(t - m), in two parts: l_i + l_lo (_add_compensated)
    l_lo,  # [R] the rounding errors of the block sums added to l_i
    acc,  # [R, BLOCK_DV] sum 2^(t - m) v
    stat,  # [R] sum over stat keys 2^(t - m)
    grp,  # [R, G_PAD] per-group sums 2^(t - m)
    ent,  # [R] A = sum 2^(t - m) (t - m)
    gid,  # [BLOCK_N] the block's key group ids, -1 past end (HAS_GROUPS only; _block_group_ids)
    k_base,
    v_base,
    real_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_rn,
    start,  # first key of the block
    end,  # keys >= end are not in this program's range (masked blocks only)
    pos,  # [R] query positions
    reach,  # [R] the last key each row sees (pos, or its horizon: _causal_reach; HAS_HORIZON or CAUSAL)
    first,  # [R] the first key each row sees (_segment_first; HAS_START only)
    offs_d,
    d_ok,
    offs_dv,
    dv_ok,
    window,  # > every |p - j| when there is no window
    sink_end,  # e: a scalar, or [R] with ROW_ENDS (_key_ends)
    stat_end,  # s: likewise
    stat_top,  # the largest s (s itself without ROW_ENDS)
    qk_scale,  # scale log2(e); with a soft cap c: scale / c
    softcap,  # c (HAS_SOFTCAP only)
    MASKED: tl.constexpr,  # False: every key of the block is real, < end and visible to every row
    CAUSAL: tl.constexpr,
    HAS_HORIZON: tl.constexpr,
    HAS_START: tl.constexpr,
    ROW_ENDS: tl.constexpr,
    HAS_KEY_REAL: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    G_PAD: tl.constexpr,
    GROUP_DOT: tl.constexpr,  # group sums by a one-hot product (else by G_PAD masked row sums)
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key block [start, start + BLOCK_N) of the online softmax (see the module docstring)."""
    offs_n, n_ok, rows, t, v = _block_scores(
        q, q_t, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start, end, offs_d, d_ok, offs_dv, dv_ok,
        qk_scale, softcap, MASKED, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    if MASKED:
        key_ok = _real_keys(real_base, rows, stride_rn, n_ok, HAS_KEY_REAL)
        j = offs_n[None, :]
        p_row = pos[:, None]
        is_sink = j < _per_row(sink_end, ROW_ENDS)  # j < e (per row: [R, 1] vs j [1, N])
        if CAUSAL:  # j <= r and (p - w < j or sink)
            visible = (j <= reach[:, None]) & ((j > p_row - window) | is_sink)
        else:  # |p - j| < w or sink (and j <= r)
            visible = (tl.abs(p_row - j) < window) | is_sink
            if HAS_HORIZON:
                visible = visible & (j <= reach[:, None])
        if HAS_START:  # f <= j, sink keys too
            visible = visible & (j >= first[:, None])
        t = tl.where(visible & key_ok[None, :], t, _NEG_INF)
    m_new, l_new, l_lo, acc, m_use, alpha, p, p_in = _softmax_step(t, m_i, l_i, l_lo, acc, v, MASKED, DOT_PRECISION, UPCAST)
    if ENTROPY:
        # A <- alpha (A + (m_old - m_new) l_old) + sum p (t - m_new), 0 where the weight is 0:
        # m_old = -inf (A = l = 0), masked keys (t = -inf), and differences of scores of both
        # signs near float max / 2 that overflow to -inf
        ent = tl.where(alpha > 0, alpha * (ent + (m_i - m_use) * l_i), 0.0)
        ent += tl.sum(tl.where(p > 0, p * (t - m_use[:, None]), 0.0), axis=1)
    stat = stat * alpha
    if start < stat_top:  # stat keys are the first few real keys (of a segment): few blocks
        stat += tl.sum(tl.where(offs_n[None, :] < _per_row(stat_end, ROW_ENDS), p, 0.0), axis=1)
    if HAS_GROUPS:
        g_cols = tl.arange(0, G_PAD)
        # keys of one group (groups are mostly runs: BOS, image, text): the block's row sums are
        # that group's masses, no per-score work (keys past end, p = 0, do not count)
        g_lo = tl.min(tl.where(gid < 0, G_PAD, gid), axis=0)
        if g_lo == tl.max(gid, axis=0):
            grp = grp * alpha[:, None] + tl.where(g_cols[None, :] == g_lo, tl.sum(p, axis=1)[:, None], 0.0)
        elif GROUP_DOT:  # grp[r, g] += sum_j p[r, j] [group_j = g]: a small tensor-core product
            onehot = gid[:, None] == g_cols[None, :]
            grp = _mass_dot(p, p_in, onehot, grp * alpha[:, None], DOT_PRECISION, UPCAST)
        else:  # few rows (decode): a masked row sum per group (a product with N = G_PAD would
            # make every warp hold the whole tile), exact in float32
            grp = grp * alpha[:, None]
            for g in tl.static_range(G_PAD):
                mass = tl.sum(tl.where(gid[None, :] == g, p, 0.0), axis=1)
                grp += tl.where(g_cols[None, :] == g, mass[:, None], 0.0)
    return m_new, l_new, l_lo, acc, stat, grp, ent


@triton.jit
def _attend_range(
    q, q_t, m_i, l_i, l_lo, acc, stat, grp, ent, k_base, v_base, real_base, groups_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_gn,
    lo, hi, end, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, sink_end, stat_end, stat_top, qk_scale, softcap,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_HORIZON: tl.constexpr, HAS_START: tl.constexpr, ROW_ENDS: tl.constexpr,
    HAS_KEY_REAL: tl.constexpr, HAS_GROUPS: tl.constexpr, ENTROPY: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, EVEN_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    G_PAD: tl.constexpr, GROUP_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """_attend_block over the key blocks starting in [lo, hi) (keys >= end out of range), each
    block's group ids loaded while the block before it is worked on (_block_group_ids)."""
    gid = _block_group_ids(groups_base, stride_gn, lo, end, HAS_GROUPS, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        gid_next = _block_group_ids(groups_base, stride_gn, start + BLOCK_N, end, HAS_GROUPS, BLOCK_N)
        m_i, l_i, l_lo, acc, stat, grp, ent = _attend_block(
            q, q_t, m_i, l_i, l_lo, acc, stat, grp, ent, gid, k_base, v_base, real_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_rn,
            start, end, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, sink_end, stat_end, stat_top, qk_scale, softcap,
            MASKED, CAUSAL, HAS_HORIZON, HAS_START, ROW_ENDS, HAS_KEY_REAL, HAS_GROUPS, ENTROPY, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, G_PAD, GROUP_DOT, DOT_PRECISION, UPCAST,
        )  # fmt: skip
        gid = gid_next
    return m_i, l_i, l_lo, acc, stat, grp, ent


@triton.jit
def _finish(m, l, l_lo, stat, ent, sink):
    """(norm, lse, sink_mass, entropy) from the keys' final state (m, l + l_lo, stat, A: base 2) and the
    sink logit c (natural units; -inf: none), elementwise, in natural units (module docstring):
    norm = w / L scales the key sums (acc, grp). L = 0 (nothing in the softmax): (0, -inf, 0, 0);
    a NaN l (NaN or +inf scores) gives NaN, as in the C++ kernel, not an empty row's values.
    Entropy is clamped at 0 from rounding."""
    m_nat = m * _LN2  # (finite or -inf: |m ln 2| < |m|)
    top = tl.maximum(m_nat, sink)
    top = tl.where(top == _NEG_INF, 0.0, top)  # M; 0 with nothing (then w = w_c = 0)
    w_keys = tl.exp2((m_nat - top) * _LOG2E)  # w = e^(m ln 2 - M): 1 where the keys hold the max
    w_sink = tl.exp2((sink - top) * _LOG2E)  # w_c = e^(c - M)
    # L = w (l + l_lo) + w_c as total + total_lo, kept in log L and 1 / L to first order in
    # total_lo / total (<< 1): 1 - sink_mass and log L of a sink head are ~1e-6, where L ~ 1
    total, total_lo = _add_compensated(w_keys * l, w_keys * l_lo, w_sink)
    empty = total == 0.0
    inv_hi = tl.where(empty, 0.0, 1.0 / total)
    lo_rel = total_lo * inv_hi
    inv_total = inv_hi * (1.0 - lo_rel)  # 1 / (total + total_lo)
    log_total = tl.log(tl.where(empty, 1.0, total)) + lo_rel  # log(total) + log1p(lo_rel)
    lse = tl.where(empty, _NEG_INF, top + log_total)
    # w (A ln 2 + (m ln 2 - M) l) + w_c (c - M), 0 from a zero weight (its shift may be -inf)
    centred = tl.where(w_keys > 0, w_keys * (ent * _LN2 + (m_nat - top) * l), 0.0)
    centred += tl.where(w_sink > 0, w_sink * (sink - top), 0.0)
    entropy = tl.where(empty, 0.0, log_total - centred * inv_total)
    entropy = tl.where(entropy < 0, 0.0, entropy)  # (NaN passes)
    norm = w_keys * inv_total
    return norm, lse, stat * norm, entropy


@triton.jit
def _head_live(head_mask_ptr, h, HAS_HEAD_MASK: tl.constexpr):
    """Whether query head h is computed (head_mask[h] != 0; every head without a mask)."""
    if HAS_HEAD_MASK:
        return tl.load(head_mask_ptr + h) != 0
    else:
        return h >= 0


@triton.jit
def _sink_logit(sink_logit_ptr, h, live, HAS_SINK_LOGIT: tl.constexpr):
    """The sink logit of head h in natural units (_finish adds it to the keys' state), -inf
    without one and for a pruned head."""
    if HAS_SINK_LOGIT:
        return tl.where(live, tl.load(sink_logit_ptr + h).to(tl.float32), _NEG_INF)
    else:
        return tl.where(live, _NEG_INF, _NEG_INF)


@triton.jit
def _sink_state(sink_logit_ptr, h, live, HAS_SINK_LOGIT: tl.constexpr):
    """Initial (m, l) of a row of head h in base 2 from _sink_logit: (c log2 e, 1), or (-inf, 0)
    (dual_attention's merge takes it without a sink logit; sink_attention adds its sink in
    _finish instead, in natural units, since c log2(e) may overflow where c does not)."""
    c = _sink_logit(sink_logit_ptr, h, live, HAS_SINK_LOGIT) * _LOG2E
    return c, tl.where(c == _NEG_INF, 0.0, 1.0)


@triton.jit
def _fwd_program(Hq, Lq, Lk, kv_group, BLOCK_M: tl.constexpr):
    """The (query block, b, h) of a prefill program on a 1-D grid of cdiv(Lq, BLOCK_M) B Hq:
    query blocks fastest (so one head's K / V stay in L2 across its blocks), the last (longest,
    when causal) query blocks first. Returns (bh, b, h, kv head, first query m0, the block's
    query indices offs_m (int32), m_ok, their positions pos = Lk - Lq + i)."""
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // num_m
    pid_m = (num_m - 1 - pid % num_m).to(tl.int32)
    b = bh // Hq
    h = bh % Hq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    return bh, b, h, h // kv_group, m0, offs_m, offs_m < Lq, Lk - Lq + offs_m


@triton.jit
def _sink_span(sink_end, first, below, HAS_START: tl.constexpr, ROW_ENDS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys [sink_lo, sink_hi) holding every row's sink keys before the band (keys < below):
    row i's are f_i <= j < min(e_i, below) (f_i = 0 without a start), so from the smallest f's
    block to the largest such end over the rows that have one (f_i < min(e_i, below); across
    segments only the first segment of a tile starts before its band: no gap to scan).
    sink_end: a scalar, or [R] with ROW_ENDS; first [R] (read with HAS_START only)."""
    sink_hi = tl.minimum(sink_end, below)
    if ROW_ENDS:  # max_i of min(e_i, below) over the rows with f_i < min(e_i, below)
        if HAS_START:
            sink_hi = tl.where(first < sink_hi, sink_hi, 0)
        sink_hi = tl.max(sink_hi, axis=0)
    if HAS_START:  # no row sees a sink key below the smallest f
        sink_lo = (tl.min(first, axis=0) // BLOCK_N) * BLOCK_N
    else:
        sink_lo = 0
    return sink_lo, sink_hi


@triton.jit
def _fwd_band(
    m0, Lq, Lk, window, sink_end, live, reach, first,
    CAUSAL: tl.constexpr, HAS_KEY_REAL: tl.constexpr, HAS_HORIZON: tl.constexpr, HAS_START: tl.constexpr,
    ROW_ENDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The key range of the query block [m0, m0 + BLOCK_M): the band [lo_blk, band_end) (block
    aligned below) of keys some row may see (causal / window / first key / reach), split into
    masked [lo_blk, a), unmasked interior [a, c) (keys every row sees) and masked
    [c, band_end), and the sink keys [sink_lo, sink_hi) before the band. Nothing for a pruned
    head (live false). Without a window (window > every |p - j|) nor start, lo_blk = a = 0 and
    sink_hi = 0. reach, first [BLOCK_M]: the rows' last and first keys (_causal_reach, read
    with HAS_HORIZON only; _segment_first, read with HAS_START only); sink_end: a scalar, or
    [BLOCK_M] with ROW_ENDS (0 for padding rows). Returns (sink_lo, sink_hi, lo_blk, a, c,
    band_end)."""
    p_first = Lk - Lq + m0
    p_last = Lk - Lq + tl.minimum(m0 + BLOCK_M, Lq) - 1
    lo = tl.maximum(p_first - window + 1, 0)  # j > p - w (both kinds of window)
    if CAUSAL:
        if HAS_HORIZON:  # j <= max_i r_i (r in [p, Lk - 1], -1 for padding rows)
            hi = tl.max(reach, axis=0) + 1
        else:  # j <= p
            hi = tl.minimum(p_last + 1, Lk)
        full_hi = p_first + 1  # keys every query of the block sees (no window; r >= p)
    else:
        hi = tl.minimum(p_last + window, Lk)  # j < p + w
        if ROW_ENDS:  # sinks past the band stay visible: j < max_i e_i
            hi = tl.maximum(hi, tl.max(sink_end, axis=0))
        else:
            hi = tl.maximum(hi, tl.minimum(sink_end, Lk))
        full_hi = p_first + window
        if HAS_HORIZON:  # j <= r: to the largest r (-1 for padding rows), for every row the smallest
            hi = tl.minimum(hi, tl.max(reach, axis=0) + 1)
            full_hi = tl.minimum(full_hi, tl.min(tl.where(reach < 0, Lk, reach), axis=0) + 1)
    full_lo = tl.maximum(p_last - window + 1, 0)  # keys in every query's window from below
    if HAS_START:  # f <= j: from the smallest f (Lk for padding rows), for every row the largest
        first_min = tl.min(first, axis=0)
        lo = tl.maximum(lo, first_min)
        full_lo = tl.maximum(full_lo, tl.max(tl.where(first < Lk, first, 0), axis=0))
    hi = tl.where(live, hi, 0)  # pruned head: no key block at all
    lo_blk = (lo // BLOCK_N) * BLOCK_N
    band_end = tl.maximum(hi, lo_blk)
    sink_lo, sink_hi = _sink_span(sink_end, first, lo_blk, HAS_START, ROW_ENDS, BLOCK_N)
    if CAUSAL:
        sink_hi = tl.minimum(sink_hi, hi)
    sink_hi = tl.where(live, sink_hi, 0)
    a = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, lo_blk), band_end)
    if HAS_KEY_REAL:  # padding may be anywhere: mask every block
        c = a
    else:
        c = tl.maximum((tl.minimum(full_hi, Lk) // BLOCK_N) * BLOCK_N, a)
        c = tl.minimum(c, band_end)
    return sink_lo, sink_hi, lo_blk, a, c, band_end


@triton.jit
def _load_rows(ptr, b, h, rows, stride_b, stride_h, stride_m, stride_d, offs_d, row_ok, d_ok, EVEN_D: tl.constexpr):
    """Rows `rows` (int64) of head (b, h) of a [B, H, L, D] tensor: [R, BLOCK_D], 0 outside."""
    ptrs = ptr + b * stride_b + h * stride_h + rows[:, None] * stride_m + offs_d[None, :] * stride_d
    return _load_tile(ptrs, row_ok, d_ok, True, EVEN_D)


@triton.jit
def _store_rows(ptr, b, h, rows, stride_b, stride_h, stride_m, stride_d, offs_d, row_ok, d_ok, x):
    """x [R, BLOCK_D] (float32) into rows `rows` (int64) of head (b, h) of a [B, H, L, D]
    tensor, in its dtype."""
    ptrs = ptr + b * stride_b + h * stride_h + rows[:, None] * stride_m + offs_d[None, :] * stride_d
    tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _key_bases(k_ptr, v_ptr, real_ptr, keyed_ptr, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh, stride_rb, stride_xb):
    """Base pointers of kv head (b, kvh): K, V, and the rows b of two per-key [B, Lk] tensors
    (the padding mask, and key groups or dropped keys)."""
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    return k_base, v_base, real_ptr + b * stride_rb, keyed_ptr + b * stride_xb


@triton.jit
def _clamp_end(end, Lk):
    """A key end clamped to [0, Lk] in int64, then int32."""
    return tl.minimum(tl.maximum(end, 0), Lk).to(tl.int32)


@triton.jit
def _key_ends(sink_end_ptr, stat_end_ptr, b, pos, Lk, ROW_ENDS: tl.constexpr):
    """The sink and statistic key ends (e, s) of batch row b: scalars from [B] tensors, or with
    ROW_ENDS each query row's (positions pos) from [B, Lk] contiguous ones, [R], 0 for rows
    outside [0, Lk) (tile padding); clamped to [0, Lk] before the int32 cast (a hand-made
    KeyMasks may hold anything). Returns (e, s, the largest s: s itself for scalars)."""
    if ROW_ENDS:  # e_p = sink_end[b, p], s_p = stat_end[b, p]
        ok = (pos >= 0) & (pos < Lk)
        sink_end = _clamp_end(tl.load(sink_end_ptr + b * Lk + pos, mask=ok, other=0), Lk)
        stat_end = _clamp_end(tl.load(stat_end_ptr + b * Lk + pos, mask=ok, other=0), Lk)
        return sink_end, stat_end, tl.max(stat_end, axis=0)
    else:
        sink_end = _clamp_end(tl.load(sink_end_ptr + b), Lk)
        stat_end = _clamp_end(tl.load(stat_end_ptr + b), Lk)
        return sink_end, stat_end, stat_end


@triton.jit
def _real_keys(real_base, rows, stride_rn, n_ok, HAS_KEY_REAL: tl.constexpr):
    """[N] whether the keys `rows` are in range (n_ok) and real (not padding)."""
    if HAS_KEY_REAL:
        return tl.load(real_base + rows * stride_rn, mask=n_ok, other=0) != 0
    else:
        return n_ok


@triton.jit
def _causal_reach(horizon_ptr, b, pos, Lk, stride_hb, HAS_HORIZON: tl.constexpr):
    """[R] the last key each query row (positions pos) sees: with a horizon
    r = clamp(horizon[b, p], p, Lk - 1), clamped in int64 (a hostile horizon reads and reaches
    nothing outside the keys), -1 (no key) for rows outside [0, Lk) (tile padding); without,
    r = p (read in causal mode only)."""
    if HAS_HORIZON:
        ok = (pos >= 0) & (pos < Lk)
        reach = tl.load(horizon_ptr + b * stride_hb + pos, mask=ok, other=0)
        return tl.where(ok, tl.minimum(tl.maximum(reach, pos), Lk - 1), -1).to(tl.int32)
    else:
        return pos


@triton.jit
def _segment_first(start_ptr, b, pos, Lk, stride_fb, HAS_START: tl.constexpr):
    """[R] the first key each query row (positions pos) sees: f = clamp(start[b, p], 0, p),
    clamped in int64 as _causal_reach; Lk (no key) for rows outside [0, Lk) (tile padding).
    Without a start (HAS_START off) pos, never read."""
    if HAS_START:
        ok = (pos >= 0) & (pos < Lk)
        first = tl.load(start_ptr + b * stride_fb + pos, mask=ok, other=0)
        return tl.where(ok, tl.minimum(tl.maximum(first, 0), pos), Lk).to(tl.int32)
    else:
        return pos


# --------------------------------------------------------------------------------------------
# prefill: one program per (query block, b, h)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET"])
def _attention_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,  # [B, Hq, Lq] float32
    sink_mass_ptr,  # [B, Hq, Lq] float32
    group_mass_ptr,  # [B, Hq, Lq, num_groups] float32 (dummy unless HAS_GROUPS)
    entropy_ptr,  # [B, Hq, Lq] float32 (dummy unless ENTROPY)
    key_real_ptr,  # [B, Lk] uint8 (dummy unless HAS_KEY_REAL)
    horizon_ptr,  # [B, Lk] int64, unit stride along Lk (dummy unless HAS_HORIZON)
    start_ptr,  # [B, Lk] int64, unit stride along Lk (dummy unless HAS_START)
    sink_end_ptr,  # [B] int64, or [B, Lk] contiguous with ROW_ENDS
    stat_end_ptr,  # likewise
    head_mask_ptr,  # [Hq] uint8 (dummy unless HAS_HEAD_MASK)
    sink_logit_ptr,  # [Hq] float32 (dummy unless HAS_SINK_LOGIT)
    key_groups_ptr,  # [B, Lk] int32 (dummy unless HAS_GROUPS)
    qk_scale,  # scale log2(e), runtime float; with a soft cap c: scale / c
    softcap,  # c, runtime float (read only with HAS_SOFTCAP)
    window,  # runtime int; > every |p - j| when there is no window
    Hq,
    Lq,
    Lk,
    kv_group,  # Hq // Hkv
    num_groups,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_rb,
    stride_rn,
    stride_gb,
    stride_gn,
    stride_hb,
    stride_fb,
    LQ_BUCKET,  # autotune key only (powers of two of Lq and Lk)
    LK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,  # the head dim's tail past BLOCK_D (0: none; see _dot_flags)
    VALUE_DIM: tl.constexpr,  # v's head dim (multi-head latent attention: may differ from HEAD_DIM)
    BLOCK_DV: tl.constexpr,
    G_PAD: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_REAL: tl.constexpr,
    HAS_HORIZON: tl.constexpr,  # a last key per position (bidirectional blocks, segments)
    HAS_START: tl.constexpr,  # a first key per position (segments)
    ROW_ENDS: tl.constexpr,  # sink / statistic key ends per position (segments)
    HAS_HEAD_MASK: tl.constexpr,
    HAS_SINK_LOGIT: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # the interpreter's bfloat16 dot workaround (see _dot)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    GROUP_DOT: tl.constexpr = _GROUP_DOT
    bh, b, h, kvh, m0, offs_m, m_ok, pos = _fwd_program(Hq, Lq, Lk, kv_group, BLOCK_M)
    EVEN_D: tl.constexpr = HEAD_DIM >= BLOCK_D  # (the head columns are all real)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_DV: tl.constexpr = VALUE_DIM == BLOCK_DV
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM

    live = _head_live(head_mask_ptr, h, HAS_HEAD_MASK)
    sink_end, stat_end, stat_top = _key_ends(sink_end_ptr, stat_end_ptr, b, pos, Lk, ROW_ENDS)
    reach = _causal_reach(horizon_ptr, b, pos, Lk, stride_hb, HAS_HORIZON)
    first = _segment_first(start_ptr, b, pos, Lk, stride_fb, HAS_START)
    sink_lo, sink_hi, lo_blk, a, c, band_end = _fwd_band(
        m0, Lq, Lk, window, sink_end, live, reach, first, CAUSAL, HAS_KEY_REAL, HAS_HORIZON, HAS_START, ROW_ENDS,
        BLOCK_M, BLOCK_N,
    )  # fmt: skip

    # ---- pointers ----
    k_base, v_base, real_base, groups_base = _key_bases(
        k_ptr, v_ptr, key_real_ptr, key_groups_ptr, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh, stride_rb, stride_gb
    )
    rows_m = offs_m.to(tl.int64)
    q = _load_rows(q_ptr, b, h, rows_m, stride_qb, stride_qh, stride_qm, stride_qd, offs_d, m_ok, d_ok, EVEN_D)
    q_t = _tail_rows(q_ptr, b, h, rows_m, stride_qb, stride_qh, stride_qm, stride_qd, m_ok, q, HEAD_DIM, BLOCK_D, BLOCK_DT)

    # ---- online softmax state of the keys (the sink logit joins at the end, _finish) ----
    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    l_lo = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    stat = tl.zeros([BLOCK_M], tl.float32)
    grp = tl.zeros([BLOCK_M, G_PAD], tl.float32)
    ent = tl.zeros([BLOCK_M], tl.float32)

    m_i, l_i, l_lo, acc, stat, grp, ent = _attend_range(  # sink keys before the window band
        q, q_t, m_i, l_i, l_lo, acc, stat, grp, ent, k_base, v_base, real_base, groups_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_gn,
        sink_lo, sink_hi, sink_hi, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, sink_end, stat_end, stat_top, qk_scale, softcap,
        True, CAUSAL, HAS_HORIZON, HAS_START, ROW_ENDS, HAS_KEY_REAL, HAS_GROUPS, ENTROPY, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, G_PAD, GROUP_DOT, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    m_i, l_i, l_lo, acc, stat, grp, ent = _attend_range(  # the band's edge below (window, first keys)
        q, q_t, m_i, l_i, l_lo, acc, stat, grp, ent, k_base, v_base, real_base, groups_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_gn,
        lo_blk, a, Lk, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, sink_end, stat_end, stat_top, qk_scale, softcap,
        True, CAUSAL, HAS_HORIZON, HAS_START, ROW_ENDS, HAS_KEY_REAL, HAS_GROUPS, ENTROPY, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, G_PAD, GROUP_DOT, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    m_i, l_i, l_lo, acc, stat, grp, ent = _attend_range(  # interior: no masks
        q, q_t, m_i, l_i, l_lo, acc, stat, grp, ent, k_base, v_base, real_base, groups_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_gn,
        a, c, Lk, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, sink_end, stat_end, stat_top, qk_scale, softcap,
        False, CAUSAL, HAS_HORIZON, HAS_START, ROW_ENDS, HAS_KEY_REAL, HAS_GROUPS, ENTROPY, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, G_PAD, GROUP_DOT, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    m_i, l_i, l_lo, acc, stat, grp, ent = _attend_range(  # the band's edge above (diagonal / horizon, window, Lk)
        q, q_t, m_i, l_i, l_lo, acc, stat, grp, ent, k_base, v_base, real_base, groups_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_gn,
        c, band_end, Lk, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, sink_end, stat_end, stat_top, qk_scale, softcap,
        True, CAUSAL, HAS_HORIZON, HAS_START, ROW_ENDS, HAS_KEY_REAL, HAS_GROUPS, ENTROPY, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, G_PAD, GROUP_DOT, DOT_PRECISION, UPCAST,
    )  # fmt: skip

    # ---- outputs ----
    sink = _sink_logit(sink_logit_ptr, h, live, HAS_SINK_LOGIT)
    norm, lse, sink_mass, entropy = _finish(m_i, l_i, l_lo, stat, ent, sink)
    _store_rows(out_ptr, b, h, rows_m, stride_ob, stride_oh, stride_om, stride_od, offs_dv, m_ok, dv_ok, acc * norm[:, None])
    row = bh * Lq + offs_m  # [B, Hq, Lq] index (int64)
    tl.store(lse_ptr + row, lse, mask=m_ok)
    tl.store(sink_mass_ptr + row, sink_mass, mask=m_ok)
    if ENTROPY:
        tl.store(entropy_ptr + row, entropy, mask=m_ok)
    if HAS_GROUPS:
        g = tl.arange(0, G_PAD)
        g_ptrs = group_mass_ptr + row[:, None] * num_groups + g[None, :]
        tl.store(g_ptrs, grp * norm[:, None], mask=m_ok[:, None] & (g < num_groups)[None, :])


# --------------------------------------------------------------------------------------------
# decode: split-K over the keys, all query heads of a kv head in one program, then a merge
# --------------------------------------------------------------------------------------------


@triton.jit
def _split_program(
    q_ptr, stride_qb, stride_qh, stride_qm, stride_qd, Hkv, Lq, Lk, kv_group, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """The (key split, b, kv head) of a decode program on a 1-D grid of num_splits B Hkv, its
    query rows r = (query head kvh kv_group + r // Lq, query r % Lq) for r < kv_group Lq, and
    their queries. Returns (pid, split, bkv, b, kvh, r, r_ok, h [R], pos [R], offs_d, d_ok,
    q [BLOCK_R, BLOCK_D], q_t [BLOCK_R, BLOCK_DT]: the head dim's tail, q without one)."""
    pid = tl.program_id(0).to(tl.int64)
    split = (pid % num_splits).to(tl.int32)
    bkv = pid // num_splits
    b = bkv // Hkv
    kvh = bkv % Hkv
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    r = tl.arange(0, BLOCK_R)
    r_ok = r < kv_group * Lq
    h = kvh * kv_group + r // Lq
    qi = r % Lq
    q_rows = q_ptr + b * stride_qb + h.to(tl.int64) * stride_qh + qi.to(tl.int64) * stride_qm
    q = _load_tile(q_rows[:, None] + offs_d[None, :] * stride_qd, r_ok, d_ok, True, HEAD_DIM >= BLOCK_D)
    q_t = q
    if BLOCK_DT > 0:
        offs_dt, dt_ok = _tail_columns(HEAD_DIM, BLOCK_D, BLOCK_DT)
        q_t = _load_tile(q_rows[:, None] + offs_dt[None, :] * stride_qd, r_ok, dt_ok, True, HEAD_DIM == BLOCK_D + BLOCK_DT)
    return pid, split, bkv, b, kvh, r, r_ok, h, Lk - Lq + qi, offs_d, d_ok, q, q_t


@triton.jit
def _split_keys(band_lo, split, chunk, Lk, live, first, HAS_START: tl.constexpr, BLOCK_N: tl.constexpr):
    """This split's keys [start, end) of the band [band_lo, Lk); empty unless live. With a start,
    none below the rows' smallest first key (first [R], _segment_first): a split there is empty."""
    start = band_lo + split * chunk
    end = tl.minimum(start + chunk, Lk)
    if HAS_START:
        start = tl.minimum(tl.maximum(start, (tl.min(first, axis=0) // BLOCK_N) * BLOCK_N), end)
    return start, tl.where(live, end, start)


@triton.jit
def _store_partial(state_ptr, acc_ptr, part, r, offs_dv, m, l, acc, NSTATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A split's unnormalised state, every row (padding rows too: no masks): m, l into slots 0,
    1 of state [parts, NSTATE, BLOCK_R], acc into [parts, BLOCK_R, BLOCK_DV]. Returns the
    state row pointers (slot 0) for the caller's other slots."""
    s_ptrs = state_ptr + part * (NSTATE * BLOCK_R) + r
    tl.store(s_ptrs, m)
    tl.store(s_ptrs + BLOCK_R, l)
    tl.store(acc_ptr + part * (BLOCK_R * BLOCK_DV) + r[:, None] * BLOCK_DV + offs_dv[None, :], acc)
    return s_ptrs


@triton.jit
def _merge_row(Hq, Hkv, Lq, kv_group):
    """The query row (b, h, i) of a merge program (one per row of [B, Hq, Lq]), its kv program
    bkv and its row r in the split programs' tiles: (row, b, h, qi, bkv, r)."""
    row = tl.program_id(0).to(tl.int64)
    qi = row % Lq
    bh = row // Lq
    h = bh % Hq
    b = bh // Hq
    return row, b, h, qi, b * Hkv + h // kv_group, (h % kv_group) * Lq + qi


@triton.jit
def _merge_parts(state_ptr, acc_ptr, part, r, s_ok, c0, l0, NSTATE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
                 LO_SLOT: tl.constexpr = 0):  # fmt: skip
    """Merge the partial states `part` [S_PAD] (s_ok: real ones) of row r by their max, with an
    initial (c0, l0) (a sink logit, or -inf, 0): m = max(c0, max_s m_s), shift = m (0 while
    m = -inf), w_s = 2^(m_s - shift), l + l_lo = w_c l0 + sum_s w_s (l_s + l_lo_s) (the parts
    added with compensation, _sum_compensated; l_lo_s in slot LO_SLOT, 0: none),
    acc = sum_s w_s acc_s [BLOCK_DV]. Returns (m, l, l_lo, acc, shift, w_s, m_s, l_s, s_ptrs, w_c)."""
    s_ptrs = state_ptr + part * (NSTATE * BLOCK_R) + r
    m_s = tl.load(s_ptrs, mask=s_ok, other=_NEG_INF)
    l_s = tl.load(s_ptrs + BLOCK_R, mask=s_ok, other=0.0)
    m = tl.maximum(tl.max(m_s, axis=0), c0)
    shift = tl.where(m == _NEG_INF, 0.0, m)
    w_s = tl.exp2(m_s - shift)  # 0 for empty splits (m_s = -inf)
    w_c = tl.exp2(c0 - shift)
    if LO_SLOT > 0:
        l_lo_s = tl.load(s_ptrs + LO_SLOT * BLOCK_R, mask=s_ok, other=0.0)
        l, l_lo = _sum_compensated(w_s * l_s, w_s * l_lo_s)
        l, l_lo = _add_compensated(l, l_lo, w_c * l0)
    else:
        l = tl.sum(w_s * l_s, axis=0) + w_c * l0
        l_lo = 0.0
    offs_dv = tl.arange(0, BLOCK_DV)
    acc_s = tl.load(acc_ptr + part[:, None] * (BLOCK_R * BLOCK_DV) + r * BLOCK_DV + offs_dv[None, :], mask=s_ok[:, None], other=0.0)
    return m, l, l_lo, tl.sum(w_s[:, None] * acc_s, axis=0), shift, w_s, m_s, l_s, s_ptrs, w_c


@triton.jit
def _attention_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    state_ptr,  # [B * Hkv, S, 5, BLOCK_R] float32: m, l, stat, A, l_lo
    acc_ptr,  # [B * Hkv, S, BLOCK_R, BLOCK_DV] float32
    grp_ptr,  # [B * Hkv, S, BLOCK_R, G_PAD] float32 (dummy unless HAS_GROUPS)
    key_real_ptr,
    horizon_ptr,
    start_ptr,
    sink_end_ptr,
    stat_end_ptr,
    head_mask_ptr,
    key_groups_ptr,
    qk_scale,
    softcap,
    window,
    Hkv,
    Lq,
    Lk,
    kv_group,
    band_lo,  # first key of the band (before it: only sink keys are visible)
    chunk,  # keys per split
    num_splits,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_rb,
    stride_rn,
    stride_gb,
    stride_gn,
    stride_hb,
    stride_fb,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,  # the head dim's tail past BLOCK_D (0: none; see _dot_flags)
    VALUE_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr,  # >= kv_group * Lq rows, >= 16 (tl.dot)
    G_PAD: tl.constexpr,  # >= num_groups
    CAUSAL: tl.constexpr,
    HAS_KEY_REAL: tl.constexpr,
    HAS_HORIZON: tl.constexpr,
    HAS_START: tl.constexpr,
    ROW_ENDS: tl.constexpr,
    HAS_HEAD_MASK: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    ENTROPY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    GROUP_DOT: tl.constexpr = False
    EVEN_DV: tl.constexpr = VALUE_DIM == BLOCK_DV
    pid, split, bkv, b, kvh, r, r_ok, h, pos, offs_d, d_ok, q, q_t = _split_program(
        q_ptr, stride_qb, stride_qh, stride_qm, stride_qd, Hkv, Lq, Lk, kv_group, num_splits, HEAD_DIM, BLOCK_D, BLOCK_DT,
        BLOCK_R
    )
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM

    if HAS_HEAD_MASK:  # skip the keys when every query head of this kv head is pruned
        live = tl.load(head_mask_ptr + h, mask=r_ok, other=0) != 0
        any_live = tl.max(live.to(tl.int32), axis=0) > 0
    else:
        any_live = pid >= 0
    sink_end, stat_end, stat_top = _key_ends(sink_end_ptr, stat_end_ptr, b, pos, Lk, ROW_ENDS)
    reach = _causal_reach(horizon_ptr, b, pos, Lk, stride_hb, HAS_HORIZON)  # (the splits cover every key to Lk)
    first = _segment_first(start_ptr, b, pos, Lk, stride_fb, HAS_START)  # (masked per key)

    # this split's keys [start, end) of the band [band_lo, Lk); split 0 also takes the sink
    # keys before the band, [sink_lo, sink_hi)
    start0, end = _split_keys(band_lo, split, chunk, Lk, any_live, first, HAS_START, BLOCK_N)
    sinks_here = (split == 0) & any_live
    sink_lo, sink_hi = _sink_span(sink_end, first, band_lo, HAS_START, ROW_ENDS, BLOCK_N)
    sink_hi = tl.where(sinks_here, sink_hi, 0)
    k_base, v_base, real_base, groups_base = _key_bases(
        k_ptr, v_ptr, key_real_ptr, key_groups_ptr, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh, stride_rb, stride_gb
    )

    m_i = tl.full([BLOCK_R], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    l_lo = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    stat = tl.zeros([BLOCK_R], tl.float32)
    grp = tl.zeros([BLOCK_R, G_PAD], tl.float32)
    ent = tl.zeros([BLOCK_R], tl.float32)
    m_i, l_i, l_lo, acc, stat, grp, ent = _attend_range(
        q, q_t, m_i, l_i, l_lo, acc, stat, grp, ent, k_base, v_base, real_base, groups_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_gn,
        sink_lo, sink_hi, sink_hi, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, sink_end, stat_end, stat_top, qk_scale, softcap,
        True, CAUSAL, HAS_HORIZON, HAS_START, ROW_ENDS, HAS_KEY_REAL, HAS_GROUPS, ENTROPY, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, G_PAD, GROUP_DOT, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    m_i, l_i, l_lo, acc, stat, grp, ent = _attend_range(  # masked: decode is bound by the K / V reads
        q, q_t, m_i, l_i, l_lo, acc, stat, grp, ent, k_base, v_base, real_base, groups_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_gn,
        start0, end, end, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, sink_end, stat_end, stat_top, qk_scale, softcap,
        True, CAUSAL, HAS_HORIZON, HAS_START, ROW_ENDS, HAS_KEY_REAL, HAS_GROUPS, ENTROPY, HAS_SOFTCAP, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, G_PAD, GROUP_DOT, DOT_PRECISION, UPCAST,
    )  # fmt: skip

    # ---- the unnormalised partial state (every row, padding rows too: no masks) ----
    part = bkv * num_splits + split
    s_ptrs = _store_partial(state_ptr, acc_ptr, part, r, offs_dv, m_i, l_i, acc, 5, BLOCK_R, BLOCK_DV)
    tl.store(s_ptrs + 2 * BLOCK_R, stat)
    tl.store(s_ptrs + 3 * BLOCK_R, ent)
    tl.store(s_ptrs + 4 * BLOCK_R, l_lo)
    if HAS_GROUPS:
        g = tl.arange(0, G_PAD)
        tl.store(grp_ptr + part * (BLOCK_R * G_PAD) + r[:, None] * G_PAD + g[None, :], grp)


@triton.jit
def _attention_merge_kernel(
    state_ptr,
    acc_ptr,
    grp_ptr,
    out_ptr,
    lse_ptr,
    sink_mass_ptr,
    group_mass_ptr,
    entropy_ptr,
    head_mask_ptr,
    sink_logit_ptr,
    Hq,
    Hkv,
    Lq,
    kv_group,
    num_groups,
    num_splits,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    VALUE_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    G_PAD: tl.constexpr,
    S_PAD: tl.constexpr,
    HAS_HEAD_MASK: tl.constexpr,
    HAS_SINK_LOGIT: tl.constexpr,
    HAS_GROUPS: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    """One program per query row (b, h, i): merge the splits' states by their max,
    m = max_s m_s, w_s = 2^(m_s - m): l = sum_s w_s l_s, acc = sum_s w_s acc_s, stat, grp
    likewise, A = sum_s w_s (A_s + (m_s - m) l_s); then the sink logit joins (_finish)."""
    row, b, h, qi, bkv, r = _merge_row(Hq, Hkv, Lq, kv_group)
    live = _head_live(head_mask_ptr, h, HAS_HEAD_MASK)
    s = tl.arange(0, S_PAD)
    s_ok = s < tl.where(live, num_splits, 0)  # a pruned head merges nothing
    part = bkv * num_splits + s
    c0, l0 = _sink_state(sink_logit_ptr, h, live, False)  # (-inf, 0): the sink joins in _finish
    m, l, l_lo, acc, shift, w_s, m_s, l_s, s_ptrs, _ = _merge_parts(state_ptr, acc_ptr, part, r, s_ok, c0, l0, 5, BLOCK_R, BLOCK_DV, 4)
    stat = tl.sum(w_s * tl.load(s_ptrs + 2 * BLOCK_R, mask=s_ok, other=0.0), axis=0)
    if ENTROPY:
        a_s = tl.load(s_ptrs + 3 * BLOCK_R, mask=s_ok, other=0.0)
        # 0 from a zero weight: empty splits (m_s = -inf, l = A = 0), and m_s - m overflowing to
        # -inf (splits' maxima of both signs near float max / 2)
        ent = tl.sum(tl.where(w_s > 0, w_s * (a_s + (m_s - shift) * l_s), 0.0), axis=0)
    else:
        ent = 0.0

    sink = _sink_logit(sink_logit_ptr, h, live, HAS_SINK_LOGIT)
    norm, lse, sink_mass, entropy = _finish(m, l, l_lo, stat, ent, sink)
    offs_dv = tl.arange(0, BLOCK_DV)
    qi1 = tl.zeros([1], tl.int64) + qi  # the row as a 1-row tile
    _store_rows(out_ptr, b, h, qi1, stride_ob, stride_oh, stride_om, stride_od, offs_dv, qi1 >= 0, offs_dv < VALUE_DIM,
                (acc * norm)[None, :])  # fmt: skip
    tl.store(lse_ptr + row, lse)
    tl.store(sink_mass_ptr + row, sink_mass)
    if ENTROPY:
        tl.store(entropy_ptr + row, entropy)
    if HAS_GROUPS:
        g = tl.arange(0, G_PAD)
        grp_ptrs = grp_ptr + part[:, None] * (BLOCK_R * G_PAD) + r * G_PAD + g[None, :]
        grp_s = tl.load(grp_ptrs, mask=s_ok[:, None], other=0.0)
        grp = tl.sum(w_s[:, None] * grp_s, axis=0)
        tl.store(group_mass_ptr + row * num_groups + g, grp * norm, mask=g < num_groups)


# --------------------------------------------------------------------------------------------
# configs and launch
# --------------------------------------------------------------------------------------------

# Prefill. The first config that survives pruning is the untuned default (FASTPROBE_AUTOTUNE=0),
# so each list is in order of preference. 16-bit inputs: tensor-core products (BLOCK_N = 16
# only wins for large head dims with statistics, e.g. D = 256, where wider tiles spill).
_FWD_CONFIGS_16 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
    for bm in (128, 64)
    for bn in (64, 128, 32, 16)
    for nw in (4, 8)
    for ns in (3, 2)
]
# float32 inputs: full float32 products (ieee) run on the FMA units, whose operand fragments
# live in registers, so only small tiles avoid spilling (seen compiling for sm_90)
_FWD_CONFIGS_F32 = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=2)
    for bm, bn, nw in ((64, 16, 8), (32, 32, 8), (32, 16, 4), (32, 16, 8), (16, 16, 4))
]
_FWD_CONFIGS = _FWD_CONFIGS_16 + _FWD_CONFIGS_F32
_F32_IDS = frozenset(id(cfg) for cfg in _FWD_CONFIGS_F32)  # (Config compares by value)
_SPLIT_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=nw, num_stages=ns)
    for bn in (64, 128, 32)
    for nw in (4, 8)
    for ns in (3, 4, 2)
]
# Register model (fitted to ptxas on sm_90, Triton 3.9): a program holds its accumulator
# (rows x BLOCK_D) and about `c` float32 values per score-tile element (scores, weights and the
# 16-bit copy for P @ V: c = 3; the group product keeps the weights and their hi / lo parts
# live: +2; entropy: +1), spread over 32 x num_warps threads. Past ~192 of them ptxas spills.
# A kernel with two accumulators (dual_path_attention's decode splits: two softmax states whose
# key blocks branch three ways) was fitted separately: each extra accumulator costs about twice
# its size (its registers and the copies the branches keep), c = 5, and (mma v2 products of few
# rows) it also keeps the K and V operand tiles (2 BLOCK_N x BLOCK_D) live. dual_path_attention's
# prefill keeps one state per loop, as here. (Fitted on compiles without the launch's
# specialisations; rechecked with them for D = 128 16-bit prefill, bench/NOTES.md
# "compile_sm90.py, corrected": it keeps no config that spills and drops a few that do not.)
_MAX_TILE_REGS = 192
# float32 (FMA) products: rows x BLOCK_N x BLOCK_D / threads past ~512 spill (~256 with a
# padded head dim, whose masks cost registers too)
_MAX_FMA_TILE = 512
_SMEM_FALLBACK = 99 * 1024  # a budget every supported GPU has, when the device query fails


@functools.lru_cache(maxsize=None)
def _smem_budget(device_index: int) -> int:
    """Shared memory a program may use on this device, with a margin for layout conversions."""
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"] * 0.85)
    except Exception:  # no driver query
        return _SMEM_FALLBACK


def _smem_of(q) -> int:
    if isinstance(q, torch.Tensor) and q.is_cuda:
        return _smem_budget(q.device.index if q.device.index is not None else torch.cuda.current_device())
    return _SMEM_FALLBACK


def _tile_regs(rows, block_n, block_d, elt, cfg, c, even_d, accumulators=1, operands=False) -> float:
    """The register model above, as a fraction of its limit (> 1: expect spills). accumulators:
    (rows x BLOCK_D) float32 accumulators of the kernel; operands: K / V tiles in registers."""
    threads = 32 * cfg.num_warps
    extra_acc = 2 * (accumulators - 1) * rows * block_d / threads / _MAX_TILE_REGS
    if elt == 4:
        return rows * block_n * block_d / threads / (_MAX_FMA_TILE if even_d else _MAX_FMA_TILE // 2) + extra_acc
    kv = 2 * block_n * block_d if operands else 0
    return (rows * block_d + c * rows * block_n + kv) / threads / _MAX_TILE_REGS + extra_acc


def _fits(rows, block_n, block_d, elt, cfg, smem, c, even_d, accumulators=1, operands=False) -> bool:
    """Whether a config's tiles fit the registers (model above) and shared memory (Q, and K + V
    for each pipeline stage: this estimate matched Triton's allocation exactly for 16-bit)."""
    shared = (rows * block_d + 2 * cfg.num_stages * block_n * block_d) * elt
    return _tile_regs(rows, block_n, block_d, elt, cfg, c, even_d, accumulators, operands) <= 1 and shared <= smem


def _tile_values(kwargs, accumulators=1) -> int:
    """c of the register model."""
    groups = 2 * bool(kwargs.get("HAS_GROUPS")) * bool(kwargs.get("GROUP_DOT", True))
    return 3 + groups + bool(kwargs.get("ENTROPY")) + 2 * (accumulators - 1)


def _model_widths(kwargs) -> tuple:
    """(block_d, even_d) for the register and shared-memory model: the wider of the query / key
    and value tiles (equal but for multi-head latent attention), and whether both are unpadded."""
    block_d = kwargs["BLOCK_D"] + kwargs.get("BLOCK_DT", 0)  # (a head dim in two blocks: their sum)
    block_dv = kwargs.get("BLOCK_DV", block_d)
    even = kwargs.get("HEAD_DIM", block_d) == block_d and kwargs.get("VALUE_DIM", block_dv) == block_dv
    return max(block_d, block_dv), even


def _prune_fwd(configs, named_args, **kwargs):
    """Prefill configs that fit (see the register model); the kernel's constexprs in kwargs."""
    block_d, even_d = _model_widths(kwargs)
    q = named_args.get("q_ptr")
    elt = q.element_size() if isinstance(q, torch.Tensor) else 2
    lq = named_args.get("Lq", 1 << 30)
    smem = _smem_of(q)
    c = _tile_values(kwargs)
    own = [cfg for cfg in configs if (id(cfg) in _F32_IDS) == (elt == 4)] or list(configs)
    kept = []
    for cfg in own:
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        if bm > 64 and lq <= 64:  # a 128-row tile for <= 64 queries is mostly padding
            continue
        if elt != 4 and cfg.num_warps == 8 and bm < 128:  # two warpgroups want 2 x 64 rows
            continue
        if elt != 4 and bn < 32 and block_d < 256:
            continue
        if _fits(bm, bn, block_d, elt, cfg, smem, c, even_d):
            kept.append(cfg)
    # nothing fits (a very large head dim): the smallest tiles
    return kept or [min(own, key=lambda cfg: (cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"], cfg.num_stages))]


def _prune_split(configs, named_args, accumulators=1, **kwargs):
    """Decode (split) configs that fit; as _prune_fwd with BLOCK_R query rows."""
    (block_d, even_d), block_r = _model_widths(kwargs), kwargs["BLOCK_R"]
    q = named_args.get("q_ptr")
    elt = q.element_size() if isinstance(q, torch.Tensor) else 2
    smem = _smem_of(q)
    c = _tile_values(dict(kwargs, GROUP_DOT=False), accumulators)
    own = [cfg for cfg in configs if elt != 4 or cfg.num_warps == 8]  # float32, 4 warps: spills (sm_90)
    if elt == 4 and accumulators > 1:  # float32 with two accumulators: 64-key blocks spill (sm_90)
        own = [cfg for cfg in own if cfg.kwargs["BLOCK_N"] <= 32]

    operands = accumulators > 1  # (see the register model)

    def pressure(cfg):
        return _tile_regs(block_r, cfg.kwargs["BLOCK_N"], block_d, elt, cfg, c, even_d, accumulators, operands)

    kept = [cfg for cfg in own if _fits(block_r, cfg.kwargs["BLOCK_N"], block_d, elt, cfg, smem, c, even_d, accumulators, operands)]
    # nothing fits (float32 with many rows): the least register pressure
    return kept or [min(own, key=lambda cfg: (pressure(cfg), cfg.num_stages))]


_FWD_KEY_SHAPES = ["LQ_BUCKET", "LK_BUCKET"]  # (see _lq_lk_buckets)
_FWD_KEY = [
    "HEAD_DIM", "VALUE_DIM", "CAUSAL", "HAS_KEY_REAL", "HAS_HORIZON", "HAS_START", "ROW_ENDS", "HAS_GROUPS",
    "ENTROPY", "HAS_SOFTCAP", *_FWD_KEY_SHAPES,
]  # fmt: skip
_attention_fwd_tuned = autotune(
    configs=_FWD_CONFIGS, key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_fwd}
)(_attention_fwd_kernel)
# tuned once per head dim and row count, not per length (decoding changes Lk every step)
_SPLIT_KEY = [
    "HEAD_DIM", "VALUE_DIM", "BLOCK_R", "CAUSAL", "HAS_KEY_REAL", "HAS_HORIZON", "HAS_START", "ROW_ENDS",
    "HAS_GROUPS", "ENTROPY", "HAS_SOFTCAP",
]  # fmt: skip
_attention_split_tuned = autotune(
    configs=_SPLIT_CONFIGS, key=_SPLIT_KEY, prune_configs_by={"early_config_prune": _prune_split}
)(_attention_split_kernel)

# Through the Triton interpreter (CPU tests): small fixed blocks, so that short sequences
# still span several blocks (interior, band edges and sink blocks all run).
_INTERPRET_BLOCK_M = 16
_INTERPRET_BLOCK_N = 16

# Decode dispatch. The split path pays a second (small) launch and a float32 scratch round
# trip; it wins when the prefill grid, B * Hq * cdiv(Lq, BLOCK_M) programs each streaming the
# whole band, cannot fill the GPU or would read each kv head's K / V Hq / Hkv times with a
# mostly-padding 64-row query tile. That is the case for a few queries (decoding, short
# speculative drafts) over a band of keys long enough that reading it dominates the launch
# latency: at 512 keys of D = 128 in 16-bit, K + V of one head are 256 KiB (~10 us for one
# SM's share of HBM bandwidth, against a few us for the extra launch).
_DECODE_MAX_QUERIES = 4
_DECODE_MAX_ROWS = 128  # kv_group * Lq rows in one program's tile
_DECODE_MAX_ROWS_F32 = 16  # float32 (FMA) products of more rows spill whatever the tile (sm_90)
_DECODE_MIN_KEYS = 512
_MIN_KEYS_PER_SPLIT = 256  # fewer keys per split: the merge traffic is no longer small
_MAX_SPLITS = 64
_SPLIT_ALIGN = 16  # keys per split are a multiple of this (masks handle the rest)
_PROGRAMS_PER_SM = 2


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    try:
        return int(torch.cuda.get_device_properties(device_index).multi_processor_count)
    except Exception:
        return 132  # an H100 / H200


def _auto_splits(band: int, programs: int, device: torch.device) -> int:
    """Splits so that programs * splits fills the GPU's _PROGRAMS_PER_SM programs per SM once
    and no more (32 kv heads on 132 SMs: 8 splits, 256 programs in one wave, where 9 would make
    288: a second wave of 24 programs, taking as long as the first), with at least
    _MIN_KEYS_PER_SPLIT keys each."""
    sms = _sm_count(device.index if device.index is not None else 0) if device.type == "cuda" else 132
    want = _PROGRAMS_PER_SM * sms // max(programs, 1)
    return max(1, min(want, band // _MIN_KEYS_PER_SPLIT, _MAX_SPLITS))


def _next_pow2_at_least(n: int, least: int) -> int:
    return max(least, next_pow2(n))


def _check_layout(name, tensor, shape, dtype, contiguous=True):
    if tensor.shape != shape or tensor.dtype != dtype or (contiguous and not tensor.is_contiguous()):
        kind = "a contiguous " if contiguous else "a "
        raise ValueError(f"{name} must be {kind}{str(dtype).removeprefix('torch.')} tensor of shape {list(shape)}")


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor):
    """The checks every attention launcher shares: q [B, Hq, Lq, D], k [B, Hkv, Lk, D] and
    v [B, Hkv, Lk, Dv] with Hq % Hkv == 0, one dtype of float32 / bfloat16 / float16, out
    [B, Hq, Lq, Dv] of that dtype (any strides, a unit one along the head dims). Returns
    ((B, Hq, Hkv, Lq, Lk, D, Dv), the strides of q, k, v and out in one 16-tuple: the kernels'
    stride arguments, read once)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be 4-D: [B, Hq, Lq, D], [B, Hkv, Lk, D] and [B, Hkv, Lk, Dv]")
    (B, Hq, Lq, D), k_shape, v_shape = q.shape, k.shape, v.shape  # (each read once: a decoding step's launch)
    _, Hkv, Lk, _ = k_shape
    Dv = v_shape[3]
    if k_shape != (B, Hkv, Lk, D) or v_shape != (B, Hkv, Lk, Dv) or Dv == 0 or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            "k and v must be [B, Hkv, Lk, D] and [B, Hkv, Lk, Dv] with Hq % Hkv == 0; "
            f"got q {tuple(q.shape)}, k {tuple(k_shape)}, v {tuple(v_shape)}"
        )
    if Lq > Lk:  # (queries are the last Lq of the Lk positions; the C++ kernels refuse this too)
        raise ValueError(f"q has Lq = {Lq} queries but k has only Lk = {Lk} keys: the queries are the last Lq of "
                         "the Lk positions, so Lq <= Lk")
    dtype = q.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16) or k.dtype != dtype or v.dtype != dtype:
        raise ValueError("q, k and v must share one dtype: float32, bfloat16 or float16")
    _check_layout("out", out, (B, Hq, Lq, Dv), dtype, contiguous=False)
    # (d * stride_d is int32 math; stride() whole: stride(-1) parses its argument, ~2x slower)
    strides = q.stride() + k.stride() + v.stride() + out.stride()  # (q's [0:4], k's [4:8], v's [8:12], out's [12:16])
    if (D > 1 and (strides[3] != 1 or strides[7] != 1)) or (Dv > 1 and (strides[11] != 1 or strides[15] != 1)):
        for name, width, stride_d in (("q", D, strides[3]), ("k", D, strides[7]), ("v", Dv, strides[11]),
                                      ("out", Dv, strides[15])):  # fmt: skip
            if width > 1 and stride_d != 1:
                raise ValueError(f"{name} must have a unit stride along its head dimension, got {stride_d}")
    return (B, Hq, Hkv, Lq, Lk, D, Dv), strides


def _head_blocks(head_dim: int) -> tuple:
    """(BLOCK_D, BLOCK_DT): the query / key head dim as one power-of-two block, or as a head
    block and a tail block (each a power of two >= 16, for tl.dot) when the two cover less
    padding: 192 = 128 + 64 (not 256), 96 = 64 + 32, 80 = 64 + 16, 40 = 32 + 16 (not 64)."""
    whole = _next_pow2_at_least(head_dim, 16)
    head = whole // 2
    tail = _next_pow2_at_least(head_dim - head, 16) if head_dim > head else 0
    if head >= 16 and tail and head + tail < whole:
        return head, tail
    return whole, 0


@functools.lru_cache(maxsize=None)
def _dot_flags(dtype: torch.dtype, head_dim: int, value_dim: int, interpreted: bool) -> dict:
    """The constexprs of the products every attention kernel shares (one dict per combination,
    made once: callers only read it). interpreted: interpreter_enabled(), read once per launch."""
    block_d, block_dt = _head_blocks(head_dim)
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_DT=block_dt,
        VALUE_DIM=value_dim,
        BLOCK_DV=_next_pow2_at_least(value_dim, 16),
        # float32 products in full float32 (tf32 would cost ~1e-3 relative); ignored otherwise
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=interpreted and dtype == torch.bfloat16,  # the interpreter's bfloat16 dot (see _dot)
    )


def _split_rows(rows: int) -> int:
    """BLOCK_R: a decode program's (Hq / Hkv) Lq query rows, padded (>= 16, for tl.dot)."""
    return _next_pow2_at_least(rows, 16)


class _Options(NamedTuple):
    """Everything sink_attention's constexprs follow: the key of _fwd_flags and _decode_flags,
    which build each combination's constexprs once (a decoding step's launch only looks them up)."""

    dtype: torch.dtype
    head_dim: int
    value_dim: int
    interpreted: bool  # interpreter_enabled()
    causal: bool
    has_key_real: bool
    has_horizon: bool
    has_start: bool
    row_ends: bool  # sink_end / stat_end per query position
    has_head_mask: bool
    has_sink_logit: bool
    num_groups: int  # 0: no key groups
    entropy: bool
    softcap: bool  # a soft cap c > 0


@functools.lru_cache(maxsize=1024)
def _fwd_flags(options: _Options) -> dict:
    """The prefill kernel's constexprs (made once per combination: callers only read them)."""
    return dict(
        G_PAD=_next_pow2_at_least(options.num_groups, 16),
        CAUSAL=options.causal,
        HAS_KEY_REAL=options.has_key_real,
        HAS_HORIZON=options.has_horizon,
        HAS_START=options.has_start,
        ROW_ENDS=options.row_ends,
        HAS_HEAD_MASK=options.has_head_mask,
        HAS_SINK_LOGIT=options.has_sink_logit,
        HAS_GROUPS=options.num_groups > 0,
        ENTROPY=options.entropy,
        HAS_SOFTCAP=options.softcap,
        **_dot_flags(options.dtype, options.head_dim, options.value_dim, options.interpreted),
    )


@functools.lru_cache(maxsize=1024)
def _decode_flags(options: _Options, rows: int) -> tuple:
    """(split kernel's, merge kernel's but S_PAD) constexprs of the decode path for `rows` =
    (Hq / Hkv) Lq query rows per program (made once per combination: callers only read them).
    The split kernel takes the prefill kernel's less HAS_SINK_LOGIT (the merge adds the sink)."""
    flags, block_r = _fwd_flags(options), _split_rows(rows)
    # the split kernel sums groups by masked row sums: one per padded group, not a >= 16 wide product
    g_pad = _next_pow2_at_least(options.num_groups, 2)
    split = {key: val for key, val in flags.items() if key != "HAS_SINK_LOGIT"}
    split.update(G_PAD=g_pad, BLOCK_R=block_r)
    merge = dict(
        VALUE_DIM=options.value_dim, BLOCK_DV=flags["BLOCK_DV"], BLOCK_R=block_r, G_PAD=g_pad,
        HAS_HEAD_MASK=options.has_head_mask, HAS_SINK_LOGIT=options.has_sink_logit, HAS_GROUPS=flags["HAS_GROUPS"],
        ENTROPY=options.entropy,
    )  # fmt: skip
    return split, merge


def _decode_plan(q: torch.Tensor, B: int, Hq: int, Hkv: int, Lq: int, Lk: int, win: int, split_keys: Optional[int]):
    """Whether to take the decode (split-K) path and how: (splits, band_lo, band), splits = 0
    for the prefill kernel. q [B, Hq, Lq, D] (its sizes given: _check_qkv's), k [B, Hkv, Lk, D].
    Keys before band_lo can only be sinks for the last Lq queries (win: the window, > every
    |p - j| when there is none). split_keys: None chooses (a few queries over a long band, see
    _DECODE_*), 0 forces prefill, n >= 1 about n splits."""
    band_lo = max(0, Lk - Lq - win + 1) // _SPLIT_ALIGN * _SPLIT_ALIGN
    band = Lk - band_lo
    rows = Hq // Hkv * Lq
    if split_keys is None:
        max_rows = _DECODE_MAX_ROWS_F32 if q.dtype == torch.float32 else _DECODE_MAX_ROWS
        use_split = Lq <= _DECODE_MAX_QUERIES and rows <= max_rows and band >= _DECODE_MIN_KEYS
        return (_auto_splits(band, B * Hkv, q.device) if use_split else 0), band_lo, band
    splits = int(split_keys)
    if splits < 0:
        raise ValueError("split_keys must be None or >= 0")
    if splits > 0 and rows > _DECODE_MAX_ROWS:
        raise ValueError(f"the decode path holds (Hq / Hkv) * Lq <= {_DECODE_MAX_ROWS} query rows, got {rows}")
    return splits, band_lo, band


def _split_layout(band: int, splits: int):
    """(chunk, splits) of the decode path: keys per split, a multiple of _SPLIT_ALIGN (so fewer
    splits may remain: none left empty by the rounding)."""
    chunk = cdiv(cdiv(max(band, 1), splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return chunk, max(1, cdiv(band, chunk))


def _launch(kernel, tuned, configs, prune, grid, args, flags, interpret_blocks, prune_args, buckets=()):
    """Run `kernel` on `grid`: fixed small blocks under the interpreter, the autotuned version
    (`tuned`: its choice per dtype, constexprs and length buckets, see launch_tuned), or with
    FASTPROBE_AUTOTUNE=0 the first config that survives `prune`. (The signature
    tests/test_attention.py's check_every_config spies on.)"""
    if interpreter_enabled():
        kernel[grid](*args, **flags, **FP_FUSION, **interpret_blocks, num_warps=4)
    elif autotune_enabled():
        launch_tuned(tuned, kernel, grid, args, flags, (prune_args["q_ptr"].dtype, *flags.values(), *buckets))
    else:
        cfg = prune(configs, prune_args, **flags)[0]
        kernel[grid](*args, **flags, **FP_FUSION, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    sink_mass: torch.Tensor,
    group_mass: Optional[torch.Tensor],
    entropy: Optional[torch.Tensor],
    *,
    scale: float,
    causal: bool,
    window: int,
    key_real: Optional[torch.Tensor],
    sink_end: torch.Tensor,
    stat_end: torch.Tensor,
    head_mask: Optional[torch.Tensor],
    sink_logit: Optional[torch.Tensor],
    key_groups: Optional[torch.Tensor],
    num_groups: int,
    softcap: float = 0.0,
    split_keys: Optional[int] = None,
    horizon: Optional[torch.Tensor] = None,
    start: Optional[torch.Tensor] = None,
) -> None:
    """Launch the attention kernels; writes every element of out, lse, sink_mass and (when
    given) group_mass and entropy.

    q [B, Hq, Lq, D]; k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (Hq % Hkv == 0; Dv may differ from
    D), float32 / bfloat16 / float16, any strides with a unit stride along the head dims.
    out [B, Hq, Lq, Dv] of their dtype, the same (e.g. a transposed [B, Lq, Hq, Dv]).
    lse, sink_mass, entropy [B, Hq, Lq] and group_mass [B, Hq, Lq, G] float32 contiguous
    (entropy None: not computed; group_mass None iff key_groups None). window 0: none.
    key_real uint8 [B, Lk] (1 = real key) or None; sink_end, stat_end int64 [B]: keys
    j < sink_end[b] are sinks, real keys j < stat_end[b] count in sink_mass; or both int64
    [B, Lk] contiguous, per query position p (segments): sink_end[b, p], stat_end[b, p] (the
    kernels clamp every end to [0, Lk]). head_mask uint8
    [Hq] or None; sink_logit float32 [Hq] or None; key_groups int32 [B, Lk] with ids in
    [0, num_groups) (checked by the caller) or None.
    softcap: c > 0 caps every score, s = c tanh(scale q . k / c), before masking and all
    statistics (Gemma 2's attn_logit_softcapping); 0 (or None): no cap.
    horizon, start: int64 [B, Lk] contiguous or None; query position p sees only keys
    j <= horizon[b, p] (with causal instead of j <= p: bidirectional blocks; a segment's last
    position) and j >= start[b, p] (a segment's first position; sink keys too); the kernels
    clamp horizon[b, p] to [p, Lk - 1] and start[b, p] to [0, p].
    split_keys: None chooses the path (decode split-K for a few queries over long keys, see
    _DECODE_*); 0 forces the prefill kernel; n >= 1 forces the decode path with about n key
    splits (at most n; each split gets a multiple of 16 keys).
    """
    sizes, strides = _check_qkv(q, k, v, out)
    B, Hq, Hkv, Lq, Lk, D, Dv = sizes
    _check_layout("lse", lse, (B, Hq, Lq), torch.float32)
    _check_layout("sink_mass", sink_mass, (B, Hq, Lq), torch.float32)
    row_ends = sink_end.dim() == 2  # per query position (segments), else per batch row
    _check_layout("sink_end", sink_end, (B, Lk) if row_ends else (B,), torch.int64)
    _check_layout("stat_end", stat_end, sink_end.shape, torch.int64)
    if entropy is not None:
        _check_layout("entropy", entropy, (B, Hq, Lq), torch.float32)
    if key_real is not None:
        _check_layout("key_real", key_real, (B, Lk), torch.uint8, contiguous=False)
    if head_mask is not None:
        _check_layout("head_mask", head_mask, (Hq,), torch.uint8)
    if sink_logit is not None:
        _check_layout("sink_logit", sink_logit, (Hq,), torch.float32)
    if horizon is not None:
        _check_layout("horizon", horizon, (B, Lk), torch.int64)
    if start is not None:
        _check_layout("start", start, (B, Lk), torch.int64)
    if (key_groups is None) != (group_mass is None):
        raise ValueError("group_mass must be given exactly when key_groups is")
    if key_groups is not None:
        if num_groups < 1:
            raise ValueError("num_groups must be >= 1")
        _check_layout("key_groups", key_groups, (B, Lk), torch.int32, contiguous=False)
        _check_layout("group_mass", group_mass, (B, Hq, Lq, num_groups), torch.float32)
    window = int(window)
    if window < 0:
        raise ValueError("window must be >= 0 (0: no window)")
    softcap = float(softcap or 0.0)
    if not 0.0 <= softcap < float("inf"):
        raise ValueError(f"softcap must be a finite number >= 0 (0: none), got {softcap}")
    if B * Hq * Lq == 0:
        return

    # no window: one wider than any |p - j| (p in [Lk - Lq, Lk), j in [0, Lk)), so in_window
    # always holds and the band is every key. A wider window hides nothing either, and is
    # capped to that (a window near 2^31 would overflow p + window in int32 in the kernel)
    win = window if 0 < window < Lk + Lq + 1 else Lk + Lq + 1
    q, strides, qk_scale, cap = _scaled_q(q, strides, float(scale), softcap)
    has_groups = key_groups is not None
    has_horizon, has_start = horizon is not None, start is not None
    # a dummy pointer for what is not given (never read: its flag is off)
    dummy = lse
    ptrs = dict(
        key_real=key_real if key_real is not None else dummy,
        horizon=horizon if has_horizon else dummy,
        start=start if has_start else dummy,
        head_mask=head_mask if head_mask is not None else dummy,
        sink_logit=sink_logit if sink_logit is not None else dummy,
        key_groups=key_groups if has_groups else dummy,
        group_mass=group_mass if has_groups else dummy,
        entropy=entropy if entropy is not None else dummy,
    )
    stride_r = key_real.stride() if key_real is not None else (0, 0)
    stride_g = key_groups.stride() if has_groups else (0, 0)
    stride_bounds = (horizon.stride(0) if has_horizon else 0, start.stride(0) if has_start else 0)
    options = _Options(
        q.dtype, D, Dv, interpreter_enabled(), bool(causal), key_real is not None, has_horizon, has_start, row_ends,
        head_mask is not None, sink_logit is not None, num_groups if has_groups else 0, entropy is not None, softcap > 0,
    )  # fmt: skip
    splits, band_lo, band = _decode_plan(q, B, Hq, Hkv, Lq, Lk, win, split_keys)
    if splits > 0:
        _launch_split(q, k, v, out, lse, sink_mass, ptrs, sink_end, stat_end, stride_r, stride_g, stride_bounds, options,
                      sizes, strides, qk_scale, cap, win, num_groups, band_lo, band, splits)  # fmt: skip
    else:
        _launch_fwd(q, k, v, out, lse, sink_mass, ptrs, sink_end, stat_end, stride_r, stride_g, stride_bounds,
                    _fwd_flags(options), sizes, strides, qk_scale, cap, win, num_groups)  # fmt: skip


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _base2_scale(q: torch.Tensor, scale: float, softcap: float) -> tuple:
    """(q, qk_scale, cap) of the kernels' base-2 scores t = s log2(e), which they compute as
    t = qk_scale q . k, then with a soft cap c > 0 as t = (cap tanh(t)) log2(e):
      soft cap: qk_scale = scale / c, cap = c. A scale / c past float max becomes float max:
        tanh(q . k float max) = +-1 in float32 as with the true factor (|q . k| >= 2^-124: tanh
        rounds to 1 from ~9), and 0, not 0 inf = NaN, for q . k = 0.
      no cap: qk_scale = scale log2(e), cap = 0. For a scale in (float max / log2(e), float max]
        that overflows: q doubled in a copy (exact unless q overflows) and qk_scale halved."""
    if softcap > 0:
        return q, min(scale / softcap, _FLOAT32_MAX), softcap
    qk_scale = scale * 1.4426950408889634
    if qk_scale > _FLOAT32_MAX:
        return q * 2.0, qk_scale / 2.0, 0.0
    return q, qk_scale, 0.0


def _scaled_q(q: torch.Tensor, strides: tuple, scale: float, softcap: float) -> tuple:
    """(q, strides, qk_scale, cap): _base2_scale's, with the 16 strides of _check_qkv (q's first)
    still those of the q returned (a doubled copy has its own)."""
    scaled, qk_scale, cap = _base2_scale(q, scale, softcap)
    if scaled is not q:
        strides = scaled.stride() + strides[4:]
    return scaled, strides, qk_scale, cap


def _lq_lk_buckets(Lq: int, Lk: int) -> tuple:
    """The prefill autotune keys LQ_BUCKET, LK_BUCKET: powers of two of Lq and Lk."""
    return min(next_pow2(Lq), 1 << 16), min(next_pow2(Lk), 1 << 16)


def _fwd_grid(Lq: int, programs: int):
    """The prefill grid: cdiv(Lq, BLOCK_M) query blocks of each of `programs` (b, h)."""
    return lambda meta: (cdiv(Lq, meta["BLOCK_M"]) * programs,)


_INTERPRET_FWD_BLOCKS = dict(BLOCK_M=_INTERPRET_BLOCK_M, BLOCK_N=_INTERPRET_BLOCK_N)
_INTERPRET_SPLIT_BLOCKS = dict(BLOCK_N=_INTERPRET_BLOCK_N)


def _launch_fwd(q, k, v, out, lse, sink_mass, ptrs, sink_end, stat_end, stride_r, stride_g, stride_bounds, flags,
                sizes, strides, qk_scale, cap, win, num_groups):  # fmt: skip
    """The prefill kernel: flags from _fwd_flags, sizes and strides from _check_qkv."""
    B, Hq, Hkv, Lq, Lk, _, _ = sizes
    buckets = _lq_lk_buckets(Lq, Lk)
    args = (
        q, k, v, out, lse, sink_mass, ptrs["group_mass"], ptrs["entropy"], ptrs["key_real"], ptrs["horizon"],
        ptrs["start"], sink_end, stat_end, ptrs["head_mask"], ptrs["sink_logit"], ptrs["key_groups"],
        qk_scale, cap, win, Hq, Lq, Lk, Hq // Hkv, num_groups,
        *strides, *stride_r, *stride_g, *stride_bounds, *buckets,
    )  # fmt: skip
    _launch(_attention_fwd_kernel, _attention_fwd_tuned, _FWD_CONFIGS, _prune_fwd, _fwd_grid(Lq, B * Hq), args, flags,
           _INTERPRET_FWD_BLOCKS, {"q_ptr": q, "Lq": Lq}, buckets)  # fmt: skip


def _launch_split(q, k, v, out, lse, sink_mass, ptrs, sink_end, stat_end, stride_r, stride_g, stride_bounds, options,
                  sizes, strides, qk_scale, cap, win, num_groups, band_lo, band, splits):  # fmt: skip
    """The decode split and merge kernels (sizes and strides from _check_qkv)."""
    B, Hq, Hkv, Lq, Lk, _, _ = sizes
    kv_group = Hq // Hkv
    split_flags, merge_flags = _decode_flags(options, kv_group * Lq)
    block_r, block_dv = split_flags["BLOCK_R"], split_flags["BLOCK_DV"]
    chunk, splits = _split_layout(band, splits)
    programs, dev = B * Hkv, q.device
    # float32 scratch of the partial states (sizes as separate arguments: ~0.3 us less than a tuple)
    state = torch.empty(programs, splits, 5, block_r, dtype=torch.float32, device=dev)
    acc = torch.empty(programs, splits, block_r, block_dv, dtype=torch.float32, device=dev)
    grp = state  # a dummy unless HAS_GROUPS
    if split_flags["HAS_GROUPS"]:
        grp = torch.empty(programs, splits, block_r, split_flags["G_PAD"], dtype=torch.float32, device=dev)

    args = (
        q, k, v, state, acc, grp, ptrs["key_real"], ptrs["horizon"], ptrs["start"], sink_end, stat_end, ptrs["head_mask"],
        ptrs["key_groups"], qk_scale, cap, win, Hkv, Lq, Lk, kv_group, band_lo, chunk, splits,
        *strides[:12], *stride_r, *stride_g, *stride_bounds,
    )  # fmt: skip
    _launch(_attention_split_kernel, _attention_split_tuned, _SPLIT_CONFIGS, _prune_split, (splits * programs,), args,
           split_flags, _INTERPRET_SPLIT_BLOCKS, {"q_ptr": q})  # fmt: skip

    _attention_merge_kernel[(B * Hq * Lq,)](
        state, acc, grp, out, lse, sink_mass, ptrs["group_mass"], ptrs["entropy"], ptrs["head_mask"],
        ptrs["sink_logit"], Hq, Hkv, Lq, kv_group, num_groups, splits, *strides[12:],
        **merge_flags, **FP_FUSION, S_PAD=next_pow2(splits), num_warps=4,
    )  # fmt: skip


settle_cache_keys(globals())  # (the same cache keys in every process, see _launch.py)
