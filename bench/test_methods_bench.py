"""The method layer against what people write today, on the same model in the same run, with
peak memory.

Hidden states for a probe: fastprobe.methods.probes.collect_hidden_states_from_batches at layer 1
(hooks; the pass stops after that block) vs the base model with output_hidden_states=True (every
layer runs and every layer's states are kept), mean-pooled the same way.

Draft uncertainty: fastprobe.methods.uncertainty.token_uncertainty on B texts (tokenising, the
forwards, the fused draft_divergence on the scored rows, the token table) vs the same batch and
forwards followed by the eager statistics (softmax of every model's logits, the mixture, its
logarithm: fastprobe.reference.draft_divergence, in float32 for float32 and 16-bit logits alike).

The models are built-in Llama-architecture ones (random weights): 8 layers, hidden 256, 8 heads,
vocabulary 32000; a target and 3 drafts for uncertainty. CPU: float32, batch 4 x 256 tokens;
CUDA: bfloat16, batch 8 x 1024 tokens.

    pytest bench/test_methods_bench.py -k cpu --benchmark-json=bench/results/<device>-methods.json
"""

import functools
import sys

import pytest
import torch

import fastprobe as fp
from fastprobe.methods import probes, uncertainty

try:
    from . import _memory
except ImportError:  # run as a script for the CPU peak-memory child
    import _memory

pytest.importorskip("transformers")
pytest.importorskip("pandas")

MODEL = dict(num_layers=8, num_heads=8, hidden_size=256, vocab_size=32000)
CASES = {"cpu": dict(batch=4, length=256, dtype=torch.float32), "cuda": dict(batch=8, length=1024, dtype=torch.bfloat16)}
LAYER, NUM_DRAFTS = 1, 3


@functools.lru_cache(maxsize=None)
def models(device: str) -> list:
    """The target (seed 0) and the drafts (seeds 1..3), on the device in its dtype."""
    from fastprobe.models import tiny_model

    dtype = CASES[device]["dtype"]
    return [tiny_model("llama", seed=seed, **MODEL).to(device=device, dtype=dtype) for seed in range(1 + NUM_DRAFTS)]


def make_batch(device: str, length: int = 0) -> dict:
    case = CASES[device]
    length = length or case["length"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, MODEL["vocab_size"], (case["batch"], length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, : length // 4] = 0  # one left-padded row
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def describe(benchmark, device: str, impl: str, group: str, baseline: str) -> None:
    models(device)
    case = CASES[device]
    benchmark.group = f"{group}-{device}"
    benchmark.extra_info.update(
        impl=impl, baseline=baseline, dtype=str(case["dtype"]),
        shape=dict(B=case["batch"], L=case["length"], layers=MODEL["num_layers"], H=MODEL["hidden_size"],
                   V=MODEL["vocab_size"]),
    )


# ---------------------------------------------------------------- hidden states


def fastprobe_collect(batch):
    """Layer 1's states mean-pooled over real tokens, [B, H]: hooks, early stop."""
    model = models(batch["input_ids"].device.type)[0]
    return probes.collect_hidden_states_from_batches(model, batch, layers=[LAYER], pool="mean", progress=False,
                                                     on_device=True)[LAYER]


def output_hidden_states(batch):
    """The same from the base model's output_hidden_states (entry LAYER + 1 is block LAYER's output)."""
    model = models(batch["input_ids"].device.type)[0]
    states = model.model(**batch, output_hidden_states=True, use_cache=False).hidden_states[LAYER + 1]
    real = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
    return (states.float() * real).sum(1) / real.sum(1)


HIDDEN_IMPLS = {"fastprobe-collect": fastprobe_collect, "output-hidden-states": output_hidden_states}


@pytest.mark.parametrize("impl", list(HIDDEN_IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_hidden_states_for_probes(benchmark, device, impl, request):
    describe(benchmark, device, impl, "methods_hidden_states", "output-hidden-states")
    benchmark.extra_info["layer"] = LAYER
    with torch.no_grad():
        _memory.measure(benchmark, request, device, impl, HIDDEN_IMPLS[impl], (make_batch(device),), __file__,
                        peers=HIDDEN_IMPLS)


# ---------------------------------------------------------------- draft uncertainty


@functools.lru_cache(maxsize=None)
def texts_and_tokenizer(device: str) -> tuple:
    """B texts of at least L tokens under the built-in tokenizer (its ids are a subset of the
    models' vocabulary), the first a quarter as long (a padded row)."""
    from fastprobe.models import DEMO_TEXTS, tiny_tokenizer

    case = CASES[device]
    texts = [" ".join((DEMO_TEXTS[i:] + DEMO_TEXTS[:i]) * (case["length"] // 128 + 1)) for i in range(case["batch"])]
    texts[0] = texts[0][: len(texts[0]) // 4]
    return texts, tiny_tokenizer()


def fastprobe_uncertainty(device, length=0):
    """Per-token draft uncertainty of the texts (cut to `length` tokens, default the case's):
    the method as users call it."""
    target, *drafts = models(device)
    texts, tokenizer = texts_and_tokenizer(device)
    return uncertainty.token_uncertainty(target, drafts, tokenizer, texts, batch_size=len(texts),
                                         max_length=length or CASES[device]["length"], progress=False)


def eager_uncertainty(device, length=0):
    """The same batch and forwards, then softmax of every model's logits, the mixture and its
    logarithm on the scored rows."""
    target, *drafts = models(device)
    texts, tokenizer = texts_and_tokenizer(device)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=length or CASES[device]["length"],
                      return_tensors="pt")
    batch = {name: batch[name].to(device) for name in ("input_ids", "attention_mask")}
    scored = uncertainty.scored_positions(batch["attention_mask"])
    target_rows = target(**batch).logits[scored]
    draft_rows = torch.stack([draft(**batch).logits[scored] for draft in drafts])
    return fp.reference.draft_divergence(draft_rows, target_rows)


UNCERTAINTY_IMPLS = {"fastprobe-uncertainty": fastprobe_uncertainty, "eager-statistics": eager_uncertainty}


@pytest.mark.parametrize("impl", list(UNCERTAINTY_IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_draft_uncertainty(benchmark, device, impl, request):
    describe(benchmark, device, impl, "methods_uncertainty", "eager-statistics")
    benchmark.extra_info["drafts"] = NUM_DRAFTS
    with torch.no_grad():
        _memory.measure(benchmark, request, device, impl, UNCERTAINTY_IMPLS[impl], (device,), __file__,
                        peers=UNCERTAINTY_IMPLS)


if __name__ == "__main__" and sys.argv[1:2] == ["--peak-rss"]:
    name = sys.argv[2]  # warmed up on 16 tokens per row, then measured at the case's length
    if name in HIDDEN_IMPLS:
        impl, small, full = HIDDEN_IMPLS[name], (make_batch("cpu", 16),), (make_batch("cpu"),)
    else:
        impl, small, full = UNCERTAINTY_IMPLS[name], ("cpu", 16), ("cpu",)
    with torch.no_grad():
        _memory.print_rss_growth(lambda: impl(*small), lambda: impl(*full))
