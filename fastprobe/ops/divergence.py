"""draft_divergence: token-level epistemic uncertainty from K draft models.

q_k = softmax(draft_logits[k] / T), p = softmax(target_logits / T), m = sum_k w_k q_k.
  jsd               = H(m) - sum_k w_k H(q_k)  = sum_k w_k KL(q_k || m)    (variance term)
  kl_mixture_target = KL(m || p)                                            (bias term)
  epistemic         = jsd + KL(m || p)          = sum_k w_k KL(q_k || p)
The fused kernels stream the vocabulary twice per token (each row's log-sum-exp,
then the mixture terms) and never materialise a [K, N, V] or [N, V] probability tensor.

Vocabulary-sharded (tensor-parallel) form: every statistic is a sum over the vocabulary of
per-element terms once each row's lse over the WHOLE vocabulary is known, so each rank runs
pass 1 on its shard (lse_only), the ranks combine their lses with two all-reduces, each rank
runs pass 2 on its shard with the global lse (lse_in) to get its shares of the sums, and
one more all-reduce adds the shares. The lses travel in two parts, (M, ln S) with lse =
M / T + ln S and M the row's largest logit: a float64 lse holds ln S only to |M / T| 2^-53, and
at T = 1e-30 two tied maxima lost their ln 2 in it (each then had p = 1).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from .. import reference
from ..backend import resolve
from ._common import (
    DTYPE_NAMES,
    backend_dtype,
    check_dtype,
    check_finite_lse,
    check_op_inv_temperature,
    check_op_logits,
    check_op_tensors,
    check_same_device,
    check_temperature,
    check_tensor,
    cpp,
    custom_op,
    lse_parts,
    nan_where_not_finite,
    new_output,
    on_device,
    output_dtype,
    register_forward_only,
    refuse_dtensor,
    skips_host_checks,
    without_autocast,
)

__all__ = ["DraftDivergence", "draft_divergence", "draft_divergence_sharded"]

# Rows of the packed statistics tensor every backend fills: [NUM_FIXED_ROWS + K, N].
JSD, KL_MIXTURE_TARGET, EPISTEMIC, MIXTURE_ENTROPY, TARGET_ENTROPY = range(5)
NUM_FIXED_ROWS = 5


class DraftDivergence(NamedTuple):
    """Per-token results of draft_divergence (float32; float64 when either input is float64).
    Fields that need a target are None without one."""

    jsd: torch.Tensor  # [N]
    kl_mixture_target: Optional[torch.Tensor]  # [N]
    epistemic: Optional[torch.Tensor]  # [N]
    mixture_entropy: torch.Tensor  # [N]
    draft_entropy: torch.Tensor  # [K, N]
    target_entropy: Optional[torch.Tensor]  # [N]


# Every backend's packed path: (draft, target, weights, inv_temperature, lse_in, lse_only,
# stats, lse) -> None, filling stats and lse in one of three modes: the full op (lse_in None),
# pass 1 only (lse_only: the lse, stats 0), or a shard's shares given the global lse (lse_in).


@without_autocast
def _reference_packed(draft, target, weights, inv_temperature, lse_in, lse_only, stats, lse) -> None:
    """The reference, written into the packed layout the kernels use (in float64 when either
    input is float64, else float32)."""
    temperature = 1.0 / inv_temperature
    if lse_only:  # the two parts (M, ln S) of every row's lse
        lse.zero_()
        for r, logits in enumerate([*draft, *([] if target is None else [target])]):
            lse[:, r] = lse_parts(logits.double(), inv_temperature)
        stats.zero_()
        return
    if lse_in is not None:
        lse.copy_(lse_in[0] * inv_temperature + lse_in[1])
    else:
        lse[:-1] = torch.logsumexp(draft.double() * inv_temperature, dim=-1)
        lse[-1] = 0.0 if target is None else torch.logsumexp(target.double() * inv_temperature, dim=-1)
    if lse_in is None:
        result = reference.draft_divergence(draft, target, weights=weights, temperature=temperature)
    else:
        result = reference.draft_divergence_shares(draft, target, lse=lse_in, weights=weights, temperature=temperature)
    stats[JSD] = result["jsd"]
    stats[MIXTURE_ENTROPY] = result["mixture_entropy"]
    stats[NUM_FIXED_ROWS:] = result["draft_entropy"]
    if target is None:
        stats[[KL_MIXTURE_TARGET, EPISTEMIC, TARGET_ENTROPY]] = 0.0
    else:
        stats[KL_MIXTURE_TARGET] = result["kl_mixture_target"]
        stats[EPISTEMIC] = result["epistemic"]
        stats[TARGET_ENTROPY] = result["target_entropy"]


def _cpp_packed(draft, target, weights, inv_temperature, lse_in, lse_only, stats, lse) -> None:
    num_drafts, num_tokens, vocab = draft.shape
    cpp().draft_divergence(
        DTYPE_NAMES[draft.dtype], DTYPE_NAMES[(draft if target is None else target).dtype],  # (each read in its own)
        draft.data_ptr(), num_drafts, num_tokens, vocab, *draft.stride(),
        0 if target is None else target.data_ptr(),
        *((0, 0) if target is None else target.stride()),
        weights.data_ptr(),
        inv_temperature,
        0 if lse_in is None else lse_in.data_ptr(),
        lse_only,
        stats.data_ptr(),
        lse.data_ptr(),
        torch.get_num_threads(),
    )


def _triton_packed(draft, target, weights, inv_temperature, lse_in, lse_only, stats, lse) -> None:
    from ..kernels import divergence as triton_divergence

    with on_device(draft):
        triton_divergence.draft_divergence(draft, target, weights, inv_temperature, stats, lse, lse_in, lse_only)


_PACKED = {"reference": _reference_packed, "cpp": _cpp_packed, "triton": _triton_packed}


def _check_op_args(draft, target, weights, inv_temperature, lse_in, lse_only) -> None:
    """What the kernels read through raw pointers, checked in the op: it is reachable directly
    (torch.ops.fastprobe.draft_divergence), past draft_divergence's checks."""
    check_op_logits("draft_divergence", "draft", draft, "[K, N, V]")
    if lse_only and lse_in is not None:
        raise ValueError("draft_divergence: lse_only computes the lse, so lse_in must be None")
    num_drafts, num_tokens, vocab = draft.shape
    if target is not None:  # (its own dtype: the kernels load each input as it is)
        check_dtype(target, "draft_divergence: target")
    check_op_tensors("draft_divergence", draft.device, (
        ("target", target, (num_tokens, vocab), None, False),  # (any strides)
        ("weights", weights, (num_drafts,), output_dtype(draft, target), True),
        ("lse_in", lse_in, (2, num_drafts + 1, num_tokens), torch.float64, True),
    ))
    check_op_inv_temperature("draft_divergence", inv_temperature)


@custom_op("fastprobe::draft_divergence")
def _draft_divergence_op(
    draft: torch.Tensor,
    target: Optional[torch.Tensor],
    weights: torch.Tensor,
    inv_temperature: float,
    lse_in: Optional[torch.Tensor] = None,
    lse_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed form: stats [5 + K, N] (rows JSD, KL_MIXTURE_TARGET, EPISTEMIC,
    MIXTURE_ENTROPY, TARGET_ENTROPY, then H(q_k); float32, float64 when draft or target is
    float64) and lse [K + 1, N] (row K: target; float64, so that it keeps the precision of large
    logits). draft and target may differ in dtype: each is read in its own. For the sharded form:
    lse_in (float64 [2, K + 1, N], contiguous) gives each row's lse over the whole vocabulary,
    of which draft and target are one shard, in two parts (M, ln S): lse = M / T + ln S, M the
    row's largest logit; stats are then this shard's shares of every sum (lse [K + 1, N] is
    formed from lse_in); lse_only computes the lse only, in those two parts (lse [2, K + 1, N];
    stats are 0)."""
    _check_op_args(draft, target, weights, inv_temperature, lse_in, lse_only)
    num_drafts, num_tokens, _ = draft.shape
    stats = new_output((NUM_FIXED_ROWS + num_drafts, num_tokens), draft.device, output_dtype(draft, target))
    lse = new_output((2, num_drafts + 1, num_tokens) if lse_only else (num_drafts + 1, num_tokens), draft.device,
                     torch.float64)
    if num_tokens > 0:
        backend = resolve(draft.device, backend_dtype(draft, target), "draft_divergence")
        _PACKED[backend](draft, target, weights, inv_temperature, lse_in, lse_only, stats, lse)
    return stats, lse


@_draft_divergence_op.register_fake
def _(draft, target, weights, inv_temperature, lse_in=None, lse_only=False):
    num_drafts, num_tokens, _ = draft.shape
    stats = draft.new_empty((NUM_FIXED_ROWS + num_drafts, num_tokens), dtype=output_dtype(draft, target))
    lse = draft.new_empty((2, num_drafts + 1, num_tokens) if lse_only else (num_drafts + 1, num_tokens),
                          dtype=torch.float64)
    return stats, lse


register_forward_only(_draft_divergence_op, "draft_divergence", " (an uncertainty measure)",
                      inputs="draft_logits, target_logits and weights")


def check_weights(weights, num_drafts: int, draft: torch.Tensor,
                  target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The mixture weights [K] in the statistics' dtype (float32; float64 when draft or target is
    float64) on draft's device (uniform when None), or an error naming `weights`: wrong length,
    negative, not finite, not summing to 1 (to 1e-4; 16-bit weights to their eps), rescaled to sum
    to 1 (the kernels' divergences are those of a normalised mixture, as the reference's are)."""
    dtype = output_dtype(draft, target)
    if weights is None:
        return torch.full((num_drafts,), 1.0 / num_drafts, dtype=dtype, device=draft.device)
    if not isinstance(weights, torch.Tensor):
        try:
            if isinstance(weights, (str, bytes)):
                raise TypeError(type(weights).__name__)
            weights = torch.as_tensor(weights, dtype=dtype, device=draft.device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"weights must be a [K] tensor or a sequence of K numbers, got {weights!r:.80}") from error
    elif not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor of shape [K], got {weights.dtype}")
    else:
        if type(weights) is not torch.Tensor:  # (torch 2.4's DTensor fails the host checks below: refused first)
            refuse_dtensor(weights, "weights")
        check_dtype(weights, "weights")
        check_same_device(draft, "draft_logits", weights, "weights")
    if tuple(weights.shape) != (num_drafts,):
        raise ValueError(f"weights must have shape [K] = [{num_drafts}] (one per draft), got {tuple(weights.shape)}")
    # 16-bit weights sum to 1 only up to their rounding (each by up to eps / 2 of itself: [1/3] * 3
    # in bfloat16 sum to 1.002): that much is allowed; every dtype's are rescaled to sum to 1
    rounded = weights.dtype in (torch.bfloat16, torch.float16)
    tolerance = torch.finfo(weights.dtype).eps if rounded else 1e-4
    weights = weights.to(dtype).contiguous()
    if not skips_host_checks(weights):
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"weights must be finite and non-negative, got {weights.tolist()}")
        total = float(weights.detach().sum())  # (a check: no number from a tensor that requires grad)
        if abs(total - 1.0) > tolerance:
            raise ValueError(f"weights must sum to 1, got sum {total:.6g}")
    else:  # (no host sync under torch.compile / vmap: weights that would be refused make every statistic NaN)
        bad = (weights < 0).any() | ~torch.isfinite(weights).all() | ((weights.sum() - 1.0).abs() > tolerance)
        weights = torch.where(bad, torch.full_like(weights, float("nan")), weights)
    return weights / weights.sum()


def _check_inputs(draft_logits, target_logits, weights, temperature, empty_vocabulary: bool = False):
    """The checks both forms share: (draft, target or None, weights [K], inv_temperature),
    or a ValueError/TypeError naming the argument. empty_vocabulary: V = 0 is allowed (a shard)."""
    draft = check_tensor(draft_logits, "draft_logits", 3, "[K, N, V]")
    num_drafts, num_tokens, vocab = draft.shape
    if num_drafts == 0:
        raise ValueError("draft_logits has K = 0 drafts: need at least one draft model")
    if vocab == 0 and not empty_vocabulary:
        raise ValueError("draft_logits has an empty vocabulary (V = 0)")
    target = None
    if target_logits is not None:
        target = check_tensor(target_logits, "target_logits", 2, "[N, V]")
        check_same_device(draft, "draft_logits", target, "target_logits")
        if tuple(target.shape) != (num_tokens, vocab):
            raise ValueError(
                f"target_logits must have shape [N, V] = [{num_tokens}, {vocab}] to match draft_logits "
                f"{tuple(draft.shape)}, got {tuple(target.shape)}"
            )
    inv_temperature = 1.0 / check_temperature(temperature)
    return draft, target, check_weights(weights, num_drafts, draft, target), inv_temperature


def _check_lse(stats: torch.Tensor, lse: torch.Tensor, has_target: bool, weights: torch.Tensor) -> torch.Tensor:
    """stats, after a ValueError naming the first row whose lse is not finite (rows: the K
    drafts, then the target's, meaningful only with a target). Under torch.compile, no check:
    every statistic of such a token is NaN, and with weights check_weights made NaN (refused
    ones) every statistic of the mixture is (the kernels' guards left some finite)."""
    if skips_host_checks(lse):
        stats = nan_where_not_finite(stats, torch.isfinite(lse if has_target else lse[:-1]).all(0))
        mixture_rows = torch.arange(stats.shape[0], device=stats.device)[:, None] < TARGET_ENTROPY
        return nan_where_not_finite(stats, ~(mixture_rows & torch.isnan(weights).any()))
    if lse.shape[1] == 0:
        return stats
    num_drafts = lse.shape[0] - 1
    check_finite_lse(
        lse if has_target else lse[:-1],
        lambda row, token: f"target_logits[{token}]" if row == num_drafts else f"draft_logits[{row}][{token}]",
    )
    return stats


def _result(stats: torch.Tensor, has_target: bool) -> DraftDivergence:
    return DraftDivergence(
        jsd=stats[JSD],
        kl_mixture_target=stats[KL_MIXTURE_TARGET] if has_target else None,
        epistemic=stats[EPISTEMIC] if has_target else None,
        mixture_entropy=stats[MIXTURE_ENTROPY],
        draft_entropy=stats[NUM_FIXED_ROWS:],
        target_entropy=stats[TARGET_ENTROPY] if has_target else None,
    )


def draft_divergence(
    draft_logits: torch.Tensor,
    target_logits: Optional[torch.Tensor] = None,
    *,
    weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    temperature: float = 1.0,
) -> DraftDivergence:
    """Per-token Jensen-Shannon divergence among K draft models and KL(mixture || target).

    Args:
        draft_logits: [K, N, V] logits of K draft models at N token positions
            (float32, bfloat16, float16; float64 runs the reference). -inf entries
            are masked vocabulary.
        target_logits: optional [N, V] logits of the target model, of any of those dtypes,
            the draft's or another (see Dtypes).
        weights: optional [K] non-negative mixture weights summing to 1 (default uniform).
        temperature: divides every logit.

    Dtypes: draft_logits and target_logits may differ in dtype (a float32 draft with a
    bfloat16 target, or the reverse): the fused kernels read each in its own dtype and
    convert it to float32 as they load it, so neither is copied or cast, and the result is
    the same as that of the call with the narrower input cast up to the wider dtype first:
    the same bits in the C++ kernel; within float32 rounding in the Triton kernel on a GPU,
    whose tiles are laid out by element size and stride (and autotuning may choose another
    block size for another pair of dtypes), which changes the order of float32 sums only. If
    either is float64 the reference runs, in float64 (the other input is taken up to float64),
    and the results are float64.

    Returns:
        DraftDivergence(jsd, kl_mixture_target, epistemic, mixture_entropy,
        draft_entropy, target_entropy), float32 (float64 when either input is float64);
        target fields are None without target_logits.

    Precision: the fused kernels sum each KL from terms second order in the log-ratio, so
    divergences between near-equal distributions keep their relative precision (drafts 1e-4
    apart in logits, JSD ~3e-9: about 1e-3 relative to the float64 reference, where first-order
    sums in float32 were off by several times the value); the "reference" backend on float32
    input sums first-order terms.

    Raises ValueError or TypeError naming the argument for bad shapes, dtypes,
    devices or weights before any kernel runs, and ValueError after the kernel for
    a row whose logits are all -inf or not finite (the kernel reports each row's
    log-sum-exp, so this check needs no extra pass over the logits; under torch.compile,
    where it would be a host sync, such a token's statistics are NaN instead).
    """
    draft, target, mixture_weights, inv_temperature = _check_inputs(draft_logits, target_logits, weights, temperature)
    stats, lse = _draft_divergence_op(draft, target, mixture_weights, inv_temperature)
    return _result(_check_lse(stats, lse, target is not None, mixture_weights), target is not None)


def _global_lse(shard_parts: torch.Tensor, inv_temperature: float, group) -> torch.Tensor:
    """Each row's lse over the whole vocabulary, in two parts [2, K + 1, N] (M, ln S), from every
    rank's over its shard (M_r, ln S_r): M = max_r M_r, S = sum_r exp((M_r - M) / T + ln S_r)
    (two all-reduces). A row that is -inf on some ranks adds exp(-inf) = 0 there; one that is
    -inf on every rank is shifted by 0, not M = -inf (-inf - -inf would be NaN), and its ln S is
    -inf. NaN stays NaN."""
    import torch.distributed as dist

    shard_max, shard_log_sum = shard_parts
    top = shard_max.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    total = torch.exp((shard_max - shift) * inv_temperature + shard_log_sum)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return torch.stack([top, total.log()])


def _check_ranks_agree(draft: torch.Tensor, target: Optional[torch.Tensor], weights: torch.Tensor,
                       inv_temperature: float, group) -> None:
    """A ValueError on every rank of `group` at once when the ranks' calls differ in what must be
    the same (K, N, whether there is a target, temperature, weights, and whether the statistics
    are float64, i.e. the dtype of the shares the last all-reduce adds: float32 on one rank and
    float64 on another made gloo abort the process): the collectives would otherwise mix them
    silently, or fail on buffers of different sizes. One all-reduce (MAX) of the settings and
    their negatives, i.e. their max and min over the ranks; the weights enter by two
    position-weighted sums, which tell apart every mistake short of a crafted one. Draft and
    target dtypes may otherwise differ between ranks (bfloat16 on one, float32 on another): each
    rank reads its shard in its own dtype into float32 shares, as draft_divergence does."""
    import torch.distributed as dist

    positions = torch.arange(1, weights.shape[0] + 1, dtype=torch.float64, device=weights.device)
    wide = output_dtype(draft, target) == torch.float64  # the shares' dtype (and the weights', check_weights)
    weights = weights.double()
    plain = [float(draft.shape[0]), float(draft.shape[1]), float(target is not None), inv_temperature, float(wide)]
    settings = torch.cat([torch.tensor(plain, dtype=torch.float64, device=draft.device),
                          torch.stack([(weights * positions).sum(), (weights * positions.square()).sum()])])
    extremes = torch.cat([settings, -settings])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    high, low = extremes[:len(settings)].tolist(), (-extremes[len(settings):]).tolist()
    names = ("K (draft_logits' drafts)", "N (draft_logits' tokens)", "whether target_logits is given",
             "1 / temperature", "whether draft_logits or target_logits is float64", "weights", "weights")
    differ = [name for name, top, bottom in zip(names, high, low) if top != bottom]
    if names[4] in differ:  # weights rounded to float32 on some ranks only may differ by that alone
        differ = [name for name in differ if name != "weights"]
    if differ:
        raise ValueError(
            f"draft_divergence_sharded: the ranks disagree on {', '.join(dict.fromkeys(differ))}; every rank must "
            "pass the same K, N, target (given or not), weights and temperature, each with its own shard of the "
            "vocabulary, and a float64 draft_logits or target_logits on every rank or on none"
        )


def draft_divergence_sharded(
    draft_logits: torch.Tensor,
    target_logits: Optional[torch.Tensor] = None,
    *,
    weights: Optional[Union[torch.Tensor, Sequence[float]]] = None,
    temperature: float = 1.0,
    group=None,
) -> DraftDivergence:
    """draft_divergence when the vocabulary is sharded across ranks (tensor parallel).

    Each rank of `group` passes its shard of the vocabulary: draft_logits [K, N, V_r] and
    target_logits [N, V_r] (shards may differ in size; K, N, whether there is a target,
    weights and temperature must be the same on every rank, and so must whether an input is
    float64 (draft_divergence's rule: float64 gives float64 statistics); the 16-bit and float32
    dtypes may differ, between draft and target and between ranks, each shard read in its own).
    Returns the DraftDivergence of the whole vocabulary (the same statistics as
    draft_divergence on the concatenated logits, up to float rounding), identical on every
    rank.

    Every statistic is a sum over the vocabulary of per-element terms once each row's
    log-sum-exp (lse) is known, so each rank computes its shard's lse per row, the ranks
    combine them into the global lse (all_reduce MAX, then SUM, of [K + 1, N] float64), each
    rank computes its shard's shares of every sum with it, and an all_reduce SUM of the
    [5 + K, N] shares gives the statistics (epistemic = jsd + kl_mixture_target after the
    sum). The fused kernels read each shard twice and materialise no probability tensor.

    Args:
        draft_logits, target_logits, weights, temperature: as in draft_divergence, for this
            rank's shard of the vocabulary.
        group: the torch.distributed process group over which the vocabulary is sharded
            (default: the world); every rank of it must call this function.

    Raises the errors of draft_divergence for bad input (on the rank that has it, before
    any communication: the other ranks then wait in the first all-reduce, as with any
    collective), RuntimeError if torch.distributed is not initialised, ValueError on every
    rank when the ranks disagree on K, N, the target, weights, temperature or float64 (one
    more small all-reduce, checked first), and ValueError naming the row if a row's logits are
    all -inf (or hold NaN/+inf) over the WHOLE vocabulary; that check is on the combined lse, so
    every rank raises it together. A row that is all -inf on some ranks' shards only is fine, and so
    is a rank whose shard is empty (V_r = 0: it adds nothing).
    """
    import torch.distributed as dist

    draft, target, mixture_weights, inv_temperature = _check_inputs(draft_logits, target_logits, weights, temperature,
                                                                    empty_vocabulary=True)
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "draft_divergence_sharded needs torch.distributed initialised "
            "(torch.distributed.init_process_group); use draft_divergence for an unsharded vocabulary"
        )
    has_target = target is not None
    _check_ranks_agree(draft, target, mixture_weights, inv_temperature, group)
    num_drafts, num_tokens, vocab = draft.shape
    # 1. this shard's lse of every row in two parts (pass 1 only; an empty shard's: M = ln S = -inf)
    if vocab > 0:
        _, shard_parts = _draft_divergence_op(draft, target, mixture_weights, inv_temperature, lse_only=True)
    else:
        shard_parts = torch.full((2, num_drafts + 1, num_tokens), float("-inf"), dtype=torch.float64,
                                 device=draft.device)
    # 2. the whole vocabulary's lse (its parts), the same on every rank, so every rank raises together
    parts = _global_lse(shard_parts, inv_temperature, group)
    lse = parts[0] * inv_temperature + parts[1]
    # 3. this shard's shares of every sum (pass 2 only; an empty shard's are 0), 4. added over the ranks
    if vocab > 0:
        shares, _ = _draft_divergence_op(draft, target, mixture_weights, inv_temperature, lse_in=parts)
    else:
        shares = torch.zeros((NUM_FIXED_ROWS + num_drafts, num_tokens), dtype=output_dtype(draft, target),
                             device=draft.device)
    dist.all_reduce(shares, op=dist.ReduceOp.SUM, group=group)
    if has_target:  # (KL >= 0 over the whole vocabulary: rounding clamped as the unsharded kernels do)
        shares[KL_MIXTURE_TARGET].clamp_(min=0)  # (keeps NaN)
        shares[EPISTEMIC] = shares[JSD] + shares[KL_MIXTURE_TARGET]  # = sum_k w_k KL(q_k || p)
    return _result(_check_lse(shares, lse, has_target, mixture_weights), has_target)
