"""dual_path_attention (Triton): attention with and without the dropped (image) keys in one
pass over K and V, merged into contrastive guidance; the math of
``fastprobe.reference.dual_path_attention`` (two separate attention calls).

Query i of (b, h) sits at position p = Lk - Lq + i and sees key j iff real[b, j] and
f_p <= j <= r_p and in_window(p, j): attention.py's visibility without sink keys (first key
f_p = clamp(start[b, p], 0, p) with HAS_START, else 0; reach
r_p = clamp(horizon[b, p], p, Lk - 1) with HAS_HORIZON, else p (causal) or Lk - 1;
in_window = j > p - w (causal) or |p - j| < w (bidirectional); no window: w wider than any
|p - j|). Every visible key feeds exactly one of two online-softmax states per query
row (base-2 scores t = scale q . k log2(e), as in attention.py):
  state 1, kept keys (drop[b, j] = 0):    m1 = max t,  l1 = sum 2^(t - m1),  a1 = sum 2^(t - m1) v
  state 2, dropped keys (drop[b, j] = 1): m2, l2, a2 likewise
each with its own max, so that neither underflows when the other kind dominates. At the end,
with m = max(m1, m2) and w_i = 2^(m_i - m):
  o_uncond = a1 / l1                                 (language-only path; 0 when l1 = 0)
  o_cond   = (w1 a1 + w2 a2) / (w1 l1 + w2 l2)       (every visible key; 0 when nothing is)
  dO = o_cond - o_uncond;  with orthogonalize: u = o_uncond / (||o_uncond|| + eps) over D,
  dO -= <dO, u> u;  out = o_cond + gamma dO on rows with rows[b, i] = 1 and l1 > 0 (and
  gamma != 0, so that gamma = 0 gives o_cond bit for bit), out = o_cond elsewhere.

Cost close to one attention call: S = Q K^T once per key block and one P V product per block,
and loops as attention.py's, of one state each.
  * prefill: the program first scans the drop flags of its band for the run [d_lo, d_hi)
    holding its dropped keys (one run in practice: an image). State 2 takes the blocks meeting
    the run (unmasked where the run covers the block and every row sees it), and parks its
    output o2 = a2 / l2 in out (whose rows the program writes last; no scratch), in out's
    dtype: for 16-bit out one more rounding of o2, weighted by its share w2 l2 / l of o_cond
    and by 1 + gamma in out (bench/NOTES.md, "Dual path without scratch"); state 1 then takes every
    other block (unmasked in the band's interior) plus, masked per key, the blocks the run
    covers only in part; with several runs, every block between d_lo and d_hi is masked. Only
    query blocks that need the two paths apart keep them apart: with a guided row and
    gamma != 0, or when the paths are returned; the others (rows="last": all but the last;
    every block with gamma = 0) take every key in one state, which is o_cond. Work beyond one
    attention call: the scan (one flag per key), two partly covered blocks per program, the
    parked rows' round trip through out, the guidance epilogue.
  * decode splits: each block is classified by a one-number reduction over its keys in range
    as holding only kept keys (state 1 only), only dropped keys (state 2 only) or both (two
    masked updates, two P V products), both states held at once (a few query rows).

Two paths, the structure of attention.py (whose helpers, block ranges, configs, pruning and
launch plumbing this module shares):
  * prefill: one program per (query block, b, h), the key blocks of its band (attention.py),
    blocks every query of the block sees in full (no padding mask) without elementwise masks;
  * decode (few queries, long keys; attention.py's _decode_plan decides, split_keys forces):
    split-K over the band, one program per (key split, b, kv head) for all Hq / Hkv query
    heads of the kv head (K / V read once), writing both unnormalised states of each split to
    float32 scratch; a merge program per query row merges each state over the splits by its
    own max, then applies the guidance above. Guided generation (Lq = 1 every step) takes this
    path once the band (the cache, or the window) holds >= 512 keys (a prompt with an image
    already does); shorter ones run the prefill kernel with one 64-row query tile per (b, h).

Known limit (attention.py's): each state's a = sum 2^(t - m) v overflows float32 for values near
float max (|v| ~1e38 and up) where the paths are finite, and so does dO = o_cond - o_uncond for
paths near float max of opposite signs where out is finite (tests/test_dual_attention.py marks
both xfail for Triton; the C++ kernel handles them).
"""

# No `from __future__ import annotations`: Triton 3.0's interpreter takes a parameter as
# constexpr only when its annotation is the tl.constexpr object, not the string "tl.constexpr".

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..backend import interpreter_enabled
from ._launch import FP_FUSION, autotune, next_pow2, settle_cache_keys
from .attention import (
    _FWD_CONFIGS,
    _FWD_KEY_SHAPES,
    _INTERPRET_FWD_BLOCKS,
    _INTERPRET_SPLIT_BLOCKS,
    _NEG_INF,
    _SPLIT_CONFIGS,
    _block_scores,
    _causal_reach,
    _check_layout,
    _check_qkv,
    _decode_plan,
    _dot_flags,
    _fwd_band,
    _fwd_grid,
    _fwd_program,
    _key_bases,
    _launch,
    _load_rows,
    _lq_lk_buckets,
    _merge_parts,
    _merge_row,
    _prune_fwd,
    _prune_split,
    _real_keys,
    _scaled_q,
    _segment_first,
    _sink_state,
    _softmax_step,
    _split_keys,
    _split_layout,
    _split_program,
    _split_rows,
    _store_partial,
    _store_rows,
    _tail_rows,
)

__all__ = ["dual_path_attention"]

_SCAN_BLOCK = tl.constexpr(1024)  # drop flags read per step of the prefill's scan of its band


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _update(t, m_i, l_i, acc, v, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One state's online-softmax update (m, l, acc) by the scores t (-inf: not its keys). l is
    one float (l_lo, attention.py's _softmax_step, is dropped): it only normalises the outputs,
    which a block sum lost against a dominant key moves by that sum's share of l (1e-6 relative
    at 4096 keys 22 below a sink key)."""
    m_i, l_i, _, acc, m_use, alpha, p, p_in = _softmax_step(t, m_i, l_i, 0.0, acc, v, MASKED, DOT_PRECISION, UPCAST)
    return m_i, l_i, acc


@triton.jit
def _visible_scores(t, offs_n, n_ok, rows, real_base, stride_rn, pos, reach, first, window,
                    CAUSAL: tl.constexpr, HAS_HORIZON: tl.constexpr, HAS_START: tl.constexpr,
                    HAS_KEY_REAL: tl.constexpr):  # fmt: skip
    """A masked block's scores t [R, N], -inf where the row does not see the key (see the module
    docstring), and which of its keys are real and in range [N]."""
    key_ok = _real_keys(real_base, rows, stride_rn, n_ok, HAS_KEY_REAL)
    j = offs_n[None, :]
    p_row = pos[:, None]
    if CAUSAL:  # j <= r and j > p - w
        visible = (j <= reach[:, None]) & (j > p_row - window)
    else:  # |p - j| < w (and j <= r)
        visible = tl.abs(p_row - j) < window
        if HAS_HORIZON:
            visible = visible & (j <= reach[:, None])
    if HAS_START:  # f <= j
        visible = visible & (j >= first[:, None])
    return tl.where(visible & key_ok[None, :], t, _NEG_INF), key_ok


@triton.jit
def _kind_block(
    q, q_t, m_i, l_i, acc,  # queries (head, tail: see _block_scores); the state: [R] m and l, [R, BLOCK_DV] acc
    k_base, v_base, real_base, drop_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_dn,
    start, end,  # the block's first key; keys >= end are not in this program's range (masked blocks)
    pos, reach, first,  # [R] the rows' positions, last keys (HAS_HORIZON or CAUSAL), first keys (HAS_START)
    offs_d, d_ok, offs_dv, dv_ok,
    window,  # > every |p - j| when there is no window
    qk_scale,  # scale log2(e)
    kind,  # the keys of this state: 1 dropped, 0 kept, -1 every key (masked blocks only)
    MASKED: tl.constexpr,  # False: every key of the block is real, visible to every row and of the kind
    CAUSAL: tl.constexpr, HAS_HORIZON: tl.constexpr, HAS_START: tl.constexpr, HAS_KEY_REAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One key block [start, start + BLOCK_N) of one state (prefill): its visible keys of the kind."""
    offs_n, n_ok, rows, t, v = _block_scores(
        q, q_t, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start, end, offs_d, d_ok, offs_dv, dv_ok,
        qk_scale, 0.0, MASKED, False, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    if MASKED:
        t, _ = _visible_scores(
            t, offs_n, n_ok, rows, real_base, stride_rn, pos, reach, first, window, CAUSAL, HAS_HORIZON, HAS_START,
            HAS_KEY_REAL,
        )  # fmt: skip
        dropped = (tl.load(drop_base + rows * stride_dn, mask=n_ok, other=0) != 0).to(tl.int32)
        t = tl.where(((dropped == kind) | (kind < 0))[None, :], t, _NEG_INF)
    return _update(t, m_i, l_i, acc, v, MASKED, DOT_PRECISION, UPCAST)


@triton.jit
def _dual_block(
    q,  # [R, BLOCK_D] queries (input dtype)
    q_t,  # [R, BLOCK_DT] their head dim's tail (see attention.py's _block_scores)
    m1,  # [R] state 1 (kept keys): running max of the base-2 scores
    l1,  # [R] sum 2^(t - m1)
    acc1,  # [R, BLOCK_DV] sum 2^(t - m1) v
    m2,  # state 2 (dropped keys): likewise
    l2,
    acc2,
    k_base,
    v_base,
    real_base,
    drop_base,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    stride_rn,
    stride_dn,
    start,  # first key of the block
    end,  # keys >= end are not in this program's range
    pos,  # [R] query positions
    reach,  # [R] the last key each row sees (its position, or its horizon; HAS_HORIZON or CAUSAL)
    first,  # [R] the first key each row sees (_segment_first; HAS_START only)
    offs_d,
    d_ok,
    offs_dv,  # the value head dim's columns and which are real
    dv_ok,
    window,  # > every |p - j| when there is no window
    qk_scale,  # scale log2(e)
    CAUSAL: tl.constexpr,
    HAS_HORIZON: tl.constexpr,
    HAS_START: tl.constexpr,
    HAS_KEY_REAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key block [start, start + BLOCK_N) of both states (decode splits): scores once, then
    the state(s) its keys feed."""
    offs_n, n_ok, rows, t, v = _block_scores(
        q, q_t, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start, end, offs_d, d_ok, offs_dv, dv_ok,
        qk_scale, 0.0, True, False, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    t, key_ok = _visible_scores(
        t, offs_n, n_ok, rows, real_base, stride_rn, pos, reach, first, window, CAUSAL, HAS_HORIZON, HAS_START,
        HAS_KEY_REAL,
    )  # fmt: skip
    drop = tl.load(drop_base + rows * stride_dn, mask=n_ok, other=0) != 0
    # the keys in range (a superset of those some row sees) counted by kind in one reduction:
    # kept in the low 16 bits, dropped in the high ones
    kinds = tl.sum(tl.where(key_ok, tl.where(drop, 1 << 16, 1), 0), axis=0)
    if (kinds >> 16) == 0:  # kept keys only (or none): state 1
        m1, l1, acc1 = _update(t, m1, l1, acc1, v, True, DOT_PRECISION, UPCAST)
    elif (kinds & 0xFFFF) == 0:  # dropped keys only: state 2
        m2, l2, acc2 = _update(t, m2, l2, acc2, v, True, DOT_PRECISION, UPCAST)
    else:  # both kinds (the edges of the image run): each key feeds its own state
        m1, l1, acc1 = _update(tl.where(drop[None, :], _NEG_INF, t), m1, l1, acc1, v, True, DOT_PRECISION, UPCAST)
        m2, l2, acc2 = _update(tl.where(drop[None, :], t, _NEG_INF), m2, l2, acc2, v, True, DOT_PRECISION, UPCAST)
    return m1, l1, acc1, m2, l2, acc2


@triton.jit
def _empty_states(ROWS: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Both states of ROWS query rows before any key: (m, l, acc) = (-inf, 0, 0) twice."""
    m = tl.full([ROWS], _NEG_INF, tl.float32)
    l = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], tl.float32)
    return m, l, acc, m, l, acc


@triton.jit
def _drop_run(drop_base, stride_dn, lo, hi, SCAN: tl.constexpr):
    """The dropped keys of [lo, hi): (first, last + 1, how many); (hi, hi, 0) when none."""
    d_lo = hi + 0
    d_hi = lo + 0
    count = lo * 0
    for s in range(lo, hi, SCAN):
        offs = s + tl.arange(0, SCAN)
        dropped = tl.load(drop_base + offs.to(tl.int64) * stride_dn, mask=offs < hi, other=0) != 0
        d_lo = tl.minimum(d_lo, tl.min(tl.where(dropped, offs, hi), axis=0))
        d_hi = tl.maximum(d_hi, tl.max(tl.where(dropped, offs + 1, lo), axis=0))
        count += tl.sum(dropped.to(tl.int32), axis=0)
    return tl.where(count > 0, d_lo, hi), tl.where(count > 0, d_hi, hi), count


@triton.jit
def _run_blocks(lo, hi, BLOCK_N: tl.constexpr):
    """How many key blocks start in [lo, hi), lo a block start (none when hi <= lo)."""
    return tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)


@triton.jit
def _kind_pass(
    q, q_t,  # queries: the head dim's head and tail columns (see attention.py's _block_scores)
    kind,  # the keys of the state: 1 dropped, 0 kept, -1 every key
    plain0, plain0_end, plain1, plain1_end,  # runs of blocks without masks
    mixed0, mixed0_end, mixed1, mixed1_end, mixed2, mixed2_end, mixed3, mixed3_end,  # runs of masked blocks
    k_base, v_base, real_base, drop_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_dn,
    end, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, qk_scale,
    CAUSAL: tl.constexpr, HAS_HORIZON: tl.constexpr, HAS_START: tl.constexpr, HAS_KEY_REAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr, EVEN_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One online-softmax state (m, l, acc) of the prefill over the key blocks of the runs
    [start, end) given (each a block start, and an end that is one or the band's end): two
    loops of one update each, the first without masks (so it pipelines as attention.py's
    interior does), the second masked (visibility, padding, the kind)."""
    m, l, acc, _, _, _ = _empty_states(BLOCK_M, BLOCK_DV)
    n0 = _run_blocks(plain0, plain0_end, BLOCK_N)
    for i in range(0, n0 + _run_blocks(plain1, plain1_end, BLOCK_N)):
        start = tl.where(i < n0, plain0 + i * BLOCK_N, plain1 + (i - n0) * BLOCK_N)
        m, l, acc = _kind_block(
            q, q_t, m, l, acc, k_base, v_base, real_base, drop_base, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_rn, stride_dn, start, end, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, qk_scale, kind,
            False, CAUSAL, HAS_HORIZON, HAS_START, HAS_KEY_REAL, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    c0 = _run_blocks(mixed0, mixed0_end, BLOCK_N)
    c1 = c0 + _run_blocks(mixed1, mixed1_end, BLOCK_N)
    c2 = c1 + _run_blocks(mixed2, mixed2_end, BLOCK_N)
    for i in range(0, c2 + _run_blocks(mixed3, mixed3_end, BLOCK_N)):
        start = tl.where(i < c1, tl.where(i < c0, mixed0 + i * BLOCK_N, mixed1 + (i - c0) * BLOCK_N),
                         tl.where(i < c2, mixed2 + (i - c1) * BLOCK_N, mixed3 + (i - c2) * BLOCK_N))  # fmt: skip
        m, l, acc = _kind_block(
            q, q_t, m, l, acc, k_base, v_base, real_base, drop_base, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_rn, stride_dn, start, end, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, qk_scale, kind,
            True, CAUSAL, HAS_HORIZON, HAS_START, HAS_KEY_REAL, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    return m, l, acc


@triton.jit
def _guide(m1, l1, acc1, m2, l2, acc2, selected, gamma, eps, ORTHOGONALIZE: tl.constexpr, AXIS: tl.constexpr):
    """(out, o_cond, o_uncond) from the two final states (see the module docstring). acc1, acc2
    hold rows along 1 - AXIS and the head dim along AXIS; m, l and selected broadcast against
    them (prefill: [R, 1] against [R, BLOCK_DV], AXIS 1; merge: scalars against [BLOCK_DV],
    AXIS 0). A state that saw nothing has m = -inf, l = acc = 0.
    Each path is a1 acc1 + a2 acc2 with per-row coefficients, so no more than the two
    accumulators are ever live: with w_i = 2^(m_i - m), l = w1 l1 + w2 l2,
      o_cond = (w1 acc1 + w2 acc2) / l,  o_uncond = acc1 / l1,
      dO = o_cond - o_uncond = (w2 / l) (acc2 - (l2 / l1) acc1)    (no difference of two tiles),
    and orthogonalised, with u = o_uncond / (||o_uncond|| + eps) = acc1 / den, den = ||acc1|| + eps l1:
      dO -= <dO, u> u,  <dO, u> = (w2 / l) (<acc1, acc2> - (l2 / l1) ||acc1||^2) / den.
    The squares are taken of x = acc1 / s, s = max_d |acc1_d| (at least the smallest normal float):
    acc1 ~ 1e19 overflowed them and ~1e-23 underflowed them (wrong with a tiny eps). With
    ||acc1|| = s ||x||, den = s den_x, den_x = ||x|| + eps l1 / s, each factor stays in range:
      <dO, u> u = (w2 / l) (<x, acc2> / den_x (1 / s) / den_x - (l2 / l1) ||x||^2 / den_x^2) acc1."""
    m = tl.maximum(m1, m2)
    shift = tl.where(m == _NEG_INF, 0.0, m)
    w1 = tl.exp2(m1 - shift)
    w2 = tl.exp2(m2 - shift)
    l = w1 * l1 + w2 * l2
    inv_l = tl.where(l > 0, 1.0 / l, 0.0)
    cond1 = w1 * inv_l  # o_cond = cond1 acc1 + cond2 acc2
    cond2 = w2 * inv_l
    has_kept = l1 > 0
    inv_l1 = tl.where(has_kept, 1.0 / l1, 0.0)
    ratio = l2 * inv_l1
    delta1 = -cond2 * ratio  # dO = delta1 acc1 + cond2 acc2
    if ORTHOGONALIZE:
        inv_s = 1.0 / tl.maximum(tl.max(tl.abs(acc1), axis=AXIS, keep_dims=True), 1.1754943508222875e-38)  # 1 / s
        x = acc1 * inv_s  # |x| <= 1, so ||x||^2 <= the head dim
        norm_x2 = tl.sum(x * x, axis=AXIS, keep_dims=True)
        # den / s, > 0 on guided rows (l1 > 0); inf where eps l1 >> ||acc1||: u = 0, no correction
        den_x = tl.sqrt(norm_x2) + eps * l1 * inv_s
        dot_x = tl.sum(x * acc2, axis=AXIS, keep_dims=True)  # <acc1, acc2> / s
        delta1 -= cond2 * ((dot_x / den_x) * (inv_s / den_x) - ratio * (norm_x2 / den_x / den_x))
    guided = selected & has_kept & (gamma != 0.0)
    out1 = tl.where(guided, cond1 + gamma * delta1, cond1)  # (unguided rows: o_cond, bit for bit)
    out2 = tl.where(guided, cond2 + gamma * cond2, cond2)
    return out1 * acc1 + out2 * acc2, cond1 * acc1 + cond2 * acc2, inv_l1 * acc1


@triton.jit
def _store_paths(
    out_ptr, cond_ptr, uncond_ptr, b, h, rows, stride_ob, stride_oh, stride_om, stride_od, offs_d, row_ok, d_ok,
    out, o_cond, o_uncond, WRITE_PATHS: tl.constexpr,
):  # fmt: skip
    """out (and with WRITE_PATHS o_cond, o_uncond: out's strides) into rows `rows` of (b, h)."""
    _store_rows(out_ptr, b, h, rows, stride_ob, stride_oh, stride_om, stride_od, offs_d, row_ok, d_ok, out)
    if WRITE_PATHS:
        _store_rows(cond_ptr, b, h, rows, stride_ob, stride_oh, stride_om, stride_od, offs_d, row_ok, d_ok, o_cond)
        _store_rows(uncond_ptr, b, h, rows, stride_ob, stride_oh, stride_om, stride_od, offs_d, row_ok, d_ok, o_uncond)


# --------------------------------------------------------------------------------------------
# prefill: one program per (query block, b, h)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["LQ_BUCKET", "LK_BUCKET"])
def _dual_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    cond_ptr,  # like out (dummy unless WRITE_PATHS)
    uncond_ptr,
    key_real_ptr,  # [B, Lk] uint8 (dummy unless HAS_KEY_REAL)
    horizon_ptr,  # [B, Lk] int64, unit stride along Lk (dummy unless HAS_HORIZON)
    start_ptr,  # [B, Lk] int64, unit stride along Lk (dummy unless HAS_START)
    drop_ptr,  # [B, Lk] uint8
    rows_ptr,  # [B, Lq] uint8
    qk_scale,  # scale log2(e)
    gamma,
    eps,
    window,  # runtime int; > every |p - j| when there is no window
    Hq,
    Lq,
    Lk,
    kv_group,
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
    stride_db,
    stride_dn,
    stride_sb,
    stride_sm,
    stride_hb,
    stride_fb,
    LQ_BUCKET,  # autotune key only
    LK_BUCKET,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,  # the head dim's tail past BLOCK_D (0: none)
    VALUE_DIM: tl.constexpr,  # v's head dim (may differ from HEAD_DIM)
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KEY_REAL: tl.constexpr,
    HAS_HORIZON: tl.constexpr,  # a last key per position (bidirectional blocks, segments)
    HAS_START: tl.constexpr,  # a first key per position (segments)
    ORTHOGONALIZE: tl.constexpr,
    WRITE_PATHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    bh, b, h, kvh, m0, offs_m, m_ok, pos = _fwd_program(Hq, Lq, Lk, kv_group, BLOCK_M)
    EVEN_D: tl.constexpr = HEAD_DIM >= BLOCK_D  # (the head columns are all real)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    EVEN_DV: tl.constexpr = VALUE_DIM == BLOCK_DV
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM
    # no sinks (sink_end 0, so no sink blocks before the band): the band [lo_blk, band_end),
    # blocks [lo_blk, a) masked (the window's / first keys' edge; none without either:
    # lo_blk = a = 0), [a, c) unmasked, [c, band_end) masked
    reach = _causal_reach(horizon_ptr, b, pos, Lk, stride_hb, HAS_HORIZON)
    first = _segment_first(start_ptr, b, pos, Lk, stride_fb, HAS_START)
    _, _, lo_blk, a, c, band_end = _fwd_band(
        m0, Lq, Lk, window, 0, h >= 0, reach, first, CAUSAL, HAS_KEY_REAL, HAS_HORIZON, HAS_START, False,
        BLOCK_M, BLOCK_N,
    )  # fmt: skip

    k_base, v_base, real_base, drop_base = _key_bases(
        k_ptr, v_ptr, key_real_ptr, drop_ptr, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh, stride_rb, stride_db
    )
    rows_m = offs_m.to(tl.int64)
    q = _load_rows(q_ptr, b, h, rows_m, stride_qb, stride_qh, stride_qm, stride_qd, offs_d, m_ok, d_ok, EVEN_D)
    q_t = _tail_rows(q_ptr, b, h, rows_m, stride_qb, stride_qh, stride_qm, stride_qd, m_ok, q, HEAD_DIM, BLOCK_D, BLOCK_DT)

    selected = tl.load(rows_ptr + b * stride_sb + rows_m * stride_sm, mask=m_ok, other=0) != 0
    if WRITE_PATHS:  # every row needs both paths
        split = h >= 0
    else:  # only guided rows (gamma != 0) need the language-only path; the others take every key in one state
        split = (tl.max(selected.to(tl.int32), axis=0) > 0) & (gamma != 0.0)
    # the band's dropped keys: [d_lo, d_hi) holds them (one run in practice: an image), in the
    # blocks [out_lo, out_hi); the blocks [in_lo, in_hi) hold nothing else when they are one run
    d_lo, d_hi, d_count = _drop_run(drop_base, stride_dn, lo_blk, band_end, _SCAN_BLOCK)
    split = split & (d_count > 0)
    d_lo = tl.where(split, d_lo, band_end)  # (no run: state 1 takes every block of the band)
    d_hi = tl.where(split, d_hi, band_end)
    out_lo = (d_lo // BLOCK_N) * BLOCK_N
    out_hi = tl.cdiv(d_hi, BLOCK_N) * BLOCK_N
    one_run = d_count == d_hi - d_lo
    in_lo = tl.where(one_run, tl.cdiv(d_lo, BLOCK_N) * BLOCK_N, out_hi)
    in_hi = tl.maximum(tl.where(one_run, (d_hi // BLOCK_N) * BLOCK_N, out_hi), in_lo)

    # state 2, the dropped keys: unmasked over the interior's all-dropped blocks [x, y), masked
    # over the band's other blocks in [out_lo, out_hi); its output o2 = a2 / l2 parked in out
    x = tl.maximum(a, in_lo)
    y = tl.minimum(c, in_hi)
    lo2 = tl.maximum(lo_blk, out_lo)
    hi2 = tl.where(split, tl.minimum(band_end, out_hi), lo2)
    inner = split & (x < y)
    x = tl.where(inner, x, hi2)
    y = tl.where(inner, y, hi2)
    m2, l2, acc2 = _kind_pass(
        q, q_t, 1, x, y, y, y, lo2, x, y, hi2, y, y, y, y,
        k_base, v_base, real_base, drop_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_dn,
        band_end, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, qk_scale,
        CAUSAL, HAS_HORIZON, HAS_START, HAS_KEY_REAL, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_M, BLOCK_DV, BLOCK_N,
        DOT_PRECISION, UPCAST,
    )  # fmt: skip
    parked = tl.where(split, m_ok, False)  # (m_ok & split: not a bool mask under the interpreter)
    inv_l2 = tl.where(l2 > 0.0, 1.0 / l2, 0.0)  # (o2 fits any dtype's range: a2 may not)
    _store_rows(out_ptr, b, h, rows_m, stride_ob, stride_oh, stride_om, stride_od, offs_dv, parked, dv_ok,
                acc2 * inv_l2[:, None])  # fmt: skip

    # state 1, the kept keys (every key when no row needs the paths apart): unmasked over the
    # interior less [out_lo, out_hi), masked over the band's edges and the interior's blocks in
    # [out_lo, out_hi) that are not all dropped
    m1, l1, acc1 = _kind_pass(
        q, q_t, tl.where(split, 0, -1), a, tl.minimum(c, out_lo), tl.maximum(a, out_hi), c,
        lo_blk, a, c, band_end, tl.maximum(a, out_lo), tl.minimum(c, in_lo), tl.maximum(a, in_hi), tl.minimum(c, out_hi),
        k_base, v_base, real_base, drop_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_dn,
        band_end, pos, reach, first, offs_d, d_ok, offs_dv, dv_ok, window, qk_scale,
        CAUSAL, HAS_HORIZON, HAS_START, HAS_KEY_REAL, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_M, BLOCK_DV, BLOCK_N,
        DOT_PRECISION, UPCAST,
    )  # fmt: skip
    tl.debug_barrier()  # the rows parked above by other threads of the program
    o2 = _load_rows(out_ptr, b, h, rows_m, stride_ob, stride_oh, stride_om, stride_od, offs_dv, parked, dv_ok, EVEN_DV)
    acc2 = o2.to(tl.float32) * l2[:, None]

    out, o_cond, o_uncond = _guide(
        m1[:, None], l1[:, None], acc1, m2[:, None], l2[:, None], acc2, selected[:, None], gamma, eps, ORTHOGONALIZE, 1
    )
    _store_paths(out_ptr, cond_ptr, uncond_ptr, b, h, rows_m, stride_ob, stride_oh, stride_om, stride_od, offs_dv,
                 m_ok, dv_ok, out, o_cond, o_uncond, WRITE_PATHS)  # fmt: skip


# --------------------------------------------------------------------------------------------
# decode: split-K over the keys, all query heads of a kv head in one program, then a merge
# --------------------------------------------------------------------------------------------


@triton.jit
def _dual_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    state_ptr,  # [B * Hkv, S, 2 states, 2 (m, l), BLOCK_R] float32
    acc_ptr,  # [B * Hkv, S, 2 states, BLOCK_R, BLOCK_DV] float32
    key_real_ptr,
    horizon_ptr,
    start_ptr,
    drop_ptr,
    qk_scale,
    window,  # > every |p - j| when there is no window
    Hkv,
    Lq,
    Lk,
    kv_group,
    band_lo,  # first key of the band (no query sees a key before it)
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
    stride_db,
    stride_dn,
    stride_hb,
    stride_fb,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DT: tl.constexpr,  # the head dim's tail past BLOCK_D (0: none)
    VALUE_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr,  # >= kv_group * Lq rows, >= 16 (tl.dot)
    CAUSAL: tl.constexpr,
    HAS_KEY_REAL: tl.constexpr,
    HAS_HORIZON: tl.constexpr,
    HAS_START: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    EVEN_DV: tl.constexpr = VALUE_DIM == BLOCK_DV
    pid, split, bkv, b, kvh, r, r_ok, h, pos, offs_d, d_ok, q, q_t = _split_program(
        q_ptr, stride_qb, stride_qh, stride_qm, stride_qd, Hkv, Lq, Lk, kv_group, num_splits, HEAD_DIM, BLOCK_D, BLOCK_DT,
        BLOCK_R,
    )
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < VALUE_DIM
    reach = _causal_reach(horizon_ptr, b, pos, Lk, stride_hb, HAS_HORIZON)  # (the splits reach Lk)
    first = _segment_first(start_ptr, b, pos, Lk, stride_fb, HAS_START)  # (masked per key)
    start0, end = _split_keys(band_lo, split, chunk, Lk, pid >= 0, first, HAS_START, BLOCK_N)  # this split's keys
    k_base, v_base, real_base, drop_base = _key_bases(
        k_ptr, v_ptr, key_real_ptr, drop_ptr, b, kvh, stride_kb, stride_kh, stride_vb, stride_vh, stride_rb, stride_db
    )

    m1, l1, acc1, m2, l2, acc2 = _empty_states(BLOCK_R, BLOCK_DV)
    for start in range(start0, end, BLOCK_N):  # masked: decode is bound by the K / V reads
        m1, l1, acc1, m2, l2, acc2 = _dual_block(
            q, q_t, m1, l1, acc1, m2, l2, acc2, k_base, v_base, real_base, drop_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_dn, start, end, pos, reach, first,
            offs_d, d_ok, offs_dv, dv_ok, window, qk_scale,
            CAUSAL, HAS_HORIZON, HAS_START, HAS_KEY_REAL, HEAD_DIM, BLOCK_D, BLOCK_DT, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    part = (bkv * num_splits + split) * 2  # state 1 at part, state 2 at part + 1
    _store_partial(state_ptr, acc_ptr, part, r, offs_dv, m1, l1, acc1, 2, BLOCK_R, BLOCK_DV)
    _store_partial(state_ptr, acc_ptr, part + 1, r, offs_dv, m2, l2, acc2, 2, BLOCK_R, BLOCK_DV)


@triton.jit
def _dual_merge_kernel(
    state_ptr,
    acc_ptr,
    out_ptr,
    cond_ptr,
    uncond_ptr,
    rows_ptr,
    gamma,
    eps,
    Hq,
    Hkv,
    Lq,
    kv_group,
    num_splits,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_sb,
    stride_sm,
    VALUE_DIM: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr,
    S_PAD: tl.constexpr,
    ORTHOGONALIZE: tl.constexpr,
    WRITE_PATHS: tl.constexpr,
):
    """One program per query row (b, h, i): each state merged over the splits by its own max,
    then the guidance."""
    row, b, h, qi, bkv, r = _merge_row(Hq, Hkv, Lq, kv_group)
    s = tl.arange(0, S_PAD)
    part = (bkv * num_splits + s) * 2
    s_ok = s < num_splits
    c0, l0 = _sink_state(state_ptr, h, h >= 0, False)  # no sink logit: (-inf, 0)
    m1, l1, _, acc1, _, _, _, _, _, _ = _merge_parts(state_ptr, acc_ptr, part, r, s_ok, c0, l0, 2, BLOCK_R, BLOCK_DV)
    m2, l2, _, acc2, _, _, _, _, _, _ = _merge_parts(state_ptr, acc_ptr, part + 1, r, s_ok, c0, l0, 2, BLOCK_R, BLOCK_DV)
    selected = tl.load(rows_ptr + b * stride_sb + qi * stride_sm) != 0
    out, o_cond, o_uncond = _guide(m1, l1, acc1, m2, l2, acc2, selected, gamma, eps, ORTHOGONALIZE, 0)
    offs_dv = tl.arange(0, BLOCK_DV)
    qi1 = tl.zeros([1], tl.int64) + qi  # the row as a 1-row tile
    _store_paths(out_ptr, cond_ptr, uncond_ptr, b, h, qi1, stride_ob, stride_oh, stride_om, stride_od, offs_dv,
                 qi1 >= 0, offs_dv < VALUE_DIM, out[None, :], o_cond[None, :], o_uncond[None, :], WRITE_PATHS)  # fmt: skip


# --------------------------------------------------------------------------------------------
# configs and launch (attention.py's config lists, with two accumulators in the register model)
# --------------------------------------------------------------------------------------------

_prune_dual_split = functools.partial(_prune_split, accumulators=2)
_dual_fwd_tuned = autotune(
    configs=_FWD_CONFIGS,
    key=["HEAD_DIM", "VALUE_DIM", "CAUSAL", "HAS_KEY_REAL", "HAS_HORIZON", "HAS_START", *_FWD_KEY_SHAPES],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_dual_fwd_kernel)
_dual_split_tuned = autotune(
    configs=_SPLIT_CONFIGS,
    key=["HEAD_DIM", "VALUE_DIM", "BLOCK_R", "CAUSAL", "HAS_KEY_REAL", "HAS_HORIZON", "HAS_START"],
    prune_configs_by={"early_config_prune": _prune_dual_split},
)(_dual_split_kernel)


@functools.lru_cache(maxsize=1024)
def _dual_flags(dtype, head_dim, value_dim, interpreted, causal, has_key_real, has_horizon, has_start, orthogonalize,
                write_paths, split_rows) -> tuple:
    """(the kernel's constexprs, the guidance constexprs) for one combination of the options, made
    once (callers only read them): split_rows 0: the prefill kernel's, which guides itself; else
    the decode split kernel's for (Hq / Hkv) Lq = split_rows query rows per program (the merge
    guides)."""
    flags = dict(
        CAUSAL=causal, HAS_KEY_REAL=has_key_real, HAS_HORIZON=has_horizon, HAS_START=has_start,
        **_dot_flags(dtype, head_dim, value_dim, interpreted),
    )
    guidance = dict(ORTHOGONALIZE=orthogonalize, WRITE_PATHS=write_paths)
    flags.update(guidance if split_rows == 0 else {"BLOCK_R": _split_rows(split_rows)})
    return flags, guidance


def dual_path_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    o_cond: Optional[torch.Tensor],
    o_uncond: Optional[torch.Tensor],
    *,
    scale: float,
    causal: bool,
    key_real: Optional[torch.Tensor],
    drop: torch.Tensor,
    rows: torch.Tensor,
    gamma: float,
    orthogonalize: bool,
    eps: float,
    split_keys: Optional[int] = None,
    horizon: Optional[torch.Tensor] = None,
    window: int = 0,
    start: Optional[torch.Tensor] = None,
) -> None:
    """Launch the dual-path kernels; writes every element of out and (when given) o_cond and
    o_uncond.

    q [B, Hq, Lq, D]; k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (Hq % Hkv == 0; Dv may differ from
    D), float32 / bfloat16 / float16, any strides with a unit stride along the head dims.
    out [B, Hq, Lq, Dv] of their dtype, the same (e.g. a transposed [B, Lq, Hq, Dv]);
    o_cond, o_uncond both None or both tensors of out's shape, dtype and strides. key_real
    uint8 [B, Lk] (1 = real key) or None (all real); drop uint8 [B, Lk] (1 = dropped / image
    key); rows uint8 [B, Lq] (1 = guide this query row). gamma: guidance strength (0: out is
    o_cond exactly); orthogonalize: remove dO's component along o_uncond; eps > 0.
    split_keys: as in attention.sink_attention (None chooses, 0 prefill, n >= 1 about n key
    splits of the decode path). horizon, start: int64 [B, Lk] contiguous or None, as in
    attention.sink_attention (p sees only keys start[b, p] <= j <= horizon[b, p], clamped).
    window: 0 none, w >= 1 as in attention.sink_attention (causal: p sees keys j > p - w, also
    with a horizon; bidirectional: |p - j| < w); there are no sink keys.
    """
    sizes, strides = _check_qkv(q, k, v, out)
    B, Hq, Hkv, Lq, Lk, D, Dv = sizes
    if (o_cond is None) != (o_uncond is None):
        raise ValueError("o_cond and o_uncond must both be given or both be None")
    for name, path in (("o_cond", o_cond), ("o_uncond", o_uncond)):
        if path is not None and (path.shape != out.shape or path.dtype != out.dtype or path.stride() != out.stride()):
            raise ValueError(f"{name} must have out's shape, dtype and strides")
    if key_real is not None:
        _check_layout("key_real", key_real, (B, Lk), torch.uint8, contiguous=False)
    _check_layout("drop", drop, (B, Lk), torch.uint8, contiguous=False)
    _check_layout("rows", rows, (B, Lq), torch.uint8, contiguous=False)
    if horizon is not None:
        _check_layout("horizon", horizon, (B, Lk), torch.int64)
    if start is not None:
        _check_layout("start", start, (B, Lk), torch.int64)
    window = int(window)
    if window < 0:
        raise ValueError("window must be >= 0 (0: no window)")
    if B * Hq * Lq == 0:
        return

    write_paths = o_cond is not None
    cond, uncond = (o_cond, o_uncond) if write_paths else (out, out)  # (dummies: never written)
    real = key_real if key_real is not None else drop  # (a dummy: never read)
    stride_r = key_real.stride() if key_real is not None else (0, 0)
    has_horizon, has_start = horizon is not None, start is not None
    horizon_arg, stride_h = (horizon, horizon.stride(0)) if has_horizon else (drop, 0)  # (drop: a dummy)
    start_arg, stride_f = (start, start.stride(0)) if has_start else (drop, 0)
    # scale log2(e), kept finite (q doubled past float max; strides: the q launched)
    q, strides, qk_scale, _ = _scaled_q(q, strides, float(scale), 0.0)
    # no window, or one at least as wide: one wider than any |p - j| (as in attention.sink_attention)
    win = window if 0 < window < Lk + Lq + 1 else Lk + Lq + 1
    kv_group = Hq // Hkv
    # the band [band_lo, Lk): keys any of the last Lq queries may see (no window: every key)
    splits, band_lo, band = _decode_plan(q, B, Hq, Hkv, Lq, Lk, win, split_keys)
    flags, guidance = _dual_flags(q.dtype, D, Dv, interpreter_enabled(), bool(causal), key_real is not None, has_horizon,
                                  has_start, bool(orthogonalize), write_paths, kv_group * Lq if splits else 0)  # fmt: skip
    if splits == 0:
        buckets = _lq_lk_buckets(Lq, Lk)
        args = (
            q, k, v, out, cond, uncond, real, horizon_arg, start_arg, drop, rows, qk_scale, float(gamma),
            float(eps), win, Hq, Lq, Lk, kv_group, *strides, *stride_r, *drop.stride(), *rows.stride(), stride_h,
            stride_f, *buckets,
        )  # fmt: skip
        _launch(_dual_fwd_kernel, _dual_fwd_tuned, _FWD_CONFIGS, _prune_fwd, _fwd_grid(Lq, B * Hq), args, flags,
                _INTERPRET_FWD_BLOCKS, {"q_ptr": q, "Lq": Lq}, buckets)  # fmt: skip
        return

    chunk, splits = _split_layout(band, splits)
    block_r, block_dv = flags["BLOCK_R"], flags["BLOCK_DV"]
    dev = q.device  # (the scratch's sizes as separate arguments: ~0.3 us less than a tuple)
    state = torch.empty(B * Hkv, splits, 2, 2, block_r, dtype=torch.float32, device=dev)
    acc = torch.empty(B * Hkv, splits, 2, block_r, block_dv, dtype=torch.float32, device=dev)
    args = (
        q, k, v, state, acc, real, horizon_arg, start_arg, drop, qk_scale, win, Hkv, Lq, Lk, kv_group, band_lo, chunk,
        splits, *strides[:12], *stride_r, *drop.stride(), stride_h, stride_f,
    )  # fmt: skip
    _launch(_dual_split_kernel, _dual_split_tuned, _SPLIT_CONFIGS, _prune_dual_split, (splits * B * Hkv,), args,
            flags, _INTERPRET_SPLIT_BLOCKS, {"q_ptr": q})  # fmt: skip
    _dual_merge_kernel[(B * Hq * Lq,)](
        state, acc, out, cond, uncond, rows, float(gamma), float(eps), Hq, Hkv, Lq, kv_group, splits,
        *strides[12:], *rows.stride(),
        VALUE_DIM=Dv, BLOCK_DV=block_dv, BLOCK_R=block_r, S_PAD=next_pow2(splits), **guidance,
        **FP_FUSION, num_warps=4,
    )  # fmt: skip


settle_cache_keys(globals())  # (the same cache keys in every process, see _launch.py)
