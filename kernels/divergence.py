"""Fused draft-divergence kernel (Triton): the math of ``fastprobe.reference.draft_divergence``.

One program per token n. With x the raw logits, c = inv_T * log2(e), the kernel works in
base 2 and converts to natural units (times ln 2) only when it stores, except for the KL: a
target logit ~3e38 from the mixture's mass makes log p ~ -3e38, finite in nats but not in bits
(x 1.44), so the KL's terms use ln p = (y - M_p) inv_T - ln S_p, one more FMA per target logit:

  pass 1 (vocabulary blocks, forward):  online log-sum-exp per row,
        M_r = max_v x_rv,  S_r = sum_v 2^((x_rv - M_r) c),  lse_r = M_r inv_T + ln S_r
  pass 2 (vocabulary blocks, REVERSE, so the last blocks of pass 1 are L2 hits):
        log2 q_kv = (x_kv - M_k) c - log2 S_k,   m_v = sum_k w_k q_kv
        jsd      = sum_v sum_k w_k q_kv (log q_kv - log m_v)
        KL(m||p) = sum_v m_v (log m_v - log p_v)   (+inf if p masks a column the drafts have)
        H(m)     = -sum_v m_v log m_v,  H(p), H(q_k) likewise
  each KL(a || b) (those of the JSD, sum_k w_k KL(q_k || m), and KL(m || p)) summed as
  sum_v b_v psi(ln a_v - ln b_v) in nats (_kl_term), whose terms are >= 0 and second order in
  the difference: near-equal distributions keep their relative precision (that is KL(a || b)
  for normalised a and b: the weights sum to 1, the op rescales them)

Subtracting the row max from the *raw* logit before scaling keeps log q accurate for
large logits (x - M is exact for nearby values; scaling first would round x inv_T).
The lse is stored in float64 (M inv_T is exact there), so it keeps that precision too.

Two more modes of the two-pass kernel serve the vocabulary-sharded (tensor-parallel) form,
where the input is one shard of the vocabulary and every statistic is a sum over it:
LSE_ONLY runs pass 1 only (stats are written as 0) and writes each row's lse in two parts
[2, K + 1, N], (M, ln S) with lse = M / T + ln S; LSE_GIVEN reads the two parts of each row's
lse over the whole vocabulary instead of running pass 1, so pass 2 writes this shard's shares
of the sums, with log2 q = (x - M) c - ln S log2(e). (A float64 lse holds ln S only to
|M / T| 2^-53: two tied maxima at T = 1e-30 lost their ln 2 in it.)
Conventions: 0 log 0 = 0 (log y floored at the lowest float where x = 0 wherever y = 0,
and log m floored at -126; _kl_term reads no log where its x is 0), -inf logits give q = 0,
a row with no finite logit gets lse = -inf and zero probabilities, NaN / +inf input
gives a NaN lse. Assumes inv_temperature > 0 and weights >= 0.

Known limit (not the C++ kernel's, which sums such blocks' KL again in double): where a target
logit lies more than float max T below the row's max (T <= 1 and logits 3e38 and -3e38; or a
tiny T), ln p_v is -inf in float32 though the exact value is finite, and KL(m || p) is not
m_v (ln m_v - ln p_v) there: +inf where m_v > 0 in float32 (exact: finite below float max when
m_v < float max / |ln p_v|), and the term dropped where m_v underflows (on a GPU below 2^-126:
up to ~2^-126 |ln p_v| lost, ~7 at T = 1 with logits +-3e38; m_v ~ e^-95 there gives 3e-3). A
column the target masks is +inf as it should be. The same form in float64 after pass 2 where it
met such a column (tried 2026-12-07, compiled for sm_90, bf16 K = 4: 166 -> 192 registers a
thread at 1024 x 4 warps, one program fewer per SM, from the float64 exp and log) was not kept;
tests/test_divergence.py's test_kl_with_log_p_below_minus_float32_max marks it.
"""

# No `from __future__ import annotations`: Triton 3.0's interpreter takes a parameter as
# constexpr only when its annotation is the tl.constexpr object, not the string "tl.constexpr".

from typing import Optional

import torch
import triton
import triton.language as tl

from ..backend import autotune_enabled, interpreter_enabled
from ._launch import FP_FUSION, LOGIT_DTYPES, autotune, check_inv_temperature, launch_tuned, next_pow2, settle_cache_keys

__all__ = ["draft_divergence"]

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)
_LOWEST = tl.constexpr(-3.4028234663852886e38)  # the lowest float32


@triton.jit
def _log2_floor(x, SFU: tl.constexpr):
    """log2 max(x, 2^-126) for x >= 0 (NaN stays NaN): finite, so that x log2 x needs no
    guard (x < 2^-126 adds < 2^-119 to a sum of such terms). SFU: one lg2.approx.ftz instruction
    on the special-function unit (absolute error ~2^-22; the clamp keeps a denormal x from
    flushing to -inf). Otherwise (the Triton interpreter, which runs no PTX) tl.log2, on a GPU
    libdevice's exact log2f, about 30 instructions: the largest single cost of pass 2 there."""
    y = tl.maximum(x, 1.1754943508222875e-38, propagate_nan=tl.PropagateNan.ALL)
    if SFU:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [y], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip
    else:
        return tl.log2(y)


@triton.jit
def _xlog2y_exp(x, log2y):
    """x * log2(y) where x = 0 wherever log2 y = -inf (x = 2^log2y, or w times it): the -inf
    floored to the lowest float, so 0 log 0 = 0 without a compare and select per term."""
    return x * tl.maximum(log2y, _LOWEST)


@triton.jit
def _scaled_difference(y, shift, inv_temperature):
    """(y - shift) inv_T, finite wherever the exact value is: y - shift overflows to -inf for
    logits more than float max apart (3e38 and -3e38), where with inv_T < 1 the product need
    not; there it is (y / 2 - shift / 2) (2 inv_T), exact scalings by 2. -inf for y = -inf."""
    diff = y - shift
    halves = (y * 0.5 - shift * 0.5) * (2.0 * inv_temperature)
    return tl.where(diff > float("-inf"), diff * inv_temperature, halves)


@triton.jit
def _kl_term(a, b, d):
    """KL(a || b) at one v, a (ln a - ln b) - a + b = b psi(d), d = ln a - ln b, with
    psi(d) = e^d (d - 1) + 1 = d^2/2 + d^3/3 + d^4/8 + d^5/30 + d^6/144 + d^7/840 + ...
    (sum_v (b_v - a_v) = 0, so the terms add up to KL(a || b)): the series for |d| < 1/4 (8e-8
    relative), else a (d - 1) + b, which cancels by at most 1 / psi(-1/4) = 38x. a = 0: b;
    b = 0 (underflowed) with d finite: a (d - 1); d = +inf: +inf. As the C++ kernel's kl_term."""
    series = d * d * (0.5 + d * (1.0 / 3 + d * (0.125 + d * (1.0 / 30 + d * (1.0 / 144 + d * (1.0 / 840))))))
    near = (b > 0) & (d < 0.25) & (d > -0.25)
    return tl.where(near, b * series, tl.where(a > 0, a * (d - 1.0), 0.0) + b)


@triton.jit
def _state(R: tl.constexpr, W: tl.constexpr, value):
    """A float32 running quantity per row and chunk position, [R, W] (W = BLOCK_V // CH)."""
    return tl.full([R, W], value, tl.float32)


@triton.jit
def _chunks(tile, CH: tl.constexpr):
    """A [R, BLOCK_V] tile as [R, BLOCK_V // CH, CH]: chunks of CH contiguous columns, each held
    by one thread (CH = one 16-byte load), so a reduction over a chunk stays within a thread.
    (Tiles are loaded 2D and reshaped: loaded as 3D, Triton 3.6 spread a tile's K rows over
    threads, and its pass 2 grew from 628 to 1,144 SASS instructions a block, compiled for sm_90.)"""
    return tl.reshape(tile, [tile.shape[0], tile.shape[1] // CH, CH])


@triton.jit
def _fold_sum(acc, tile, CH: tl.constexpr):
    """acc [R, W] plus the chunk sums of the [R, BLOCK_V] tile: each thread adds up the CH
    columns it holds (no communication between threads); _total reduces the chunks once, after
    the loop."""
    return acc + tl.sum(_chunks(tile, CH), axis=2)


@triton.jit
def _total(acc):
    """[R, W] running sums -> [R, 1] row totals."""
    return tl.sum(acc, axis=1, keep_dims=True)


@triton.jit
def _lse_fold(x, mx, s, c, CH: tl.constexpr):
    """Online log-sum-exp of the rows of a [R, BLOCK_V] tile of raw logits (-inf where masked),
    states [R, W] per chunk of CH columns (the columns a thread holds), mx = the largest x seen
    at that chunk position and s = sum 2^((x - mx) c) over what was seen there:
        M' = max(mx, max_chunk x),  s' = s 2^((mx - M') c) + sum_chunk 2^((x - M') c)
    One exp2 per element plus one per chunk, and no communication between threads. While a
    chunk has seen only -inf, the shift is 0, so -inf - -inf never appears; NaN or +inf input
    makes s NaN."""
    x = _chunks(x, CH)
    new_mx = tl.maximum(mx, tl.max(x, axis=2))
    shift = tl.where(new_mx == float("-inf"), 0.0, new_mx)
    s = s * tl.exp2((mx - shift) * c) + tl.sum(tl.exp2((x - shift[:, :, None]) * c), axis=2)
    return new_mx, s


@triton.jit
def _lse_rows(mx, s, c):
    """Each row's (M, S), [R, 1], from its [R, W] chunk states: M = max mx, S = sum s 2^((mx - M) c)
    (a chunk that saw nothing finite has s = 0 and adds 0; a NaN in s stays)."""
    row_mx = tl.max(mx, axis=1, keep_dims=True)
    shift = tl.where(row_mx == float("-inf"), 0.0, row_mx)
    return row_mx, _total(tl.where(s > 0, s * tl.exp2((mx - shift) * c), s))


@triton.jit
def _safe_shift(mx, s):
    """(M, log2 S) to form log2 prob = (x - M) c - log2 S; a row with no finite logit
    gets (0, 0), so its -inf logits give log2 prob = -inf, prob = 0 (never NaN)."""
    return tl.where(mx == float("-inf"), 0.0, mx), tl.where(s > 0, tl.log2(s), 0.0)


@triton.jit
def _block_columns(start, V, BLOCK_V: tl.constexpr):
    """Vocabulary ids [start, start + BLOCK_V) as a [1, BLOCK_V] int64 tile, and which are < V.
    Every tile is 2D along the vocabulary ([K_PAD, BLOCK_V] drafts, [1, BLOCK_V] target and
    mixture), so the mixture meets the target without a layout conversion in the loops."""
    offs_v = start + tl.arange(0, BLOCK_V)[None, :]
    return offs_v.to(tl.int64), offs_v < V


@triton.jit
def _load_block(d_rows, k_ok, t_row, start, V, stride_dv, stride_tv, HAS_TARGET: tl.constexpr, BLOCK_V: tl.constexpr):
    """Columns [start, start + BLOCK_V) of the drafts (d_rows, k_ok [K_PAD, 1]: a [K_PAD, BLOCK_V]
    tile) and of the target ([1, BLOCK_V]; -inf float32 without one), each in its own input's
    dtype (the callers convert both to float32), -inf where masked; columns outside [0, V) load
    nothing."""
    col, v_ok = _block_columns(start, V, BLOCK_V)
    v_ok = v_ok & (col >= 0)  # (pass 2's prefetch reaches the block before block 0)
    x = tl.load(d_rows + col * stride_dv, mask=k_ok & v_ok, other=float("-inf"))
    if HAS_TARGET:
        y = tl.load(t_row + col * stride_tv, mask=v_ok, other=float("-inf"))
    else:
        y = tl.full([1, BLOCK_V], float("-inf"), tl.float32)
    return x, y


@triton.jit
def _lse_value(mx, s, inv_temperature):
    """lse = M inv_T + ln S in float64, where M inv_T is exact: the lse keeps the precision of
    the row's largest logit at any magnitude. -inf for a row of -inf, NaN for NaN / +inf input."""
    return tl.cast(mx, tl.float64) * tl.cast(inv_temperature, tl.float64) + tl.cast(tl.log2(s) * _LN2, tl.float64)


@triton.jit
def _shift_from_parts(mx, ln_s):
    """(M, log2 S) as in _safe_shift from a row's lse parts (float64 M and ln S): a row with
    M = -inf (no finite logit anywhere) gets (0, 0): its -inf logits give prob 0 (never NaN)."""
    masked = mx == float("-inf")
    return tl.where(masked, 0.0, mx.to(tl.float32)), tl.where(masked, 0.0, (ln_s * _LOG2E).to(tl.float32))


@triton.jit
def _divergence_kernel(
    draft_ptr,  # [K, N, V] any float dtype, any strides
    target_ptr,  # [N, V] its own float dtype (the draft's or another), any strides; a dummy when not HAS_TARGET
    w_ptr,  # [K] float32
    stats_ptr,  # [5 + K, N] float32 contiguous
    lse_ptr,  # [K + 1, N] float64 contiguous (LSE_ONLY: [2, K + 1, N], the parts M and ln S)
    lse_in_ptr,  # [2, K + 1, N] float64 contiguous: each row's lse over the whole vocabulary (LSE_GIVEN), (M, ln S)
    inv_temperature,  # runtime float
    N,
    V,
    K,
    stride_dk,
    stride_dn,
    stride_dv,
    stride_tn,
    stride_tv,
    K_PAD: tl.constexpr,  # next power of two >= K
    HAS_TARGET: tl.constexpr,
    LSE_GIVEN: tl.constexpr,  # read the lse instead of pass 1: stats are this shard's shares
    LSE_ONLY: tl.constexpr,  # pass 1 only: stats are 0
    BLOCK_V: tl.constexpr,
    CH: tl.constexpr,  # columns a thread holds in a row of a block: one 16-byte load of the drafts' dtype
    PREFETCH: tl.constexpr,  # load each block one iteration ahead (registers for a second block)
    SFU_LOG2: tl.constexpr,  # log2 m on the special-function unit (False: the interpreter)
):
    n = tl.program_id(0).to(tl.int64)
    N64 = n * 0 + N  # N as int64, so that row * N never overflows int32
    c = inv_temperature * _LOG2E  # x inv_T = (x c) / log2(e): base-2 exponent scale

    W: tl.constexpr = BLOCK_V // CH  # chunks of CH columns in a block
    k = tl.arange(0, K_PAD)[:, None]  # [K_PAD, 1]: draft rows
    k_ok = k < K
    d_rows = draft_ptr + (n * stride_dn + k.to(tl.int64) * stride_dk)  # row starts
    t_row = target_ptr + n * stride_tn
    w = tl.load(w_ptr + k, mask=k_ok, other=0.0)  # padded rows weigh 0
    nblk = tl.cdiv(V, BLOCK_V)
    lse_q_at = k.to(tl.int64) * N64 + n  # token n of each draft row of [K + 1, N]
    lse_p_at = K * N64 + n + tl.zeros([1, 1], tl.int64)  # and of the target row, [1, 1]

    if LSE_GIVEN:
        # ---- each row's lse over the whole vocabulary, of which this input is a shard ----
        parts_at = (K + 1) * N64  # the ln S part
        mx_q, ln_s_q = tl.load(lse_in_ptr + lse_q_at, mask=k_ok, other=0.0), tl.load(lse_in_ptr + parts_at + lse_q_at, mask=k_ok, other=0.0)
        mx_p, ln_s_p = tl.load(lse_in_ptr + lse_p_at), tl.load(lse_in_ptr + parts_at + lse_p_at)
        inv_t = tl.cast(inv_temperature, tl.float64)
        lse_q, lse_p = mx_q * inv_t + ln_s_q, mx_p * inv_t + ln_s_p
        shift_q, log2s_q = _shift_from_parts(mx_q, ln_s_q)
        shift_p, log2s_p = _shift_from_parts(mx_p, ln_s_p)
    else:
        # ---- pass 1: online log-sum-exp of every row ([K_PAD, 1] drafts, [1, 1] target after) ----
        mx_q = _state(K_PAD, W, float("-inf"))
        s_q = _state(K_PAD, W, 0.0)
        mx_p = _state(1, W, float("-inf"))
        s_p = _state(1, W, 0.0)
        # (PREFETCH: each pass loads block b + 1, in its order, before it works on block b, and
        # carries it into the next iteration: the loads travel while a block is worked on)
        if PREFETCH:
            x_next, y_next = _load_block(d_rows, k_ok, t_row, 0, V, stride_dv, stride_tv, HAS_TARGET, BLOCK_V)
        for b in range(0, nblk):
            if PREFETCH:
                x, y = x_next, y_next
                x_next, y_next = _load_block(d_rows, k_ok, t_row, (b + 1) * BLOCK_V, V, stride_dv, stride_tv, HAS_TARGET, BLOCK_V)
            else:
                x, y = _load_block(d_rows, k_ok, t_row, b * BLOCK_V, V, stride_dv, stride_tv, HAS_TARGET, BLOCK_V)
            mx_q, s_q = _lse_fold(x.to(tl.float32), mx_q, s_q, c, CH)
            if HAS_TARGET:
                mx_p, s_p = _lse_fold(y.to(tl.float32), mx_p, s_p, c, CH)
        mx_q, s_q = _lse_rows(mx_q, s_q, c)
        mx_p, s_p = _lse_rows(mx_p, s_p, c)
        lse_q = _lse_value(mx_q, s_q, inv_temperature)
        lse_p = _lse_value(mx_p, s_p, inv_temperature)
        shift_q, log2s_q = _safe_shift(mx_q, s_q)
        shift_p, log2s_p = _safe_shift(mx_p, s_p)

    ln_s_p = log2s_p * _LN2  # log p = (y - shift_p) inv_T - ln_s_p, for the KL in nats
    if LSE_ONLY:  # the lse's two parts (M, ln S) of every row, after each other
        parts_at = (K + 1) * N64
        tl.store(lse_ptr + lse_q_at, mx_q.to(tl.float64), mask=k_ok)
        tl.store(lse_ptr + parts_at + lse_q_at, (tl.log2(s_q) * _LN2).to(tl.float64), mask=k_ok)
        tl.store(lse_ptr + lse_p_at, tl.where(HAS_TARGET, mx_p.to(tl.float64), 0.0))
        tl.store(lse_ptr + parts_at + lse_p_at, tl.where(HAS_TARGET, (tl.log2(s_p) * _LN2).to(tl.float64), 0.0))
    else:
        tl.store(lse_ptr + lse_q_at, lse_q, mask=k_ok)
        if HAS_TARGET:
            tl.store(lse_ptr + lse_p_at, lse_p)
        else:
            tl.store(lse_ptr + lse_p_at, tl.zeros([1, 1], tl.float64))

    # ---- pass 2: the sums, vocabulary blocks in reverse (L2 still holds the last ones) ----
    hq_acc = _state(K_PAD, W, 0.0)  # q log2 q, per draft
    jsd_acc = _state(1, W, 0.0)  # sum_k w m psi(ln q - ln m), in nats
    hm_acc = _state(1, W, 0.0)  # m log2 m
    kl_acc = _state(1, W, 0.0)  # p psi(ln m - ln p), in nats
    hp_acc = _state(1, W, 0.0)  # p log2 p
    if not LSE_ONLY:  # (LSE_ONLY: every sum stays 0)
        if PREFETCH:
            x_next, y_next = _load_block(d_rows, k_ok, t_row, (nblk - 1) * BLOCK_V, V, stride_dv, stride_tv, HAS_TARGET, BLOCK_V)
        for i in range(0, nblk):
            if PREFETCH:  # (the block before block 0 starts at -BLOCK_V: nothing loads)
                x, y = x_next, y_next
                x_next, y_next = _load_block(d_rows, k_ok, t_row, (nblk - 2 - i) * BLOCK_V, V, stride_dv, stride_tv, HAS_TARGET, BLOCK_V)
            else:
                x, y = _load_block(d_rows, k_ok, t_row, (nblk - 1 - i) * BLOCK_V, V, stride_dv, stride_tv, HAS_TARGET, BLOCK_V)
            x, y = x.to(tl.float32), y.to(tl.float32)
            if HAS_TARGET:  # columns the mixture has: a finite logit in a draft of weight > 0
                in_m = tl.max(tl.where(w > 0, x, float("-inf")), axis=0, keep_dims=True) > float("-inf")
            # log2 q_kv, floored at the lowest float where masked (q = 0 there): q log2 q and
            # the JSD's ln q - ln m need no guard (one floor serves both terms; NaN stays NaN)
            log2q = tl.maximum((x - shift_q) * c - log2s_q, _LOWEST, propagate_nan=tl.PropagateNan.ALL)
            q = tl.exp2(log2q)
            wq = w * q
            m = tl.sum(wq, axis=0, keep_dims=True)  # m_v = sum_k w_k q_kv, [1, BLOCK_V]
            log2m = _log2_floor(m, SFU_LOG2)  # finite: m log2 m
            hq_acc = _fold_sum(hq_acc, q * log2q, CH)
            jsd_terms = w * _kl_term(q, m, (log2q - log2m) * _LN2)  # (m = 0: 0, or w = 0)
            jsd_acc = _fold_sum(jsd_acc, tl.sum(jsd_terms, axis=0, keep_dims=True), CH)
            hm_acc = _fold_sum(hm_acc, m * log2m, CH)
            if HAS_TARGET:
                log2p = (y - shift_p) * c - log2s_p  # log2 p_v
                p = tl.exp2(log2p)
                # KL in nats: log p_v (finite for a finite logit) where log2 p_v overflows to -inf
                # below -2.4e38, and a KL near float32's top would in bits (x log2(e))
                log_p = _scaled_difference(y, shift_p, inv_temperature) - ln_s_p
                # a column the mixture has and the target masks makes KL(m || p) +inf, also where
                # m_v underflows to 0
                outside = in_m & (y == float("-inf"))
                kl_terms = tl.where(m > 0, _kl_term(m, p, log2m * _LN2 - log_p), p)  # (m = 0: p)
                kl_acc = _fold_sum(kl_acc, tl.where(outside, float("inf"), kl_terms), CH)
                hp_acc = _fold_sum(hp_acc, _xlog2y_exp(p, log2p), CH)

    # ---- store, converting base-2 logs to natural ones (times ln 2; the JSD and KL are in nats) ----
    # JSD >= 0 term by term; rounding can leave -1e-8 where it is 0 (K = 1, equal drafts): clamped
    # as the C++ kernel does (NaN passes through)
    jsd_sum = _total(jsd_acc)  # [1, 1]
    jsd = tl.where(jsd_sum < 0, 0.0, jsd_sum)
    token = n + tl.zeros([1, 1], tl.int64)  # [1, 1] like the sums
    tl.store(stats_ptr + 0 * N64 + token, jsd)
    tl.store(stats_ptr + 3 * N64 + token, -_total(hm_acc) * _LN2)  # H(m)
    if HAS_TARGET:
        kl = _total(kl_acc)
        if not LSE_GIVEN:  # KL >= 0 over the whole vocabulary (a shard's share: the caller's), clamped alike
            kl = tl.where(kl < 0, 0.0, kl)
        tl.store(stats_ptr + 1 * N64 + token, kl)  # KL(m || p)
        tl.store(stats_ptr + 2 * N64 + token, jsd + kl)  # epistemic = sum_k w_k KL(q_k || p)
        tl.store(stats_ptr + 4 * N64 + token, -_total(hp_acc) * _LN2)  # H(p)
    else:
        zero = tl.zeros([1, 1], tl.float32)
        tl.store(stats_ptr + 1 * N64 + token, zero)
        tl.store(stats_ptr + 2 * N64 + token, zero)
        tl.store(stats_ptr + 4 * N64 + token, zero)
    tl.store(stats_ptr + (5 + k.to(tl.int64)) * N64 + n, -_total(hq_acc) * _LN2, mask=k_ok)  # H(q_k)


# On a GPU the block size and warp count are tuned per (V, K_PAD, HAS_TARGET, mode) (and,
# by Triton, per pair of the draft's and the target's dtypes). The kernel overwrites every
# output, so re-running it while tuning is safe. num_stages=1: no software pipelining (the
# plain loads gain little from it, and its shared-memory buffers would cost occupancy); other
# resident programs hide the latency.
# Each tile is tried with and without loading every block one iteration ahead (PREFETCH; on
# the H200 at K=4, V=151936, 2026-11-30, it helped no config). The running sums are kept per
# chunk of CH columns, within each thread, and reduced across threads once after each loop.
# (Until 2026-12-04 they were kept either per row, a reduction across the warps every block,
# or per column with an online max per element. Compiled for sm_90 with Triton 3.6 at K=4,
# bf16, 2048 x 8 warps, the two passes took 538 + 786 (per row) or 626 + 628 (per column) SASS
# instructions a block; now 350 + 596: bench/NOTES.md.)
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_V": bv, "PREFETCH": prefetch}, num_warps=nw, num_stages=1)
    for prefetch in (False, True)
    for bv in (1024, 2048, 4096)
    for nw in (4, 8, 16)
]
# Pass 2 keeps about two float32 values per tile element live (log2 q and q); past ~32
# elements per thread ptxas spills (seen compiling for sm_90), so such configs are not tried.
# A prefetched block costs about as much again (compiled for sm_90: 1024 x 4 warps with K = 4,
# 118 -> 229 registers per row), so prefetching configs count their elements twice, and with
# 16 warps (at most 128 registers a thread) four times (2048 x 16 warps per lane spilled 164 B).
_MAX_ELEMENTS_PER_THREAD = 32
# At most 4 vocabulary columns per thread (1024 x 8 warps, 1024 x 16, 2048 x 16) ran 3-10x
# slower than 8 per thread on the H200 (bench/sweep_divergence.py, 2026-11-30: 21.9-82.3 ms
# against 7.0-9.1 ms), in every variant: such configs are not tried.
_MIN_COLUMNS_PER_THREAD = 8
# The tile of untuned launches (FASTPROBE_AUTOTUNE=0) where it survives pruning: the fastest
# in that sweep (2048 x 8 warps per row, 7.01 ms; 1024 x 4, the first config, 7.61).
_UNTUNED_TILE = (2048, 8)
# The variant that untuned launches use (the interpreter, FASTPROBE_AUTOTUNE=0): the first
# surviving config with this PREFETCH.
UNTUNED_PREFETCH = False


def _prune_configs(configs, named_args, **kwargs):
    k_pad = kwargs.get("K_PAD", named_args.get("K_PAD", 1))

    def per_thread(cfg):
        weight = (4 if cfg.num_warps > 8 else 2) if cfg.kwargs["PREFETCH"] else 1
        return weight * k_pad * cfg.kwargs["BLOCK_V"] // (32 * cfg.num_warps)

    wide = [cfg for cfg in configs if cfg.kwargs["BLOCK_V"] >= _MIN_COLUMNS_PER_THREAD * 32 * cfg.num_warps]
    kept = [cfg for cfg in wide if per_thread(cfg) <= _MAX_ELEMENTS_PER_THREAD]
    if not kept:  # very many drafts (K > 4): the smallest tiles per thread, 8 columns or more (not timed)
        least = min(per_thread(cfg) for cfg in wide)
        kept = [cfg for cfg in wide if per_thread(cfg) == least]
    return kept


def _untuned(kept):
    """The config of untuned launches: with UNTUNED_PREFETCH, the tile _UNTUNED_TILE where kept,
    else the first."""
    variant = [cfg for cfg in kept if cfg.kwargs["PREFETCH"] == UNTUNED_PREFETCH]
    tile = [cfg for cfg in variant if (cfg.kwargs["BLOCK_V"], cfg.num_warps) == _UNTUNED_TILE]
    return (tile or variant or kept)[0]


_divergence_kernel_tuned = autotune(
    configs=_AUTOTUNE_CONFIGS,
    key=["V", "K_PAD", "HAS_TARGET", "LSE_GIVEN", "LSE_ONLY"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_divergence_kernel)

# Through the Triton interpreter (CPU tests): one small block, so that a tiny V still
# spans several blocks and a ragged tail.
_INTERPRET_BLOCK_V = 128


def draft_divergence(
    draft: torch.Tensor,
    target: Optional[torch.Tensor],
    weights: torch.Tensor,
    inv_temperature: float,
    stats: torch.Tensor,
    lse: torch.Tensor,
    lse_in: Optional[torch.Tensor] = None,
    lse_only: bool = False,
    config: Optional[triton.Config] = None,
) -> None:
    """Launch the fused kernel; writes every element of ``stats`` and ``lse``.

    draft   [K, N, V] float32 / bfloat16 / float16, any strides
    target  [N, V] float32 / bfloat16 / float16 (the draft's dtype or another: Triton compiles
            the kernel per pair of pointer types, each loaded as it is), any strides, or None
    weights [K] float32 contiguous, same device
    stats   [5 + K, N] float32 contiguous (out): jsd, KL(m||p), epistemic, H(m), H(p), H(q_k)
    lse     [K + 1, N] float64 contiguous (out): logsumexp of each scaled row, the target's last
            (lse_only: [2, K + 1, N], its parts M and ln S, lse = M / T + ln S)
    lse_in  [2, K + 1, N] float64 contiguous, or None: each row's lse over the whole vocabulary,
            of which draft and target are one shard, in those two parts; stats are then this
            shard's shares of every sum, and lse is formed from lse_in (no pass 1)
    lse_only: pass 1 only; stats are written as 0
    config: one of _AUTOTUNE_CONFIGS to launch instead of tuning (bench/sweep_divergence.py)
    Without a target, stats rows 1, 2, 4 and lse row K are written as 0.
    """
    if draft.dim() != 3:
        raise ValueError(f"draft must be [K, N, V], got shape {tuple(draft.shape)}")
    K, N, V = draft.shape
    if target is not None and (target.shape != (N, V) or target.dtype not in LOGIT_DTYPES):
        raise ValueError("target must be a float32, bfloat16 or float16 [N, V] tensor")
    if weights.shape != (K,) or weights.dtype != torch.float32 or not weights.is_contiguous():
        raise ValueError("weights must be a contiguous float32 [K] tensor")
    for name, tensor, shape, dtype in (
        ("stats", stats, (5 + K, N), torch.float32),
        ("lse", lse, (2, K + 1, N) if lse_only else (K + 1, N), torch.float64),
        ("lse_in", lse_in, (2, K + 1, N), torch.float64),
    ):
        if tensor is not None and (tensor.shape != shape or tensor.dtype != dtype or not tensor.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous {str(dtype).removeprefix('torch.')} {list(shape)} tensor")
    if lse_only and lse_in is not None:
        raise ValueError("lse_only computes the lse, so lse_in must be None")
    inv_temperature = check_inv_temperature(inv_temperature)
    if N == 0:
        return

    has_target = target is not None
    t = target if has_target else draft  # never read without a target
    stride_tn, stride_tv = target.stride() if has_target else (0, 0)
    tensors = (draft, t, weights, stats, lse)
    scalars = (inv_temperature, N, V, K, *draft.stride(), stride_tn, stride_tv)
    K_PAD = next_pow2(K)
    lse_given = lse_in is not None
    # lse_in is a dummy (never read) unless given

    args = (*tensors, lse_in if lse_given else lse, *scalars)
    # CH: one 16-byte load of the drafts' dtype per thread and row (8 columns of a 16-bit dtype, 4 of float32)
    flags = dict(K_PAD=K_PAD, HAS_TARGET=has_target, LSE_GIVEN=lse_given, LSE_ONLY=lse_only,
                 SFU_LOG2=not interpreter_enabled(), CH=16 // draft.element_size())
    grid = (N,)
    if interpreter_enabled():
        _divergence_kernel[grid](
            *args, **flags, **FP_FUSION, BLOCK_V=_INTERPRET_BLOCK_V, PREFETCH=UNTUNED_PREFETCH, num_warps=4
        )
    elif config is None and autotune_enabled():
        launch_tuned(_divergence_kernel_tuned, _divergence_kernel, grid, args, flags,
                     (draft.dtype, t.dtype, V, *flags.values()))
    else:
        kept = _prune_configs(_AUTOTUNE_CONFIGS, {}, K_PAD=K_PAD)
        config = config or _untuned(kept)
        _divergence_kernel[grid](
            *args, **flags, **FP_FUSION, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )


settle_cache_keys(globals())  # (the same cache keys in every process, see _launch.py)
