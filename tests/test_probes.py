"""fastprobe.methods.probes on small built-in models (random weights, no downloads): the collector
equals output_hidden_states (Llama, Gemma 2, GPT-2, BERT, a tiny LLaVA) for every padding side and
pooling, stops the forward after the deepest chosen block, leaves the model and the caller's
batches as they were; the probes learn planted signals (linear, MLP, attentive on the one token
that carries it), stay at chance on shuffled labels, are deterministic, keep their
standardisation, and bad input raises a clear ValueError before any work."""

import warnings

import numpy as np
import pytest
import torch

from fastprobe.methods import probes
from fastprobe.methods.probes import (
    AttentiveProbe, LinearProbe, MLPProbe, collect_hidden_states, collect_hidden_states_from_batches, evaluate_probe,
    predict, train_probe, transformer_blocks,
)
from fastprobe.models import DEMO_TEXTS, IMAGE_TOKEN, tiny_llava, tiny_llava_processor, tiny_model, tiny_tokenizer

from .dropout_helpers import check_eval_mode, with_dropout

pytest.importorskip("transformers")

TEXTS = DEMO_TEXTS[:5]  # different lengths; batch_size=2 leaves a short last batch
TOLERANCE = dict(rtol=1e-4, atol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


_MODELS = {}


def model_of(arch, tokenizer, num_layers=3):
    key = (arch, num_layers)
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, vocab_size=len(tokenizer), num_layers=num_layers)
    return _MODELS[key]


def alone(model, tokenizer, text):
    """hidden_states of one text without padding (transformers' own output_hidden_states)."""
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def final_norm(model):
    return model.model.norm if hasattr(model, "model") else model.transformer.ln_f


def hooks_on(model) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


# ---------------------------------------------------------------- the collector


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_collector_equals_output_hidden_states_whatever_the_padding(tokenizer, arch, side):
    """Texts batched with padding give, layer by layer and token by token, what
    output_hidden_states gives each text alone: layer i = hidden_states[i + 1]. The last block's
    raw output, put through the final norm, is hidden_states[-1] (BERT has no final norm)."""
    model = model_of(arch, tokenizer)
    tokenizer.padding_side = side
    try:
        tokens = collect_hidden_states(model, tokenizer, TEXTS, layers=[0, 1, 2], pool=None, batch_size=2,
                                       progress=False)
        last = collect_hidden_states(model, tokenizer, TEXTS, layers=[0, 2], pool="last", batch_size=2, progress=False)
        mean = collect_hidden_states(model, tokenizer, TEXTS, layers=[1], pool="mean", batch_size=2, progress=False)
    finally:
        tokenizer.padding_side = "right"
    assert tokens.mask.dtype == torch.bool and tokens[0].dtype == torch.float32 and tokens[0].device.type == "cpu"
    assert repr(last) == f"HiddenStates(layers=[0, 2], each [{len(TEXTS)}, {last[0].shape[1]}] torch.float32, pool='last', " \
                         f"num_layers={last.num_layers})"  # (shapes, not the values)
    for row, text in enumerate(TEXTS):
        want = alone(model, tokenizer, text)
        length = want[0].shape[1]
        assert tokens.mask[row].tolist() == [True] * length + [False] * (tokens.mask.shape[1] - length)
        assert not tokens[1][row, length:].any()  # zeros after the real tokens
        for layer in (0, 1):
            torch.testing.assert_close(tokens[layer][row, :length], want[layer + 1][0], **TOLERANCE)
        if arch == "bert":
            torch.testing.assert_close(tokens[2][row, :length], want[3][0], **TOLERANCE)
        else:
            with torch.no_grad():
                torch.testing.assert_close(final_norm(model)(tokens[2][row, :length]), want[3][0], **TOLERANCE)
        torch.testing.assert_close(last[0][row], want[1][0, -1], **TOLERANCE)
        torch.testing.assert_close(last[-1][row], tokens[2][row, length - 1])
        torch.testing.assert_close(mean[1][row], want[2][0].mean(0), **TOLERANCE)


def test_collector_on_a_vision_language_models_batches():
    """A processor's left-padded batch with images: the language model's blocks, every real
    token equal to output_hidden_states, and each row equal to that prompt alone."""
    processor = tiny_llava_processor()
    model = tiny_llava(processor)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(3)]
    prompts = [f"{IMAGE_TOKEN}\nDescribe it.", f"A photo: {IMAGE_TOKEN} What is in it? Tell me", f"{IMAGE_TOKEN} Hi"]
    batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    assert transformer_blocks(model)[0] is model.model.language_model.layers[0]  # get_decoder() breaks on 4.53
    states = collect_hidden_states_from_batches(model, batch, layers=[0], pool=None, progress=False)
    last = collect_hidden_states_from_batches(model, [batch], layers=[0], pool="last", progress=False)
    with torch.no_grad():
        want = model(**batch, output_hidden_states=True).hidden_states[1]
    real = batch["attention_mask"].bool()
    for row in range(3):
        count = int(real[row].sum())
        torch.testing.assert_close(states[0][row, :count], want[row][real[row]], **TOLERANCE)
        single = processor(images=images[row:row + 1], text=prompts[row:row + 1], return_tensors="pt")
        torch.testing.assert_close(
            collect_hidden_states_from_batches(model, single, layers=[0], progress=False)[0][0], last[0][row],
            **TOLERANCE)


def test_collector_leaves_multimodal_rotary_positions_to_the_model():
    """Qwen2-VL computes its 3D (temporal, height, width) positions of image tokens only when it
    gets no position_ids: the collector must not hand it 2D ones counted over real tokens."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen2VLForConditionalGeneration"):
        pytest.skip("this transformers has no Qwen2-VL")
    image, start, end = 500, 501, 502
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters=rope, rope_scaling=dict(rope, type="mrope"))  # (5.x, 4.5x)
    vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=image, vision_start_token_id=start,
        vision_end_token_id=end)).eval()
    with torch.no_grad():  # sharp attention: positions show
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    ids = torch.tensor([[5, 6, start] + [image] * 4 + [end, 7, 8, 9]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == image).int(),
             "pixel_values": torch.randn(16, 3 * 2 * 14 * 14), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    states = collect_hidden_states_from_batches(model, batch, layers=[0], pool=None, progress=False)
    with torch.no_grad():
        want = model(**batch, output_hidden_states=True).hidden_states[1]
        flat = model(**batch, position_ids=torch.arange(11)[None], output_hidden_states=True).hidden_states[1]
    assert (flat - want).abs().max() > 1e-2  # (2D positions would show)
    torch.testing.assert_close(states[0], want, **TOLERANCE)


@pytest.mark.parametrize("side", ["left", "right"])
def test_collector_numbers_positions_as_roberta_does(tokenizer, side):
    """RoBERTa's learned positions start at padding_idx + 1 (the rows below are padding's): the
    collector's position_ids must count from there, else every state is another text's (the
    last token off by ~2 with 0-based ids). Its limit is the table's rows less those."""
    transformers = pytest.importorskip("transformers")
    from fastprobe.methods._batching import learned_positions

    torch.manual_seed(0)
    model = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
        pad_token_id=tokenizer.pad_token_id, max_position_embeddings=40)).eval()
    assert learned_positions(model) == 40 - (tokenizer.pad_token_id + 1)
    tokenizer.padding_side = side
    try:
        last = collect_hidden_states(model, tokenizer, TEXTS, layers=[1], pool="last", batch_size=2, progress=False)
        batch = dict(tokenizer(TEXTS[:3], return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = "right"
    for row, text in enumerate(TEXTS):
        torch.testing.assert_close(last[1][row], alone(model, tokenizer, text)[2][0, -1], **TOLERANCE)
    from_batches = collect_hidden_states_from_batches(model, batch, layers=[1], pool="mean", progress=False)
    for row, text in enumerate(TEXTS[:3]):
        torch.testing.assert_close(from_batches[1][row], alone(model, tokenizer, text)[2][0].mean(0), **TOLERANCE)


def test_mean_pool_ignores_non_finite_padding_states(tokenizer):
    """The mean over real tokens selects them: padding's states were multiplied by 0, so one that
    was not finite (NaN here, planted by a hook) made the mean NaN."""
    model = model_of("llama", tokenizer)
    batch = dict(tokenizer(TEXTS[:3], return_tensors="pt", padding=True))
    padding = batch["attention_mask"] == 0
    assert padding.any()

    def poison(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.masked_fill(padding.unsqueeze(-1), float("nan"))
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    clean = collect_hidden_states_from_batches(model, batch, layers=[1], pool="mean", progress=False)
    handle = transformer_blocks(model)[1].register_forward_hook(poison)
    try:
        poisoned = collect_hidden_states_from_batches(model, batch, layers=[1], pool="mean", progress=False)
    finally:
        handle.remove()
    torch.testing.assert_close(poisoned[1], clean[1], rtol=0, atol=0)


def test_collector_stops_after_the_deepest_layer(tokenizer):
    """Blocks after the deepest chosen one and the LM head never run; the forward asks for no
    hidden-state tuple, no attention weights and no cache; no hook is left behind."""
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=4)
    blocks = transformer_blocks(model)
    calls, seen = {2: 0, 3: 0, "head": 0}, []

    def counter(key):
        def count(*_):
            calls[key] += 1
        return count

    handles = [blocks[2].register_forward_hook(counter(2)), blocks[3].register_forward_hook(counter(3)),
               model.lm_head.register_forward_hook(counter("head")),
               model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)]
    before = hooks_on(model)
    try:
        states = collect_hidden_states(model, tokenizer, TEXTS, layers=[1, 0], batch_size=2, progress=False)
        assert calls == {2: 0, 3: 0, "head": 0} and states.layers == [1, 0]
        collect_hidden_states(model, tokenizer, TEXTS[:2], layers=[-1], progress=False)
        assert calls == {2: 1, 3: 1, "head": 0}
        assert hooks_on(model) == before
    finally:
        for handle in handles:
            handle.remove()
    assert all(kwargs["use_cache"] is False and not kwargs.get("output_hidden_states")
               and not kwargs.get("output_attentions") for kwargs in seen)


def test_collector_outputs_and_layer_names(tokenizer):
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=3, dtype=torch.bfloat16)
    states = collect_hidden_states(model, tokenizer, TEXTS[:3], layers=[2, -1, 0], dtype=None, on_device=True,
                                   progress=False)
    assert states.layers == [2, 0] and len(states) == 3 and states.num_layers == 3
    assert states[-1] is states[2] and states[2].dtype == torch.bfloat16 and states[2].shape == (3, 64)
    with pytest.raises(KeyError, match="not collected"):
        states[1]
    once = collect_hidden_states(model, tokenizer, TEXTS[:3], layers=(layer for layer in (2, 0)), dtype=None,
                                 on_device=True, progress=False)  # a generator of layers, read once
    assert once.layers == [2, 0] and torch.equal(once[2], states[2])


def test_caller_batches_are_left_alone(tokenizer):
    model = model_of("llama", tokenizer)
    tokenizer.padding_side = "left"
    batch = dict(tokenizer(TEXTS[:3], padding=True, return_tensors="pt"))
    tokenizer.padding_side = "right"
    copy = {name: value.clone() for name, value in batch.items()}
    left = collect_hidden_states_from_batches(model, batch, layers=[1], progress=False)
    assert sorted(batch) == sorted(copy) and all(torch.equal(batch[n], copy[n]) for n in copy)
    right = collect_hidden_states(model, tokenizer, TEXTS[:3], layers=[1], progress=False)
    torch.testing.assert_close(left[1], right[1], **TOLERANCE)  # position ids made for the left padding


@pytest.mark.parametrize("call, match", [
    (dict(layers=[3]), "layers: layer 3 is out of range"),
    (dict(layers=[-4]), "out of range"),
    (dict(layers=[]), "layers is empty"),
    (dict(layers=[True]), "layers must hold ints"),
    (dict(layers=1.5), r"layers must be an int or a list of ints, got 1.5"),
    (dict(layers=[0], pool="max"), "pool must be"),
    (dict(layers=[0], dtype=torch.int64), "dtype"),
    (dict(layers=[0], texts=[]), "texts is empty"),
    (dict(layers=[0], batch_size=0), "batch_size"),
])
def test_collector_bad_input_raises_before_the_model_runs(tokenizer, call, match):
    model = model_of("llama", tokenizer)
    ran = []
    handle = model.register_forward_pre_hook(lambda *_: ran.append(1))
    call = dict(call)
    texts = call.pop("texts", TEXTS)
    try:
        with pytest.raises(ValueError, match=match):
            collect_hidden_states(model, tokenizer, texts, progress=False, **call)
    finally:
        handle.remove()
    assert not ran


@pytest.mark.parametrize("batches, match", [
    ([], "batches is empty"),
    (["text"], r"batches\[0\] must be a dict"),
    ({"attention_mask": torch.ones(1, 3)}, "needs input_ids"),
    ({"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}, "attention_mask must"),
    ([{"input_ids": torch.ones(2, 3, dtype=torch.long)}, {"input_ids": torch.ones(0, 3, dtype=torch.long)}],
     r"batches\[1\] holds no rows \(batch size 0\)"),
])
def test_batches_bad_input(tokenizer, batches, match):
    """Refused before the model runs (a batch of 0 rows failed inside its attention)."""
    model = model_of("llama", tokenizer)
    ran = []
    handle = model.register_forward_pre_hook(lambda *_: ran.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            collect_hidden_states_from_batches(model, batches, layers=[0], progress=False)
    finally:
        handle.remove()
    assert not ran


def test_a_tokenizer_with_tokens_the_model_lacks_is_named_before_the_model_runs(tokenizer):
    """A token id past the model's input-embedding rows (a tokenizer with tokens the model lacks),
    or a pad token id there: a ValueError naming the text or the pad token and the table before
    any forward, where torch's embedding raised an IndexError (on CUDA, a device assert)."""
    model = tiny_model("llama", vocab_size=400, num_layers=2)
    texts = ["Stars looked at the bridge", "She carry a desk", DEMO_TEXTS[0]]
    assert [max(tokenizer(text)["input_ids"]) >= 400 for text in texts] == [False, False, True]
    with pytest.raises(ValueError, match=r"hidden states: text 2 \('The river.*past the 400 rows of "
                                         r"LlamaForCausalLM's input embedding table"):
        probes.collect_hidden_states(model, tokenizer, texts, layers=[0], batch_size=2, progress=False)
    padded = tiny_tokenizer()
    padded.add_special_tokens({"pad_token": "<extra_pad>"})  # id 512: past the table
    with pytest.raises(ValueError, match="the pad token has token id 512, past the 400 rows"):
        probes.collect_hidden_states(model, padded, texts[:2], layers=[0], progress=False)
    assert len(probes.collect_hidden_states(model, tokenizer, texts[:2], layers=[0], progress=False)) == 2


def test_batches_reach_a_model_offloaded_by_accelerate_where_it_computes(tokenizer):
    """collect_hidden_states_from_batches on a model whose weights accelerate offloads (meta
    placeholders, loaded by its hooks at each forward on the CPU): the states of the model in
    memory. The batches were sent to the meta device (their mask's positions then failed)."""
    import accelerate
    import copy

    model = model_of("llama", tokenizer)
    batches = [dict(tokenizer(DEMO_TEXTS[:3], padding=True, return_tensors="pt"))]
    offloaded = accelerate.cpu_offload(copy.deepcopy(model), execution_device="cpu")
    assert next(offloaded.parameters()).is_meta
    got = probes.collect_hidden_states_from_batches(offloaded, batches, layers=[0, 2], progress=False)
    want = probes.collect_hidden_states_from_batches(model, batches, layers=[0, 2], progress=False)
    for layer in (0, 2):
        torch.testing.assert_close(got[layer], want[layer])


def test_transformer_blocks_of_a_model_without_them():
    with pytest.raises(NotImplementedError, match="transformer blocks"):
        transformer_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_an_encoder_decoder_model_is_refused_and_its_encoder_collected():
    """BART's decoder layers matched model.decoder.layers (OPT's path), pooled with the encoder's
    attention mask: refused; its encoder, passed alone, is an encoder-only model."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)).eval()
    ids = torch.randint(3, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with pytest.raises(NotImplementedError, match="BartForConditionalGeneration is an encoder-decoder model"):
        collect_hidden_states_from_batches(model, {"input_ids": ids, "attention_mask": mask}, layers=[0])
    encoder = model.get_encoder()
    states = collect_hidden_states_from_batches(encoder, {"input_ids": ids, "attention_mask": mask}, layers=[1],
                                                pool=None, progress=False)
    with torch.no_grad():
        want = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(states[1][mask.bool()], want[mask.bool()], **TOLERANCE)


def test_a_probe_reads_the_last_token_from_collected_states(tokenizer):
    """End to end: random token sequences labelled by which set their last token is from; the
    layer-0 last-token states of a tiny Llama carry it, so a linear probe reads it."""
    model = model_of("llama", tokenizer)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (240, 7), generator=generator)
    labels = torch.randint(0, 2, (240,), generator=generator)
    ids[:, -1] = torch.where(labels == 1, 10 + ids[:, -1] % 8, 30 + ids[:, -1] % 8)
    lengths = torch.randint(3, 8, (240,), generator=generator)  # right padding: the last real token moves
    mask = torch.arange(7) < lengths[:, None]
    ids[torch.arange(240), lengths - 1] = ids[:, -1].clone()
    batches = [dict(input_ids=ids[i:i + 60], attention_mask=mask[i:i + 60].long()) for i in range(0, 240, 60)]
    states = collect_hidden_states_from_batches(model, batches, layers=[0], progress=False)
    fit = train_probe(states[0], labels, epochs=150)
    assert fit.metrics["val_accuracy"] > 0.9


# ---------------------------------------------------------------- the probes


def planted(rows, width=24, classes=2, seed=0, offset=0.0, scale=1.0):
    """Features with labels from random directions: argmax of x W (classes > 2), sign of x w."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, width, generator=generator)
    directions = torch.randn(width, max(classes, 2) if classes > 2 else 1, generator=torch.Generator().manual_seed(99))
    scores = features @ directions
    labels = scores.argmax(-1) if classes > 2 else (scores[:, 0] > 0).long()
    return features * scale + offset, labels


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probe_learns_a_planted_signal_and_not_shuffled_labels(kind):
    features, labels = planted(600)
    fit = train_probe(features, labels, kind=kind, epochs=150)
    assert fit.metrics["val_accuracy"] > 0.9 and fit.metrics["train_accuracy"] > 0.9
    fresh, fresh_labels = planted(400, seed=1)
    assert (predict(fit.probe, fresh) == fresh_labels).float().mean() > 0.9
    shuffled = labels[torch.randperm(600, generator=torch.Generator().manual_seed(3))]
    chance = train_probe(features, shuffled, kind=kind, epochs=150)
    assert 0.3 < chance.metrics["val_accuracy"] < 0.65
    assert isinstance(fit.probe, LinearProbe if kind == "linear" else MLPProbe) and not fit.probe.training
    assert len(fit.history) == 150 and fit.history[-1] < fit.history[0]


def test_multiclass_regression_and_mini_batches():
    features, labels = planted(600, classes=3)
    fit = train_probe(features, labels, epochs=200, batch_size=64)
    assert fit.probe.num_outputs == 3 and fit.metrics["val_accuracy"] > 0.85
    assert predict(fit.probe, features[:5]).dtype == torch.long
    direction = torch.randn(24)
    values = (features * 50 + 7) @ direction + 1000 + 0.01 * torch.randn(600)  # large target scale and offset
    fit = train_probe(features * 50 + 7, values, epochs=200)
    assert fit.probe.task == "regression" and fit.metrics["val_r2"] > 0.99 and "val_accuracy" not in fit.metrics
    # the fit is judged against the target's spread (std ~ 250 here), not its offset: over 40 seeds the
    # worst row missed by 0.5% of the std; a probe that lost the target's scale or offset misses by a std or more
    error = (predict(fit.probe, features * 50 + 7) - values).abs().max()
    assert float(error) < 0.02 * float(values.std()), (float(error), float(values.std()))
    two = train_probe(features, torch.stack([values, -values], 1), kind="mlp", epochs=50)
    assert predict(two.probe, features[:3]).shape == (3, 2)


def signal_in_one_token(rows, length=8, width=16, seed=0):
    """Token features where one real token per row (a random position, marked by +4 on dim 0)
    carries the label as +-2 on dim 1; padding tokens carry the marker with a random sign, so a
    probe that reads padding is misled."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, length, width, generator=generator)
    lengths = torch.randint(3, length + 1, (rows,), generator=generator)
    mask = torch.arange(length) < lengths[:, None]
    labels = torch.randint(0, 2, (rows,), generator=generator)
    position = (torch.rand(rows, generator=generator) * lengths).long()
    features[torch.arange(rows), position, 0] = 4.0
    features[torch.arange(rows), position, 1] = 2.0 * (2 * labels - 1)
    decoy = 2.0 * (2 * torch.randint(0, 2, (rows, length), generator=generator) - 1).float()
    features[..., 0] = torch.where(mask, features[..., 0], torch.full_like(decoy, 4.0))
    features[..., 1] = torch.where(mask, features[..., 1], decoy)
    return features, mask, labels, position


def test_attentive_probe_finds_the_one_token_that_carries_the_signal():
    features, mask, labels, position = signal_in_one_token(600)
    fit = train_probe(features, labels, kind="attentive", mask=mask, epochs=200)
    assert isinstance(fit.probe, AttentiveProbe) and fit.metrics["val_accuracy"] > 0.95
    fresh, fresh_mask, fresh_labels, fresh_position = signal_in_one_token(300, seed=1)
    assert (predict(fit.probe, fresh, fresh_mask) == fresh_labels).float().mean() > 0.95
    with torch.no_grad():
        weights = fit.probe.attention_weights(fresh, fresh_mask)  # [N, Q, T]
    assert float(weights.masked_select(~fresh_mask[:, None, :].expand_as(weights)).abs().max()) == 0.0
    on_signal = weights[torch.arange(300), :, fresh_position].max(-1).values
    assert float(on_signal.mean()) > 0.5  # some query looks at the marked token
    pooled = (features * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert train_probe(pooled, labels, epochs=200).metrics["val_accuracy"] < fit.metrics["val_accuracy"] - 0.05


def test_attentive_probe_standardises_its_token_features_once():
    # forward is the formula written out (standardised features read by both products, bit for bit),
    # and autograd keeps one [N, T, H] copy of them for the backward, not one per product
    features, mask, labels, _ = signal_in_one_token(64)
    probe = AttentiveProbe(16, 2, num_queries=3)
    probe.feature_mean.normal_()
    probe.feature_scale.uniform_(0.5, 2.0)
    standardized = (features - probe.feature_mean) / probe.feature_scale
    weights = probe.attention_weights(features, mask)
    expected = probe.head(torch.einsum("nqt,nth->nqh", weights, standardized).flatten(1))
    assert torch.equal(probe(features, mask), expected)
    kept = []

    def pack(tensor):
        kept.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        probe(features, mask)
    # (einsum saves views of them reshaped for its matrix products: counted by storage)
    token_sized = {tensor.untyped_storage().data_ptr() for tensor in kept if tensor.numel() == features.numel()}
    assert len(token_sized) == 1


def test_attentive_probe_ignores_what_padding_holds():
    features, mask, labels, _ = signal_in_one_token(200)
    probe = AttentiveProbe(16, 2, num_queries=3)
    garbage = torch.where(mask[..., None], features, 1e3 * torch.randn_like(features))
    torch.testing.assert_close(probe(garbage, mask), probe(features, mask), rtol=0, atol=1e-6)
    assert not torch.allclose(probe(garbage), probe(features))


def test_history_weights_each_step_by_its_rows():
    """An epoch's loss is the mean over its rows: a short last mini-batch (10 rows in 4 + 4 + 2)
    counts by its 2 rows. With lr = 0 the probe never changes, so it is the training loss."""
    features, labels = planted(10)
    fit = train_probe(features, labels, epochs=1, batch_size=4, lr=0.0, validation_fraction=0.0)
    assert fit.history[0] == pytest.approx(fit.metrics["train_loss"], rel=1e-5)


def test_training_is_deterministic_and_leaves_inputs_alone():
    features, labels = planted(300)
    kept = features.clone(), labels.clone()
    rng = torch.get_rng_state()
    first = train_probe(features, labels, kind="mlp", epochs=30, batch_size=50, seed=5)
    second = train_probe(features, labels, kind="mlp", epochs=30, batch_size=50, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert first.metrics == second.metrics and first.history == second.history
    assert all(torch.equal(a, b) for a, b in zip(first.probe.state_dict().values(), second.probe.state_dict().values()))
    other = train_probe(features, labels, kind="mlp", epochs=30, batch_size=50, seed=6)
    assert other.history != first.history
    assert torch.equal(features, kept[0]) and torch.equal(labels, kept[1])
    tokens, mask, token_labels, _ = signal_in_one_token(50)
    kept = tokens.clone(), mask.clone()
    train_probe(tokens, token_labels, kind="attentive", mask=mask, epochs=3)
    assert torch.equal(tokens, kept[0]) and torch.equal(mask, kept[1])



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_probes_train_and_predict_in_float32_under_autocast(dtype):
    """train_probe, predict and evaluate_probe inside torch.autocast give what they give outside
    it: autocast caches each weight's low-precision cast for its whole region, so a training loop
    run under it kept running the initial weights (chance accuracy); predictions come back in
    float32, unrounded."""
    features, labels = planted(300)
    values = features @ torch.linspace(-1, 1, 24) + 3.0
    tokens, mask, token_labels, _ = signal_in_one_token(60)
    calls = [lambda: train_probe(features, labels, kind="linear", epochs=40),
             lambda: train_probe(features, values, kind="mlp", epochs=40, batch_size=64),
             lambda: train_probe(tokens, token_labels, kind="attentive", mask=mask, epochs=20)]
    for call in calls:
        want = call()
        with torch.autocast("cpu", dtype=dtype):
            got = call()
            predicted = predict(got.probe, features if got.probe.rank == 2 else tokens,
                                None if got.probe.rank == 2 else mask)
            metrics = evaluate_probe(got.probe, features, values) if got.probe.task == "regression" else None
        assert got.metrics == want.metrics and got.history == want.history
        assert all(torch.equal(a, b) for a, b in zip(got.probe.state_dict().values(), want.probe.state_dict().values()))
        if got.probe.task == "regression":
            assert predicted.dtype == torch.float32
            assert torch.equal(predicted, predict(want.probe, features))
            assert metrics == evaluate_probe(want.probe, features, values)
    assert want.metrics["train_accuracy"] > 0.7  # (the last fit learned something to compare)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_probes_train_under_no_grad_and_inference_mode(mode):
    """train_probe inside torch.no_grad or torch.inference_mode (a script that collects the
    features and fits the probe in one such block) fits as outside it: it failed with autograd's
    "element 0 of tensors does not require grad", naming nothing of the probe."""
    features, labels = planted(200)
    tokens, mask, token_labels, _ = signal_in_one_token(40)
    calls = [lambda: train_probe(features, labels, kind="linear", epochs=20),
             lambda: train_probe(features, labels, kind="mlp", epochs=10, standardize=False, batch_size=64),
             lambda: train_probe(tokens, token_labels, kind="attentive", mask=mask, epochs=10)]
    for call in calls:
        want = call()
        with mode():
            got = call()
        assert got.metrics == want.metrics and got.history == want.history
        assert all(torch.equal(a, b) for a, b in zip(got.probe.state_dict().values(), want.probe.state_dict().values()))
    assert want.metrics["train_accuracy"] > 0.7

def test_standardisation_lives_in_the_probe():
    features, labels = planted(400, offset=500.0, scale=100.0)
    fit = train_probe(features, labels, epochs=150, validation_fraction=0.0)
    assert "val_accuracy" not in fit.metrics and fit.metrics["train_accuracy"] > 0.9
    torch.testing.assert_close(fit.probe.feature_mean, features.mean(0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(fit.probe.feature_scale, features.std(0, unbiased=False), rtol=1e-4, atol=1e-3)
    rows = features[:5]
    with torch.no_grad():  # the probe applies what training saw: W (x - mean) / std + b
        manual = fit.probe.linear((rows - features.mean(0)) / features.std(0, unbiased=False))
        torch.testing.assert_close(fit.probe(rows), manual, rtol=1e-4, atol=1e-4)
    restored = LinearProbe(24, 2)
    restored.load_state_dict(fit.probe.state_dict())
    assert torch.equal(predict(restored, features), predict(fit.probe, features))
    plain = train_probe(features, labels, epochs=5, standardize=False)
    assert torch.equal(plain.probe.feature_mean, torch.zeros(24)) and torch.equal(plain.probe.feature_scale,
                                                                                   torch.ones(24))


def test_validation_data_and_evaluate():
    features, labels = planted(300)
    held_out, held_labels = planted(100, seed=2)
    fit = train_probe(features, labels.tolist(), epochs=100, validation_data=(held_out.numpy(), held_labels))
    assert fit.metrics["val_accuracy"] == evaluate_probe(fit.probe, held_out, held_labels)["accuracy"] > 0.9
    assert set(fit.metrics) == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}


@pytest.mark.parametrize("call, match", [
    (dict(labels=torch.zeros(5, dtype=torch.long)), "labels has 5 rows but the features have 40"),
    (dict(kind="tree"), "kind must be one of"),
    (dict(kind="attentive"), r"features must be \[N, T, H\]"),
    (dict(features=torch.randn(40, 3, 8)), r"features must be \[N, H\]"),
    (dict(mask=torch.ones(40, 8, dtype=torch.bool)), "mask is for the attentive probe"),
    (dict(features=torch.randn(0, 8), labels=torch.zeros(0, dtype=torch.long)), "features is empty"),
    (dict(features=torch.full((40, 8), float("nan"))), "NaN"),
    (dict(labels=torch.zeros(40, dtype=torch.long)), "single class"),
    # (all ones: the check read only the highest class id, and a probe that never saw a 0 was trained)
    (dict(labels=torch.ones(40, dtype=torch.long)), r"single class \(1\)"),
    (dict(labels=torch.full((40,), 3)), r"single class \(3\)"),
    (dict(labels=torch.ones(40, dtype=torch.bool)), r"single class \(1\)"),
    (dict(labels=-torch.ones(40, dtype=torch.long)), "class ids >= 0"),
    (dict(labels=torch.rand(40), task="classification"), "labels must be class ids"),
    (dict(task="ranking"), "task must be one of"),
    (dict(labels=["yes", "no"] * 20), "labels must be a tensor or an array"),
    (dict(validation_fraction=1.0), "validation_fraction"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(kind="mlp", dropout=1.0), "dropout"),
    (dict(validation_data=(torch.randn(5, 7), torch.zeros(5, dtype=torch.long))), "validation_data features"),
    (dict(labels=torch.randn(40, 2), validation_data=(torch.randn(5, 8), torch.randn(5))),
     r"validation_data labels must have 2 target\(s\) per row"),  # (checked before training)
    (dict(features=torch.ones(40, 8, dtype=torch.long)), "features must be floating point, got torch.int64"),
    (dict(labels=torch.randn(40, 2, 2)), r"labels must be \[N\] or \[N, D\] for regression, got \(40, 2, 2\)"),
    (dict(validation_fraction=0.99), "validation_fraction=0.99 leaves no training rows out of 40"),
    (dict(validation_data=(torch.randn(5, 8),)), r"validation_data must be \(features, labels\)"),
    (dict(validation_data=(torch.randn(5, 8), torch.zeros(5, dtype=torch.long), torch.ones(5, 8, dtype=torch.bool))),
     "validation_data has a mask, but the linear probe takes pooled features"),
])
def test_train_probe_bad_input(call, match):
    arguments = dict(features=torch.randn(40, 8), labels=torch.arange(40) % 2, epochs=2)
    arguments.update(call)
    features, labels = arguments.pop("features"), arguments.pop("labels")
    kept = features.clone()
    with pytest.raises(ValueError, match=match):
        train_probe(features, labels, **arguments)
    assert torch.equal(features.nan_to_num(7.0), kept.nan_to_num(7.0)) and torch.equal(features.isnan(), kept.isnan())


def test_filtered_pandas_rows_are_read_by_position():
    """A pandas Series or DataFrame whose index no longer starts at 0 (rows filtered out) is read
    row by row as the same numbers in an array are (it was refused: "labels must be a tensor or
    an array of numbers, got Series"); no warning for pandas' read-only arrays."""
    pandas = pytest.importorskip("pandas")
    features, labels = torch.randn(50, 8), torch.arange(50) % 2
    table, series = pandas.DataFrame(features.numpy()), pandas.Series(labels.numpy())
    kept = series.index >= 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_pandas = train_probe(table[kept], series[kept], epochs=3)
    from_tensors = train_probe(features[10:], labels[10:], epochs=3)
    assert from_pandas.metrics == from_tensors.metrics


@pytest.mark.parametrize("standardize", ["no", 0, None])
def test_standardize_is_a_bool(standardize):
    """(standardize="no" is truthy: the probe was standardised)"""
    with pytest.raises(TypeError, match=f"standardize must be True or False, got {standardize!r}"):
        train_probe(torch.randn(40, 8), torch.arange(40) % 2, epochs=2, standardize=standardize)


def test_evaluate_probe_checks_the_regression_width():
    fit = train_probe(torch.randn(30, 6), torch.randn(30, 2), epochs=2)
    with pytest.raises(ValueError, match=r"labels must have 2 target\(s\) per row, got shape \(30,\)"):
        evaluate_probe(fit.probe, torch.randn(30, 6), torch.randn(30))


def test_evaluate_probe_refuses_a_class_the_probe_lacks():
    """Labels of a 2-class probe hold 0 and 1: class 2 (its first missing one) is named."""
    fit = train_probe(torch.randn(30, 6), torch.arange(30) % 2, epochs=2)
    with pytest.raises(ValueError, match="labels hold class 2 but the probe has 2 classes"):
        evaluate_probe(fit.probe, torch.randn(3, 6), torch.tensor([0, 1, 2]))


def test_predict_and_evaluate_take_train_probes_result_as_it_is():
    """predict / evaluate_probe accept the ProbeFit that train_probe returns, with the same
    results as its .probe."""
    features, labels = torch.randn(40, 6), torch.arange(40) % 3
    fit = train_probe(features, labels, epochs=3)
    assert torch.equal(predict(fit, features), predict(fit.probe, features))
    assert evaluate_probe(fit, features, labels) == evaluate_probe(fit.probe, features, labels)



def test_accuracy_is_computed_in_float64():
    """evaluate_probe's accuracy is the fraction of right rows in float64, as its docstring says:
    it was a float32 mean (13 of 20 right read 0.6499999761581421)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(20, 4, generator=generator)
    labels = (features[:, 0] > 0).long()
    fit = train_probe(features, labels, epochs=200, validation_fraction=0)
    assert torch.equal(predict(fit, features), labels)  # (a planted, separable signal)
    wrong = labels.clone()
    wrong[:7] = 1 - wrong[:7]
    assert evaluate_probe(fit, features, wrong)["accuracy"] == 13 / 20


def test_predict_puts_back_each_modules_own_training_flag():
    """A probe in train mode with one module switched off: probe.train(True) afterwards switched
    that one back on too."""
    fit = train_probe(torch.randn(40, 6), torch.arange(40) % 3, kind="mlp", epochs=1)
    probe = fit.probe.train()
    child = next(iter(probe.children()))
    child.eval()
    flags = [module.training for module in probe.modules()]
    predict(probe, torch.randn(5, 6))
    evaluate_probe(probe, torch.randn(5, 6), torch.arange(5) % 3)
    assert [module.training for module in probe.modules()] == flags


def test_attentive_mask_and_predict_bad_input():
    tokens = torch.randn(6, 4, 8)
    with pytest.raises(ValueError, match=r"mask must have shape \(6, 4\)"):
        train_probe(tokens, torch.arange(6) % 2, kind="attentive", mask=torch.ones(6, 5, dtype=torch.bool))
    empty_row = torch.ones(6, 4, dtype=torch.bool)
    empty_row[2] = False
    with pytest.raises(ValueError, match="at least one real token"):
        train_probe(tokens, torch.arange(6) % 2, kind="attentive", mask=empty_row)
    with pytest.raises(ValueError, match="validation_data has no mask, but the training features have one"):
        train_probe(tokens, torch.arange(6) % 2, kind="attentive", mask=torch.ones(6, 4, dtype=torch.bool),
                    validation_data=(tokens, torch.arange(6) % 2))  # (its probe would attend to their padding)
    probe = LinearProbe(8, 2)
    with pytest.raises(ValueError, match="the probe takes 8"):
        predict(probe, torch.randn(3, 9))
    with pytest.raises(ValueError, match="mask is for the attentive probe; LinearProbe takes pooled features"):
        predict(probe, torch.randn(3, 8), torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask is for the attentive probe .*MLPProbe takes pooled features"):
        MLPProbe(8, 2)(torch.randn(3, 8), torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="task must be 'classification' or 'regression', got 'ranking'"):
        LinearProbe(8, 2, task="ranking")
    with pytest.raises(TypeError, match="probe must be"):
        predict(torch.nn.Linear(8, 2), torch.randn(3, 8))
    with pytest.raises(TypeError, match="probe must be"):
        evaluate_probe(torch.nn.Linear(8, 2), torch.randn(3, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="in_features"):
        MLPProbe(0, 2)
    assert probes.POOLS == ("last", "mean", None)


def test_batches_without_an_attention_mask_are_all_real_tokens(tokenizer):
    """A batch of input_ids alone: every token is read (mean and last pool as with an all-ones mask)."""
    model = model_of("llama", tokenizer)
    ids = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)["input_ids"]
    for pool in ("mean", "last"):
        bare = collect_hidden_states_from_batches(model, {"input_ids": ids}, layers=[1], pool=pool, progress=False)
        ones = collect_hidden_states_from_batches(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                                  layers=[1], pool=pool, progress=False)
        torch.testing.assert_close(bare[1], ones[1], rtol=0, atol=0)


def test_collector_refuses_inputs_without_tokens(tokenizer):
    """A row with no real token (an empty text from a tokenizer without BOS, an attention_mask
    row of zeros) has nothing to pool: a ValueError naming it, not a padding token's state
    ("last") or zeros ("mean"); no hook is left behind."""
    from tokenizers import processors

    model = model_of("llama", tokenizer)
    hooks = hooks_on(model)
    batch = dict(tokenizer(TEXTS[:3], padding=True, return_tensors="pt"))
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][1] = 0
    for pool in ("last", "mean", None):
        with pytest.raises(ValueError, match="input 1 has no tokens"):
            collect_hidden_states_from_batches(model, batch, layers=[0], pool=pool, progress=False)
    without_bos = tiny_tokenizer()  # its template no longer prepends <s> (transformers 4.x ignores add_bos_token=False)
    without_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    assert without_bos("")["input_ids"] == []
    with pytest.raises(ValueError, match=r"text 3 \(''\) has no tokens"):
        collect_hidden_states(model, without_bos, [*TEXTS[:3], ""], layers=[0], batch_size=2, progress=False)
    assert hooks_on(model) == hooks


def test_collector_gives_the_tokenizer_back_when_the_model_fails(tokenizer):
    """A tokenizer without a pad token borrows eos for the batches; when the forward raises, it is
    given back at once, even while the traceback is kept (as a notebook keeps the last one)."""
    import sys

    model = model_of("llama", tokenizer)

    def fail(*_):
        raise KeyError("the model failed")

    handle = transformer_blocks(model)[0].register_forward_hook(fail)
    tokenizer.pad_token = None
    try:
        with pytest.raises(KeyError):
            try:
                collect_hidden_states(model, tokenizer, TEXTS, layers=[1], batch_size=2, progress=False)
            except KeyError:
                kept = sys.exc_info()  # the traceback holds the collector's frames
                assert tokenizer.pad_token is None
                raise
        del kept
    finally:
        handle.remove()
        tokenizer.pad_token = "<pad>"


def test_training_on_features_that_require_grad():
    """States collected with autograd on (a leaf, or the output of a graph) train as plain
    values: no "backward through the graph a second time", no gradient written into the
    caller's tensors."""
    weights = torch.randn(8, 8, requires_grad=True)
    features = torch.randn(60, 8) @ weights  # not a leaf, requires grad
    labels = (features[:, 0] > 0).long()
    fit = train_probe(features, labels, epochs=3)
    assert weights.grad is None and predict(fit.probe, features).shape == (60,)
    leaf = torch.randn(60, 8, requires_grad=True)
    targets = torch.randn(60, requires_grad=True)
    fit = train_probe(leaf, targets, epochs=3, validation_data=(leaf[:10], targets[:10]))
    assert leaf.grad is None and targets.grad is None and fit.probe.task == "regression"
    tokens = torch.randn(12, 4, 8, requires_grad=True)
    train_probe(tokens, torch.arange(12) % 2, kind="attentive", epochs=2)
    assert tokens.grad is None


def test_probes_learn_at_any_feature_and_target_scale():
    """Standardisation makes the fit scale-free: tiny features (std 1e-13, once taken for
    constant columns), tiny (1e-15) and huge (1e20, whose squares overflow float32) regression
    targets, and outputs of very different units in one regression all fit as well as at scale 1.
    float64 features beyond float32's range are refused by name, not reported as infinite."""
    features, labels = planted(400, width=16)
    reference = train_probe(features, labels, epochs=100).metrics["val_accuracy"]
    assert reference > 0.9
    assert train_probe(features * 1e-13, labels, epochs=100).metrics["val_accuracy"] == pytest.approx(reference,
                                                                                                      abs=0.02)
    values = features @ torch.randn(16, generator=torch.Generator().manual_seed(1))
    for scale in (1e-15, 1.0, 1e20):
        metrics = train_probe(features, values * scale, epochs=100).metrics
        assert metrics["val_r2"] > 0.99, (scale, metrics)
    generator = torch.Generator().manual_seed(2)
    bent = [torch.tanh(features @ torch.randn(16, generator=generator)) for _ in range(2)]
    fit = train_probe(features, torch.stack([bent[0], 1e-4 * bent[1]], 1), kind="mlp", epochs=100,
                      validation_fraction=0.0)
    predicted = predict(fit.probe, features)
    r2 = [evaluate_probe_r2(predicted[:, column], target) for column, target in enumerate((bent[0], 1e-4 * bent[1]))]
    assert r2[1] > r2[0] - 0.05, r2  # the small output is not neglected (0.70 against 0.97 when it was)
    with pytest.raises(ValueError, match="beyond float32's range"):
        train_probe(features.double() * 1e200, labels, epochs=2)
    with pytest.raises(ValueError, match="labels holds values beyond float32's range"):
        train_probe(features, values.double() * 1e300, epochs=2)


def test_features_varying_little_around_a_large_mean_are_standardised():
    """A column's std far below its mean (1e-5 of it here) is still a signal, scaled to 1 like any
    other: only a std at rounding level relative to the mean counts as a constant column."""
    features, labels = planted(400, width=16)
    reference = train_probe(features, labels, epochs=100).metrics["val_accuracy"]
    offset = train_probe(features * 1e-2 + 1000.0, labels, epochs=100).metrics["val_accuracy"]
    assert offset == pytest.approx(reference, abs=0.02)


def test_evaluate_probe_metrics_are_their_formulas():
    """evaluate_probe's figures, from predict's outputs: regression loss = mean (y - f)^2 and
    r2 = 1 - sum (y - f)^2 / sum (y - mean y)^2 pooled over the outputs; classification loss =
    cross-entropy of the logits, accuracy = share of argmax hits."""
    features, labels = planted(120, width=8, classes=3)
    targets = torch.stack([features[:, 0] - 2 * features[:, 1], features[:, 2].tanh() * 1e-3], 1)
    fit = train_probe(features, targets, epochs=20)
    metrics = evaluate_probe(fit, features, targets)
    f, y = predict(fit, features).double(), targets.double()
    assert metrics["loss"] == pytest.approx(float((y - f).pow(2).mean()), rel=1e-9)
    assert metrics["r2"] == pytest.approx(float(1 - (y - f).pow(2).sum() / (y - y.mean(0)).pow(2).sum()), rel=1e-9)
    fit = train_probe(features, labels, epochs=20)
    metrics = evaluate_probe(fit, features, labels)
    with torch.no_grad():
        logits = fit.probe(features).double()
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).double().mean()))


def evaluate_probe_r2(predicted, target) -> float:
    """1 - sum (y - f)^2 / sum (y - mean y)^2 of one output, in float64."""
    predicted, target = predicted.double(), target.double()
    return float(1 - (target - predicted).pow(2).sum() / (target - target.mean()).pow(2).sum())


def test_training_touches_no_other_generator(monkeypatch):
    """Seeding is local: training on the CPU seeds the CPU generator for the call and gives its
    state back, and leaves the GPUs' generators alone (torch.manual_seed reseeded them all, so
    a model's sampling on the GPU restarted from the probe's seed after every train_probe)."""
    reseeded = []
    for name in ("manual_seed", "manual_seed_all"):
        monkeypatch.setattr(torch.cuda, name, lambda seed, name=name: reseeded.append(name))
    features, labels = planted(60)
    state = torch.get_rng_state()
    first = train_probe(features, labels, kind="mlp", epochs=2, seed=3)
    assert reseeded == [] and torch.equal(torch.get_rng_state(), state)
    torch.rand(5)  # another global state: the same probe
    second = train_probe(features, labels, kind="mlp", epochs=2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.probe.state_dict().values(), second.probe.state_dict().values()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_left_in_train_mode_gives_its_inference_states(tokenizer, arch):
    """Collecting runs the model in eval mode (dropout off: the states of a model loaded for
    inference), each module's training flag back afterwards, also when a forward raises."""
    model = with_dropout(tiny_model(arch, vocab_size=len(tokenizer), num_layers=3))

    def measure():
        return collect_hidden_states(model, tokenizer, TEXTS, layers=[0, 2], pool=None, batch_size=2,
                                     progress=False)

    def compare(got, wanted):
        for layer in (0, 2):
            torch.testing.assert_close(got[layer], wanted[layer], rtol=0, atol=0)

    check_eval_mode([model], measure, compare, raise_in=transformer_blocks(model)[1])


def test_a_class_held_out_whole_by_the_split_is_refused():
    """The single-class check reads the training rows: a class whose only rows the validation
    split took left a probe trained on one class, silently (it read every row's labels)."""
    features, labels = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    labels[probes._split(10, 0.2, 0)[1][0]] = 1  # the only 1 is a validation row
    with pytest.raises(ValueError, match=r"single class \(0\)"):
        train_probe(features, labels, epochs=2)
