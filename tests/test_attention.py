"""sink_attention against materialised float64 attention (the reference), PyTorch's SDPA,
properties of the statistics, and bad input."""

import functools
import importlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastprobe as fp
from fastprobe import reference
from fastprobe.ops.attention import _sink_attention_op, key_masks

from .conftest import ATOL, RTOL

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
STATS = ["lse", "sink_mass", "group_mass", "entropy"]
# out is stored in the input dtype: one rounding of a float32 result (and, on GPU, P rounded
# to the input dtype before the P V product), so its tolerance is that dtype's.
OUT_TOLERANCE = {torch.float32: (RTOL, ATOL), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def is_interpreter(target):
    backend, device = target
    return backend == "triton" and device == "cpu"


def prefill_shapes(target):
    """(B, Hq, Lq, Lk, D) cases with odd lengths and head dims; small under the interpreter."""
    if is_interpreter(target):
        return [(2, 4, 37, 37, 16), (1, 4, 19, 29, 40)]
    return [(2, 4, 77, 77, 64), (1, 8, 93, 93, 40), (2, 4, 61, 130, 128)]


def padding_mask(batch, num_keys, side, device):
    """[B, Lk] bool: row b has a random number of padded keys on `side` ("left"/"right"/"mixed")."""
    mask = torch.ones(batch, num_keys, dtype=torch.bool)
    for b in range(batch):
        pad = int(torch.randint(1, max(2, num_keys // 3), ()))
        if side == "left" or (side == "mixed" and b % 2 == 0):
            mask[b, :pad] = False
        else:
            mask[b, num_keys - pad :] = False
    return mask.to(device)


def image_blocks(batch, num_keys, device):
    """[B, Lk] bidirectional block ids (-1: none): even rows hold an image-like block at a random
    place in the middle and one over their last 3 positions (so the last queries of a decode
    step see each other), odd rows a PaliGemma-like prefix block over their first half."""
    blocks = torch.full((batch, num_keys), -1, dtype=torch.int64)
    for b in range(batch):
        if b % 2 == 0:
            length = int(torch.randint(2, max(3, num_keys // 3), ()))
            start = int(torch.randint(0, max(1, num_keys - length - 3), ()))
            blocks[b, start : start + length] = 5
            blocks[b, max(num_keys - 3, start + length) :] = 2
        else:
            blocks[b, : num_keys // 2] = 0
    return blocks.to(device)


def random_segments(batch, num_keys, device):
    """[B, Lk] segment ids of packed sequences: each row cut at random places into runs, the ids
    arbitrary distinct integers (negative ones too) in no particular order."""
    ids = torch.empty(batch, num_keys, dtype=torch.int64)
    for b in range(batch):
        cuts = torch.rand(num_keys) < 3.0 / max(num_keys, 1)
        cuts[0] = False
        run = cuts.long().cumsum(0)
        labels = torch.randperm(num_keys + 5)[: int(run[-1]) + 1] - 3
        ids[b] = labels[run]
    return ids.to(device)


def group_runs(batch, num_keys, device):
    """[B, Lk] key group ids in runs, as BOS / image / text groups are: row b has runs of random
    lengths (some a single key, some longer than a key block, boundaries anywhere), ids in [0, 4)
    in random order, group 3 in no row of an odd batch index."""
    ids = torch.empty(batch, num_keys, dtype=torch.int64)
    for b in range(batch):
        lengths = torch.randint(1, max(2, num_keys // 2), (num_keys,))
        lengths[torch.rand(num_keys) < 0.3] = 1
        run = torch.repeat_interleave(torch.arange(num_keys), lengths)[:num_keys]
        ids[b] = torch.randperm(3 if b % 2 else 4)[run % (3 if b % 2 else 4)]
    return ids.to(device)


def chunk_ids(key_padding_mask, num_keys, chunk, device):
    """Llama 4's chunked attention as segment ids: chunks of `chunk` positions counted from each
    row's first real key (transformers' chunked_overlay with left padding)."""
    left = (~key_padding_mask.cpu()).long().cumprod(-1).sum(-1)  # left-padding length of each row
    return torch.div(torch.arange(num_keys)[None, :] - left[:, None], chunk, rounding_mode="floor").to(device)


def make_options(name, batch, num_heads, num_keys, device):
    """Keyword arguments of one named configuration."""
    window = max(3, num_keys // 5)
    left_padding = padding_mask(batch, num_keys, "left", device)
    options = {
        "causal": {},
        "bidirectional": {"causal": False},
        "window": {"window": window},
        "window+sinks": {"window": window, "num_sink": 4},
        "bidirectional-window+sinks": {"causal": False, "window": window // 2, "num_sink": 2},
        "left-padding": {"key_padding_mask": padding_mask(batch, num_keys, "left", device), "window": window, "num_sink": 1},
        "right-padding": {"key_padding_mask": padding_mask(batch, num_keys, "right", device)},
        "bidirectional-padding": {"causal": False, "key_padding_mask": padding_mask(batch, num_keys, "mixed", device)},
        "head-mask": {"head_mask": torch.arange(num_heads, device=device) % 3 != 1},
        "sink-logit": {"sink_logit": torch.randn(num_heads, device=device) + 1.0},
        "key-groups": {"key_groups": torch.randint(0, 3, (batch, num_keys), device=device), "num_groups": 3},
        "key-group-runs": {"key_groups": group_runs(batch, num_keys, device), "num_groups": 4},
        "image-blocks": {"bidirectional_blocks": image_blocks(batch, num_keys, device)},
        "image-blocks+window+padding": {
            "bidirectional_blocks": image_blocks(batch, num_keys, device), "window": window, "num_sink": 2,
            "key_padding_mask": padding_mask(batch, num_keys, "mixed", device),
        },
        "segments": {"segment_ids": random_segments(batch, num_keys, device)},
        "chunks+left-padding": {
            "key_padding_mask": left_padding, "segment_ids": chunk_ids(left_padding, num_keys, max(2, num_keys // 4), device),
        },
        "bidirectional-segments+window+sinks": {
            "causal": False, "segment_ids": random_segments(batch, num_keys, device), "window": window, "num_sink": 2,
        },
        "segments+image-blocks+window": {
            "segment_ids": random_segments(batch, num_keys, device), "bidirectional_blocks": image_blocks(batch, num_keys, device),
            "window": window, "num_sink": 2,
        },
        "everything": {
            "window": window,
            "num_sink": 3,
            "key_padding_mask": padding_mask(batch, num_keys, "mixed", device),
            "head_mask": torch.arange(num_heads, device=device) != 1,
            "sink_logit": torch.randn(num_heads, device=device),
            "key_groups": torch.randint(0, 4, (batch, num_keys), device=device),
            "num_groups": 4,
            "stat_tokens": 2,
            "bidirectional_blocks": image_blocks(batch, num_keys, device),
            "segment_ids": random_segments(batch, num_keys, device),
        },
    }
    return dict(options[name])


CONFIGS = [
    "causal", "bidirectional", "window", "window+sinks", "bidirectional-window+sinks", "left-padding",
    "right-padding", "bidirectional-padding", "head-mask", "sink-logit", "key-groups", "key-group-runs", "image-blocks",
    "image-blocks+window+padding", "segments", "chunks+left-padding", "bidirectional-segments+window+sinks",
    "segments+image-blocks+window", "everything",
]


def random_qkv(batch, num_heads, num_kv_heads, num_queries, num_keys, head_dim, dtype, device, magnitude=1.0):
    q = (magnitude * torch.randn(batch, num_heads, num_queries, head_dim)).to(device=device, dtype=dtype)
    k = torch.randn(batch, num_kv_heads, num_keys, head_dim).to(device=device, dtype=dtype)
    v = torch.randn(batch, num_kv_heads, num_keys, head_dim).to(device=device, dtype=dtype)
    return q, k, v


def score_tolerance(q, k, v, scale=None):
    """A float32 score carries rounding of about 2^-24 scale sum_i |q_i k_i|; every weight, lse
    and statistic inherits that absolute error, and out that times |v|. Allowed: 8 times the
    largest such term (scores reach hundreds when q and k align, e.g. broadcast along D), and at
    least the usual tolerance: dict(rtol, atol)."""
    group = q.shape[1] // k.shape[1]
    k_abs = k.detach().cpu().double().abs().repeat_interleave(group, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bound = (q.detach().cpu().double().abs() @ k_abs.transpose(-1, -2)).max().item() * scale
    v_max = max(v.detach().abs().max().item(), 1.0)
    return dict(rtol=RTOL, atol=max(ATOL, 8 * 2**-24 * bound * v_max))


def expected(q, k, v, **options):
    """The float64 reference on exactly the (rounded) values the kernel sees, on the CPU."""
    moved = {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in options.items()}
    moved.pop("return_entropy", None)
    if moved.get("sink_logit") is not None:
        moved["sink_logit"] = moved["sink_logit"].double()
    return reference.sink_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), **moved)


def assert_matches(result, want, dtype, with_groups, with_entropy, rtol=RTOL, atol=ATOL):
    """out within its dtype's tolerance (at least atol), statistics within rtol / atol."""
    assert result.out.dtype == dtype
    out_rtol, out_atol = OUT_TOLERANCE[dtype]
    out_rtol, out_atol = max(out_rtol, rtol), max(out_atol, atol)
    assert not torch.isnan(result.out).any(), "out has NaN (unwritten or invalid)"
    torch.testing.assert_close(result.out.cpu().double(), want["out"], rtol=out_rtol, atol=out_atol, msg=lambda m: f"out: {m}")
    for field in STATS:
        got = getattr(result, field)
        if field == "group_mass" and not with_groups or field == "entropy" and not with_entropy:
            assert got is None, field
            continue
        assert got.dtype == torch.float32, field
        assert not torch.isnan(got).any(), f"{field} has NaN (unwritten or invalid)"
        torch.testing.assert_close(got.cpu().double(), want[field], rtol=rtol, atol=atol, msg=lambda m: f"{field}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio", [1, 2, 4], ids=lambda r: f"gqa{r}")
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(target, dtype, ratio, config):
    _, device = target
    for batch, num_heads, num_queries, num_keys, head_dim in prefill_shapes(target):
        q, k, v = random_qkv(batch, num_heads, num_heads // ratio, num_queries, num_keys, head_dim, dtype, device)
        options = make_options(config, batch, num_heads, num_keys, device)
        result = fp.sink_attention(q, k, v, return_entropy=True, **options)
        assert_matches(result, expected(q, k, v, **options), dtype, "key_groups" in options, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prepared", [False, True], ids=["direct", "prepared"])
def test_rows_with_fewer_real_keys_than_sinks_and_stat_tokens(target, dtype, prepared):
    """num_sink and stat_tokens above a row's real keys (3 of 6, scattered, a window of 1): the
    sink keys are all its real keys, and sink_mass their whole weight."""
    _, device = target
    q, k, v = random_qkv(2, 2, 1, 6, 6, 8, dtype, device)
    padding = torch.tensor([[0, 0, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    options = dict(window=1, num_sink=4, stat_tokens=4, key_padding_mask=padding)
    if prepared:
        options["key_padding_mask"] = key_masks(padding, 2, 6, num_sink=4, stat_tokens=4)
    result = fp.sink_attention(q, k, v, return_entropy=True, **options)
    assert_matches(result, expected(q, k, v, window=1, num_sink=4, stat_tokens=4, key_padding_mask=padding), dtype,
                   False, True)


@pytest.mark.parametrize("count", [2**31, 2**32 + 1, 2**63 - 1])
@pytest.mark.parametrize("segmented", [False, True], ids=["rows", "segments"])
def test_sink_and_stat_counts_past_int32_are_every_real_key(count, segmented):
    """num_sink and stat_tokens past the keys, up to 2^63 - 1 (what the checks take), are all of a
    row's (or segment's) real keys, as Lk is. Compared with the int32 count of real keys, 2^31
    wrapped to -2^31 (one sink key) and 2^32 + 1 to 1; added to int64 positions, 2^63 - 1 overflowed."""
    q, k, v = random_qkv(2, 2, 1, 6, 6, 8, torch.float32, "cpu")
    padding = torch.tensor([[0, 0, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    options = dict(window=1, key_padding_mask=padding)
    if segmented:
        options["segment_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    want = fp.sink_attention(q, k, v, num_sink=6, stat_tokens=6, **options)
    got = fp.sink_attention(q, k, v, num_sink=count, stat_tokens=count, **options)
    for name in ("out", "sink_mass"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=RTOL, atol=ATOL, msg=name)


# every config of a launch compiles anew on a GPU: float32 and one 16-bit type (they share configs)
CONFIG_DTYPES = [torch.float32, torch.bfloat16]


def triton_kernels(target, name):
    """fastprobe.kernels.<name> for a Triton target; other targets skip (configs are Triton's)."""
    if target[0] != "triton":
        pytest.skip("configs are the Triton kernel's")
    return importlib.import_module(f"fastprobe.kernels.{name}")


def check_every_config(monkeypatch, module, target, call, check, decode=False):
    """check(call()) once per prefill config (decode: per decode-split config, the split path
    taken from 16 keys on) that pruning keeps for the launch on this device, a failure naming
    the config: the autotuner may pick any of them, untuned runs test only the first (on an
    H200, one of them miscompiled with key groups, 2026-11-30). On CUDA each config runs as the
    only one (untuned); under the interpreter, which ignores warps and stages, each distinct
    tile of every config (pruned or not: the logic of each tile)."""
    configs_name, blocks_name = ("_SPLIT_CONFIGS", "_INTERPRET_SPLIT_BLOCKS") if decode else ("_FWD_CONFIGS", "_INTERPRET_FWD_BLOCKS")
    if decode:  # the split path for the interpreter's short caches too
        monkeypatch.setattr(importlib.import_module("fastprobe.kernels.attention"), "_DECODE_MIN_KEYS", 16)
    kept, launch = [], module._launch
    interpreted = target[1] != "cuda"

    def spy(kernel, tuned, configs, prune, grid, args, flags, interpret_blocks, prune_args, buckets=()):
        if configs is getattr(module, configs_name):
            kept[:] = configs if interpreted else prune(configs, prune_args, **flags)
        launch(kernel, tuned, configs, prune, grid, args, flags, interpret_blocks, prune_args, buckets)

    monkeypatch.setenv("FASTPROBE_AUTOTUNE", "0")
    monkeypatch.setattr(module, "_launch", spy)
    call()
    monkeypatch.setattr(module, "_launch", launch)
    assert kept, f"no {'decode' if decode else 'prefill'} launch"
    tiles = {}
    for cfg in kept:
        tiles.setdefault(tuple(sorted(cfg.kwargs.items())), cfg)
    for cfg in tiles.values() if interpreted else kept:
        monkeypatch.setattr(module, blocks_name if interpreted else configs_name, dict(cfg.kwargs) if interpreted else [cfg])
        try:
            check(call())
        except AssertionError as error:
            raise AssertionError(f"config {cfg.kwargs} warps={cfg.num_warps} stages={cfg.num_stages}: {error}") from None


@pytest.mark.parametrize("dtype", CONFIG_DTYPES, ids=str)
@pytest.mark.parametrize("config", ["key-groups", "key-group-runs", "everything"])
def test_every_prefill_config(monkeypatch, target, dtype, config):
    """Each prefill config pruning keeps (see check_every_config), with the statistics on."""
    kernels = triton_kernels(target, "attention")
    device = target[1]
    shapes = [(1, 2, 140, 140, 32)] if is_interpreter(target) else [(1, 4, 300, 300, 128), (2, 4, 150, 170, 64)]
    for batch, num_heads, num_queries, num_keys, head_dim in shapes:
        q, k, v = random_qkv(batch, num_heads, num_heads // 2, num_queries, num_keys, head_dim, dtype, device)
        options = make_options(config, batch, num_heads, num_keys, device)
        want = expected(q, k, v, **options)
        run = lambda: fp.sink_attention(q, k, v, return_entropy=True, **options)  # noqa: E731
        check_every_config(monkeypatch, kernels, target, run,
                           lambda result: assert_matches(result, want, dtype, "key_groups" in options, True))


@pytest.mark.parametrize("dtype", CONFIG_DTYPES, ids=str)
@pytest.mark.parametrize("config", ["key-group-runs", "everything"])
def test_every_decode_config(monkeypatch, target, dtype, config):
    """Each decode-split config pruning keeps (see check_every_config), one query against a long cache."""
    kernels = triton_kernels(target, "attention")
    device = target[1]
    num_keys, head_dim = (203, 16) if is_interpreter(target) else (3001, 64)
    q, k, v = random_qkv(2, 8, 2, 1, num_keys, head_dim, dtype, device)
    options = make_options(config, 2, 8, num_keys, device)
    want = expected(q, k, v, **options)
    run = lambda: fp.sink_attention(q, k, v, return_entropy=True, **options)  # noqa: E731
    check_every_config(monkeypatch, kernels, target, run,
                       lambda result: assert_matches(result, want, dtype, "key_groups" in options, True), decode=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", ["causal", "window+sinks", "left-padding", "key-group-runs", "everything"])
def test_decode_one_query(target, dtype, config):
    """Lq = 1 against a long cache (the decoding path), with and without masks."""
    _, device = target
    lengths = [70, 203] if is_interpreter(target) else [1, 517, 3001]
    head_dim = 16 if is_interpreter(target) else 64
    for num_keys in lengths:
        q, k, v = random_qkv(2, 8, 2, 1, num_keys, head_dim, dtype, device)
        options = make_options(config, 2, 8, num_keys, device)
        result = fp.sink_attention(q, k, v, return_entropy=True, **options)
        assert_matches(result, expected(q, k, v, **options), dtype, "key_groups" in options, True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value_dim", [13, 72], ids=["narrower-v", "wider-v"])
def test_value_head_dim_differs_from_query_head_dim(target, dtype, value_dim):
    """Multi-head latent attention (DeepSeek-V3: D = 192, Dv = 128): v may be narrower or wider
    than q and k. Prefill and decode, every option at once; scale defaults to D ** -0.5 of q."""
    _, device = target
    head_dim = 40
    for num_queries, num_keys in [(23, 23), (1, 61)] if is_interpreter(target) else [(77, 77), (1, 517)]:
        q, k, _ = random_qkv(2, 8, 2, num_queries, num_keys, head_dim, dtype, device)
        v = torch.randn(2, 2, num_keys, value_dim).to(device=device, dtype=dtype)
        options = make_options("everything", 2, 8, num_keys, device)
        result = fp.sink_attention(q, k, v, return_entropy=True, **options)
        assert result.out.shape == (2, 8, num_queries, value_dim)
        assert_matches(result, expected(q, k, v, **options), dtype, True, True)


def force_triton_split_keys(monkeypatch, family: str, op: str, splits: int) -> None:
    """The Triton backend for the test, its `family` launcher's `op` with keys split across
    `splits` programs (the decoding path) whatever the cache's length."""
    module = importlib.import_module(f"fastprobe.kernels.{family}")
    monkeypatch.setattr(module, op, functools.partial(getattr(module, op), split_keys=splits))
    fp.set_backend("triton")


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("entropy", [True, False], ids=["entropy", "no-entropy"])
def test_triton_split_key_decode_path(monkeypatch, dtype, splits, entropy):
    """The Triton decoding path (keys split across programs, then merged) forced on small
    caches, where the automatic choice would take the prefill kernel; with and without the
    entropy (the split and merge kernels' ENTROPY flag: without it, it was left to the fuzz's
    draws, tests/interpreter_flags.py found)."""
    force_triton_split_keys(monkeypatch, "attention", "sink_attention", splits)
    for (num_queries, num_keys), config in itertools.product([(1, 70), (2, 97)], ["everything", "chunks+left-padding"]):
        q, k, v = random_qkv(2, 8, 2, num_queries, num_keys, 16, dtype, "cpu")
        options = make_options(config, 2, 8, num_keys, "cpu")
        if num_queries == 2:  # the two queries in different segments: one program's rows start apart
            options["segment_ids"][:, -1] = options["segment_ids"].max() + 1
        result = fp.sink_attention(q, k, v, return_entropy=entropy, **options)
        assert_matches(result, expected(q, k, v, **options), dtype, "key_groups" in options, entropy)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_causal_equals_sdpa(target, dtype):
    _, device = target
    batch, num_heads, _, length, head_dim = prefill_shapes(target)[0]
    q, k, v = random_qkv(batch, num_heads, num_heads, length, length, head_dim, dtype, device)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    rtol, atol = OUT_TOLERANCE[dtype]
    torch.testing.assert_close(fp.sink_attention(q, k, v).out, want, rtol=rtol, atol=atol)


def test_reference_equals_masked_sdpa():
    """The reference's masks agree with SDPA given the same boolean mask (every config)."""
    batch, num_heads, length, head_dim = 2, 4, 23, 8
    q, k, v = random_qkv(batch, num_heads, num_heads, length, length, head_dim, torch.float64, "cpu")
    for config in CONFIGS:
        options = make_options(config, batch, num_heads, length, "cpu")
        if {"sink_logit", "head_mask"} & options.keys():
            continue
        real, sink, _ = reference.attention_key_masks(options.get("key_padding_mask"), batch, length, options.get("num_sink", 0), 1, "cpu",
                                                      options.get("segment_ids"))
        visible = reference.attention_visible(real, sink, length, options.get("causal", True), options.get("window"))
        blocks = options.get("bidirectional_blocks")
        if blocks is not None:  # a later key of the query's own block: visible if real and in the window
            for b, i, j in torch.nonzero((blocks[:, :, None] == blocks[:, None, :]) & (blocks >= 0)[:, :, None]).tolist():
                window = options.get("window")
                visible[b, i, j] |= j > i and bool(real[b, j]) and (window is None or j > i - window or bool(sink[b, j]))
        segments = options.get("segment_ids")
        if segments is not None:  # nothing crosses a segment's border, sink keys included
            for b, i, j in torch.nonzero(segments[:, :, None] != segments[:, None, :]).tolist():
                visible[b, i, j] = False
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None])
        want = torch.where(visible.any(-1)[:, None, :, None], want, torch.zeros_like(want))
        got = reference.sink_attention(q, k, v, **options)["out"]
        torch.testing.assert_close(got, want, msg=lambda m: f"{config}: {m}")


def test_fully_masked_rows(target):
    """Pruned heads, a row of all-padding keys and queries before a left-padded row's first real
    key get out 0, lse -inf, masses 0, entropy 0; a sink logit alone gives lse = sink logit."""
    _, device = target
    batch, num_heads, _, length, head_dim = prefill_shapes(target)[0]
    q, k, v = random_qkv(batch, num_heads, num_heads // 2, length, length, head_dim, torch.float32, device)
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask[0] = False  # nothing real in row 0
    mask[1, :5] = False  # left padding: queries 0..4 of row 1 see nothing (causal)
    head_mask = torch.ones(num_heads, dtype=torch.bool, device=device)
    head_mask[2] = False
    groups = torch.randint(0, 2, (batch, length), device=device)
    result = fp.sink_attention(q, k, v, key_padding_mask=mask, head_mask=head_mask, key_groups=groups, num_groups=2, return_entropy=True)
    empty = [result.out[0], result.out[1, :, :5], result.out[:, 2]]
    assert all(bool((part == 0).all()) for part in empty)
    for part in [result.lse[0], result.lse[1, :, :5], result.lse[:, 2]]:
        assert bool((part == float("-inf")).all())
    for field in ["sink_mass", "group_mass", "entropy"]:
        value = getattr(result, field)
        assert bool((value[0] == 0).all()) and bool((value[1, :, :5] == 0).all()) and bool((value[:, 2] == 0).all()), field
    assert torch.isfinite(result.lse[1, :, 5:][torch.arange(num_heads) != 2]).all()
    sinks = torch.randn(num_heads, device=device)
    with_sink = fp.sink_attention(q, k, v, key_padding_mask=mask, sink_logit=sinks)
    torch.testing.assert_close(with_sink.lse[0], sinks[:, None].expand(-1, length))
    assert bool((with_sink.out[0] == 0).all()) and bool((with_sink.sink_mass[0] == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_scores(target, dtype):
    """Scores of magnitude ~1e3 (q scaled by 100): no overflow, the softmax is near one-hot."""
    _, device = target
    batch, num_heads, num_queries, num_keys, head_dim = prefill_shapes(target)[0]
    q, k, v = random_qkv(batch, num_heads, num_heads // 2, num_queries, num_keys, head_dim, dtype, device, magnitude=100.0)
    options = make_options("everything", batch, num_heads, num_keys, device)
    result = fp.sink_attention(q, k, v, return_entropy=True, **options)
    # scores ~1e3 carry float32 rounding of ~1e-4 into every weight
    assert_matches(result, expected(q, k, v, **options), dtype, True, True, rtol=RTOL, atol=2e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_queries", [None, 1], ids=["prefill", "decode"])
def test_softcap(target, dtype, num_queries):
    """Gemma 2's logit soft cap c tanh(s / c), on scores of magnitude ~c and far beyond it."""
    _, device = target
    batch, num_heads, length, num_keys, head_dim = prefill_shapes(target)[0]
    q, k, v = random_qkv(batch, num_heads, num_heads // 2, num_queries or length, num_keys, head_dim, dtype, device, magnitude=10.0)
    options = dict(make_options("everything", batch, num_heads, num_keys, device), softcap=5.0)
    result = fp.sink_attention(q, k, v, return_entropy=True, **options)
    assert_matches(result, expected(q, k, v, **options), dtype, True, True)


def test_non_contiguous_inputs(target):
    """q, k, v as [B, H, L, D] views of [B, L, H, D] buffers (transformers' layout), a strided
    batch slice, and a head dim that is not contiguous (copied by the op)."""
    _, device = target
    batch, num_heads, length, _, head_dim = prefill_shapes(target)[0]
    q = torch.randn(batch * 2, length, num_heads, head_dim, device=device).transpose(1, 2)[::2]
    k = torch.randn(batch, length, num_heads // 2, head_dim, device=device).transpose(1, 2)
    v = torch.randn(batch, num_heads // 2, head_dim, length, device=device).transpose(2, 3)
    assert not q.is_contiguous() and v.stride(-1) != 1
    options = make_options("window+sinks", batch, num_heads, length, device)
    result = fp.sink_attention(q, k, v, **options)
    assert_matches(result, expected(q, k, v, **options), torch.float32, False, False)


def test_out_is_a_view_of_the_transformers_layout(target):
    _, device = target
    q, k, v = random_qkv(1, 4, 2, 9, 9, 16, torch.float32, device)
    out = fp.sink_attention(q, k, v).out
    assert out.shape == (1, 4, 9, 16) and out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("num_queries, num_keys, window", [(1, 200, 71), (256, 256, 127), (64, 256, 128)])
def test_key_at_the_window_distance_starting_a_block(target, num_queries, num_keys, window):
    """The key at distance exactly `window` (j = p - window) is outside the window even where it
    is the first key of a 64-key block wholly before the query: a block classed as all inside
    the window by >= instead of > let it into the softmax (out 2.65 off in the decode case)."""
    _, device = target
    if is_interpreter(target) and num_queries > 64:
        pytest.skip("a long prefill under the interpreter")
    q, k, v = random_qkv(1, 2, 1, num_queries, num_keys, 16, torch.float32, device)
    k[:, :, num_keys - 1 - window] *= 8  # that key would dominate any query it reached
    assert_matches(fp.sink_attention(q, k, v, window=window), expected(q, k, v, window=window), torch.float32,
                   False, False, **score_tolerance(q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sink_logit_in_the_inputs_dtype(target, dtype):
    """A 16-bit model (gpt-oss in bfloat16) passes its sink logits in its own dtype: the same
    result as the same values in float32 (the kernels read float32 sink logits)."""
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 6, 6, 16, dtype, device)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=dtype, device=device)
    got, want = fp.sink_attention(q, k, v, sink_logit=sinks), fp.sink_attention(q, k, v, sink_logit=sinks.float())
    assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
    assert torch.equal(got.sink_mass, want.sink_mass)


def test_pruned_heads_while_decoding_over_split_keys(target):
    """A pruned head of a decoding step over a long cache with few key-value heads (the C++
    kernel splits the keys across threads there) writes out 0, lse -inf and statistics 0 like any
    pruned head (poisoned outputs: NaN where a path left them)."""
    _, device = target
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = random_qkv(1, 4, 1, 1, 1024, 64, torch.float32, device)
        heads = torch.tensor([True, False, True, True], device=device)
        groups = torch.zeros(1, 1024, dtype=torch.long, device=device)
        options = dict(head_mask=heads, key_groups=groups, num_groups=1)
        result = fp.sink_attention(q, k, v, return_entropy=True, **options)
    finally:
        torch.set_num_threads(threads)
    assert_matches(result, expected(q, k, v, **options), torch.float32, True, True, **score_tolerance(q, k, v))
    assert (result.out[:, 1] == 0).all() and (result.lse[:, 1] == float("-inf")).all()


def test_inputs_untouched_and_outputs_fresh(target):
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 11, 11, 16, torch.float32, device)
    options = make_options("everything", 2, 4, 11, device)
    saved = [t.clone() for t in (q, k, v)] + [value.clone() for value in options.values() if isinstance(value, torch.Tensor)]
    first = fp.sink_attention(q, k, v, **options)
    after = [q, k, v] + [value for value in options.values() if isinstance(value, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(saved, after))
    second = fp.sink_attention(q, k, v, **options)
    assert first.out.data_ptr() != second.out.data_ptr()
    torch.testing.assert_close(first.out, second.out)


def test_empty_inputs(target):
    _, device = target
    q, k, v = random_qkv(0, 4, 2, 5, 5, 16, torch.float32, device)
    assert fp.sink_attention(q, k, v).out.shape == (0, 4, 5, 16)
    q, k, v = random_qkv(2, 4, 2, 0, 5, 16, torch.float32, device)
    result = fp.sink_attention(q, k, v, return_entropy=True)
    assert result.out.shape == (2, 4, 0, 16) and result.entropy.shape == (2, 4, 0)


@pytest.mark.parametrize("stat_tokens", [1, 3])
def test_no_keys_with_a_padding_mask(target, stat_tokens):
    """Lk = 0 (and so Lq = 0) with a [B, 0] key padding mask: empty outputs, not argmax's
    IndexError on an empty row from the mask's preparation."""
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 0, 0, 16, torch.float32, device)
    mask = torch.ones(2, 0, dtype=torch.bool, device=device)
    result = fp.sink_attention(q, k, v, key_padding_mask=mask, num_sink=2, stat_tokens=stat_tokens)
    assert result.out.shape == (2, 4, 0, 16) and result.sink_mass.shape == (2, 4, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("length", [1000, 4096])
def test_cuda_long_sequences(head_dim, length):
    """Real GPU shapes (block skipping across many blocks), bf16, window + sinks and padding."""
    q, k, v = random_qkv(2, 8, 2, length, length, head_dim, torch.bfloat16, "cuda")
    options = make_options("everything", 2, 8, length, "cuda")
    result = fp.sink_attention(q, k, v, return_entropy=True, **options)
    assert_matches(result, expected(q, k, v, **options), torch.bfloat16, True, True, atol=1e-4)


@pytest.mark.usefixtures("one_thread")  # two heads on one thread: one key range per head
@pytest.mark.parametrize("num_queries", [1, 8])  # the narrow (decoding) and the wide kernels
def test_cpu_output_over_2_pow_26_equal_keys(num_queries):
    """2^26 + 1 keys of one score and value 1 (expanded: nothing allocated): out must be 1. The
    running output once took each key's term alone and stopped growing at 2^24 of them, while
    the denominator took block sums: out was 0.5 (2^26 / Lk)."""
    length = 2**26 + 1
    q = torch.ones(1, 2, num_queries, 1)
    k = v = torch.ones(1, 1, 1, 1).expand(1, 2, length, 1)
    result = fp.sink_attention(q, k, v, causal=False)
    torch.testing.assert_close(result.out, torch.ones_like(q), rtol=1e-5, atol=0)
    torch.testing.assert_close(result.lse, torch.full((1, 2, num_queries), 1 + math.log(length)), rtol=1e-6, atol=0)


# The C++ kernels run vectors of 16 floats where the CPU has AVX-512 and of 8 elsewhere
# (csrc/attention_core.h); cpu_lanes runs each width here. Rows (query heads x queries of an
# item) and head dims that are no multiple of either, every register-tile remainder (head dims
# 1..17: value tiles of 6), and the narrow (decoding) kernels' padded head dims.
LANE_HEAD_DIMS = list(range(1, 18)) + [63, 65, 80, 96, 112, 128, 256]


def lane_case(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, config):
    """sink_attention with every statistic against the float64 reference (outputs poisoned)."""
    q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, "cpu")
    options = make_options(config, batch, heads, num_keys, "cpu")
    if "sink_logit" not in options:
        options["sink_logit"] = torch.randn(heads)
    result = fp.sink_attention(q, k, v, return_entropy=True, **options)
    assert_matches(result, expected(q, k, v, **options), dtype, "key_groups" in options, True, **score_tolerance(q, k, v))


@pytest.mark.parametrize("head_dim", LANE_HEAD_DIMS)
@pytest.mark.parametrize("dtype", CONFIG_DTYPES, ids=str)
def test_cpu_lane_widths_prefill(cpu_lanes, poisoned_outputs, dtype, head_dim):
    """Items of 37 rows (one head), 64 and 10 (GQA 2: 32 + 5 queries), 64 and 20 (GQA 4: 16 + 5),
    64 and 32 (GQA 2: 32 + 16) over a last key block of 11 (key tiles of 4 + 4 + 3, 6 + 5)."""
    lane_case(2, 3, 3, 37, 101, head_dim, dtype, "window+sinks")
    lane_case(2, 6, 3, 37, 101, head_dim, dtype, "everything")
    lane_case(1, 8, 2, 21, 70, head_dim, dtype, "key-group-runs")
    lane_case(1, 2, 1, 48, 75, head_dim, dtype, "bidirectional")


@pytest.mark.parametrize("head_dim", LANE_HEAD_DIMS)
@pytest.mark.parametrize("dtype", CONFIG_DTYPES, ids=str)
def test_cpu_lane_widths_decode(cpu_lanes, poisoned_outputs, dtype, head_dim):
    """One query per head (the narrow kernels: 1 row, and 4 with GQA 4), and 3 queries of GQA 2
    (6 rows, the wide kernels), then a long cache on 2 threads: its keys split across them."""
    lane_case(1, 4, 4, 1, 300, head_dim, dtype, "window+sinks")
    lane_case(2, 8, 2, 1, 517, head_dim, dtype, "everything")
    lane_case(1, 4, 2, 3, 150, head_dim, dtype, "left-padding")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lane_case(1, 4, 1, 1, 3001, head_dim, dtype, "window+sinks")
        lane_case(1, 2, 1, 5, 2000, head_dim, dtype, "sink-logit")
    finally:
        torch.set_num_threads(threads)


# bfloat16 at 16 lanes on a CPU with AVX512-BF16 scores Q K^T by bf16 pairs along the head dim
# (csrc/attention_core.h); cpu_bf16_pairs runs that and the float32 scores on the same inputs.
# Odd head dims (a pair padded with 0: wide items copy K), even ones (K read in place), dims that
# are no multiple of 32 (narrow items mask the rest of the last vector), items of 1 to 4 rows
# (narrow: decoding) and wider.
PAIR_HEAD_DIMS = [1, 2, 5, 16, 17, 31, 33, 63, 64, 65, 80, 96, 127, 128, 129]


def pair_case(batch, heads, kv_heads, num_queries, num_keys, head_dim, config, **extra):
    q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, torch.bfloat16, "cpu")
    options = {**make_options(config, batch, heads, num_keys, "cpu"), **extra}
    result = fp.sink_attention(q, k, v, return_entropy=True, **options)
    assert_matches(result, expected(q, k, v, **options), torch.bfloat16, "key_groups" in options, True,
                   **score_tolerance(q, k, v, options.get("scale")))


@pytest.mark.parametrize("head_dim", PAIR_HEAD_DIMS)
def test_cpu_bf16_pair_scores(cpu_bf16_pairs, poisoned_outputs, head_dim):
    """Items of 37 rows (MHA), 64 and 10 (GQA 2), 64 and 20 (GQA 4); windows, sinks, padded keys
    (left padding: rows that see no key, -inf everywhere), segments, image blocks, head masks, a
    soft cap, a scale above 1; narrow items of 1 (MHA decoding), 2, 3 and 4 rows (GQA decoding, two
    queries of GQA 2); decoding and a cache split over 2 threads."""
    pair_case(2, 3, 3, 37, 101, head_dim, "window+sinks")
    pair_case(2, 6, 3, 37, 101, head_dim, "everything")
    pair_case(1, 8, 2, 21, 70, head_dim, "key-group-runs")
    pair_case(2, 2, 1, 48, 75, head_dim, "bidirectional-padding")
    pair_case(2, 4, 2, 40, 130, head_dim, "left-padding")
    pair_case(2, 4, 4, 33, 90, head_dim, "chunks+left-padding", softcap=5.0)
    pair_case(1, 4, 2, 29, 67, head_dim, "segments+image-blocks+window", scale=1.7)
    pair_case(1, 4, 1, 1, 300, head_dim, "sink-logit")
    pair_case(2, 3, 3, 1, 150, head_dim, "window+sinks")
    pair_case(2, 4, 2, 1, 101, head_dim, "everything")
    pair_case(1, 6, 2, 1, 90, head_dim, "left-padding")
    pair_case(1, 2, 1, 2, 77, head_dim, "segments+image-blocks+window", scale=1.7)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pair_case(1, 2, 1, 5, 2000, head_dim, "window+sinks")
        pair_case(1, 4, 2, 1, 2000, head_dim, "key-group-runs")
    finally:
        torch.set_num_threads(threads)


def one_hot_pair_scores(num_queries, num_keys, head_dim, q_first, k_first):
    """bf16 q and k with q[..., 0] = q_first (and small others) and k[..., 0] = k_first [Lk]."""
    q = (torch.randn(2, 4, num_queries, head_dim) * 0.01).bfloat16()
    q[..., 0] = q_first
    k = (torch.randn(2, 2, num_keys, head_dim) * 0.01).bfloat16()
    k[..., 0] = torch.as_tensor(k_first, dtype=torch.float32).bfloat16()
    return q, k, torch.randn(2, 2, num_keys, head_dim).bfloat16()


@pytest.mark.parametrize("num_queries", [70, 1], ids=["wide", "narrow"])
@pytest.mark.parametrize("head_dim", [16, 33])
def test_cpu_bf16_pair_scores_extremes(cpu_bf16_pairs, poisoned_outputs, head_dim, num_queries):
    """Inputs where the bf16 pair dot product would go wrong, so the kernels score them in float32:
    q . k past float max where scale q . k is not (the block's scores taken again), subnormal q
    (which VDPBF16PS reads as 0) against keys near bf16's max; and a large scale on tiny keys
    (float32 scores too); items of 70 rows and narrow ones (decoding, 2 rows). Without the fallbacks
    the first gave NaN, the second lse 0.07 off."""
    num_keys = 150
    # a thread that flushes subnormals (FTZ / DAZ, which some compiled CPU code turns on) reads
    # the subnormal q as 0 in float32 as well
    flushes = (torch.tensor([2.0**-130]) * 1.0).item() == 0.0
    steps = 1.0 + torch.arange(num_keys, dtype=torch.float32) / 64
    cases = [
        # q . k = +-2^129 (1 + j / 64): overflows; times 2^-8 it does not (one-hot softmax)
        (one_hot_pair_scores(num_queries, num_keys, head_dim, 2.0**40, 2.0**89 * steps * torch.randn(num_keys).sign()),
         dict(scale=2.0**-8, causal=False)),
        # q_0 = 2^-130 (subnormal) times keys 2^125 (1 + j / 64): scores 2^-5 (1 + j / 64)
        *([] if flushes else [
            (one_hot_pair_scores(num_queries, num_keys, head_dim, 2.0**-130, 2.0**125 * steps), dict(scale=1.0))]),
        # keys +-2^-125 and queries 1..4 at scale 2^100: scores O(1), products normal in float32
        ((torch.randint(1, 5, (2, 4, num_queries, head_dim)).bfloat16(),
          (torch.randn(2, 2, num_keys, head_dim).sign() * 2.0**-125).bfloat16(),
          torch.randn(2, 2, num_keys, head_dim).bfloat16()), dict(scale=2.0**100, num_sink=1)),
    ]
    for (q, k, v), options in cases:
        result = fp.sink_attention(q, k, v, return_entropy=True, **options)
        want = expected(q, k, v, **options)
        assert_matches(result, want, torch.bfloat16, False, True, rtol=RTOL, atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(
    length=st.integers(1, 40),
    num_sink=st.integers(0, 4),
    window=st.one_of(st.none(), st.integers(1, 12)),
    causal=st.booleans(),
    with_sink_logit=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_properties(length, num_sink, window, causal, with_sink_logit, seed):
    """Masses in [0, 1]; group masses add up to the keys' share 1 - p_sink (0 for an empty row);
    0 <= entropy <= log(visible keys + sink)."""
    generator = torch.Generator().manual_seed(seed)
    q = 3 * torch.randn(1, 2, length, 8, generator=generator)
    k = torch.randn(1, 1, length, 8, generator=generator)
    v = torch.randn(1, 1, length, 8, generator=generator)
    groups = torch.randint(0, 3, (1, length), generator=generator)
    sink_logit = torch.randn(2, generator=generator) if with_sink_logit else None
    result = fp.sink_attention(
        q, k, v, causal=causal, window=window, num_sink=num_sink, sink_logit=sink_logit,
        key_groups=groups, num_groups=3, return_entropy=True,
    )
    assert bool(((result.sink_mass >= 0) & (result.sink_mass <= 1 + 1e-6)).all())
    keys_share = torch.ones_like(result.lse) if sink_logit is None else 1 - torch.exp(sink_logit[None, :, None] - result.lse)
    torch.testing.assert_close(result.group_mass.sum(-1), keys_share, rtol=1e-5, atol=1e-5)
    real, sink, _ = reference.attention_key_masks(None, 1, length, num_sink, 1, "cpu")
    visible = reference.attention_visible(real, sink, length, causal, window).sum(-1)[:, None]  # [1, 1, Lq]
    bound = torch.log(visible.double() + (sink_logit is not None))
    assert bool((result.entropy >= -1e-6).all()) and bool((result.entropy.double() <= bound + 1e-5).all())


def bad_cases():
    q, k, v = random_qkv(2, 4, 2, 5, 7, 8, torch.float32, "cpu")
    return [
        ("q must be a torch.Tensor", (q.numpy(), k, v), {}),
        ("q must have shape", (q[0], k, v), {}),
        ("q, k and v must share one dtype", (q, k.double(), v), {}),
        ("must agree on B, Hkv and Lk", (q, k, v[:, :, :6]), {}),
        ("need head dims >= 1", (q, k, v[..., :0]), {}),
        ("multiple of the number of key/value heads", (q, k[:, :1].expand(2, 3, 7, 8), v[:, :1].expand(2, 3, 7, 8)), {}),
        ("k and v need at least one key/value head, got k of shape (2, 0, 7, 8)", (q[:, :0], k[:, :0], v[:, :0]), {}),
        ("head dim", (q, k[..., :4], v[..., :4]), {}),
        ("batch size", (q, k[:1], v[:1]), {}),
        ("Lq <= Lk", (q, k[:, :, :3], v[:, :, :3]), {}),
        ("window must be >= 1", (q, k, v), {"window": 0}),
        ("window must be an integer", (q, k, v), {"window": 2.5}),
        ("num_sink must be >= 0", (q, k, v), {"num_sink": -1}),
        ("stat_tokens must be >= 0", (q, k, v), {"stat_tokens": -2}),
        ("scale must be a positive number", (q, k, v), {"scale": float("nan")}),
        ("scale must be a positive number", (q, k, v), {"scale": -1.0}),
        ("causal must be a bool", (q, k, v), {"causal": 1}),
        ("key_padding_mask must have shape", (q, k, v), {"key_padding_mask": torch.ones(2, 6, dtype=torch.bool)}),
        ("key_padding_mask must hold only 0/1", (q, k, v), {"key_padding_mask": torch.full((2, 7), 2)}),
        ("key_padding_mask must be a boolean or integer", (q, k, v), {"key_padding_mask": torch.ones(2, 7)}),
        ("head_mask must have shape", (q, k, v), {"head_mask": torch.ones(3, dtype=torch.bool)}),
        ("sink_logit must have shape", (q, k, v), {"sink_logit": torch.zeros(2)}),
        ("sink_logit must be a floating-point", (q, k, v), {"sink_logit": torch.zeros(4, dtype=torch.long)}),
        ("key_groups must hold ids in [0, num_groups = 3)", (q, k, v), {"key_groups": torch.full((2, 7), 3), "num_groups": 3}),
        ("key_groups must hold ids", (q, k, v), {"key_groups": torch.full((2, 7), -1)}),
        ("key_groups must have shape", (q, k, v), {"key_groups": torch.zeros(2, 5, dtype=torch.long), "num_groups": 2}),
        ("key_groups must be an integer tensor", (q, k, v), {"key_groups": torch.zeros(2, 7), "num_groups": 2}),
        ("bidirectional_blocks must be an integer tensor", (q, k, v), {"bidirectional_blocks": torch.zeros(2, 7)}),
        ("bidirectional_blocks must be an integer tensor", (q, k, v), {"bidirectional_blocks": torch.ones(2, 7, dtype=torch.bool)}),
        ("bidirectional_blocks must be an integer tensor of shape [B, Lk]", (q, k, v), {"bidirectional_blocks": [[0] * 7] * 2}),
        ("bidirectional_blocks must have shape [B, Lk] = [2, 7]", (q, k, v), {"bidirectional_blocks": torch.zeros(2, 5, dtype=torch.long)}),
        # queries are positions 2..6: block 1 at 3 and again at 5 would let query 3 see key 5 but not 4
        ("block id 1 of row 1 resumes after other tokens", (q, k, v),
         {"bidirectional_blocks": torch.tensor([[0, 0, 0, -1, -1, -1, -1], [-1, -1, -1, 1, -1, 1, -1]])}),
        ("block id 0 of row 0 resumes", (q, k, v),
         {"bidirectional_blocks": torch.tensor([[-1, 0, 0, 7, 0, -1, -1], [-1] * 7])}),
        ("segment_ids must be an integer tensor", (q, k, v), {"segment_ids": torch.zeros(2, 7)}),
        ("segment_ids must be an integer tensor", (q, k, v), {"segment_ids": torch.ones(2, 7, dtype=torch.bool)}),
        ("segment_ids must have shape [B, Lk] = [2, 7]", (q, k, v), {"segment_ids": torch.zeros(2, 6, dtype=torch.long)}),
        # segment 4 of row 1 comes back after segment 9: a query in it would see keys across a gap
        ("segment id 4 of row 1 resumes after other tokens", (q, k, v),
         {"segment_ids": torch.tensor([[0] * 7, [4, 4, 9, 9, 4, 4, 4]])}),
        ("segment_ids is a SegmentSpans whose start is not a contiguous int64", (q, k, v),
         {"segment_ids": fp.ops.attention.SegmentSpans(torch.zeros(2, 7, dtype=torch.int32), torch.zeros(2, 7, dtype=torch.long))}),
        ("num_groups was given without key_groups", (q, k, v), {"num_groups": 2}),
        ("num_groups must be >= 1", (q, k, v), {"key_groups": torch.zeros(2, 7, dtype=torch.long), "num_groups": 0}),
        # (the C++ kernel refused more after group_mass [B, Hq, Lq, G] was allocated; the reference ran)
        ("num_groups must fit the kernels' int32 group ids", (q, k, v),
         {"key_groups": torch.zeros(2, 7, dtype=torch.long), "num_groups": 2**31}),
        ("key_groups.num_groups must fit the kernels' int32 group ids", (q, k, v),
         {"key_groups": fp.ops.attention.KeyGroups(torch.zeros(2, 7, dtype=torch.int32), 2**31)}),
        ("return_entropy must be a bool", (q, k, v), {"return_entropy": "yes"}),
        ("softcap must be a positive number in float32's range", (q, k, v), {"softcap": 0.0}),
        ("scale must be a positive number in float32's range", (q, k, v), {"scale": 1e39}),
        ("window must be < 2**63", (q, k, v), {"window": 2**63}),
        ("softcap must be a positive number", (q, k, v), {"softcap": "30"}),
        ("made for num_sink=0, stat_tokens=1, but this call has num_sink=2",
         (q, k, v), {"key_padding_mask": key_masks(torch.ones(2, 7, dtype=torch.bool), 2, 7), "num_sink": 2}),
        ("made for Lk = 6 keys, but this call has Lk = 7", (q, k, v),
         {"key_padding_mask": key_masks(torch.ones(2, 6, dtype=torch.bool), 2, 6)}),
        ("whose key_real has shape (2, 6)", (q, k, v),
         {"key_padding_mask": key_masks(torch.ones(2, 6, dtype=torch.bool), 2, 6)._replace(num_keys=None)}),
        ("whose sink_end has shape (1,)", (q, k, v), {"key_padding_mask": key_masks(None, 1, 7, device="cpu")}),
        ("whose stat_end is not a contiguous torch.int64", (q, k, v),
         {"key_padding_mask": key_masks(None, 2, 7, device="cpu")._replace(stat_end=torch.ones(2, dtype=torch.int32))}),
        ("whose key_real is not a contiguous torch.uint8", (q, k, v),
         {"key_padding_mask": key_masks(None, 2, 7, device="cpu")._replace(key_real=torch.ones(2, 7, dtype=torch.bool))}),
        ("whose sink_end is a list", (q, k, v),
         {"key_padding_mask": key_masks(None, 2, 7, device="cpu")._replace(sink_end=[0, 0])}),
        # (found by line coverage: checks the suite never ran)
        ("KeyMasks made without segments, but this call has segment_ids", (q, k, v),
         {"key_padding_mask": key_masks(torch.ones(2, 7, dtype=torch.bool), 2, 7),
          "segment_ids": torch.zeros(2, 7, dtype=torch.long)}),
        ("KeyMasks made for segments, but this call has no segment_ids", (q, k, v),
         {"key_padding_mask": key_masks(torch.ones(2, 7, dtype=torch.bool), 2, 7,
                                        segment_ids=torch.zeros(2, 7, dtype=torch.long))}),
        ("key_padding_mask.sink_end is on meta but q is on cpu", (q, k, v),
         {"key_padding_mask": key_masks(None, 2, 7, device="cpu")._replace(sink_end=torch.zeros(2, dtype=torch.long, device="meta"))}),
        ("scale must be a positive number or None, got str", (q, k, v), {"scale": "0.1"}),
        ("scale must be a positive number or None, got bool", (q, k, v), {"scale": True}),
        ("key_padding_mask must be a boolean tensor of shape [B, Lk], got list", (q, k, v), {"key_padding_mask": [[1] * 7] * 2}),
        ("k is on meta but q is on cpu", (q, k.to("meta"), v), {}),
        ("v is on meta but q is on cpu", (q, k, v.to("meta")), {}),
        ("key_groups is a KeyGroups whose ids is a list, not a tensor", (q, k, v),
         {"key_groups": fp.ops.attention.KeyGroups([[0] * 7] * 2, 1)}),
    ]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_window_wider_than_any_distance_is_no_window(target, causal):
    """A window of 2^31 - 1 (a common "no window" value) hides nothing: p + window must not
    overflow int32 in a kernel."""
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 9, 23, 16, torch.float32, device)
    want = fp.sink_attention(q, k, v, causal=causal, num_sink=2)
    for window in (2**31 - 1, 2**31 - 5, 2**40):
        got = fp.sink_attention(q, k, v, causal=causal, num_sink=2, window=window)
        for name in ("out", "lse", "sink_mass"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("num_queries", [9, 1], ids=["prefill", "decode"])
def test_nan_scores_give_nan_statistics_not_an_empty_rows(target, num_queries):
    """A query that sees a key with +inf entries (NaN / inf scores) gets NaN out, lse, sink_mass
    and entropy in every backend, as in the reference: never the values of a row with nothing to
    attend to (lse -inf, masses 0), which would hide bad input. Queries before that key are
    untouched."""
    _, device = target
    q, k, v = random_qkv(1, 4, 2, num_queries, 9, 16, torch.float32, device)
    k[0, 1, 6] = float("inf")  # heads 2, 3 (kv head 1), key 6: seen by positions >= 6
    got = fp.sink_attention(q, k, v, num_sink=1, return_entropy=True)
    want = expected(q, k, v, num_sink=1)
    sees = torch.zeros(1, 4, num_queries, dtype=torch.bool)
    sees[0, 2:, torch.arange(9 - num_queries, 9) >= 6] = True
    for name in ("lse", "sink_mass", "entropy"):
        value = getattr(got, name).cpu().double()
        assert value[sees].isnan().all() and want[name][sees].isnan().all(), name
        torch.testing.assert_close(value[~sees], want[name][~sees], rtol=RTOL, atol=ATOL, msg=name)
    out = got.out.cpu().double()
    assert out[sees].isnan().all() and not out[~sees].isnan().any()
    torch.testing.assert_close(out[~sees], want["out"][~sees], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_queries", [9, 1], ids=["prefill", "decode"])
def test_non_finite_sink_logit_gives_nan_outputs_for_its_head(target, num_queries):
    """sink_logit +inf or NaN (documented: NaN outputs) gives NaN out, lse, sink_mass and
    entropy for every query of that head in every backend and in the reference (whose
    logsumexp alone gives lse +inf for +inf); the other heads, one with a -inf sink logit (no
    sink), are as without the bad ones."""
    _, device = target
    q, k, v = random_qkv(1, 4, 2, num_queries, 9, 16, torch.float32, device)
    sink_logit = torch.tensor([float("inf"), float("nan"), 0.5, float("-inf")], device=device)
    got = fp.sink_attention(q, k, v, sink_logit=sink_logit, return_entropy=True)
    want = expected(q, k, v, sink_logit=sink_logit)
    for name in ("out", "lse", "sink_mass", "entropy"):
        value = getattr(got, name).cpu().double()
        assert value[:, :2].isnan().all() and want[name][:, :2].isnan().all(), name
        tolerance = dict(rtol=1e-4, atol=1e-5) if name == "out" else dict(rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(value[:, 2:], want[name][:, 2:], msg=name, **tolerance)


def test_head_dim_one_with_any_stride(target):
    """D = 1 views keep whatever stride their parent had along D (torch calls them contiguous
    either way); the kernels never step it."""
    _, device = target
    q, k, v = (x[..., ::2] for x in random_qkv(1, 2, 1, 5, 7, 2, torch.float32, device))
    assert q.stride(-1) == 2
    got = fp.sink_attention(q, k, v)
    assert_matches(got, expected(q, k, v), torch.float32, False, False)
    drop = torch.zeros(1, 7, dtype=torch.bool, device=device)
    drop[0, 2:4] = True
    out = fp.dual_path_attention(q, k, v, drop, gamma=0.5)
    torch.testing.assert_close(out.cpu().double(), reference.dual_path_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), drop.cpu(), gamma=0.5)["out"], rtol=RTOL, atol=ATOL)


def test_hand_made_key_masks_ends_are_clamped(target):
    """Sink / statistics ends past Lk (or negative) in a hand-made KeyMasks act as Lk (or 0),
    never as wrapped int32 values."""
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 9, 23, 16, torch.float32, device)
    masks = key_masks(None, 2, 23, num_sink=2, stat_tokens=1, device=device)
    wide = masks._replace(sink_end=torch.tensor([2**32 + 1, 23], device=device),
                          stat_end=torch.tensor([-(2**32), 2**33], device=device))
    clamped = masks._replace(sink_end=torch.tensor([23, 23], device=device), stat_end=torch.tensor([0, 23], device=device))
    got = fp.sink_attention(q, k, v, key_padding_mask=wide, num_sink=2, window=4)
    want = fp.sink_attention(q, k, v, key_padding_mask=clamped, num_sink=2, window=4)
    for name in ("out", "lse", "sink_mass"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def q_device(device: str) -> torch.device:
    """The device of a tensor made on `device` ("cuda" gets the current index)."""
    return torch.empty(0, device=device).device


def test_key_ends_without_padding_are_made_once(target):
    """A call without a padding mask reuses one constant key-ends tensor per (B, end, device);
    the results stay those of the reference in and out of inference mode, for every batch size.
    key_masks(None, ...) hands out copies: writing into them leaves later unmasked calls alone
    (it gave them the shared ends, so one caller's write changed every later call's sinks)."""
    from fastprobe.ops import attention as attention_ops

    _, device = target
    shared = attention_ops._constant_key_masks
    for batch in (1, 3):
        masks, again = (shared(batch, 9, 2, 1, q_device(device)) for _ in range(2))
        assert masks.sink_end is again.sink_end and masks.stat_end is again.stat_end
        # the KeyMasks itself is kept, one lookup a call, also for a decoding step's longer keys
        assert masks is shared(batch, 10, 2, 1, q_device(device))
        assert masks.sink_end.tolist() == [2] * batch and masks.stat_end.tolist() == [1] * batch
        q, k, v = random_qkv(batch, 2, 2, 7, 9, 16, torch.float32, device)
        want = expected(q, k, v, num_sink=2, window=3)
        with torch.inference_mode():
            assert_matches(fp.sink_attention(q, k, v, num_sink=2, window=3), want, torch.float32, False, False)
        assert_matches(fp.sink_attention(q, k, v, num_sink=2, window=3), want, torch.float32, False, False)
        own = key_masks(None, batch, 9, num_sink=2, stat_tokens=1, device=device)
        assert own.sink_end is not masks.sink_end and own.stat_end is not masks.stat_end
        assert own.sink_end.tolist() == [2] * batch and own.num_keys == 9
        own.sink_end.fill_(0), own.stat_end.fill_(5)
        assert_matches(fp.sink_attention(q, k, v, num_sink=2, window=3), want, torch.float32, False, False)
    assert attention_ops._constant_ends(1, 2, device) is not attention_ops._constant_ends(1, 3, device)


def test_key_ends_made_under_fake_tensors_are_not_kept():
    """Key ends made under a dispatch mode (fake tensors, as torch.compile and opcheck use) are
    made fresh and not reused by later real calls."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastprobe.ops.attention import _constant_key_masks

    with FakeTensorMode():
        fake = _constant_key_masks(7, 9, 2, 1, "cpu")
    real = _constant_key_masks(7, 9, 2, 1, "cpu")
    assert real.sink_end is not fake.sink_end and type(real.sink_end) is torch.Tensor
    assert real.sink_end.tolist() == [2] * 7
    assert _constant_key_masks(7, 9, 2, 1, torch.device("cpu")) is real  # kept now
    with FakeTensorMode():  # and the kept one is not handed to fake-tensor code
        assert type(_constant_key_masks(7, 9, 2, 1, torch.device("cpu")).sink_end) is not torch.Tensor


def test_constant_key_masks_stay_bounded_when_num_sink_exceeds_the_keys():
    """A sweep of num_sink (or stat_tokens) past Lk needs no new key ends, only new KeyMasks: their
    cache has its own bound (it grew by one entry, ~270 bytes, per value)."""
    from fastprobe.ops import attention

    q, k, v = torch.randn(3, 1, 2, 4, 8)
    for num_sink in range(1, 600):
        fp.sink_attention(q, k, v, num_sink=num_sink)
    assert len(attention._CONSTANT_MASKS) <= 256


def test_constant_tensors_stay_bounded_over_many_batch_sizes(monkeypatch):
    """A sweep of batch sizes makes new key ends for each: the kept constants are emptied when
    full (the KeyMasks built on them with them), and each call still has its own batch's ends."""
    from fastprobe.ops import attention

    monkeypatch.setattr(attention, "_KEPT_AT_MOST", 4)
    monkeypatch.setattr(attention, "_CONSTANTS", {})
    monkeypatch.setattr(attention, "_CONSTANT_MASKS", {})
    for batch in range(1, 12):
        q, k, v = torch.randn(3, batch, 2, 3, 8)
        got = fp.sink_attention(q, k, v, num_sink=2)
        want = reference.sink_attention(q.double(), k.double(), v.double(), num_sink=2)
        torch.testing.assert_close(got.sink_mass.double(), want["sink_mass"], rtol=RTOL, atol=ATOL)
        assert len(attention._CONSTANTS) <= 4 and len(attention._CONSTANT_MASKS) <= 4
    assert not any(key[1] == 1 for key in attention._CONSTANTS)  # the first batch's ends are gone


def test_key_masks_are_used_only_for_their_keys(target):
    """A KeyMasks made without padding carries the Lk it was made for: one made for 6 keys with
    num_sink=10 holds ends clamped to 6, and a call with 100 keys is refused by name (it ran with
    6 sink keys instead of 10); with the same Lk it gives what the tensor mask (None) gives."""
    _, device = target
    q, k, v = random_qkv(1, 2, 2, 4, 100, 16, torch.float32, device)
    with pytest.raises(ValueError, match="made for Lk = 6 keys, but this call has Lk = 100"):
        fp.sink_attention(q, k, v, num_sink=10, window=5,
                          key_padding_mask=key_masks(None, 1, 6, num_sink=10, stat_tokens=1, device=device))
    got = fp.sink_attention(q, k, v, num_sink=10, window=5,
                            key_padding_mask=key_masks(None, 1, 100, num_sink=10, stat_tokens=1, device=device))
    want = fp.sink_attention(q, k, v, num_sink=10, window=5)
    assert torch.equal(got.out, want.out) and torch.equal(got.sink_mass, want.sink_mass)


def test_a_bool_mask_is_read_by_its_bytes(target):
    """A bool mask whose bytes are not all 0 / 1 (view(torch.bool) of other bytes): any nonzero
    byte is a real key, in the kernels and in where the sinks end (a byte of 2 counted as 2 real
    keys put the first-token statistic on the wrong key)."""
    _, device = target
    q, k, v = random_qkv(2, 2, 1, 6, 6, 8, torch.float32, device)
    bytes_ = torch.tensor([[1, 2, 1, 1, 3, 1], [0, 0, 2, 1, 0, 5]], dtype=torch.uint8, device=device)
    for options in (dict(), dict(num_sink=2, window=2, stat_tokens=2)):
        got = fp.sink_attention(q, k, v, key_padding_mask=bytes_.view(torch.bool), **options)
        assert_matches(got, expected(q, k, v, key_padding_mask=bytes_ != 0, **options), torch.float32, False, False)


@pytest.mark.gpu
def test_key_ends_first_made_inside_a_cuda_graph_capture():
    """A call whose constant key ends do not exist yet, captured in a CUDA graph: they are made
    fresh there (filled only at replay) and not kept, so later eager calls get filled ones."""
    batch = 5  # a batch size no other test uses, so its key ends are made inside the capture
    q, k, v = random_qkv(batch, 4, 2, 33, 33, 64, torch.bfloat16, "cuda")
    fp.sink_attention(q[:1], k[:1], v[:1])  # compiled (and tuned) outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = fp.sink_attention(q, k, v, num_sink=7, stat_tokens=3)
    graph.replay()
    torch.cuda.synchronize()
    want = expected(q, k, v, num_sink=7, stat_tokens=3)
    assert_matches(captured, want, torch.bfloat16, False, False)
    assert_matches(fp.sink_attention(q, k, v, num_sink=7, stat_tokens=3), want, torch.bfloat16, False, False)


@pytest.mark.parametrize("num_sink,stat_tokens", [(0, 1), (3, 2), (0, 0)])
@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_reused_key_masks_give_the_same_result(target, num_sink, stat_tokens, side):
    """A KeyMasks made once (as the layers of one forward share it) gives exactly what the
    tensor mask gives, call after call."""
    _, device = target
    q, k, v = random_qkv(3, 4, 2, 9, 23, 16, torch.float32, device)
    mask = None if side == "none" else padding_mask(3, 23, side, device)
    options = dict(num_sink=num_sink, stat_tokens=stat_tokens, window=5)
    masks = key_masks(mask, 3, 23, num_sink=num_sink, stat_tokens=stat_tokens, device=device)
    want = fp.sink_attention(q, k, v, key_padding_mask=mask, **options)
    for _ in range(2):
        got = fp.sink_attention(q, k, v, key_padding_mask=masks, **options)
        for name in ("out", "lse", "sink_mass"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_reused_block_horizon_gives_the_same_result(target):
    """A BlockHorizon made once (block_horizon) serves calls with its keys and up to its queries,
    with the results of the block ids themselves; one checked for fewer queries, or malformed, is
    refused."""
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 37, 37, 16, torch.float32, device)
    blocks = image_blocks(2, 37, device)
    prepared = fp.ops.attention.block_horizon(blocks, 37)
    for num_queries in (37, 3):
        want = fp.sink_attention(q[:, :, -num_queries:], k, v, bidirectional_blocks=blocks, window=9)
        got = fp.sink_attention(q[:, :, -num_queries:], k, v, bidirectional_blocks=prepared, window=9)
        assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
    with pytest.raises(ValueError, match="checked for 3 queries"):
        fp.sink_attention(q, k, v, bidirectional_blocks=fp.ops.attention.block_horizon(blocks, 3))
    with pytest.raises(ValueError, match="not a contiguous int64 tensor"):
        fp.sink_attention(q, k, v, bidirectional_blocks=prepared._replace(horizon=prepared.horizon.int()))
    with pytest.raises(ValueError, match="resumes"):  # checked when made
        fp.ops.attention.block_horizon(torch.tensor([[0, -1, 0]]), 3)
    with pytest.raises(ValueError, match=r"bidirectional_blocks must have shape \[B, Lk\], got \(3,\)"):
        fp.ops.attention.block_horizon(torch.tensor([0, -1, 0]), 3)
    with pytest.raises(ValueError, match=r"num_queries \(4\) must be <= Lk \(3\)"):
        fp.ops.attention.block_horizon(torch.tensor([[0, 0, -1]]), 4)


@pytest.mark.parametrize("batch, num_keys", [(0, 5), (2, 0)], ids=["B=0", "Lk=0"])
def test_a_block_horizon_of_no_keys_is_taken(batch, num_keys):
    """block_horizon of an empty [B, Lk] (no batch, or no keys) holds no horizon (None), and a call
    that reuses it runs as one with the empty block ids themselves."""
    blocks = torch.zeros(batch, num_keys, dtype=torch.long)
    prepared = fp.ops.attention.block_horizon(blocks, num_keys)
    assert prepared.horizon is None
    q, k, v = random_qkv(batch, 4, 2, num_keys, num_keys, 8, torch.float32, "cpu")
    got = fp.sink_attention(q, k, v, bidirectional_blocks=prepared)
    want = fp.sink_attention(q, k, v, bidirectional_blocks=blocks)
    assert got.out.shape == want.out.shape == (batch, 4, num_keys, 8) and got.lse.shape == want.lse.shape


def test_a_block_resuming_before_the_first_query_is_taken():
    """A block must be one run from the first query on only: before it (cached keys, which the
    queries see causally anyway) its id may resume after other tokens, e.g. a decoding step's."""
    blocks = torch.tensor([[0, 0, -1, 0, 1, 1]])
    with pytest.raises(ValueError, match="block id 0 of row 0 resumes"):
        fp.ops.attention.block_horizon(blocks, 6)
    assert fp.ops.attention.block_horizon(blocks, 3).horizon.tolist() == [[1, 1, 2, 3, 5, 5]]
    q, k, v = random_qkv(1, 2, 2, 3, 6, 8, torch.float32, "cpu")
    got = fp.sink_attention(q, k, v, bidirectional_blocks=blocks)
    want = fp.sink_attention(q, k, v, bidirectional_blocks=torch.tensor([[0, 0, -1, 2, 1, 1]]))
    torch.testing.assert_close(got.out, want.out)


def test_prepared_key_groups_give_the_same_result(target):
    """KeyGroups made once (prepare_key_groups) give exactly what the ids give, at one call's
    keys and with num_groups inferred or repeated; bad ids are refused when it is made, a
    KeyGroups for other keys or with another layout or num_groups when it is used."""
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 37, 37, 16, torch.float32, device)
    groups = torch.randint(0, 3, (2, 37), device=device)
    prepared = fp.ops.attention.prepare_key_groups(groups, 4)  # a group no key is in: mass 0
    assert prepared.num_groups == 4 and prepared.ids.dtype == torch.int32
    for num_groups in (None, 4):
        want = fp.sink_attention(q, k, v, key_groups=groups, num_groups=4, return_entropy=True, window=9)
        got = fp.sink_attention(q, k, v, key_groups=prepared, num_groups=num_groups, return_entropy=True, window=9)
        for name in ("out", "lse", "sink_mass", "group_mass", "entropy"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert fp.ops.attention.prepare_key_groups(groups).num_groups == 3
    own = groups.to(torch.int32)
    kept = fp.ops.attention.prepare_key_groups(own, 4)
    own[0, 0] = 9  # the caller's tensor changes after the check; the KeyGroups does not
    assert torch.equal(kept.ids, prepared.ids)
    with pytest.raises(ValueError, match=r"num_groups \(3\) differs from the KeyGroups' num_groups \(4\)"):
        fp.sink_attention(q, k, v, key_groups=prepared, num_groups=3)
    with pytest.raises(ValueError, match="not a contiguous int32 tensor of shape \\[2, 36\\]"):
        fp.sink_attention(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], key_groups=prepared)
    with pytest.raises(ValueError, match="not a contiguous int32 tensor"):
        fp.sink_attention(q, k, v, key_groups=prepared._replace(ids=groups))
    with pytest.raises(ValueError, match=r"key_groups must hold ids in \[0, num_groups = 3\)"):
        fp.ops.attention.prepare_key_groups(torch.full((2, 37), 3, device=device), 3)
    with pytest.raises(TypeError, match="key_groups must be an integer tensor"):
        fp.ops.attention.prepare_key_groups(groups.float())
    with pytest.raises(ValueError, match="key_groups must have shape \\[B, Lk\\]"):
        fp.ops.attention.prepare_key_groups(groups[0])


@pytest.mark.parametrize("largest", [2**31 - 1, 2**40, 2**63 - 1])
def test_key_group_ids_past_int32_name_key_groups(largest):
    """Without num_groups, G is the largest id + 1: an id past int32 was refused as a num_groups
    the caller never gave ("num_groups must fit ...", or "must be < 2**63" at 2**63 - 1)."""
    q, k, v = random_qkv(1, 2, 1, 3, 4, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"key_groups must hold ids below 2\\*\\*31 - 1 .*got {largest}"):
        fp.sink_attention(q, k, v, key_groups=torch.tensor([[0, 1, largest, 0]]))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_key_groups(dtype):
    """Group ids of the wide unsigned dtypes (which have no max or comparison on the CPU: a
    NotImplementedError from inside torch) give the int64 ids' result, and an id past int64's
    range (uint64) is refused by its own value."""
    q, k, v = random_qkv(2, 4, 2, 5, 9, 16, torch.float32, "cpu")
    groups = torch.randint(0, 3, (2, 9))
    want = fp.sink_attention(q, k, v, key_groups=groups).group_mass
    for num_groups in (None, 3):
        assert torch.equal(fp.sink_attention(q, k, v, key_groups=groups.to(dtype), num_groups=num_groups).group_mass, want)
    if dtype == torch.uint64:
        with pytest.raises(ValueError, match=r"key_groups must hold ids in \[0, num_groups = 3\), got 18446744073709551615"):
            fp.sink_attention(q, k, v, key_groups=torch.full((2, 9), 2**64 - 1, dtype=dtype), num_groups=3)


def test_key_groups_changed_after_their_check_stay_in_bounds(target):
    """A KeyGroups is not re-checked: one holding ids outside [0, num_groups) (built by hand, or
    changed after prepare_key_groups) is refused by the C++ kernel, and counted in no group by
    the Triton kernel, which reads group ids only into registers."""
    backend, device = target
    q, k, v = random_qkv(2, 4, 2, 37, 37, 16, torch.float32, device)
    groups = torch.randint(0, 3, (2, 37), device=device)
    groups[1, 5], groups[0, 30] = 7, -2
    hostile = fp.ops.attention.KeyGroups(groups.to(torch.int32), 3)
    if backend == "cpp":
        with pytest.raises(IndexError, match=r"key_groups\[0, 30\] = -2 is outside \[0, 3\)"):
            fp.sink_attention(q, k, v, key_groups=hostile)
        return
    got = fp.sink_attention(q, k, v, key_groups=hostile).group_mass
    outside = groups.clamp(max=3).masked_fill(groups < 0, 3)  # both bad keys in a 4th group
    with fp.use_backend("reference"):
        want = fp.sink_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), key_groups=outside.cpu(),
                                 num_groups=4).group_mass
    torch.testing.assert_close(got.cpu().double(), want[..., :3], rtol=RTOL, atol=ATOL)


def test_unchecked_group_ids_never_wrap_into_range(target):
    """Where the id check cannot run (torch.func.vmap, torch.compile), an int64 id outside
    [0, num_groups) is not cast into it (2**32 + 1 -> 1): the C++ kernel refuses it, Triton's
    counts it in no group, as for an unchecked KeyGroups."""
    backend, device = target
    q, k, v = random_qkv(1, 2, 1, 6, 6, 8, torch.float32, device)
    groups = torch.tensor([[0, 1, 2**32 + 1, 0, 1, -(2**32) + 1]], device=device)

    def group_mass(q, k, v, ids):
        return fp.sink_attention(q, k, v, key_groups=ids, num_groups=2).group_mass

    batched = functools.partial(torch.func.vmap(group_mass), q[None], k[None], v[None], groups[None])
    if backend == "cpp":
        with pytest.raises(IndexError, match=r"key_groups\[0, 2\] = -1 is outside \[0, 2\)"):
            batched()
        return
    outside = torch.tensor([[0, 1, 2, 0, 1, 2]])  # both bad keys in a third group
    with fp.use_backend("reference"):
        want = fp.sink_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), key_groups=outside,
                                 num_groups=3).group_mass
    torch.testing.assert_close(batched()[0].cpu().double(), want[..., :2], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_reused_segment_spans_give_the_same_result(target, causal):
    """SegmentSpans made once (segment_spans) give exactly what the segment ids give, with and
    without blocks; bad ids are refused when it is made."""
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 37, 37, 16, torch.float32, device)
    segments, blocks = random_segments(2, 37, device), image_blocks(2, 37, device)
    prepared = fp.ops.attention.segment_spans(segments)
    for num_queries in (37, 3):
        options = dict(bidirectional_blocks=blocks, window=9, num_sink=2, causal=causal)
        want = fp.sink_attention(q[:, :, -num_queries:], k, v, segment_ids=segments, **options)
        got = fp.sink_attention(q[:, :, -num_queries:], k, v, segment_ids=prepared, **options)
        assert torch.equal(got.out, want.out) and torch.equal(got.lse, want.lse)
    with pytest.raises(ValueError, match="segment id 1 of row 0 resumes"):
        fp.ops.attention.segment_spans(torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match=r"segment_ids must have shape \[B, Lk\]"):
        fp.ops.attention.segment_spans(torch.tensor([1, 0, 1]))


def test_hand_made_segment_spans_with_hostile_starts_act_clamped(target):
    """A SegmentSpans is not re-checked: starts outside [0, Lk) (built by hand) index nothing
    outside a buffer where the sink and statistics ends are found (with a padding mask: a gather,
    a device-side assert on CUDA) and act as the kernels clamp them, to [0, p]: far below, as one
    segment from key 0; far above, with ends at p, as every position its own segment."""
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 29, 37, 16, torch.float32, device)
    mask = padding_mask(2, 37, "mixed", device)
    position = torch.arange(37, device=device).expand(2, 37).contiguous()
    options = dict(key_padding_mask=mask, window=5, num_sink=2, stat_tokens=2, return_entropy=True)
    one = fp.ops.attention.SegmentSpans(torch.zeros_like(position), torch.full_like(position, 36))
    own = fp.ops.attention.SegmentSpans(position, position)
    for hostile, valid in [(one._replace(start=torch.full_like(position, -(2**40))), one),
                           (own._replace(start=torch.full_like(position, 2**40)), own)]:
        got = fp.sink_attention(q, k, v, segment_ids=hostile, **options)
        want = fp.sink_attention(q, k, v, segment_ids=valid, **options)
        for name in ("out", "lse", "sink_mass", "entropy"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_segments_are_independent_sequences(target):
    """Packed sequences: attention over packed segments equals attention over each sequence
    alone (the property packing relies on), statistics included: each segment's sinks and
    "first token" are its own first real keys (here after some padding of its own)."""
    _, device = target
    lengths, pads = [5, 17, 1, 12], [0, 3, 0, 2]
    q, k, v = random_qkv(1, 4, 2, sum(lengths), sum(lengths), 16, torch.float32, device)
    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(device)
    real = torch.cat([torch.arange(length) >= pad for length, pad in zip(lengths, pads)])[None].to(device)
    options = dict(window=6, num_sink=2, stat_tokens=2, return_entropy=True)
    packed = fp.sink_attention(q, k, v, segment_ids=segments, key_padding_mask=real, **options)
    begin = 0
    for length in lengths:
        part = slice(begin, begin + length)
        alone = fp.sink_attention(q[:, :, part], k[:, :, part], v[:, :, part], key_padding_mask=real[:, part], **options)
        for name in ("out", "lse", "sink_mass", "entropy"):
            torch.testing.assert_close(getattr(packed, name)[:, :, part], getattr(alone, name), msg=lambda m: f"{name}: {m}")
        begin += length


@pytest.mark.parametrize("case", bad_cases(), ids=lambda case: case[0])
def test_bad_input_raises_clear_error(case):
    message, args, kwargs = case
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.device.type != "meta"]
    saved = [a.clone() for a in tensors]
    with pytest.raises((ValueError, TypeError), match=_escape(message)):
        fp.sink_attention(*args, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(saved, tensors))


def _escape(message):
    import re

    return re.escape(message)


def test_cpp_rejects_out_of_range_group_ids_without_touching_memory():
    """The C++ kernel checks group ids itself (hostile callers bypass the Python checks)."""
    from fastprobe.ops import _common

    q, k, v = random_qkv(1, 2, 1, 4, 4, 8, torch.float32, "cpu")
    groups = torch.tensor([[0, 1, 7, 0]], dtype=torch.int32)
    ends = torch.zeros(1, dtype=torch.int64)
    out = torch.zeros(1, 4, 2, 8)
    stats = torch.zeros(3, 1, 2, 4)
    group_mass = torch.zeros(1, 2, 4, 2)
    with pytest.raises((IndexError, ValueError)):
        _common.cpp().sink_attention(
            "float32", q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), 1, 2, 1, 4, 4, 8, 8,
            *q.stride(), *k.stride(), *v.stride(), *out.transpose(1, 2).stride(),
            0.5, True, 0, 0, ends.data_ptr(), ends.data_ptr(), 0, 0, groups.data_ptr(), 2,
            stats[0].data_ptr(), stats[1].data_ptr(), group_mass.data_ptr(), stats[2].data_ptr(), 1,
        )


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("op", ["sink", "dual"])
def test_kernels_clamp_hostile_key_bounds(op, backend):
    """The C++ and Triton kernels clamp a horizon to [p, Lk - 1] and a start to [0, p] themselves
    (hostile callers bypass the Python checks): a horizon below p means j <= p, past the keys
    every later key; a start below 0 changes nothing, past p leaves only p itself. (Triton's
    clamp of a horizon below p was checked by no test before.)"""
    from fastprobe.ops.attention import _sink_attention_op
    from fastprobe.ops.dual_attention import _dual_path_attention_op

    fp.set_backend(backend)
    q, k, v = random_qkv(2, 4, 2, 37, 41, 8, torch.float32, "cpu")
    ends = torch.ones(2, dtype=torch.int64)
    drop = (torch.rand(2, 41) < 0.3).to(torch.uint8)
    rows = torch.ones(2, 37, dtype=torch.uint8)

    def run(horizon, causal=True, start=None):
        if op == "sink":
            return _sink_attention_op(q, k, v, 0.3, causal, 0, None, ends, ends, None, None, None, 0, 0.0, horizon, start, True)
        return _dual_path_attention_op(q, k, v, drop, rows, None, 0.5, True, 1e-6, 0.3, causal, horizon, start, 0, True)

    low = torch.full((2, 41), -(2**62), dtype=torch.int64)
    high = torch.full((2, 41), 2**62, dtype=torch.int64)
    own = torch.arange(41).expand(2, 41).contiguous()  # every position its own segment
    cases = [
        (run(low), run(None)), (run(high), run(None, causal=False)),
        (run(low, causal=False), run(None)), (run(high, causal=False), run(None, causal=False)),
        (run(None, start=low), run(None)), (run(None, start=high), run(None, start=own)),
        (run(high, causal=False, start=high), run(None, causal=False, start=own)),
    ]
    for got, want in cases:
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_backward_raises_clear_error():
    q, k, v = random_qkv(1, 2, 1, 4, 4, 8, torch.float32, "cpu")
    q.requires_grad_()
    out = fp.sink_attention(q, k, v).out
    with pytest.raises(RuntimeError, match="forward-only"):
        out.sum().backward()


def test_float64_runs_reference_exactly():
    q, k, v = random_qkv(2, 4, 2, 9, 9, 8, torch.float64, "cpu")
    options = make_options("everything", 2, 4, 9, "cpu")
    result = fp.sink_attention(q, k, v, return_entropy=True, **options)
    want = expected(q, k, v, **options)
    assert result.out.dtype == torch.float64 and result.lse.dtype == torch.float64
    for field in ["out"] + STATS:
        torch.testing.assert_close(getattr(result, field), want[field], rtol=0, atol=1e-12)


def test_torch_compile_fullgraph():
    q, k, v = random_qkv(2, 4, 2, 9, 9, 8, torch.float32, "cpu")
    groups = torch.randint(0, 2, (2, 9))
    blocks = torch.tensor([[-1, 0, 0, 0, -1, -1, 1, 1, -1], [3, 3, 3, 3, 3, -1, -1, -1, -1]])
    segments = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1], [7, 7, 7, 2, 2, 2, 2, 2, 2]])
    options = dict(window=4, num_sink=1, num_groups=2, return_entropy=True)

    @torch.compile(fullgraph=True)
    def run(q, k, v, groups, blocks, segments):
        result = fp.sink_attention(q, k, v, key_groups=groups, bidirectional_blocks=blocks, segment_ids=segments, **options)
        return result.out * 2, result.sink_mass, result.group_mass, result.entropy

    got = run(q, k, v, groups, blocks, segments)
    eager = fp.sink_attention(q, k, v, key_groups=groups, bidirectional_blocks=blocks, segment_ids=segments, **options)
    torch.testing.assert_close(got[0], eager.out * 2)
    torch.testing.assert_close(got[1], eager.sink_mass)
    torch.testing.assert_close(got[2], eager.group_mass)
    torch.testing.assert_close(got[3], eager.entropy)
    prepared = fp.ops.attention.prepare_key_groups(groups, 2)  # a KeyGroups argument, traced
    masses = torch.compile(lambda q, k, v, groups: fp.sink_attention(q, k, v, key_groups=groups).group_mass,
                           fullgraph=True)
    want = fp.sink_attention(q, k, v, key_groups=groups, num_groups=2).group_mass  # (inferred: 1 group if no id 1)
    torch.testing.assert_close(masses(q, k, v, prepared), want)


def test_torch_compile_with_a_narrower_value_head():
    q, k, _ = random_qkv(2, 4, 2, 9, 9, 12, torch.float32, "cpu")
    v = torch.randn(2, 2, 9, 8)
    run = torch.compile(lambda q, k, v: fp.sink_attention(q, k, v, window=4).out * 2, fullgraph=True)
    torch.testing.assert_close(run(q, k, v), fp.sink_attention(q, k, v, window=4).out * 2)


@pytest.mark.parametrize("with_groups", [False, True])
def test_opcheck(with_groups):
    q, k, v = random_qkv(2, 4, 2, 6, 9, 8, torch.float32, "cpu")
    ends = torch.tensor([1, 2])
    groups = torch.randint(0, 2, (2, 9), dtype=torch.int32) if with_groups else None
    horizon = torch.tensor([[0, 1, 4, 4, 4, 5, 6, 8, 8]] * 2) if with_groups else None  # blocks [2, 4] and [7, 8]
    start = torch.tensor([[0, 0, 0, 3, 3, 3, 3, 3, 8]] * 2) if with_groups else None  # segments [0, 2], [3, 7], [8]
    if with_groups:  # per-position sink / stat ends: each segment's first key
        ends = torch.tensor([[1, 1, 1, 4, 4, 4, 4, 4, 9]] * 2)
    args = (q, k, v, 0.3, True, 4, None, ends, ends, None, None, groups, 2 if with_groups else 0, 0.0, horizon, start, True)
    torch.library.opcheck(_sink_attention_op.op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_math_of_statistics_by_hand():
    """One tiny case worked by hand: two keys with scores 0 and log 3, sink logit 0."""
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[0.0, 0.0], [math.log(3.0), 0.0]]]])
    v = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    result = fp.sink_attention(q, k, v, scale=1.0, sink_logit=torch.zeros(1), key_groups=torch.tensor([[1, 0]]), return_entropy=True)
    p = torch.tensor([1.0, 3.0, 1.0]) / 5.0  # key 0, key 1, sink
    torch.testing.assert_close(result.out[0, 0, 0], p[:2])
    torch.testing.assert_close(result.lse[0, 0, 0], torch.tensor(math.log(5.0)))
    torch.testing.assert_close(result.sink_mass[0, 0, 0], p[0])
    torch.testing.assert_close(result.group_mass[0, 0, 0], torch.stack([p[1], p[0]]))
    torch.testing.assert_close(result.entropy[0, 0, 0], -(p * p.log()).sum())


def _op_args(**change) -> dict:
    """Valid arguments of the custom op (its schema order), with `change` applied."""
    q, k, v = random_qkv(2, 4, 2, 5, 9, 8, torch.float32, "cpu")
    ends = torch.ones(2, dtype=torch.int64)
    args = dict(q=q, k=k, v=v, scale=0.3, causal=True, window=0, key_real=None, sink_end=ends, stat_end=ends,
                head_mask=None, sink_logit=None, key_groups=None, num_groups=0, softcap=0.0, horizon=None,
                start=None, return_entropy=True)
    if change.pop("with_groups", False):
        args["key_groups"] = torch.zeros(2, 9, dtype=torch.int32)
    args.update(change)
    return args


@pytest.mark.parametrize("change, words", [
    (dict(scale=0.0), "scale must be a positive number"),
    (dict(scale=-1.0), "scale must be a positive number"),
    (dict(scale=float("nan")), "scale must be a positive number"),
    (dict(scale=float("inf")), "scale must be a positive number"),
    (dict(scale=1e-300), "scale must be a positive number"),  # (0 in float32)
    (dict(window=-1), "window must be >= 0"),
    (dict(softcap=-1.0), "softcap must be a positive number"),
    (dict(softcap=float("nan")), "softcap must be a positive number"),
    (dict(softcap=float("inf")), "softcap must be a positive number"),
    (dict(softcap=1e-300), "softcap must be a positive number"),  # (0 in float32)
    (dict(num_groups=-1), "num_groups must be 0 without key_groups"),
    (dict(num_groups=3), "num_groups must be 0 without key_groups"),
    (dict(with_groups=True, num_groups=0), "num_groups must be >= 1"),
    (dict(with_groups=True, num_groups=2**31), "num_groups must fit the kernels' int32 group ids"),
], ids=lambda x: str(x) if isinstance(x, dict) else None)
def test_direct_op_refuses_bad_scalars_before_any_kernel(monkeypatch, change, words):
    """torch.ops.fastprobe.sink_attention, reachable past the public checks, refuses the scalars
    no kernel takes, by name and before choosing a kernel: the reference and Triton ran with a NaN
    or negative scale, a negative window or softcap (NaN or silently wrong output), the C++ kernel
    raised its own error."""
    from fastprobe.ops import attention

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was about to run")

    monkeypatch.setattr(attention, "resolve", no_kernel)
    with pytest.raises(ValueError, match=words):
        torch.ops.fastprobe.sink_attention(*_op_args(**change).values())
