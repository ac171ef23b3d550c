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

Cost close to one attention call: S = Q K^T once per key block, and one P V product per block:
each block is classified by a one-number reduction over its keys in range (some query of the
program may see them) as holding only kept keys (state 1 only), only dropped keys (state 2
only) or both (two masked updates, two P V products). Image tokens are one contiguous run in
practice, so at most two blocks per program are mixed.

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
"""

# No `from __future__ import annotations`: Triton 3.0's interpreter takes a parameter as
# constexpr only when its annotation is the tl.constexpr object, not the string "tl.constexpr".

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

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
    _next_pow2_at_least,
    _prune_fwd,
    _prune_split,
    _real_keys,
    _segment_first,
    _sink_state,
    _softmax_step,
    _split_keys,
    _split_layout,
    _split_program,
    _store_partial,
    _store_rows,
)

__all__ = ["dual_path_attention"]


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _update(t, m_i, l_i, acc, v, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """One state's online-softmax update (m, l, acc) by the scores t (-inf: not its keys)."""
    m_i, l_i, acc, m_use, alpha, p, p_in = _softmax_step(t, m_i, l_i, acc, v, MASKED, DOT_PRECISION, UPCAST)
    return m_i, l_i, acc


@triton.jit
def _dual_block(
    q,  # [R, BLOCK_D] queries (input dtype)
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
    end,  # keys >= end are not in this program's range (masked blocks only)
    pos,  # [R] query positions
    reach,  # [R] the last key each row sees (its position, or its horizon; HAS_HORIZON or CAUSAL)
    first,  # [R] the first key each row sees (_segment_first; HAS_START only)
    offs_d,
    d_ok,
    offs_dv,  # the value head dim's columns and which are real
    dv_ok,
    window,  # > every |p - j| when there is no window
    qk_scale,  # scale log2(e)
    MASKED: tl.constexpr,  # False: every key of the block is real, < end and visible to every row
    CAUSAL: tl.constexpr,
    HAS_HORIZON: tl.constexpr,
    HAS_START: tl.constexpr,
    HAS_KEY_REAL: tl.constexpr,
    EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key block [start, start + BLOCK_N): scores once, then the state(s) its keys feed."""
    offs_n, n_ok, rows, t, v = _block_scores(
        q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start, end, offs_d, d_ok, offs_dv, dv_ok,
        qk_scale, 0.0, MASKED, False, EVEN_D, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
    )  # fmt: skip
    if MASKED:
        key_ok = _real_keys(real_base, rows, stride_rn, n_ok, HAS_KEY_REAL)
        drop = tl.load(drop_base + rows * stride_dn, mask=n_ok, other=0) != 0
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
        t = tl.where(visible & key_ok[None, :], t, _NEG_INF)
        kinds = tl.where(key_ok, tl.where(drop, 1 << 16, 1), 0)
    else:
        drop = tl.load(drop_base + rows * stride_dn) != 0
        kinds = tl.where(drop, 1 << 16, 1)
    # the keys in range (a superset of those some row sees: the band's blocks, end <= the
    # largest reach + 1) counted by kind in one reduction: kept in the low 16 bits, dropped in
    # the high ones
    kinds = tl.sum(kinds, axis=0)
    if (kinds >> 16) == 0:  # kept keys only (or none): state 1
        m1, l1, acc1 = _update(t, m1, l1, acc1, v, MASKED, DOT_PRECISION, UPCAST)
    elif (kinds & 0xFFFF) == 0:  # dropped keys only: state 2
        m2, l2, acc2 = _update(t, m2, l2, acc2, v, MASKED, DOT_PRECISION, UPCAST)
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
def _guide(m1, l1, acc1, m2, l2, acc2, selected, gamma, eps, ORTHOGONALIZE: tl.constexpr, AXIS: tl.constexpr):
    """(out, o_cond, o_uncond) from the two final states (see the module docstring). acc1, acc2
    hold rows along 1 - AXIS and the head dim along AXIS; m, l and selected broadcast against
    them (prefill: [R, 1] against [R, BLOCK_DV], AXIS 1; merge: scalars against [BLOCK_DV],
    AXIS 0). A state that saw nothing has m = -inf, l = acc = 0."""
    m = tl.maximum(m1, m2)
    shift = tl.where(m == _NEG_INF, 0.0, m)
    w1 = tl.exp2(m1 - shift)
    w2 = tl.exp2(m2 - shift)
    l = w1 * l1 + w2 * l2
    o_cond = (w1 * acc1 + w2 * acc2) * tl.where(l > 0, 1.0 / l, 0.0)
    has_kept = l1 > 0
    o_uncond = acc1 * tl.where(has_kept, 1.0 / l1, 0.0)
    delta = o_cond - o_uncond
    if ORTHOGONALIZE:  # (padded head-dim columns are 0 in both)
        u = o_uncond / (tl.sqrt(tl.sum(o_uncond * o_uncond, axis=AXIS, keep_dims=True)) + eps)
        delta = delta - tl.sum(delta * u, axis=AXIS, keep_dims=True) * u
    guided = selected & has_kept & (gamma != 0.0)
    return tl.where(guided, o_cond + gamma * delta, o_cond), o_cond, o_uncond


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
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
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

    m1, l1, acc1, m2, l2, acc2 = _empty_states(BLOCK_M, BLOCK_DV)
    for start in range(a, c, BLOCK_N):  # interior: no masks
        m1, l1, acc1, m2, l2, acc2 = _dual_block(
            q, m1, l1, acc1, m2, l2, acc2, k_base, v_base, real_base, drop_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_dn, start, band_end, pos, reach, first,
            offs_d, d_ok, offs_dv, dv_ok, window, qk_scale,
            False, CAUSAL, HAS_HORIZON, HAS_START, HAS_KEY_REAL, EVEN_D, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
        )  # fmt: skip
    # the band's edges, masked: below [lo_blk, a) (window, first keys), then above
    # [c, band_end) (diagonal / horizon, window, padding, Lk), in one loop (a second inlined
    # masked block spills, sm_90); a is a block start, or band_end (then c = a: a partial last
    # block below)
    below = tl.cdiv(a - lo_blk, BLOCK_N)
    for i in range(0, below + tl.cdiv(band_end - c, BLOCK_N)):
        start = tl.where(i < below, lo_blk + i * BLOCK_N, c + (i - below) * BLOCK_N)
        m1, l1, acc1, m2, l2, acc2 = _dual_block(
            q, m1, l1, acc1, m2, l2, acc2, k_base, v_base, real_base, drop_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_dn, start, band_end, pos, reach, first,
            offs_d, d_ok, offs_dv, dv_ok, window, qk_scale,
            True, CAUSAL, HAS_HORIZON, HAS_START, HAS_KEY_REAL, EVEN_D, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
        )  # fmt: skip

    selected = tl.load(rows_ptr + b * stride_sb + rows_m * stride_sm, mask=m_ok, other=0) != 0
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
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    EVEN_DV: tl.constexpr = VALUE_DIM == BLOCK_DV
    pid, split, bkv, b, kvh, r, r_ok, h, pos, offs_d, d_ok, q = _split_program(
        q_ptr, stride_qb, stride_qh, stride_qm, stride_qd, Hkv, Lq, Lk, kv_group, num_splits, HEAD_DIM, BLOCK_D, BLOCK_R
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
            q, m1, l1, acc1, m2, l2, acc2, k_base, v_base, real_base, drop_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_rn, stride_dn, start, end, pos, reach, first,
            offs_d, d_ok, offs_dv, dv_ok, window, qk_scale,
            True, CAUSAL, HAS_HORIZON, HAS_START, HAS_KEY_REAL, EVEN_D, EVEN_DV, BLOCK_N, DOT_PRECISION, UPCAST,
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
    m1, l1, acc1, _, _, _, _, _, _ = _merge_parts(state_ptr, acc_ptr, part, r, s_ok, c0, l0, 2, BLOCK_R, BLOCK_DV)
    m2, l2, acc2, _, _, _, _, _, _ = _merge_parts(state_ptr, acc_ptr, part + 1, r, s_ok, c0, l0, 2, BLOCK_R, BLOCK_DV)
    selected = tl.load(rows_ptr + b * stride_sb + qi * stride_sm) != 0
    out, o_cond, o_uncond = _guide(m1, l1, acc1, m2, l2, acc2, selected, gamma, eps, ORTHOGONALIZE, 0)
    offs_dv = tl.arange(0, BLOCK_DV)
    qi1 = tl.zeros([1], tl.int64) + qi  # the row as a 1-row tile
    _store_paths(out_ptr, cond_ptr, uncond_ptr, b, h, qi1, stride_ob, stride_oh, stride_om, stride_od, offs_dv,
                 qi1 >= 0, offs_dv < VALUE_DIM, out[None, :], o_cond[None, :], o_uncond[None, :], WRITE_PATHS)  # fmt: skip


# --------------------------------------------------------------------------------------------
# configs and launch (attention.py's config lists, with two accumulators in the register model)
# --------------------------------------------------------------------------------------------

_prune_dual_fwd = functools.partial(_prune_fwd, accumulators=2)
_prune_dual_split = functools.partial(_prune_split, accumulators=2)
_dual_fwd_tuned = triton.autotune(
    configs=_FWD_CONFIGS,
    key=["HEAD_DIM", "VALUE_DIM", "CAUSAL", "HAS_KEY_REAL", "HAS_HORIZON", "HAS_START", *_FWD_KEY_SHAPES],
    prune_configs_by={"early_config_prune": _prune_dual_fwd},
)(_dual_fwd_kernel)
_dual_split_tuned = triton.autotune(
    configs=_SPLIT_CONFIGS,
    key=["HEAD_DIM", "VALUE_DIM", "BLOCK_R", "CAUSAL", "HAS_KEY_REAL", "HAS_HORIZON", "HAS_START"],
    prune_configs_by={"early_config_prune": _prune_dual_split},
)(_dual_split_kernel)


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
    B, Hq, Hkv, Lq, Lk, D, Dv = _check_qkv(q, k, v, out)
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
    qk_scale = float(scale) * 1.4426950408889634
    # no window, or one at least as wide: one wider than any |p - j| (as in attention.sink_attention)
    win = window if 0 < window < Lk + Lq + 1 else Lk + Lq + 1
    flags = dict(
        CAUSAL=bool(causal), HAS_KEY_REAL=key_real is not None, HAS_HORIZON=has_horizon, HAS_START=has_start,
        **_dot_flags(q.dtype, D, Dv),
    )
    guidance = dict(ORTHOGONALIZE=bool(orthogonalize), WRITE_PATHS=write_paths)
    kv_group = Hq // Hkv
    # the band [band_lo, Lk): keys any of the last Lq queries may see (no window: every key)
    splits, band_lo, band = _decode_plan(q, Hkv, Lk, win, split_keys)
    if splits == 0:
        buckets = _lq_lk_buckets(Lq, Lk)
        args = (
            q, k, v, out, cond, uncond, real, horizon_arg, start_arg, drop, rows, qk_scale, float(gamma), float(eps),
            win, Hq, Lq, Lk, kv_group, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *stride_r, *drop.stride(),
            *rows.stride(), stride_h, stride_f, *buckets,
        )  # fmt: skip
        _launch(_dual_fwd_kernel, _dual_fwd_tuned, _FWD_CONFIGS, _prune_dual_fwd, _fwd_grid(Lq, B * Hq), args,
                dict(flags, **guidance), _INTERPRET_FWD_BLOCKS, {"q_ptr": q, "Lq": Lq}, buckets)  # fmt: skip
        return

    chunk, splits, block_r = _split_layout(q, Hkv, band, splits)
    block_dv = flags["BLOCK_DV"]
    state = torch.empty((B * Hkv, splits, 2, 2, block_r), dtype=torch.float32, device=q.device)
    acc = torch.empty((B * Hkv, splits, 2, block_r, block_dv), dtype=torch.float32, device=q.device)
    args = (
        q, k, v, state, acc, real, horizon_arg, start_arg, drop, qk_scale, win, Hkv, Lq, Lk, kv_group, band_lo, chunk,
        splits, *q.stride(), *k.stride(), *v.stride(), *stride_r, *drop.stride(), stride_h, stride_f,
    )  # fmt: skip
    _launch(_dual_split_kernel, _dual_split_tuned, _SPLIT_CONFIGS, _prune_dual_split, (splits * B * Hkv,), args,
            dict(flags, BLOCK_R=block_r), _INTERPRET_SPLIT_BLOCKS, {"q_ptr": q})  # fmt: skip
    _dual_merge_kernel[(B * Hq * Lq,)](
        state, acc, out, cond, uncond, rows, float(gamma), float(eps), Hq, Hkv, Lq, kv_group, splits,
        *out.stride(), *rows.stride(),
        VALUE_DIM=Dv, BLOCK_DV=block_dv, BLOCK_R=block_r, S_PAD=_next_pow2_at_least(splits, 1), **guidance,
        num_warps=4,
    )  # fmt: skip
