"""Recording per-layer, per-head sink statistics on a transformers model: fastprobe.patch +
record_attention vs eager attention with output_attentions=True (today's only way: every
layer's [B, H, L, L] weights are returned) vs the model's normal SDPA forward (no statistics:
the cost to stay close to), in the same run, with peak memory.

The model is the built-in one of `fastprobe demo` (Llama architecture, 4 layers x 8 heads,
hidden 128, head_dim 16, random weights) at sequence length 2048 on the CPU (float32) and 8192
on CUDA (bfloat16), batch 1, no KV cache. Goals: peak memory within 1.1x and time within 1.2x
of the normal forward, far below eager.

Decoding through a patched model: greedy generate of 32 new tokens for 2 prompts of 128 tokens
(one left-padded) with a KV cache, patched vs the default SDPA model and patched while recording,
in the same run: the per-step cost of fastprobe's attention path at decoding sizes.

    pytest bench/test_patch_bench.py -k cpu --benchmark-json=bench/results/<device>-patch.json
"""

import functools
import sys

import pytest
import torch

import fastprobe as fp

try:
    from . import _memory
except ImportError:  # run as a script for the CPU peak-memory child
    import _memory

pytest.importorskip("transformers")

MODEL = dict(num_layers=4, num_heads=8, hidden_size=128, vocab_size=512)
CASES = {"cpu": dict(length=2048, dtype=torch.float32), "cuda": dict(length=8192, dtype=torch.bfloat16)}


@functools.lru_cache(maxsize=None)
def models(device: str, dtype: torch.dtype) -> dict:
    """The same weights three ways: patched by fastprobe, eager attention, the default (sdpa)."""
    from fastprobe.models import tiny_model

    built = {
        "patched": fp.patch(tiny_model("llama", **MODEL)),
        "eager": tiny_model("llama", attn_implementation="eager", **MODEL),
        "sdpa": tiny_model("llama", attn_implementation="sdpa", **MODEL),
    }
    return {name: model.to(device=device, dtype=dtype) for name, model in built.items()}


def model_for(tensor: torch.Tensor, name: str):
    """The built model `name` on tensor's device, in that device's dtype."""
    device = tensor.device.type
    return models(device, CASES[device]["dtype"])[name]


def describe(benchmark, device: str, impl: str, group: str, baseline: str, **shape) -> None:
    """Builds the models outside the timing and records what the benchmark measures."""
    dtype = CASES[device]["dtype"]
    models(device, dtype)
    benchmark.group = f"{group}-{device}"
    benchmark.extra_info.update(
        impl=impl, baseline=baseline, dtype=str(dtype),
        shape=dict(**shape, layers=MODEL["num_layers"], H=MODEL["num_heads"], D=MODEL["hidden_size"] // MODEL["num_heads"]),
        backend=fp.backend.resolve(torch.device(device), dtype, "sink_attention"),
    )


def make_inputs(device: str, length: int, dtype: torch.dtype):
    return (torch.randint(3, MODEL["vocab_size"], (1, length), device=device),)


def fastprobe_record(ids):
    """[layers, heads] sink mass from the fused kernel while the model runs."""
    model = model_for(ids, "patched")
    with fp.record_attention(model) as record:
        model(input_ids=ids, use_cache=False)
    return record.sink_mass


def eager_output_attentions(ids):
    """The same [layers, heads] table from eager attention weights (first key, mean over queries)."""
    model = model_for(ids, "eager")
    weights = model(input_ids=ids, use_cache=False, output_attentions=True).attentions
    return torch.stack([w[..., 0].float().mean((0, 2)) for w in weights])


def sdpa_forward(ids):
    """The normal forward, no statistics: the baseline."""
    model = model_for(ids, "sdpa")
    return model(input_ids=ids, use_cache=False).logits


IMPLS = {"fastprobe-record": fastprobe_record, "eager-output-attentions": eager_output_attentions,
         "sdpa-forward": sdpa_forward}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_record_sink_statistics(benchmark, device, impl, request):
    case = CASES[device]
    inputs = make_inputs(device, **case)
    describe(benchmark, device, impl, f"patch_record_L{case['length']}", "sdpa-forward", B=1, L=case["length"])
    with torch.no_grad():
        _memory.measure(benchmark, request, device, impl, IMPLS[impl], inputs, __file__, peers=IMPLS)


NEW_TOKENS, PROMPT = 32, 128


def generate_inputs(device: str) -> dict:
    ids = torch.randint(3, MODEL["vocab_size"], (2, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :PROMPT // 4] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                do_sample=False)


def patched_generate(inputs):
    model = model_for(inputs["input_ids"], "patched")
    return model.generate(**inputs)


def patched_generate_recording(inputs):
    model = model_for(inputs["input_ids"], "patched")
    with fp.record_attention(model):
        return model.generate(**inputs)


def sdpa_generate(inputs):
    model = model_for(inputs["input_ids"], "sdpa")
    return model.generate(**inputs)


GENERATE_IMPLS = {"fastprobe-generate": patched_generate, "fastprobe-generate-recording": patched_generate_recording,
                  "sdpa-generate": sdpa_generate}


@pytest.mark.parametrize("impl", list(GENERATE_IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_patched_generate(benchmark, device, impl, request):
    inputs = generate_inputs(device)
    describe(benchmark, device, impl, f"patch_generate_T{NEW_TOKENS}", "sdpa-generate", B=2, prompt=PROMPT)
    benchmark.extra_info["new_tokens"] = NEW_TOKENS
    with torch.no_grad():
        _memory.measure(benchmark, request, device, impl, GENERATE_IMPLS[impl], (inputs,), __file__,
                        peers=GENERATE_IMPLS)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ms_per_step"] = 1e3 * benchmark.stats.stats.median / NEW_TOKENS


if __name__ == "__main__" and sys.argv[1:2] == ["--peak-rss"]:
    with torch.no_grad():
        if sys.argv[2] in GENERATE_IMPLS:
            impl, inputs = GENERATE_IMPLS[sys.argv[2]], generate_inputs("cpu")
            _memory.print_rss_growth(lambda: impl(inputs), lambda: impl(inputs))
        else:
            impl = IMPLS[sys.argv[2]]
            small = make_inputs("cpu", 16, torch.float32)
            full = make_inputs("cpu", **CASES["cpu"])
            _memory.print_rss_growth(lambda: impl(*small), lambda: impl(*full))
