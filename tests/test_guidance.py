"""fastprobe.methods.guidance and patch(guidance=...) on a tiny LLaVA (CLIP vision tower + Llama
text model with grouped-query heads, random weights) and its in-process processor (no downloads):
a guided layer equals the float64 reference on its captured input, gamma = 0 is plain generation,
the image keys are tracked through the KV cache and padding (cached = uncached, batched = alone),
the two-pass baseline masks exactly the image keys, and misuse raises clear errors."""

import copy

import numpy as np
import pytest
import torch

import fastprobe as fp
from fastprobe import cli
from fastprobe.integrations import attention_layers, is_patched, patch_options, update_patch
from fastprobe.methods import guidance
from fastprobe.methods._batching import cache_argument, output_cache
from fastprobe.models import IMAGE_TOKEN, tiny_llava, tiny_llava_processor, tiny_model

from .dropout_helpers import check_eval_mode, with_dropout
from .transformers_helpers import cached_keys_values, generated_cache

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

PROMPTS = [f"{IMAGE_TOKEN}\nDescribe the picture.", f"A photo: {IMAGE_TOKEN} What is in it? Tell me"]
NEW_TOKENS = 6
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def processor():
    return tiny_llava_processor()


@pytest.fixture(scope="module")
def images():
    """Two RGB images of different sizes (the processor resizes them), a fixed seed."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 40, 3), dtype=np.uint8), rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)]


@pytest.fixture
def model(processor):
    return tiny_llava(processor)


def batch_of(model, processor, images, prompts=PROMPTS):
    return guidance.prepare_inputs(model, processor, images, prompts)


def image_positions(batch, processor):
    return batch["input_ids"] == processor.image_token_id


def assert_logits_close(got, want, **tolerance):
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **(tolerance or TOLERANCE), msg=lambda m: f"step {step}: {m}")


# ---------------------------------------------------------------- the inputs


def test_prepare_inputs_left_pads_prompts_of_different_lengths(model, processor, images):
    batch = batch_of(model, processor, images)
    mask = batch["attention_mask"]
    assert mask.shape[0] == 2 and mask.sum(-1).tolist()[0] < mask.sum(-1).tolist()[1]  # different lengths
    assert bool(mask[:, -1].all()) and not bool(mask[0, 0])  # left padding
    assert image_positions(batch, processor).sum(-1).tolist() == [4, 4]  # (28 / 14)^2 image tokens each
    assert batch["pixel_values"].shape == (2, 3, 28, 28)
    assert processor.tokenizer.padding_side == "left"


# ---------------------------------------------------------------- a guided layer vs the float64 reference


def capture_attention(module):
    """Forward hooks on a self-attention module: its inputs (hidden states, rotary cos/sin, mask)
    and its output, per call."""
    calls = []

    def before(module, args, kwargs):
        calls.append(dict(hidden=kwargs.get("hidden_states", args[0] if args else None),
                          rotary=kwargs["position_embeddings"], mask=kwargs["attention_mask"]))

    def after(module, args, kwargs, output):
        calls[-1]["out"] = output[0]

    return calls, [module.register_forward_pre_hook(before, with_kwargs=True),
                   module.register_forward_hook(after, with_kwargs=True)]


def reference_layer(module, call, drop, rows, gamma, orthogonalize, cached=None):
    """The Llama self-attention of a captured call in float64 with reference.dual_path_attention;
    `cached` = (keys, values) of a decoding step (from the KV cache) replaces the call's own."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    f64 = torch.float64
    hidden = call["hidden"].to(f64)
    batch, length, _ = hidden.shape
    size = module.head_dim

    def project(linear, heads):
        out = torch.nn.functional.linear(hidden, linear.weight.to(f64))
        return out.view(batch, length, heads, size).transpose(1, 2)

    config = module.config
    q = project(module.q_proj, config.num_attention_heads)
    k = project(module.k_proj, config.num_key_value_heads)
    v = project(module.v_proj, config.num_key_value_heads)
    cos, sin = (t.to(f64) for t in call["rotary"])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if cached is not None:
        k, v = (t.to(f64) for t in cached)
    out = fp.reference.dual_path_attention(
        q, k, v, drop, gamma=gamma, orthogonalize=orthogonalize, rows=rows, scale=module.scaling, causal=True,
        key_padding_mask=call["mask"].bool(),
    )["out"]
    out = out.transpose(1, 2).reshape(batch, length, -1)
    return torch.nn.functional.linear(out, module.o_proj.weight.to(f64))


@pytest.mark.parametrize("rows, orthogonalize", [("last", True), ("all", True), ("all", False)])
def test_guided_layer_matches_float64_reference(model, processor, images, rows, orthogonalize):
    """Layer 1 guided (layer 0 plain): its output on the captured input equals the float64
    reference with the image positions as dropped keys and the padding as key padding."""
    gamma = 1.5
    batch = batch_of(model, processor, images)
    fp.patch(model, guidance=dict(gamma=gamma, layers=[1], rows=rows, orthogonalize=orthogonalize))
    module = attention_layers(model)[1]
    calls, hooks = capture_attention(module)
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    (call,) = calls
    drop = image_positions(batch, processor)
    selected = "all" if rows == "all" else "last"  # left padding: every row's last query is real
    want = reference_layer(module, call, drop, selected, gamma, orthogonalize)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(call["out"][real], want[real].float(), **TOLERANCE)
    # guidance changed something (on the guided rows only)
    plain = reference_layer(module, call, drop, selected, 0.0, orthogonalize)
    assert (want - plain)[:, -1].abs().max() > 1e-3
    if rows == "last":
        torch.testing.assert_close(want[:, :-1], plain[:, :-1], rtol=0, atol=0)


def test_guided_decoding_step_matches_float64_reference(model, processor, images):
    """The last decoding step of generate (one query, the cached keys): the layer's output equals
    the float64 reference with the prompt's image positions dropped and the generated keys kept."""
    gamma, steps = 2.0, 4
    batch = batch_of(model, processor, images)
    fp.patch(model, guidance=dict(gamma=gamma, layers=[0, 1]))
    module = attention_layers(model)[1]
    calls, hooks = capture_attention(module)
    with torch.no_grad():
        result = model.generate(**batch, max_new_tokens=steps, do_sample=False, return_dict_in_generate=True)
    for hook in hooks:
        hook.remove()
    assert len(calls) == steps and calls[-1]["hidden"].shape[1] == 1
    keys, values = cached_keys_values(generated_cache(result), 1)
    total = batch["input_ids"].shape[1] + steps - 1
    assert keys.shape[2] == total
    drop = torch.zeros(2, total, dtype=torch.bool)
    drop[:, :batch["input_ids"].shape[1]] = image_positions(batch, processor)
    want = reference_layer(module, calls[-1], drop, "last", gamma, True, cached=(keys, values))
    torch.testing.assert_close(calls[-1]["out"], want.float(), **TOLERANCE)
    plain = reference_layer(module, calls[-1], drop, "last", 0.0, True, cached=(keys, values))
    assert (want - plain).abs().max() > 1e-3


def test_right_padding_guides_the_last_real_token(model, processor, images):
    """A plain forward on a right-padded batch: rows="last" guides each row's last real query,
    so the guided next-token logits equal those of the left-padded batch."""
    left = batch_of(model, processor, images)
    lengths = left["attention_mask"].sum(-1)
    right = {key: value.clone() for key, value in left.items()}
    width = left["input_ids"].shape[1]
    for row, length in enumerate(lengths.tolist()):
        for name in ("input_ids", "attention_mask"):
            right[name][row] = torch.roll(left[name][row], -(width - length))
    fp.patch(model, guidance=dict(gamma=2.0))
    with torch.no_grad():
        got = model(**right).logits
        want = model(**left).logits[:, -1]
    torch.testing.assert_close(got[torch.arange(2), lengths - 1], want, **TOLERANCE)


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("rows", ["last", "all"])
def test_gamma_zero_is_plain_generation(model, processor, images, rows):
    batch = batch_of(model, processor, images)
    with torch.no_grad():
        plain = model.generate(**batch, **GREEDY)
    guided = guidance.guided_generate(model, processor, images, PROMPTS, gamma=0.0, rows=rows, **GREEDY)
    assert torch.equal(guided.sequences, plain.sequences)
    assert_logits_close(guided.logits, plain.logits)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"


def test_guided_generation_with_a_static_cache(model, processor, images):
    """A static cache (its buffer's unwritten slots, the masks generate makes ahead) guides as the
    dynamic cache does: the same tokens and logits."""
    dynamic = guidance.guided_generate(model, processor, images, PROMPTS, gamma=2.0, **GREEDY)
    static = guidance.guided_generate(model, processor, images, PROMPTS, gamma=2.0, cache_implementation="static",
                                      **GREEDY)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert_logits_close(static.logits, dynamic.logits)


def test_a_model_left_in_train_mode_generates_without_dropout(model, processor, images):
    """guided_generate and two_pass_generate with a model in train mode with dropout (mixed flags)
    give what they give in eval mode, and every module's flag comes back, also after a failed
    forward. (They generated with dropout on; a guided layer with attention dropout refused to run.)"""
    with_dropout(model)

    def measure():
        return (guidance.guided_generate(model, processor, images, PROMPTS, gamma=2.0, **GREEDY),
                guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=1.0, **GREEDY))

    def compare(got, want):
        for one, other in zip(got, want):
            assert torch.equal(one.sequences, other.sequences)
            assert_logits_close(one.logits, other.logits, rtol=0, atol=0)

    check_eval_mode([model], measure, compare)


@pytest.mark.parametrize("rows, layers", [("all", [0, 1]), ("last", [1])])
def test_guided_generation_with_cache_equals_recomputation(model, processor, images, rows, layers):
    """The image keys tracked through the KV cache (prefill, then one token per step) give the
    same tokens and logits as recomputing every step on the whole sequence without a cache.
    (With rows="last" below the top layer the two differ by design: a cached token keeps the
    keys and values of its guided states, a recomputed one is guided only while it is last.)"""
    settings = dict(GREEDY, gamma=3.0, layers=layers, rows=rows)
    cached = guidance.guided_generate(model, processor, images, PROMPTS, **settings)
    fresh = guidance.guided_generate(model, processor, images, PROMPTS, use_cache=False, **settings)
    assert torch.equal(cached.sequences, fresh.sequences)
    assert_logits_close(cached.logits, fresh.logits, rtol=1e-4, atol=1e-4)


def test_guided_generation_batched_equals_alone(model, processor, images):
    """Left padding, two prompts of different lengths: each row generates what it generates alone."""
    settings = dict(GREEDY, gamma=3.0)
    batched = guidance.guided_generate(model, processor, images, PROMPTS, **settings)
    for row in range(2):
        alone = guidance.guided_generate(model, processor, images[row], PROMPTS[row], **settings)
        width = alone.sequences.shape[1]
        assert torch.equal(batched.sequences[row, -width:], alone.sequences[0])
        assert_logits_close([step[row:row + 1] for step in batched.logits], alone.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows, layers", [("last", None), ("last", [1]), ("all", None)])
def test_guided_assisted_decoding_equals_plain_greedy(rows, layers):
    """Prompt-lookup and assisted decoding check several candidate tokens in one forward (its
    logits_to_keep = candidates + 1; the first one prompt + candidates): each is a generated token,
    guided under rows="last" as at its own step. Only the last was guided (first scores 0.26 off)."""
    ids = torch.randint(10, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 4:8] = 7
    ids[:, 8:] = ids[:, :4]  # (a repeated n-gram: prompt lookup proposes candidates)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    model = fp.patch(tiny_model("llama", hidden_size=32),
                     guidance=dict(gamma=2.0, image_token_id=7, rows=rows, **({"layers": layers} if layers else {})))
    assistant = tiny_model("llama", hidden_size=32, num_layers=1, seed=5)
    with torch.no_grad():
        plain = model.generate(ids, **settings)
        for faster in (dict(prompt_lookup_num_tokens=3), dict(assistant_model=assistant)):
            assisted = model.generate(ids, **faster, **settings)
            assert torch.equal(assisted.sequences, plain.sequences), faster
            torch.testing.assert_close(assisted.scores[0], plain.scores[0], rtol=1e-5, atol=1e-5)


def test_image_keys_in_a_later_prefill_chunk():
    """generate(prefill_chunk_size=...): a chunk on a cache holds prompt tokens, whose image token
    ids are image keys (they were taken as text: the unguided path kept them, scores 0.64 off)."""
    if int(transformers.__version__.split(".")[0]) < 5:  # (4.5x's chunks call model.forward, past the hooks: refused)
        model = fp.patch(tiny_model("llama", hidden_size=32), guidance=dict(gamma=2.0, image_token_id=7))
        with torch.no_grad(), pytest.raises(RuntimeError, match="prefill_chunk_size calls model.forward"):
            model.generate(torch.randint(10, 512, (1, 12)), prefill_chunk_size=4, max_new_tokens=2, pad_token_id=0)
        return
    try:
        with torch.no_grad():
            tiny_model("llama", hidden_size=32).generate(torch.ones(1, 6, dtype=torch.long), prefill_chunk_size=4,
                                                         max_new_tokens=1, pad_token_id=0)
    except ValueError as error:  # (5.0: also unpatched; given a cache, it then hands the first decoding step a
        if "without a cache" not in str(error):  # cache_position one past the keys, which fastprobe refuses)
            raise
        pytest.skip(f"transformers {transformers.__version__}'s chunked prefill needs a cache given to generate")
    ids = torch.randint(10, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 5:8] = 7  # (in the second chunk of 4)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    model = fp.patch(tiny_model("llama", hidden_size=32), guidance=dict(gamma=2.0, image_token_id=7, rows="all"))
    with torch.no_grad():
        whole = model.generate(ids, **settings)
        tracked = model._fastprobe_state.forward.image_keys.mask.clone()
        chunked = model.generate(ids, prefill_chunk_size=4, **settings)
    assert torch.equal(model._fastprobe_state.forward.image_keys.mask, tracked)
    assert tracked[0, :12].nonzero().flatten().tolist() == [5, 6, 7] and not tracked[0, 12:].any()
    assert torch.equal(chunked.sequences, whole.sequences)
    for got, want in zip(chunked.scores, whole.scores):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_decoding_step_is_a_text_key_whatever_its_token():
    """A generated token equal to the image token id is text: only prompts carry image keys."""
    model = fp.patch(tiny_model("llama", hidden_size=32), guidance=dict(gamma=2.0, image_token_id=7))
    ids = torch.randint(10, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 2:5] = 7
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
        model(input_ids=torch.tensor([[7]]), attention_mask=torch.ones(1, 10, dtype=torch.long),
              **{cache_argument(model): cache})  # (past_key_values before transformers 5.25's cache)
    tracked = model._fastprobe_state.forward.image_keys.mask
    assert tracked[0].nonzero().flatten().tolist() == [2, 3, 4] and tracked.shape == (1, 10)


def test_other_option_changes_keep_the_tracked_image_keys():
    """update_patch between the forwards of a cached sequence (prune_heads, patched_with, a new
    record option) keeps its image keys while guidance tracks the same image token: the next step
    is guided as without the change (it raised "lost track of the image keys"). Another image
    token id starts them afresh."""
    model = fp.patch(tiny_model("llama", hidden_size=32), guidance=dict(gamma=2.0, image_token_id=7))
    ids = torch.randint(10, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 2:5] = 7
    step = dict(input_ids=torch.tensor([[11]]), attention_mask=torch.ones(1, 10, dtype=torch.long))
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids, use_cache=True))
        want = model(**step, **{cache_argument(model): copy.deepcopy(cache)}).logits
        update_patch(model, record=("sink_mass", "entropy"))
        got = model(**step, **{cache_argument(model): copy.deepcopy(cache)}).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        update_patch(model, guidance=dict(gamma=2.0, image_token_id=8))
        with pytest.raises(RuntimeError, match="lost track of the image keys"):
            model(**step, **{cache_argument(model): copy.deepcopy(cache)})


def test_image_keys_are_tracked_through_generate(model, processor, images):
    """After generate: the prompt's image positions, then a text key for every fed token."""
    batch = batch_of(model, processor, images)
    fp.patch(model, guidance=dict(gamma=1.0))
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    tracked = model._fastprobe_state.forward.image_keys.mask
    prompt = batch["input_ids"].shape[1]
    assert tracked.shape == (2, out.shape[1] - 1)  # the last token is never fed
    assert torch.equal(tracked[:, :prompt], image_positions(batch, processor))
    assert not tracked[:, prompt:].any()


def test_patch_option_equals_guided_generate_and_context_restores(model, processor, images):
    batch = batch_of(model, processor, images)
    want = guidance.guided_generate(model, processor, images, PROMPTS, gamma=2.0, layers=[1], **GREEDY)
    fp.patch(model, head_mask={0: [True, True, True, True]},
             guidance=dict(gamma=2.0, layers=[1], orthogonalize=True, rows="last"))
    options = patch_options(model).guidance
    assert (options.gamma, options.layers, options.image_token_id) == (2.0, (1,), processor.image_token_id)
    with torch.no_grad():
        got = model.generate(**batch, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    assert_logits_close(got.logits, want.logits)
    fp.patch(model, head_mask={0: [True, True, True, True]})  # guidance off, the head mask kept
    with guidance.guidance(model, gamma=2.0, layers=[1]):
        assert patch_options(model).guidance.layers == (1,)
    assert patch_options(model).guidance is None and set(patch_options(model).head_mask) == {0}
    fp.unpatch(model)
    assert model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- the two-pass baseline


def test_two_pass_language_only_logits_mask_exactly_the_image_keys(model, processor, images):
    """alpha = 1: contrasted = 2 cond - uncond, so uncond = 2 cond - contrasted; it equals the
    model run on the prompt with the image tokens removed (same positions)."""
    batch = batch_of(model, processor, images)
    with torch.no_grad():
        cond = model(**batch).logits
        with guidance.two_pass_contrast(model, alpha=1.0):
            contrasted = model(**batch).logits
        keep = batch["attention_mask"].bool() & ~image_positions(batch, processor)
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        kept = keep.sum(-1)
        width = int(kept.max())
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        pos = torch.zeros(2, width, dtype=torch.long)
        for row in range(2):  # left padded again
            n = int(kept[row])
            ids[row, width - n:] = batch["input_ids"][row][keep[row]]
            pos[row, width - n:] = positions[row][keep[row]]
            mask[row, width - n:] = 1
        text_only = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    uncond = 2 * cond - contrasted
    for row in range(2):
        n = int(kept[row])
        torch.testing.assert_close(uncond[row][keep[row]], text_only[row, width - n:], rtol=1e-4, atol=1e-4)
    assert not model._forward_hooks  # the hook is gone


def test_two_pass_contrast_is_rounded_once(processor, images):
    """A bfloat16 model: the contrasted logits are (1 + alpha) cond - alpha uncond of its own two
    passes rounded once to bfloat16, within half a unit in the last place (they were formed in
    bfloat16: 1.7 cond rounded, then the difference; up to a whole unit off)."""
    model = tiny_llava().to(torch.bfloat16)
    batch = batch_of(model, processor, images)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    seen = []  # the language-only pass ends first, then the conditional one (before the contrast)
    hook = model.register_forward_hook(lambda module, args, output: seen.append(output.logits.clone()))
    try:
        with torch.no_grad(), guidance.two_pass_contrast(model, alpha=0.7):
            contrasted = model(**batch).logits
    finally:
        hook.remove()
    cond, uncond = seen  # (this hook runs first: on the conditional pass, then on the language-only one)
    exact = 1.7 * cond.double() - 0.7 * uncond.double()
    unit = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)  # bfloat16's at |exact|
    formed = 2.0 ** -23 * (1.7 * cond.double().abs() + 0.7 * uncond.double().abs())  # float32's error forming it
    assert contrasted.dtype == torch.bfloat16
    assert bool(((contrasted.double() - exact).abs() <= 0.5 * unit + formed).all())


def test_two_pass_contrast_of_infinite_logits():
    """A token a pass rules out (-inf logits): the contrast keeps the conditional pass's -inf (the
    formula gives -inf + inf = NaN where both are -inf), takes the formula's +inf where only the
    language-only pass rules it out, and alpha = 0 returns the conditional logits themselves (0 *
    -inf is NaN)."""
    inf = float("inf")
    cond = torch.tensor([[1.0, -inf, -inf, 2.0, inf]])
    uncond = torch.tensor([[0.5, -inf, 3.0, -inf, 1.0]])
    for dtype in (torch.float32, torch.bfloat16):
        contrasted = guidance._contrast(cond.to(dtype), uncond.to(dtype), 1.5)
        assert contrasted.dtype == dtype
        assert contrasted.float().tolist() == [[2.5 * 1.0 - 1.5 * 0.5, -inf, -inf, inf, inf]]
        assert torch.equal(guidance._contrast(cond.to(dtype), uncond.to(dtype), 0.0), cond.to(dtype))


def test_baseline_and_guided_differ_and_are_finite(model, processor, images):
    batch = batch_of(model, processor, images)
    with torch.no_grad():
        plain = model.generate(**batch, **GREEDY)
    unchanged = guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=0.0, **GREEDY)
    assert torch.equal(unchanged.sequences, plain.sequences)
    assert all(torch.equal(a, b) for a, b in zip(unchanged.logits, plain.logits))
    baseline = guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=1.0, **GREEDY)
    guided = guidance.guided_generate(model, processor, images, PROMPTS, gamma=1.0, **GREEDY)
    for result in (baseline, guided):
        assert result.sequences.shape == plain.sequences.shape
        assert all(bool(step.isfinite().all()) for step in result.logits)
        assert (result.logits[0] - plain.logits[0]).abs().max() > 1e-3  # both change the first step
    assert (baseline.logits[0] - guided.logits[0]).abs().max() > 1e-3
    assert not torch.equal(baseline.sequences, guided.sequences)


# ---------------------------------------------------------------- errors



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_guided_and_two_pass_generation_under_autocast(model, processor, images, dtype):
    """A float32 VLM under torch.autocast, where the rotary embedding hands attention float32 q
    and k with a low-precision v (refused as a dtype mismatch before the attention ops followed
    autocast): guided (dual-path) and two-pass generation give the tokens they give outside it,
    and logits equal to autocast's rounding (~3e-3 here) step by step, up to a near tie that the
    rounding may break the other way (the random tiny model has them), after which the
    histories differ."""
    calls = (lambda: guidance.guided_generate(model, processor, images, PROMPTS, gamma=1.0, **GREEDY),
             lambda: guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=1.0, **GREEDY))
    tolerance = 0.03
    for call in calls:
        want = call()
        with torch.autocast("cpu", dtype=dtype):
            got = call()
        tokens, wanted = (run.sequences[:, -len(run.logits):] for run in (got, want))
        for step, (got_logits, want_logits) in enumerate(zip(got.logits, want.logits)):
            torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=tolerance)
            if not torch.equal(tokens[:, step], wanted[:, step]):  # only where the exact logits nearly tie
                picked = want_logits.gather(-1, tokens[:, step, None])[:, 0]
                assert bool((picked >= want_logits.max(-1).values - 2 * tolerance).all())
                break

def test_no_image_token_in_a_prompt(model, processor, images):
    with pytest.raises(ValueError, match=r"prompts \[1\] contain no image token '<image>'"):
        guidance.guided_generate(model, processor, images, [PROMPTS[0], "no picture here"], gamma=1.0)
    with pytest.raises(ValueError, match="contain no image token"):
        guidance.two_pass_generate(model, processor, images[:1], "no picture here", alpha=1.0)
    assert not is_patched(model)


@pytest.mark.parametrize("layers, error, match", [
    ([2], ValueError, r"names layer 2, but the model has 2 self-attention layers \(0..1\)"),
    ([], ValueError, "layers is empty"),
    ([-1], ValueError, "guidance layer must be >= 0"),
    (1, TypeError, "list of layer indices"),
])
def test_layers_out_of_range(model, processor, images, layers, error, match):
    with pytest.raises(error, match=match):
        guidance.guided_generate(model, processor, images, PROMPTS, gamma=1.0, layers=layers)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"


def test_non_vlm_model(processor, images):
    llama = tiny_model("llama", vocab_size=len(processor.tokenizer))
    with pytest.raises(TypeError, match="needs a vision-language model .* LlamaForCausalLM names none"):
        guidance.guided_generate(llama, processor, images, PROMPTS, gamma=1.0)
    with pytest.raises(TypeError, match="vision-language model"):
        guidance.two_pass_generate(llama, processor, images, PROMPTS, alpha=1.0)
    with pytest.raises(ValueError, match="needs the image token id"):
        fp.patch(llama, guidance=dict(gamma=1.0))
    assert not is_patched(llama)
    fp.patch(llama, guidance=dict(gamma=1.0, image_token_id=7))  # a text model with a marked token works
    ids = torch.tensor([[1, 7, 7, 9, 10, 11]])
    with torch.no_grad():
        assert llama(input_ids=ids).logits.isfinite().all()


def test_tokenizer_instead_of_processor(model, processor, images):
    with pytest.raises(TypeError, match="vision-language processor"):
        guidance.guided_generate(model, processor.tokenizer, images, PROMPTS, gamma=1.0)


@pytest.mark.parametrize("bad, error, match", [
    (dict(layers=[0]), ValueError, "needs gamma"),
    (dict(gamma=float("nan")), ValueError, "gamma must be a finite number"),
    (dict(gamma=True), TypeError, "gamma must be a real number"),
    (dict(gamma=1.0, rows="first"), ValueError, "rows must be 'last' or 'all'"),
    (dict(gamma=1.0, orthogonalize=1), TypeError, "orthogonalize must be a bool"),
    (dict(gamma=1.0, eps=0.0), ValueError, "eps must be a positive number"),
    (dict(gamma=1.0, strength=2), ValueError, r"unknown keys \['strength'\]"),
])
def test_bad_guidance_options_leave_the_model_alone(model, bad, error, match):
    with pytest.raises(error, match=match):
        fp.patch(model, guidance=bad)
    assert not is_patched(model)


def test_what_a_guided_layer_cannot_do_is_refused(model, processor, images):
    batch = batch_of(model, processor, images)
    with torch.no_grad():  # (a sliding window it takes: gamma 0 is the windowed attention itself)
        fp.patch(model, window=3, guidance=dict(gamma=0.0, layers=[1]))
        guided = model(**batch).logits
        fp.patch(model, window=3)
        torch.testing.assert_close(guided, model(**batch).logits, rtol=2e-5, atol=2e-5)
    fp.patch(model, head_mask={1: [True, False, True, True]}, guidance=dict(gamma=1.0, layers=[1]))
    with pytest.raises(NotImplementedError, match="a head mask"):
        with torch.no_grad():
            model(**batch)
    fp.patch(model, window=3, num_sink=1, guidance=dict(gamma=1.0, layers=[1]))
    with pytest.raises(NotImplementedError, match=r"sink keys \(num_sink\) outside its sliding window"):
        with torch.no_grad():
            model(**batch)
    fp.patch(model, guidance=dict(gamma=1.0, layers=[1]))
    with pytest.raises(NotImplementedError, match="got inputs_embeds; pass input_ids"):
        with torch.no_grad():
            model(inputs_embeds=torch.randn(1, 5, 64))
    with pytest.raises(RuntimeError, match="call the patched model itself"):
        with torch.no_grad():
            model.model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(RuntimeError, match="two_pass_contrast would guide both passes"):
        with guidance.two_pass_contrast(model, alpha=1.0):
            pass


def test_a_failed_forward_leaves_no_image_keys_behind(model, processor, images):
    """A forward that raises part-way (after its image keys were tracked) must not leave them for a
    later direct call of a sub-module, which would be guided with another batch's image keys."""
    batch = batch_of(model, processor, images)
    fp.patch(model, guidance=dict(gamma=1.0, layers=[1]))
    with pytest.raises(RuntimeError, match="channels"), torch.no_grad():
        model(**{**batch, "pixel_values": batch["pixel_values"][:, :1]})  # the vision tower refuses 1 channel
    with pytest.raises(RuntimeError, match="call the patched model itself"), torch.no_grad():
        model.model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():  # and the model itself still runs guided
        assert torch.isfinite(model(**batch).logits).all()


def test_recording_a_guided_model(model, processor, images):
    """record_attention on a guided model: the guided layer's statistics are those of its attention
    weights (guidance changes its output, not its weights), so guiding the last layer leaves every
    layer's recorded statistics as without guidance, while the logits move."""
    batch = batch_of(model, processor, images)
    last = model.config.get_text_config().num_hidden_layers - 1
    with torch.no_grad():
        fp.patch(model)
        with fp.record_attention(model, statistics=("sink_mass", "entropy")) as plain:
            plain_logits = model(**batch).logits
        fp.patch(model, guidance=dict(gamma=1.0, layers=[last]))
        with fp.record_attention(model, statistics=("sink_mass", "entropy")) as guided:
            guided_logits = model(**batch).logits
    torch.testing.assert_close(guided.sink_mass, plain.sink_mass, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(guided.entropy, plain.entropy, rtol=2e-5, atol=2e-6)
    assert (guided_logits - plain_logits).abs().max() > 1e-3


def test_two_pass_contrasts_a_wrapped_model(model, processor, images):
    """A PEFT-style wrapper's generate runs its model's, past hooks on the wrapper: two_pass_generate
    through it was plain generation (alpha ignored); it contrasts the model inside now."""
    from .transformers_helpers import AdapterWrapper

    want = guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=1.0, **GREEDY)
    got = guidance.two_pass_generate(AdapterWrapper(model), processor, images, PROMPTS, alpha=1.0, **GREEDY)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))


def test_a_model_offloaded_by_accelerate_gets_its_inputs_where_it_computes(model, processor, images):
    """A vision-language model whose weights accelerate offloads (meta placeholders, loaded by its
    hooks at each forward on the CPU): prepare_inputs puts the batch on the CPU, and guided and
    two-pass generation give the tokens of the model in memory. The batch was sent to the meta
    device ("Cannot copy out of meta tensor")."""
    import accelerate

    settings = dict(max_new_tokens=4, do_sample=False)
    want = [guidance.guided_generate(model, processor, images, PROMPTS, gamma=1.0, **settings),
            guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=1.0, **settings)]
    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    assert next(offloaded.parameters()).is_meta
    batch = guidance.prepare_inputs(offloaded, processor, images, PROMPTS)
    assert {value.device.type for value in batch.values() if isinstance(value, torch.Tensor)} == {"cpu"}
    got = [guidance.guided_generate(offloaded, processor, images, PROMPTS, gamma=1.0, **settings),
           guidance.two_pass_generate(offloaded, processor, images, PROMPTS, alpha=1.0, **settings)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_two_pass_refuses_bad_alpha(model, processor, images):
    with pytest.raises(ValueError, match="alpha must be finite"):
        guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=float("inf"))
    with pytest.raises(TypeError, match="alpha must be a real number"):
        guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=True)
    for token_id, error in ((True, TypeError), (-1, ValueError), ("abc", TypeError)):  # (True was id 1, -1 no key)
        with pytest.raises(error, match="^image_token_id must be"), guidance.two_pass_contrast(model, alpha=1.0,
                                                                                              image_token_id=token_id):
            pass
    assert not model._forward_hooks and not model._forward_pre_hooks


# Each step's logits without a cache (every forward reruns the whole sequence: both passes start
# afresh) are the reference for the cached two-pass run. The image token is suppressed so that
# no generated token is one (an uncached forward would take it for an image key).
def uncached_twin(model, processor, batch, **settings):
    settings = dict(settings, suppress_tokens=[processor.image_token_id], output_logits=True,
                    return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        cached = model.generate(**batch, **settings)
        uncached = model.generate(**batch, **settings, use_cache=False)
    return cached, uncached


def assert_same_generation(got, want):
    assert torch.equal(got.sequences, want.sequences)
    assert_logits_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("search", [
    dict(num_beams=3),  # beam search reorders the model's cache after every step
    dict(num_beams=3, num_return_sequences=2),
    dict(do_sample=True, top_k=1, num_return_sequences=2),  # rows expanded before the prefill
])
def test_two_pass_beam_search_and_expanded_rows(model, processor, images, search):
    """Beam search reorders the model's KV cache between steps (reorder_cache): the language-only
    cache and the image-key rows must follow, or each beam's language-only pass continues another
    beam's history (it did: wrong logits from the third step on, no error). Whether the beams come
    from generate's arguments or from two_pass_generate."""
    batch = batch_of(model, processor, images)
    settings = {"max_new_tokens": 5, "do_sample": False, **search}  # (top_k=1 sampling: deterministic)
    with guidance.two_pass_contrast(model, alpha=2.0):
        cached, uncached = uncached_twin(model, processor, batch, **settings)
    assert_same_generation(cached, uncached)
    assert not vars(generated_cache(cached)).keys() & {"reorder_cache", "crop"}  # its own methods again
    wrapped = guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=2.0, output_logits=True,
                                         return_dict_in_generate=True, suppress_tokens=[processor.image_token_id],
                                         **settings)
    assert_same_generation(wrapped, cached)


def test_two_pass_image_keys_follow_a_reorder_across_rows(model, processor, images):
    """reorder_cache moving rows between prompts whose image tokens sit at different positions
    moves their image-key rows too: the next step's language-only pass masks each row's own image
    keys. (generate's beam search reorders the beams of one prompt only, whose rows are alike.)"""
    batch = batch_of(model, processor, images)
    assert not torch.equal(*image_positions(batch, processor))  # (the rows differ)
    step = torch.tensor([[5], [7]])  # one text token more for each row

    def next_logits(inputs, reorder):
        with torch.no_grad(), guidance.two_pass_contrast(model, alpha=2.0):
            cache = output_cache(model(**inputs, use_cache=True))
            mask = inputs["attention_mask"]
            if reorder:  # row b continues row 1 - b
                cache.reorder_cache(torch.tensor([1, 0]))
                mask = mask.flip(0)
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            return model(input_ids=step, attention_mask=mask, **{cache_argument(model): cache}, use_cache=True).logits

    swapped = {name: value.flip(0) for name, value in batch.items()}
    torch.testing.assert_close(next_logits(batch, reorder=True), next_logits(swapped, reorder=False), **TOLERANCE)


def test_two_pass_beams_from_the_generation_config(model, processor, images):
    """The model's own generation_config asking for beams (no generate argument) is followed too."""
    batch = batch_of(model, processor, images)
    model.generation_config.num_beams = 2
    with guidance.two_pass_contrast(model, alpha=1.5):
        cached, uncached = uncached_twin(model, processor, batch, max_new_tokens=5, do_sample=False)
    assert cached.sequences.shape[0] == 2  # (one returned beam per row)
    assert_same_generation(cached, uncached)


def test_two_pass_assisted_decoding_crops_both_caches(model, processor, images):
    """Prompt-lookup (assisted) decoding crops the model's cache to the accepted tokens: the
    language-only cache follows, so greedy search with it equals greedy search without it
    (it raised as soon as a candidate was rejected)."""
    row = {name: value[:1] for name, value in batch_of(model, processor, images).items()}
    settings = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True,
                    suppress_tokens=[processor.image_token_id], pad_token_id=processor.tokenizer.pad_token_id)
    for alpha in (0.0, 0.3, 1.0):
        with guidance.two_pass_contrast(model, alpha=alpha), torch.no_grad():
            plain = model.generate(**row, **settings)
            assisted = model.generate(**row, **settings, prompt_lookup_num_tokens=3)
        assert torch.equal(assisted.sequences, plain.sequences), alpha


def test_two_pass_rows_without_padding(model, processor, images):
    """A batch without padding: transformers 5.x's generate passes no attention mask then, and the
    two-pass hook read where the forward starts from the model's cache after the forward had grown
    it (RuntimeError at the prefill). A prompt alone equals it in a padded batch."""
    alone = guidance.two_pass_generate(model, processor, images[1:], PROMPTS[1:], alpha=1.0, **GREEDY)
    batched = guidance.two_pass_generate(model, processor, images, PROMPTS, alpha=1.0, **GREEDY)
    assert torch.equal(alone.sequences[0], batched.sequences[1])
    assert_logits_close([step[1:] for step in batched.logits], list(alone.logits), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        plain = model.generate(**batch_of(model, processor, images[1:], PROMPTS[1:]), **GREEDY)
    unchanged = guidance.two_pass_generate(model, processor, images[1:], PROMPTS[1:], alpha=0.0, **GREEDY)
    assert torch.equal(unchanged.sequences, plain.sequences)


# ---------------------------------------------------------------- the demo


def test_demo_guidance_section(capsys):
    assert cli._demo_guidance(torch.device("cpu"), seed=0, new_tokens=4)
    printed = capsys.readouterr().out
    assert "gamma = 0 vs plain generate: same tokens True" in printed and "two-pass contrastive decoding" in printed


def test_a_pad_token_past_the_table_does_not_fill_rows_that_end_first(model, processor, images):
    """generate fills a row that ends before the others with the pad id and feeds it back: with a
    pad token added to the tokenizer past the model's table (no resize_token_embeddings) and none in
    the model's generation config, guided and two-pass generation fill with an id the model embeds,
    the tokenizer's eos (the pad id was an IndexError inside the embedding)."""
    past = copy.deepcopy(processor)
    past.tokenizer.add_special_tokens({"pad_token": "<pad past the table>"})
    assert past.tokenizer.pad_token_id >= model.get_input_embeddings().num_embeddings
    model.generation_config.pad_token_id = None
    prompts = [PROMPTS[0]] * 2  # (one length: the prompt batch itself holds no padding)
    batch = batch_of(model, processor, images, prompts)
    with torch.no_grad():
        firsts = model.generate(**batch, **GREEDY).sequences[:, -NEW_TOKENS]
    if firsts[0] == firsts[1]:  # (the images differ; fixed seeds: under 5.x the rows' first tokens differ)
        # transformers 4.57.6 initialises the tiny LLaVA otherwise from the same seed: both rows' greedy
        # first token is 172 there (their logits differ by 0.22, the images do reach the model)
        pytest.skip(f"transformers {transformers.__version__}'s tiny LLaVA gives both rows the same first token: "
                    "no row ends first")
    # row 0 ends at its first token, row 1 goes on: row 0 is filled for the steps after
    ending = dict(GREEDY, eos_token_id=int(firsts[0]))
    with torch.no_grad():
        want = model.generate(**batch, **ending, pad_token_id=processor.tokenizer.eos_token_id).sequences
    assert (want[0, -NEW_TOKENS + 1:] == processor.tokenizer.eos_token_id).all()
    guided = guidance.guided_generate(model, past, images, prompts, gamma=0.0, **ending)
    two_pass = guidance.two_pass_generate(model, past, images, prompts, alpha=0.0, **ending)
    assert torch.equal(guided.sequences, want) and torch.equal(two_pass.sequences, want)


def test_a_processor_of_another_model_is_refused(model, processor, images):
    """A processor whose image token id is not the model's config's (one of another checkpoint)."""
    model.config.image_token_id = processor.image_token_id - 1
    with pytest.raises(ValueError, match=rf"the processor's image token id \({processor.image_token_id}\) is not the "
                                         rf"model's \({processor.image_token_id - 1}\): they do not belong together"):
        guidance.prepare_inputs(model, processor, images, PROMPTS)


def test_a_guided_forward_called_with_positional_inputs_finds_the_image_keys(model, processor, images):
    """model(input_ids, attention_mask, pixel_values) as model(**batch): the image keys are read
    from the positional arguments too (the forward pre-hook binds them to their names)."""
    batch = batch_of(model, processor, images)
    fp.patch(model, guidance=dict(gamma=1.0))
    with torch.no_grad():
        by_name = model(**batch).logits
        by_position = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
    tracked = model._fastprobe_state.forward.image_keys.mask
    assert torch.equal(tracked, image_positions(batch, processor))
    torch.testing.assert_close(by_position, by_name, rtol=0, atol=0)
