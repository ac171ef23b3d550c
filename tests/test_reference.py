"""The reference (fastprobe/reference.py) against an independent reading of SPEC sections 1-5.

Every kernel is tested against the reference, so a mistake there would pass everywhere. Here
the reference meets code written from SPEC.md alone: NumPy float64 and plain Python loops over
positions, heads and keys (slow, so the shapes are tiny), and well-known PyTorch formulas
(F.kl_div, torch.special.entr, scaled_dot_product_attention with an explicit mask). Where SPEC
leaves a choice open, the test names the choice the reference makes."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastprobe
from fastprobe import reference
from fastprobe.models import plant_sink_heads, tiny_model

NEG_INF = float("-inf")
TOL = dict(rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- independent implementation


def softmax(z):
    """softmax of a 1-D float64 array that has a finite entry; -inf entries get 0."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def logsumexp(values):
    values = np.asarray(values, dtype=np.float64)
    top = values.max() if values.size else NEG_INF
    return top if top == NEG_INF else top + math.log(np.exp(values - top).sum())


def shannon(p):
    """H(p) = -sum p log p, 0 log 0 = 0."""
    return -sum(x * math.log(x) for x in p if x > 0)


def kl_divergence(a, b):
    """KL(a || b) = sum a log(a / b) over a's support; +inf where b = 0 < a."""
    total = 0.0
    for x, y in zip(a, b):
        if x > 0:
            if y == 0:
                return math.inf
            total += x * math.log(x / y)
    return total


def numpy_draft_divergence(drafts, target, weights, temperature):
    num_drafts, num_tokens, _ = drafts.shape
    w = np.full(num_drafts, 1 / num_drafts) if weights is None else weights
    out = {name: np.zeros(num_tokens) for name in ("jsd", "mixture_entropy", "kl_mixture_target",
                                                    "target_entropy", "mean_draft_kl")}
    out["draft_entropy"] = np.zeros((num_drafts, num_tokens))
    for n in range(num_tokens):
        q = [softmax(drafts[k, n] / temperature) for k in range(num_drafts)]
        mixture = sum(w[k] * q[k] for k in range(num_drafts))
        out["mixture_entropy"][n] = shannon(mixture)
        out["draft_entropy"][:, n] = [shannon(qk) for qk in q]
        out["jsd"][n] = shannon(mixture) - sum(w[k] * shannon(q[k]) for k in range(num_drafts))
        if target is not None:
            p = softmax(target[n] / temperature)
            out["kl_mixture_target"][n] = kl_divergence(mixture, p)
            out["target_entropy"][n] = shannon(p)
            out["mean_draft_kl"][n] = sum(w[k] * kl_divergence(q[k], p) for k in range(num_drafts) if w[k] > 0)
    out["epistemic"] = out["jsd"] + out["kl_mixture_target"]
    return out


def numpy_concept_mass(logits, concepts, temperature):
    """concepts: a list of id lists. A concept with no mass: top_share and entropy None."""
    rows = []
    for z in logits / temperature:
        lse = logsumexp(z)
        p = np.exp(z - lse)
        row = []
        for ids in concepts:
            mass = sum(p[v] for v in ids)
            top = max(range(len(ids)), key=lambda i: (z[ids[i]], -i))  # the first of ties
            # p_v / mass from the variants' own logits, so a mass that underflows keeps it
            within = None if np.isneginf(z[ids]).all() else list(softmax(z[ids]))
            row.append(dict(mass=mass, log_mass=logsumexp(z[ids]) - lse, top_token=ids[top], lse=lse,
                            top_share=None if within is None else max(within),
                            concentration_entropy=None if within is None else shannon(within)))
        rows.append(row)
    return rows


def numpy_bridge_rows(student, teacher, beta, temperature, direction):
    """Per-row loss and its gradient w.r.t. the student logits with Q held constant, from the
    SPEC's formulas: forward (P_S - Q) / T; reverse P_S (g - sum P_S g) / T, g = log P_S - log Q.
    Q = softmax((z_T + beta z_S) / T), a student -inf kept masked for beta != 0 (the choice the
    reference documents: beta < 0 would give +inf)."""
    losses, grads = [], []
    for z_s, z_t in zip(student, teacher):
        if beta == 0:
            bridge = z_t
        else:
            bridge = np.where(np.isneginf(z_s), NEG_INF, z_t + beta * np.where(np.isneginf(z_s), 0.0, z_s))
        q, p = softmax(bridge / temperature), softmax(z_s / temperature)
        if direction == "forward":
            losses.append(kl_divergence(q, p))
            grads.append((p - q) / temperature)
        else:
            losses.append(kl_divergence(p, q))
            with np.errstate(divide="ignore", invalid="ignore"):
                g = np.where(p > 0, np.log(p) - np.log(q), 0.0)
            grads.append(p * (g - (p * g).sum()) / temperature)
    return np.array(losses), np.array(grads)


def visible_keys(query_pos, num_keys, real, sinks, causal, window):
    """SPEC 4: a causal query at position i sees keys j <= i, within a window i - w < j; sink
    keys are visible whatever the window (never in a causal query's future). The reference's
    choice without causality: a window is |i - j| < w. Padding is never visible."""
    keys = []
    for j in range(num_keys):
        if not real[j] or (causal and j > query_pos):
            continue
        if window is not None and j not in sinks:
            if causal and not query_pos - window < j:
                continue
            if not causal and not abs(query_pos - j) < window:
                continue
        keys.append(j)
    return keys


def loop_attention(q, k, v, *, scale=None, causal=True, window=None, num_sink=0, key_padding_mask=None,
                   head_mask=None, sink_logit=None, key_groups=None, num_groups=None, stat_tokens=1):
    batch, num_heads, num_queries, dim = q.shape
    num_kv_heads, num_keys = k.shape[1], k.shape[2]
    scale = dim ** -0.5 if scale is None else scale
    out = np.zeros((batch, num_heads, num_queries, v.shape[-1]))
    lse = np.full((batch, num_heads, num_queries), NEG_INF)
    sink_mass, entropy = np.zeros_like(lse), np.zeros_like(lse)
    group_mass = None if key_groups is None else np.zeros((batch, num_heads, num_queries, num_groups))
    for b in range(batch):
        real = [True] * num_keys if key_padding_mask is None else [bool(x) for x in key_padding_mask[b]]
        real_keys = [j for j in range(num_keys) if real[j]]  # "the first token" is the first real key
        sinks, stats = set(real_keys[:num_sink]), set(real_keys[:stat_tokens])
        for h in range(num_heads):
            if head_mask is not None and not head_mask[h]:
                continue
            kv = h // (num_heads // num_kv_heads)  # consecutive query heads share a key/value head
            for i in range(num_queries):
                keys = visible_keys(num_keys - num_queries + i, num_keys, real, sinks, causal, window)
                score = {j: scale * float(np.dot(q[b, h, i], k[b, kv, j])) for j in keys}
                extra = [] if sink_logit is None else [float(sink_logit[h])]
                if not keys and not extra:
                    continue
                lse[b, h, i] = logsumexp(list(score.values()) + extra)
                weight = {j: math.exp(score[j] - lse[b, h, i]) for j in keys}
                for j in keys:
                    out[b, h, i] += weight[j] * v[b, kv, j]
                    if group_mass is not None:
                        group_mass[b, h, i, int(key_groups[b][j])] += weight[j]
                sink_mass[b, h, i] = sum(weight[j] for j in keys if j in stats)
                entropy[b, h, i] = shannon(list(weight.values()) + [math.exp(x - lse[b, h, i]) for x in extra])
    return dict(out=out, lse=lse, sink_mass=sink_mass, entropy=entropy, group_mass=group_mass)


def numpy_dual_path(q, k, v, drop_keys, *, gamma, orthogonalize, eps, rows, causal, key_padding_mask):
    batch, _, num_queries, _ = q.shape
    real = np.ones((batch, k.shape[2]), bool) if key_padding_mask is None else key_padding_mask
    conditional = loop_attention(q, k, v, causal=causal, key_padding_mask=real)
    language = loop_attention(q, k, v, causal=causal, key_padding_mask=real & ~drop_keys)
    o_cond, o_uncond = conditional["out"], language["out"]
    delta = o_cond - o_uncond
    if orthogonalize:
        u = o_uncond / (np.linalg.norm(o_uncond, axis=-1, keepdims=True) + eps)
        delta = delta - (delta * u).sum(-1, keepdims=True) * u
    selected = np.zeros(num_queries, bool)
    selected[slice(None) if rows == "all" else -1] = True
    # the reference's choice: a row with no kept key has no language-only path, so no guidance
    guided = selected[None, None, :] & (language["lse"] > NEG_INF)
    out = np.where(guided[..., None], o_cond + gamma * delta, o_cond)
    return dict(out=out, o_cond=o_cond, o_uncond=o_uncond)


def assert_close(got, want, **tolerance):
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(got, np.asarray(want, dtype=np.float64), **(tolerance or TOL))


# ---------------------------------------------------------------- 1. draft_divergence


@pytest.mark.parametrize("num_drafts, num_tokens, vocab, temperature", [(3, 4, 9, 1.0), (1, 3, 5, 0.7), (4, 2, 1, 1.0),
                                                                        (2, 5, 13, 2.5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_draft_divergence_matches_independent(num_drafts, num_tokens, vocab, temperature, weighted):
    drafts = 3 * torch.randn(num_drafts, num_tokens, vocab, dtype=torch.float64)
    target = 3 * torch.randn(num_tokens, vocab, dtype=torch.float64)
    if vocab > 4:
        drafts[0, 0, :3] = NEG_INF  # masked vocabulary in one draft
        drafts[-1, 1, 4] = NEG_INF
        target[0, :3] = NEG_INF  # masked where draft 0 is masked too (finite KL)
        target[1, 2] = NEG_INF  # masked where the drafts have mass: KL(m || p) = +inf
    weights = None
    if weighted:
        weights = torch.rand(num_drafts, dtype=torch.float64)
        if num_drafts > 2:
            weights[1] = 0.0  # a draft outside the mixture
        weights = weights / weights.sum()
    got = reference.draft_divergence(drafts, target, weights=weights, temperature=temperature)
    want = numpy_draft_divergence(drafts.numpy(), target.numpy(), None if weights is None else weights.numpy(),
                                  temperature)
    for name, value in got.items():
        assert_close(value, want[name])
    # SPEC's identity: epistemic = sum_k w_k KL(q_k || p)
    assert_close(got["epistemic"], want["mean_draft_kl"])
    without_target = reference.draft_divergence(drafts, weights=weights, temperature=temperature)
    assert all(without_target[name] is None for name in ("kl_mixture_target", "epistemic", "target_entropy"))
    for name in ("jsd", "mixture_entropy", "draft_entropy"):
        assert_close(without_target[name], want[name])


def test_draft_divergence_matches_torch_formulas():
    drafts, target = torch.randn(3, 6, 11, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64)
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    got = reference.draft_divergence(drafts, target, weights=weights, temperature=0.8)
    q, log_p = torch.softmax(drafts / 0.8, -1), torch.log_softmax(target / 0.8, -1)
    mixture = torch.einsum("k,knv->nv", weights, q)
    # F.kl_div(input=log b, target=a) is KL(a || b) elementwise
    torch.testing.assert_close(got["kl_mixture_target"], F.kl_div(log_p, mixture, reduction="none").sum(-1))
    torch.testing.assert_close(got["mixture_entropy"], torch.special.entr(mixture).sum(-1))
    torch.testing.assert_close(got["draft_entropy"], torch.special.entr(q).sum(-1))
    jsd = torch.special.entr(mixture).sum(-1) - weights @ torch.special.entr(q).sum(-1)
    torch.testing.assert_close(got["jsd"], jsd)
    assert (got["jsd"] >= 0).all() and (got["jsd"] <= torch.special.entr(weights).sum() + 1e-12).all()


# ---------------------------------------------------------------- 2. concept_mass


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_concept_mass_matches_independent(temperature):
    logits = 4 * torch.randn(4, 12, dtype=torch.float64)
    logits[0, [2, 3]] = NEG_INF  # concept {2, 3} has no mass in row 0
    logits[1, 3] = NEG_INF  # one masked variant
    logits[2, 6] = logits[2, 5]  # a tie: the first variant in concept order wins
    logits[3, 0], logits[3, 11] = 800.0, 0.0  # concept {11}: mass underflows, log_mass does not
    concepts = [[2, 3], [5, 6, 0], [6, 5], [0], [11], [7, 1, 9, 4]]  # overlapping concepts
    token_ids = torch.tensor([v for ids in concepts for v in ids])
    offsets = torch.tensor(np.cumsum([0] + [len(ids) for ids in concepts]))
    got = reference.concept_mass(logits, token_ids, offsets, temperature=temperature)
    want = numpy_concept_mass(logits.numpy(), concepts, temperature)
    for n, row in enumerate(want):
        assert_close(got["lse"][n], row[0]["lse"])
        for c, expected in enumerate(row):
            for name in ("mass", "log_mass"):
                assert_close(got[name][n, c], expected[name])
            assert got["top_token"][n, c].item() == expected["top_token"]
            if expected["top_share"] is None:
                # the reference's choice for a concept with no mass at all (all variants -inf)
                assert got["log_mass"][n, c].item() == NEG_INF
                assert got["top_share"][n, c].item() == 0 and got["concentration_entropy"][n, c].item() == 0
            else:
                assert_close(got["top_share"][n, c], expected["top_share"])
                assert_close(got["concentration_entropy"][n, c], expected["concentration_entropy"])
    # a mass that underflows (e^-800) still has its within-concept distribution: one variant
    if temperature == 1.0:
        assert got["top_share"][3, 4].item() == 1.0 and got["concentration_entropy"][3, 4].item() == 0.0


def test_concept_mass_top_token_without_a_largest_logit_is_the_first_variant():
    """A concept whose variants are all -inf, or whose logits hold a NaN (no largest one), names
    its first variant in concept order as top_token (the kernels do the same)."""
    logits = torch.randn(3, 8, dtype=torch.float64)
    logits[0, [4, 6]] = NEG_INF
    logits[1, 6] = float("nan")
    got = reference.concept_mass(logits, torch.tensor([6, 4, 2, 4, 6]), torch.tensor([0, 2, 3, 5]))["top_token"]
    assert got[0].tolist() == [6, 2, 4] and got[1].tolist()[0::2] == [6, 4]
    assert got[2, 0] == (6 if logits[2, 6] >= logits[2, 4] else 4)


@pytest.mark.parametrize("shift, temperature", [(1e15, 1.0), (1e17, 1.0), (1.0, 1e-30)])
def test_concept_mass_keeps_its_precision_at_huge_scaled_logits(shift, temperature):
    """The concept's and the row's log-sum-exps are compared after their shifts are taken out:
    with scaled logits of 1e17 (or T = 1e-30), m_c + log s rounded log s away (mass 1.0 for
    0.06 among 50 equal logits, top_share 1.0 for 1/3)."""
    logits = torch.full((1, 50), shift, dtype=torch.float64)
    logits[0, 10] -= shift  # one smaller logit, far below: no mass
    result = reference.concept_mass(logits, torch.tensor([0, 1, 2, 10]), torch.tensor([0, 3, 4]),
                                    temperature=temperature)
    expected_mass = torch.tensor([[3 / 49, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(result["mass"], expected_mass, rtol=1e-12, atol=1e-300)
    assert result["top_share"][0, 0].item() == pytest.approx(1 / 3, rel=1e-12)
    assert result["concentration_entropy"][0, 0].item() == pytest.approx(math.log(3), rel=1e-12)


def test_log_mass_gradient():
    logits = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
    token_ids, offsets = torch.tensor([1, 2, 5, 0, 9, 2]), torch.tensor([0, 3, 4, 6])
    assert torch.autograd.gradcheck(
        lambda z: reference.concept_mass(z, token_ids, offsets, temperature=0.7)["log_mass"], (logits,))


# ---------------------------------------------------------------- 3. bridge_loss


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, -0.7, 2.5])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_bridge_loss_matches_independent(direction, beta, temperature):
    student, teacher = 2 * torch.randn(4, 7, dtype=torch.float64), 2 * torch.randn(4, 7, dtype=torch.float64)
    teacher[0, 1] = NEG_INF  # Q = 0 there: reverse loss +inf in row 0
    if beta != 0:
        student[1, 2] = NEG_INF  # masked in Q too
    labels = torch.tensor([0, -100, 3, 5])
    rows, grads = numpy_bridge_rows(student.numpy(), teacher.numpy(), beta, temperature, direction)
    finite = np.isfinite(rows)
    for labels_given in (None, labels):
        keep = np.ones(4, bool) if labels_given is None else (labels_given != -100).numpy()
        want_rows, want_grads = np.where(keep, rows, 0.0), np.where(keep[:, None], grads, 0.0)
        for reduction in ("none", "sum", "mean"):
            z = student.clone().requires_grad_()
            loss = reference.bridge_loss(z, teacher, beta=beta, temperature=temperature, direction=direction,
                                         labels=labels_given, reduction=reduction)
            loss.sum().backward()
            scale = keep.sum() if reduction == "mean" else 1
            if reduction == "none":
                assert_close(loss, want_rows)
            elif finite[keep].all():
                assert_close(loss, want_rows.sum() / scale)
            else:
                assert loss.item() == math.inf
            # gradients of the rows with a finite loss (a +inf row has gradient 0, tested elsewhere)
            assert_close(z.grad[finite], want_grads[finite] / scale)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("beta", [0.0, 0.8, -0.4])
def test_bridge_gradient_is_the_stopgrad_gradient(direction, beta):
    """The reference's gradient is that of KL with Q frozen at the current z_S: compare with
    gradcheck-verified autograd of that frozen-Q function, and with its central differences."""
    student, teacher = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    temperature = 1.3

    def frozen_q_loss(z):
        log_q = torch.log_softmax((teacher + beta * student) / temperature, -1)
        log_p = torch.log_softmax(z / temperature, -1)
        if direction == "forward":
            return (log_q.exp() * (log_q - log_p)).sum(-1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)

    assert torch.autograd.gradcheck(frozen_q_loss, (student.clone().requires_grad_(),))
    z = student.clone().requires_grad_()
    reference.bridge_loss(z, teacher, beta=beta, temperature=temperature, direction=direction,
                          reduction="sum").backward()
    differences = torch.zeros_like(student)
    step = 1e-6
    for index in np.ndindex(*student.shape):
        bump = torch.zeros_like(student)
        bump[index] = step
        differences[index] = (frozen_q_loss(student + bump).sum() - frozen_q_loss(student - bump).sum()) / (2 * step)
    torch.testing.assert_close(z.grad, differences, rtol=1e-6, atol=1e-8)
    if beta == 0:  # Q does not depend on z_S: the gradient is the true one
        assert torch.autograd.gradcheck(
            lambda x: reference.bridge_loss(x, teacher, beta=0.0, temperature=temperature, direction=direction,
                                            reduction="none"), (student.clone().requires_grad_(),))


def test_bridge_beta_zero_is_kl_div():
    student, teacher = torch.randn(5, 9, dtype=torch.float64), torch.randn(5, 9, dtype=torch.float64)
    loss = reference.bridge_loss(student, teacher, beta=0.0, temperature=1.7)
    want = F.kl_div(torch.log_softmax(student / 1.7, -1), torch.log_softmax(teacher / 1.7, -1), log_target=True,
                    reduction="batchmean")
    torch.testing.assert_close(loss, want)


def test_bridge_student_mask_at_beta_zero():
    """The reference's choice at beta = 0: Q = P_T exactly (SPEC: ordinary distillation), so a
    token the student masks and the teacher does not gives a forward loss of +inf; any beta != 0
    masks it in Q (Q proportional to P_T P_S^beta), a finite loss."""
    student, teacher = torch.randn(1, 5, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)
    student[0, 1] = NEG_INF
    assert reference.bridge_loss(student, teacher, beta=0.0).item() == math.inf
    for beta in (1e-9, -0.5):
        assert math.isfinite(reference.bridge_loss(student, teacher, beta=beta).item())


# ---------------------------------------------------------------- 4. sink_attention


def random_attention_case(rng):
    batch, kv_heads = rng.choice([1, 2]), rng.choice([1, 2])
    heads, num_keys = kv_heads * rng.choice([1, 2, 3]), rng.choice([1, 2, 5, 7])
    num_queries, dim = rng.choice([1, num_keys, max(1, num_keys - 2)]), rng.choice([1, 3, 4])
    q = 2 * torch.randn(batch, heads, num_queries, dim, dtype=torch.float64)
    k = 2 * torch.randn(batch, kv_heads, num_keys, dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, num_keys, dim + 1, dtype=torch.float64)
    padding = None
    if rng.random() < 0.5:  # left or right padding, up to every key of a row
        padding = torch.ones(batch, num_keys, dtype=torch.bool)
        for b in range(batch):
            pad = rng.randint(0, num_keys)
            if rng.random() < 0.5:
                padding[b, :pad] = False
            else:
                padding[b, num_keys - pad:] = False
    groups = rng.choice([None, 1, 3])
    options = dict(
        scale=rng.choice([None, 0.3]), causal=rng.random() < 0.7, window=rng.choice([None, 1, 2, 3, num_keys, num_keys + 3]),
        num_sink=rng.choice([0, 0, 1, 2]), stat_tokens=rng.choice([1, 1, 2, 3]), key_padding_mask=padding,
        head_mask=None if rng.random() < 0.5 else torch.rand(heads) < 0.7,
        sink_logit=None if rng.random() < 0.6 else torch.randn(heads, dtype=torch.float64),
        key_groups=None if groups is None else torch.randint(0, groups, (batch, num_keys)), num_groups=groups,
    )
    return q, k, v, options


def test_sink_attention_matches_loops(fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(60):
        q, k, v, options = random_attention_case(rng)
        got = reference.sink_attention(q, k, v, **options)
        want = loop_attention(q.numpy(), k.numpy(), v.numpy(),
                              **{name: value.numpy() if isinstance(value, torch.Tensor) else value
                                 for name, value in options.items()})
        for name in ("out", "lse", "sink_mass", "entropy") + (("group_mass",) if options["key_groups"] is not None else ()):
            assert_close(got[name], want[name], err_msg=f"{name} with {options}", **TOL)


@pytest.mark.parametrize("batch, heads, kv_heads, num_queries, num_keys", [(2, 4, 2, 5, 5), (1, 6, 2, 3, 9),
                                                                           (2, 2, 2, 1, 7), (1, 1, 1, 1, 1)])
def test_sink_attention_matches_sdpa(batch, heads, kv_heads, num_queries, num_keys):
    q = torch.randn(batch, heads, num_queries, 8, dtype=torch.float64)
    k, v = torch.randn(2, batch, kv_heads, num_keys, 8, dtype=torch.float64)
    # each key/value head serves heads // kv_heads query heads (SDPA's enable_gqa needs torch 2.5)
    k_per_head, v_per_head = (t.repeat_interleave(heads // kv_heads, 1) for t in (k, v))
    position = torch.arange(num_keys - num_queries, num_keys)[:, None]  # queries are the last Lq positions
    key = torch.arange(num_keys)[None, :]
    causal = key <= position
    for window in (None, 1, 2, num_keys):
        mask = causal if window is None else causal & (key > position - window)
        got = reference.sink_attention(q, k, v, window=window)
        torch.testing.assert_close(got["out"], F.scaled_dot_product_attention(q, k_per_head, v_per_head, attn_mask=mask))
        scores = q @ k_per_head.transpose(-1, -2) / math.sqrt(8)
        torch.testing.assert_close(got["lse"], scores.masked_fill(~mask, NEG_INF).logsumexp(-1))
    if num_queries == num_keys:
        torch.testing.assert_close(reference.sink_attention(q, k, v)["out"],
                                   F.scaled_dot_product_attention(q, k_per_head, v_per_head, is_causal=True))
    torch.testing.assert_close(reference.sink_attention(q, k, v, causal=False)["out"],
                               F.scaled_dot_product_attention(q, k_per_head, v_per_head))


def test_window_counts_the_query_itself():
    """window w: keys i - w < j <= i, so w = 1 is the query's own key alone, and the sink keys
    come on top of the window."""
    q, k, v = torch.randn(3, 1, 2, 6, 4, dtype=torch.float64)
    alone = reference.sink_attention(q, k, v, window=1)
    torch.testing.assert_close(alone["out"], v)
    assert (alone["entropy"] == 0).all()
    with_sink = reference.sink_attention(q, k, v, window=1, num_sink=1)  # query i sees keys 0 and i
    weights = torch.softmax(torch.stack([(q * k[:, :, :1]).sum(-1), (q * k).sum(-1)], -1) / 2, -1)
    want = weights[..., :1] * v[:, :, :1] + weights[..., 1:] * v
    torch.testing.assert_close(with_sink["out"][:, :, 1:], want[:, :, 1:])
    torch.testing.assert_close(with_sink["sink_mass"][:, :, 1:], weights[:, :, 1:, 0])
    # sink_mass is the weight on the row's first key whether the query sees it or not
    assert (alone["sink_mass"][:, :, 1:] == 0).all() and (alone["sink_mass"][:, :, 0] == 1).all()


def test_fully_masked_rows():
    """A pruned head, and a query with no visible key (a left-padded row's padding queries),
    give out 0, lse -inf, masses 0, entropy 0; with a learned sink the row's softmax holds only
    the sink: lse = sink_logit, out 0, masses 0, entropy 0."""
    q, k, v = torch.randn(3, 1, 2, 4, 3, dtype=torch.float64)
    padding = torch.tensor([[False, False, True, True]])
    groups = torch.tensor([[0, 1, 1, 0]])
    got = reference.sink_attention(q, k, v, key_padding_mask=padding, head_mask=torch.tensor([True, False]),
                                   key_groups=groups, num_groups=2)
    for row in [(0, 1, slice(None)), (0, 0, slice(0, 2))]:
        assert (got["out"][row] == 0).all() and (got["lse"][row] == NEG_INF).all()
        assert (got["sink_mass"][row] == 0).all() and (got["entropy"][row] == 0).all()
        assert (got["group_mass"][row] == 0).all()
    # the first real key (position 2) is "the first token" of the left-padded row
    torch.testing.assert_close(got["sink_mass"][0, 0, 2], torch.tensor(1.0, dtype=torch.float64))
    all_pruned = reference.sink_attention(q, k, v, head_mask=torch.tensor([False, False]))
    assert (all_pruned["out"] == 0).all() and (all_pruned["lse"] == NEG_INF).all()
    sink = torch.tensor([0.5, -1.0], dtype=torch.float64)
    with_sink = reference.sink_attention(q, k, v, key_padding_mask=padding, sink_logit=sink)
    torch.testing.assert_close(with_sink["lse"][0, :, :2], sink[:, None].expand(2, 2))
    assert (with_sink["out"][0, :, :2] == 0).all() and (with_sink["entropy"][0, :, :2] == 0).all()


@pytest.mark.parametrize("sink_logit", [None, 0.0], ids=["key", "sink-logit"])
def test_entropy_near_zero_keeps_its_relative_precision(sink_logit):
    """One entry (key 0, or the sink logit) 40 above 36 keys: the entropy is
    log(1 + r) + 40 r / (1 + r) with r = 36 e^-40 (or 37: key 0 joins them), ~6e-15, a value
    the kernels get to float32 precision (the C++ kernel's and eager float32's within a few %).
    -sum p log p took log p of the top entry as -log(1 + r), and 1 + r = 1 + 1.6e-16 rounds in
    float64: the reference lost 2.4% of it."""
    q = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 37, 4, dtype=torch.float64)
    k[0, 0, :, 0] = -40.0
    if sink_logit is None:
        k[0, 0, 0, 0] = 0.0
    got = reference.sink_attention(q, k, torch.randn(1, 1, 37, 4, dtype=torch.float64), scale=1.0, causal=False,
                                   sink_logit=None if sink_logit is None else torch.tensor([sink_logit]))
    rest = (36 if sink_logit is None else 37) * math.exp(-40.0)
    want = math.log1p(rest) + 40.0 * rest / (1 + rest)
    torch.testing.assert_close(got["entropy"], torch.full_like(got["entropy"], want), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sink_attention_splits_huge_tied_scores(dtype):
    """Scores +-1.5e38 (q = e_0, scale 1): the keys at +1.5e38 tie for the maximum and share
    the softmax, p = 1/4 each; their lse is 1.5e38 + log 4, which rounds to 1.5e38, so
    log p = s - lse would give each p = 1 (sink_mass 1, entropy 0, out the sum of their v)."""
    scores = torch.tensor([1.5e38, -1.5e38] * 4, dtype=dtype)
    q = torch.zeros(1, 1, 2, 4, dtype=dtype)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 8, 4, dtype=dtype)
    k[..., 0] = scores
    v = torch.randn(1, 1, 8, 3, dtype=dtype)
    groups = torch.tensor([[0, 1, 0, 1, 0, 1, 1, 0]])  # the tied keys 0, 2, 4, 6: groups 0, 0, 0, 1
    got = reference.sink_attention(q, k, v, scale=1.0, causal=False, num_sink=1, key_groups=groups, num_groups=2)
    quarter = torch.full((1, 1, 2), 0.25, dtype=dtype)
    torch.testing.assert_close(got["sink_mass"], quarter)
    torch.testing.assert_close(got["entropy"], torch.full_like(quarter, math.log(4)))
    torch.testing.assert_close(got["group_mass"], torch.tensor([0.75, 0.25], dtype=dtype).expand(1, 1, 2, 2))
    torch.testing.assert_close(got["out"], v[:, :, ::2].mean(2, keepdim=True).expand(1, 1, 2, 3))
    # the two paths of dual_path_attention likewise: o_uncond over the tied keys not dropped
    drop = torch.tensor([[True, False, True, False, False, False, False, False]])
    dual = reference.dual_path_attention(q, k, v, drop, gamma=0.0, scale=1.0, causal=False)
    torch.testing.assert_close(dual["o_cond"], got["out"])
    torch.testing.assert_close(dual["o_uncond"], v[:, :, 4::2].mean(2, keepdim=True).expand(1, 1, 2, 3))


@pytest.mark.parametrize("bad_id", [2, -1])
def test_group_ids_outside_the_groups_raise_index_error(bad_id):
    """attention_from_masks (the reference backend's kernel, given a hand-made KeyGroups the op
    does not re-check) refuses an id outside [0, num_groups) as the C++ kernel does: an
    IndexError naming the key and the id, not one_hot's 'Class values must be ...'."""
    q, k, v = torch.randn(3, 1, 1, 4, 2, dtype=torch.float64)
    groups = torch.tensor([[0, 1, bad_id, 0]])
    message = rf"key_groups\[0, 2\] = {bad_id} is outside \[0, num_groups = 2\)"
    with pytest.raises(IndexError, match=message):
        reference.sink_attention(q, k, v, key_groups=groups, num_groups=2)
    hand_made = fastprobe.ops.attention.KeyGroups(groups.to(torch.int32), 2)
    with fastprobe.use_backend("reference"), pytest.raises(IndexError, match=message):
        fastprobe.sink_attention(q.float(), k.float(), v.float(), key_groups=hand_made)


def test_group_ids_are_taken_unchecked_under_vmap_and_on_meta_tensors():
    """Where the ids cannot be read (torch.func.vmap has no .item(); meta tensors hold no values)
    the reference takes them unchecked: vmap over queries gives each query's own call, and meta
    inputs give meta outputs of the right shapes."""
    q = torch.randn(5, 1, 2, 3, 4, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 6, 4, dtype=torch.float64)
    groups = torch.randint(0, 3, (5, 1, 6))  # each query's own ids

    def group_mass(q, groups):
        return reference.sink_attention(q, k, v, key_groups=groups, num_groups=3)["group_mass"]

    torch.testing.assert_close(torch.func.vmap(group_mass)(q, groups),
                               torch.stack([group_mass(*call) for call in zip(q, groups)]), rtol=0, atol=0)
    meta = reference.sink_attention(*(x.to("meta") for x in (q[0], k, v)), key_groups=groups[0].to("meta"), num_groups=3)
    assert meta["group_mass"].is_meta and meta["group_mass"].shape == (1, 2, 3, 3)


# ---------------------------------------------------------------- 5. dual_path_attention


def test_dual_path_matches_independent(fresh_seed):
    rng = random.Random(fresh_seed)
    for _ in range(40):
        batch, kv_heads = rng.choice([1, 2]), rng.choice([1, 2])
        heads, num_keys = kv_heads * rng.choice([1, 2]), rng.choice([1, 3, 6])
        num_queries, dim = rng.choice([1, num_keys]), rng.choice([1, 4])
        q = torch.randn(batch, heads, num_queries, dim, dtype=torch.float64)
        k, v = torch.randn(2, batch, kv_heads, num_keys, dim, dtype=torch.float64)
        drop = torch.rand(batch, num_keys) < 0.4
        padding = None if rng.random() < 0.5 else torch.rand(batch, num_keys) < 0.8
        options = dict(gamma=rng.choice([0.0, 1.0, -0.5, 2.0]), orthogonalize=rng.random() < 0.6, eps=1e-6,
                       rows=rng.choice(["last", "all"]), causal=rng.random() < 0.7)
        got = reference.dual_path_attention(q, k, v, drop, key_padding_mask=padding, **options)
        want = numpy_dual_path(q.numpy(), k.numpy(), v.numpy(), drop.numpy(),
                               key_padding_mask=None if padding is None else padding.numpy(), **options)
        for name in ("out", "o_cond", "o_uncond"):
            assert_close(got[name], want[name], err_msg=f"{name} with {options}", **TOL)


def test_dual_path_without_image_keys_is_plain_attention():
    q, k, v = torch.randn(3, 2, 2, 5, 4, dtype=torch.float64)
    got = reference.dual_path_attention(q, k, v, torch.zeros(2, 5, dtype=torch.bool), gamma=3.0, rows="all")
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name in ("out", "o_cond", "o_uncond"):
        torch.testing.assert_close(got[name], plain)


# ---------------------------------------------------------------- models.plant_sink_heads


def test_plant_sink_heads_refuses_what_it_cannot_plant():
    """Out-of-range layers and heads, attention without Llama's projections (GPT-2) and
    attention with per-head query/key norms (Qwen 3: the planted rows would be rescaled into a
    weak push) are refused before any weight changes."""
    llama = tiny_model("llama", num_layers=1)
    before = {name: value.clone() for name, value in llama.state_dict().items()}
    for heads in ({1: [0]}, {-1: [0]}, {0: [4]}, {0: [-1]}):
        with pytest.raises(ValueError, match="layer|head"):
            plant_sink_heads(llama, heads)
    assert all(torch.equal(value, before[name]) for name, value in llama.state_dict().items())
    for arch, message in (("gpt2", "Llama-style attention"), ("qwen3", "q_norm")):
        with pytest.raises(ValueError, match=message):
            plant_sink_heads(tiny_model(arch, num_layers=1), {0: [0]})
    # a model whose attention fastprobe cannot reach (none here; GPT-2 on transformers 4.53) is the same error
    transformers = pytest.importorskip("transformers")
    mamba = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=64, hidden_size=16, state_size=4,
                                                                   num_hidden_layers=1))
    with pytest.raises(ValueError, match="Llama-style attention that fastprobe can patch: .*no attention layers"):
        plant_sink_heads(mamba, {0: [0]})
