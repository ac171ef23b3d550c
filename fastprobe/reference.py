"""The specification in plain PyTorch (SPEC.md in the design notes).

Each function here computes exactly what the fused kernels compute, readably,
in the precision of its input (float64 when given float64; lower-precision
inputs are computed in float32). Tests compare every fast path against these
functions run in float64, and they are the fallback on devices with no fast path.
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops._common import first_bad_index, skips_host_checks

__all__ = ["dual_path_attention", "dual_path_from_masks", "guidance_rows", "attention_from_masks", "attention_key_masks", "attention_visible", "block_pairs", "key_range_pairs", "segment_pairs", "sink_attention", "bridge_logits", "bridge_loss", "bridge_rows", "reduce_rows", "concept_mass", "draft_divergence", "draft_divergence_shares", "entropy", "kl"]


def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 when any input is float64 (inputs may mix dtypes), else float32."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in tensors) else torch.float32


def _xlogy(x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """x * log_y with the convention 0 * log 0 = 0 (also when log_y is -inf or NaN there); a NaN
    x stays NaN (NaN input must not read as an empty entry). log_y is masked before the product,
    so its gradient is 0 (not NaN) where x = 0."""
    zero = x == 0
    return torch.where(zero, torch.zeros_like(x), x * torch.where(zero, torch.zeros_like(log_y), log_y))


def _softmax_entropy(logits: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) over the last dim as log l + sum_j p_j (m - x_j), e_j = exp(x_j - m),
    l = sum_j e_j: two terms >= 0, log l = log1p of the e of all but one maximum. -sum p log p
    takes log p_max = -log l from l = 1 + 1e-16, which float64 rounds: an entropy below ~1e-13
    (one key or sink logit far above the rest) lost percents. Empty rows (`empty`): 0; a NaN or
    +inf logit: NaN."""
    top, at = logits.max(dim=-1, keepdim=True)
    centred = logits - top.masked_fill(empty[..., None], 0.0)
    e = centred.exp()
    rest = e.scatter(-1, at, 0.0).sum(-1)  # the e of every key but one maximum (e = 1)
    total = 1.0 + rest
    spread = torch.where(e > 0, e * -centred, torch.zeros_like(e)).sum(-1)  # sum e (m - x) >= 0
    h = torch.log1p(rest) + spread / total
    h = h.masked_fill(top.squeeze(-1) == float("inf"), float("nan"))  # (inf - inf: e NaN, then scattered out)
    return h.masked_fill(empty, 0.0)


def entropy(log_p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """H(p) = -sum p log p from log-probabilities, with 0 log 0 = 0."""
    return -_xlogy(log_p.exp(), log_p).sum(dim)


def kl(log_a: torch.Tensor, log_b: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """KL(a || b) = sum a (log a - log b) from log-probabilities, with 0 log 0 = 0. It is +inf
    when a has an entry (log a finite) that b masks (log b = -inf), however small a is there:
    the supports decide, not whether a's probability underflows."""
    outside = (log_a > float("-inf")) & torch.isneginf(log_b)
    # no inf inside the graph: a row dropped later (an ignored label) gets gradient 0, not NaN
    sums = _xlogy(log_a.exp(), torch.where(outside, torch.zeros_like(log_a), log_a - log_b)).sum(dim)
    return sums.masked_fill(outside.any(dim), float("inf"))


def _divergence_sums(log_q: torch.Tensor, w: torch.Tensor, log_p: Optional[torch.Tensor]) -> dict:
    """Every statistic of SPEC section 1 as a sum over the last (vocabulary) dimension,
    from the drafts' log-probabilities log_q [K, N, V], the weights w [K] and the target's
    log_p [N, V] or None. Summed over the whole vocabulary these are the statistics; over a
    shard of it (log-probabilities formed with the global lse), that shard's shares of them."""
    # log m = log sum_k w_k q_k (mixture [N, V]) in log space: finite wherever some w_k q_k > 0,
    # even when w_k q_k underflows (log q ~ -745 in float64), which would leave q log(q / 0) = inf
    log_m = torch.logsumexp(w.log()[:, None, None] + log_q, dim=0)
    # JSD = sum_k w_k KL(q_k || m): every term is >= 0, so no cancellation. A draft of weight 0
    # is not in the mixture and adds nothing (its KL to m may be +inf).
    draft_kl = kl(log_q, log_m.unsqueeze(0)).masked_fill((w == 0)[:, None], 0.0)
    jsd = torch.einsum("k,kn->n", w, draft_kl)
    out = {
        "jsd": jsd,
        "kl_mixture_target": None,
        "epistemic": None,
        "mixture_entropy": entropy(log_m),  # [N]
        "draft_entropy": entropy(log_q),  # [K, N]
        "target_entropy": None,
    }
    if log_p is not None:
        kl_mt = kl(log_m, log_p)
        out["kl_mixture_target"] = kl_mt
        out["epistemic"] = jsd + kl_mt
        out["target_entropy"] = entropy(log_p)
    return out


def _mixture_weights(weights: Optional[torch.Tensor], num_drafts: int, dtype, device) -> torch.Tensor:
    """w [K], uniform when None; given weights (which sum to 1 up to their rounding) rescaled to
    sum to 1 in `dtype`, so that m is a distribution: the plain sums below would otherwise carry
    sum_v (q - m) terms that put W (1 - W) on the JSD, W = sum w (-3e-8 for three float32 thirds,
    against the JSD of 3e-9 of drafts 1e-4 apart in logits)."""
    if weights is None:
        return torch.full((num_drafts,), 1.0 / num_drafts, dtype=dtype, device=device)
    weights = weights.to(dtype)
    return weights / weights.sum()


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
    dtype = _compute_dtype(draft_logits, target_logits)
    w = _mixture_weights(weights, draft_logits.shape[0], dtype, draft_logits.device)
    log_q = torch.log_softmax(draft_logits.to(dtype) / temperature, dim=-1)  # [K, N, V]
    log_p = None if target_logits is None else torch.log_softmax(target_logits.to(dtype) / temperature, dim=-1)
    sums = _divergence_sums(log_q, w, log_p)
    # the divergences are >= 0; their sums of terms of either sign may round below (-2e-7 in
    # float32 for a target equal to the drafts): clamped, as the kernels do (NaN stays NaN)
    for name in ("jsd", "kl_mixture_target", "epistemic"):
        if sums[name] is not None:
            sums[name] = sums[name].clamp_min(0.0)
    return sums


def draft_divergence_shares(
    draft_logits: torch.Tensor,
    target_logits: Optional[torch.Tensor] = None,
    *,
    lse: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> dict:
    """One vocabulary shard's shares of draft_divergence's sums (the tensor-parallel form).

    draft_logits [K, N, V_shard] and target_logits [N, V_shard] are a slice of the
    vocabulary; lse [K + 1, N] holds every row's log-sum-exp of logits / T over the WHOLE
    vocabulary (row K: the target's), or [2, K + 1, N] its two parts (M, ln S), lse = M / T + ln S
    with M the row's largest logit (a float64 lse holds ln S only to |M / T| 2^-53: at T = 1e-30
    two tied maxima lose their ln 2 in it). Then log q_kv = x_kv / T - lse_k is exact per element,
    and the returned fields (same keys as draft_divergence) are sums over this shard only:
    adding them over all shards gives draft_divergence of the whole vocabulary. (The kernels'
    shares differ: each KL(a || b) term there carries b_v - a_v more, which adds up to 0 over the
    vocabulary and makes every term >= 0.)
    """
    dtype = _compute_dtype(draft_logits, target_logits)
    num_drafts = draft_logits.shape[0]
    w = _mixture_weights(weights, num_drafts, dtype, draft_logits.device)
    lse = lse.to(torch.float64)
    # log prob = (x - shift) / T - offset: shift = M, offset = ln S from the parts, else shift =
    # lse T, offset = 0
    shift, offset = (lse[0], lse[1]) if lse.dim() == 3 else (lse * temperature, torch.zeros_like(lse))

    def log_softmax_given_lse(logits: torch.Tensor, rows) -> torch.Tensor:
        # in float64: x - shift is exact near the row max, so large logits (~1e4) keep full precision
        return ((logits.double() - shift[rows].unsqueeze(-1)) / temperature - offset[rows].unsqueeze(-1)).to(dtype)

    log_q = log_softmax_given_lse(draft_logits, slice(0, num_drafts))
    log_p = None if target_logits is None else log_softmax_given_lse(target_logits, num_drafts)
    return _divergence_sums(log_q, w, log_p)


def concept_mass(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    offsets: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> dict:
    """Probability mass of concepts, each a set of variant token ids (SPEC section 2).

    Concept c owns token_ids[offsets[c]:offsets[c + 1]] (no empty concept). With
    y = logits / T, p = softmax(y) and the concept's own log-sum-exp
    lse_c = log sum_{v in c} exp(y_v), returns a dict of
      mass                  [N, C]  sum_{v in c} p_v
      log_mass              [N, C]  lse_c - lse(y)                       (differentiable)
      top_share             [N, C]  max_{v in c} p_v / mass
      concentration_entropy [N, C]  entropy of q_v = p_v / mass = exp(y_v - lse_c), v in c
      top_token             [N, C]  the variant id with the largest p_v (first in
                                    concept order on ties), int64
      lse                   [N]     lse(y), natural log
    A concept whose variants are all -inf has mass 0, log_mass -inf, top_share 0,
    concentration_entropy 0 and top_token its first variant.
    """
    dtype = _compute_dtype(logits)
    num_tokens, num_concepts = logits.shape[0], offsets.numel() - 1
    token_ids, offsets = token_ids.to(logits.device, torch.int64), offsets.to(logits.device, torch.int64)
    concept_of = torch.repeat_interleave(torch.arange(num_concepts, device=logits.device), offsets.diff())  # [T]
    y = logits.to(dtype) / temperature
    # lse = M + log S, S = sum exp(y - M), M the row's largest y (0 if all -inf)
    row_max = y.detach().amax(dim=-1)
    row_shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    log_total = torch.log(torch.exp(y - row_shift[:, None]).sum(dim=-1))  # [N] log S
    lse = row_shift + log_total
    y_c = y[:, token_ids]  # [N, T] the variants' scaled logits

    def segment(reduce: str, values: torch.Tensor, initial: float) -> torch.Tensor:  # [N, T] -> [N, C]
        out = torch.full((num_tokens, num_concepts), initial, dtype=values.dtype, device=values.device)
        index = concept_of.expand(num_tokens, -1)
        return out.scatter_reduce(1, index, values, reduce, include_self=reduce != "sum")

    # lse_c = m_c + log sum_{v in c} exp(y_v - m_c), m_c the concept's largest y (0 if all -inf)
    top = segment("amax", y_c.detach(), float("-inf"))  # [N, C]
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(y_c - shift[:, concept_of])  # [N, T]
    s = segment("sum", e, 0.0)  # [N, C]
    # an all -inf concept: log_mass = -inf with gradient 0 (not NaN), top_share 0, entropy 0
    has_mass = s > 0
    log_s = torch.log(torch.where(has_mass, s, torch.ones_like(s)))
    # log_mass = lse_c - lse = (m_c - M) + log s - log S: the shifts subtracted first, so logits
    # of 1e17 (or T = 1e-30) keep log s and log S, which m_c + log s would round away
    log_mass = torch.where(has_mass, (shift - row_shift[:, None]) + log_s - log_total[:, None],
                           torch.full_like(s, float("-inf")))
    # q_v = p_v / mass within the concept: log q_v = (y_v - m_c) - log s; the top variant's is -log s
    log_q = (y_c - shift[:, concept_of]) - log_s[:, concept_of]
    top_share = torch.where(has_mass, 1.0 / torch.where(has_mass, s, torch.ones_like(s)), torch.zeros_like(s))
    concentration_entropy = segment("sum", -_xlogy(log_q.exp(), log_q), 0.0)
    # top token: the first variant (in concept order) whose logit equals the concept's max
    # (for an all -inf concept that is its first variant; a NaN row falls back to it too)
    position = torch.arange(token_ids.numel(), device=logits.device).expand(num_tokens, -1)
    is_top = y_c == top[:, concept_of]
    first = segment("amin", torch.where(is_top, position, token_ids.numel()), token_ids.numel())
    first = torch.where(first < token_ids.numel(), first, offsets[:-1].expand(num_tokens, -1))
    return {
        "mass": log_mass.exp(),
        "log_mass": log_mass,
        "top_share": top_share.detach(),
        "concentration_entropy": concentration_entropy.detach(),
        "top_token": token_ids[first],
        "lse": lse,
    }


def bridge_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """z_T + beta z_S, the bridge target's logits. For beta != 0 a masked student entry (-inf)
    stays masked (beta < 0 would give +inf there). beta = 0 gives z_T itself (0 * -inf would be
    NaN): Q = P_T, ordinary distillation, so a token the student masks and the teacher does not
    makes the forward loss +inf."""
    if beta == 0:
        return teacher_logits
    bridge = teacher_logits + beta * student_logits
    return torch.where(torch.isneginf(student_logits), float("-inf"), bridge)


def bridge_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    direction: str = "forward",
) -> torch.Tensor:
    """Per-row logit-bridge loss [N] (SPEC section 3), differentiable w.r.t. student_logits.

    P_S = softmax(z_S / T) and the bridge target Q = softmax((z_T + beta stopgrad(z_S)) / T),
    i.e. Q proportional to P_T P_S^beta; "forward": KL(Q || P_S), "reverse": KL(P_S || Q).
    beta = 0 is ordinary forward-KL distillation. Q is a constant for the gradient. A masked
    student entry (-inf) is masked in Q too for beta != 0; beta = 0 keeps Q = P_T exactly
    (bridge_logits). A row where P_S or Q does not exist (its logits are all -inf) has loss NaN;
    a row whose loss is +inf has gradient 0.
    """
    dtype = _compute_dtype(student_logits, teacher_logits)
    z_s, z_t = student_logits.to(dtype), teacher_logits.to(dtype)
    bridge = bridge_logits(z_s.detach(), z_t, beta)
    log_p = torch.log_softmax(z_s / temperature, dim=-1)
    log_q = torch.log_softmax(bridge / temperature, dim=-1)
    rows = kl(log_q, log_p) if direction == "forward" else kl(log_p, log_q)
    undefined = torch.isneginf(z_s).all(-1) | torch.isneginf(bridge).all(-1)
    return torch.where(undefined, torch.full_like(rows, float("nan")), rows)


def bridge_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    direction: str = "forward",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """bridge_rows with ignored rows (labels == ignore_index: loss 0, gradient 0) and a
    reduction: "mean" over the kept rows (0 when none is kept), "sum", or "none" ([N])."""
    keep = None if labels is None else labels != ignore_index
    if keep is not None:  # ignored rows take no part, whatever their logits: loss 0, gradient 0
        student_logits = torch.where(keep.unsqueeze(-1), student_logits, torch.zeros_like(student_logits))
        teacher_logits = torch.where(keep.unsqueeze(-1), teacher_logits, torch.zeros_like(teacher_logits))
    rows = bridge_rows(student_logits, teacher_logits, beta=beta, temperature=temperature, direction=direction)
    if keep is not None:
        rows = torch.where(keep, rows, torch.zeros_like(rows))
    return reduce_rows(rows, keep, reduction)


def reduce_rows(rows: torch.Tensor, keep: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """Per-row losses (0 on ignored rows) -> "none": rows, "sum", or "mean" over the kept
    rows (keep: bool, or None for all), 0 when none is kept; no host synchronisation."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if keep is None:  # (a Python count: torch 2.4's vmap cannot make a tensor like a batched one)
        return rows.sum() / max(rows.numel(), 1)
    return rows.sum() / keep.sum().clamp(min=1).to(rows.dtype)


def attention_key_masks(
    key_padding_mask: Optional[torch.Tensor], batch: int, num_keys: int, num_sink: int, stat_tokens: int, device,
    segment_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(real [B, Lk], sink [B, Lk], stat [B, Lk]) booleans: real = not padding; sink = one of
    the first num_sink real keys of the row (visible window or not); stat = one of the first
    stat_tokens real keys (whose attention weight is sink_mass). Counting real keys makes
    "the first token" of a left-padded row its first real token. With segment_ids the count
    starts afresh in every segment: each segment is a sequence of its own."""
    if key_padding_mask is None:
        real = torch.ones(batch, num_keys, dtype=torch.bool, device=device)
    else:
        real = key_padding_mask.to(device=device, dtype=torch.bool)
    if segment_ids is None:
        rank = real.long().cumsum(-1)  # 1-based index of each real key among the row's real keys
    else:  # among the real keys of its segment
        index = torch.arange(num_keys, device=device)
        earlier = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (index[None, :] <= index[:, None])[None]
        rank = (earlier & real[:, None, :]).sum(-1)
    return real, real & (rank <= num_sink), real & (rank <= stat_tokens)


def attention_visible(
    real: torch.Tensor, sink: torch.Tensor, num_queries: int, causal: bool, window: Optional[int],
    unordered: Optional[torch.Tensor] = None, same_segment: Optional[torch.Tensor] = None,
    key_range: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """visible [B, Lq, Lk]: which keys each query sees. Query i sits at position
    p = Lk - Lq + i (queries are the last Lq positions). Causal: j <= p, or the pair is in
    `unordered` ([B, Lq, Lk] bool: pairs that see each other whatever the order, e.g. one
    bidirectional block's tokens). Window w: causal p - w < j, bidirectional |p - j| < w; sink
    keys (sink [B, Lk], or [B, Lq, Lk] per query) are visible outside the window (but never in a
    causal query's future). Padding keys are never visible, nor (with `same_segment`, [B, Lq, Lk]
    bool) keys of another segment, sink keys included. key_range ([B, Lq, Lk] bool, from
    key_range_pairs) replaces the order rule (causal and `unordered`) with the kernels' key bounds."""
    num_keys = real.shape[-1]
    position = torch.arange(num_keys - num_queries, num_keys, device=real.device)[:, None]
    key = torch.arange(num_keys, device=real.device)[None, :]
    if key_range is not None:
        in_order = key_range
    else:
        in_order = (key <= position)[None] if causal else torch.ones_like(key <= position)[None]
        if causal and unordered is not None:
            in_order = in_order | unordered
    in_window = torch.ones_like(key <= position)
    if window is not None:
        in_window = key > position - window if causal else (key - position).abs() < window
    visible = real[:, None, :] & in_order & (in_window[None] | _per_query(sink))
    return visible if same_segment is None else visible & same_segment


def _per_query(keys: torch.Tensor) -> torch.Tensor:
    """A key mask [B, Lk] (the same for every query) or [B, Lq, Lk] (per query) as [B, Lq or 1, Lk]."""
    return keys[:, None, :] if keys.dim() == 2 else keys


def key_range_pairs(start: Optional[torch.Tensor], horizon: Optional[torch.Tensor], num_queries: int,
                    causal: bool) -> Optional[torch.Tensor]:
    """[B, Lq, Lk] bool: the keys inside the kernels' per-position key bounds (start, horizon:
    int64 [B, Lk] or None, any values; None when both are), which the kernels clamp around the
    query's position p:
      lo_p = clamp(start[b, p], 0, p)  (0 without a start)
      hi_p = clamp(horizon[b, p], p, Lk - 1)  (without a horizon: p causal, Lk - 1 otherwise)
    and the query at p sees keys lo_p <= j <= hi_p (p itself always)."""
    bounds = start if start is not None else horizon
    if bounds is None:
        return None
    num_keys, device = bounds.shape[1], bounds.device
    position = torch.arange(num_keys - num_queries, num_keys, device=device)  # [Lq]
    key = torch.arange(num_keys, device=device)[None, None, :]
    lo = (torch.zeros_like(position)[None] if start is None
          else torch.minimum(start[:, position].clamp(min=0), position))  # [B or 1, Lq]
    if horizon is None:
        hi = (position if causal else torch.full_like(position, num_keys - 1))[None]
    else:
        hi = torch.maximum(horizon[:, position], position).clamp(max=num_keys - 1)
    return (lo[..., None] <= key) & (key <= hi[..., None])


def segment_pairs(segments: Optional[torch.Tensor], num_queries: int) -> Optional[torch.Tensor]:
    """[B, Lq, Lk] bool: the (query, key) pairs in one segment (segments [B, Lk]: equal ids;
    packed sequences, chunked attention), or None without segments."""
    if segments is None:
        return None
    return segments[:, segments.shape[1] - num_queries:, None] == segments[:, None, :]


def block_pairs(blocks: Optional[torch.Tensor], num_queries: int) -> Optional[torch.Tensor]:
    """[B, Lq, Lk] bool: the (query, key) pairs of one bidirectional block (blocks [B, Lk]: the
    same id >= 0; negative: no block), or None without blocks."""
    if blocks is None:
        return None
    query_blocks = blocks[:, blocks.shape[1] - num_queries:]
    return (query_blocks[:, :, None] == blocks[:, None, :]) & (query_blocks >= 0)[:, :, None]


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    window: Optional[int] = None,
    num_sink: int = 0,
    key_padding_mask: Optional[torch.Tensor] = None,
    head_mask: Optional[torch.Tensor] = None,
    sink_logit: Optional[torch.Tensor] = None,
    key_groups: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    stat_tokens: int = 1,
    softcap: Optional[float] = None,
    bidirectional_blocks: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> dict:
    """SPEC section 4 by materialising the [B, Hq, Lq, Lk] attention weights.

    bidirectional_blocks [B, Lk] (ids; negative: none): with causal, positions of one block id
    also see each other's later positions (Gemma 3's image tokens, PaliGemma's prefix); the
    window and padding still apply. segment_ids [B, Lk]: a query sees only keys with its own
    segment id (packed sequences, Llama 4's chunks), and each segment is a sequence of its own:
    its sink and statistics keys are its first real keys.

    s_ij = scale q_i . k_j on visible keys (-inf elsewhere), or with a soft cap c (Gemma 2)
    s_ij = c tanh(scale q_i . k_j / c); with a sink logit c_h the
    softmax has one more, value-less entry: p_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(c_h)).
      out       = sum_j p_ij v_j                   lse = log(sum_j exp(s_ij) + exp(c_h))
      sink_mass = sum_{j in stat keys} p_ij        group_mass[g] = sum_{j: group_j = g} p_ij
    (stat keys: the row's first stat_tokens real keys, visible to the query or not: a query whose
    window hides them, with no sink keys, has sink_mass 0.)
      entropy   = -sum_j p_ij log p_ij - p_sink log p_sink   (p_sink = exp(c_h - lse))
    A row with nothing in the softmax (no visible key, no sink) and a pruned head
    (head_mask False) give out 0, lse -inf, masses 0, entropy 0. K and V heads are shared by
    Hq / Hkv consecutive query heads (grouped-query attention).
    Returns a dict of out [B, Hq, Lq, D] and lse, sink_mass, entropy [B, Hq, Lq], plus
    group_mass [B, Hq, Lq, G] with key_groups."""
    batch, num_keys = q.shape[0], k.shape[2]
    real, sink, stat = attention_key_masks(key_padding_mask, batch, num_keys, num_sink, stat_tokens, q.device, segment_ids)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return attention_from_masks(
        q, k, v, real, sink, stat, scale=scale, causal=causal, window=window, head_mask=head_mask,
        sink_logit=sink_logit, key_groups=key_groups, num_groups=num_groups, softcap=softcap,
        unordered=block_pairs(bidirectional_blocks, q.shape[2]), same_segment=segment_pairs(segment_ids, q.shape[2]),
    )


def _check_group_ids(key_groups: torch.Tensor, num_groups: int) -> None:
    """An IndexError naming the first id outside [0, num_groups) (as the C++ kernel's; one host
    sync, skipped where the ids cannot be read)."""
    if skips_host_checks(key_groups):
        return
    bad = first_bad_index((key_groups < 0) | (key_groups >= num_groups))
    if bad is not None:
        raise IndexError(f"key_groups{list(bad)} = {key_groups[bad].item()} is outside [0, num_groups = {num_groups})")


def attention_from_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    real: torch.Tensor,
    sink: torch.Tensor,
    stat: torch.Tensor,
    *,
    scale: float,
    causal: bool,
    window: Optional[int],
    head_mask: Optional[torch.Tensor],
    sink_logit: Optional[torch.Tensor],
    key_groups: Optional[torch.Tensor],
    num_groups: Optional[int],
    softcap: Optional[float] = None,
    unordered: Optional[torch.Tensor] = None,
    same_segment: Optional[torch.Tensor] = None,
    key_range: Optional[torch.Tensor] = None,
) -> dict:
    """sink_attention given the key masks of attention_key_masks (real, sink, stat [B, Lk]; sink and
    stat may be [B, Lq, Lk], per query), the pairs that see each other whatever the causal order,
    the pairs of one segment and the key range (see attention_visible)."""
    if key_groups is not None:
        _check_group_ids(key_groups, num_groups)
    dtype = _compute_dtype(q)
    batch, num_heads, num_queries, _ = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    keys = k.to(dtype).repeat_interleave(group, dim=1)
    values = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(dtype), keys) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    visible = attention_visible(real, sink, num_queries, causal, window, unordered, same_segment, key_range)
    visible = visible[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    if sink_logit is not None:  # the sink as one more column, dropped after the softmax
        extra = sink_logit.to(dtype).view(1, num_heads, 1, 1).expand(batch, num_heads, num_queries, 1)
    else:
        extra = torch.full((batch, num_heads, num_queries, 1), float("-inf"), dtype=dtype, device=q.device)
    logits = torch.cat([scores, extra], dim=-1)
    # a +inf sink logit leaves no finite weight: NaN, as for NaN (logsumexp alone would give +inf)
    lse = torch.logsumexp(logits, dim=-1).masked_fill(extra[..., 0] == float("inf"), float("nan"))
    empty = lse == float("-inf")
    # log p = (x - max) - log sum exp(x - max), not x - lse: near float max, lse rounds to the max
    # itself and every tied maximum would get p = 1 (an empty row: 0 in, -inf out)
    log_p = torch.log_softmax(logits.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty[..., None], float("-inf"))
    p_all = log_p.exp()
    weights = p_all[..., :-1]
    result = {
        "out": weights @ values,
        "lse": lse,
        "sink_mass": (weights * _per_query(stat)[:, None]).sum(-1),
        "entropy": _softmax_entropy(logits, empty),
    }
    if key_groups is not None:
        # [B, Lk, G]: key j in group g iff key_groups[b, j] = g (an id outside [0, G) is refused
        # above, or, where it cannot be read, counted in no group)
        one_hot = (key_groups[..., None] == torch.arange(num_groups, device=q.device)).to(dtype)
        result["group_mass"] = weights @ one_hot[:, None]
    if head_mask is not None:
        pruned = ~head_mask.to(device=q.device, dtype=torch.bool).view(1, num_heads, 1)
        for name, value in result.items():
            fill = float("-inf") if name == "lse" else 0.0
            shape_mask = pruned.view(1, num_heads, 1, *([1] * (value.dim() - 3)))
            result[name] = value.masked_fill(shape_mask, fill)
    return result


def guidance_rows(rows, batch: int, num_queries: int, device) -> torch.Tensor:
    """[B, Lq] bool: the query rows dual_path_attention guides. rows = "last" (the token
    being generated), "all", or a bool mask [Lq] or [B, Lq]."""
    if isinstance(rows, str):
        query = torch.arange(num_queries, device=device)
        selected = query >= 0 if rows == "all" else query == num_queries - 1
        return selected.expand(batch, num_queries).contiguous()
    return rows.to(device=device, dtype=torch.bool).expand(batch, num_queries)


def dual_path_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_keys: torch.Tensor,
    *,
    gamma: float,
    orthogonalize: bool = True,
    eps: float = 1e-6,
    rows="last",
    scale: Optional[float] = None,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    bidirectional_blocks: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> dict:
    """SPEC section 5 with two separate attention calls (the two-pass formulation).

      o_cond   = softmax(S) v            over every visible key
      o_uncond = softmax(S + M) v        M = -inf on dropped (image) keys
      dO = o_cond - o_uncond,  u = o_uncond / (||o_uncond|| + eps)     (per head, over D)
      out = o_cond + gamma (dO - <dO, u> u)   (orthogonalize=False: o_cond + gamma dO)
    on the selected rows; other rows get o_cond. A row whose kept-key set is empty (every
    visible key dropped) has no language-only path: o_uncond = 0 and out = o_cond there (no
    guidance). bidirectional_blocks, window and segment_ids as in sink_attention (no sink keys). Returns a
    dict of out, o_cond, o_uncond [B, Hq, Lq, D] in the compute dtype."""
    batch, num_keys = q.shape[0], k.shape[2]
    real = (
        torch.ones(batch, num_keys, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else key_padding_mask.to(device=q.device, dtype=torch.bool)
    )
    kept = real & ~drop_keys.to(device=q.device, dtype=torch.bool)
    return dual_path_from_masks(q, k, v, real, kept, gamma=gamma, orthogonalize=orthogonalize, eps=eps, rows=rows,
                                scale=q.shape[-1] ** -0.5 if scale is None else scale, causal=causal, window=window,
                                unordered=block_pairs(bidirectional_blocks, q.shape[2]),
                                same_segment=segment_pairs(segment_ids, q.shape[2]))


def dual_path_from_masks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor, kept: torch.Tensor, *,
                         gamma: float, orthogonalize: bool, eps: float, rows, **options) -> dict:
    """dual_path_attention given the keys of the two paths (real: every key that is not padding;
    kept: those not dropped, [B, Lk] bool) and attention_from_masks' options (scale, causal,
    window, the pair masks)."""
    nothing = torch.zeros_like(real)
    options.update(head_mask=None, sink_logit=None, key_groups=None, num_groups=None)
    conditional = attention_from_masks(q, k, v, real, nothing, nothing, **options)
    language_only = attention_from_masks(q, k, v, kept, nothing, nothing, **options)
    o_cond, o_uncond = conditional["out"], language_only["out"]
    has_kept = language_only["lse"] > float("-inf")  # [B, Hq, Lq]
    delta = o_cond - o_uncond
    if orthogonalize:
        u = o_uncond / (o_uncond.norm(dim=-1, keepdim=True) + eps)
        delta = delta - (delta * u).sum(-1, keepdim=True) * u
    selected = guidance_rows(rows, q.shape[0], q.shape[2], q.device)[:, None, :] & has_kept
    out = torch.where(selected[..., None], o_cond + gamma * delta, o_cond)
    return {"out": out, "o_cond": o_cond, "o_uncond": o_uncond}
