"""concept_mass and ConceptSet: against the float64 reference (values and gradient),
properties, tokenizer-built concept sets, and bad input."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastprobe as fp
from fastprobe import reference
from fastprobe.ops.concepts import answer_variants

from .conftest import ATOL, RTOL, same_bits_per_row

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FLOAT_FIELDS = ["mass", "log_mass", "top_share", "concentration_entropy", "lse"]
# Gradients come back in the logits' dtype, so low-precision ones carry its rounding.
GRAD_TOLERANCE = {torch.float32: (RTOL, ATOL), torch.bfloat16: (1e-2, 1e-5), torch.float16: (2e-3, 1e-6)}


def shapes_for(target):
    """(N, V, C) cases: odd sizes, V past a few kernel blocks, C = 1, V = 1. The Triton
    interpreter is slow, so it gets smaller vocabularies."""
    backend, device = target
    if device == "cpu" and backend == "triton":
        return [(7, 301, 12), (3, 777, 1), (2, 1, 1)]
    return [(37, 1271, 40), (5, 4099, 7), (16, 32000, 300), (3, 1, 1)]


def random_concepts(vocab, num_concepts, max_variants=8, device="cpu"):
    """Concepts of 1..max_variants distinct ids, some single-variant, some overlapping
    (every third concept shares ids with its predecessor)."""
    lists = []
    for c in range(num_concepts):
        size = int(torch.randint(1, min(max_variants, vocab) + 1, ()))
        ids = torch.randperm(vocab)[:size].tolist()
        if c % 3 == 2:
            ids = lists[-1][: max(1, len(lists[-1]) // 2)] + [i for i in ids if i not in lists[-1]]
        lists.append(ids)
    return fp.ConceptSet.from_ids(lists).to(device)


def expected(logits, concepts, temperature=1.0):
    """The float64 reference on exactly the values the kernel sees."""
    return reference.concept_mass(
        logits.detach().cpu().double(), concepts.token_ids.cpu(), concepts.offsets.cpu(), temperature=temperature
    )


def assert_matches(result, ref, rtol=RTOL, atol=ATOL):
    for field in FLOAT_FIELDS:
        got, want = getattr(result, field), ref[field]
        assert got.dtype == torch.float32, field
        assert not torch.isnan(got).any(), f"{field} has NaN (unwritten or invalid)"
        torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{field}: {m}")
    assert result.top_token.dtype == torch.int64
    assert torch.equal(result.top_token.cpu(), ref["top_token"]), "top_token"


def reference_gradient(logits, concepts, temperature, weights):
    """d/dlogits of sum(w1 log_mass + w2 mass) + sum(w3 lse), by autograd of the float64 reference."""
    z = logits.detach().cpu().double().requires_grad_()
    ref = reference.concept_mass(z, concepts.token_ids.cpu(), concepts.offsets.cpu(), temperature=temperature)
    w1, w2, w3 = (w.cpu().double() for w in weights)
    ((w1 * ref["log_mass"]).sum() + (w2 * ref["mass"]).sum() + (w3 * ref["lse"]).sum()).backward()
    return z.grad


def fused_gradient(logits, concepts, temperature, weights):
    z = logits.detach().clone().requires_grad_()
    result = fp.concept_mass(z, concepts, temperature=temperature)
    w1, w2, w3 = weights
    ((w1 * result.log_mass).sum() + (w2 * result.mass).sum() + (w3 * result.lse).sum()).backward()
    return z.grad


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference(target, dtype, temperature):
    _, device = target
    for num_tokens, vocab, num_concepts in shapes_for(target):
        logits = (3 * torch.randn(num_tokens, vocab)).to(device=device, dtype=dtype)
        concepts = random_concepts(vocab, num_concepts, device=device)
        result = fp.concept_mass(logits, concepts, temperature=temperature)
        assert_matches(result, expected(logits, concepts, temperature))


def test_statistics_in_a_second_launch(target, monkeypatch):
    """FASTPROBE_CONCEPTS_STATS=separate: the Triton forward leaves the concept statistics to a
    second kernel (one program per row and tile of concepts); the same values."""
    _, device = target
    monkeypatch.setenv("FASTPROBE_CONCEPTS_STATS", "separate")
    for num_tokens, vocab, num_concepts in shapes_for(target):
        logits = (3 * torch.randn(num_tokens, vocab)).to(device=device, dtype=torch.bfloat16)
        concepts = random_concepts(vocab, num_concepts, device=device)
        assert_matches(fp.concept_mass(logits, concepts, temperature=0.7), expected(logits, concepts, 0.7))


@pytest.mark.interpreter
def test_second_launch_folds_its_concept_tiles_onto_the_grid_y_limit(monkeypatch):
    """The statistics' second launch keeps rows on the grid's x axis and its tiles of concepts on
    y, whose size CUDA limits to 65535 (C > 4.2M concepts in tiles of 64 exceeded it): past the
    limit each program takes every limit-th tile. With the limit lowered to 2, 3 and 5 tiles of
    4 concepts fold onto 2 programs per row and give the reference's values."""
    from fastprobe.kernels import concepts as triton_concepts

    kernel, grids = triton_concepts._concept_stats_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(triton_concepts, "_concept_stats_kernel", Recorder())
    monkeypatch.setattr(triton_concepts, "_GRID_Y_LIMIT", 2, raising=False)
    monkeypatch.setenv("FASTPROBE_CONCEPTS_STATS", "separate")
    fp.set_backend("triton")
    for num_concepts in (12, 17):  # 3 tiles; 5 tiles, the last one ragged
        logits = 3 * torch.randn(3, 70)
        concepts = random_concepts(70, num_concepts)
        assert_matches(fp.concept_mass(logits, concepts), expected(logits, concepts))
    assert grids == [(3, 2), (3, 2)]


@pytest.mark.interpreter
def test_vocabulary_blocks_of_several_id_blocks(monkeypatch):
    """The kernels find a vocabulary block's concept ids through the ConceptSet's id blocks of
    256 ids: on a GPU a block (2048 or 4096 ids) spans several, under the interpreter's usual
    256-id block only one, so a block that read only its first id block's ids passed there.
    Blocks of 1024 ids (4 id blocks; the second ragged), concepts with ids in every id block:
    the forward and the backward against the reference."""
    from fastprobe.kernels import concepts as triton_concepts

    monkeypatch.setitem(triton_concepts._INTERPRET_BLOCKS, "BLOCK_V", 1024)
    fp.set_backend("triton")
    vocab = 1500
    logits = 3 * torch.randn(3, vocab)
    concepts = fp.ConceptSet.from_ids([[5, 300, 700, 900], [260, 1030, 1499], [600], [1300, 40, 555]])
    assert_matches(fp.concept_mass(logits, concepts, temperature=0.8), expected(logits, concepts, 0.8))
    weights = [torch.randn(3, 4), torch.randn(3, 4), torch.randn(3)]
    torch.testing.assert_close(fused_gradient(logits, concepts, 0.8, weights).double(),
                               reference_gradient(logits, concepts, 0.8, weights), rtol=RTOL, atol=ATOL)


def test_masked_vocabulary(target):
    """-inf logits contribute nothing: a masked region, scattered masks, a concept masked
    everywhere (mass 0, log_mass -inf, top_share 0, entropy 0, its first variant on top)."""
    _, device = target
    num_tokens, vocab, num_concepts = shapes_for(target)[0]
    logits = 2 * torch.randn(num_tokens, vocab)
    logits[:, vocab // 3 : vocab // 2] = float("-inf")
    logits[torch.rand_like(logits) < 0.2] = float("-inf")
    logits[:, 0] = 0.0  # every row keeps a token
    lists = [[vocab // 3, vocab // 3 + 1, vocab // 3 + 2], [vocab // 3 + 3, 0, vocab - 1]]
    lists += [torch.randperm(vocab)[:5].tolist() for _ in range(num_concepts)]
    concepts = fp.ConceptSet.from_ids(lists).to(device)
    logits = logits.to(device)
    result = fp.concept_mass(logits, concepts)
    assert_matches(result, expected(logits, concepts))
    assert (result.mass[:, 0] == 0).all() and (result.log_mass[:, 0] == float("-inf")).all()
    assert (result.top_share[:, 0] == 0).all() and (result.concentration_entropy[:, 0] == 0).all()
    assert (result.top_token[:, 0] == vocab // 3).all()
    assert (result.top_share[:, 1] > 0).all()  # token 0 is never masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_logits(target, dtype):
    """Logits of magnitude 1e4: masses underflow to 0 or saturate at 1 without NaN, and the
    within-concept statistics stay exact because they never divide by the mass."""
    _, device = target
    num_tokens, vocab, num_concepts = shapes_for(target)[0]
    logits = (1e4 * torch.randn(num_tokens, vocab)).to(device=device, dtype=dtype)
    concepts = random_concepts(vocab, num_concepts, device=device)
    result = fp.concept_mass(logits, concepts)
    assert_matches(result, expected(logits, concepts), rtol=1e-4, atol=1e-4)


def test_log_mass_under_temperature_with_logits_further_apart_than_float32_max(target):
    """log_mass = (m_c - M) / T + (ln s_c - ln S): m_c - M overflowed to -inf for a concept near
    -3e38 in a row whose largest logit is 3e38, although at T = 2.5 log_mass is ~ -2.4e38,
    finite in float32 (both kernels gave -inf)."""
    _, device = target
    num_tokens, vocab, _ = shapes_for(target)[0]
    logits = torch.randn(num_tokens, vocab)
    logits[:, 3], logits[:, 5], logits[:, 6] = 3e38, -3e38, -2.9e38
    concepts = fp.ConceptSet.from_ids([[5, 6], [0, 1], [3]]).to(device)
    result = fp.concept_mass(logits.to(device), concepts, temperature=2.5)
    want = expected(logits, concepts, 2.5)
    assert (want["log_mass"][:, 0] > -3.4e38).all() and (want["log_mass"][:, 0] < -1e38).all()
    assert_matches(result, want, rtol=1e-5, atol=1e-5)


def test_overlapping_and_single_variant_concepts(target):
    """A concept repeated, split into disjoint parts, a single-variant concept, and the
    whole vocabulary: the masses add up as they should."""
    _, device = target
    num_tokens, vocab, _ = shapes_for(target)[0]
    logits = (2 * torch.randn(num_tokens, vocab)).to(device)
    ids = torch.randperm(vocab)[:6].tolist()
    concepts = fp.ConceptSet.from_ids([ids, ids[:3], ids[3:], ids, [ids[0]], list(range(vocab))]).to(device)
    result = fp.concept_mass(logits, concepts, temperature=1.3)
    assert_matches(result, expected(logits, concepts, 1.3))
    mass = result.mass.double()
    torch.testing.assert_close(mass[:, 0], mass[:, 1] + mass[:, 2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.mass[:, 0], result.mass[:, 3], rtol=0, atol=0)
    torch.testing.assert_close(result.mass[:, 5], torch.ones_like(result.mass[:, 5]), rtol=1e-5, atol=1e-5)
    assert (result.top_share[:, 4] == 1).all() and (result.concentration_entropy[:, 4] == 0).all()
    assert (result.top_token[:, 4] == ids[0]).all()


def test_non_contiguous_logits(target):
    """A strided view (vocabulary stride 2, rows of the transpose) gives the same answer."""
    _, device = target
    num_tokens, vocab, num_concepts = shapes_for(target)[0]
    logits = torch.randn(2 * vocab, num_tokens, device=device).t()[:, ::2]
    assert not logits.is_contiguous() and logits.stride(1) != 1
    concepts = random_concepts(vocab, num_concepts, device=device)
    assert_matches(fp.concept_mass(logits, concepts), expected(logits, concepts))


def test_inputs_untouched_and_outputs_fresh(target):
    _, device = target
    logits = torch.randn(4, 33, device=device)
    concepts = fp.ConceptSet.from_ids([[1, 2], [2, 30]]).to(device)
    copies = logits.clone(), concepts.token_ids.clone(), concepts.offsets.clone()
    first = fp.concept_mass(logits, concepts)
    second = fp.concept_mass(logits, concepts)
    for original, copy in zip((logits, concepts.token_ids, concepts.offsets), copies):
        assert torch.equal(original, copy)
    assert first.mass.data_ptr() != second.mass.data_ptr()
    torch.testing.assert_close(first.mass, second.mass, rtol=0, atol=0)


def test_empty_token_axis(target):
    _, device = target
    result = fp.concept_mass(torch.randn(0, 9, device=device), fp.ConceptSet.from_ids([[1], [2, 3]]).to(device))
    assert result.mass.shape == (0, 2) and result.top_token.shape == (0, 2) and result.lse.shape == (0,)


# ---------------------------------------------------------------- gradient


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradient_matches_autograd_of_reference(target, dtype):
    """The fused backward of log_mass (and of mass and lse, which reach the logits through
    it) against autograd of the float64 reference; overlapping concepts accumulate."""
    _, device = target
    num_tokens, vocab, num_concepts = shapes_for(target)[0]
    logits = (3 * torch.randn(num_tokens, vocab)).to(device=device, dtype=dtype)
    concepts = random_concepts(vocab, num_concepts, device=device)
    weights = [torch.randn(num_tokens, num_concepts, device=device), torch.randn(num_tokens, num_concepts, device=device),
               torch.randn(num_tokens, device=device)]
    got = fused_gradient(logits, concepts, 0.8, weights)
    assert got.dtype == dtype and got.shape == logits.shape and not torch.isnan(got).any()
    rtol, atol = GRAD_TOLERANCE[dtype]
    torch.testing.assert_close(got.cpu().double(), reference_gradient(logits, concepts, 0.8, weights), rtol=rtol, atol=atol)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_gradient_at_extreme_logits(target, temperature):
    """Logits ~1e4, concepts near the row's max and one 2e4 below it: the backward forms log p
    from the forward's float64 lse as (x - shift) / T - offset, and q = p / mass from the
    concept's own largest variant, so the gradient keeps float32 accuracy (x / T - lse in float32,
    or q from the float32 log_mass ~ -2e4 / T, would be off by ~1e-3 relative here)."""
    _, device = target
    num_tokens, vocab, _ = shapes_for(target)[0]
    logits = 1e4 * torch.randn(num_tokens, vocab)
    top = logits.amax(-1, keepdim=True)
    logits[:, :6] = top + 0.5 - 0.7 * torch.arange(6)  # token 0 is the new max, the rest close by
    logits[:, 6:8] = top - 2e4 - 0.6 * torch.arange(2)  # a concept far below the max
    concepts = fp.ConceptSet.from_ids([[0, 2], [1, 3, 4], [5], [2, 5, vocab - 1], [6, 7]]).to(device)
    logits = logits.to(device)
    weights = [torch.randn(num_tokens, 5, device=device), torch.randn(num_tokens, 5, device=device),
               torch.randn(num_tokens, device=device)]
    got = fused_gradient(logits, concepts, temperature, weights)
    torch.testing.assert_close(got.cpu().double(), reference_gradient(logits, concepts, temperature, weights),
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("largest, temperature", [(12.0, 1e-11), (1e17, 1.0), (12.0, 1e-16), (12.0, 1e-30)],
                         ids=["max-over-T-1e12", "logits-1e17", "max-over-T-1e17", "max-over-T-1e31"])
def test_tied_row_max_at_extreme_max_over_temperature(target, largest, temperature):
    """A row whose largest logit is tied (twice, and three times in row 1) at |max / T| from 1e12
    (T = 1e-11 with ordinary logits) to 1e31: p = 1/2 (1/3) for each tied logit. The backward
    formed log p from the float64 lse = max / T + ln S, which holds ln S only to |max / T| 2^-53:
    the gradient was 3e-5 / T off at 1e12, and from 1e17 each tied p was 1 (ln 2 lost). Now the
    forward keeps the row's max and ln S apart for it. The forward's statistics are checked too."""
    _, device = target
    num_tokens, vocab, _ = shapes_for(target)[0]
    logits = largest / 4 * torch.randn(num_tokens, vocab).clamp(-3, 3)
    logits[:, :2] = largest
    logits[1, 2] = largest
    concepts = fp.ConceptSet.from_ids([[0], [1, 3], [2], [0, 1], [4, vocab - 1]]).to(device)
    logits = logits.to(device)
    assert_matches(fp.concept_mass(logits, concepts, temperature=temperature), expected(logits, concepts, temperature),
                   rtol=1e-5, atol=1e-5)
    weights = [torch.randn(num_tokens, 5, device=device), torch.randn(num_tokens, 5, device=device),
               torch.randn(num_tokens, device=device)]
    got = fused_gradient(logits, concepts, temperature, weights)
    want = reference_gradient(logits, concepts, temperature, weights)
    assert want.abs().max() > 0.1 / temperature  # (gradients are of size 1 / T)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=2e-6 / temperature)


@pytest.mark.parametrize("temperature", [1e-30, 1e30])
def test_temperature_range_ends(target, temperature):
    """The ends of the temperatures taken: values as the reference's, and at 1e30 gradients too
    (of size 1 / T, compared relatively; at ~1e38 the log-softmax's shift lse * T overflowed
    float32 and the gradient was NaN); beyond them a ValueError before any kernel runs."""
    _, device = target
    num_tokens, vocab, _ = shapes_for(target)[0]
    logits = (3 * torch.randn(num_tokens, vocab)).to(device)
    concepts = fp.ConceptSet.from_ids([[0, 2], [1, 3, 4], [5]]).to(device)
    assert_matches(fp.concept_mass(logits, concepts, temperature=temperature), expected(logits, concepts, temperature))
    if temperature > 1.0:
        weights = [torch.randn(num_tokens, 3, device=device), torch.randn(num_tokens, 3, device=device),
                   torch.randn(num_tokens, device=device)]
        got = fused_gradient(logits, concepts, temperature, weights)
        want = reference_gradient(logits, concepts, temperature, weights)
        assert want.abs().max() > 1e-33
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-6 / temperature)
    with pytest.raises(ValueError, match=r"temperature must be a number in \[1e-30, 1e30\]"):
        fp.concept_mass(logits, concepts, temperature=temperature * 10 if temperature > 1 else temperature / 10)


def test_float64_gradient_at_the_smallest_temperature():
    """float64 runs the reference backward formula: at T = 1e-30 it forms p by a softmax (the row's
    max first), not exp(x / T - lse), which loses p where x / T ~ 1e30 (an ulp of ~1e14)."""
    logits = 3 * torch.randn(3, 40, dtype=torch.float64)
    concepts = fp.ConceptSet.from_ids([[0, 2], [1, 3, 4], [5]])
    weights = [torch.randn(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64),
               torch.randn(3, dtype=torch.float64)]
    got = fused_gradient(logits, concepts, 1e-30, weights)
    want = reference_gradient(logits, concepts, 1e-30, weights)
    assert want.abs().max() > 1e29
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())


def test_gradient_of_log_mass_only_with_masked_concepts(target):
    """Only log_mass in the loss (mass and lse get zero gradient), strided logits, and a
    concept masked everywhere, whose gradient is 0 by convention."""
    _, device = target
    num_tokens, vocab, _ = shapes_for(target)[0]
    logits = torch.randn(vocab, num_tokens).t()
    logits[:, 5:9] = float("-inf")
    concepts = fp.ConceptSet.from_ids([[5, 6, 7], [1, 2, 3, 5], [2, 3], [vocab - 1]]).to(device)
    logits = logits.to(device)
    weights = [torch.randn(num_tokens, 4, device=device), torch.zeros(num_tokens, 4, device=device),
               torch.zeros(num_tokens, device=device)]
    got = fused_gradient(logits, concepts, 1.0, weights)
    want = reference_gradient(logits, concepts, 1.0, weights)
    assert not torch.isnan(want).any()
    torch.testing.assert_close(got.cpu().double(), want, rtol=RTOL, atol=ATOL)
    # d log_mass / dz sums to 0 over the vocabulary (shifting all logits changes nothing)
    torch.testing.assert_close(got.sum(-1), torch.zeros(num_tokens, device=device), rtol=0, atol=1e-5)


def test_non_differentiable_outputs(target):
    _, device = target
    logits = torch.randn(3, 20, device=device, requires_grad=True)
    result = fp.concept_mass(logits, fp.ConceptSet.from_ids([[1, 2]]).to(device))
    assert result.log_mass.requires_grad and result.mass.requires_grad and result.lse.requires_grad
    assert not result.top_share.requires_grad and not result.concentration_entropy.requires_grad
    assert not result.top_token.requires_grad


# ---------------------------------------------------------------- properties


@settings(max_examples=40, deadline=None)
@given(
    num_tokens=st.integers(1, 5),
    vocab=st.integers(2, 300),
    scale=st.sampled_from([0.01, 1.0, 10.0, 300.0]),
    temperature=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_properties(num_tokens, vocab, scale, temperature, seed):
    """0 <= mass <= 1, disjoint concepts sum to <= 1, top_share in (0, 1],
    0 <= entropy <= log |c|, mass = exp(log_mass), top_token in its concept (C++ backend)."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(num_tokens, vocab, generator=generator)
    order = torch.randperm(vocab, generator=generator).tolist()
    cuts = sorted(torch.randint(1, vocab, (min(6, vocab - 1),), generator=generator).unique().tolist())
    disjoint = [order[a:b] for a, b in zip([0] + cuts, cuts + [vocab])]
    concepts = fp.ConceptSet.from_ids(disjoint)
    result = fp.concept_mass(logits, concepts, temperature=temperature)
    slack = 1e-5
    assert ((result.mass >= 0) & (result.mass <= 1 + slack)).all()
    assert (result.mass.sum(-1) <= 1 + slack).all()
    assert ((result.top_share > 0) & (result.top_share <= 1 + slack)).all()
    sizes = torch.tensor([len(ids) for ids in disjoint], dtype=torch.float32)
    assert ((result.concentration_entropy >= -slack) & (result.concentration_entropy <= sizes.log() + slack)).all()
    torch.testing.assert_close(result.mass, result.log_mass.exp(), rtol=1e-6, atol=0)
    for c, ids in enumerate(disjoint):
        assert set(result.top_token[:, c].tolist()) <= set(ids)


# ---------------------------------------------------------------- ConceptSet


def test_concept_set_csr_and_deduplication():
    concepts = fp.ConceptSet(torch.tensor([4, 2, 4, 9, 2, 2, 7], dtype=torch.int32), [0, 3, 4, 7], names=["a", "b", "c"])
    assert len(concepts) == 3 and concepts.names == ("a", "b", "c")
    assert concepts.token_ids.dtype == torch.int64
    assert [concepts.variant_ids(c) for c in range(3)] == [[4, 2], [9], [2, 7]]  # first occurrences kept, in order
    assert concepts.offsets.tolist() == [0, 2, 3, 5]
    assert concepts.max_id == 9
    assert "3 concepts" in repr(concepts)
    same = fp.ConceptSet.from_ids({"a": [4, 2], "b": [9], "c": [2, 7]})
    assert torch.equal(same.token_ids, concepts.token_ids) and same.names == concepts.names
    assert concepts.to("cpu") is concepts


def test_concept_set_index_cannot_be_changed_through_its_properties():
    """token_ids and offsets are copies: the statistics rest on the index checked on construction
    (an id set >= V in place would be refused by the C++ kernels and skipped by the Triton ones)."""
    concepts = fp.ConceptSet.from_ids([[4, 2], [9]])
    concepts.token_ids[0] = 10**6
    concepts.offsets[1] = 0
    assert concepts.token_ids.tolist() == [4, 2, 9] and concepts.offsets.tolist() == [0, 2, 3]
    logits = torch.randn(3, 16)
    torch.testing.assert_close(fp.concept_mass(logits, concepts).mass,
                               fp.reference.concept_mass(logits.double(), torch.tensor([4, 2, 9]), torch.tensor([0, 2, 3]))["mass"].float())


def bad_sets():
    return [
        ("float ids", ([1.0, 2.0], [0, 2]), TypeError, "token_ids must hold integers"),
        ("float tensor ids", (torch.tensor([1.0]), [0, 1]), TypeError, "token_ids"),
        ("bool ids", (torch.tensor([True]), [0, 1]), TypeError, "token_ids"),
        ("float offsets", ([1, 2], [0.0, 2.0]), TypeError, "offsets must hold integers"),
        ("meta ids", (torch.tensor([1, 2], device="meta"), torch.tensor([0, 2], device="meta")), ValueError,
         "token_ids is a meta tensor"),
        ("2-D ids", (torch.tensor([[1, 2]]), [0, 2]), ValueError, "token_ids must be 1-D"),
        ("negative id", ([1, -3], [0, 1, 2]), ValueError, r"token_ids must be >= 0, got -3 in concept 1"),
        ("id beyond int32", ([1, 2**40], [0, 1, 2]), ValueError, r"token_ids must be < 2\*\*31 .*, got 1099511627776 in concept 1"),
        ("uint64 id past int64", (torch.tensor([1, 2**64 - 1], dtype=torch.uint64), [0, 2]), ValueError,
         r"token_ids must hold values below 2\*\*63 \(int64\), got 18446744073709551615"),  # (it said -1)
        ("uint64 offset past int64", ([1, 2], torch.tensor([0, 2**63], dtype=torch.uint64)), ValueError,
         r"offsets must hold values below 2\*\*63 \(int64\), got 9223372036854775808"),
        ("offsets start", ([1, 2], [1, 2]), ValueError, "start at 0"),
        ("offsets end", ([1, 2, 3], [0, 2]), ValueError, "end at len"),
        ("offsets decrease", ([1, 2, 3], [0, 2, 1, 3]), ValueError, "non-decreasing"),
        ("empty concept", ([1, 2], [0, 1, 1, 2]), ValueError, "concept 1 is empty"),
        ("no concepts", ([], [0]), ValueError, "at least one concept"),
        ("names length", ([1, 2], [0, 1, 2], ["a"]), ValueError, "names has 1 entries"),
        ("names type", ([1, 2], [0, 1, 2], "ab"), TypeError, "names"),
        ("offsets device", (torch.tensor([1, 2]), torch.tensor([0, 2], device="meta")), ValueError,
         "offsets is on meta but token_ids is on cpu"),
    ]


@pytest.mark.parametrize("case", bad_sets(), ids=lambda case: case[0])
def test_bad_concept_set_raises_clear_error(case):
    _, args, error, words = case
    with pytest.raises(error, match=words):
        fp.ConceptSet(*args)


def test_empty_concept_error_names_it():
    with pytest.raises(ValueError, match=r"concept 1 \('b'\) is empty"):
        fp.ConceptSet.from_ids({"a": [1], "b": []})


# ---------------------------------------------------------------- ConceptSet.from_answers


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE trained here on a tiny corpus: " Paris" and "Paris" are distinct
    single tokens, "paris" and "PARIS" are not single tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus = [
        "The capital of France is Paris.", "Paris is lovely in spring.", "I went to paris once.",
        "London is the capital of England.", "Lyon and Marseille are cities.", "He said London twice.",
        "Berlin is in Germany.", "We met in Berlin and Paris and London.",
    ] * 30
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.fixture(scope="module")
def wordpiece_tokenizer():
    """An uncased WordPiece (BERT-style normaliser: lower-cases, strips accents)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import models, normalizers, pre_tokenizers

    words = ["[UNK]", "[CLS]", "[SEP]", "paris", "london", "new", "york", "zurich", "the", "is", "##s"]
    tokenizer = tokenizers.Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def encode(tokenizer, text):
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def test_from_answers_byte_level_bpe(bpe_tokenizer):
    tok = bpe_tokenizer
    concepts = fp.ConceptSet.from_answers(tok, {"Paris": ["Paris"], "London": "London", "Berlin": ["Berlin"]})
    assert concepts.names == ("Paris", "London", "Berlin")
    paris, space_paris = encode(tok, "Paris"), encode(tok, " Paris")
    assert len(paris) == len(space_paris) == 1 and paris != space_paris  # the leading space matters
    assert sorted(concepts.variant_ids(0)) == sorted([paris[0], space_paris[0]])
    # lower and upper case are multi-token here: recorded as sequences, never in the CSR
    assert encode(tok, " paris") in concepts.multi_token[0] and encode(tok, "PARIS") in concepts.multi_token[0]
    texts = {v.text for v in concepts.variants[0]}
    assert {"Paris", " Paris", "paris", " paris", "PARIS", " PARIS"} <= texts
    assert all(v.single_token == (len(v.token_ids) == 1) for v in concepts.variants[0])
    # " paris" starts with the bare-space token: a prefix kept apart from the single-token mass
    space_token = encode(tok, " paris")[0]
    assert space_token in concepts.multi_token_prefixes[0]
    assert space_token not in concepts.variant_ids(0)
    # "Berlin" is one token but " Berlin" is two (the corpus never has it after a space)
    assert concepts.variant_ids(2) == [encode(tok, "Berlin")[0]]
    assert encode(tok, " Berlin") in concepts.multi_token[2]

    logits = torch.randn(4, len(tok))
    result = fp.concept_mass(logits, concepts)
    p = torch.softmax(logits.double(), -1)
    torch.testing.assert_close(result.mass[:, 0].double(), p[:, [paris[0], space_paris[0]]].sum(-1), rtol=1e-5, atol=1e-7)


def test_from_answers_variant_options(bpe_tokenizer):
    tok = bpe_tokenizer
    as_given = fp.ConceptSet.from_answers(tok, {"Paris": [" Paris"]}, variants=())
    assert as_given.variant_ids(0) == list(encode(tok, " Paris")) and as_given.multi_token == ((),)
    no_space = fp.ConceptSet.from_answers(tok, ["Paris", "London"], variants=("lower",))
    assert no_space.names == ("Paris", "London")
    assert {v.text for v in no_space.variants[0]} == {"Paris", "paris"}
    custom = fp.ConceptSet.from_answers(tok, {"x": ["Paris"]}, variants=lambda alias: [alias, " " + alias])
    assert sorted(custom.variant_ids(0)) == sorted(encode(tok, "Paris") + encode(tok, " Paris"))
    with pytest.raises(ValueError, match="variants must name forms"):
        fp.ConceptSet.from_answers(tok, {"Paris": ["Paris"]}, variants=("spaces",))
    with pytest.raises(ValueError, match=r"no single-token variant under this tokenizer for 'Rome'"):
        fp.ConceptSet.from_answers(tok, {"Paris": ["Paris"], "Rome": ["Rome"]})
    with pytest.raises(ValueError, match="non-empty list of alias strings"):
        fp.ConceptSet.from_answers(tok, {"Paris": []})
    # a blank alias (datasets have them) would score the whitespace token: it is left out
    with_blank = fp.ConceptSet.from_answers(tok, {"Paris": ["Paris", "", "  "]})
    assert with_blank.variants == fp.ConceptSet.from_answers(tok, {"Paris": ["Paris"]}).variants
    with pytest.raises(ValueError, match="not all blank"):
        fp.ConceptSet.from_answers(tok, {"Paris": ["", " "]})
    with pytest.raises(TypeError, match="mapping"):
        fp.ConceptSet.from_answers(tok, "Paris")


@pytest.mark.parametrize("concepts, words", [
    ([1, 2, 3], r"concepts\[0\] must be a list of token ids .* got 1; one concept of ids 12 and 40 is \[\[12, 40\]\]"),
    (torch.tensor([1, 2, 3]), r"concepts\[0\] must be a list of token ids"),
    ({"a": 1}, r"concepts\['a'\] must be a list of token ids"),
    ([[1], "ab"], r"concepts\[1\] must be a list of token ids"),
    ("abc", "concepts must be a mapping {name: token ids} or a list of token-id lists, got str"),
    (None, "concepts must be a mapping .* got NoneType"),
], ids=["flat list", "flat tensor", "mapping to ids", "a string concept", "string", "None"])
def test_from_ids_refuses_what_is_not_one_list_per_concept(concepts, words):
    """A flat list of ids (it crashed in numpy, or read a string as ids), a string, None: a
    TypeError naming concepts (or the entry that is not a list)."""
    with pytest.raises(TypeError, match=words):
        fp.ConceptSet.from_ids(concepts)


def test_from_answers_checks_its_arguments(bpe_tokenizer):
    """tokenizer None (or a model name), answers None or with a value that is no alias list,
    variants neither names nor a callable: a TypeError naming the argument before any encoding
    (they failed deep inside with AttributeError / 'int' object is not iterable). One variant
    name given as a string is that one name (it was split into its letters)."""
    tok = bpe_tokenizer
    for tokenizer in (None, "gpt2"):
        with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
            fp.ConceptSet.from_answers(tokenizer, ["Paris"])
    with pytest.raises(TypeError, match="answers must be a mapping .* got NoneType"):
        fp.ConceptSet.from_answers(tok, None)
    with pytest.raises(TypeError, match=r"answers\['Paris'\] must be an alias string or a list of alias strings"):
        fp.ConceptSet.from_answers(tok, {"Paris": 1})
    for empty in ({}, []):
        with pytest.raises(ValueError, match="answers is empty: need at least one concept"):
            fp.ConceptSet.from_answers(tok, empty)
    for variants in (None, 5):
        with pytest.raises(TypeError, match="variants must be a collection of form names"):
            fp.ConceptSet.from_answers(tok, ["Paris"], variants=variants)
    one_name = fp.ConceptSet.from_answers(tok, {"Paris": ["Paris"]}, variants="space")
    assert one_name.variants == fp.ConceptSet.from_answers(tok, {"Paris": ["Paris"]}, variants=("space",)).variants
    assert answer_variants(tok, "Paris", "space") == answer_variants(tok, "Paris", ("space",))  # not its letters
    with pytest.raises(TypeError, match="variants must be a collection of form names"):
        answer_variants(tok, "Paris", 5)
    assert {v.text for v in one_name.variants[0]} == {"Paris", " Paris"}


def test_from_answers_wordpiece_normalisation(wordpiece_tokenizer):
    """An uncased WordPiece maps every case and space form to one token, strips accents,
    and an alias it does not know ([UNK]) is dropped rather than scored."""
    tok = wordpiece_tokenizer
    concepts = fp.ConceptSet.from_answers(
        tok, {"Paris": ["Paris"], "Zurich": ["Zürich", "ZRH"], "New York": ["New York", "NYC", "york"]}
    )
    assert concepts.variant_ids(0) == [tok.convert_tokens_to_ids("paris")]
    assert len(concepts.variants[0]) == 1  # Paris, paris, " PARIS", ... are one variant
    assert concepts.variant_ids(1) == [tok.convert_tokens_to_ids("zurich")]  # ZRH is [UNK]: dropped
    new, york = tok.convert_tokens_to_ids(["new", "york"])
    assert concepts.variant_ids(2) == [york] and concepts.multi_token[2] == ((new, york),)
    assert concepts.multi_token_prefixes[2] == (new,)


def metaspace_tokenizer(scheme):
    """A SentencePiece-style Unigram whose words start with "▁": a Metaspace pre-tokenizer with
    prepend_scheme `scheme`, or ("legacy") Llama 2's normaliser that prepends "▁" and replaces spaces."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import models, normalizers, pre_tokenizers

    pieces = ["<unk>", "▁Paris", "Paris", "▁paris", "paris", "▁", "\n", "P", "a", "r", "i", "s", "A", ":"]
    tokenizer = tokenizers.Tokenizer(models.Unigram([(piece, -float(len(pieces) - len(piece))) for piece in pieces],
                                                    unk_id=0))
    if scheme == "legacy":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


@pytest.mark.parametrize("scheme", ["always", "first", "never", "legacy"])
def test_from_answers_metaspace_keeps_the_form_without_a_space(scheme):
    """Alone at the start, a Metaspace tokenizer gives "Paris" the word-start token of " Paris"
    ("always", "first"), and Llama 2's normaliser gives " Paris" a spare "▁": the no-space form's
    own token ("A:Paris" ends in it) was never found. Forms are encoded as continuations."""
    tokenizer = metaspace_tokenizer(scheme)
    ids = tokenizer.convert_tokens_to_ids
    assert encode(tokenizer, "A:Paris")[-1] == ids("Paris")
    variants = {variant.token_ids for variant in answer_variants(tokenizer, "Paris", ("space",))}
    assert variants == {(ids("Paris"),), (ids("▁Paris"),)}
    concepts = fp.ConceptSet.from_answers(tokenizer, {"Paris": ["Paris"]}, variants=("space", "lower"))
    assert sorted(concepts.variant_ids(0)) == sorted(ids(["Paris", "▁Paris", "paris", "▁paris"]))


def test_from_answers_drops_unknown_forms_of_a_tokenizers_tokenizer(wordpiece_tokenizer):
    """A tokenizers.Tokenizer has no unk_token_id: its model's unk_token tells the forms to drop."""
    raw = wordpiece_tokenizer.backend_tokenizer
    assert not hasattr(raw, "unk_token_id")
    concepts = fp.ConceptSet.from_answers(raw, {"Paris": ["Paris"], "Zurich": ["Zürich", "ZRH"]})
    assert concepts.variant_ids(0) == [raw.token_to_id("paris")]
    assert concepts.variant_ids(1) == [raw.token_to_id("zurich")]  # ZRH is [UNK]: dropped


def test_from_answers_drops_unknown_forms_when_the_config_names_no_unk_token(wordpiece_tokenizer):
    """A fast tokenizer made without unk_token= has unk_token_id None, yet its WordPiece model still
    maps unknown words to [UNK]: those forms were kept, scoring the unknown token."""
    transformers = pytest.importorskip("transformers")
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=wordpiece_tokenizer.backend_tokenizer)
    assert bare.unk_token_id is None and encode(bare, "ZRH") == (bare.convert_tokens_to_ids("[UNK]"),)
    concepts = fp.ConceptSet.from_answers(bare, {"Zurich": ["Zürich", "ZRH"]})
    assert concepts.variant_ids(0) == [bare.convert_tokens_to_ids("zurich")]


# ---------------------------------------------------------------- bad input


def bad_calls():
    logits = torch.randn(4, 10)
    concepts = fp.ConceptSet.from_ids({"a": [1, 2], "far": [3, 10]})
    small = fp.ConceptSet.from_ids([[1, 2]])
    return [
        ("id past V", (logits, concepts), {}, ValueError, r"token id 10 of concept 1 \('far'\) is outside .* \[0, 10\)"),
        ("not a set", (logits, [[1, 2]]), {}, TypeError, "concepts must be a fastprobe.ConceptSet"),
        ("1-D logits", (torch.randn(10), small), {}, ValueError, r"logits must have shape \[N, V\]"),
        ("integer logits", (torch.randint(0, 5, (4, 10)), small), {}, TypeError, "logits"),
        ("empty V", (torch.randn(4, 0), small), {}, ValueError, "V = 0"),
        ("other device", (logits, small.to("meta")), {}, ValueError, r"concepts is on meta .* concepts.to"),
        ("temperature zero", (logits, small), {"temperature": 0.0}, ValueError, "temperature"),
        ("temperature nan", (logits, small), {"temperature": float("nan")}, ValueError, "temperature"),
        ("temperature str", (logits, small), {"temperature": "1"}, TypeError, "temperature"),
        ("not a tensor", ([[1.0, 2.0]], small), {}, TypeError, "logits"),
    ]


@pytest.mark.parametrize("case", bad_calls(), ids=lambda case: case[0])
def test_bad_input_raises_clear_error(case):
    _, args, kwargs, error, words = case
    real = [a for a in args if isinstance(a, torch.Tensor)]
    copies = [a.clone() for a in real]
    with pytest.raises(error, match=words):
        fp.concept_mass(*args, **kwargs)
    for original, copy in zip(real, copies):
        assert torch.equal(original, copy)


def test_cpp_kernel_checks_ids_itself():
    """With the Python checks bypassed (the op called directly), the C++ kernels still refuse
    ids and offsets that would read outside their buffers."""
    from fastprobe.ops.concepts import _concept_mass_op, _concept_mass_backward_op

    fp.set_backend("cpp")
    logits = torch.randn(3, 10)
    index = list(fp.ConceptSet.from_ids([[1, 2], [3]])._index)
    for position, bad, words in [(0, [1, 2, 10], "token_ids"), (0, [1, -1, 3], "token_ids"),
                                 (1, [0, 2, 4], "offsets"), (1, [0, 3, 2], "offsets"),
                                 (1, [0, 3, 3], "offsets has an empty entry at 1"),  # would read token_ids[3]
                                 (1, [0, 2, 2, 3], "offsets has an empty entry at 1")]:
        args = list(index)
        args[position] = torch.tensor(bad)
        with pytest.raises(IndexError, match=words):
            _concept_mass_op(logits, *args, 1.0)
    _, log_mass, top_share, _, top_token, lse, row_state = _concept_mass_op(logits, *index, 1.0)
    grad = torch.ones_like(log_mass)
    vocab_ids, vocab_offsets, vocab_concepts, _, starts = index[2:]
    with pytest.raises(IndexError, match="vocab_ids"):
        _concept_mass_backward_op(grad, lse, logits, top_share, top_token, row_state, torch.tensor([1, 2, 99]), vocab_offsets,
                                  vocab_concepts, starts, 1.0)
    with pytest.raises(IndexError, match="vocab_concepts"):
        _concept_mass_backward_op(grad, lse, logits, top_share, top_token, row_state, vocab_ids, vocab_offsets,
                                  torch.tensor([0, 0, 5]), starts, 1.0)
    for bad in (10, -1):  # the backward reads the logit at each concept's top_token
        hostile = top_token.clone()
        hostile[1, 0] = bad
        with pytest.raises(IndexError, match="top_token"):
            _concept_mass_backward_op(grad, lse, logits, top_share, hostile, row_state, vocab_ids, vocab_offsets,
                                      vocab_concepts, starts, 1.0)


# The Triton kernels read the index through the raw op unchecked (a check of its values would be a
# host sync): they mask every address it yields, so no value reaches outside a buffer. Hostile
# values for a valid index of V = 301 (two interpreter blocks of 256) and concepts
# [[1, 2], [3, 300], [7], [260, 2]]: T = 7 tokens, U = 6 distinct ids, id_block_starts [0, 4, 6].
HOSTILE_VOCAB = 301
HOSTILE_CONCEPTS = [[1, 2], [3, 300], [7], [260, 2]]
FORWARD_FIELDS = ("token_ids", "offsets", "vocab_ids", "vocab_offsets", "vocab_concepts", "token_slots",
                  "id_block_starts")
HOSTILE_FORWARD = [
    ("vocab_ids", [1, 2, 3, 7, 260, 301]),  # = V, inside the last block's range
    ("vocab_ids", [1, 2, 3, 7, 260, 5000]),
    ("vocab_ids", [-5, 2, 3, 7, 260, 300]),
    ("vocab_ids", [1, 2, 3, 7, 2**40, 300]),
    ("token_ids", [1, 2, 3, 999, 7, 260, -2]),
    ("offsets", [0, 2, 1, 5, 7]),  # decreasing
    ("offsets", [0, 2, 4, 5, 9]),  # past T
    ("offsets", [-3, 2, 4, 5, 7]),
    ("offsets", [0, 2, 4, 7, 7]),  # an empty last concept: its first variant would be token_ids[T]
    ("offsets", [0, 2, 2**40, 5, 7]),
    ("token_slots", [0, 1, 2, 6, 3, 4, 1]),  # = U
    ("token_slots", [0, -1, 2, 5, 3, 4, 1]),
    ("token_slots", [0, 1, 2, 2**40, 3, 4, 1]),
    ("id_block_starts", [0, 4, 9]),  # past U
    ("id_block_starts", [-2, 4, 6]),
    ("id_block_starts", [0, 6, 2]),  # decreasing
    ("id_block_starts", [0, 0, 6]),  # block 0's ids claimed by block 1
    ("id_block_starts", [0, 2**30, 2**30]),
]
HOSTILE_BACKWARD = [
    ("vocab_ids", [1, 2, 3, 7, 260, 301]),  # a write past the last row
    ("vocab_ids", [-1, 2, 3, 7, 260, 300]),
    ("vocab_ids", [1, 2, 3, 7, 260, 2**40]),
    ("vocab_offsets", [0, 1, 3, 2, 5, 6, 7]),  # decreasing
    ("vocab_offsets", [0, 1, 3, 4, 5, 6, 12]),  # past M
    ("vocab_offsets", [-4, 1, 3, 4, 5, 6, 7]),
    ("vocab_offsets", [0, 1, 3, 4, 5, 6, 2**40]),
    ("vocab_concepts", [0, 0, 4, 1, 2, 3, 1]),  # = C
    ("vocab_concepts", [0, 0, -1, 1, 2, 3, 1]),
    ("vocab_concepts", [0, 0, 3, 2**40, 2, 3, 1]),
    ("id_block_starts", [0, 4, 9]),
    ("id_block_starts", [-2, 4, 6]),
    ("id_block_starts", [0, 0, 6]),
]


def hostile_index(field, values):
    index = fp.ConceptSet.from_ids(HOSTILE_CONCEPTS)._index
    dtype = torch.int32 if field == "id_block_starts" else torch.int64
    return index._replace(**{field: torch.tensor(values, dtype=dtype)})


@pytest.mark.interpreter
@pytest.mark.parametrize("stats", ["fused", "separate"])
@pytest.mark.parametrize("case", HOSTILE_FORWARD, ids=lambda case: f"{case[0]}={case[1]}")
def test_triton_forward_reads_no_index_value_outside_its_buffers(case, stats, monkeypatch):
    """torch.ops.fastprobe.concept_mass with hostile index values on the Triton backend: every load,
    store and gather stays inside the buffers (checked by the interpreter), and the call ends
    (no loop runs to a hostile bound). The statistics of such a call are unspecified."""
    from fastprobe.ops.concepts import _concept_mass_op

    from ._interpreter_bounds import bounds_checked

    fp.set_backend("triton")
    monkeypatch.setenv("FASTPROBE_CONCEPTS_STATS", stats)
    logits = torch.randn(2, HOSTILE_VOCAB)
    with bounds_checked() as launches:
        _concept_mass_op(logits, *hostile_index(*case), 1.0)
    assert len(launches) == (2 if stats == "separate" else 1)


@pytest.mark.interpreter
@pytest.mark.parametrize("inv_temperature", [1e39, 1e-50])
def test_triton_refuses_an_inverse_temperature_float32_cannot_hold(inv_temperature):
    """The raw ops' inv_temperature reaches the Triton kernels as a float32: one that is not a
    positive finite float32 is refused, as by the C++ kernels, not run into NaN statistics."""
    from fastprobe.ops.concepts import _concept_mass_backward_op, _concept_mass_op

    fp.set_backend("triton")
    logits, index = torch.randn(2, 40), fp.ConceptSet.from_ids([[1, 2], [7]])._index
    with pytest.raises(ValueError, match="inv_temperature"):
        _concept_mass_op(logits, *index, inv_temperature)
    _, log_mass, top_share, _, top_token, lse, row_state = _concept_mass_op(logits, *index, 1.0)
    with pytest.raises(ValueError, match="inv_temperature"):
        _concept_mass_backward_op(log_mass, lse, logits, top_share, top_token, row_state, index.vocab_ids,
                                  index.vocab_offsets, index.vocab_concepts, index.id_block_starts, inv_temperature)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", HOSTILE_BACKWARD, ids=lambda case: f"{case[0]}={case[1]}")
def test_triton_backward_reads_and_writes_no_index_value_outside_its_buffers(case):
    """torch.ops.fastprobe.concept_mass_backward with hostile index values on the Triton backend:
    no load, store (the gradient's concept ids are written) or gather leaves its buffer."""
    from fastprobe.ops.concepts import _concept_mass_backward_op, _concept_mass_op

    from ._interpreter_bounds import bounds_checked

    fp.set_backend("triton")
    logits = torch.randn(2, HOSTILE_VOCAB)
    valid = hostile_index("token_ids", fp.ConceptSet.from_ids(HOSTILE_CONCEPTS).token_ids.tolist())
    _, log_mass, top_share, _, top_token, lse, row_state = _concept_mass_op(logits, *valid, 1.0)
    index = hostile_index(*case)
    with bounds_checked() as launches:
        _concept_mass_backward_op(torch.randn_like(log_mass), torch.randn_like(lse), logits, top_share, top_token,
                                  row_state, index.vocab_ids, index.vocab_offsets, index.vocab_concepts,
                                  index.id_block_starts, 1.0)
    assert len(launches) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_few_rows_split_the_work_and_keep_their_bits(dtype):
    """With fewer rows than threads (or fewer than twice as many, not a multiple of them) the C++
    kernels spread each row's vocabulary ranges (8192 logits, their log-sum-exps merged in a fixed
    order) and concept chunks (2048 concepts or variants; in the backward, vocabulary ids or
    memberships) over the threads: a row's statistics, lse and gradient are the same bits alone,
    in a batch and under any thread count, and match the reference. Chunks are cut by concept count and by variant count, one concept is
    longer than a chunk, one id belongs to more concepts than a chunk holds, a range is masked in
    one row, a concept is all -inf there, one row has logits ~1e4; float16 rows are strided."""
    from fastprobe.ops.concepts import _concept_mass_backward_op, _concept_mass_op

    num_tokens, vocab = 5, 3 * 8192 + 777  # four ranges, the last one short
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(num_tokens, vocab, generator=generator)
    logits[1, 8192:16384] = float("-inf")
    logits[3] *= 3e3
    logits[torch.rand(logits.shape, generator=generator) < 0.05] = float("-inf")
    logits[:, -1] = 0.0
    if dtype == torch.float16:  # (logits ~1e4 stay inside float16's range)
        logits = logits.t().contiguous().t()
    logits = logits.to(dtype)
    lists = [[7] + torch.randint(0, vocab, (3,), generator=generator).tolist() for _ in range(2500)]
    lists.append(torch.randperm(vocab, generator=generator)[:3000].tolist())
    lists.append(list(range(8200, 8210)))
    sizes = torch.randint(1, 9, (1500,), generator=generator).tolist()
    lists += [torch.randint(0, vocab, (size,), generator=generator).tolist() for size in sizes]
    concepts = fp.ConceptSet.from_ids(lists)
    index = concepts._index
    grad_log_mass = torch.randn(num_tokens, len(concepts), generator=generator)
    grad_lse = torch.randn(num_tokens, generator=generator, dtype=torch.float64)

    def forward_backward(rows):
        stats = _concept_mass_op(logits[rows], *index, 1 / 0.8)
        _, _, top_share, _, top_token, _, row_state = stats
        grad = _concept_mass_backward_op(
            grad_log_mass[rows], grad_lse[rows], logits[rows], top_share, top_token, row_state,
            index.vocab_ids, index.vocab_offsets, index.vocab_concepts, index.id_block_starts, 1 / 0.8)
        return (*stats[:6], row_state.t(), grad)  # (row_state [2, N]: its rows along dimension 0)

    whole = same_bits_per_row(forward_backward, num_tokens)
    result = fp.ConceptMass(*whole[:5], whole[5].float())  # (the op keeps lse in float64)
    assert result.log_mass[1, len(concepts) - 1501] == float("-inf")  # the concept masked in row 1
    assert_matches(result, expected(logits, concepts, 0.8), rtol=1e-4, atol=1e-4)
    rtol, atol = GRAD_TOLERANCE[dtype]
    want = reference_gradient(logits, concepts, 0.8, [grad_log_mass, torch.zeros_like(grad_log_mass), grad_lse])
    torch.testing.assert_close(whole[7].double(), want, rtol=rtol, atol=atol)


def test_an_id_in_thousands_of_concepts_sums_its_gradient_in_double():
    """An id shared by 5000 concepts (a common first token of many answers) gets 5000 gradient
    terms of either sign: the C++ backward adds them in double, so its float32 gradient there is
    as close as the other ids' (a float32 sum was 8e-7 off relative, 7x more)."""
    generator = torch.Generator().manual_seed(0)
    vocab, num_concepts = 64, 5000
    concepts = fp.ConceptSet.from_ids([[0, 1 + c % (vocab - 1)] for c in range(num_concepts)])
    logits = torch.randn(3, vocab, generator=generator)
    logits[:, 0] += 2.0
    weights = torch.randn(3, num_concepts, generator=generator)
    z = logits.clone().requires_grad_()
    with fp.use_backend("cpp"):
        (fp.concept_mass(z, concepts).log_mass * weights).sum().backward()
    want = reference_gradient(logits, concepts, 1.0, [weights, torch.zeros_like(weights), torch.zeros(3)])
    torch.testing.assert_close(z.grad[:, 0].double(), want[:, 0], rtol=3e-7, atol=0)


@pytest.mark.parametrize("where", ["masked", "nan", "posinf"])
def test_non_finite_row_raises(target, where):
    _, device = target
    logits = torch.randn(5, 40, device=device)
    if where == "masked":
        logits[3] = float("-inf")
    elif where == "nan":
        logits[3, 7] = float("nan")
    else:
        logits[3, 1] = float("inf")
    copy = logits.clone()
    with pytest.raises(ValueError, match=r"logits\[3\] has no finite log-sum-exp"):
        fp.concept_mass(logits, fp.ConceptSet.from_ids([[1, 2], [7]]).to(device))
    assert torch.equal(logits, copy) or where == "nan"


@pytest.mark.parametrize("vocab", [4096, 8192 + 2048], ids=["block", "range"])
def test_a_nan_among_masked_logits_is_not_lost(vocab):
    """A NaN in a vocabulary block (2048 logits), or a range of them (8192: folded apart, merged
    after), whose other logits are all -inf: the C++ kernel's lse is NaN, so the op refuses the row.
    Such a block or range has no finite max; dropping its NaN there gave a finite lse."""
    logits = torch.randn(2, vocab)
    logits[1, vocab - 2048:] = float("-inf")
    logits[1, vocab - 5] = float("nan")
    with fp.use_backend("cpp"), pytest.raises(ValueError, match=r"logits\[1\] has no finite log-sum-exp"):
        fp.concept_mass(logits, fp.ConceptSet.from_ids([[1, 2], [7]]))


# ---------------------------------------------------------------- backends and tracing


def test_float64_runs_reference_exactly():
    logits = torch.randn(6, 50, dtype=torch.float64)
    concepts = fp.ConceptSet.from_ids([[1, 2, 3], [3, 4], [49]])
    result = fp.concept_mass(logits, concepts, temperature=0.9)
    ref = reference.concept_mass(logits, concepts.token_ids, concepts.offsets, temperature=0.9)
    assert result.mass.dtype == torch.float64
    torch.testing.assert_close(result.log_mass, ref["log_mass"], rtol=1e-12, atol=1e-12)
    # the float64 gradient runs the reference backward formula
    z = logits.clone().requires_grad_()
    fp.concept_mass(z, concepts, temperature=0.9).log_mass.sum().backward()
    z_ref = logits.clone().requires_grad_()
    reference.concept_mass(z_ref, concepts.token_ids, concepts.offsets, temperature=0.9)["log_mass"].sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-10, atol=1e-12)


def test_reference_backend_forced():
    logits = torch.randn(6, 50)
    concepts = random_concepts(50, 9)
    with fp.use_backend("reference"):
        result = fp.concept_mass(logits, concepts)
        weights = [torch.randn(6, 9), torch.randn(6, 9), torch.randn(6)]
        got = fused_gradient(logits, concepts, 1.0, weights)
    assert_matches(result, expected(logits, concepts))
    torch.testing.assert_close(got.double(), reference_gradient(logits, concepts, 1.0, weights), rtol=RTOL, atol=ATOL)


def test_rows_refused_in_eager_mode_give_nan_under_compile(target):
    """Under torch.compile the check that refuses a row with no finite log-sum-exp (a host sync) is
    skipped: that row's statistics are NaN in every backend (a NaN logit read as -inf by one
    kernel's guards gave mass 0 there), the other rows as in eager mode."""
    _, device = target
    logits = torch.randn(5, 40)
    logits[1] = float("-inf")
    logits[3, 5] = float("nan")
    logits = logits.to(device)
    concepts = fp.ConceptSet.from_ids([[5, 7], [2], [30, 31, 32]]).to(device)

    def statistics(z):
        result = fp.concept_mass(z, concepts)
        return torch.stack([result.mass, result.log_mass, result.top_share, result.concentration_entropy])

    got = torch.compile(statistics, fullgraph=True, backend="eager")(logits).cpu()
    bad = torch.tensor([False, True, False, True, False])
    assert got[:, bad].isnan().all()
    torch.testing.assert_close(got[:, ~bad], statistics(logits[~bad]).cpu(), rtol=1e-6, atol=1e-6)
    # top_token: an all -inf concept names its first variant; one holding a NaN logit, one of its
    # variants, which one by backend and variant order (the reference: the first; Triton: the
    # largest of the others; C++: the first if it is the NaN, else the largest of the others)
    top_token = torch.compile(lambda z: fp.concept_mass(z, concepts).top_token, fullgraph=True, backend="eager")
    tops = top_token(logits).cpu()
    assert tops[1].tolist() == [5, 2, 30] and tops[3, 0] in (5, 7)
    assert torch.equal(tops[~bad], fp.concept_mass(logits[~bad], concepts).top_token.cpu())


def test_torch_compile_fullgraph():
    logits = torch.randn(9, 130)
    concepts = fp.ConceptSet.from_ids([[1, 2, 3], [3, 100], [129]])

    def availability(z):
        result = fp.concept_mass(z, concepts, temperature=0.9)
        return result.log_mass.sum() + result.top_share.sum()

    compiled = torch.compile(availability, fullgraph=True)
    z_eager, z_compiled = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager, traced = availability(z_eager), compiled(z_compiled)
    torch.testing.assert_close(traced, eager, rtol=1e-6, atol=1e-6)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(z_compiled.grad, z_eager.grad, rtol=1e-6, atol=1e-6)


def test_opcheck():
    """torch.library's own consistency checks on the registered ops (schema, fake, autograd)."""
    from fastprobe.ops.concepts import _concept_mass_backward_op, _concept_mass_op

    logits = torch.randn(4, 31, requires_grad=True)
    index = tuple(fp.ConceptSet.from_ids([[1, 2, 3], [3, 30]])._index)
    torch.library.opcheck(_concept_mass_op.op, (logits, *index, 1.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    _, _, top_share, _, top_token, lse, row_state = _concept_mass_op(logits.detach(), *index, 1.25)
    vocab_ids, vocab_offsets, vocab_concepts, _, starts = index[2:]
    args = (torch.randn(4, 2), torch.randn(4), logits.detach(), top_share, top_token, row_state, vocab_ids, vocab_offsets,
            vocab_concepts, starts, 1.25)
    torch.library.opcheck(_concept_mass_backward_op.op, args, test_utils=("test_schema", "test_faketensor"))
