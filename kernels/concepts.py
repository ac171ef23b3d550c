"""Concept-mass kernels (Triton): the math of ``fastprobe.reference.concept_mass`` and its gradient.

The concepts arrive as the ConceptSet's index (``fastprobe.ops.concepts._Index``): the CSR by
concept, and its transpose by vocabulary id: the distinct concept ids ``vocab_ids`` in
increasing order (slot u holds vocab_ids[u]) with their memberships, ``token_slots[t]`` the slot
of concept token t, and ``id_block_starts[k]``, the first slot of an id at or past k * ID_BLOCK.

Forward:
  1. One program per row streams it in blocks for the online log-sum-exp (raw max M,
     S = sum 2^((x - M) c), c = log2(e) / T, lse = M / T + ln S), kept per chunk of the columns
     a thread holds and reduced across threads once after the loop (divergence.py's _lse_fold
     / _lse_rows). The concept ids inside each block (its slots [lo, hi) from id_block_starts,
     no search) are picked out of the block already in registers (tl.gather) and written to
     their slots of a small [N, U]
     buffer of the logits' dtype (U distinct concept ids; no [N, V] temporary). So the logits
     are read once. The loads of block b + 1 (logits, slot range, ids) are issued before
     block b is worked on, so no block waits on a chain of dependent loads.
  2. Per tile of concepts (in the same program after a barrier, or in a second launch), read
     each concept's variants from that buffer through token_slots and form, with m_c the
     largest variant logit,
     s_c = sum_{v in c} exp(d_v), d_v = (x_v - m_c) / T:
        log_mass  = lse_c - lse = (m_c - M) / T + (ln s_c - ln S)   (lse_c = m_c / T + ln s_c;
                    two large lse values are never subtracted),   mass = exp(log_mass)
        top_share = 1 / s_c,  entropy = ln s_c - (sum e_v d_v) / s_c,  top_token = argmax
     A concept whose variants are all -inf: mass 0, log_mass -inf, top_share 0, entropy 0,
     top_token its first variant.

Backward (g: gradient of log_mass, coef = h - sum_c g_c with h that of lse), one program per
row streaming it once:
  grad[n, v] = (coef p_v + sum_{c contains v} g_c q_cv) / T
with log p_v = (x_v - M) / T - ln S from the forward's row_state (M and ln S kept apart: the
float64 lse = M / T + ln S holds ln S only to |M / T| 2^-53, and a row [1e17, 1e17, 0] got
p = 1, not 1/2, from it), and q_cv = p_v / mass_c from the concept's own largest variant, as
the forward does: q_cv = exp((x_v - x_top) / T) top_share_c, x_top = x[top_token]: both exact
at any magnitude, however far below the row's max.
Each block stores coef p_v / T for all its v, then (after a barrier, so the order of the two
stores is fixed) overwrites each concept id in it once with its total, the concepts that
contain it read from the transpose: overlapping concepts accumulate, no atomics.

The index's values are not trusted (the raw ops, torch.ops.fastprobe.concept_mass and
concept_mass_backward, take it unchecked, and a check on the device would cost a host sync):
every address formed from one is kept inside its buffer. Ranges read from id_block_starts,
offsets and vocab_offsets are clamped to the table they index, ids outside the vocabulary
block being worked on are skipped (_in_block), and slots and concepts outside [0, U) and
[0, C) are masked. Hostile values then give unspecified statistics, never an access outside
a buffer; a ConceptSet's index (checked on construction, its ids against V by the op) is
never changed by these guards.
Temperature is a runtime float (1 / T), never a compile-time constant.
"""

# No `from __future__ import annotations`: Triton 3.0's interpreter takes a parameter as
# constexpr only when its annotation is the tl.constexpr object, not the string "tl.constexpr".

import os

import torch
import triton
import triton.language as tl

from ..backend import autotune_enabled, interpreter_enabled
from ._launch import FP_FUSION, autotune, cdiv, check_inv_temperature, launch_tuned, settle_cache_keys
from .divergence import _block_columns, _lse_fold, _lse_rows, _lse_value, _scaled_difference, _state

__all__ = ["concept_mass", "concept_mass_backward"]

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2)


# tl.gather is Triton >= 3.3 (torch >= 2.7); before it the concept ids are read again from the
# logits (from cache). Chosen here, not by a constexpr branch: older Triton resolves every
# tl.<name> in a kernel's source, dead branches included, for its cache key.
if hasattr(tl, "gather"):

    @triton.jit
    def _pick(block, b, row, ids, take, stride_v, BLOCK_V: tl.constexpr):
        """block[ids - b * BLOCK_V] (lanes not in `take` read block[0]), from registers; the ids
        of lanes in `take` lie in block b (_in_block)."""
        return tl.gather(block, tl.where(take, ids - b * BLOCK_V, 0).to(tl.int32), axis=0)

else:

    @triton.jit
    def _pick(block, b, row, ids, take, stride_v, BLOCK_V: tl.constexpr):
        """The logits row[ids] in block's dtype (lanes not in `take` read 0), from memory; the
        ids of lanes in `take` lie in block b (_in_block)."""
        return tl.load(row + ids.to(tl.int64) * stride_v, mask=take, other=0.0).to(block.dtype)


@triton.jit
def _clamp(value, low, high):
    """value limited to [low, high] (an index read from memory, kept inside its table)."""
    return tl.minimum(tl.maximum(value, low), high)


@triton.jit
def _id_range(id_block_starts_ptr, num_id_blocks, b, U, ID_BLOCKS_PER_BLOCK: tl.constexpr):
    """[lo, hi): the slots u of the concept ids in vocabulary block b (id blocks past the
    largest concept id hold none: the table ends there, at U), clamped to [0, U]."""
    lo = tl.load(id_block_starts_ptr + tl.minimum(b * ID_BLOCKS_PER_BLOCK, num_id_blocks))
    hi = tl.load(id_block_starts_ptr + tl.minimum((b + 1) * ID_BLOCKS_PER_BLOCK, num_id_blocks))
    return _clamp(lo, 0, U), _clamp(hi, 0, U)


@triton.jit
def _in_block(ids, b, V, BLOCK_V: tl.constexpr):
    """Which ids lie in vocabulary block b and below V: the only ones _pick reads and the
    backward writes (a ConceptSet's ids in block b's slot range always do)."""
    return (ids >= b * BLOCK_V) & (ids < (b + 1) * BLOCK_V) & (ids < V)


@triton.jit
def _scalar(tile):
    """The value of a [1, 1] tile, as a scalar (max: right even if its copies were combined)."""
    return tl.max(tl.max(tile, axis=1), axis=0)


@triton.jit
def _variants(gathered_row, token_slots_ptr, first, count, j0, j, U):
    """[BLOCK_J, BLOCK_C] variant logits j0 + j of a tile of concepts (their CSR starts `first`,
    `count` variants each), float32, -inf past each concept's last variant (and for a slot
    outside [0, U)). Variants run down the tile, concepts along it: the layout spreads the
    threads along the concepts, so the reductions over variants stay within a thread (no
    shuffles)."""
    has = (j0 + j)[:, None] < count[None, :]
    slot = tl.load(token_slots_ptr + first[None, :] + (j0 + j)[:, None], mask=has, other=0)
    has = has & (slot >= 0) & (slot < U)
    return tl.load(gathered_row + slot, mask=has, other=float("-inf")).to(tl.float32)


@triton.jit
def _concept_tile(
    gathered_row,  # [U] this row's logits of the distinct concept ids, by slot
    token_slots_ptr,  # [T] the slot of each concept token
    token_ids_ptr,
    offsets_ptr,
    out_row,  # offset n * C of this row's outputs
    mass_ptr,
    log_mass_ptr,
    top_share_ptr,
    entropy_ptr,
    top_token_ptr,
    concept,  # [BLOCK_C] concept indices
    C,
    T,  # concept tokens: the length of token_ids and token_slots
    U,  # distinct concept ids: the length of a gathered row
    row_max,
    row_log_s,
    inv_temperature,
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """The statistics of a tile of concepts, their variants read BLOCK_J at a time."""
    ok = concept < C
    # the concept's variants [first, first + count), kept inside [0, T]
    first = _clamp(tl.load(offsets_ptr + concept, mask=ok, other=0), 0, T)
    count = _clamp(tl.load(offsets_ptr + concept + 1, mask=ok, other=0), first, T) - first
    longest = tl.max(count, axis=0).to(tl.int32)
    j = tl.arange(0, BLOCK_J)

    # m_c: the largest variant logit (raw), and the first variant that has it
    x_max = tl.full([BLOCK_C], float("-inf"), tl.float32)
    top = tl.zeros([BLOCK_C], tl.int32)
    for j0 in range(0, longest, BLOCK_J):
        x = _variants(gathered_row, token_slots_ptr, first, count, j0, j, U)
        tile_max = tl.max(x, axis=0)
        tile_top = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int32) + j0
        better = tile_max > x_max  # strict: an earlier variant keeps a tie
        top = tl.where(better, tile_top, top)
        x_max = tl.where(better, tile_max, x_max)

    # s_c = sum e_v and sum e_v d_v, d_v = (x_v - m_c) / T, e_v = exp(d_v)
    shift = tl.where(x_max == float("-inf"), 0.0, x_max)
    s = tl.zeros([BLOCK_C], tl.float32)
    e_d = tl.zeros([BLOCK_C], tl.float32)
    for j0 in range(0, longest, BLOCK_J):
        x = _variants(gathered_row, token_slots_ptr, first, count, j0, j, U)
        d = (x - shift[None, :]) * inv_temperature
        e = tl.exp(d)
        s += tl.sum(e, axis=0)
        e_d += tl.sum(e * tl.where(e > 0, d, 0.0), axis=0)  # 0 log 0 = 0 (and no -inf * 0)

    has_mass = s > 0
    safe_s = tl.where(has_mass, s, 1.0)
    log_s = tl.log(safe_s)
    log_mass = tl.where(has_mass, _scaled_difference(shift, row_max, inv_temperature) + (log_s - row_log_s), float("-inf"))
    out = out_row + concept
    tl.store(log_mass_ptr + out, log_mass, mask=ok)
    tl.store(mass_ptr + out, tl.exp(log_mass), mask=ok)
    tl.store(top_share_ptr + out, tl.where(has_mass, 1.0 / safe_s, 0.0), mask=ok)
    tl.store(entropy_ptr + out, tl.where(has_mass, log_s - e_d / safe_s, 0.0), mask=ok)
    top_id = tl.load(token_ids_ptr + first + top, mask=ok & (top < count), other=0)  # (none when count is 0)
    tl.store(top_token_ptr + out, top_id, mask=ok)


@triton.jit
def _concept_mass_kernel(
    logits_ptr,  # [N, V] any float dtype, any strides
    vocab_ids_ptr,  # [U] int64, increasing
    token_slots_ptr,  # [T] int64: the slot u of each concept token (vocab_ids[u] is its id)
    id_block_starts_ptr,  # [num_id_blocks + 1] int32
    token_ids_ptr,  # [T] int64
    offsets_ptr,  # [C + 1] int64
    gathered_ptr,  # [N, U] the logits' dtype (scratch): gathered[n, u] = logits[n, vocab_ids[u]]
    row_state_ptr,  # [2, N] float32 (out): M and ln S of each row, for the backward (and the stats kernel)
    mass_ptr,  # [N, C] float32 (out), and the three below
    log_mass_ptr,
    top_share_ptr,
    entropy_ptr,
    top_token_ptr,  # [N, C] int64 (out)
    lse_ptr,  # [N] float64 (out)
    inv_temperature,
    N,
    V,
    U,
    C,
    T,
    num_id_blocks,
    stride_n,
    stride_v,
    BLOCK_V: tl.constexpr,
    BLOCK_U: tl.constexpr,
    ID_BLOCK: tl.constexpr,
    WITH_STATS: tl.constexpr,  # also compute the concept statistics (else _concept_stats_kernel does)
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
    CH: tl.constexpr,  # columns a thread holds in a block: one 16-byte load of the logits' dtype
):
    n = tl.program_id(0).to(tl.int64)
    c = inv_temperature * _LOG2E
    row = logits_ptr + n * stride_n
    gathered_row = gathered_ptr + n * U
    ID_BLOCKS: tl.constexpr = BLOCK_V // ID_BLOCK
    u = tl.arange(0, BLOCK_U)
    # the row's running max and sum per chunk of CH columns, [1, BLOCK_V // CH]
    mx = _state(1, BLOCK_V // CH, float("-inf"))
    s = _state(1, BLOCK_V // CH, 0.0)
    # Each iteration works on a block loaded by the one before (its logits, its slot range and
    # its first BLOCK_U concept ids), and issues the loads of the next block first: the loads
    # travel while a block is worked on, and nothing in a block waits on a chain of loads.
    col, v_ok = _block_columns(0, V, BLOCK_V)
    raw_next = tl.load(row + col * stride_v, mask=v_ok, other=float("-inf"))
    lo_next, hi_next = _id_range(id_block_starts_ptr, num_id_blocks, 0, U, ID_BLOCKS)
    ids_next = tl.load(vocab_ids_ptr + lo_next + u, mask=lo_next + u < hi_next, other=0)
    for b in range(0, tl.cdiv(V, BLOCK_V)):
        raw, lo, hi, ids = raw_next, lo_next, hi_next, ids_next
        col, v_ok = _block_columns((b + 1) * BLOCK_V, V, BLOCK_V)  # (past V: nothing loads)
        raw_next = tl.load(row + col * stride_v, mask=v_ok, other=float("-inf"))
        lo_next, hi_next = _id_range(id_block_starts_ptr, num_id_blocks, b + 1, U, ID_BLOCKS)
        mx, s = _lse_fold(raw.to(tl.float32), mx, s, c, CH)  # online log-sum-exp
        # the block's concept ids, picked out of it into their slots (a block with more than
        # BLOCK_U of them reads the rest in further windows)
        block = tl.reshape(raw, [BLOCK_V])
        take = (lo + u < hi) & _in_block(ids, b, V, BLOCK_V)
        tl.store(gathered_row + lo + u, _pick(block, b, row, ids, take, stride_v, BLOCK_V), mask=take)
        for w in range(lo + BLOCK_U, hi, BLOCK_U):
            slot = w + u
            more = tl.load(vocab_ids_ptr + slot, mask=slot < hi, other=0)
            take = (slot < hi) & _in_block(more, b, V, BLOCK_V)
            tl.store(gathered_row + slot, _pick(block, b, row, more, take, stride_v, BLOCK_V), mask=take)
        ids_next = tl.load(vocab_ids_ptr + lo_next + u, mask=lo_next + u < hi_next, other=0)

    # (M, S) of the row; lse = M / T + ln S in float64, where M / T is exact (-inf for a row of
    # -inf; NaN for NaN or +inf input); M and ln S apart, from which the backward forms log p
    row_mx, row_s = _lse_rows(mx, s, c)
    mx, s = _scalar(row_mx), _scalar(row_s)
    tl.store(lse_ptr + n, _lse_value(mx, s, inv_temperature))
    log_s = tl.log2(s) * _LN2
    tl.store(row_state_ptr + n, mx)
    tl.store(row_state_ptr + N + n, log_s)
    if WITH_STATS:
        tl.debug_barrier()  # the gathered row is complete
        for c0 in range(0, C, BLOCK_C):
            _concept_tile(
                gathered_row, token_slots_ptr, token_ids_ptr, offsets_ptr, n * C,
                mass_ptr, log_mass_ptr, top_share_ptr, entropy_ptr, top_token_ptr,
                c0 + tl.arange(0, BLOCK_C), C, T, U, mx, log_s, inv_temperature, BLOCK_C, BLOCK_J,
            )


@triton.jit
def _concept_stats_kernel(
    gathered_ptr,  # [N, U]
    token_slots_ptr,
    token_ids_ptr,
    offsets_ptr,
    row_state_ptr,  # [2, N] float32: M and ln S of each row
    mass_ptr,
    log_mass_ptr,
    top_share_ptr,
    entropy_ptr,
    top_token_ptr,
    inv_temperature,
    N,
    U,
    C,
    T,
    BLOCK_C: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """Row program_id(0), tiles of concepts program_id(1), program_id(1) + the grid's second
    size, ... (the tiles can outnumber a grid's y axis, 65535: they are folded onto it)."""
    n = tl.program_id(0).to(tl.int64)
    row_max, row_log_s = tl.load(row_state_ptr + n), tl.load(row_state_ptr + N + n)
    for tile in range(tl.program_id(1), tl.cdiv(C, BLOCK_C), tl.num_programs(1)):
        _concept_tile(
            gathered_ptr + n * U, token_slots_ptr, token_ids_ptr, offsets_ptr, n * C,
            mass_ptr, log_mass_ptr, top_share_ptr, entropy_ptr, top_token_ptr,
            tile * BLOCK_C + tl.arange(0, BLOCK_C), C, T, U, row_max, row_log_s, inv_temperature, BLOCK_C, BLOCK_J,
        )


@triton.jit
def _concept_mass_backward_kernel(
    logits_ptr,  # [N, V] any strides
    vocab_ids_ptr,  # [U] int64
    vocab_offsets_ptr,  # [U + 1] int64
    vocab_concepts_ptr,  # [M] int64: vocab_ids[u] is in concepts [vocab_offsets[u], vocab_offsets[u + 1])
    id_block_starts_ptr,  # [num_id_blocks + 1] int32
    top_share_ptr,  # [N, C] float32: 1 / s_c (0: every variant masked)
    top_token_ptr,  # [N, C] int64: the concept's largest variant
    grad_concept_ptr,  # [N, C] float32: g
    row_state_ptr,  # [2, N] float32: the forward's M and ln S of each row
    coef_ptr,  # [N] float32: h - sum_c g_c
    grad_ptr,  # [N, V] contiguous, the logits' dtype (out)
    inv_temperature,
    N,
    V,
    C,
    U,
    M,
    num_id_blocks,
    stride_n,
    stride_v,
    BLOCK_V: tl.constexpr,
    BLOCK_U: tl.constexpr,
    ID_BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row = logits_ptr + n * stride_n
    grad_row = grad_ptr + n * V
    # log2 p_v = (x_v - shift) c - offset, shift = M, offset = ln S log2(e): exact near the row's
    # max at any magnitude (y_v - lse in float32 would lose 1e-3 relative at logits ~1e4; the
    # float64 lse, ln S from |M / T| ~ 1e17). A row of -inf (M = -inf) takes (0, 0): p = 0, not NaN.
    row_max = tl.load(row_state_ptr + n)
    masked_row = row_max == float("-inf")
    shift = tl.where(masked_row, 0.0, row_max)
    offset = tl.where(masked_row, 0.0, tl.load(row_state_ptr + N + n) * _LOG2E)
    c = inv_temperature * _LOG2E
    coef = tl.load(coef_ptr + n)
    for b in range(0, tl.cdiv(V, BLOCK_V)):
        # every v: coef p_v / T
        offs_v = b * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        x = tl.load(row + offs_v.to(tl.int64) * stride_v, mask=v_ok, other=float("-inf")).to(tl.float32)
        p = tl.exp2((x - shift) * c - offset)
        tl.store(grad_row + offs_v, (coef * p * inv_temperature).to(grad_ptr.dtype.element_ty), mask=v_ok)
        tl.debug_barrier()  # those stores come before the overwrites below
        # the concept ids of this block: (coef p_v + sum_{c contains v} g_c q_cv) / T
        lo, hi = _id_range(id_block_starts_ptr, num_id_blocks, b, U, BLOCK_V // ID_BLOCK)
        for w in range(lo, hi, BLOCK_U):
            slot = w + tl.arange(0, BLOCK_U)
            ids = tl.load(vocab_ids_ptr + slot, mask=slot < hi, other=0)
            take = (slot < hi) & _in_block(ids, b, V, BLOCK_V)
            # the id's memberships [first, first + count), kept inside [0, M]
            first = _clamp(tl.load(vocab_offsets_ptr + slot, mask=take, other=0), 0, M)
            count = _clamp(tl.load(vocab_offsets_ptr + slot + 1, mask=take, other=0), first, M) - first
            x_v = _pick(x, b, row, ids, take, stride_v, BLOCK_V)
            total = coef * tl.exp2((x_v - shift) * c - offset)
            for j in range(0, tl.max(count, axis=0).to(tl.int32)):
                has = j < count
                concept = tl.load(vocab_concepts_ptr + first + j, mask=has, other=0)
                has = has & (concept >= 0) & (concept < C)
                share = tl.load(top_share_ptr + n * C + concept, mask=has, other=0.0)
                top = tl.load(top_token_ptr + n * C + concept, mask=has, other=0)
                top_ok = has & (top >= 0) & (top < V)  # (never read outside the row, whatever top_token holds)
                x_top = tl.load(row + top * stride_v, mask=top_ok, other=0.0).to(tl.float32)
                g = tl.load(grad_concept_ptr + n * C + concept, mask=has, other=0.0)
                has_mass = share > 0  # an all -inf concept contributes 0
                # q_cv = p_v / mass_c = 2^((x_v - x_top) c) top_share_c, from the concept's largest variant
                q = tl.exp2((x_v - x_top) * c + tl.log2(tl.where(has_mass, share, 1.0)))
                total += tl.where(has_mass, g * q, 0.0)
            tl.store(grad_row + ids, (total * inv_temperature).to(grad_ptr.dtype.element_ty), mask=take)


# On a GPU the streaming kernels' block size and warp count are tuned per V (and, by Triton,
# per dtype); they overwrite every output, so re-running them while tuning is safe.
_AUTOTUNE_CONFIGS = [
    triton.Config({"BLOCK_V": bv}, num_warps=nw, num_stages=1) for bv in (2048, 4096) for nw in (4, 8)
]
_concept_mass_kernel_tuned = autotune(configs=_AUTOTUNE_CONFIGS, key=["V", "WITH_STATS"])(_concept_mass_kernel)
_backward_kernel_tuned = autotune(configs=_AUTOTUNE_CONFIGS, key=["V"])(_concept_mass_backward_kernel)

_GPU_BLOCKS = dict(BLOCK_U=256, BLOCK_C=64, BLOCK_J=8)
# Through the Triton interpreter (CPU tests): small blocks, so that tiny shapes still span
# several vocabulary blocks, ragged tails, several gather windows and concept tiles.
_INTERPRET_BLOCKS = dict(BLOCK_V=256, BLOCK_U=8, BLOCK_C=4, BLOCK_J=2)
# FASTPROBE_CONCEPTS_STATS=separate computes the statistics in a second launch (one
# program per row and tile of concepts, the tiles past the grid's y limit folded onto it)
# instead of at the end of each row's program.
_STATS_ENV = "FASTPROBE_CONCEPTS_STATS"
_GRID_Y_LIMIT = 65535  # CUDA's largest grid size on the y (and z) axis; x takes 2^31 - 1


def _launch(kernel, tuned, configs, grid, *args, **meta) -> None:
    """The tuned kernel, or (no tuning) the first of its configs, through the interpreter with its
    fixed block."""
    block_sizes = [_INTERPRET_BLOCKS["BLOCK_V"]] + [config.kwargs["BLOCK_V"] for config in configs]
    if any(block % meta["ID_BLOCK"] for block in block_sizes):
        raise ValueError(f"vocabulary blocks must be multiples of the ConceptSet's id blocks ({meta['ID_BLOCK']})")
    if autotune_enabled() and not interpreter_enabled():
        # tuned per dtype, V and the constexprs (args[0]: the logits [N, V])
        launch_tuned(tuned, kernel, grid, args, meta, (args[0].dtype, args[0].shape[1], *meta.values()))
        return
    config = configs[0]
    if interpreter_enabled():
        kernel[grid](*args, **meta, **FP_FUSION, **{**config.kwargs, "BLOCK_V": _INTERPRET_BLOCKS["BLOCK_V"]})
    else:
        kernel[grid](*args, **meta, **FP_FUSION, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def concept_mass(logits: torch.Tensor, index, id_block: int, inv_temperature: float, out, row_state) -> None:
    """Launch the forward; writes every element of ``out`` and ``row_state``.

    logits    [N, V] float32 / bfloat16 / float16, any strides
    index     the ConceptSet's _Index (int64 tensors, id_block_starts int32; contiguous, on the
              logits' device; ids already checked to lie in [0, V)), with blocks of `id_block` ids
    out       ConceptMass of preallocated contiguous tensors: mass, log_mass, top_share,
              concentration_entropy [N, C] float32, top_token [N, C] int64, lse [N] float64
    row_state [2, N] float32 contiguous: each row's largest logit M, then ln S (lse = M / T + ln S)
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    N, V = logits.shape
    C, U = index.offsets.numel() - 1, index.vocab_ids.numel()
    for name, tensor in zip(out._fields, out):
        shape = (N,) if name == "lse" else (N, C)
        dtype = {"top_token": torch.int64, "lse": torch.float64}.get(name, torch.float32)
        if tuple(tensor.shape) != shape or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {list(shape)}")
    if tuple(row_state.shape) != (2, N) or row_state.dtype != torch.float32 or not row_state.is_contiguous():
        raise ValueError(f"row_state must be a contiguous torch.float32 tensor of shape [2, {N}]")
    inv_temperature = check_inv_temperature(inv_temperature)
    if N == 0:
        return

    blocks = _INTERPRET_BLOCKS if interpreter_enabled() else _GPU_BLOCKS
    with_stats = os.environ.get(_STATS_ENV, "fused") != "separate"
    gathered = torch.empty((N, U), dtype=logits.dtype, device=logits.device)
    concepts = (index.token_slots, index.token_ids, index.offsets)
    stats = (out.mass, out.log_mass, out.top_share, out.concentration_entropy, out.top_token)
    _launch(
        _concept_mass_kernel, _concept_mass_kernel_tuned, _AUTOTUNE_CONFIGS, (N,),
        logits, index.vocab_ids, index.token_slots, index.id_block_starts, *concepts[1:],
        gathered, row_state, *stats, out.lse,
        inv_temperature, N, V, U, C, index.token_ids.numel(), index.id_block_starts.numel() - 1, *logits.stride(),
        BLOCK_U=blocks["BLOCK_U"], ID_BLOCK=id_block, WITH_STATS=with_stats,
        BLOCK_C=blocks["BLOCK_C"], BLOCK_J=blocks["BLOCK_J"], CH=16 // logits.element_size(),
    )
    if not with_stats:  # rows on the grid's x axis (as the forward's), tiles of concepts folded onto y
        tiles = min(cdiv(C, blocks["BLOCK_C"]), _GRID_Y_LIMIT)
        _concept_stats_kernel[(N, tiles)](
            gathered, *concepts, row_state, *stats, inv_temperature, N, U, C, index.token_ids.numel(),
            BLOCK_C=blocks["BLOCK_C"], BLOCK_J=blocks["BLOCK_J"], **FP_FUSION,
        )


def concept_mass_backward(
    logits, index, id_block, top_share, top_token, row_state, grad_concept, coef, inv_temperature, grad
) -> None:
    """Launch the backward; writes every element of ``grad`` ([N, V] contiguous, logits' dtype).

    top_share, grad_concept [N, C] and coef [N]: float32 contiguous (coef = h - sum_c g_c);
    top_token [N, C] int64 and row_state [2, N] float32 contiguous (the forward's: M and ln S);
    index: the ConceptSet's _Index (vocab_ids, vocab_offsets, vocab_concepts, id_block_starts).
    """
    N, V = logits.shape
    C = top_share.shape[1]
    if grad.shape != logits.shape or grad.dtype != logits.dtype or not grad.is_contiguous():
        raise ValueError("grad must be a contiguous tensor of the logits' shape and dtype")
    named = (("top_share", top_share), ("top_token", top_token), ("grad_concept", grad_concept),
             ("row_state", row_state), ("coef", coef))
    for name, tensor in named:
        dtype = {"top_token": torch.int64}.get(name, torch.float32)
        if tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} tensor")
    inv_temperature = check_inv_temperature(inv_temperature)
    if N == 0:
        return
    blocks = _INTERPRET_BLOCKS if interpreter_enabled() else _GPU_BLOCKS
    _launch(
        _concept_mass_backward_kernel, _backward_kernel_tuned, _AUTOTUNE_CONFIGS, (N,),
        logits, index.vocab_ids, index.vocab_offsets, index.vocab_concepts, index.id_block_starts,
        top_share, top_token, grad_concept, row_state, coef, grad, inv_temperature, N, V, C, index.vocab_ids.numel(),
        index.vocab_concepts.numel(), index.id_block_starts.numel() - 1, *logits.stride(),
        BLOCK_U=blocks["BLOCK_U"], ID_BLOCK=id_block,
    )


settle_cache_keys(globals())  # (the same cache keys in every process, see _launch.py)
