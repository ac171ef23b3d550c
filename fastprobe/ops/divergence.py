"""draft_divergence: token-level epistemic uncertainty from K draft models.

q_k = softmax(draft_logits[k] / T), p = softmax(target_logits / T), m = sum_k w_k q_k.
  jsd               = H(m) - sum_k w_k H(q_k)  = sum_k w_k KL(q_k || m)    (variance term)
  kl_mixture_target = KL(m || p)                                            (bias term)
  epistemic         = jsd + KL(m || p)          = sum_k w_k KL(q_k || p)
The fused kernels stream the vocabulary twice per token (each row's log-sum-exp,
then the mixture terms) and never materialise a [K, N, V] or [N, V] probability tensor.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional, Sequence, Union

import torch

from .. import reference
from ..backend import resolve
from ._common import (
    DTYPE_NAMES,
    check_finite_lse,
    check_same_device,
    check_temperature,
    check_tensor,
    cpp,
    is_compiling,
    new_output,
    output_dtype,
)

__all__ = ["DraftDivergence", "draft_divergence"]

# Rows of the packed statistics tensor every backend fills: [NUM_FIXED_ROWS + K, N].
JSD, KL_MIXTURE_TARGET, EPISTEMIC, MIXTURE_ENTROPY, TARGET_ENTROPY = range(5)
NUM_FIXED_ROWS = 5


class DraftDivergence(NamedTuple):
    """Per-token results of draft_divergence (float32; float64 for float64 input).
    Fields that need a target are None without one."""

    jsd: torch.Tensor  # [N]
    kl_mixture_target: Optional[torch.Tensor]  # [N]
    epistemic: Optional[torch.Tensor]  # [N]
    mixture_entropy: torch.Tensor  # [N]
    draft_entropy: torch.Tensor  # [K, N]
    target_entropy: Optional[torch.Tensor]  # [N]


def _reference_packed(draft, target, weights, inv_temperature, stats, lse) -> None:
    """The reference, written into the packed layout the kernels use."""
    result = reference.draft_divergence(draft, target, weights=weights, temperature=1.0 / inv_temperature)
    scaled = draft.to(stats.dtype) * inv_temperature
    lse[: draft.shape[0]] = torch.logsumexp(scaled, dim=-1)
    stats[JSD] = result["jsd"]
    stats[MIXTURE_ENTROPY] = result["mixture_entropy"]
    stats[NUM_FIXED_ROWS:] = result["draft_entropy"]
    if target is None:
        stats[[KL_MIXTURE_TARGET, EPISTEMIC, TARGET_ENTROPY]] = 0.0
        lse[-1] = 0.0
    else:
        stats[KL_MIXTURE_TARGET] = result["kl_mixture_target"]
        stats[EPISTEMIC] = result["epistemic"]
        stats[TARGET_ENTROPY] = result["target_entropy"]
        lse[-1] = torch.logsumexp(target.to(stats.dtype) * inv_temperature, dim=-1)


def _cpp_packed(draft, target, weights, inv_temperature, stats, lse) -> None:
    num_drafts, num_tokens, vocab = draft.shape
    cpp().draft_divergence(
        DTYPE_NAMES[draft.dtype],
        draft.data_ptr(), num_drafts, num_tokens, vocab, *draft.stride(),
        0 if target is None else target.data_ptr(),
        *((0, 0) if target is None else target.stride()),
        weights.data_ptr(),
        inv_temperature,
        stats.data_ptr(),
        lse.data_ptr(),
        torch.get_num_threads(),
    )


def _triton_packed(draft, target, weights, inv_temperature, stats, lse) -> None:
    from ..kernels import divergence as triton_divergence

    with torch.cuda.device(draft.device) if draft.is_cuda else contextlib.nullcontext():
        triton_divergence.draft_divergence(draft, target, weights, inv_temperature, stats, lse)


_PACKED = {"reference": _reference_packed, "cpp": _cpp_packed, "triton": _triton_packed}


@torch.library.custom_op("fastprobe::draft_divergence", mutates_args=())
def _draft_divergence_op(
    draft: torch.Tensor, target: Optional[torch.Tensor], weights: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed form: stats [5 + K, N] (rows JSD, KL_MIXTURE_TARGET, EPISTEMIC,
    MIXTURE_ENTROPY, TARGET_ENTROPY, then H(q_k)) and lse [K + 1, N] (row K: target)."""
    num_drafts, num_tokens, _ = draft.shape
    dtype = output_dtype(draft)
    stats = new_output((NUM_FIXED_ROWS + num_drafts, num_tokens), draft.device, dtype)
    lse = new_output((num_drafts + 1, num_tokens), draft.device, dtype)
    if num_tokens > 0:
        backend = resolve(draft.device, draft.dtype, "draft_divergence")
        _PACKED[backend](draft, target, weights, inv_temperature, stats, lse)
    return stats, lse


@_draft_divergence_op.register_fake
def _(draft, target, weights, inv_temperature):
    num_drafts, num_tokens, _ = draft.shape
    dtype = output_dtype(draft)
    stats = draft.new_empty((NUM_FIXED_ROWS + num_drafts, num_tokens), dtype=dtype)
    lse = draft.new_empty((num_drafts + 1, num_tokens), dtype=dtype)
    return stats, lse


def _check_weights(weights, num_drafts: int, draft: torch.Tensor) -> torch.Tensor:
    dtype = output_dtype(draft)
    if weights is None:
        return torch.full((num_drafts,), 1.0 / num_drafts, dtype=dtype, device=draft.device)
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights, dtype=dtype, device=draft.device)
    elif not weights.is_floating_point():
        raise TypeError(f"weights must be a floating-point tensor of shape [K], got {weights.dtype}")
    else:
        check_same_device(draft, "draft_logits", weights, "weights")
    if tuple(weights.shape) != (num_drafts,):
        raise ValueError(f"weights must have shape [K] = [{num_drafts}] (one per draft), got {tuple(weights.shape)}")
    weights = weights.to(dtype).contiguous()
    if not is_compiling():
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"weights must be finite and non-negative, got {weights.tolist()}")
        total = float(weights.sum())
        if abs(total - 1.0) > 1e-4:
            raise ValueError(f"weights must sum to 1, got sum {total:.6g}")
    return weights


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
        target_logits: optional [N, V] logits of the target model, same dtype.
        weights: optional [K] non-negative mixture weights summing to 1 (default uniform).
        temperature: divides every logit.

    Returns:
        DraftDivergence(jsd, kl_mixture_target, epistemic, mixture_entropy,
        draft_entropy, target_entropy), float32 (float64 for float64 input);
        target fields are None without target_logits.

    Raises ValueError or TypeError naming the argument for bad shapes, dtypes,
    devices or weights before any kernel runs, and ValueError after the kernel for
    a row whose logits are all -inf or not finite (the kernel reports each row's
    log-sum-exp, so this check needs no extra pass over the logits; it is skipped
    under torch.compile, where such a row gives NaN).
    """
    draft = check_tensor(draft_logits, "draft_logits", 3, "[K, N, V]")
    num_drafts, num_tokens, vocab = draft.shape
    if num_drafts == 0:
        raise ValueError("draft_logits has K = 0 drafts: need at least one draft model")
    if vocab == 0:
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
        if target.dtype != draft.dtype:
            raise TypeError(f"target_logits dtype {target.dtype} must match draft_logits dtype {draft.dtype}")
    inv_temperature = 1.0 / check_temperature(temperature)
    mixture_weights = _check_weights(weights, num_drafts, draft)

    stats, lse = _draft_divergence_op(draft, target, mixture_weights, inv_temperature)
    if not is_compiling() and num_tokens > 0:
        # lse rows: the K drafts, then the target's (meaningful only with a target)
        check_finite_lse(
            lse if target is not None else lse[:-1],
            lambda row, token: f"target_logits[{token}]" if row == num_drafts else f"draft_logits[{row}][{token}]",
        )

    has_target = target is not None
    return DraftDivergence(
        jsd=stats[JSD],
        kl_mixture_target=stats[KL_MIXTURE_TARGET] if has_target else None,
        epistemic=stats[EPISTEMIC] if has_target else None,
        mixture_entropy=stats[MIXTURE_ENTROPY],
        draft_entropy=stats[NUM_FIXED_ROWS:],
        target_entropy=stats[TARGET_ENTROPY] if has_target else None,
    )
