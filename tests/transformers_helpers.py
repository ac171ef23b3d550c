"""Helpers for the tests that run transformers models across transformers versions."""

import contextlib
import logging

import pytest
import torch

import fastprobe as fp
from fastprobe.integrations import is_patched

transformers = pytest.importorskip("transformers")


# transformers 5.x's own models do not compile on a torch without torch.compiler.is_exporting
# (checked: 5.25 on torch 2.6.0, unpatched too; 2.8.0 compiles them): its is_torchdynamo_exporting
# reads it inside a try that Dynamo cannot trace, and fullgraph breaks on func.__code__.co_varnames
NO_COMPILE_REFERENCE = (int(transformers.__version__.split(".")[0]) >= 5 and not hasattr(torch.compiler, "is_exporting"))
skip_without_compile_reference = pytest.mark.skipif(
    NO_COMPILE_REFERENCE, reason=f"transformers {transformers.__version__}'s models do not compile on torch {torch.__version__}")

@contextlib.contextmanager
def transformers_warnings():
    """The messages transformers logs at WARNING or above inside the block, into the yielded
    list (its once-per-process messages too: their cache is cleared first)."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def routes_through_interfaces(model) -> bool:
    """Whether the installed transformers runs this model's attention through its AttentionInterface
    and its masks through the AttentionMaskInterface, which fastprobe needs: BERT only from 5.0
    (4.5x's has its own attention classes), GPT-2 and OPT not in 4.53 (which builds their own 4D masks)."""
    from fastprobe.integrations._lookups import _HYBRID_FAMILIES

    base = type(model.base_model)
    builds_own_masks = any(hasattr(type(module), "_update_causal_mask") for module in model.modules())  # OPT's decoder
    # hybrids of attention and linear-attention / state-space layers: the interface without the flag
    hybrid = getattr(model.config, "model_type", None) in _HYBRID_FAMILIES
    return (getattr(base, "_supports_attention_backend", False) or hybrid) and not builds_own_masks


def patch_or_skip(model, **options):
    """fp.patch(model, **options); on a transformers that does not route this architecture through
    its interfaces, checks that patch refuses it (never a silent no-op) and skips the test."""
    if routes_through_interfaces(model):
        return fp.patch(model, **options)
    with pytest.raises(NotImplementedError, match="cannot patch"):
        fp.patch(model, **options)
    assert not is_patched(model)
    pytest.skip(f"transformers {transformers.__version__} does not run {type(model.base_model).__name__} through its "
                "attention and mask interfaces: fastprobe refuses it (checked)")


# what transformers' own unpatched forward raises where a version of it fails on a test's model:
# 4.5x's / early 5.x's VLM forwards that read an `image_outputs` they lack; 5.13's hybrids (LFM2,
# Falcon-H1, Zamba2) that ask a cache of attention layers alone for its linear-attention state
# (5.24's Llama 4 reads image_outputs from its language model's output, 5.0's pooler_output from its vision model's);
# 5.12's hybrids (Qwen3-Next, Qwen 3.5, LFM2) whose static-cache generate looks a mask function up for
# their linear-attention or convolution layer types, which masking_utils has none for
TRANSFORMERS_OWN_FAILURES = {AttributeError: ("image_outputs", "has no attribute 'pooler_output'"),
                             ValueError: ("has_previous_state",), KeyError: ("'linear_attention'", "'conv'")}


def unpatched_or_skip(call, what: str):
    """call()'s result, where `call` runs an unpatched model; where it fails inside transformers in
    one of the known ways (TRANSFORMERS_OWN_FAILURES), the test is skipped: there is no reference."""
    try:
        return call()
    except tuple(TRANSFORMERS_OWN_FAILURES) as error:
        markers = [marker for kind, found in TRANSFORMERS_OWN_FAILURES.items() if isinstance(error, kind)
                   for marker in found]
        if not any(marker in str(error) for marker in markers):
            raise
        pytest.skip(f"transformers {transformers.__version__}'s {what} fails unpatched: {error}")


def generated_cache(result):
    """The KV cache of a generate result ("cache" from transformers 5.x, "past_key_values" before)."""
    return result.cache if hasattr(result, "cache") else result.past_key_values


def cached_keys_values(cache, layer: int) -> tuple:
    """(keys, values) [B, Hkv, T, D] a KV cache holds for a layer (4.53 keeps lists of tensors)."""
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


class AdapterWrapper(torch.nn.Module):
    """A model held as a PEFT model holds it: the model inside (get_base_model()), its adapters'
    peft_config, attributes forwarded to it, a forward and a generate that take anything and pass
    it on."""

    peft_config: dict = {}

    def __init__(self, model):
        super().__init__()
        self.base_model = model

    def get_base_model(self):
        return self.base_model

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)


def assert_same_greedy(got, want, rtol=2e-5, atol=2e-5):
    """Greedy generations of the same prompts by two implementations (generate's outputs with
    return_dict_in_generate and output_scores): each step's scores within the tolerance and the
    same tokens while a row's tokens agree. A row may part only at a step where the reference's
    top two scores are within twice the tolerance: a near tie, which scores this close may order
    either way (a random model's top two come within float32 rounding, ~1e-7, a few times in
    10^6 steps); after that step the row is not compared."""
    prompt = want.sequences.shape[1] - len(want.scores)
    alive = torch.ones(want.sequences.shape[0], dtype=torch.bool)
    for step, (got_scores, want_scores) in enumerate(zip(got.scores, want.scores)):
        torch.testing.assert_close(got_scores[alive], want_scores[alive], rtol=rtol, atol=atol,
                                   msg=lambda m: f"step {step}: {m}")
        parted = alive & (got.sequences[:, prompt + step] != want.sequences[:, prompt + step])
        for row in parted.nonzero().flatten().tolist():
            first, second = want_scores[row].double().topk(2).values.tolist()
            margin = 2 * (atol + rtol * abs(first))
            assert first - second <= margin, (f"row {row} parts at step {step}: the reference's top two scores "
                                              f"{first:.7g} and {second:.7g} are no near tie (within {margin:.3g})")
        alive &= ~parted
    # (a different number of steps: generate stops when every row has ended, which a parted row may change)
    assert len(got.scores) == len(want.scores) or not alive.all(), (len(got.scores), len(want.scores))
    length = prompt + min(len(got.scores), len(want.scores))
    assert torch.equal(got.sequences[alive, :length], want.sequences[alive, :length])
