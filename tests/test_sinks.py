"""fastprobe.methods.sinks on small built-in models and an in-process tokenizer: scoring finds
planted sink heads whatever the padding side, pruning by head mask equals zeroing the output
projection and is reversible, perplexity is batch- and padding-independent, the heat map and the
`fastprobe sinks` command work on a local checkpoint."""

import math
import sys

import pytest
import torch

import fastprobe as fp
from fastprobe import cli
from fastprobe.integrations import is_patched, patch_options, update_patch
from fastprobe.methods import sinks
from fastprobe.models import DEMO_TEXTS, plant_sink_heads, tiny_model, tiny_tokenizer

from .dropout_helpers import check_eval_mode, with_dropout
from .transformers_helpers import patch_or_skip, routes_through_interfaces

transformers = pytest.importorskip("transformers")
pandas = pytest.importorskip("pandas")

PLANTED = {0: [1], 1: [0, 3]}
TEXTS = DEMO_TEXTS[:7]  # an odd count: the last batch is short


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def planted_model(tokenizer, **options):
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=3, num_heads=4, **options)
    return plant_sink_heads(model, PLANTED)


def planted_pairs():
    return sorted((layer, head) for layer, heads in PLANTED.items() for head in heads)


# ---------------------------------------------------------------- scoring


@pytest.mark.parametrize("side", ["left", "right"])
def test_score_heads_finds_planted_sink_heads(tokenizer, side):
    tokenizer.padding_side = side
    try:
        table = sinks.score_heads(planted_model(tokenizer), tokenizer, TEXTS, batch_size=3, progress=False)
    finally:
        tokenizer.padding_side = "right"
    assert list(table.columns) == ["layer", "head", "sink_score", "rank"]
    assert len(table) == 3 * 4 and sorted(table["rank"]) == list(range(1, 13))
    assert list(zip(table["layer"], table["head"])) == [(l, h) for l in range(3) for h in range(4)]
    top = table.sort_values("rank").head(3)
    assert sorted(zip(top["layer"], top["head"])) == planted_pairs()
    assert (top["sink_score"] > 0.95).all() and table["sink_score"].between(0, 1).all()


@pytest.mark.parametrize("stat_tokens", [None, 2])
def test_score_heads_equals_eager_weights_text_by_text(tokenizer, stat_tokens):
    """Batched with padding (both sides) = one text at a time without padding, pooled over all
    real queries: each row's first token is its first real one. A model patched to record the
    mass on its first 2 tokens still scores the first alone, and keeps its option."""
    model = planted_model(tokenizer)
    eager = planted_model(tokenizer, attn_implementation="eager")
    sums, count = 0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            weights = eager(input_ids=ids, output_attentions=True).attentions
            sums = sums + torch.stack([w[0, :, :, 0].sum(-1) for w in weights])
            count += ids.shape[1]
    want = (sums / count).flatten()
    if stat_tokens is not None:
        fp.patch(model, stat_tokens=stat_tokens)
    for side in ("left", "right"):
        tokenizer.padding_side = side
        table = sinks.score_heads(model, tokenizer, TEXTS, batch_size=4, progress=False)
        torch.testing.assert_close(torch.tensor(table["sink_score"].to_numpy()), want, rtol=2e-5, atol=2e-5)
    tokenizer.padding_side = "right"
    if stat_tokens is None:
        assert not is_patched(model)  # patched only for the call
    else:
        assert patch_options(model).stat_tokens == stat_tokens


def test_score_heads_keeps_a_patched_models_options(tokenizer):
    model = fp.patch(planted_model(tokenizer), head_mask={0: [True, False, True, True]})
    table = sinks.score_heads(model, tokenizer, TEXTS, progress=False)
    assert table.loc[(table["layer"] == 0) & (table["head"] == 1), "sink_score"].item() == 0.0
    assert is_patched(model) and 0 in patch_options(model).head_mask


def test_score_heads_names_heads_whose_scores_are_not_finite(tokenizer):
    """A layer whose numbers fail (queries of inf: NaN weights) is named, not left out of the table
    as a head the texts never reach would be (nor a NaN rank that pandas cannot make an int)."""
    model = planted_model(tokenizer)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"sink scores of \(layer, head\) \[\[1, 0\], \[1, 1\]"):
        sinks.score_heads(model, tokenizer, TEXTS[:3], progress=False)


def test_score_heads_leaves_out_layers_the_texts_never_reach(tokenizer):
    """A layer that never runs (as a vision tower on texts) has no row, rather than NaN scores
    taken for an overflow: Llama's forward runs layers[:config.num_hidden_layers]."""
    model = planted_model(tokenizer)
    model.config.num_hidden_layers = 2  # layer 2 of 3 never runs
    table = sinks.score_heads(model, tokenizer, TEXTS[:3], progress=False)
    assert sorted(set(table["layer"])) == [0, 1] and len(table) == 8
    assert sorted(sinks.top_heads(table, 3 / 8)) == planted_pairs()


def test_tokenizer_without_pad_token_borrows_eos(tokenizer):
    model = planted_model(tokenizer)
    tokenizer.pad_token = None
    try:
        table = sinks.score_heads(model, tokenizer, TEXTS[:3], progress=False)
        ppl = sinks.perplexity(model, tokenizer, TEXTS[:3])
        assert tokenizer.pad_token is None
    finally:
        tokenizer.pad_token = "<pad>"
    assert len(table) == 12 and ppl > 1


def test_top_and_random_heads(tokenizer):
    table = sinks.score_heads(planted_model(tokenizer), tokenizer, TEXTS, progress=False)
    assert sorted(sinks.top_heads(table, 0.25)) == planted_pairs()
    assert sinks.top_heads(table, 0.0) == []
    # round(fraction * heads) of the 12 heads: 2.52 -> 3, 2.4 -> 2 (the best-ranked first)
    assert sinks.top_heads(table, 0.21) == sinks.top_heads(table, 0.25)
    assert sinks.top_heads(table, 0.2) == sinks.top_heads(table, 0.25)[:2]
    drawn = sinks.random_heads(table, 3, seed=1, exclude=planted_pairs())
    assert len(set(drawn)) == 3 and not set(drawn) & set(planted_pairs())
    assert drawn == sinks.random_heads(table, 3, seed=1, exclude=planted_pairs())
    with pytest.raises(ValueError, match="fraction"):
        sinks.top_heads(table, 1.5)
    with pytest.raises(ValueError, match="cannot draw"):
        sinks.random_heads(table, 13)
    # a negative count drew all but that many heads, a float failed in slicing: refused by name
    with pytest.raises(ValueError, match="count must be >= 0"):
        sinks.random_heads(table, -1)
    with pytest.raises(TypeError, match="count must be an integer"):
        sinks.random_heads(table, 2.0)
    assert sinks.random_heads(table, 0) == []
    # a seed torch's generator refuses ("manual_seed expected a long") or wraps (-1 is 2**64 - 1): refused by name
    for seed, error in ((None, TypeError), (1.0, TypeError), (True, TypeError), (-1, ValueError)):
        with pytest.raises(error, match="seed must be"):
            sinks.random_heads(table, 2, seed=seed)


def test_random_heads_exclude_a_table_as_its_rows(tokenizer):
    """exclude given as a score_heads table (its top rows, as prune_heads takes heads) leaves those
    heads out of the draw; iterated as it was, a DataFrame gave its column names and excluded
    nothing, so the "random" control drew the top sink heads themselves. An entry that is not a
    pair is a TypeError."""
    table = sinks.score_heads(planted_model(tokenizer), tokenizer, TEXTS, progress=False)
    top = table[table["rank"] <= len(planted_pairs())]
    for seed in range(8):
        drawn = sinks.random_heads(table, len(table) - len(top), seed=seed, exclude=top)
        assert sorted(drawn) == sorted(set(map(tuple, table[["layer", "head"]].values.tolist())) - set(planted_pairs()))
        assert sinks.random_heads(table, 3, seed=seed, exclude=top) == \
            sinks.random_heads(table, 3, seed=seed, exclude=planted_pairs())
    with pytest.raises(TypeError, match="heads must be a list of"):
        sinks.random_heads(table, 2, exclude=[3])


# ---------------------------------------------------------------- pruning


def logits(model, tokenizer):
    batch = tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits, batch["attention_mask"].bool()


@pytest.mark.parametrize("arch, kv_heads", [("llama", 4), ("llama", 2), ("gpt2", None), ("bert", None)])
def test_mask_and_zero_o_proj_prune_the_same(tokenizer, arch, kv_heads):
    """On one (patched) model, pruning by head mask and by zeroing the head's o_proj input
    columns give identical outputs: the head's contribution is exactly 0 either way. Covers MHA,
    GQA (columns per query head), GPT-2's Conv1D c_proj and BERT's sibling output.dense."""
    options = {} if kv_heads is None else {"num_kv_heads": kv_heads}
    model = patch_or_skip(tiny_model(arch, vocab_size=len(tokenizer), **options))
    heads = [(0, 1), (1, 0), (1, 3)]
    base, real = logits(model, tokenizer) if arch != "bert" else bert_outputs(model, tokenizer)
    run = logits if arch != "bert" else bert_outputs
    with sinks.prune_heads(model, heads, mode="mask"):
        masked, _ = run(model, tokenizer)
    with sinks.prune_heads(model, heads, mode="zero_o_proj") as handle:
        zeroed, _ = run(model, tokenizer)
        assert repr(handle) == "PrunedHeads(3 heads, mode='zero_o_proj', active=True)"
    assert repr(handle) == "PrunedHeads(3 heads, mode='zero_o_proj', active=False)"
    assert torch.equal(masked[real], zeroed[real])
    assert (masked - base)[real].abs().max() > 1e-4
    restored, _ = run(model, tokenizer)
    assert torch.equal(restored, base)


def test_zero_o_proj_prunes_a_heads_value_width():
    """MiMo-V2-Flash's values are narrower than its queries and keys (v_head_dim 8, head_dim 16):
    a head's input columns of o_proj are its value width, so zeroing them prunes the same head as
    the mask (it zeroed head_dim columns: other heads' too, or out of range)."""
    from .test_architectures import FAMILIES, build

    try:
        model = fp.patch(build("mimo_v2_flash", FAMILIES["mimo_v2_flash"][1]))
    except ValueError:
        pytest.skip("the installed transformers has no MiMo-V2-Flash")
    ids = torch.randint(3, 512, (2, 9))
    run = lambda: model(input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        base = run()
        for heads in ([(0, 0)], [(1, 3), (0, 2)]):
            with sinks.prune_heads(model, heads, mode="mask"):
                masked = run()
            with sinks.prune_heads(model, heads, mode="zero_o_proj"):
                zeroed = run()
            torch.testing.assert_close(zeroed, masked, rtol=1e-5, atol=1e-6)
            assert (masked - base).abs().max() > 1e-4


def test_zero_o_proj_that_cannot_prune_a_head_changes_no_weight(tokenizer):
    """A head whose projection is not found is refused before any column is zeroed (the heads
    listed before it were left zeroed, with no handle to restore them)."""
    model = planted_model(tokenizer)
    model.model.layers[1].self_attn.o_proj = torch.nn.Identity()  # (same shapes: no projection to find)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(NotImplementedError, match="no output projection found"):
        sinks.prune_heads(model, [(0, 1), (1, 0)], mode="zero_o_proj")
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert not hasattr(model, sinks._PRUNED)


def bert_outputs(model, tokenizer):
    batch = tokenizer(TEXTS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state, batch["attention_mask"].bool()


def test_prune_and_restore(tokenizer):
    model = planted_model(tokenizer)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    table = sinks.score_heads(model, tokenizer, TEXTS, progress=False)
    base, real = logits(model, tokenizer)

    first = sinks.prune_heads(model, table, fraction=0.25)  # mask: patches the model
    assert first.heads == planted_pairs() and is_patched(model)
    second = sinks.prune_heads(model, [(2, 2)], mode="zero_o_proj")
    with pytest.raises(RuntimeError, match="newest first"):
        first.restore()
    pruned, _ = logits(model, tokenizer)
    assert (pruned - base)[real].abs().max() > 1e-4
    sinks.restore_heads(model)
    assert not first.active and not second.active and not is_patched(model)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert torch.equal(logits(model, tokenizer)[0], base)
    assert second.saved == []  # (a handle kept after restore holds no copy of the columns)
    first.restore()  # a no-op once restored


def test_a_patch_made_for_pruning_goes_with_the_prune_unless_the_user_patched_since(tokenizer):
    """prune_heads(mode="mask") patches an unpatched model for the prune: restoring it unpatches the
    model, also when the restore happens inside a record_attention block (unpatched as the block
    ends). A patch() or update_patch() called in between makes the patch the user's: it stays, with
    the options they chose (the restore used to unpatch it, dropping them)."""
    model = planted_model(tokenizer)
    handle = sinks.prune_heads(model, [(0, 1)])
    with fp.record_attention(model):
        handle.restore()
        assert is_patched(model)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"
    for user_call in (lambda: fp.patch(model, num_sink=2), lambda: update_patch(model, num_sink=2)):
        handle = sinks.prune_heads(model, [(0, 1)])
        user_call()
        handle.restore()
        assert is_patched(model) and patch_options(model).num_sink == 2 and patch_options(model).head_mask == {}
        fp.unpatch(model)
    handle = sinks.prune_heads(model, [(0, 1)])
    update_patch(model)  # (no change of options, but the user's call: the patch is theirs)
    handle.restore()
    assert is_patched(model)


def test_prune_on_a_patched_model_keeps_its_options(tokenizer):
    """Every other option (guidance among them) is kept while pruned and after restore."""
    model = fp.patch(planted_model(tokenizer), window=5, head_mask={2: [True, True, False, True]}, num_sink=1,
                     stat_tokens=2, record=("sink_mass", "entropy"), guidance=dict(gamma=1.5, layers=[1], image_token_id=7))
    before = patch_options(model)
    handle = sinks.prune_heads(model, [(0, 1), (2, 0)])
    options = patch_options(model)
    assert options.head_mask[0].tolist() == [True, False, True, True]
    assert options.head_mask[2].tolist() == [False, True, False, True]
    handle.restore()
    after = patch_options(model)
    assert is_patched(model) and after.head_mask[2].tolist() == [True, True, False, True]
    assert set(after.head_mask) == {2}
    for kept in (options, after):
        assert (kept.window, kept.num_sink, kept.stat_tokens, kept.record, kept.guidance) == \
            (before.window, before.num_sink, before.stat_tokens, before.record, before.guidance)


def test_a_pruned_model_converted_copied_or_saved_restores_its_own_heads(tokenizer, tmp_path):
    """The handles hold parameter names, not views or closures: restore after model.to(dtype)
    puts the columns back (it copied into the old tensor: the head stayed zeroed); restore_heads
    on a deep copy restores the copy, not the original (the copy's handles undid the original's
    pruning); a pruned model pickles (torch.save raised on a local function)."""
    import copy

    model = planted_model(tokenizer)
    columns = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    handle = sinks.prune_heads(model, [(0, 1)], mode="zero_o_proj")
    model.to(torch.bfloat16)
    handle.restore()
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, columns.to(torch.bfloat16))
    for mode in ("mask", "zero_o_proj"):
        model = planted_model(tokenizer)
        base, real = logits(model, tokenizer)
        sinks.prune_heads(model, [(0, 1), (2, 3)], mode=mode)
        pruned, _ = logits(model, tokenizer)
        torch.save(model, tmp_path / f"{mode}.pt")
        loaded = torch.load(tmp_path / f"{mode}.pt", weights_only=False)
        twin = copy.deepcopy(model)
        for other in (twin, loaded):
            sinks.restore_heads(other)
            assert torch.equal(logits(other, tokenizer)[0], base) and not is_patched(other)
            assert torch.equal(logits(model, tokenizer)[0], pruned), mode  # (the original still pruned)
        sinks.restore_heads(model)
        assert torch.equal(logits(model, tokenizer)[0], base) and not is_patched(model)


@pytest.mark.parametrize("wrap", ["adapter", "compiled"])
def test_methods_see_the_forward_of_the_model_inside_a_wrapper(tokenizer, wrap):
    """A wrapper's forward takes (*args, **kwargs): the methods read the model inside's, so a GPT-2
    (absolute positions) under left padding gets its position ids (perplexity 509.8 through a
    compiled model, 521.9 through a PEFT one, for 502.3)."""
    from fastprobe.methods._batching import forward_parameters

    from .transformers_helpers import NO_COMPILE_REFERENCE, AdapterWrapper

    if wrap == "compiled" and NO_COMPILE_REFERENCE:
        pytest.skip(f"transformers' models do not compile on torch {torch.__version__}")
    model = tiny_model("gpt2", vocab_size=len(tokenizer), num_layers=2)
    wrapper = AdapterWrapper(model) if wrap == "adapter" else torch.compile(model, backend="eager")
    assert "position_ids" in forward_parameters(wrapper)
    tokenizer.padding_side = "left"
    try:
        got = sinks.perplexity(wrapper, tokenizer, TEXTS[:4], batch_size=4)
    finally:
        tokenizer.padding_side = "right"
    assert got == pytest.approx(sinks.perplexity(model, tokenizer, TEXTS[:4], batch_size=1), rel=1e-5)


def test_zero_o_proj_refuses_weights_it_cannot_zero(tokenizer):
    """An output projection wrapped by an adapter (zeroing its base weight leaves the adapter's
    share of the head) and an offloaded one (a meta placeholder: zeroing it pruned nothing) are
    refused before any weight changes; mode="mask" prunes both, and a record of an offloaded
    model is made where it computes (it was on the meta device)."""
    import accelerate

    model = planted_model(tokenizer)

    class Adapted(torch.nn.Module):  # (the shape of a PEFT LoRA layer)
        def __init__(self, base_layer):
            super().__init__()
            self.base_layer = base_layer

        def forward(self, x):
            return self.base_layer(x)

    attention = model.model.layers[0].self_attn
    attention.o_proj = Adapted(attention.o_proj)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(NotImplementedError, match="wrapped by an adapter"):
        sinks.prune_heads(model, [(2, 0), (0, 1)], mode="zero_o_proj")
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    offloaded = accelerate.cpu_offload(planted_model(tokenizer), execution_device="cpu")
    with pytest.raises(NotImplementedError, match="offloaded"):
        sinks.prune_heads(offloaded, [(0, 1)], mode="zero_o_proj")
    base, _ = logits(offloaded, tokenizer)
    with sinks.prune_heads(offloaded, [(0, 1)]), fp.record_attention(offloaded) as record:
        pruned, real = logits(offloaded, tokenizer)
    assert (pruned - base)[real].abs().max() > 1e-4
    assert record.sink_mass.device.type == "cpu" and record.sink_mass[0, 1] == 0


def test_restore_after_unpatch_does_not_repatch(tokenizer):
    model = fp.patch(planted_model(tokenizer))
    handle = sinks.prune_heads(model, [(0, 1)])
    fp.unpatch(model)
    handle.restore()
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("heads, kwargs, error, match", [
    ([(3, 0)], {}, ValueError, "outside"),
    ([(0, 4)], {}, ValueError, "outside"),
    ([(0, 1)], {"mode": "zero"}, ValueError, "mode"),
    ([(0, 1)], {"fraction": 0.5}, TypeError, "score_heads table"),
    ([(0, 1, 2)], {}, TypeError, "pairs"),
    # one pair instead of a list of pairs, None, a string, a float layer: refused by name (they
    # failed with "'int' object is not iterable", or the float was truncated to layer 0)
    ((0, 1), {}, TypeError, r"heads must be a list of \(layer, head\) pairs.* got the entry 0 \(one head is"),
    (None, {}, TypeError, r"heads must be a list of \(layer, head\) pairs.* got NoneType"),
    ("0,1", {}, TypeError, r"heads must be .* got str"),
    ([(0.5, 1)], {}, TypeError, r"got the entry \(0.5, 1\)"),
])
def test_prune_heads_bad_input(tokenizer, heads, kwargs, error, match):
    model = planted_model(tokenizer)
    with pytest.raises(error, match=match):
        sinks.prune_heads(model, heads, **kwargs)
    assert not is_patched(model) and not hasattr(model, "_fastprobe_pruned")


def test_prune_heads_takes_pairs_of_any_integer_kind(tokenizer):
    model = planted_model(tokenizer)
    with sinks.prune_heads(model, [[0, 1], torch.tensor([1, 2])]) as handle:
        assert handle.heads == [(0, 1), (1, 2)]


def test_prune_heads_takes_a_filtered_table_as_its_rows(tokenizer):
    """A score_heads table without fraction prunes every row it has (a filtered table: the heads
    the user picked), as the list of its (layer, head) pairs does."""
    model = planted_model(tokenizer)
    table = sinks.score_heads(model, tokenizer, TEXTS, progress=False)
    picked = table[table["rank"] <= 3]
    with sinks.prune_heads(model, picked) as handle:
        assert sorted(handle.heads) == sorted(sinks.top_heads(table, 0.25)) == planted_pairs()
        from_table = sinks.perplexity(model, tokenizer, TEXTS)
    with sinks.prune_heads(model, planted_pairs()):
        assert sinks.perplexity(model, tokenizer, TEXTS) == from_table
    with pytest.raises(TypeError, match="fraction needs the score_heads table"):
        sinks.prune_heads(model, planted_pairs(), fraction=0.25)


# ---------------------------------------------------------------- perplexity, plot, command


def test_perplexity_is_batch_and_padding_independent(tokenizer):
    model = planted_model(tokenizer)
    one = sinks.perplexity(model, tokenizer, TEXTS, batch_size=1)
    tokenizer.padding_side = "left"
    try:
        left = sinks.perplexity(model, tokenizer, TEXTS, batch_size=3)
    finally:
        tokenizer.padding_side = "right"
    right = sinks.perplexity(model, tokenizer, TEXTS, batch_size=4)
    assert one == pytest.approx(left, rel=1e-5) and one == pytest.approx(right, rel=1e-5)
    ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert sinks.perplexity(model, tokenizer, TEXTS[:1]) == pytest.approx(loss.exp().item(), rel=1e-5)
    with pytest.raises(ValueError, match="texts is empty"):
        sinks.perplexity(model, tokenizer, [])
    with pytest.raises(ValueError, match="no token to predict: every text is shorter than two tokens"):
        sinks.perplexity(model, tokenizer, ["a"] if len(tokenizer("a")["input_ids"]) < 2 else [""])



@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_texts_past_a_rotary_models_configured_positions_warn_and_score_as_eager(tokenizer, arch):
    """A rotary model has no position table to run out of: texts longer than its config's
    max_position_embeddings ran silently (sliding window or not), on positions it was never
    trained for. They still run, scored as the eager model scores them, with a warning that names
    max_length, when max_length lets them (by default it is the context); within the context
    there is none."""
    import warnings

    context = 12
    options = dict(vocab_size=len(tokenizer), num_layers=2, max_position_embeddings=context,
                   seed=int(torch.randint(0, 2**31 - 1, ())))
    model = tiny_model(arch, **options)
    # (the same weights, eager; transformers 4.53 has no set_attn_implementation)
    reference = tiny_model(arch, attn_implementation="eager", **options)
    text = " ".join(DEMO_TEXTS[:3])
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3 * context
    with pytest.warns(UserWarning, match=rf"texts of {ids.shape[1]} tokens run past the {context} positions "
                                         rf"{type(model).__name__}'s config gives .* pass max_length <= {context} "):
        table = sinks.score_heads(model, tokenizer, [text], max_length=512, progress=False)
    with torch.no_grad():
        weights = torch.stack(reference(ids, output_attentions=True).attentions)  # [layers, 1, H, L, L]
    expected = weights[:, 0, :, :, 0].double().mean(-1).flatten()
    assert torch.allclose(torch.tensor(table["sink_score"].values, dtype=torch.float64), expected, atol=1e-5)
    with pytest.warns(UserWarning, match=rf"perplexity: texts of {ids.shape[1]} tokens run past"):
        sinks.perplexity(model, tokenizer, [text, text], batch_size=1, max_length=512, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sinks.score_heads(model, tokenizer, [text], max_length=context, progress=False)
        sinks.perplexity(model, tokenizer, [text], progress=False)


def test_a_tokenizer_with_tokens_the_model_lacks_is_named_before_the_model_runs(tokenizer):
    """A model whose embedding table ends before the tokenizer's last tokens (tokens added to the
    tokenizer without resizing the model): score_heads and perplexity raise a ValueError naming the
    text, the id and the table, before any forward (it failed inside torch's embedding: an
    IndexError on the CPU, a device assert on CUDA), and score_heads leaves the model unpatched."""
    model = tiny_model("llama", vocab_size=400, num_layers=2)
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert max(ids) >= 400
    for function in (sinks.score_heads, sinks.perplexity):
        with pytest.raises(ValueError, match=r"text 0 .* token id \d+, past the 400 rows of LlamaForCausalLM's "
                                              r"input embedding table .*resize_token_embeddings"):
            function(model, tokenizer, TEXTS[:2], progress=False)
    assert not is_patched(model)
    assert max(tokenizer("Stars looked at the bridge")["input_ids"]) < 400
    sinks.perplexity(model, tokenizer, ["Stars looked at the bridge"], progress=False)  # (within the table)


def test_perplexity_reads_the_logits_without_a_copy(tokenizer, monkeypatch):
    """The loss reads a float32 model's logits [B, L, V] as the model returned them (the last
    position's target ignored), not a sliced [B, L - 1, V] copy; the figure is the mean next-token
    loss over real tokens, summed in float64 here."""
    model = planted_model(tokenizer)
    returned, read = [], []
    model.register_forward_hook(lambda module, args, output: returned.append(output.logits))
    cross_entropy = torch.nn.functional.cross_entropy

    def reading(logits, *args, **kwargs):
        read.append(logits)
        return cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", reading)
    got = sinks.perplexity(model, tokenizer, TEXTS, batch_size=3)
    monkeypatch.undo()
    assert len(read) == len(returned) == 3
    assert all(r.untyped_storage().data_ptr() == l.untyped_storage().data_ptr() for r, l in zip(read, returned))
    total, count = 0.0, 0
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].double()
        total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_score_prune_and_perplexity_under_autocast(tokenizer, dtype):
    """A float32 model under torch.autocast (its rotary embedding hands attention float32 q and k
    with a low-precision v, refused before the attention ops followed autocast): the sink scores,
    the pruning and the perplexity are those outside it, to autocast's rounding."""
    model = planted_model(tokenizer)

    def measure():
        table = sinks.score_heads(model, tokenizer, TEXTS, batch_size=3, progress=False)
        with sinks.prune_heads(model, planted_pairs()):
            pruned = sinks.perplexity(model, tokenizer, TEXTS, batch_size=3)
        return table, sinks.perplexity(model, tokenizer, TEXTS, batch_size=3), pruned

    want = measure()
    with torch.autocast("cpu", dtype=dtype):
        got = measure()
    top = sinks.top_heads(got[0], 0.25)
    assert top == sinks.top_heads(want[0], 0.25) and sorted(top) == planted_pairs()
    assert (got[0]["sink_score"] - want[0]["sink_score"]).abs().max() < 2e-3
    for got_perplexity, want_perplexity in zip(got[1:], want[1:]):
        assert abs(got_perplexity / want_perplexity - 1) < 1e-3
    assert not is_patched(model)

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_left_in_train_mode_is_measured_without_dropout(tokenizer, arch):
    """score_heads and perplexity of a model in train mode with dropout (mixed flags) are those of
    the model in eval mode, and every module's flag comes back, also after a failed forward. (They
    ran with dropout on: random, unrepeatable figures; a patched layer with attention dropout
    refused to run at all.)"""
    model = with_dropout(planted_model(tokenizer) if arch == "llama" else
                         tiny_model("gpt2", vocab_size=len(tokenizer), num_layers=2))
    if not routes_through_interfaces(model):  # (GPT-2 on 4.53: score_heads refuses it, see patch_or_skip)
        flags = [module.training for module in model.modules()]
        with pytest.raises(NotImplementedError, match="cannot patch"):
            sinks.score_heads(model, tokenizer, TEXTS[:3], batch_size=2, progress=False)
        assert [module.training for module in model.modules()] == flags and not is_patched(model)
        pytest.skip(f"transformers {transformers.__version__} does not run {type(model).__name__} through its "
                    "interfaces: score_heads refuses it (checked)")

    def measure():
        table = sinks.score_heads(model, tokenizer, TEXTS[:3], batch_size=2, progress=False)
        return table["sink_score"].to_numpy(), sinks.perplexity(model, tokenizer, TEXTS[:3], batch_size=2)

    def compare(got, want):
        assert got[0].tolist() == want[0].tolist() and got[1] == want[1]

    check_eval_mode([model], measure, compare)


def test_plot_sink_heads(tokenizer, tmp_path, monkeypatch):
    table = sinks.score_heads(planted_model(tokenizer), tokenizer, TEXTS[:3], progress=False)
    path = sinks.plot_sink_heads(table, tmp_path / "sinks.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"fastprobe\[plot\]"):
        sinks.plot_sink_heads(table, tmp_path / "again.png")


def test_plot_sink_heads_refuses_what_is_not_a_score_heads_table(tmp_path):
    """(a list failed with "'list' object has no attribute 'pivot'", a table without the columns
    with a KeyError); nothing is written."""
    import pandas

    with pytest.raises(TypeError, match="table must be a score_heads DataFrame .* got list"):
        sinks.plot_sink_heads([1, 2, 3], tmp_path / "list.png")
    with pytest.raises(ValueError, match="table must be a score_heads DataFrame: it has no column head, sink_score"):
        sinks.plot_sink_heads(pandas.DataFrame({"layer": [0, 1]}), tmp_path / "columns.png")
    assert not list(tmp_path.iterdir())
    for pick in (lambda table: sinks.top_heads(table, 0.5), lambda table: sinks.random_heads(table, 1)):
        with pytest.raises(TypeError, match="table must be a score_heads DataFrame .* got list"):
            pick([(0, 1)])
        with pytest.raises(ValueError, match="it has no column head"):
            pick(pandas.DataFrame({"layer": [0, 1], "rank": [1, 2]}))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    """A local checkpoint (model with planted sink heads + tokenizer) and a texts file."""
    folder = tmp_path_factory.mktemp("checkpoint")
    planted_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    texts = folder / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")
    return folder, texts


def test_sinks_command(checkpoint, tmp_path, capsys):
    folder, texts = checkpoint
    plot = tmp_path / "heads.png"
    code = cli.main(["sinks", "--model", str(folder), "--texts", str(texts), "--prune", "0.25",
                     "--plot", str(plot), "--no-progress", "--top", "3"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "7 texts" in printed and "perplexity" in printed and "random" in printed
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()][:3]
    assert sorted((int(r[1]), int(r[2])) for r in rows) == planted_pairs()  # rank, layer, head, score
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_sinks_command_bad_paths(tmp_path, capsys):
    assert cli.main(["sinks", "--model", str(tmp_path / "missing"), "--texts", str(tmp_path / "t.txt")]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("options, match", [
    (["--prune", "0.75"], "give a fraction of at most "),  # too few other heads for the random control
    (["--csv", "{tmp}/no/table.csv"], "there is no folder"),
    (["--plot", "{tmp}/heads.xyz"], "matplotlib writes"),
])
def test_sinks_command_refuses_what_it_cannot_do_before_it_runs(checkpoint, tmp_path, capsys, options, match):
    """A clear error and status 2, never a traceback; outputs and --prune are checked before scoring."""
    folder, texts = checkpoint
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    assert cli.main(["sinks", "--model", str(folder), "--texts", str(texts), "--no-progress", *options]) == 2
    captured = capsys.readouterr()
    assert match in captured.err and "Traceback" not in captured.err
    assert "strongest sink heads" not in captured.out


def test_demo_sinks_section(capsys):
    """The demo's pipeline on its built-in model (short timing input)."""
    assert cli._demo_sinks(torch.device("cpu"), seed=0, length=64)
    printed = capsys.readouterr().out
    assert "RANDOM" in printed and "rank first -> OK" in printed and "FAILED" not in printed
    assert "fastprobe.record_attention" in printed and "output_attentions=True" in printed


def test_perplexity_of_a_model_without_logits_is_refused(tokenizer):
    """(BERT's encoder, BertModel, returns hidden states only)"""
    encoder = tiny_model("bert", vocab_size=len(tokenizer), num_layers=1)
    with pytest.raises(TypeError, match="perplexity needs a causal language model with logits, got BertModel"):
        sinks.perplexity(encoder, tokenizer, DEMO_TEXTS[:2], progress=False)
