"""dual_path_attention against the two-pass reference (two materialised float64 attention
calls), gamma = 0, rows, the no-kept-key rule, and bad input."""

import pytest
import torch

import fastprobe as fp
from fastprobe import reference
from fastprobe.ops.dual_attention import _dual_path_attention_op

from .conftest import ATOL, RTOL
from .test_attention import (
    CONFIG_DTYPES, DTYPES, OUT_TOLERANCE, check_every_config, chunk_ids, force_triton_split_keys, image_blocks,
    is_interpreter, padding_mask, random_qkv, random_segments, score_tolerance, triton_kernels,
)


def shapes(target):
    """(B, Hq, Hkv, Lq, Lk, D); small under the Triton interpreter."""
    if is_interpreter(target):
        return [(2, 4, 2, 23, 37, 16), (1, 2, 2, 1, 41, 40)]
    return [(2, 4, 2, 77, 77, 64), (2, 8, 2, 1, 301, 64), (1, 4, 1, 93, 130, 40)]


def image_keys(batch, num_keys, device):
    """[B, Lk] bool: a contiguous run of image tokens after a short prefix, as in LLaVA prompts."""
    drop = torch.zeros(batch, num_keys, dtype=torch.bool)
    for b in range(batch):
        start = int(torch.randint(1, max(2, num_keys // 4), ()))
        drop[b, start : start + num_keys // 2] = True
    return drop.to(device)


def expected(q, k, v, drop, **options):
    moved = {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in options.items()}
    moved.pop("return_paths", None)
    return reference.dual_path_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), drop.cpu(), **moved)


# The relative error of one rounding to each dtype (a 16-bit o_uncond is returned rounded).
ROUNDING = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def projection_allowance(got_uncond, want, options) -> torch.Tensor:
    """[..., 1] per row: how far out may move, beyond the dtype's tolerance, because of o_uncond's
    error. out = o_c + gamma (dO - <dO, u> u), u = o_u / (||o_u|| + eps): an error e in o_u moves u
    by up to 2 e / (||o_u|| + eps), so the projection by up to 4 ||dO|| e / (||o_u|| + eps) (and never
    more than 2 ||dO||). A relative error (a rounding of o_u) moves u by as much relatively, which the
    dtype's tolerance covers; an absolute one (float32 accumulation, ~1e-7) is amplified where
    ||o_u|| is small: with one value dimension, a row's o_u is one weighted mean of v, which can
    fall near 0, and out then moves by ~1e-3 (the float64 reference's formula on float32 paths
    would too). So e is o_uncond's error (norm over Dv) beyond one rounding, and the allowance twice
    this first-order bound."""
    if not options.get("orthogonalize", True):
        return torch.zeros(())
    uncond = want["o_uncond"].norm(dim=-1, keepdim=True)
    error = (got_uncond.cpu().double() - want["o_uncond"]).norm(dim=-1, keepdim=True)
    excess = (error - ROUNDING[got_uncond.dtype] * uncond).clamp(min=0)
    spread = (want["o_cond"] - want["o_uncond"]).norm(dim=-1, keepdim=True)  # ||dO||
    bound = torch.minimum(4 * spread * excess / (uncond + options.get("eps", 1e-6)), 2 * spread)
    return 2 * abs(options.get("gamma", 0.0)) * bound


def assert_paths_match(got, want, dtype, options=None, atol=None):
    """out, o_cond and o_uncond within the dtype's tolerance (atol: a larger one) of the reference;
    with the call's options, out also within projection_allowance of it (the conditioning of its
    orthogonalisation, which the paths' own errors enter)."""
    rtol, dtype_atol = OUT_TOLERANCE[dtype]
    atol = dtype_atol if atol is None else max(atol, dtype_atol)
    for name, value in zip(("out", "o_cond", "o_uncond"), got):
        assert value.dtype == dtype, name
        assert not torch.isnan(value).any(), f"{name} has NaN (unwritten or invalid)"
        if name != "out" or options is None:
            torch.testing.assert_close(value.cpu().double(), want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    if options is not None:
        error = (got[0].cpu().double() - want["out"]).abs()
        allowed = atol + rtol * want["out"].abs() + projection_allowance(got[2], want, options)
        excess = error - allowed
        worst = int(excess.flatten().argmax()) if excess.numel() else 0
        assert excess.numel() == 0 or excess.flatten()[worst] <= 0, (
            f"out: {int((excess > 0).sum())} of {excess.numel()} elements beyond their allowance; the worst, flat index "
            f"{worst}: {error.flatten()[worst]:.3g} off, {allowed.flatten()[worst]:.3g} allowed")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", ["last", "all", "mask"])
@pytest.mark.parametrize("orthogonalize", [True, False], ids=["orthogonal", "plain"])
def test_matches_reference(target, dtype, rows, orthogonalize):
    _, device = target
    for batch, heads, kv_heads, num_queries, num_keys, head_dim in shapes(target):
        q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, device)
        drop = image_keys(batch, num_keys, device)
        chosen = torch.rand(batch, num_queries, device=device) < 0.5 if rows == "mask" else rows
        options = dict(gamma=0.7, orthogonalize=orthogonalize, rows=chosen, key_padding_mask=padding_mask(batch, num_keys, "mixed", device),
                       bidirectional_blocks=image_blocks(batch, num_keys, device))
        got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
        assert_paths_match(got, expected(q, k, v, drop, **options), dtype, options)


@pytest.mark.parametrize("head_dim", [1, 5, 8, 16, 17, 63, 65, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("dtype", CONFIG_DTYPES, ids=str)
def test_cpu_lane_widths(cpu_lanes, poisoned_outputs, dtype, head_dim):
    """The C++ kernels at 8 and 16 lanes (see test_attention.LANE_HEAD_DIMS): prefill items of 37,
    64 and 10 rows, decoding (1 and 4 narrow rows) and a long cache split across 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for batch, heads, kv_heads, num_queries, num_keys, window in [
            (2, 3, 3, 37, 101, None), (2, 6, 3, 37, 101, 17), (1, 4, 4, 1, 300, None), (2, 8, 2, 1, 517, 40),
            (1, 4, 1, 1, 3001, None),
        ]:
            q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, "cpu")
            drop = image_keys(batch, num_keys, "cpu")
            options = dict(gamma=0.7, rows="all", window=window,
                           key_padding_mask=padding_mask(batch, num_keys, "mixed", "cpu"))
            got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
            assert_paths_match(got, expected(q, k, v, drop, **options), dtype, options,
                               atol=score_tolerance(q, k, v)["atol"])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("head_dim", [1, 5, 16, 17, 33, 64, 65, 96, 128])
def test_cpu_bf16_pair_scores(cpu_bf16_pairs, poisoned_outputs, head_dim):
    """bfloat16 scores by AVX512-BF16 pairs and in float32 (see test_attention.PAIR_HEAD_DIMS): an
    image run (blocks of one state and blocks cut in two), dropped keys alternating (blocks loaded
    reordered: wide items copy K), padded keys, GQA, a window, decoding (narrow items of 1 to 4
    rows, reordered too)."""
    for batch, heads, kv_heads, num_queries, num_keys, window, alternate in [
        (2, 3, 3, 37, 101, None, False), (2, 6, 3, 37, 130, 17, False), (1, 8, 2, 50, 150, None, True),
        (2, 4, 1, 20, 90, 30, True), (1, 4, 4, 1, 300, None, False), (1, 6, 2, 1, 200, None, True),
        (2, 4, 2, 2, 150, 9, True), (2, 4, 2, 1, 130, None, False),
    ]:
        q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, torch.bfloat16, "cpu")
        drop = torch.arange(num_keys).remainder(3).eq(1).expand(batch, num_keys) if alternate else \
            image_keys(batch, num_keys, "cpu")
        options = dict(gamma=0.7, rows="all", window=window,
                       key_padding_mask=padding_mask(batch, num_keys, "mixed", "cpu"))
        got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
        assert_paths_match(got, expected(q, k, v, drop, **options), torch.bfloat16, options,
                           atol=score_tolerance(q, k, v)["atol"])


@pytest.mark.parametrize("dtype", CONFIG_DTYPES, ids=str)
@pytest.mark.parametrize("rows", ["last", "all"])
def test_every_prefill_config(monkeypatch, target, dtype, rows):
    """Each prefill config that pruning keeps (check_every_config in test_attention.py)."""
    kernels = triton_kernels(target, "dual_attention")
    device = target[1]
    shapes = [(1, 2, 1, 140, 140, 32)] if is_interpreter(target) else [(1, 4, 2, 300, 300, 128), (2, 4, 4, 150, 170, 64)]
    for batch, heads, kv_heads, num_queries, num_keys, head_dim in shapes:
        q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, device)
        drop = image_keys(batch, num_keys, device)
        options = dict(gamma=0.7, rows=rows, key_padding_mask=padding_mask(batch, num_keys, "mixed", device))
        want = expected(q, k, v, drop, **options)
        run = lambda: fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)  # noqa: E731
        check_every_config(monkeypatch, kernels, target, run, lambda got: assert_paths_match(got, want, dtype))


@pytest.mark.parametrize("dtype", CONFIG_DTYPES, ids=str)
def test_every_decode_config(monkeypatch, target, dtype):
    """Each decode-split config that pruning keeps (check_every_config in test_attention.py)."""
    kernels = triton_kernels(target, "dual_attention")
    device = target[1]
    num_keys, head_dim = (203, 16) if is_interpreter(target) else (3001, 64)
    q, k, v = random_qkv(2, 8, 2, 1, num_keys, head_dim, dtype, device)
    drop = image_keys(2, num_keys, device)
    options = dict(gamma=0.7, rows="all", key_padding_mask=padding_mask(2, num_keys, "mixed", device))
    want = expected(q, k, v, drop, **options)
    run = lambda: fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)  # noqa: E731
    check_every_config(monkeypatch, kernels, target, run, lambda got: assert_paths_match(got, want, dtype), decode=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value_dim", [8, 56], ids=["narrower-v", "wider-v"])
def test_value_head_dim_differs_from_query_head_dim(target, dtype, value_dim):
    """v of width Dv != D (multi-head latent attention): the three paths have Dv columns, the
    norms and projections of the orthogonal correction are over those Dv."""
    _, device = target
    for batch, heads, kv_heads, num_queries, num_keys, head_dim in shapes(target):
        q, k, _ = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, device)
        v = torch.randn(batch, kv_heads, num_keys, value_dim).to(device=device, dtype=dtype)
        drop = image_keys(batch, num_keys, device)
        options = dict(gamma=0.7, rows="all", key_padding_mask=padding_mask(batch, num_keys, "mixed", device))
        got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
        assert all(path.shape == (batch, heads, num_queries, value_dim) for path in got)
        assert_paths_match(got, expected(q, k, v, drop, **options), dtype, options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_sliding_window(target, dtype, causal):
    """A sliding window (causal p - w < j, bidirectional |p - j| < w; no sink keys), with padding,
    image blocks and windows narrower and wider than the image run, prefill and decode."""
    _, device = target
    for batch, heads, kv_heads, num_queries, num_keys, head_dim in shapes(target):
        q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, device)
        drop = image_keys(batch, num_keys, device)
        for window in (1, 5, num_keys // 2 + 1):
            options = dict(gamma=0.7, rows="all", causal=causal, window=window,
                           key_padding_mask=padding_mask(batch, num_keys, "mixed", device),
                           bidirectional_blocks=image_blocks(batch, num_keys, device) if causal else None)
            got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
            assert_paths_match(got, expected(q, k, v, drop, **options), dtype, options)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_segments(target, dtype, causal):
    """Segments (packed sequences, chunks counted from the first real key) with blocks crossing
    their borders, padding and windows, prefill and decode: nothing crosses a segment."""
    _, device = target
    for batch, heads, kv_heads, num_queries, num_keys, head_dim in shapes(target):
        q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, device)
        drop = image_keys(batch, num_keys, device)
        padding = padding_mask(batch, num_keys, "left", device)
        for segments, window in ((random_segments(batch, num_keys, device), None),
                                 (chunk_ids(padding, num_keys, max(2, num_keys // 3), device), 5)):
            options = dict(gamma=0.7, rows="all", causal=causal, window=window, key_padding_mask=padding,
                           segment_ids=segments, bidirectional_blocks=image_blocks(batch, num_keys, device))
            got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
            assert_paths_match(got, expected(q, k, v, drop, **options), dtype, options)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("pattern", ["bidirectional", "blocks", "segments+window"])
@pytest.mark.parametrize("orthogonalize", [True, False], ids=["orthogonal", "plain"])
def test_triton_split_key_decode_path(monkeypatch, dtype, splits, pattern, orthogonalize):
    """The Triton decoding path (keys split across programs, then merged) forced on small caches
    for the patterns the shapes above decode without it: bidirectional, image blocks (a causal
    horizon) and segments (their starts) with a window, with and without the orthogonal
    correction. The split kernel's CAUSAL, HAS_HORIZON and HAS_START flags and the merge kernel's
    ORTHOGONALIZE=False ran only when the fuzz drew them (tests/interpreter_flags.py)."""
    force_triton_split_keys(monkeypatch, "dual_attention", "dual_path_attention", splits)
    for num_queries, num_keys in [(1, 70), (2, 97)]:
        q, k, v = random_qkv(2, 4, 2, num_queries, num_keys, 16, dtype, "cpu")
        drop = image_keys(2, num_keys, "cpu")
        options = dict(gamma=0.7, rows="all", orthogonalize=orthogonalize,
                       key_padding_mask=padding_mask(2, num_keys, "mixed", "cpu"))
        if pattern == "bidirectional":
            options["causal"] = False
        elif pattern == "blocks":  # the last keys in one block: the first query sees the second
            blocks = image_blocks(2, num_keys, "cpu")
            blocks[:, -num_queries:] = blocks.max() + 1
            options["bidirectional_blocks"] = blocks
        else:
            options.update(segment_ids=random_segments(2, num_keys, "cpu"), window=9)
        got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
        assert_paths_match(got, expected(q, k, v, drop, **options), dtype, options)


DROP_PATTERNS = ["one-run", "two-runs", "scattered", "block-aligned", "one-key", "first-keys", "last-keys", "all", "none"]


def drop_pattern(name, batch, num_keys, device):
    """[B, Lk] bool dropped keys of one shape: the kernels read one run of dropped keys per
    query block apart (its all-dropped key blocks are skipped by the kept path) and must get
    every other shape right too. "block-aligned" lines the run up with the interpreter's
    16-key blocks."""
    drop = torch.zeros(batch, num_keys, dtype=torch.bool)
    if name == "one-run":
        drop[:, 3 : num_keys - 5] = True
    elif name == "two-runs":
        drop[:, 2:9] = True
        drop[:, num_keys // 2 : num_keys - 3] = True
    elif name == "scattered":
        drop = torch.rand(batch, num_keys) < 0.4
    elif name == "block-aligned":
        drop[:, 16 : min(32, num_keys)] = True
    elif name == "one-key":
        drop[:, num_keys // 3] = True
    elif name == "first-keys":
        drop[:, : num_keys // 2] = True
    elif name == "last-keys":
        drop[:, num_keys // 2 :] = True
    elif name == "all":
        drop[:] = True
    return drop.to(device)


@pytest.mark.parametrize("pattern", DROP_PATTERNS)
@pytest.mark.parametrize("paths", [True, False], ids=["paths", "out-only"])
def test_drop_patterns(target, pattern, paths):
    """Every shape of dropped-key set, with the paths (both states for every row) and without
    (only the query blocks that hold a guided row keep the two states apart), rows "last",
    "all" and a mask, causal and bidirectional."""
    _, device = target
    # (without padding, the blocks every row of a query block sees run unmasked: a long
    # prefill has such blocks inside, around and beside the dropped run)
    for batch, heads, kv_heads, num_queries, num_keys, head_dim in [*shapes(target), (1, 2, 1, 70, 70, 16)]:
        q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, torch.float32, device)
        drop = drop_pattern(pattern, batch, num_keys, device)
        for rows, causal, padded in (("last", True, True), ("all", False, False), ("mask", True, False)):
            chosen = torch.rand(batch, num_queries, device=device) < 0.3 if rows == "mask" else rows
            padding = padding_mask(batch, num_keys, "mixed", device) if padded else None
            options = dict(gamma=1.3, rows=chosen, causal=causal, key_padding_mask=padding)
            want = expected(q, k, v, drop, **options)
            got = fp.dual_path_attention(q, k, v, drop, return_paths=paths, **options)
            if paths:
                assert_paths_match(got, want, torch.float32)
            else:
                assert not torch.isnan(got).any()
                torch.testing.assert_close(got.cpu().double(), want["out"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_without_padding_and_bidirectional(target, causal):
    _, device = target
    batch, heads, kv_heads, num_queries, num_keys, head_dim = shapes(target)[0]
    q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, torch.float32, device)
    drop = image_keys(batch, num_keys, device)
    got = fp.dual_path_attention(q, k, v, drop, gamma=1.5, rows="all", causal=causal, return_paths=True)
    assert_paths_match(got, expected(q, k, v, drop, gamma=1.5, rows="all", causal=causal), torch.float32)


def test_gamma_zero_is_plain_attention(target):
    """gamma = 0: out equals o_cond and plain attention (sink_attention) exactly in float32 terms."""
    _, device = target
    batch, heads, kv_heads, num_queries, num_keys, head_dim = shapes(target)[0]
    q, k, v = random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, torch.float32, device)
    drop = image_keys(batch, num_keys, device)
    out, o_cond, _ = fp.dual_path_attention(q, k, v, drop, gamma=0.0, rows="all", return_paths=True)
    assert torch.equal(out, o_cond)
    plain = fp.sink_attention(q, k, v).out
    torch.testing.assert_close(out, plain, rtol=RTOL, atol=ATOL)
    # without the paths, no row needs them apart: every key in one state
    one_state = fp.dual_path_attention(q, k, v, drop, gamma=0.0, rows="all")
    torch.testing.assert_close(one_state, plain, rtol=RTOL, atol=ATOL)


def test_rows_without_kept_keys_are_not_guided(target):
    """Early queries that see only image keys (image tokens first) keep o_cond; o_uncond = 0 there;
    a row where every key is dropped, or padded, gives finite output."""
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 12, 12, 16, torch.float32, device)
    drop = torch.zeros(2, 12, dtype=torch.bool, device=device)
    drop[0, :5] = True  # queries 0..4 of row 0 see only image keys
    drop[1] = True  # nothing kept in row 1
    out, o_cond, o_uncond = fp.dual_path_attention(q, k, v, drop, gamma=2.0, rows="all", return_paths=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :, :5], o_cond[0, :, :5]) and torch.equal(out[1], o_cond[1])
    assert bool((o_uncond[0, :, :5] == 0).all()) and bool((o_uncond[1] == 0).all())
    assert not torch.equal(out[0, :, 5:], o_cond[0, :, 5:])


def test_orthogonal_correction_is_orthogonal_to_uncond(target):
    _, device = target
    q, k, v = random_qkv(1, 4, 4, 9, 9, 16, torch.float32, device)
    drop = image_keys(1, 9, device)
    out, o_cond, o_uncond = fp.dual_path_attention(q, k, v, drop, gamma=1.0, rows="all", return_paths=True)
    correction = (out - o_cond).double()
    cosine = (correction * o_uncond.double()).sum(-1) / (o_uncond.double().norm(dim=-1) + 1e-6)
    assert cosine.abs().max() < 1e-4


@pytest.mark.parametrize("path", ["prefill", "decode-split"])
@pytest.mark.parametrize("kept_scale, dropped_scale, eps", [
    (1e20, 1e20, 1e-6), (1e34, 1e34, 1e-6), (1e30, 1.0, 1e-6), (1e-25, 1e-25, 1e-30), (1e-25, 1.0, 1e-30),
], ids=["1e20", "1e34", "kept-1e30", "1e-25-tiny-eps", "kept-1e-25-tiny-eps"])  # fmt: skip
def test_orthogonalization_of_extreme_values(target, path, kept_scale, dropped_scale, eps):
    """Values from 1e-25 to 1e34 (legal float32, outputs finite) are guided right, prefill and
    decode, also with a tiny eps: the orthogonalisation squares o_uncond's components (the Triton
    kernel: unnormalised ones, ~Lk |v|), which overflowed float32 from ~1e19 on (NaN out) and
    underflowed below ~1e-23 (with eps 1e-30, ||o_uncond|| taken as 0: out off by 1e9). Checked
    divided by the largest value scale, so that every path's error counts at float32 level."""
    _, device = target
    num_queries, num_keys = (9, 9) if path == "prefill" else (1, 520)
    q, k, v = random_qkv(1, 4, 2, num_queries, num_keys, 16, torch.float32, device)
    drop = torch.zeros(1, num_keys, dtype=torch.bool, device=device)
    drop[0, 2 : num_keys // 2] = True
    v = v * torch.where(drop[0], dropped_scale, kept_scale)[None, None, :, None]  # per key
    options = dict(gamma=0.7, rows="all", eps=eps)
    got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
    want = expected(q, k, v, drop, **options)
    assert all(bool(torch.isfinite(value).all()) for value in want.values())
    unit = max(kept_scale, dropped_scale)
    assert_paths_match([value / unit for value in got], {name: value / unit for name, value in want.items()},
                       torch.float32)


@pytest.mark.parametrize("eps", [0.5, 3.0])
def test_a_large_eps_enters_the_projection(target, eps):
    """u = o_uncond / (||o_uncond|| + eps): an eps of the size of ||o_uncond|| changes out (the
    default 1e-6 hides a kernel that drops it: 0.51 off at eps = 0.5)."""
    _, device = target
    q, k, v = random_qkv(1, 2, 2, 4, 12, 16, torch.float32, device)
    drop = torch.zeros(1, 12, dtype=torch.bool, device=device)
    drop[:, 3:8] = True
    options = dict(gamma=2.0, eps=eps, rows="all")
    got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
    assert_paths_match(got, expected(q, k, v, drop, **options), torch.float32, options)


@pytest.mark.parametrize("num_queries, num_keys, window", [(1, 200, 71), (64, 256, 128)])
def test_key_at_the_window_distance_starting_a_block(target, num_queries, num_keys, window):
    """As for sink_attention: the key at distance exactly `window`, first of a 64-key block wholly
    before the query, is outside the window on both paths."""
    _, device = target
    q, k, v = random_qkv(1, 2, 1, num_queries, num_keys, 16, torch.float32, device)
    k[:, :, num_keys - 1 - window] *= 8
    drop = image_keys(1, num_keys, device)
    options = dict(gamma=0.7, rows="all", window=window)
    got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
    assert_paths_match(got, expected(q, k, v, drop, **options), torch.float32, options)


def test_inputs_untouched_and_single_output(target):
    _, device = target
    q, k, v = random_qkv(2, 4, 2, 7, 7, 16, torch.float32, device)
    drop = image_keys(2, 7, device)
    saved = [t.clone() for t in (q, k, v, drop)]
    out = fp.dual_path_attention(q, k, v, drop, gamma=0.5)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(saved, (q, k, v, drop)))


def test_guided_rows_are_made_once(target):
    """rows="last" and "all" are constant tensors, one per (B, Lq, device), reused by every call
    (a decoding step's guided layers); made inside inference mode they still serve calls outside
    it, and under fake tensors they are made fresh and not kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastprobe.ops.dual_attention import _check_rows

    _, device = target
    batch, num_queries = 3, 6  # (sizes no other test uses: made here first)
    q, k, v = random_qkv(batch, 4, 2, num_queries, 11, 16, torch.float32, device)
    drop = image_keys(batch, 11, device)
    with torch.inference_mode():
        first = fp.dual_path_attention(q, k, v, drop, gamma=0.8, return_paths=True)
    assert_paths_match(first, expected(q, k, v, drop, gamma=0.8), torch.float32)
    assert_paths_match(fp.dual_path_attention(q, k, v, drop, gamma=0.8, return_paths=True),
                       expected(q, k, v, drop, gamma=0.8), torch.float32)
    last, every = _check_rows("last", batch, num_queries, q), _check_rows("all", batch, num_queries, q)
    assert last is _check_rows("last", batch, num_queries, q) and not last.is_inference()
    assert last.tolist() == [[0] * (num_queries - 1) + [1]] * batch and every.tolist() == [[1] * num_queries] * batch
    with FakeTensorMode():
        assert type(_check_rows("last", batch, num_queries, torch.empty(1, device=device))) is not torch.Tensor


def bad_cases():
    q, k, v = random_qkv(2, 4, 2, 5, 7, 8, torch.float32, "cpu")
    drop = torch.zeros(2, 7, dtype=torch.bool)
    return [
        ("drop_keys must have shape", (q, k, v, drop[:, :6]), {"gamma": 1.0}),
        ("drop_keys must be a boolean tensor", (q, k, v, None), {"gamma": 1.0}),
        ("gamma must be a finite", (q, k, v, drop), {"gamma": float("inf")}),
        ("gamma must be a finite number in float32's range", (q, k, v, drop), {"gamma": 1e300}),
        ("gamma must be a real number", (q, k, v, drop), {"gamma": "1"}),
        ("eps must be a positive number in float32's range", (q, k, v, drop), {"gamma": 1.0, "eps": 0.0}),
        ("rows must be 'last', 'all'", (q, k, v, drop), {"gamma": 1.0, "rows": "first"}),
        ("rows must have shape", (q, k, v, drop), {"gamma": 1.0, "rows": torch.ones(4, dtype=torch.bool)}),
        ("multiple of the number of key/value heads", (q, k[:, :1].expand(2, 3, 7, 8), v[:, :1].expand(2, 3, 7, 8), drop), {"gamma": 1.0}),
        ("key_padding_mask must have shape", (q, k, v, drop), {"gamma": 1.0, "key_padding_mask": torch.ones(2, 5, dtype=torch.bool)}),
        ("orthogonalize must be a bool", (q, k, v, drop), {"gamma": 1.0, "orthogonalize": None}),
        ("causal must be a bool, got int", (q, k, v, drop), {"gamma": 1.0, "causal": 1}),
        ("rows must be 'last', 'all' or a boolean tensor [Lq] or [B, Lq], got list", (q, k, v, drop),
         {"gamma": 1.0, "rows": [0, 0, 0, 0, 1]}),
        ("window must be >= 1", (q, k, v, drop), {"gamma": 1.0, "window": 0}),
        ("bidirectional_blocks must have shape", (q, k, v, drop), {"gamma": 1.0, "bidirectional_blocks": torch.zeros(2, 6, dtype=torch.long)}),
        ("segment_ids must have shape", (q, k, v, drop), {"gamma": 1.0, "segment_ids": torch.zeros(2, 6, dtype=torch.long)}),
        ("segment id 0 of row 0 resumes", (q, k, v, drop), {"gamma": 1.0, "segment_ids": torch.tensor([[0, 1, 0, 0, 0, 0, 0]] * 2)}),
    ]


@pytest.mark.parametrize("case", bad_cases(), ids=lambda case: case[0])
def test_bad_input_raises_clear_error(case):
    import re

    message, args, kwargs = case
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        fp.dual_path_attention(*args, **kwargs)


@pytest.mark.parametrize("batch, num_queries", [(0, 3), (2, 0)], ids=["B=0", "Lq=0"])
def test_empty_batch_or_queries_give_empty_outputs(target, batch, num_queries, monkeypatch):
    """No rows to attend (B = 0 or Lq = 0): out, o_cond and o_uncond [B, Hq, Lq, Dv] in q's dtype, as
    the reference's, and no kernel is launched (nor a Triton grid of 0 programs)."""
    from fastprobe.ops import dual_attention

    def launched(*args):
        raise AssertionError("a kernel ran for an empty output")

    _, device = target
    monkeypatch.setattr(dual_attention, "_KERNELS", dict.fromkeys(dual_attention._KERNELS, launched))
    q, k, v = random_qkv(batch, 4, 2, num_queries, 5, 8, torch.float32, device)
    drop = torch.zeros(batch, 5, dtype=torch.bool, device=device)
    got = fp.dual_path_attention(q, k, v, drop, gamma=0.5, return_paths=True)
    want = expected(q, k, v, drop, gamma=0.5)
    for value, name in zip(got, ("out", "o_cond", "o_uncond")):
        assert value.shape == want[name].shape == (batch, 4, num_queries, 8) and value.dtype == q.dtype, name
        assert value.device == q.device, name
    out = fp.dual_path_attention(q, k, v, drop, gamma=0.5)
    assert isinstance(out, torch.Tensor) and out.shape == (batch, 4, num_queries, 8)


def test_float64_runs_reference():
    q, k, v = random_qkv(2, 4, 2, 6, 9, 8, torch.float64, "cpu")
    drop = image_keys(2, 9, "cpu")
    got = fp.dual_path_attention(q, k, v, drop, gamma=0.3, rows="all", return_paths=True)
    want = expected(q, k, v, drop, gamma=0.3, rows="all")
    for value, name in zip(got, ("out", "o_cond", "o_uncond")):
        torch.testing.assert_close(value, want[name], rtol=0, atol=1e-12)


def test_torch_compile_fullgraph_and_opcheck():
    q, k, v = random_qkv(2, 4, 2, 6, 9, 8, torch.float32, "cpu")
    drop = image_keys(2, 9, "cpu")
    blocks = drop.long() - 1  # the images as bidirectional blocks (one run each)
    segments = torch.tensor([[0] * 4 + [1] * 5, [3] * 9])

    def guide(q, k, v, d, blocks, segments):
        return fp.dual_path_attention(q, k, v, d, gamma=0.5, rows="all", bidirectional_blocks=blocks, segment_ids=segments)

    run = torch.compile(lambda *args: guide(*args) * 2, fullgraph=True)
    torch.testing.assert_close(run(q, k, v, drop, blocks, segments), guide(q, k, v, drop, blocks, segments) * 2)
    rows = torch.ones(2, 6, dtype=torch.uint8)
    horizon = torch.arange(9).expand(2, 9).contiguous()
    start = torch.tensor([[0] * 4 + [4] * 5] * 2)
    args = (q, k, v, drop.to(torch.uint8), rows, None, 0.5, True, 1e-6, 0.35, True, horizon, start, 4, True)
    torch.library.opcheck(_dual_path_attention_op.op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _op_args(**change) -> dict:
    """Valid arguments of the custom op (its schema order), with `change` applied."""
    q, k, v = random_qkv(2, 4, 2, 5, 9, 8, torch.float32, "cpu")
    args = dict(q=q, k=k, v=v, drop=image_keys(2, 9, "cpu").to(torch.uint8), rows=torch.ones(2, 5, dtype=torch.uint8),
                key_real=None, gamma=0.5, orthogonalize=True, eps=1e-6, scale=0.3, causal=True, horizon=None,
                start=None, window=0, return_paths=True)
    args.update(change)
    return args


@pytest.mark.parametrize("change, words", [
    (dict(gamma=float("nan")), "gamma must be a finite number"),
    (dict(gamma=float("inf")), "gamma must be a finite number"),
    (dict(gamma=1e300), "gamma must be a finite number"),
    (dict(eps=0.0), "eps must be a positive number"),
    (dict(eps=-1.0), "eps must be a positive number"),
    (dict(eps=float("nan")), "eps must be a positive number"),
    (dict(eps=1e-300), "eps must be a positive number"),  # (0 in float32: Triton divided by ||o_uncond|| alone)
    (dict(scale=0.0), "scale must be a positive number"),
    (dict(scale=-0.3), "scale must be a positive number"),
    (dict(scale=float("nan")), "scale must be a positive number"),
    (dict(scale=float("inf")), "scale must be a positive number"),
    (dict(window=-1), "window must be >= 0"),
], ids=lambda x: str(x) if isinstance(x, dict) else None)
def test_direct_op_refuses_bad_scalars_before_any_kernel(monkeypatch, change, words):
    """torch.ops.fastprobe.dual_path_attention, reachable past the public checks, refuses the
    scalars no kernel takes, by name and before choosing a kernel: the reference and Triton ran
    with a NaN gamma, eps <= 0 or scale <= 0 (NaN or silently wrong output), the C++ kernel raised
    its own error."""
    from fastprobe.ops import dual_attention

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was about to run")

    monkeypatch.setattr(dual_attention, "resolve", no_kernel)
    with pytest.raises(ValueError, match=words):
        torch.ops.fastprobe.dual_path_attention(*_op_args(**change).values())


@pytest.mark.parametrize("num_queries, num_keys", [(9, 9), (1, 520)], ids=["prefill", "decode-split"])
def test_nan_scores_give_nan_paths_not_an_unguided_row(target, num_queries, num_keys):
    """A query that sees a key with +inf entries (NaN / inf scores), or whose own q holds a NaN,
    gets NaN in out and o_cond, and in o_uncond when that key is a kept one, in every backend as in
    the reference (sink_attention's rule: NaN propagates, never the values of a row with no kept key
    or no key at all, which would hide bad input). Rows that do not see it are untouched. Decoding
    over 520 keys takes the key-split paths (C++ ranges, Triton's split kernel and merge)."""
    _, device = target
    q, k, v = random_qkv(1, 6, 3, num_queries, num_keys, 16, torch.float32, device)
    drop = torch.zeros(1, num_keys, dtype=torch.bool, device=device)
    drop[0, 2:5] = True
    kept_bad, dropped_bad = num_keys - 3, 3
    k[0, 0, kept_bad] = float("inf")  # heads 0, 1 (kv head 0): a kept key, seen from position num_keys - 3 on
    k[0, 1, dropped_bad] = float("inf")  # heads 2, 3: a dropped key, seen from position 3 on
    q[0, 5, 0, 0] = float("nan")  # head 5 (kv head 2, no bad key), its first query
    position = torch.arange(num_keys - num_queries, num_keys, device=device)
    sees_kept, sees_any = torch.zeros(2, 1, 6, num_queries, dtype=torch.bool, device=device)
    sees_kept[0, :2] = sees_any[0, :2] = position >= kept_bad
    sees_any[0, 2:4] = position >= dropped_bad
    sees_kept[0, 5, 0] = sees_any[0, 5, 0] = True
    options = dict(gamma=1.5, rows="all")
    got = dict(zip(("out", "o_cond", "o_uncond"), fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)))
    got["out only"] = fp.dual_path_attention(q, k, v, drop, **options)
    want = expected(q, k, v, drop, **options)
    assert sees_any.any() and (~sees_any).any() and (sees_any & ~sees_kept).any()
    for name, value in got.items():
        nan_rows = value.isnan().any(-1)
        bad = sees_kept if name == "o_uncond" else sees_any
        reference_rows = want[name.removesuffix(" only")].isnan().any(-1).to(device)
        assert torch.equal(reference_rows, bad), f"reference {name}: NaN rows"
        assert torch.equal(nan_rows, bad), f"{name}: NaN rows {nan_rows.nonzero().tolist()}, expected {bad.nonzero().tolist()}"
        fine = ~bad.cpu()
        torch.testing.assert_close(value.cpu().double()[fine], want[name.removesuffix(" only")][fine], rtol=1e-4,
                                   atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("scale", [3e38, torch.finfo(torch.float32).max], ids=["3e38", "float-max"])
@pytest.mark.parametrize("num_queries, num_keys", [(9, 9), (1, 520)], ids=["prefill", "decode-split"])
def test_scale_near_float_max(target, scale, num_queries, num_keys):
    """A scale past float max / log2(e) ~ 2.36e38 with tiny keys (moderate scores): the Triton
    kernels' base-2 factor scale log2(e) would overflow to inf (inf q . k: NaN or inf scores);
    kernels.attention._base2_scale halves it and doubles q instead. q scale itself overflows
    (|q| up to 20), which the C++ kernel, scaling q before the dot product, turned into NaN.
    Decoding over 520 keys takes the key-split paths. Queries are nonzero integers up to 20 and keys
    +-2^-125, so every product q_i k_i and partial sum of q . k is a normal float32 (as
    test_attention_extremes.normal_products): keys ~1e-37 gave subnormal products, which a process
    flushing them (FTZ/DAZ, which loading torch 2.4's compiled CPU code turns on) made 0, so this
    test failed after any CPU torch.compile in the same process there."""
    _, device = target
    q = torch.randint(1, 21, (1, 4, num_queries, 16)).float()  # q scale overflows (C++ scaled q first)
    q = q * torch.randn(q.shape).sign()
    k, v = torch.randn(1, 2, num_keys, 16).sign() * 2.0 ** -125, torch.randn(1, 2, num_keys, 16)
    drop = torch.zeros(1, num_keys, dtype=torch.bool)
    drop[0, 2:5] = True
    options = dict(gamma=0.7, rows="all", scale=scale)
    got = fp.dual_path_attention(q.to(device), k.to(device), v.to(device), drop.to(device), return_paths=True,
                                 **options)
    assert_paths_match(got, expected(q, k, v, drop, **options), torch.float32,
                       atol=score_tolerance(q, k, v, scale)["atol"])  # (scores ~ hundreds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["huge", "same-sign", "mixed"])
@pytest.mark.parametrize("num_queries", [37, 1], ids=["prefill", "decode"])
def test_values_near_float_max(target, dtype, kind, num_queries, request):
    """Values near float max (test_attention_extremes.values_near_float_max) with near-equal
    scores: each path's unnormalised accumulator reaches n max |v| over n keys and overflowed
    float32 (o_cond, o_uncond and out inf / NaN) where the float64 reference is finite. Each
    output column within the dtype's tolerance of its values' largest magnitude. Guided: the last
    row, whose paths average many values (out = o_cond + gamma (...) past float max elsewhere)."""
    from .test_attention_extremes import TRITON_VALUES_LIMIT, assert_out_matches_per_column, values_near_float_max

    if target[0] == "triton":
        request.applymarker(pytest.mark.xfail(strict=True, reason=TRITON_VALUES_LIMIT))
    _, device = target
    batch, heads, kv_heads, num_keys, head_dim = 2, 4, 2, 37, 16
    q = (1e-3 * torch.randn(batch, heads, num_queries, head_dim)).to(dtype)
    k = torch.randn(batch, kv_heads, num_keys, head_dim).to(dtype)
    v = values_near_float_max(kind, (batch, kv_heads, num_keys, head_dim)).to(dtype)
    drop = image_keys(batch, num_keys, "cpu")
    options = dict(gamma=0.3, rows="last")
    want = expected(q, k, v, drop, **options)
    got = fp.dual_path_attention(q.to(device), k.to(device), v.to(device), drop.to(device), return_paths=True, **options)
    for name, value in zip(("out", "o_cond", "o_uncond"), got):
        assert_out_matches_per_column(value, want[name], v, dtype)


@pytest.mark.parametrize("gamma, orthogonalize", [(1.0, True), (-0.5, False)], ids=["orthogonal", "plain"])
def test_guidance_of_paths_near_float_max(target, gamma, orthogonalize, request):
    """o_cond ~ +3e38 (dropped keys of values ~3e38 dominate it) and o_uncond ~ -3e38 (the kept
    keys' values): dO = o_cond - o_uncond overflows float32, while out is finite, ~0 after the
    projection (dO along o_uncond) or o_cond - dO / 2 = (o_cond + o_uncond) / 2 plain. The C++
    kernel's guidance gave NaN / -inf; it now takes double where float's dO overflows."""
    from .test_attention_extremes import TRITON_VALUES_LIMIT, assert_out_matches_per_column

    if target[0] == "triton":
        request.applymarker(pytest.mark.xfail(strict=True, reason=TRITON_VALUES_LIMIT))
    _, device = target
    num_queries, num_keys, head_dim = 4, 40, 8
    q = torch.zeros(1, 2, num_queries, head_dim)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, num_keys, head_dim)
    k[..., 10:20, 0] = 30.0
    drop = torch.zeros(1, num_keys, dtype=torch.bool)
    drop[:, 10:20] = True
    v = -(2.9e38 + 1e37 * torch.rand(1, 1, num_keys, head_dim))
    v[..., 10:20, :] = -v[..., 10:20, :]
    options = dict(gamma=gamma, orthogonalize=orthogonalize, rows="all", causal=False, scale=1.0)
    want = expected(q, k, v, drop, **options)
    got = fp.dual_path_attention(q.to(device), k.to(device), v.to(device), drop.to(device), return_paths=True, **options)
    for name, value in zip(("out", "o_cond", "o_uncond"), got):
        assert_out_matches_per_column(value, want[name], v, torch.float32)
