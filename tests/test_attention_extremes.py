"""sink_attention at float32's extremes: sink logits, scales, soft caps and scores near float max,
where the true result (the float64 reference) is finite in float32. The Triton kernels keep their
scores in base 2 (t = s log2(e)), so every constant they fold log2(e) into, and every difference
of two scores, can overflow where the natural-unit math does not. Each case runs the prefill
path and the decode path (Triton: split-K forced on a short cache, so a split and the merge see
the extreme values)."""

import functools

import pytest
import torch

import fastprobe as fp

from .conftest import ATOL, RTOL
from .test_attention import OUT_TOLERANCE, STATS, assert_matches, expected

FLOAT32_MAX = torch.finfo(torch.float32).max
BATCH, HEADS, KV_HEADS, KEYS, DIM = 2, 2, 1, 20, 16  # 20 keys: two interpreter blocks, two decode splits


def random_qkv(num_queries, q_scale=1.0, k_scale=1.0):
    """q and k drawn at q_scale and k_scale, q within 4 q_scale."""
    q = q_scale * torch.randn(BATCH, HEADS, num_queries, DIM).clamp(-4.0, 4.0)
    k = k_scale * torch.randn(BATCH, KV_HEADS, KEYS, DIM)
    return q, k, torch.randn(BATCH, KV_HEADS, KEYS, DIM)


def sign_qkv(num_queries):
    """q and k of entries +-1, so that q . k is an even integer in [-16, 16]: times scale / c it is
    0 or a normal float32, never a subnormal that a process flushing them (FTZ/DAZ, which loading
    torch 2.4's compiled CPU code turns on) would make 0."""
    q = torch.randn(BATCH, HEADS, num_queries, DIM).sign()
    k = torch.randn(BATCH, KV_HEADS, KEYS, DIM).sign()
    return q, k, torch.randn(BATCH, KV_HEADS, KEYS, DIM)

def one_hot_scores(num_queries, scores, batch=BATCH, num_keys=KEYS):
    """q = e_0 and k[:, 0] = scores, so that with scale 1 every query's score on key j is exactly
    scores[j] (a float32 value of any size: the product q . k never overflows)."""
    q = torch.zeros(batch, HEADS, num_queries, DIM)
    q[..., 0] = 1.0
    k = torch.zeros(batch, KV_HEADS, num_keys, DIM)
    k[..., 0] = torch.as_tensor(scores, dtype=torch.float32)
    return q, k, torch.randn(batch, KV_HEADS, num_keys, DIM)


def far_keys_and_sinks(num_queries):
    """Head 0's scores at -1e38 and below under a sink logit of 3e38, head 1's at +1e38 and above
    (the same keys, q negated) over a sink logit of -3e38 (each query's largest score unique): the
    keys' max and the sink logit lie 4e38 apart, which overflows."""
    q, k, v = one_hot_scores(num_queries, -1e38 - 1e36 * torch.arange(KEYS, dtype=torch.float64))
    q[:, 1] = -q[:, 1]
    return q, k, v, dict(scale=1.0, sink_logit=torch.tensor([3e38, -3e38]), num_sink=1, key_groups=groups(),
                         num_groups=3)


def spread_scores():
    """Scores of both signs past FLT_MAX / (2 log2 e) ~ 1.18e38, each query's largest unique (the
    float64 reference loses ties at this size): key 0 and the other keys of the first block at
    -1.2e38 and below, key 17 at +1.2e38, the rest of the second block at -1.3e38 and below. In
    base 2 the step from the first block's max to key 17's (and a split's max to the merged one)
    is -3.5e38, and key 17's max minus the second block's other keys -3.6e38: both overflow."""
    scores = -1.2e38 - 1e36 * torch.arange(KEYS, dtype=torch.float64)
    scores[16:] = -1.3e38 - 1e36 * torch.arange(4, dtype=torch.float64)
    scores[17] = 1.2e38
    return scores


def groups():
    return torch.arange(KEYS).remainder(3).expand(BATCH, KEYS).contiguous()


# (name, make(num_queries) -> (q, k, v, options)); scale 1 with one_hot_scores
CASES = [
    # the sink logit in base 2, 3e38 log2(e), overflows: every key's weight is 0, lse = 3e38
    ("sink_logit=3e38", lambda n: (*random_qkv(n), dict(sink_logit=torch.tensor([3e38, -2.5e38]), num_sink=1,
                                                         key_groups=groups(), num_groups=3))),
    # ... and 4e38 away from the keys' max, above or below it
    ("sink_logit=+-3e38-far-keys", far_keys_and_sinks),
    # the sink alone (no visible key): lse = -3e38, whose base-2 form is -inf (no sink)
    ("sink_logit=-3e38-alone", lambda n: (*random_qkv(n), dict(
        sink_logit=torch.tensor([-3e38, -FLOAT32_MAX]),
        key_padding_mask=torch.arange(KEYS).expand(BATCH, KEYS) >= torch.tensor([[KEYS], [3]])))),
    # a soft cap near float max: c log2(e) overflows (the cap is then nearly the identity); scale
    # 4 keeps scale / c a normal float32 (Triton 3.0's interpreter takes a subnormal as float64)
    ("softcap=3e38", lambda n: (*sign_qkv(n), dict(softcap=3e38, scale=4.0, num_sink=1))),
    # ... and with scores ~1e30 (scale / c ~ 3e-9): a one-hot softmax, lse ~1e30 (q . k exact: lse
    # is then a score itself, and a float32 dot product's cancellation, e.g. 0.0038 from terms
    # summing to 9 in magnitude, would be its relative error)
    ("softcap=float-max", lambda n: (*sign_qkv(n), dict(softcap=FLOAT32_MAX, scale=1e30,
                                                           sink_logit=torch.tensor([1.0, 2.0])))),
    # scale / c = 1e41 overflows float32: the capped scores are +-c, or 0 for a zero query
    ("scale/softcap-overflows", lambda n: (*zero_first_query(random_qkv(n, q_scale=1e-3)),
                                           dict(scale=1e38, softcap=1e-3))),
    # scale log2(e) overflows float32 while the scores are moderate (tiny keys)
    ("scale=3e38", lambda n: (*normal_products(n, 1), dict(scale=3e38, num_sink=1))),
    ("scale=float-max", lambda n: (*normal_products(n, 1), dict(scale=FLOAT32_MAX))),
    # ... with |q| up to 4: q scale overflows float32 (for |q| >= 2), scale (q . k) does not (the
    # C++ kernel scaled q first: NaN, or nothing visible; it scales the dot product when scale > 1)
    ("scale=3e38-large-q", lambda n: (*normal_products(n, 4), dict(scale=3e38, num_sink=1))),
    # scores of both signs near float max / 2: differences of base-2 scores overflow
    ("scores=+-1.2e38", lambda n: (*one_hot_scores(n, spread_scores()), dict(scale=1.0, num_sink=1,
                                                                             key_groups=groups(), num_groups=3))),
]


# cases the C++ kernel gets wrong (none at present)
CPP_KNOWN = {}


def normal_products(num_queries, q_max):
    """Keys +-2^-125 (scores ~ tens to hundreds at scale 3e38) and queries nonzero integers in
    [-q_max, q_max]: every product q_i k_i and partial sum of q . k is a multiple of 2^-125, a
    normal float32, never a subnormal that a process flushing them (FTZ/DAZ, which torch 2.4's
    compiled CPU code turns on) would make 0 (keys ~1e-37 times queries ~0.2 were: scores O(1) off
    after any CPU torch.compile in the process)."""
    q = torch.randint(1, q_max + 1, (BATCH, HEADS, num_queries, DIM)).float()
    q = q * torch.randn(q.shape).sign()
    k = torch.randn(BATCH, KV_HEADS, KEYS, DIM).sign() * 2.0 ** -125
    return q, k, torch.randn(BATCH, KV_HEADS, KEYS, DIM)


def zero_first_query(qkv):
    q, k, v = qkv
    q[:, :, 0] = 0.0
    return q, k, v


@pytest.fixture(params=["prefill", "decode"])
def num_queries(request, target, monkeypatch):
    """Lq: the whole sequence (prefill) or one query (decode); for Triton, decode forces the
    split-K path with two splits (the automatic choice wants >= 512 keys)."""
    if request.param == "prefill":
        return KEYS
    if target[0] == "triton":
        from fastprobe.kernels import attention as triton_attention

        monkeypatch.setattr(triton_attention, "sink_attention",
                            functools.partial(triton_attention.sink_attention, split_keys=2))
    return 1


@pytest.mark.parametrize("case", CASES, ids=lambda case: case[0])
def test_extreme_values_match_reference(target, num_queries, case, request):
    """Every output (out, lse, sink_mass, group_mass, entropy) matches the float64 reference,
    finite where it is finite."""
    _, device = target
    name, make = case
    if target[0] == "cpp" and name in CPP_KNOWN:
        request.applymarker(pytest.mark.xfail(strict=True, reason=CPP_KNOWN[name]))
    q, k, v, options = make(num_queries)
    want = expected(q, k, v, **options)
    assert all(bool(torch.isfinite(want[field]).all()) for field in ("out", "sink_mass", "entropy"))
    assert not want["lse"].isnan().any() and not want["lse"].abs().gt(FLOAT32_MAX).any()
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    result = fp.sink_attention(q.to(device), k.to(device), v.to(device), return_entropy=True, **moved)
    assert_matches(result, want, torch.float32, "key_groups" in options, True, rtol=RTOL, atol=ATOL)


def test_scale_times_scores_overflow_tamed_by_softcap(target, num_queries):
    """scale q . k overflows float32 (scale 1e38, |q . k| ~ 1..50) where the soft cap brings
    every score back to [-30, 30]: the kernels multiply q . k by scale / c, never by scale
    alone. (Multiplying q by the scale first, q . k overflows: query 0 on key 0, whose products
    are 9e38 and -9e38, would get NaN for its true score 0.)"""
    _, device = target
    q, k, v = random_qkv(num_queries)
    q[..., 0, :2] = 3.0
    k[..., 0, :2] = torch.tensor([3.0, -3.0])
    k[..., 0, 2:] = 0.0
    options = dict(scale=1e38, softcap=30.0)
    want = expected(q, k, v, **options)
    result = fp.sink_attention(q.to(device), k.to(device), v.to(device), return_entropy=True, **options)
    assert_matches(result, want, torch.float32, False, True)



@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_max_jump_past_float_max_between_blocks_and_splits(target, mode, monkeypatch):
    """The running max jumping by more than float max between key blocks (C++: 64 keys; Triton:
    its block size) and between the key ranges a decoding call merges (C++: the 512 keys of one
    item make two ranges; Triton: split_keys=2): the old part of the entropy sum, alpha (A +
    (m - m') l), has alpha = 0 and m - m' = -inf there, which must count as 0, not NaN. Keys
    128..255 (blocks 2 and 3) score about +1.75e38, the others about -1.75e38 (head 0; head 1
    the negation), each row's largest unique: head 0's max jumps up at key 128, and the first
    range's max lies 3.5e38 above the second's. 64 queries or one."""
    backend, device = target
    num_keys, num_queries = 512, 64 if mode == "prefill" else 1
    if backend == "triton" and mode == "decode":
        from fastprobe.kernels import attention as triton_attention

        monkeypatch.setattr(triton_attention, "sink_attention",
                            functools.partial(triton_attention.sink_attention, split_keys=2))
    key = torch.arange(num_keys, dtype=torch.float64)
    sign = torch.where((key >= 128) & (key < 256), 1.0, -1.0)
    q, k, v = one_hot_scores(num_queries, sign * 1.75e38 - 1e35 * key, batch=1, num_keys=num_keys)
    q[:, 1] = -q[:, 1]
    options = dict(scale=1.0, causal=False, num_sink=1, sink_logit=torch.tensor([-3e38, -3e38]))
    want = expected(q, k, v, **options)
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    result = fp.sink_attention(q.to(device), k.to(device), v.to(device), return_entropy=True, **moved)
    assert_matches(result, want, torch.float32, False, True, rtol=RTOL, atol=ATOL)


# The Triton kernels' unnormalised accumulator acc = sum_j 2^(t_j - m) v_j overflows float32 as
# the C++ kernels' did (kernels/attention.py and kernels/dual_attention.py, "Known limit").
TRITON_VALUES_LIMIT = "Triton: the unnormalised accumulator overflows for values near float max (known limit)"


def values_near_float_max(kind, shape):
    """Values of random signs with |v| in [1e38, 3.3e38] ("huge"), or all in [3.2e38, 3.3e38]
    ("same-sign"; bfloat16's largest finite value is 3.39e38), or ("mixed") huge even columns, odd columns of |v| ~1e-30 and a last column of
    ordinary values: each output column then has its own magnitude."""
    sign = torch.randn(shape).sign()
    if kind == "same-sign":
        return 3.2e38 + 1e37 * torch.rand(shape)
    v = sign * (1e38 + 2.3e38 * torch.rand(shape))
    if kind == "mixed":
        v[..., 1::2] = sign[..., 1::2] * 1e-30 * (1.0 + torch.rand(v[..., 1::2].shape))
        v[..., -1] = torch.randn(shape[:-1])
    return v


def assert_out_matches_per_column(got, want, v, dtype):
    """out within the dtype's tolerance relative to the largest |v| of its column (per batch and kv
    head): a float32 sum of terms up to 3e38 of both signs is accurate to ~1e-7 of them, not of
    its (possibly much smaller) result; a column of 1e-30 values is held to its own scale."""
    rtol, atol = OUT_TOLERANCE[dtype]
    group = got.shape[1] // v.shape[1]
    column = v.double().abs().amax(dim=2, keepdim=True).repeat_interleave(group, dim=1)  # [B, Hq, 1, Dv]
    assert torch.isfinite(want.float()).all(), "the reference itself is past float max"
    torch.testing.assert_close(got.cpu().double() / column, want / column, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["huge", "same-sign", "mixed"])
def test_values_near_float_max(target, num_queries, dtype, kind, request):
    """out = sum_j p_j v_j is a convex combination of the values (|out| <= max |v|), but the
    unnormalised accumulator O = sum_j e_j v_j (e_j <= 1) reaches n max |v| over n keys of
    near-equal scores: it overflowed float32 (out +-inf) where the float64 reference is finite.
    Near-equal scores (|q| ~ 1e-3), GQA, a window with a sink key, a sink logit and key groups;
    the statistics (which do not read the values) as usual."""
    if target[0] == "triton":
        request.applymarker(pytest.mark.xfail(strict=True, reason=TRITON_VALUES_LIMIT))
    _, device = target
    q, k, _ = random_qkv(num_queries, q_scale=1e-3)
    v = values_near_float_max(kind, (BATCH, KV_HEADS, KEYS, DIM))
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    options = dict(window=6, num_sink=1, sink_logit=torch.tensor([0.5, -1.0]), key_groups=groups(), num_groups=3)
    want = expected(q, k, v, **options)
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    result = fp.sink_attention(q.to(device), k.to(device), v.to(device), return_entropy=True, **moved)
    assert_out_matches_per_column(result.out, want["out"], v, dtype)
    assert_matches(result._replace(out=want["out"].to(dtype)), want, dtype, True, True)  # the statistics
    # ... bit for bit those of ordinary values (the statistics never read the values)
    ordinary = fp.sink_attention(q.to(device), k.to(device), torch.randn(v.shape).to(dtype).to(device),
                                 return_entropy=True, **moved)
    for field in STATS:
        assert torch.equal(getattr(result, field), getattr(ordinary, field)), field


@pytest.mark.parametrize("mode", ["prefill", "decode"])
def test_values_near_float_max_over_blocks_and_splits(target, mode, monkeypatch, request):
    """Values near float max over 512 keys: O rescaled across key blocks (C++: 64 keys; Triton:
    its block size) and merged across the key ranges of a decoding call (C++: one item's 512 keys
    make two ranges; Triton: split_keys=2), 64 queries or one. Head 1's scores tie near 0, head
    0's favour keys 200..299 (q . k ~ 3, so both heads keep many keys of weight near 1)."""
    backend, device = target
    if backend == "triton":
        request.applymarker(pytest.mark.xfail(strict=True, reason=TRITON_VALUES_LIMIT))
    num_keys, num_queries = 512, 64 if mode == "prefill" else 1
    if backend == "triton" and mode == "decode":
        from fastprobe.kernels import attention as triton_attention

        monkeypatch.setattr(triton_attention, "sink_attention",
                            functools.partial(triton_attention.sink_attention, split_keys=2))
    q = torch.zeros(1, HEADS, num_queries, DIM)
    q[:, 0, :, 0] = 1.0
    q[:, 1] = 1e-3 * torch.randn(num_queries, DIM)
    k = 1e-3 * torch.randn(1, KV_HEADS, num_keys, DIM)
    k[:, :, 200:300, 0] = 3.0
    v = values_near_float_max("huge", (1, KV_HEADS, num_keys, DIM))
    options = dict(scale=1.0, causal=False, num_sink=1, sink_logit=torch.tensor([-3.0, 1.0]))
    want = expected(q, k, v, **options)
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    result = fp.sink_attention(q.to(device), k.to(device), v.to(device), return_entropy=True, **moved)
    assert_out_matches_per_column(result.out, want["out"], v, torch.float32)
    assert_matches(result._replace(out=want["out"].float()), want, torch.float32, False, True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("num_queries", [1, 3])
def test_values_near_float_max_in_a_window_of_a_long_cache(target, causal, num_queries, request):
    """Values near float max, queries at the end of a 700-key cache with a window of 50 (no sink
    key): only the window's key blocks are attended, and the C++ rescue copies only those (from
    the window's first block on, not from key 0), reading key j of its copy at j - first."""
    backend, device = target
    if backend == "triton":
        request.applymarker(pytest.mark.xfail(strict=True, reason=TRITON_VALUES_LIMIT))
    num_keys = 700
    q = 1e-3 * torch.randn(1, HEADS, num_queries, DIM)
    k = torch.randn(1, KV_HEADS, num_keys, DIM)
    v = values_near_float_max("huge", (1, KV_HEADS, num_keys, DIM))
    options = dict(causal=causal, window=50)
    want = expected(q, k, v, **options)
    result = fp.sink_attention(q.to(device), k.to(device), v.to(device), return_entropy=True, **options)
    assert_out_matches_per_column(result.out, want["out"], v[:, :, num_keys - 100:], torch.float32)
    assert_matches(result._replace(out=want["out"].float()), want, torch.float32, False, True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("num_queries", [1, 3])
def test_values_near_float_max_with_sinks_and_a_window_of_a_long_cache(target, causal, num_queries, request):
    """Queries at the end of a 700-key cache with 4 sink keys and a window of 50: the C++ kernel
    attends the sink keys' block and the window's (keys 0..63 and 640..699), and its rescue scales
    and copies only those. Even columns near float max there; odd columns 2e-38..4e-38 there, whose
    O never overflows, so they keep their bits (those of the same call without the huge columns,
    which takes no rescue); every column 3e38 on the keys between (which no row sees). The rescue
    took its scales from all of keys 0..699: the odd columns were scaled by 2^-12 into subnormals
    (errors 7e-5 of their size; 0 where FTZ / DAZ is on). The copy must hold both blocks (the
    old code copied all of keys 0..699: that part is a guard)."""
    backend, device = target
    if backend == "triton":
        request.applymarker(pytest.mark.xfail(strict=True, reason=TRITON_VALUES_LIMIT))
    num_keys, window, num_sink = 700, 50, 4
    q = 1e-3 * torch.randn(1, HEADS, num_queries, DIM)
    k = torch.randn(1, KV_HEADS, num_keys, DIM)
    v = values_near_float_max("huge", (1, KV_HEADS, num_keys, DIM))
    v[..., 1::2] = 2e-38 * (1.0 + torch.rand(v[..., 1::2].shape))  # normal floats, near the least
    v[:, :, 64:640] = 3e38  # unseen: after the sink keys' block, before the window's
    options = dict(causal=causal, window=window, num_sink=num_sink)
    want = expected(q, k, v, **options)
    result = fp.sink_attention(q.to(device), k.to(device), v.to(device), return_entropy=True, **options)
    seen = torch.cat([v[:, :, :num_sink], v[:, :, num_keys - window - num_queries:]], dim=2)
    assert_out_matches_per_column(result.out, want["out"], seen, torch.float32)
    assert_matches(result._replace(out=want["out"].float()), want, torch.float32, False, True)
    ordinary = v.clone()
    ordinary[..., 0::2] = torch.randn(v[..., 0::2].shape)
    plain = fp.sink_attention(q.to(device), k.to(device), ordinary.to(device), **options).out
    assert torch.equal(result.out[..., 1::2], plain[..., 1::2])


@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_infinite_values_stay_as_the_reference(target, num_queries, kind):
    """A value that is really inf (or NaN) next to values near float max gives what the float64
    reference gives: its column inf / NaN in every row that weighs it (the rescue of an overflowed
    accumulator does not hide it), every other column finite and close."""
    if target[0] == "triton":
        pytest.skip(TRITON_VALUES_LIMIT + ": an inf value's column may come out NaN")
    _, device = target
    q, k, _ = random_qkv(num_queries, q_scale=1e-3)
    v = values_near_float_max("huge", (BATCH, KV_HEADS, KEYS, DIM))
    v[:, :, 0, 3] = float(kind)
    want = expected(q, k, v, causal=False)["out"]
    result = fp.sink_attention(q.to(device), k.to(device), v.to(device), causal=False).out.cpu().double()
    assert torch.equal(result[..., 3].isnan(), want[..., 3].isnan())
    assert torch.equal(result[..., 3].isinf(), want[..., 3].isinf())
    others = [d for d in range(DIM) if d != 3]
    assert_out_matches_per_column(result[..., others], want[..., others], v[..., others], torch.float32)
