"""The method layer's shared batching (fastprobe/methods/_batching.py)."""
import torch

from fastprobe.methods._batching import text_batches
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
