"""Contrastive guidance at the model level: tokens per second of plain generation, guided
generation (fastprobe.patch(model, guidance=...): dual-path attention on every layer, one pass)
and two-pass contrastive decoding (a second forward with the image keys masked out, its own KV
cache), same prompts, same number of new tokens (min_new_tokens = max_new_tokens), greedy, in the
same run, with peak memory.

The model is the built-in tiny LLaVA (fastprobe.models.tiny_llava: CLIP vision tower, Llama text
model of 4 layers x 8 heads (4 key/value heads), hidden 128), images of 112 x 112 pixels in
patches of 14 (64 image tokens per prompt), a batch of 2 left-padded prompts, 32 new tokens;
float32 on the CPU, bfloat16 on CUDA. Goals: guided within 1.25x the plain latency and at most
0.65x the two-pass baseline's.

    pytest bench/test_guidance_bench.py -k cpu --benchmark-json=bench/results/<device>-guidance.json
"""

import functools
import sys

import numpy as np
import pytest
import torch

import fastprobe as fp

try:
    from . import _memory
except ImportError:  # run as a script for the CPU peak-memory child
    import _memory

pytest.importorskip("transformers")
pytest.importorskip("PIL")

MODEL = dict(num_layers=4, hidden_size=128, num_heads=8, num_kv_heads=4, vision_hidden_size=64, vision_layers=2,
             image_size=112, patch_size=14)
PROMPTS = ["<image>\nDescribe the picture in a few words.", "Here is a photo. <image> What is in it?"]
NEW_TOKENS = 32
GAMMA, ALPHA = 1.0, 1.0
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


@functools.lru_cache(maxsize=None)
def setup(device: str) -> dict:
    """The same weights three ways (plain, guided, plain for the two-pass hook) and the batch."""
    from fastprobe.methods import guidance
    from fastprobe.models import tiny_llava, tiny_llava_processor

    processor = tiny_llava_processor(image_size=MODEL["image_size"], patch_size=MODEL["patch_size"])
    dtype = DTYPES[device]
    built = {name: tiny_llava(processor, **MODEL).to(device=device, dtype=dtype) for name in ("plain", "guided")}
    fp.patch(built["guided"], guidance=dict(gamma=GAMMA))  # every layer
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (128, 96, 3), dtype=np.uint8), rng.integers(0, 256, (100, 140, 3), dtype=np.uint8)]
    batch = guidance.prepare_inputs(built["plain"], processor, images, PROMPTS)
    return dict(models=built, batch=batch)


SETTINGS = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def plain_generate(device):
    """model.generate, no guidance (the model's default attention, sdpa): the baseline."""
    made = setup(device)
    return made["models"]["plain"].generate(**made["batch"], **SETTINGS)


def fastprobe_guided(device):
    """Dual-path attention on every layer, one forward per token."""
    made = setup(device)
    return made["models"]["guided"].generate(**made["batch"], **SETTINGS)


def two_pass_contrastive(device):
    """Two forwards per token (the second without the image keys), logits contrasted."""
    from fastprobe.methods import guidance

    made = setup(device)
    model = made["models"]["plain"]
    with guidance.two_pass_contrast(model, alpha=ALPHA):
        return model.generate(**made["batch"], **SETTINGS)


IMPLS = {"fastprobe-guided": fastprobe_guided, "plain-generate": plain_generate,
         "two-pass-contrastive": two_pass_contrastive}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_guided_generation(benchmark, device, impl, request):
    made = setup(device)  # built outside the timing
    batch = made["batch"]
    num_rows, prompt = batch["input_ids"].shape
    image_tokens = (batch["input_ids"][0] == made["models"]["plain"].config.image_token_id).sum()
    benchmark.group = f"guidance_generate_T{NEW_TOKENS}-{device}"
    benchmark.extra_info.update(
        impl=impl, baseline="plain-generate", dtype=str(DTYPES[device]), new_tokens=NEW_TOKENS, gamma=GAMMA,
        alpha=ALPHA,
        shape=dict(B=num_rows, prompt=prompt, image_tokens=int(image_tokens),
                   layers=MODEL["num_layers"], H=MODEL["num_heads"], Hkv=MODEL["num_kv_heads"],
                   D=MODEL["hidden_size"] // MODEL["num_heads"]),
        backend=fp.backend.resolve(torch.device(device), DTYPES[device], "dual_path_attention"),
    )
    with torch.no_grad():
        _memory.measure(benchmark, request, device, impl, IMPLS[impl], (device,), __file__, peers=IMPLS)
    if benchmark.stats is not None:  # None under --benchmark-disable
        median = benchmark.stats.stats.median
        benchmark.extra_info["tokens_per_s"] = num_rows * NEW_TOKENS / median
        benchmark.extra_info["ms_per_step"] = 1e3 * median / NEW_TOKENS


if __name__ == "__main__" and sys.argv[1:2] == ["--peak-rss"]:
    impl = IMPLS[sys.argv[2]]
    with torch.no_grad():
        _memory.print_rss_growth(lambda: impl("cpu"), lambda: impl("cpu"))
