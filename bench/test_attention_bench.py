"""sink_attention: fastprobe vs PyTorch's scaled_dot_product_attention (the speed peer) and
vs eager attention that materialises the weights to read their first-token mass (what
transformers users do today with output_attentions=True), in the same run, with peak memory.
On CUDA also vs SDPA's cuDNN backend (on Hopper faster than its default flash backend) and
FlexAttention with the equivalent sink + window block mask (and an lse epilogue for the sink
mass), the cost of extra statistics, head masking, and decoding.

    pytest bench/test_attention_bench.py --benchmark-json=bench/results/<device>.json
"""

import functools
import sys

import pytest
import torch
import torch.nn.functional as F

import fastprobe as fp
from fastprobe.ops.attention import KeyGroups, block_horizon, key_masks, prepare_key_groups, segment_spans

try:
    from . import _memory
except ImportError:  # run as a script for the CPU peak-memory child
    import _memory

# The shapes: CPU float32 B=1, H=16, L=2048, D=64 causal; GPU bfloat16 H=32, D=128.
CPU_CASE = dict(batch=1, heads=16, length=2048, head_dim=64, dtype=torch.float32)
GPU_LENGTHS = [1024, 4096, 16384]
GPU_HEADS, GPU_HEAD_DIM = 32, 128
WINDOW, NUM_SINK = 1024, 4
DECODE_KEYS = 32768


# Multi-head latent attention as DeepSeek-V3 attends in transformers: query/key heads of
# 128 + 64 (no-rope + rope) dims, value heads of 128 (read at their own width).
LATENT_CASES = {
    "cpu": dict(batch=1, heads=16, length=1024, head_dim=192, value_dim=128, dtype=torch.float32),
    "cuda": dict(batch=1, heads=32, length=4096, head_dim=192, value_dim=128, dtype=torch.bfloat16),
    "small": dict(batch=1, heads=2, length=16, head_dim=8, value_dim=4, dtype=torch.float32),
}


def make_qkv(device, batch, heads, length, head_dim, dtype, num_queries=None, value_dim=None):
    num_queries = length if num_queries is None else num_queries
    q = torch.randn(batch, heads, num_queries, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype)
    v = torch.randn(batch, heads, length, value_dim or head_dim, device=device, dtype=dtype)
    return q, k, v


def fastprobe_causal(q, k, v):
    return fp.sink_attention(q, k, v).out


@functools.lru_cache(maxsize=8)
def prepared_groups(layout: str, batch: int, num_keys: int, device: torch.device) -> KeyGroups:
    """3 key groups, checked once (prepare_key_groups), as a recording forward's layers get
    them: "cyclic" changes group at every key (every key block mixed), "runs" is a prompt's
    layout (BOS, then 576 image tokens, then text). The rows timed with them cost the kernel's
    statistics, not the ids' check (a host sync per call with raw ids)."""
    if layout == "cyclic":
        groups = (torch.arange(num_keys, device=device) % 3).expand(batch, -1)
    else:
        groups = torch.full((batch, num_keys), 2, dtype=torch.int64, device=device)
        groups[:, 0] = 0
        groups[:, 1:577] = 1
    return prepare_key_groups(groups, 3)


def fastprobe_all_stats(q, k, v):
    """3 key groups that change at every key, and the entropy."""
    groups = prepared_groups("cyclic", k.shape[0], k.shape[2], k.device)
    return fp.sink_attention(q, k, v, key_groups=groups, return_entropy=True).out


def fastprobe_all_stats_runs(q, k, v):
    """3 key groups in runs, and the entropy: key blocks inside a run add their row sums to its
    group."""
    groups = prepared_groups("runs", k.shape[0], k.shape[2], k.device)
    return fp.sink_attention(q, k, v, key_groups=groups, return_entropy=True).out


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)


# SDPA on its cuDNN backend: on Hopper faster than the flash backend that SDPA's fixed priority picks
# first (transformers prefers cuDNN there), so the stronger SDPA peer on an H200. Where cuDNN has no
# kernel for a case the row skips (_memory.skip_unless_sdpa_backend_runs).
sdpa_cudnn = _memory.on_sdpa_backend("CUDNN_ATTENTION", sdpa_causal)


def eager_with_weights(q, k, v):
    """softmax(q k^T scale + causal mask) materialised, its first-token mass, and the output."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    length = k.shape[2]
    causal = torch.ones(q.shape[2], length, dtype=torch.bool, device=q.device).tril(length - q.shape[2])
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return weights @ v, weights[..., 0]


CPU_IMPLS = {"fastprobe": fastprobe_causal, "sdpa": sdpa_causal, "eager-weights": eager_with_weights}


@pytest.mark.parametrize("impl", list(CPU_IMPLS))
def test_attention_cpu(benchmark, impl, request):
    inputs = make_qkv("cpu", **CPU_CASE)
    benchmark.group = "sink_attention-cpu"
    benchmark.extra_info.update(
        impl=impl, baseline="sdpa", dtype=str(CPU_CASE["dtype"]),
        shape=dict(B=CPU_CASE["batch"], H=CPU_CASE["heads"], L=CPU_CASE["length"], D=CPU_CASE["head_dim"]),
        input_bytes=sum(t.nbytes for t in inputs),
    )
    with torch.no_grad():
        _memory.measure(benchmark, request, "cpu", impl, CPU_IMPLS[impl], inputs, __file__, peers=CPU_IMPLS)


LATENT_IMPLS = {"fastprobe-latent": fastprobe_causal, "sdpa-latent": sdpa_causal}


def qkv_inputs(device, case):
    """(q, k, v) and their description for the benchmark's extra info."""
    inputs = make_qkv(device, **case)
    shape = dict(B=case["batch"], H=case["heads"], L=case["length"], D=case["head_dim"])
    if "num_queries" in case:
        shape = dict(B=case["batch"], H=case["heads"], Lq=case["num_queries"], Lk=case["length"], D=case["head_dim"])
    if "value_dim" in case:
        shape["Dv"] = case["value_dim"]
    return inputs, dict(shape=shape, input_bytes=sum(t.nbytes for t in inputs))


# The attention of the model-level recording benchmark (bench/test_patch_bench.py: the built-in
# model's 8 heads of 16 dims at L = 8192) alone: how much of the recording's time over SDPA's
# forward the kernel takes at this narrow head dim.
NARROW_CASES = {
    "cpu": dict(batch=1, heads=8, length=2048, head_dim=16, dtype=torch.float32),
    "cuda": dict(batch=1, heads=8, length=8192, head_dim=16, dtype=torch.bfloat16),
    "small": dict(batch=1, heads=2, length=16, head_dim=8, dtype=torch.float32),
}
NARROW_IMPLS = {"fastprobe-narrow": fastprobe_causal, "sdpa-narrow": sdpa_causal}


# 16-bit inputs on the CPU (a model loaded in bfloat16 or float16, e.g. under fastprobe.patch):
# the kernels convert key and value blocks to float32 as they stream them; causal prefill at the
# CPU case's shape and one-token decoding against a 4096-token cache. On CUDA float16 prefill (the
# other CUDA rows are bfloat16), against SDPA's default (flash) and cuDNN backends.
def _sixteen_bit(dtype, decode):
    shape = dict(batch=1, heads=16, length=4096, head_dim=128, num_queries=1) if decode else \
        dict(batch=1, heads=16, length=2048, head_dim=64)
    cases = {"cpu": dict(shape, dtype=dtype), "small": dict(batch=1, heads=2, length=16, head_dim=8, dtype=dtype)}
    if dtype == torch.float16 and not decode:
        cases["cuda"] = dict(batch=1, heads=32, length=4096, head_dim=128, dtype=dtype)
    name = str(dtype).replace("torch.", "") + ("-decode" if decode else "")
    impls = {f"fastprobe-{name}": fastprobe_causal, f"sdpa-{name}": sdpa_causal}
    if "cuda" in cases:
        impls[f"sdpa-cudnn-{name}"] = sdpa_cudnn
    return name, (cases, qkv_inputs, impls, f"sdpa-{name}")


SIXTEEN_BIT = dict(_sixteen_bit(dtype, decode) for dtype in (torch.bfloat16, torch.float16) for decode in (False, True))


# A Gemma 3-style prompt with images: 256-token image blocks whose tokens attend to each other both
# ways, causal elsewhere. transformers' SDPA path builds the [B, 1, L, L] boolean mask (once per
# forward, so it is made outside the timed call here) and runs SDPA with it; on CUDA also
# FlexAttention with the same mask as a block mask (made outside the timed call), which skips
# the blocks above the diagonal that no image reaches.
BLOCKS_CASES = {
    "cpu": dict(batch=1, heads=16, length=2048, head_dim=64, dtype=torch.float32, images=[(64, 320), (1024, 1280)]),
    "cuda": dict(batch=1, heads=32, length=4096, head_dim=128, dtype=torch.bfloat16,
                 images=[(64, 320), (1024, 1280), (2048, 2304), (3072, 3328)]),
    "small": dict(batch=1, heads=2, length=16, head_dim=8, dtype=torch.float32, images=[(2, 6)]),
}


def blocks_inputs(device, case):
    """(q, k, v, block ids [B, L], the equivalent [B, 1, L, L] boolean mask, the images' (start, end)
    spans, the blocks and key masks in the kernels' form) and their description."""
    batch, length = case["batch"], case["length"]
    q, k, v = make_qkv(device, batch, case["heads"], length, case["head_dim"], case["dtype"])
    blocks = torch.full((batch, length), -1, dtype=torch.int64, device=device)
    for index, (start, end) in enumerate(case["images"]):
        blocks[:, start:end] = index
    position = torch.arange(length, device=device)
    same_block = (blocks[:, :, None] == blocks[:, None, :]) & (blocks >= 0)[:, :, None]
    mask = ((position[None, None, :] <= position[None, :, None]) | same_block)[:, None]
    shape = dict(B=batch, H=case["heads"], L=length, D=case["head_dim"])
    info = dict(images=case["images"], shape=shape, input_bytes=q.nbytes + k.nbytes + v.nbytes, mask_bytes=mask.nbytes)
    prepared = (block_horizon(blocks, length), key_masks(None, batch, length, device=device))
    return (q, k, v, blocks, mask, tuple(map(tuple, case["images"])), prepared), info


def fastprobe_blocks(q, k, v, blocks, mask, images, prepared):
    return fp.sink_attention(q, k, v, bidirectional_blocks=blocks).out


def fastprobe_blocks_prepared(q, k, v, blocks, mask, images, prepared):
    """The blocks and key masks made outside the timed call, as fastprobe.patch makes them once per
    forward (and as the peers' masks are made): the call without its checks of the ids."""
    horizon, masks = prepared
    return fp.sink_attention(q, k, v, bidirectional_blocks=horizon, key_padding_mask=masks).out


def sdpa_blocks(q, k, v, blocks, mask, images, prepared):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@functools.lru_cache(maxsize=None)
def _flex_blocks(images, length, device):
    """Compiled FlexAttention and its causal-or-same-image block mask for these image spans."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    image = torch.full((length,), -1, device=device)
    for index, (start, end) in enumerate(images):
        image[start:end] = index

    def causal_or_same_image(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | ((image[q_idx] == image[kv_idx]) & (image[q_idx] >= 0))

    return torch.compile(flex_attention, dynamic=False), create_block_mask(causal_or_same_image, None, None, length,
                                                                           length, device=device)


def flex_blocks(q, k, v, blocks, mask, images, prepared):
    flex, block_mask = _flex_blocks(images, k.shape[2], str(q.device))
    return flex(q, k, v, block_mask=block_mask)


BLOCKS_IMPLS = {"fastprobe-blocks": fastprobe_blocks, "fastprobe-blocks-prepared": fastprobe_blocks_prepared,
                "sdpa-blocks-mask": sdpa_blocks, "flex-blocks": flex_blocks}

# Sequences packed in one row (training batches without padding; Llama 4's chunks look alike):
# each attends causally within itself. transformers' SDPA path builds the block-diagonal causal
# [B, 1, L, L] mask (outside the timed call, once per forward); the other peers run SDPA causal
# on each sequence in turn (what a varlen-less setup does) and, on CUDA, FlexAttention with a
# document mask (block mask made outside the timed call).
PACKED_CASES = {
    "cpu": dict(batch=1, heads=16, head_dim=64, dtype=torch.float32, lengths=[300, 200, 512, 100, 400, 250, 286]),
    "cuda": dict(batch=1, heads=32, head_dim=128, dtype=torch.bfloat16,
                 lengths=[1024, 700, 2048, 300, 1500, 1000, 1620]),
    "small": dict(batch=1, heads=2, head_dim=8, dtype=torch.float32, lengths=[5, 11]),
}


def packed_inputs(device, case):
    """(q, k, v, segment ids [B, L], the equivalent [B, 1, L, L] boolean mask, lengths, the segments
    and key masks in the kernels' form) and their description."""
    batch, lengths = case["batch"], case["lengths"]
    length = sum(lengths)
    q, k, v = make_qkv(device, batch, case["heads"], length, case["head_dim"], case["dtype"])
    segments = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                       torch.tensor(lengths, device=device)).expand(batch, length).contiguous()
    position = torch.arange(length, device=device)
    mask = ((position[None, :] <= position[:, None])[None] & (segments[:, :, None] == segments[:, None, :]))[:, None]
    shape = dict(B=batch, H=case["heads"], L=length, D=case["head_dim"])
    info = dict(lengths=lengths, shape=shape, input_bytes=q.nbytes + k.nbytes + v.nbytes, mask_bytes=mask.nbytes)
    spans = segment_spans(segments)
    prepared = (spans, key_masks(None, batch, length, segment_ids=spans))
    return (q, k, v, segments, mask, tuple(lengths), prepared), info


def fastprobe_packed(q, k, v, segments, mask, lengths, prepared):
    return fp.sink_attention(q, k, v, segment_ids=segments).out


def fastprobe_packed_prepared(q, k, v, segments, mask, lengths, prepared):
    """The segments and key masks made outside the timed call (see fastprobe_blocks_prepared)."""
    spans, masks = prepared
    return fp.sink_attention(q, k, v, segment_ids=spans, key_padding_mask=masks).out


def sdpa_packed_mask(q, k, v, segments, mask, lengths, prepared):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sdpa_packed_loop(q, k, v, segments, mask, lengths, prepared):
    parts = zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))
    return torch.cat([F.scaled_dot_product_attention(*part, is_causal=True) for part in parts], dim=2)


@functools.lru_cache(maxsize=None)
def _flex_documents(lengths, device):
    """Compiled FlexAttention and its causal document block mask for these sequence lengths."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))

    def causal_document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (document[q_idx] == document[kv_idx])

    length = sum(lengths)
    return torch.compile(flex_attention, dynamic=False), create_block_mask(causal_document, None, None, length, length,
                                                                           device=device)


def flex_packed(q, k, v, segments, mask, lengths, prepared):
    flex, block_mask = _flex_documents(lengths, str(q.device))
    return flex(q, k, v, block_mask=block_mask)


PACKED_IMPLS = {"fastprobe-packed": fastprobe_packed, "fastprobe-packed-prepared": fastprobe_packed_prepared,
                "sdpa-packed-mask": sdpa_packed_mask,
                "sdpa-packed-loop": sdpa_packed_loop, "flex-packed": flex_packed}

# Causal prefill variants, each against SDPA: family -> (cases per device and a "small" one for
# the peak-memory child's warm-up, inputs(device, case) -> (inputs, extra info), impls, baseline)
VARIANTS = {
    "latent": (LATENT_CASES, qkv_inputs, LATENT_IMPLS, "sdpa-latent"),
    "narrow": (NARROW_CASES, qkv_inputs, NARROW_IMPLS, "sdpa-narrow"),
    "blocks": (BLOCKS_CASES, blocks_inputs, BLOCKS_IMPLS, "sdpa-blocks-mask"),
    "packed": (PACKED_CASES, packed_inputs, PACKED_IMPLS, "sdpa-packed-mask"),
    **SIXTEEN_BIT,
}


@pytest.mark.parametrize("family,impl", [(family, impl) for family, (_, _, impls, _) in VARIANTS.items() for impl in impls])
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_attention_variant(benchmark, device, family, impl, request):
    """Value heads narrower than query heads (multi-head latent attention, "latent"), the
    recording benchmark's 16-dim heads ("narrow"), bidirectional image blocks (Gemma 3 with
    images, "blocks") and packed sequences ("packed") in causal prefill."""
    _memory.skip_flex_unless_timed(impl, device)
    cases, make_inputs, impls, baseline = VARIANTS[family]
    if device not in cases:
        pytest.skip(f"{family} is timed on the CPU only (the CUDA rows are bfloat16 prefill already)")
    inputs, info = make_inputs(device, cases[device])
    _memory.skip_unless_sdpa_backend_runs(impl, impls[impl], inputs)
    benchmark.group = f"sink_attention_{family}-{device}"
    benchmark.extra_info.update(impl=impl, baseline=baseline, dtype=str(cases[device]["dtype"]), **info)
    with torch.no_grad():
        _memory.measure(benchmark, request, device, impl, impls[impl], inputs, __file__, peers=impls)


# ---- CUDA --------------------------------------------------------------------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


sdpa_flash = _memory.on_sdpa_backend("FLASH_ATTENTION", sdpa_causal)


@functools.lru_cache(maxsize=None)
def _flex(length, num_queries, device):
    """Compiled FlexAttention and its sink + window block mask for this shape."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    offset = length - num_queries

    def sink_window(b, h, q_idx, kv_idx):
        position = q_idx + offset
        return (kv_idx <= position) & ((position - kv_idx < WINDOW) | (kv_idx < NUM_SINK))

    mask = create_block_mask(sink_window, None, None, num_queries, length, device=device)
    return torch.compile(flex_attention, dynamic=False), mask


def flex_sink_window(q, k, v):
    flex, mask = _flex(k.shape[2], q.shape[2], str(q.device))
    return flex(q, k, v, block_mask=mask)


def _flex_with_lse(flex, q, k, v, mask):
    """(out, lse) of FlexAttention: return_aux where this torch has it (return_lse is deprecated there)."""
    from torch.nn.attention import flex_attention as module

    if hasattr(module, "AuxRequest"):
        out, aux = flex(q, k, v, block_mask=mask, return_aux=module.AuxRequest(lse=True))
        return out, aux.lse
    return flex(q, k, v, block_mask=mask, return_lse=True)


def flex_sink_window_mass(q, k, v):
    """FlexAttention with its lse, then the first-token mass exp(s_0 - lse) as an epilogue."""
    flex, mask = _flex(k.shape[2], q.shape[2], str(q.device))
    out, lse = _flex_with_lse(flex, q, k, v, mask)
    first_score = (q.float() @ k[:, :, :1].float().transpose(-1, -2))[..., 0] * q.shape[-1] ** -0.5
    return out, torch.exp(first_score - lse)


def fastprobe_sink_window(q, k, v):
    return fp.sink_attention(q, k, v, window=WINDOW, num_sink=NUM_SINK).out


def fastprobe_masked(fraction):
    def run(q, k, v):
        heads = q.shape[1]
        keep = torch.arange(heads, device=q.device) >= round(fraction * heads)
        return fp.sink_attention(q, k, v, head_mask=keep).out

    return run


GPU_GROUPS = {
    "causal": ({"fastprobe": fastprobe_causal, "sdpa-flash": sdpa_flash, "sdpa-cudnn": sdpa_cudnn}, "sdpa-flash"),
    "sink-window": (
        {"fastprobe": fastprobe_sink_window, "flex": flex_sink_window, "flex+lse-mass": flex_sink_window_mass},
        "flex+lse-mass",
    ),
    "statistics": (
        {"fastprobe-sink-mass": fastprobe_causal, "fastprobe-all-stats": fastprobe_all_stats,
         "fastprobe-all-stats-runs": fastprobe_all_stats_runs},
        "fastprobe-sink-mass",
    ),
    "head-mask": ({f"fastprobe-{int(f * 100)}%-masked": fastprobe_masked(f) for f in (0.0, 0.25, 0.5)}, "fastprobe-0%-masked"),
}


DECODE_IMPLS = {"fastprobe": fastprobe_causal, "sdpa-flash": sdpa_flash, "sdpa-cudnn": sdpa_cudnn,
                "fastprobe-sink-window": fastprobe_sink_window, "flex": flex_sink_window}
DECODE_WINDOWED = ("fastprobe-sink-window", "flex")  # (reading NUM_SINK + WINDOW keys)


@cuda_only
@pytest.mark.parametrize("length", GPU_LENGTHS)
@pytest.mark.parametrize("group,impl", [(g, i) for g, (impls, _) in GPU_GROUPS.items() for i in impls])
def test_attention_cuda(benchmark, group, impl, length, request):
    _memory.skip_flex_unless_timed(impl, "cuda")
    impls, baseline = GPU_GROUPS[group]
    inputs = make_qkv("cuda", 1, GPU_HEADS, length, GPU_HEAD_DIM, torch.bfloat16)
    _memory.skip_unless_sdpa_backend_runs(impl, impls[impl], inputs)
    benchmark.group = f"sink_attention_{group}_L{length}-cuda"
    benchmark.extra_info.update(
        impl=impl, baseline=baseline, dtype="torch.bfloat16",
        shape=dict(B=1, H=GPU_HEADS, L=length, D=GPU_HEAD_DIM), input_bytes=sum(t.nbytes for t in inputs),
    )
    with torch.no_grad():
        _memory.measure(benchmark, request, "cuda", impl, impls[impl], inputs, __file__)


@cuda_only
@pytest.mark.parametrize("impl", list(DECODE_IMPLS))
def test_attention_decode_cuda(benchmark, impl, request):
    """One query token against a 32k-token cache (decoding latency)."""
    _memory.skip_flex_unless_timed(impl, "cuda")
    inputs = make_qkv("cuda", 1, GPU_HEADS, DECODE_KEYS, GPU_HEAD_DIM, torch.bfloat16, num_queries=1)
    _memory.skip_unless_sdpa_backend_runs(impl, DECODE_IMPLS[impl], inputs)
    # sink + window decoding reads NUM_SINK + WINDOW keys, not the whole cache: a group of its own
    windowed = impl in DECODE_WINDOWED
    q, k, v = inputs
    read = q.nbytes + (k.nbytes + v.nbytes) * (NUM_SINK + WINDOW if windowed else DECODE_KEYS) // DECODE_KEYS
    benchmark.group = "sink_attention_decode_sink-window-cuda" if windowed else "sink_attention_decode-cuda"
    benchmark.extra_info.update(
        impl=impl, baseline="flex" if windowed else "sdpa-flash", dtype="torch.bfloat16",
        shape=dict(B=1, H=GPU_HEADS, Lq=1, Lk=DECODE_KEYS, D=GPU_HEAD_DIM),
        input_bytes=sum(t.nbytes for t in inputs), bytes_one_read=read,
    )
    with torch.no_grad():
        _memory.measure(benchmark, request, "cuda", impl, DECODE_IMPLS[impl], inputs, __file__)


if __name__ == "__main__" and sys.argv[1:2] == ["--peak-rss"]:
    variant = next((v for v in VARIANTS.values() if sys.argv[2] in v[2]), None)
    if variant is not None:
        cases, make_inputs, impls, _ = variant
        impl, small, full = impls[sys.argv[2]], make_inputs("cpu", cases["small"])[0], make_inputs("cpu", cases["cpu"])[0]
    else:
        impl, small, full = CPU_IMPLS[sys.argv[2]], make_qkv("cpu", 1, 2, 16, 8, torch.float32), make_qkv("cpu", **CPU_CASE)
    with torch.no_grad():
        _memory.print_rss_growth(lambda: impl(*small), lambda: impl(*full))
