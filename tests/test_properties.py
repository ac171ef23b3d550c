"""Metamorphic properties of every op: relations that must hold by mathematics, checked on each
path without comparing it to the reference, so they also catch an error shared by the reference
and the kernels (a misreading of SPEC.md). Each relation runs on the float64 reference and on
every execution target (C++; Triton through the interpreter or on CUDA) on small shapes."""

import pytest
import torch

import fastprobe as fp
from fastprobe import reference

from .conftest import TARGETS

PATHS = [pytest.param(("reference", "cpu"), id="reference-f64")] + TARGETS


@pytest.fixture(params=PATHS)
def path(request):
    """(backend, device, dtype, tolerance): the reference in float64, the fast paths in float32."""
    backend, device = request.param
    fp.set_backend(backend)
    if backend == "reference":
        return backend, device, torch.float64, 1e-9
    return backend, device, torch.float32, 3e-5


def draw(*shape, scale=1.0, dtype, device):
    return (scale * torch.randn(*shape, dtype=torch.float64)).to(device=device, dtype=dtype)


def assert_close(got, want, tol):
    torch.testing.assert_close(got.double().cpu(), want.double().cpu(), rtol=tol, atol=tol, equal_nan=True)


# ---------------------------------------------------------------- draft_divergence

DIVERGENCES = ("jsd", "kl_mixture_target", "epistemic", "mixture_entropy", "draft_entropy", "target_entropy")


def test_draft_divergence_relations(path):
    """Invariant to the drafts' order, to a constant added to any row of any model and to a
    permutation of the vocabulary; temperature T is the logits divided by T; splitting a draft
    into two copies that share its weight changes nothing; equal drafts have jsd 0, and drafts
    equal to the target also KL 0; drafts of disjoint supports have jsd = H(w)."""
    _, device, dtype, tol = path
    K, N, V = 3, 4, 53
    drafts, target = draw(K, N, V, scale=3, dtype=dtype, device=device), draw(N, V, scale=3, dtype=dtype, device=device)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=dtype, device=device)
    base = fp.draft_divergence(drafts, target, weights=w)

    def same(result, fields=DIVERGENCES, slack=1.0):
        for name in fields:
            assert_close(getattr(result, name), getattr(base, name), tol * slack)

    order = torch.tensor([2, 0, 1], device=device)
    permuted = fp.draft_divergence(drafts[order], target, weights=w[order])
    same(permuted, [name for name in DIVERGENCES if name != "draft_entropy"])
    assert_close(permuted.draft_entropy, base.draft_entropy[order], tol)
    shifted = fp.draft_divergence(drafts + draw(K, N, 1, scale=20, dtype=dtype, device=device),
                                  target + draw(N, 1, scale=20, dtype=dtype, device=device), weights=w)
    same(shifted, slack=10)
    vocab = torch.randperm(V, device=device)
    same(fp.draft_divergence(drafts[..., vocab], target[:, vocab], weights=w))
    hot = fp.draft_divergence(drafts, target, weights=w, temperature=1.7)
    cold = fp.draft_divergence(drafts / 1.7, target / 1.7, weights=w)
    for name in DIVERGENCES:
        assert_close(getattr(hot, name), getattr(cold, name), tol)
    halves = torch.cat([w[:1] / 2, w[1:], w[:1] / 2])  # draft 0 twice, each with half its weight
    split = fp.draft_divergence(torch.cat([drafts, drafts[:1]]), target, weights=halves)
    same(split, ("jsd", "kl_mixture_target", "epistemic", "mixture_entropy"))

    equal = fp.draft_divergence(drafts[:1].expand(K, N, V), drafts[0], weights=w)
    zero = torch.zeros(N, dtype=torch.float64)
    for name in ("jsd", "kl_mixture_target", "epistemic"):
        assert_close(getattr(equal, name), zero, tol)
    assert_close(equal.mixture_entropy, equal.draft_entropy[0], tol)

    disjoint = torch.full((2, N, V), float("-inf"), dtype=dtype, device=device)
    disjoint[0, :, : V // 2], disjoint[1, :, V // 2:] = drafts[0, :, : V // 2], drafts[1, :, V // 2:]
    pair = torch.tensor([0.3, 0.7], dtype=torch.float64)
    result = fp.draft_divergence(disjoint, weights=pair.to(device=device, dtype=dtype))
    assert_close(result.jsd, torch.full((N,), -(pair * pair.log()).sum().item(), dtype=torch.float64), tol)


def test_draft_divergence_shares_add_up_over_a_vocabulary_split():
    """The tensor-parallel form: the shares of two vocabulary shards, formed with the global lse,
    add up to the unsharded statistics (float64)."""
    drafts, target = torch.randn(3, 4, 40, dtype=torch.float64), torch.randn(4, 40, dtype=torch.float64)
    lse = torch.cat([torch.logsumexp(drafts / 0.8, -1), torch.logsumexp(target / 0.8, -1)[None]])
    shares = [reference.draft_divergence_shares(drafts[..., a:b], target[:, a:b], lse=lse, temperature=0.8)
              for a, b in ((0, 13), (13, 40))]
    whole = reference.draft_divergence(drafts, target, temperature=0.8)
    for name in ("jsd", "kl_mixture_target", "mixture_entropy", "draft_entropy", "target_entropy"):
        assert_close(shares[0][name] + shares[1][name], whole[name], 1e-12)


# ---------------------------------------------------------------- concept_mass


def test_concept_mass_relations(path):
    """Disjoint concepts add up; the whole vocabulary has mass 1, entropy H(p), top token the
    argmax; one variant has top_share 1 and entropy 0; invariant to a constant added to a row, to
    permuting the vocabulary together with the ids, and to the order of variants; temperature T is
    the logits divided by T; the gradient of log_mass is q_v 1[v in c] - p_v (it sums to 0)."""
    _, device, dtype, tol = path
    N, V = 3, 47
    logits = draw(N, V, scale=3, dtype=dtype, device=device)
    ids = torch.randperm(V).tolist()
    a, b, c = ids[:3], ids[3:7], ids[7:8]
    concepts = [a, b, c, a + b, ids]
    base = fp.concept_mass(logits, fp.ConceptSet.from_ids(concepts).to(device))
    p = torch.softmax(logits.double(), -1).cpu()
    assert_close(base.mass[:, 3], base.mass[:, 0] + base.mass[:, 1], tol)
    assert_close(base.mass[:, 4], torch.ones(N), tol)
    assert_close(base.concentration_entropy[:, 4], -(p * p.log()).sum(-1), tol)
    assert torch.equal(base.top_token[:, 4].cpu(), logits.argmax(-1).cpu())
    assert_close(base.top_share[:, 2], torch.ones(N), tol)
    assert_close(base.concentration_entropy[:, 2], torch.zeros(N), tol)

    def same(result, slack=1.0):
        for name in ("mass", "log_mass", "top_share", "concentration_entropy"):
            assert_close(getattr(result, name), getattr(base, name), tol * slack)

    same(fp.concept_mass(logits + draw(N, 1, scale=20, dtype=dtype, device=device),
                         fp.ConceptSet.from_ids(concepts).to(device)), slack=10)
    vocab = torch.randperm(V)
    new_id = torch.empty(V, dtype=torch.long)
    new_id[vocab] = torch.arange(V)
    moved = fp.concept_mass(logits[:, vocab.to(device)],
                            fp.ConceptSet.from_ids([[int(new_id[i]) for i in ids_c] for ids_c in concepts]).to(device))
    same(moved)
    assert torch.equal(vocab[moved.top_token.cpu()], base.top_token.cpu())
    same(fp.concept_mass(logits, fp.ConceptSet.from_ids([ids_c[::-1] for ids_c in concepts]).to(device)))
    hot = fp.concept_mass(logits, fp.ConceptSet.from_ids(concepts).to(device), temperature=0.6)
    cold = fp.concept_mass(logits / 0.6, fp.ConceptSet.from_ids(concepts).to(device))
    for name in ("mass", "log_mass", "top_share", "concentration_entropy", "lse"):
        assert_close(getattr(hot, name), getattr(cold, name), tol)

    x = logits.clone().requires_grad_(True)
    log_mass = fp.concept_mass(x, fp.ConceptSet.from_ids(concepts).to(device)).log_mass
    (grad,) = torch.autograd.grad(log_mass[:, 3].sum(), x)
    inside = torch.zeros(V, dtype=torch.float64)
    inside[a + b] = 1
    assert_close(grad, inside * p / (p * inside).sum(-1, keepdim=True) - p, tol)


# ---------------------------------------------------------------- bridge_loss


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_bridge_loss_relations(path, direction):
    """Loss >= 0; beta = 0 with student = teacher gives 0; the bridge with beta equals beta = 0
    against the teacher z_T + beta z_S (Q is a constant for the gradient), in loss and gradient;
    invariant to row shifts and vocabulary permutations; T is the logits divided by T; "mean" is
    "sum" over the kept rows; each row's gradient sums to 0 over the vocabulary."""
    _, device, dtype, tol = path
    N, V = 6, 41
    student, teacher = draw(N, V, scale=2, dtype=dtype, device=device), draw(N, V, scale=2, dtype=dtype, device=device)
    labels = torch.tensor([0, -100, 2, 3, -100, 5], device=device)

    def loss_and_grad(s, t, beta, **options):
        x = s.clone().requires_grad_(True)
        loss = fp.bridge_loss(x, t, beta=beta, direction=direction, **options)
        return loss, torch.autograd.grad(loss.sum(), x)[0]

    assert_close(fp.bridge_loss(student, student, beta=0.0, direction=direction, reduction="none"), torch.zeros(N), tol)
    for beta in (0.5, -0.3):
        loss, grad = loss_and_grad(student, teacher, beta, temperature=1.9, labels=labels, reduction="none")
        assert bool((loss >= 0).all())
        assert_close(grad.double().sum(-1), torch.zeros(N), tol)
        fixed_loss, fixed_grad = loss_and_grad(student, teacher + beta * student, 0.0, temperature=1.9, labels=labels,
                                               reduction="none")
        assert_close(loss, fixed_loss, tol)
        assert_close(grad, fixed_grad, tol)
        shifted = fp.bridge_loss(student + draw(N, 1, scale=20, dtype=dtype, device=device),
                                 teacher + draw(N, 1, scale=20, dtype=dtype, device=device),
                                 beta=beta, direction=direction, temperature=1.9, labels=labels, reduction="none")
        assert_close(shifted, loss, 10 * tol)
        vocab = torch.randperm(V, device=device)
        assert_close(fp.bridge_loss(student[:, vocab], teacher[:, vocab], beta=beta, direction=direction, temperature=1.9,
                                    labels=labels, reduction="none"), loss, tol)
        cold = fp.bridge_loss(student / 1.9, teacher / 1.9, beta=beta, direction=direction, labels=labels, reduction="none")
        assert_close(cold, loss, tol)
        total = fp.bridge_loss(student, teacher, beta=beta, direction=direction, labels=labels, reduction="sum")
        mean = fp.bridge_loss(student, teacher, beta=beta, direction=direction, labels=labels)
        assert_close(mean * 4, total, tol)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_bridge_gradient_is_the_finite_difference_of_the_fixed_target_loss(direction):
    """SPEC's gradient formulas against central differences in float64 of the loss with Q held
    fixed (the bridge at beta is the loss at beta = 0 against the teacher z_T + beta z_S)."""
    fp.set_backend("reference")
    student, teacher = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, dtype=torch.float64)
    beta, temperature, step = 0.7, 1.3, 1e-6
    x = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fp.bridge_loss(x, teacher, beta=beta, temperature=temperature, direction=direction,
                                                 reduction="sum"), x)
    fixed = teacher + beta * student

    def loss(s):
        return fp.bridge_loss(s, fixed, beta=0.0, temperature=temperature, direction=direction, reduction="sum")

    differences = torch.zeros_like(student)
    for index in range(student.numel()):
        bump = torch.zeros_like(student).view(-1)
        bump[index] = step
        bump = bump.view_as(student)
        differences.view(-1)[index] = (loss(student + bump) - loss(student - bump)) / (2 * step)
    torch.testing.assert_close(grad, differences, rtol=1e-7, atol=1e-8)


# ---------------------------------------------------------------- sink_attention

STATISTICS = ("out", "lse", "sink_mass", "entropy")


def test_sink_attention_relations(path):
    """Non-causal attention is invariant to permuting the keys (group masses follow their keys);
    grouped-query heads equal K and V repeated per query head; out is affine in v; a constant
    added to every score (a query component on a constant key dimension) moves only lse; decoding
    the last m queries gives the prefill's last m rows; two halves of the keys merged by their lse
    give the whole; window 1 gives out = v_i and entropy 0."""
    _, device, dtype, tol = path
    B, Hq, Hkv, L, D = 2, 4, 2, 9, 8
    q = draw(B, Hq, L, D, scale=2, dtype=dtype, device=device)
    k, v = draw(B, Hkv, L, D, dtype=dtype, device=device), draw(B, Hkv, L, D, dtype=dtype, device=device)
    groups = torch.randint(0, 3, (B, L), device=device)
    options = dict(key_groups=groups, num_groups=3, return_entropy=True)
    free = fp.sink_attention(q, k, v, causal=False, **options)
    keys = torch.randperm(L, device=device)
    moved = fp.sink_attention(q, k[:, :, keys], v[:, :, keys], causal=False, key_groups=groups[:, keys], num_groups=3,
                              return_entropy=True)
    for name in ("out", "lse", "entropy", "group_mass"):
        assert_close(getattr(moved, name), getattr(free, name), tol)
    assert_close(free.group_mass.sum(-1), torch.ones(B, Hq, L), tol)

    base = fp.sink_attention(q, k, v, window=4, num_sink=1, return_entropy=True)
    repeated = fp.sink_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), window=4, num_sink=1,
                                 return_entropy=True)
    for name in STATISTICS:
        assert_close(getattr(repeated, name), getattr(base, name), tol)
    shift = draw(1, 1, 1, D, dtype=dtype, device=device)
    affine = fp.sink_attention(q, k, 3 * v + shift, window=4, num_sink=1)
    assert_close(affine.out, 3 * base.out.double() + shift.double(), 10 * tol)
    k_flat, q_up = k.clone(), q.clone()
    k_flat[..., 0] = 1.5
    q_up[..., 0] += 4.0
    low = fp.sink_attention(q, k_flat, v, window=4, num_sink=1, return_entropy=True)
    high = fp.sink_attention(q_up, k_flat, v, window=4, num_sink=1, return_entropy=True)
    for name in ("out", "sink_mass", "entropy"):
        assert_close(getattr(high, name), getattr(low, name), 10 * tol)
    assert_close(high.lse, low.lse.double() + 6.0 * D ** -0.5, 10 * tol)
    for m in (1, 3):
        decoded = fp.sink_attention(q[:, :, -m:], k, v, window=4, num_sink=1, return_entropy=True)
        for name in STATISTICS:
            assert_close(getattr(decoded, name), getattr(base, name)[:, :, -m:], tol)

    half, queries = L // 2, q[:, :, :3]
    first = fp.sink_attention(queries, k[:, :, :half], v[:, :, :half], causal=False)
    second = fp.sink_attention(queries, k[:, :, half:], v[:, :, half:], causal=False)
    lse = torch.logaddexp(first.lse.double(), second.lse.double())
    merged = (torch.exp(first.lse.double() - lse)[..., None] * first.out.double()
              + torch.exp(second.lse.double() - lse)[..., None] * second.out.double())
    assert_close(lse, free.lse[:, :, :3], tol)
    assert_close(merged, free.out[:, :, :3], tol)

    diagonal = fp.sink_attention(q, k, v, window=1, return_entropy=True)
    assert_close(diagonal.out, v.repeat_interleave(2, 1), tol)
    assert_close(diagonal.entropy, torch.zeros(B, Hq, L), tol)


def test_sink_attention_masks_as_removal(path):
    """Padding keys are as if removed (left padding: the first real key is the sink); packed
    segments are separate calls; a pruned head changes no other head; a sink logit c scales out
    by 1 - exp(c - lse) and adds exp(c) to exp(lse)."""
    _, device, dtype, tol = path
    B, Hq, Hkv, L, D = 2, 4, 2, 10, 8
    q = draw(B, Hq, L, D, scale=2, dtype=dtype, device=device)
    k, v = draw(B, Hkv, L, D, dtype=dtype, device=device), draw(B, Hkv, L, D, dtype=dtype, device=device)
    options = dict(window=3, num_sink=1, return_entropy=True)
    padding = torch.ones(B, L, dtype=torch.bool, device=device)
    padding[1, :3] = False
    padded = fp.sink_attention(q, k, v, key_padding_mask=padding, **options)
    alone = fp.sink_attention(q[1:, :, 3:], k[1:, :, 3:], v[1:, :, 3:], **options)
    for name in STATISTICS:
        assert_close(getattr(padded, name)[1:, :, 3:], getattr(alone, name), tol)

    segments = torch.zeros(B, L, dtype=torch.long, device=device)
    segments[:, 4:] = 1
    packed = fp.sink_attention(q, k, v, segment_ids=segments, **options)
    parts = [fp.sink_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **options) for a, b in ((0, 4), (4, L))]
    for name in STATISTICS:
        assert_close(getattr(packed, name), torch.cat([getattr(part, name) for part in parts], 2), tol)

    base = fp.sink_attention(q, k, v, **options)
    kept = torch.tensor([True, False, True, False], device=device)
    pruned = fp.sink_attention(q, k, v, head_mask=kept, **options)
    for name in STATISTICS:
        assert_close(getattr(pruned, name)[:, kept], getattr(base, name)[:, kept], tol)
    assert bool((pruned.out[:, ~kept] == 0).all()) and bool(torch.isneginf(pruned.lse[:, ~kept]).all())

    sink_logit = draw(Hq, dtype=dtype, device=device)
    with_sink = fp.sink_attention(q, k, v, sink_logit=sink_logit, **options)
    lse = torch.logaddexp(base.lse.double(), sink_logit.double().view(1, Hq, 1))
    assert_close(with_sink.lse, lse, tol)
    assert_close(with_sink.out, base.out.double() * torch.exp(base.lse.double() - lse)[..., None], tol)


# ---------------------------------------------------------------- dual_path_attention


@pytest.mark.parametrize("orthogonalize", [True, False])
def test_dual_path_is_its_formula_over_two_attention_calls(path, orthogonalize):
    """o_cond and o_uncond are sink_attention without and with the dropped keys masked, out is
    SPEC's merge of them on the guided rows (o_cond elsewhere and where no key is kept), gamma = 0
    gives o_cond (its bits within one call), and decoding the last query gives the prefill's last row."""
    _, device, dtype, tol = path
    B, Hq, Hkv, L, D = 2, 4, 2, 9, 8
    q = draw(B, Hq, L, D, scale=2, dtype=dtype, device=device)
    k, v = draw(B, Hkv, L, D, dtype=dtype, device=device), draw(B, Hkv, L, D, dtype=dtype, device=device)
    drop = torch.zeros(B, L, dtype=torch.bool, device=device)
    drop[:, :4] = True  # the first queries keep no key: they are not guided
    out, o_cond, o_uncond = fp.dual_path_attention(q, k, v, drop, gamma=1.3, orthogonalize=orthogonalize, rows="all",
                                                   return_paths=True)
    every, language = fp.sink_attention(q, k, v), fp.sink_attention(q, k, v, key_padding_mask=~drop)
    kept = torch.isfinite(language.lse)[..., None]
    cond, uncond = every.out.double(), torch.where(kept, language.out.double(), 0.0)
    assert_close(o_cond, cond, tol)
    assert_close(o_uncond, uncond, tol)
    delta = cond - uncond
    if orthogonalize:
        u = uncond / (uncond.norm(dim=-1, keepdim=True) + 1e-6)
        delta = delta - (delta * u).sum(-1, keepdim=True) * u
    assert_close(out, torch.where(kept, cond + 1.3 * delta, cond), 10 * tol)
    unguided, same_cond, _ = fp.dual_path_attention(q, k, v, drop, gamma=0.0, orthogonalize=orthogonalize, rows="all",
                                                    return_paths=True)
    assert torch.equal(unguided, same_cond)  # bit for bit within a call (across calls: to float rounding)
    assert_close(fp.dual_path_attention(q, k, v, drop, gamma=0.0, orthogonalize=orthogonalize, rows="all"), cond, tol)
    last = fp.dual_path_attention(q, k, v, drop, gamma=1.3, orthogonalize=orthogonalize)
    decoded = fp.dual_path_attention(q[:, :, -1:], k, v, drop, gamma=1.3, orthogonalize=orthogonalize)
    assert_close(decoded, last[:, :, -1:], tol)
    assert_close(last[:, :, :-1], cond[:, :, :-1], tol)
