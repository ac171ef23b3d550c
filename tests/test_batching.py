"""The method layer's shared batching (fastprobe/methods/_batching.py)."""
import pytest
import torch

from fastprobe.methods._batching import autocast_off, text_batches
from fastprobe.models import tiny_model, tiny_tokenizer


def test_text_batches_lend_the_tokenizer_nothing_across_a_yield():
    """A tokenizer without a pad token borrows eos, and prompts pad on the left, for the tokenizer
    call only: between batches (where a caller's loop may raise and keep the generator open) the
    tokenizer is as the caller left it."""
    tokenizer = tiny_tokenizer(padding_side="right")
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=1)
    tokenizer.pad_token = None
    texts = ["one", "two words here", "three"]
    batches = text_batches(model, tokenizer, texts, batch_size=2, max_length=16, progress=False, what="test",
                           prompts=True)
    first = next(batches)
    assert tokenizer.pad_token is None
    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("right", "right")
    # the batch itself was padded on the left with eos, and counts positions over real tokens
    assert first["attention_mask"][0].tolist() == [0] * (first["attention_mask"].shape[1] - int(
        first["attention_mask"][0].sum())) + [1] * int(first["attention_mask"][0].sum())
    assert first["input_ids"][0, 0].item() == tokenizer.eos_token_id
    assert torch.equal(first["position_ids"][1], torch.arange(first["input_ids"].shape[1]))
    assert [len(batch["input_ids"]) for batch in batches] == [1]


def test_generate_settings_fold_into_a_copy_of_a_passed_generation_config():
    """generate gets a passed generation_config alone, with the caller's and the method's fields
    folded into a copy (transformers deprecates a config beside its fields); what is not a
    field stays an argument; a pad id is added only where no config has one."""
    from transformers import GenerationConfig

    from fastprobe.methods._batching import generate_settings

    model = tiny_model("llama", vocab_size=64, num_layers=1)
    model.generation_config.pad_token_id = None
    config = GenerationConfig(max_new_tokens=3, pad_token_id=None)
    kept = config.to_dict()
    streamer = object()
    settings = generate_settings(model, 7, {"generation_config": config, "top_k": 5, "streamer": streamer},
                                 max_new_tokens=4, output_logits=True)
    assert set(settings) == {"generation_config", "streamer"} and settings["streamer"] is streamer
    folded = settings["generation_config"]
    assert folded is not config and config.to_dict() == kept
    assert (folded.max_new_tokens, folded.top_k, folded.output_logits, folded.pad_token_id) == (4, 5, True, 7)
    config.pad_token_id = 3  # the passed config's pad wins over the model's and the method's
    assert generate_settings(model, 7, {"generation_config": config})["generation_config"].pad_token_id == 3
    assert generate_settings(model, 7, {"do_sample": False}) == {"do_sample": False, "pad_token_id": 7}
    model.generation_config.pad_token_id = 0
    assert generate_settings(model, 7, {}, max_new_tokens=2) == {"max_new_tokens": 2}


def test_eval_mode_gives_a_model_its_mode_back_through_its_own_train():
    """A model whose train() does more than set flags (transformers' use_kernels models pick their
    hub kernels' training or inference forms there) gets train(True) back, not the flags alone
    (its kernels stayed in inference form)."""
    from fastprobe.methods._batching import eval_mode

    class Moded(torch.nn.Sequential):
        def train(self, mode: bool = True):
            self.mode = "training" if mode else "inference"
            return super().train(mode)

    model = Moded(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with eval_mode(model):
        assert model.mode == "inference"
    assert model.mode == "training" and all(module.training for module in model.modules())


def test_eval_mode_turns_dropout_off_and_gives_every_module_its_flag_back():
    """eval_mode(*models): every module of the models in eval mode inside the block, and each
    module's own training flag back afterwards (mixed flags too: model.train(flag) on the model
    would set them all alike), also when the block raises; a module shared by two models once."""
    import pytest

    from fastprobe.methods._batching import eval_mode

    from .dropout_helpers import training_flags, with_dropout

    model = with_dropout(tiny_model("gpt2", vocab_size=64, num_layers=2, resid_pdrop=0.5, embd_pdrop=0.5))
    other = torch.nn.Sequential(torch.nn.Dropout(0.5), model.transformer.h[0])  # shares a block with model
    other.train()
    before = training_flags(model), training_flags(other)
    assert len(set(before[0].values())) == 2  # (mixed)
    ids = torch.randint(0, 64, (2, 9))
    with eval_mode(model, other):
        assert not any(module.training for module in (*model.modules(), *other.modules()))
        inside = model(ids).logits
    assert (training_flags(model), training_flags(other)) == before
    with pytest.raises(ZeroDivisionError), eval_mode(model, other):
        1 / 0
    assert (training_flags(model), training_flags(other)) == before
    model.eval()
    torch.testing.assert_close(inside, model(ids).logits, rtol=0, atol=0)
    with eval_mode(model):  # all in eval mode already: left alone
        assert not any(module.training for module in model.modules())
    assert not any(module.training for module in model.modules())


def test_autocast_off_for_the_block_only():
    """Inside torch.autocast, autocast_off(device) turns it off for that device's type for the block
    (a float32 matrix product stays float32) and back on after it, also when the block raises;
    outside autocast it does nothing."""
    a, b = torch.randn(3, 4), torch.randn(4, 2)
    cpu = torch.device("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
        with autocast_off(cpu):
            assert not torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.float32
        try:
            with autocast_off(cpu):
                raise KeyError
        except KeyError:
            pass
        assert torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.bfloat16
    with autocast_off(cpu):
        assert not torch.is_autocast_enabled("cpu") and (a @ b).dtype == torch.float32


def test_reading_a_forwards_cache_logs_no_deprecation():
    """output_cache reads the cache a forward returned without touching transformers 5.x's
    past_key_values alias, whose read logs "`past_key_values`/`cache_params` are deprecated" (it
    did for an output without a cache: a forward with use_cache=False, e.g. two_pass_generate's
    with use_cache=False, and a model whose output has no cache field, RecurrentGemma's)."""
    from transformers.modeling_outputs import CausalLMOutput

    from fastprobe.methods._batching import output_cache

    from .transformers_helpers import transformers_warnings

    model = tiny_model("llama", vocab_size=64, num_layers=1)
    ids = torch.randint(3, 64, (1, 5))
    with transformers_warnings() as messages, torch.no_grad():
        assert output_cache(model(input_ids=ids, use_cache=False)) is None
        assert output_cache(model(input_ids=ids, use_cache=True)).get_seq_length() == 5
        assert output_cache(CausalLMOutput(logits=torch.zeros(1, 5, 64))) is None
        assert output_cache((torch.zeros(1),)) is None  # (a forward's tuple output, return_dict=False)
    assert not [message for message in messages if "deprecated" in message]


def test_prompts_without_their_appended_eos_are_padded_without_advice():
    """encode_prompts drops the eos a tokenizer appends ("<s> $A </s>", Llama's add_eos_token) before
    padding, so it pads with tokenizer.pad: transformers 4.5x logged its advice to a fast tokenizer to
    use __call__ instead ("... using the `__call__` method is faster ..."), which cannot strip it."""
    import logging

    from tokenizers import processors

    from fastprobe.methods._batching import appended_tokens, encode_prompts

    appending = tiny_tokenizer(padding_side="left")
    bos, eos = appending.bos_token, appending.eos_token
    appending.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, appending.bos_token_id), (eos, appending.eos_token_id)])
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        encoded = encode_prompts(appending, ["The river ran", "Stars"], appended_tokens(appending))
    finally:
        logger.removeHandler(handler)
    assert not [record.getMessage() for record in records]
    assert encoded["input_ids"][0, 0] == appending.bos_token_id and (encoded["input_ids"] != appending.eos_token_id).all()
    assert encoded["attention_mask"][1].tolist()[-2:] == [1, 1] and encoded["attention_mask"][1, 0] == 0


def test_progress_is_a_bool_before_the_model_runs():
    """progress="no" is truthy (it showed the bar): each method that batches texts refuses a
    progress that is not True or False, naming it, before its model runs."""
    import pytest

    from fastprobe.methods.availability import answer_availability, greedy_answers
    from fastprobe.methods.probes import collect_hidden_states, collect_hidden_states_from_batches, train_probe
    from fastprobe.methods.sinks import perplexity, score_heads
    from fastprobe.methods.uncertainty import token_uncertainty

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=1)
    ran = []
    model.register_forward_pre_hook(lambda *_: ran.append(1))
    batch = dict(tokenizer(["one text"], return_tensors="pt"))
    calls = [
        lambda progress: score_heads(model, tokenizer, ["a text"], progress=progress),
        lambda progress: perplexity(model, tokenizer, ["a text"], progress=progress),
        lambda progress: token_uncertainty(model, [model], tokenizer, ["a text"], progress=progress),
        lambda progress: greedy_answers(model, tokenizer, ["a prompt"], progress=progress),
        lambda progress: answer_availability(model, tokenizer, ["a prompt"], ["an answer"], progress=progress),
        lambda progress: collect_hidden_states(model, tokenizer, ["a text"], layers=[0], progress=progress),
        lambda progress: collect_hidden_states_from_batches(model, [batch], layers=[0], progress=progress),
        lambda progress: train_probe(torch.randn(8, 4), torch.arange(8) % 2, epochs=1, progress=progress),
    ]
    for call in calls:
        for progress in ("no", 0, None):
            with pytest.raises(TypeError, match=f"^progress must be True or False, got {progress!r}"):
                call(progress)
    assert not ran


def test_a_tokenizer_without_pad_or_eos_token_is_refused_and_left_as_it_was():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=1)
    tokenizer.pad_token, tokenizer.eos_token = None, None
    batches = text_batches(model, tokenizer, ["one", "two words"], batch_size=2, max_length=16, progress=False,
                           what="test")
    with pytest.raises(ValueError, match="the tokenizer has neither a pad token nor an eos token to pad batches with"):
        next(batches)
    assert tokenizer.pad_token is None and tokenizer.eos_token is None


def test_methods_read_texts_to_the_checkpoints_context_by_default():
    """Every method that reads texts defaults max_length to None, the checkpoint's context (as the
    fastprobe command does), not 512: a model of 1024 positions reads a text of more than 512
    tokens whole."""
    import inspect

    from fastprobe.methods import availability, nullspace, probes, sinks, uncertainty
    from fastprobe.models import DEMO_TEXTS

    readers = [availability.greedy_answers, availability.answer_availability, nullspace.shift_vectors,
               probes.collect_hidden_states, sinks.score_heads, sinks.perplexity, uncertainty.token_uncertainty,
               uncertainty.generate_with_uncertainty]
    for function in readers:
        assert inspect.signature(function).parameters["max_length"].default is None, function.__name__
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=1, max_position_embeddings=1024)
    text = " ".join(DEMO_TEXTS * 2)
    length = len(tokenizer(text)["input_ids"])
    assert 512 < length <= 1024
    table = uncertainty.token_uncertainty(model, [model], tokenizer, [text], progress=False)
    assert len(table) == length - 1  # every token after the first scored
    whole = sinks.perplexity(model, tokenizer, [text], max_length=length, progress=False)
    assert sinks.perplexity(model, tokenizer, [text], progress=False) == whole
