"""Hand-made per-position key bounds (the raw ops' start and horizon, a SegmentSpans or BlockHorizon
built by hand, per-position sink / statistics ends) give the same results in every backend: the
query at position p sees keys clamp(start[b, p], 0, p) <= j <= clamp(horizon[b, p], p, Lk - 1)
(without a horizon: j <= p causal, every key otherwise), with sink keys j < sink_end[b, p],
whatever int64 values they hold. The reference backend (float64) is compared with the C++ kernels
and with the Triton kernels (interpreter, GPU)."""

import pytest
import torch

import fastprobe as fp
from fastprobe.ops.attention import BlockHorizon, SegmentSpans, _sink_attention_op
from fastprobe.ops.dual_attention import _dual_path_attention_op

from .conftest import ATOL, RTOL

BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 16
BIG = 2**62


def hand_made(num_keys: int) -> torch.Tensor:
    """int64 [B, Lk]: mostly positions near the keys (below 0, inside, past Lk), some far outside
    int64's and int32's ranges, in random places."""
    near = torch.randint(-3, num_keys + 3, (BATCH, num_keys))
    far = torch.tensor([-BIG, BIG, 2**31 + 5, -(2**31) - 5, 2**32 - 17, num_keys + 1000])
    pick = far[torch.randint(0, len(far), (BATCH, num_keys))]
    return torch.where(torch.rand(BATCH, num_keys) < 0.25, pick, near)


def reference_of(call, *tensors):
    """call(*tensors) by the reference backend in float64."""
    with fp.use_backend("reference"):
        return call(*(t.double() for t in tensors))


def assert_agree(got, want):
    for index, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b, rtol=RTOL, atol=ATOL, msg=lambda m: f"output {index}: {m}")


# (Lq, Lk): prefill, queries after a cache, decode
SHAPES = [(23, 23), (7, 29), (1, 31)]
# (causal, window, with start, with horizon, per-position sink ends)
OPTIONS = [
    (True, 0, True, True, False), (True, 4, True, True, True), (False, 0, True, True, False),
    (False, 5, True, False, True), (True, 0, False, True, False), (False, 3, False, True, False),
    (True, 3, True, False, False),
]


def shared_inputs(target, shape, options):
    """The device, q, k, v, key_real and the hand-made (start, horizon) (None where options leave
    them out)."""
    _, device = target
    num_queries, num_keys = shape
    _, _, with_start, with_horizon, _ = options
    q = torch.randn(BATCH, HEADS, num_queries, HEAD_DIM, device=device)
    k, v = torch.randn(2, BATCH, KV_HEADS, num_keys, HEAD_DIM, device=device).unbind(0)
    key_real = (torch.rand(BATCH, num_keys, device=device) < 0.85).to(torch.uint8)
    start = hand_made(num_keys).to(device) if with_start else None
    horizon = hand_made(num_keys).to(device) if with_horizon else None
    return device, q, k, v, key_real, start, horizon


def each_case(test):
    """test parametrised over SHAPES and OPTIONS."""
    test = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}q{s[1]}k")(test)
    return pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "causal" if o[0] else "bidirectional")(test)


@each_case
def test_sink_attention_op_with_hand_made_bounds_matches_reference(target, shape, options):
    device, q, k, v, key_real, start, horizon = shared_inputs(target, shape, options)
    causal, window, _, _, row_ends = options
    num_keys = shape[1]
    # sink / statistics ends per position ([B, Lk], as with segments) or per row ([B])
    sink_end, stat_end = ((ends if row_ends else ends[:, 0].contiguous()).to(device)
                          for ends in (hand_made(num_keys), hand_made(num_keys)))
    groups = torch.randint(0, 3, (BATCH, num_keys), dtype=torch.int32, device=device)

    def call(q, k, v):
        sink_logit = torch.linspace(-1, 1, HEADS, dtype=q.dtype, device=device)
        return _sink_attention_op(q, k, v, 0.3, causal, window, key_real, sink_end, stat_end, None, sink_logit,
                                  groups, 3, 0.0, horizon, start, True)

    assert_agree(call(q, k, v), reference_of(call, q, k, v))


@each_case
def test_dual_path_attention_op_with_hand_made_bounds_matches_reference(target, shape, options):
    device, q, k, v, key_real, start, horizon = shared_inputs(target, shape, options)
    causal, window = options[:2]
    num_queries, num_keys = shape
    drop = (torch.rand(BATCH, num_keys, device=device) < 0.3).to(torch.uint8)
    rows = (torch.rand(BATCH, num_queries, device=device) < 0.7).to(torch.uint8)

    def call(q, k, v):
        return _dual_path_attention_op(q, k, v, drop, rows, key_real, 0.7, True, 1e-6, 0.3, causal, horizon, start,
                                       window, True)

    assert_agree(call(q, k, v), reference_of(call, q, k, v))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_public_call_with_hand_made_spans_and_horizon_matches_reference(target, causal):
    """sink_attention with a SegmentSpans and a BlockHorizon built by hand (not re-checked) and a
    padding mask: the per-position sink ends found from the hostile starts, and the bounds, act
    alike in every backend."""
    backend, device = target
    num_queries, num_keys = (7, 29) if backend == "triton" and device == "cpu" else (19, 41)
    q = torch.randn(BATCH, HEADS, num_queries, HEAD_DIM, device=device)
    k, v = torch.randn(2, BATCH, KV_HEADS, num_keys, HEAD_DIM, device=device).unbind(0)
    mask = torch.rand(BATCH, num_keys, device=device) < 0.8
    spans = SegmentSpans(hand_made(num_keys).to(device), hand_made(num_keys).to(device))
    blocks = BlockHorizon(hand_made(num_keys).to(device), num_queries)

    def call(q, k, v):
        result = fp.sink_attention(q, k, v, causal=causal, key_padding_mask=mask, segment_ids=spans,
                                   bidirectional_blocks=blocks, num_sink=2, stat_tokens=2, window=5,
                                   return_entropy=True)
        return result.out, result.lse, result.sink_mass, result.entropy

    assert_agree(call(q, k, v), reference_of(call, q, k, v))
