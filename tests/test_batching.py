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
