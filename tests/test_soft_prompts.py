"""fastprobe.methods.soft_prompts on small built-in models (Llama, GPT-2, Gemma 3, LLaVA; random
weights, in-process tokenizer): the fit equals torch's mean / std of the embedding table, the
draws have its moments, seeds reproduce and fresh calls differ, the soft vectors reach the model
right after each row's real tokens at the positions that follow them, left and right padded
batches generate what each prompt alone does, n = 0 is plain generation, learned positions
(GPT-2) bound n and max_new_tokens with a ValueError, and misuse raises clear errors without
touching the inputs or the table."""

import copy

import numpy as np
import pytest
import torch

from fastprobe.methods import soft_prompts as sp
from fastprobe.models import DEMO_TEXTS, IMAGE_TOKEN, tiny_llava, tiny_llava_processor, tiny_model, tiny_tokenizer

from .dropout_helpers import check_eval_mode, with_dropout

pytest.importorskip("transformers")

TEXTS = [DEMO_TEXTS[2], "Hello there.", DEMO_TEXTS[9]]  # three lengths: every row but one is padded
N = 3
GREEDY = dict(max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tokenizer):
    return tiny_model(request.param, vocab_size=len(tokenizer))


def fresh_llama(tokenizer, **options):
    return tiny_model("llama", vocab_size=len(tokenizer), **options)


def encode(tokenizer, texts, side):
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        return tokenizer(texts, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = previous


def table(model):
    return model.get_input_embeddings().weight.detach()


def assert_same_generation(got, want):
    assert torch.equal(got.sequences, want.sequences)
    for step, (a, b) in enumerate(zip(got.logits, want.logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")


# ---------------------------------------------------------------- the fit


def test_fit_equals_torch_statistics_of_the_table(tokenizer, monkeypatch):
    """Scalar and per-dimension fits equal torch's float64 mean / std, also when the table is read
    in many chunks (7 rows each, a ragged last one)."""
    model = fresh_llama(tokenizer)
    weight = table(model).double()
    for chunk_entries in (sp._CHUNK_ENTRIES, 7 * weight.shape[1]):
        monkeypatch.setattr(sp, "_CHUNK_ENTRIES", chunk_entries)
        scalar = sp.fit_embedding_gaussian(model)
        per_dimension = sp.fit_embedding_gaussian(model, per_dimension=True)
        assert scalar.mean.shape == () and not scalar.per_dimension and scalar.hidden_size == 64
        assert per_dimension.mean.shape == (64,) and per_dimension.per_dimension
        assert scalar.mean.dtype == torch.float32
        torch.testing.assert_close(scalar.mean.double(), weight.mean(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(scalar.std.double(), weight.std(), rtol=1e-6, atol=0)
        torch.testing.assert_close(per_dimension.mean.double(), weight.mean(0), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(per_dimension.std.double(), weight.std(0), rtol=1e-6, atol=0)


def test_fit_can_exclude_rows(tokenizer):
    model = fresh_llama(tokenizer)
    weight = table(model).double()
    with torch.no_grad():
        model.get_input_embeddings().weight[tokenizer.pad_token_id] = 5.0  # an outlier row
    excluded = [tokenizer.pad_token_id, 7]
    keep = torch.ones(len(weight), dtype=torch.bool)
    keep[excluded] = False
    fitted = sp.fit_embedding_gaussian(model, exclude_token_ids=excluded)
    torch.testing.assert_close(fitted.mean.double(), weight[keep].mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fitted.std.double(), weight[keep].std(), rtol=1e-6, atol=0)
    per_dimension = sp.fit_embedding_gaussian(model, per_dimension=True, exclude_token_ids=excluded)
    torch.testing.assert_close(per_dimension.std.double(), weight[keep].std(0), rtol=1e-6, atol=0)
    assert sp.fit_embedding_gaussian(model).std > 2 * fitted.std  # the outlier row counts by default
    as_tensor = sp.fit_embedding_gaussian(model, exclude_token_ids=torch.tensor(excluded))  # (a tensor of ids too)
    assert torch.equal(as_tensor.mean, fitted.mean) and torch.equal(as_tensor.std, fitted.std)
    # an id named twice leaves one row out: excluding all but rows 0 and 1, each twice, fits those two
    fresh = fresh_llama(tokenizer)
    two = sp.fit_embedding_gaussian(fresh, exclude_token_ids=list(range(2, len(weight))) * 2)
    torch.testing.assert_close(two.std.double(), table(fresh).double()[:2].std(), rtol=1e-6, atol=0)


def test_fit_follows_a_scaled_embedding(tokenizer):
    """Gemma 3's embedding multiplies its rows by embed_scale: the fit is the table's times it."""
    model = tiny_model("gemma3", vocab_size=len(tokenizer))
    embedding, weight = model.get_input_embeddings(), table(model).double()
    scale = float(embedding.embed_scale)
    assert scale == pytest.approx(64 ** 0.5)
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(embedding(ids), table(model)[ids] * scale)  # what the scale means
    fitted = sp.fit_embedding_gaussian(model, per_dimension=True)
    torch.testing.assert_close(fitted.mean.double(), weight.mean(0) * scale, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fitted.std.double(), weight.std(0) * scale, rtol=1e-6, atol=0)
    embedding.embed_scale = -embedding.embed_scale  # a negative scale flips the mean; the spread stays positive
    flipped = sp.fit_embedding_gaussian(model, per_dimension=True)
    assert torch.equal(flipped.mean, -fitted.mean) and torch.equal(flipped.std, fitted.std)


def test_a_table_with_non_finite_rows_is_refused_unless_they_are_excluded(tokenizer):
    """An inf or NaN row makes the fit NaN: a ValueError naming the rows, and leaving them out
    with exclude_token_ids fits the others (0 * inf would still be NaN in a weighted sum)."""
    model = fresh_llama(tokenizer)
    weight = table(model).double()
    with torch.no_grad():
        model.get_input_embeddings().weight[7, 3] = float("inf")
        model.get_input_embeddings().weight[40, 0] = float("nan")
    for per_dimension in (False, True):
        with pytest.raises(ValueError, match=r"^model: the input embedding table has NaN or infinite entries in "
                                             r"rows \[7, 40\].*exclude_token_ids"):
            sp.fit_embedding_gaussian(model, per_dimension=per_dimension)
    keep = torch.ones(len(weight), dtype=torch.bool)
    keep[[7, 40]] = False
    fitted = sp.fit_embedding_gaussian(model, exclude_token_ids=[7, 40])
    torch.testing.assert_close(fitted.mean.double(), weight[keep].mean(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fitted.std.double(), weight[keep].std(), rtol=1e-6, atol=0)
    per_dimension = sp.fit_embedding_gaussian(model, per_dimension=True, exclude_token_ids=[7, 40])
    torch.testing.assert_close(per_dimension.std.double(), weight[keep].std(0), rtol=1e-6, atol=0)


# ---------------------------------------------------------------- the draws


def stretched_llama(tokenizer):
    """A Llama whose embedding columns have means in [-1, 1] and standard deviations growing
    from about 0.02 to 0.06: per-dimension and scalar fits differ clearly."""
    model = fresh_llama(tokenizer)
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.mul_(torch.linspace(1.0, 3.0, weight.shape[1])).add_(torch.linspace(-1.0, 1.0, weight.shape[1]))
    return model


def test_draws_have_the_fitted_moments(tokenizer):
    model = stretched_llama(tokenizer)
    count = 20000
    for per_dimension in (False, True):
        fitted = sp.fit_embedding_gaussian(model, per_dimension=per_dimension)
        draws = sp.draw_soft_prompts(model, count, per_dimension=per_dimension)
        assert draws.shape == (count, 64) and draws.dtype == torch.float32
        draws = draws.double()
        mean, std = fitted.mean.double().expand(64), fitted.std.double().expand(64)
        # per column: |sample mean - mu| < 6 sigma / sqrt(N), |sample std - sigma| < 6 sigma / sqrt(2N)
        assert ((draws.mean(0) - mean).abs() < 6 * std / count ** 0.5).all()
        assert ((draws.std(0) - std).abs() < 6 * std / (2 * count) ** 0.5).all()
        # Gaussian: P(|x - mu| < sigma) = 0.6827 (sd of the fraction over 1.28M draws is 4e-4)
        inside = ((draws - mean).abs() < std).double().mean()
        assert abs(float(inside) - 0.6827) < 3e-3
    # the scalar fit is isotropic: one std for every column, though the table's columns differ
    scalar = sp.draw_soft_prompts(model, count).double()
    assert scalar.std(0).max() / scalar.std(0).min() < 1.1
    assert table(model).std(0).max() / table(model).std(0).min() > 2


def test_draws_take_the_model_dtype_and_shape(tokenizer):
    model = fresh_llama(tokenizer, dtype=torch.bfloat16)
    assert sp.draw_soft_prompts(model, 4).shape == (4, 64)
    batch = sp.draw_soft_prompts(model, 4, rows=3)
    assert batch.shape == (3, 4, 64) and batch.dtype == torch.bfloat16
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[1], batch[2])  # rows drawn independently
    assert sp.draw_soft_prompts(model, 0, rows=2).shape == (2, 0, 64)


def test_seeds_reproduce_and_fresh_calls_differ(tokenizer):
    model = fresh_llama(tokenizer)
    gaussian = sp.fit_embedding_gaussian(model)
    state = torch.get_rng_state()
    first = sp.draw_soft_prompts(model, 5, rows=2, gaussian=gaussian, seed=11)
    assert torch.equal(torch.get_rng_state(), state)  # an int seed leaves the global RNG alone
    assert torch.equal(first, sp.draw_soft_prompts(model, 5, rows=2, gaussian=gaussian, seed=11))
    assert not torch.equal(first, sp.draw_soft_prompts(model, 5, rows=2, gaussian=gaussian, seed=12))
    assert not torch.equal(sp.draw_soft_prompts(model, 5, gaussian=gaussian),
                           sp.draw_soft_prompts(model, 5, gaussian=gaussian))
    generator = torch.Generator().manual_seed(11)
    assert torch.equal(first, sp.draw_soft_prompts(model, 5, rows=2, gaussian=gaussian, seed=generator))
    assert not torch.equal(first, sp.draw_soft_prompts(model, 5, rows=2, gaussian=gaussian, seed=generator))  # advanced


# ---------------------------------------------------------------- placement


def first_forward_inputs(model):
    """A forward pre-hook recording the keyword inputs of the model's first forward call."""
    seen = []

    def record(module, args, kwargs):
        if not seen:
            seen.append(dict(kwargs))

    return seen, model.register_forward_pre_hook(record, with_kwargs=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_soft_vectors_follow_each_rows_real_tokens(model, tokenizer, side):
    """What generate's first forward gets: each row's real tokens at the right edge, then its soft
    vectors, the mask extended over them, and positions 0 .. r + n - 1 over the real part."""
    batch = encode(tokenizer, TEXTS, side)
    seen, hook = first_forward_inputs(model)
    try:
        _, soft = sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, return_soft_prompts=True,
                                          max_new_tokens=2, do_sample=False)
    finally:
        hook.remove()
    embeds, mask, positions = seen[0]["inputs_embeds"], seen[0]["attention_mask"], seen[0]["position_ids"]
    width = batch["input_ids"].shape[1]
    assert soft.shape == (len(TEXTS), N, 64) and embeds.shape == (len(TEXTS), width + N, 64)
    for row, real in enumerate(batch["attention_mask"].bool()):
        tokens = batch["input_ids"][row][real]
        r = len(tokens)
        torch.testing.assert_close(embeds[row, width:], soft[row], rtol=0, atol=0)
        torch.testing.assert_close(embeds[row, width - r:width], table(model)[tokens], rtol=0, atol=0)
        assert mask[row].tolist() == [0] * (width - r) + [1] * (r + N)
        assert positions[row, width - r:].tolist() == list(range(r + N))


def test_soft_prompt_inputs_leave_a_left_padded_batch_in_place_and_share_one_prompt(model, tokenizer):
    batch = encode(tokenizer, TEXTS, "left")
    soft = sp.draw_soft_prompts(model, N)  # [n, H]: the same for every row
    inputs = sp.soft_prompt_inputs(model, batch["input_ids"], batch["attention_mask"], soft_prompts=soft)
    width = batch["input_ids"].shape[1]
    torch.testing.assert_close(inputs["inputs_embeds"][:, :width], table(model)[batch["input_ids"]], rtol=0, atol=0)
    torch.testing.assert_close(inputs["inputs_embeds"][:, width:], soft.expand(len(TEXTS), -1, -1), rtol=0, atol=0)
    assert torch.equal(inputs["attention_mask"][:, :width], batch["attention_mask"])
    assert inputs["attention_mask"].dtype == batch["attention_mask"].dtype
    one = sp.soft_prompt_inputs(model, batch["input_ids"][0], batch["attention_mask"][0], soft_prompts=soft)
    torch.testing.assert_close(one["inputs_embeds"], inputs["inputs_embeds"][:1], rtol=0, atol=0)  # [L]: one prompt


def test_gradients_reach_the_soft_prompts_not_the_table(tokenizer):
    model = fresh_llama(tokenizer)
    soft = sp.draw_soft_prompts(model, N).requires_grad_()
    inputs = sp.soft_prompt_inputs(model, torch.tensor([[1, 40, 41]]), soft_prompts=soft)
    model(**inputs).logits[0, -1].sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert model.get_input_embeddings().weight.grad is None


def test_a_forward_of_a_padded_batch_with_counted_positions_is_each_prompt_alone(tokenizer):
    """The recipe soft_prompt_inputs' docstring gives for a forward (GPT-2: learned positions,
    which a left-padded row would see shifted without it)."""
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    batch = encode(tokenizer, TEXTS, "right")
    soft = sp.draw_soft_prompts(model, N, rows=len(TEXTS), seed=0)
    inputs = sp.soft_prompt_inputs(model, batch["input_ids"], batch["attention_mask"], soft_prompts=soft)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        last = model(**inputs, position_ids=positions).logits[:, -1]
        for row, real in enumerate(batch["attention_mask"].bool()):
            alone = sp.soft_prompt_inputs(model, batch["input_ids"][row][real], soft_prompts=soft[row])
            torch.testing.assert_close(last[row], model(**alone).logits[0, -1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- generation


def generate_alone(model, tokenizer, text, soft):
    """Greedy generation of one prompt followed by its soft vectors, inputs_embeds built by hand."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    embeds = torch.cat([table(model)[ids[0]], soft]).unsqueeze(0)
    return model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                          **GREEDY)


def test_padded_batches_generate_what_each_prompt_alone_does(model, tokenizer):
    """Left and right padding (right is re-packed) give the same generations, and each row equals
    its prompt alone with its soft vectors appended by hand."""
    results = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        try:
            results[side] = sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, seed=5, return_soft_prompts=True,
                                                    **GREEDY)
        finally:
            tokenizer.padding_side = "right"
    (left, soft), (right, soft_right) = results["left"], results["right"]
    assert torch.equal(soft, soft_right)  # the same seed, the same draws
    assert_same_generation(right, left)
    for row, text in enumerate(TEXTS):
        alone = generate_alone(model, tokenizer, text, soft[row])
        assert torch.equal(left.sequences[row], alone.sequences[0])
        for step, (batched, single) in enumerate(zip(left.logits, alone.logits)):
            torch.testing.assert_close(batched[row], single[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_no_soft_vectors_is_plain_generation(tokenizer, arch, side):
    model = tiny_model(arch, vocab_size=len(tokenizer))
    plain_batch = encode(tokenizer, TEXTS, "left")
    plain = model.generate(**plain_batch, **GREEDY)
    batch = encode(tokenizer, TEXTS, side)
    ours = sp.soft_prompt_generate(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], n=0,
                                   **GREEDY)
    assert torch.equal(ours.sequences, plain.sequences[:, plain_batch["input_ids"].shape[1]:])
    for a, b in zip(ours.logits, plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_each_call_draws_fresh_vectors_and_generates_from_them(tokenizer):
    model = fresh_llama(tokenizer)
    first, soft_first = sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, return_soft_prompts=True, **GREEDY)
    _, soft_second = sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, return_soft_prompts=True, **GREEDY)
    assert not torch.equal(soft_first, soft_second)
    batch = encode(tokenizer, TEXTS, "right")
    again = model.generate(**sp.soft_prompt_inputs(model, batch["input_ids"], batch["attention_mask"],
                                                   soft_prompts=soft_first), **GREEDY)
    assert_same_generation(again, first)  # the returned vectors are the ones generation used
    seeded = [sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, seed=3, **GREEDY) for _ in range(2)]
    assert_same_generation(seeded[0], seeded[1])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_left_in_train_mode_generates_without_dropout(tokenizer, arch):
    """soft_prompt_generate with a model in train mode with dropout (mixed flags) gives what it
    gives in eval mode (seeded soft vectors), and every module's flag comes back, also after a
    failed forward. (It generated with dropout on: random beyond the soft vectors' randomness.)"""
    model = with_dropout(tiny_model(arch, vocab_size=len(tokenizer)))

    def measure():
        return sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, seed=2, **GREEDY)

    check_eval_mode([model], measure, assert_same_generation)


def test_a_tokenizer_without_pad_token_borrows_eos(tokenizer):
    """GPT-2 style: no pad token in the tokenizer or the generation config; the batch is padded
    with eos for the call and generates what the padded tokenizer's batch does."""
    model = tiny_model("gpt2", vocab_size=len(tokenizer))
    model.generation_config.pad_token_id = None
    bare = tiny_tokenizer()
    bare.pad_token = None
    want = sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, seed=1, **GREEDY)
    got = sp.soft_prompt_generate(model, bare, TEXTS, n=N, seed=1, **GREEDY)
    assert bare.pad_token is None
    assert_same_generation(got, want)


def test_a_pad_token_past_the_table_does_not_fill_rows_that_end_first(tokenizer, fresh_seed):
    """A pad token added to the tokenizer without resizing the model's table (id 512 of 512 rows),
    and no pad token in the generation config: a row that ends before the others (at an eos, here
    the first row's greedy first token) is filled with an id the model embeds, as generate feeds
    the filling back (it was the pad token: an IndexError inside torch's embedding), and the
    continuations read as with the tokenizer without it."""
    model = fresh_llama(tokenizer, seed=fresh_seed)
    model.generation_config.pad_token_id = None
    padded = copy.deepcopy(tokenizer)
    padded.add_special_tokens({"pad_token": "<extra_pad>"})
    prompts = ["The river ran", "The old mill"]  # (as long: no padding)
    assert len({len(tokenizer(prompt)["input_ids"]) for prompt in prompts}) == 1
    first = sp.soft_prompt_generate(model, tokenizer, prompts, n=N, seed=fresh_seed, max_new_tokens=1,
                                    do_sample=False)[:, 0].tolist()
    if first[0] == first[1]:
        pytest.skip("both rows' greedy continuations begin with the same token")
    model.generation_config.eos_token_id = first[0]
    got, want = (sp.soft_prompt_generate(model, reader, prompts, n=N, seed=fresh_seed, max_new_tokens=4,
                                         do_sample=False) for reader in (padded, tokenizer))
    assert got[0, 0] == first[0] and (got[0, 1:] == padded.eos_token_id).all()  # (the row ended first)
    assert padded.batch_decode(got, skip_special_tokens=True) == tokenizer.batch_decode(want, skip_special_tokens=True)


def test_padding_past_the_table_is_not_embedded(tokenizer):
    """Prompts of unequal length padded with a pad token past the model's table (added to the
    tokenizer without resizing it): the padding is masked, so its id is not the model's to embed
    (it was refused as a token id past the table); the generation is the one with the tokenizer's
    own pad. A real token past the table is still refused."""
    model = stretched_llama(tokenizer)
    padded = copy.deepcopy(tokenizer)
    padded.add_special_tokens({"pad_token": "<extra_pad>"})
    encoded = padded(TEXTS, padding=True, return_tensors="pt")
    assert (encoded["input_ids"] == padded.pad_token_id).any()  # (the texts differ in length)
    got = sp.soft_prompt_generate(model, padded, TEXTS, n=N, seed=1, **GREEDY)
    assert_same_generation(got, sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, seed=1, **GREEDY))
    real = encoded["input_ids"].clone()
    real[encoded["attention_mask"] == 1] = padded.pad_token_id
    with pytest.raises(ValueError, match=r"^input_ids must be token ids in \[0, 512\) .* at real positions"):
        sp.soft_prompt_inputs(model, real, encoded["attention_mask"], soft_prompts=torch.zeros(N, 64))


def test_generation_takes_a_fitted_gaussian(tokenizer):
    model = stretched_llama(tokenizer)
    gaussian = sp.fit_embedding_gaussian(model, per_dimension=True)
    _, soft = sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, gaussian=gaussian, seed=2,
                                      return_soft_prompts=True, max_new_tokens=1)
    torch.testing.assert_close(soft, sp.draw_soft_prompts(model, N, rows=len(TEXTS), gaussian=gaussian, seed=2))
    per_dimension = sp.draw_soft_prompts(model, N, rows=len(TEXTS), per_dimension=True, seed=2)
    torch.testing.assert_close(soft, per_dimension)


# ---------------------------------------------------------------- learned positions (GPT-2)


POSITIONS = 16
# row 0 right padded (2 real tokens), row 1 six: positions count real tokens, so the longest row
# (6) plus n soft vectors plus the new tokens less one (the last is never fed back) must fit in 16
SHORT_AND_LONG = torch.tensor([[5, 6, 0, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12]])
SHORT_AND_LONG_MASK = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])


def forward_counter(model):
    calls = []
    return calls, model.register_forward_pre_hook(lambda module, args: calls.append(1))


def test_learned_positions_bound_n_and_max_new_tokens_before_the_model_runs(tokenizer):
    """GPT-2 with 16 positions: 6 real tokens + n = 4 soft vectors leave room for 7 new tokens
    (positions 0..15); 8, or n = 11, or max_new_tokens in a generation config, is a ValueError
    naming the argument before any forward (not an IndexError inside the position table)."""
    from transformers import GenerationConfig

    model = tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=POSITIONS)
    prompts = dict(input_ids=SHORT_AND_LONG, attention_mask=SHORT_AND_LONG_MASK)
    fits = sp.soft_prompt_generate(model, **prompts, n=4, max_new_tokens=7, min_new_tokens=7, do_sample=False)
    assert fits.shape == (2, 7)
    assert sp.soft_prompt_generate(model, **prompts, n=10, max_new_tokens=1, do_sample=False).shape == (2, 1)
    calls, hook = forward_counter(model)
    try:
        with pytest.raises(ValueError, match="^max_new_tokens=8: .*room for 7 new tokens"):
            sp.soft_prompt_generate(model, **prompts, n=4, max_new_tokens=8, do_sample=False)
        with pytest.raises(ValueError, match="^max_new_tokens=2: .*room for 1 new token"):
            sp.soft_prompt_generate(model, **prompts, n=10, max_new_tokens=2)
        with pytest.raises(ValueError, match="^max_new_tokens=8: "):
            sp.soft_prompt_generate(model, **prompts, n=4, generation_config=GenerationConfig(max_new_tokens=8))
        with pytest.raises(ValueError, match="^n=11: the longest prompt has 6 real tokens.*use at most 10 soft "):
            sp.soft_prompt_generate(model, **prompts, n=11, max_new_tokens=1)
        # (the advice leaves room for the new tokens: n = 7 would fail again, at max_new_tokens)
        with pytest.raises(ValueError, match=r"^n=11: .*use at most 6 soft vectors \(for max_new_tokens=5\)"):
            sp.soft_prompt_generate(model, **prompts, n=11, max_new_tokens=5)
        with pytest.raises(ValueError, match="^n=11: .*; shorten the prompts or max_new_tokens$"):
            sp.soft_prompt_generate(model, **prompts, n=11, max_new_tokens=12)
        with pytest.raises(ValueError, match="^soft_prompts: the longest prompt has 6 real tokens"):
            sp.soft_prompt_inputs(model, **prompts, soft_prompts=sp.draw_soft_prompts(model, 11))
    finally:
        hook.remove()
    assert not calls


def test_learned_positions_bound_generation_by_max_length(tokenizer):
    """Without max_new_tokens (generate's default length, or max_length, whose meaning with
    inputs_embeds differs between transformers versions) the position that would run past the
    table is a ValueError, not an IndexError, and the guard comes off the model."""
    model = tiny_model("gpt2", vocab_size=len(tokenizer), n_positions=POSITIONS)
    model.generation_config.max_new_tokens = None
    with pytest.raises(ValueError, match="^generate .*room for 7 new tokens in the 16 learned .*max_new_tokens <= 7"):
        sp.soft_prompt_generate(model, input_ids=SHORT_AND_LONG, attention_mask=SHORT_AND_LONG_MASK, n=4,
                                max_length=64, do_sample=False)
    assert not model._forward_pre_hooks
    short = sp.soft_prompt_generate(model, input_ids=SHORT_AND_LONG[:1, :2], n=4, max_length=8, do_sample=False)
    assert 0 < short.shape[1] <= 8 and not model._forward_pre_hooks


def test_rotary_positions_are_not_bounded(tokenizer):
    """Llama's max_position_embeddings is no table: generation past it is the model's business."""
    model = tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=POSITIONS)
    out = sp.soft_prompt_generate(model, input_ids=SHORT_AND_LONG, attention_mask=SHORT_AND_LONG_MASK, n=11,
                                  max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape == (2, 8)


def test_a_model_offloaded_by_accelerate_fits_draws_and_generates_where_it_computes(tokenizer, fresh_seed):
    """A model whose weights accelerate offloads (meta placeholders, loaded by its hooks at each
    forward on the CPU): the fit, the seeded draws, the inputs and the generation are the model
    in memory's, on the CPU, and the table is offloaded again after the fit. Each read the meta
    placeholder ("Tensor.item() cannot be called on meta tensors"). A meta table without a hook
    holds no values: a ValueError."""
    import accelerate

    model = fresh_llama(tokenizer, seed=fresh_seed)
    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    assert table(offloaded).is_meta
    for per_dimension in (False, True):
        got, want = (sp.fit_embedding_gaussian(m, per_dimension=per_dimension) for m in (offloaded, model))
        torch.testing.assert_close(got.mean, want.mean, rtol=0, atol=0)
        torch.testing.assert_close(got.std, want.std, rtol=0, atol=0)
    assert table(offloaded).is_meta
    soft = sp.draw_soft_prompts(offloaded, N, rows=len(TEXTS), seed=fresh_seed)
    assert soft.device.type == "cpu"
    torch.testing.assert_close(soft, sp.draw_soft_prompts(model, N, rows=len(TEXTS), seed=fresh_seed), rtol=0, atol=0)
    batch = encode(tokenizer, TEXTS, "right")
    got, want = (sp.soft_prompt_inputs(m, batch["input_ids"], batch["attention_mask"], soft_prompts=soft)
                 for m in (offloaded, model))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert_same_generation(sp.soft_prompt_generate(offloaded, tokenizer, TEXTS, n=N, seed=fresh_seed, **GREEDY),
                           sp.soft_prompt_generate(model, tokenizer, TEXTS, n=N, seed=fresh_seed, **GREEDY))
    with pytest.raises(ValueError, match="table is on the meta device .no values loaded"):  # (no hook to load it)
        sp.fit_embedding_gaussian(copy.deepcopy(model).to("meta"))


# ---------------------------------------------------------------- a vision-language model (LLaVA)


@pytest.fixture(scope="module")
def llava():
    processor = tiny_llava_processor()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8), rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]
    prompts = [f"{IMAGE_TOKEN}\nDescribe the picture.", f"A photo: {IMAGE_TOKEN} What is in it? Tell me"]
    return processor, tiny_llava(processor), images, prompts


def llava_batch(processor, images, prompts, side):
    processor.tokenizer.padding_side = side
    try:
        return processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        processor.tokenizer.padding_side = "left"


def test_llava_generates_with_pixel_values_and_soft_prompts(llava):
    """generate(inputs_embeds=..., pixel_values=...) merges the image features into the image
    token positions (found by their embedding) and keeps the soft vectors after the prompt; n = 0
    is plain generation, right padding is re-packed like left."""
    processor, model, images, prompts = llava
    left, right = (llava_batch(processor, images, prompts, side) for side in ("left", "right"))
    plain = model.generate(**left, **GREEDY)
    ours = sp.soft_prompt_generate(model, input_ids=left["input_ids"], attention_mask=left["attention_mask"], n=0,
                                   pixel_values=left["pixel_values"], **GREEDY)
    assert torch.equal(ours.sequences, plain.sequences[:, left["input_ids"].shape[1]:])

    seen, hook = first_forward_inputs(model.model.language_model)  # the text model (4.53 and 5.x)
    try:
        runs = [sp.soft_prompt_generate(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        n=N, seed=4, pixel_values=batch["pixel_values"], return_soft_prompts=True,
                                        **GREEDY) for batch in (left, right)]
    finally:
        hook.remove()
    (from_left, soft), (from_right, _) = runs
    assert_same_generation(from_right, from_left)
    embeds = seen[0]["inputs_embeds"]
    torch.testing.assert_close(embeds[:, -N:], soft, rtol=0, atol=0)
    image_rows = left["input_ids"] == processor.image_token_id
    image_embedding = table(model)[processor.image_token_id]
    assert not (embeds[:, :-N][image_rows] == image_embedding).all(-1).any()  # replaced by image features
    text_rows = left["attention_mask"].bool() & ~image_rows
    torch.testing.assert_close(embeds[:, :-N][text_rows], table(model)[left["input_ids"][text_rows]], rtol=0, atol=0)


# ---------------------------------------------------------------- misuse


def test_misuse_is_found_before_the_table_is_read_or_the_model_runs(tokenizer, monkeypatch):
    """A bad seed is refused before the fit (which reads the whole table), a non-finite given
    Gaussian before drawing, position_ids (generate counts them over the extended mask) before
    generate."""
    model = fresh_llama(tokenizer)
    fits, real_moments = [], sp._table_moments
    monkeypatch.setattr(sp, "_table_moments", lambda *args: fits.append(1) or real_moments(*args))
    calls, hook = forward_counter(model)
    ids = torch.tensor([[1, 40, 41]])
    try:
        with pytest.raises(ValueError, match="^seed must"):
            sp.draw_soft_prompts(model, 2, seed="7")
        with pytest.raises(ValueError, match="^seed must"):
            sp.soft_prompt_generate(model, input_ids=ids, n=2, seed=-1, max_new_tokens=1)
        assert not fits
        for mean, std, name in [(float("nan"), 1.0, "mean"), (0.0, float("inf"), "std"), (0.0, float("nan"), "std")]:
            gaussian = sp.EmbeddingGaussian(torch.tensor(mean), torch.tensor(std), 64)
            with pytest.raises(ValueError, match=f"^gaussian.{name} must be finite"):
                sp.draw_soft_prompts(model, 2, gaussian=gaussian)
        with pytest.raises(ValueError, match="^soft_prompt_generate builds the model inputs itself: .*position_ids"):
            sp.soft_prompt_generate(model, input_ids=ids, n=2, max_new_tokens=1, position_ids=torch.arange(3)[None])
    finally:
        hook.remove()
    assert not calls


def test_bad_arguments_raise_clear_errors(tokenizer):
    model = fresh_llama(tokenizer)
    ids = torch.tensor([[1, 40, 41, 0], [1, 50, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    saved = ids.clone(), mask.clone(), table(model).clone()
    soft = sp.draw_soft_prompts(model, 2, rows=2)
    for n in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="^n must"):
            sp.draw_soft_prompts(model, n)
        with pytest.raises(ValueError, match="^n must"):
            sp.soft_prompt_generate(model, input_ids=ids, attention_mask=mask, n=n)
    with pytest.raises(ValueError, match="^rows must"):
        sp.draw_soft_prompts(model, 2, rows=0)
    with pytest.raises(ValueError, match="^seed must"):
        sp.draw_soft_prompts(model, 2, seed=-1)
    with pytest.raises(ValueError, match="^seed must"):
        sp.draw_soft_prompts(model, 2, seed="7")
    with pytest.raises(ValueError, match="^gaussian was fitted to hidden size 32"):
        sp.draw_soft_prompts(model, 2, gaussian=sp.EmbeddingGaussian(torch.zeros(32), torch.ones(32), 32))
    with pytest.raises(ValueError, match="^gaussian must"):
        sp.draw_soft_prompts(model, 2, gaussian=(0.0, 1.0))
    for mean, std, match in [(torch.zeros(32), torch.ones(64), "gaussian.mean must be a floating tensor of shape"),
                             (torch.zeros(2, 64), torch.ones(64), "gaussian.mean must"),
                             (0.0, torch.ones(64), "gaussian.mean must"),
                             (torch.zeros(64), torch.ones(64, dtype=torch.long), "gaussian.std must be a floating"),
                             (torch.tensor(0.0), torch.tensor(-1.0), "gaussian.std must be non-negative")]:
        with pytest.raises(ValueError, match=f"^{match}"):
            sp.draw_soft_prompts(model, 2, gaussian=sp.EmbeddingGaussian(mean, std, 64))
    with pytest.raises(ValueError, match="^per_dimension=True, but the gaussian given is isotropic"):
        sp.draw_soft_prompts(model, 2, gaussian=sp.fit_embedding_gaussian(model), per_dimension=True)
    with pytest.raises(TypeError, match="^exclude_token_ids must be a collection of token ids, got int"):
        sp.fit_embedding_gaussian(model, exclude_token_ids=5)
    for call in (lambda: sp.fit_embedding_gaussian(model, per_dimension="no"),  # (truthy: it fitted per dimension)
                 lambda: sp.draw_soft_prompts(model, 2, gaussian=sp.fit_embedding_gaussian(model), per_dimension=1)):
        with pytest.raises(TypeError, match="^per_dimension must be True or False"):
            call()
    with pytest.raises(ValueError, match="^exclude_token_ids"):
        sp.fit_embedding_gaussian(model, exclude_token_ids=[len(tokenizer)])
    with pytest.raises(ValueError, match="^exclude_token_ids must hold integer token ids"):
        sp.fit_embedding_gaussian(model, exclude_token_ids=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="^exclude_token_ids"):
        sp.fit_embedding_gaussian(model, exclude_token_ids=range(len(tokenizer) - 1))
    for wrong in (soft[:1], soft[..., :10], soft[0, 0], soft.long()):
        with pytest.raises(ValueError, match="^soft_prompts must"):
            sp.soft_prompt_inputs(model, ids, mask, soft_prompts=wrong)
    with pytest.raises(ValueError, match="^attention_mask must be a tensor of input_ids' shape"):
        sp.soft_prompt_inputs(model, ids, mask[:, :3], soft_prompts=soft)
    with pytest.raises(ValueError, match="^attention_mask must hold only 0"):
        sp.soft_prompt_inputs(model, ids, mask * 2, soft_prompts=soft)
    with pytest.raises(ValueError, match="^attention_mask: rows \\[1\\] have no real token"):
        sp.soft_prompt_inputs(model, ids, mask * torch.tensor([[1], [0]]), soft_prompts=soft)
    for wrong in (ids.float(), ids[:, :0], torch.empty(0, 4, dtype=torch.long), ids.tolist()):
        with pytest.raises(ValueError, match="^input_ids"):
            sp.soft_prompt_inputs(model, wrong, soft_prompts=soft)
    with pytest.raises(ValueError, match="^input_ids must be token ids in \\[0, 512\\)"):
        sp.soft_prompt_inputs(model, ids + 500, mask, soft_prompts=soft)
    with pytest.raises(ValueError, match="^model: Linear has no input embedding table"):
        sp.fit_embedding_gaussian(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="^model: Linear has no input embedding table"):
        sp.draw_soft_prompts(torch.nn.Linear(4, 4), 2)
    with pytest.raises(ValueError, match="^model: Linear has no input embedding table"):
        sp.soft_prompt_generate(torch.nn.Linear(4, 4), input_ids=ids, n=2)
    with pytest.raises(ValueError, match="not both"):
        sp.soft_prompt_generate(model, tokenizer, TEXTS, input_ids=ids, n=1)
    with pytest.raises(ValueError, match="^texts and tokenizer go together"):
        sp.soft_prompt_generate(model, tokenizer, n=1)
    with pytest.raises(ValueError, match="^give the prompts"):
        sp.soft_prompt_generate(model, n=1)
    with pytest.raises(ValueError, match="^texts is empty"):
        sp.soft_prompt_generate(model, tokenizer, [], n=1)
    with pytest.raises(TypeError, match="^texts must be a string or a list of strings, got an element 3"):
        sp.soft_prompt_generate(model, tokenizer, ["a", 3], n=1)
    with pytest.raises(ValueError, match="inputs_embeds"):
        sp.soft_prompt_generate(model, input_ids=ids, n=1, inputs_embeds=soft)
    # nothing was written: the caller's tensors and the embedding table are as they were
    sp.soft_prompt_generate(model, input_ids=ids, attention_mask=mask, n=2, max_new_tokens=2, do_sample=False)
    for before, after in zip(saved, (ids, mask, table(model))):
        assert torch.equal(before, after)


def with_table(model, weight):
    """The model with its input embedding weight replaced (not trained)."""
    model.get_input_embeddings().weight = torch.nn.Parameter(weight, requires_grad=False)
    return model


@pytest.mark.parametrize("stored", ["int8", "uint8", "packed 4-bit"])
def test_a_table_of_quantized_codes_is_refused(tokenizer, monkeypatch, stored):
    """An embedding table stored as integers holds quantized codes, not embeddings: fitting its
    Gaussian or drawing in its dtype is a ValueError naming model (before the table is read or
    the model runs), not moments of the raw integers."""
    model = fresh_llama(tokenizer)
    vocab, hidden = table(model).shape
    codes = {"int8": torch.randint(-128, 128, (vocab, hidden), dtype=torch.int8),
             "uint8": torch.randint(0, 256, (vocab, hidden), dtype=torch.uint8),
             "packed 4-bit": torch.randint(0, 256, (vocab, hidden // 2), dtype=torch.uint8)}[stored]
    with_table(model, codes)
    fits, real_moments = [], sp._table_moments
    monkeypatch.setattr(sp, "_table_moments", lambda *args: fits.append(1) or real_moments(*args))
    calls, hook = forward_counter(model)
    gaussian = sp.EmbeddingGaussian(torch.tensor(0.0), torch.tensor(1.0), codes.shape[1])
    try:
        with pytest.raises(ValueError, match=f"^model: .*stored as {codes.dtype}"):
            sp.fit_embedding_gaussian(model)
        with pytest.raises(ValueError, match=f"^model: .*stored as {codes.dtype}"):
            sp.draw_soft_prompts(model, 2, gaussian=gaussian)  # (draws cast to int8 would be garbage)
        with pytest.raises(ValueError, match=f"^model: .*stored as {codes.dtype}"):
            sp.soft_prompt_generate(model, input_ids=torch.tensor([[1, 40, 41]]), n=2, max_new_tokens=1)
    finally:
        hook.remove()
    assert not fits and not calls
    assert torch.equal(table(model), codes)


def test_a_float8_table_is_fitted_from_its_values(tokenizer):
    """A float8 table's entries are the embeddings (rounded): its fit is the fit of those values
    in float32, and the draws come in its dtype."""
    model = fresh_llama(tokenizer)
    rounded = table(model).to(torch.float8_e4m3fn)
    with_table(model, rounded)
    expected = sp.fit_embedding_gaussian(with_table(fresh_llama(tokenizer), rounded.float()))
    got = sp.fit_embedding_gaussian(model)
    torch.testing.assert_close(got.mean, expected.mean)
    torch.testing.assert_close(got.std, expected.std)
    assert sp.draw_soft_prompts(model, 3, seed=0).dtype == torch.float8_e4m3fn


def test_texts_lose_the_eos_their_tokenizer_appends():
    """A tokenizer that appends an eos after every text (Llama's add_eos_token, a "$A </s>"
    template): the soft vectors and the generation follow the prompt's last token, not that eos
    (it stood between them: the model generated after an end of text), as greedy_answers and
    generate_with_uncertainty give prompts; a text of nothing but the appended tokens is named."""
    from tokenizers import processors

    appending = tiny_tokenizer()
    eos = appending.eos_token_id
    appending.backend_tokenizer.post_processor = processors.TemplateProcessing(  # (T5's: no bos)
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)])
    texts = ["The river ran", "Stars appear to move"]
    assert appending(texts[0])["input_ids"][-1] == eos  # (the template took)
    model = fresh_llama(appending)
    ours = sp.soft_prompt_generate(model, appending, texts, n=0, **GREEDY)
    for row, text in enumerate(texts):
        prompt = torch.tensor([appending(text)["input_ids"][:-1]])  # the text's tokens
        alone = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0, **GREEDY)
        assert torch.equal(ours.sequences[row], alone.sequences[0, prompt.shape[1]:])
    with pytest.raises(ValueError, match=r"text 1 \(''\) has no tokens \(without the ones the tokenizer appends"):
        sp.soft_prompt_generate(model, appending, ["Stars", ""], n=N, max_new_tokens=2)
