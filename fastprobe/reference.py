"""The specification in plain PyTorch (SPEC.md in the design notes).

Each function here computes exactly what the fused kernels compute, readably,
in the precision of its input (float64 when given float64; lower-precision
inputs are computed in float32). Tests compare every fast path against these
functions run in float64, and they are the fallback on devices with no fast path.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["draft_divergence", "entropy", "kl"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _xlogy(x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x * log_y with the convention 0 * log 0 = 0 (also when log_y is -inf)."""
    return torch.where(x > 0, x * log_y, torch.zeros_like(x))


def entropy(log_p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """H(p) = -sum p log p from log-probabilities, with 0 log 0 = 0."""
    return -_xlogy(log_p.exp(), log_p).sum(dim)


def kl(log_a: torch.Tensor, log_b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """KL(a || b) = sum a (log a - log b) from log-probabilities, with 0 log 0 = 0."""
    return _xlogy(log_a.exp(), log_a - log_b).sum(dim)


def draft_divergence(
    draft_logits: torch.Tensor,
    target_logits: Optional[torch.Tensor] = None,
    *,
    weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> dict:
    """Draft-model uncertainty per token (SPEC section 1).

    q_k = softmax(draft_logits[k] / T), p = softmax(target_logits / T),
    m = sum_k w_k q_k. Returns a dict with
      jsd               [N]     H(m) - sum_k w_k H(q_k)
      kl_mixture_target [N]     KL(m || p)                 (None without a target)
      epistemic         [N]     jsd + KL(m || p) = sum_k w_k KL(q_k || p)
      mixture_entropy   [N]     H(m)
      draft_entropy     [K, N]  H(q_k)
      target_entropy    [N]     H(p)                       (None without a target)
    """
    dtype = _compute_dtype(draft_logits)
    num_drafts = draft_logits.shape[0]
    if weights is None:
        w = torch.full((num_drafts,), 1.0 / num_drafts, dtype=dtype, device=draft_logits.device)
    else:
        w = weights.to(dtype)
    log_q = torch.log_softmax(draft_logits.to(dtype) / temperature, dim=-1)  # [K, N, V]
    q = log_q.exp()
    m = torch.einsum("k,knv->nv", w, q)  # mixture [N, V]
    log_m = torch.where(m > 0, m.log(), torch.full_like(m, float("-inf")))
    draft_entropy = entropy(log_q)  # [K, N]
    mixture_entropy = entropy(log_m)  # [N]
    # JSD = sum_k w_k KL(q_k || m): every term is >= 0, so no cancellation.
    jsd = torch.einsum("k,kn->n", w, kl(log_q, log_m.unsqueeze(0)))
    out = {
        "jsd": jsd,
        "kl_mixture_target": None,
        "epistemic": None,
        "mixture_entropy": mixture_entropy,
        "draft_entropy": draft_entropy,
        "target_entropy": None,
    }
    if target_logits is not None:
        log_p = torch.log_softmax(target_logits.to(dtype) / temperature, dim=-1)
        kl_mt = kl(log_m, log_p)
        out["kl_mixture_target"] = kl_mt
        out["epistemic"] = jsd + kl_mt
        out["target_entropy"] = entropy(log_p)
    return out
