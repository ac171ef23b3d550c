"""sink_attention's Triton kernels with hostile index values, run through the interpreter under the
bounds checker (tests/_interpreter_bounds.py): what the raw op torch.ops.fastprobe.sink_attention
(reachable past the public checks) or the public function with its host checks skipped (vmap,
torch.compile) can hand the kernels. Every load and store of every launch must stay inside the
launch's tensors and every launch must end; the results of such calls are unspecified (valid
inputs are the other tests' business)."""

import contextlib
import functools

import pytest
import torch

import fastprobe as fp
from fastprobe.ops.attention import _sink_attention_op

pytest.importorskip("triton")
from triton.runtime import interpreter  # noqa: E402

from ._interpreter_bounds import bounds_checked  # noqa: E402

pytestmark = pytest.mark.interpreter

BATCH, HEADS, KV_HEADS, GROUPS = 2, 4, 2, 3
BIG = 2**62
INT32_EDGES = [-(2**31), 2**31 - 1]
LOAD_BUDGET = 20_000


def hostile_int64(shape, num_keys):
    """int64 values far outside the keys and just outside them, in random places; some of them
    wrap to other values outside the keys in int32 (2^31 + 5 -> -2^31 + 5, 2^32 - 17 -> -17)."""
    pool = torch.tensor([-BIG, BIG, 2**31 + 5, -(2**31) - 5, 2**32 - 17, -(2**32) + num_keys + 40, -1, -17, -1000,
                         num_keys, num_keys + 1, num_keys + 17, num_keys + 1000, 0, 3])
    return pool[torch.randint(0, len(pool), shape)]


def hostile_group_ids(num_keys):
    """int32 group ids [B, Lk], in random places: int32's extremes, -1, G and G + 16, and valid ones."""
    pool = torch.tensor([*INT32_EDGES, -1, GROUPS, GROUPS + 16, 0, 1, 2], dtype=torch.int32)
    return pool[torch.randint(0, len(pool), (BATCH, num_keys))]


# (name, causal, overrides of the op's arguments made from Lk): one kind of hostile value each,
# then all of them at once
CASES = [
    ("sink_end=-2^62", True, lambda n: dict(sink_end=torch.full((BATCH,), -BIG))),
    ("sink_end=2^62", True, lambda n: dict(sink_end=torch.full((BATCH,), BIG), window=3)),
    ("stat_end=2^62", True, lambda n: dict(stat_end=torch.tensor([BIG, -BIG]))),
    ("ends=2^62-bidirectional", False, lambda n: dict(sink_end=torch.tensor([BIG, n + 1]), window=2)),
    ("row-ends", True, lambda n: dict(sink_end=hostile_int64((BATCH, n), n), stat_end=hostile_int64((BATCH, n), n),
                                      window=4)),
    ("row-ends-bidirectional", False, lambda n: dict(sink_end=hostile_int64((BATCH, n), n),
                                                     stat_end=hostile_int64((BATCH, n), n), window=4)),
    ("horizon", True, lambda n: dict(horizon=hostile_int64((BATCH, n), n))),
    ("horizon-bidirectional", False, lambda n: dict(horizon=hostile_int64((BATCH, n), n), window=5)),
    ("start", True, lambda n: dict(start=hostile_int64((BATCH, n), n), window=6)),
    ("start-bidirectional", False, lambda n: dict(start=hostile_int64((BATCH, n), n))),
    ("key_groups", True, lambda n: dict(key_groups=hostile_group_ids(n))),
    ("key_groups-one-group", False, lambda n: dict(key_groups=hostile_group_ids(n), num_groups=1)),
    ("masks=0..255", True, lambda n: dict(key_real=torch.randint(0, 256, (BATCH, n), dtype=torch.uint8),
                                          head_mask=torch.tensor([0, 2, 255, 1], dtype=torch.uint8))),
    ("window=2^62", True, lambda n: dict(window=BIG)),
    ("everything", True, lambda n: dict(
        sink_end=hostile_int64((BATCH, n), n), stat_end=hostile_int64((BATCH, n), n), horizon=hostile_int64((BATCH, n), n),
        start=hostile_int64((BATCH, n), n), key_groups=hostile_group_ids(n),
        key_real=torch.randint(0, 256, (BATCH, n), dtype=torch.uint8), head_mask=torch.tensor([3, 0, 1, 200], dtype=torch.uint8),
        sink_logit=torch.randn(HEADS), window=2)),
    ("everything-bidirectional", False, lambda n: dict(
        sink_end=hostile_int64((BATCH, n), n), stat_end=hostile_int64((BATCH, n), n), horizon=hostile_int64((BATCH, n), n),
        start=hostile_int64((BATCH, n), n), key_groups=hostile_group_ids(n), key_real=torch.randint(0, 256, (BATCH, n), dtype=torch.uint8),
        window=3)),
]

# (name, Lq, Lk, D, Dv, dtype, split_keys, interpreter blocks): prefill with Lq = Lk and Lq < Lk, the
# decode (split-K) path, a narrow head dim padded to its block (8 of 16) and a narrower value head,
# a head dim in a head and a tail block (40 = 32 + 8 of 16), float16 and bfloat16, and the GPU's
# wider blocks (the keys in one partial block) instead of the interpreter's 16
PATHS = [
    ("prefill", 37, 37, 16, 16, torch.float32, 0, {}),
    ("prefill-short-q-narrow-head-f16", 5, 41, 8, 4, torch.float16, 0, {}),
    ("prefill-wide-blocks-bf16", 37, 37, 16, 16, torch.bfloat16, 0, dict(BLOCK_M=64, BLOCK_N=64)),
    ("decode-split", 1, 41, 16, 16, torch.float32, 3, {}),
    ("decode-2q-tail-head-f16", 2, 41, 40, 24, torch.float16, 2, {}),
    ("decode-3q-wide-blocks-bf16", 3, 41, 16, 16, torch.bfloat16, 2, dict(BLOCK_N=64)),
]


class LoadBudgetSpent(AssertionError):
    pass


@contextlib.contextmanager
def load_budget(limit: int):
    """Inside bounds_checked(): at most `limit` loads (the interpreter's, each a tile) in this
    context, else LoadBudgetSpent: a key loop run to a hostile bound (2^31 keys) ends as a failure
    instead of running for hours. The calls here make at most ~500."""
    builder = interpreter.InterpreterBuilder
    checked = builder.create_masked_load
    count = [0]

    def counted(self, *args):
        count[0] += 1
        if count[0] > limit:
            raise LoadBudgetSpent(f"more than {limit} loads: a loop ran past the keys")
        return checked(self, *args)

    builder.create_masked_load = counted
    try:
        yield count
    finally:
        builder.create_masked_load = checked


def run_op(q, k, v, causal, *, window=0, key_real=None, sink_end=None, stat_end=None, head_mask=None, sink_logit=None,
           key_groups=None, num_groups=GROUPS, horizon=None, start=None):
    """The raw op with the given arguments, the others valid (ends of one key: the [B] form)."""
    ends = torch.ones(q.shape[0], dtype=torch.int64)
    sink_end = ends if sink_end is None else sink_end
    stat_end = ends if stat_end is None else stat_end
    return _sink_attention_op(q, k, v, 0.25, causal, window, key_real, sink_end, stat_end, head_mask, sink_logit,
                              key_groups, num_groups if key_groups is not None else 0, 0.0, horizon, start, True)


def force_split_keys(monkeypatch, splits, blocks=None):
    """The Triton launcher with split_keys forced (0: prefill) and, with blocks, the interpreter's
    block sizes of that path replaced."""
    from fastprobe.kernels import attention as triton_attention

    monkeypatch.setattr(triton_attention, "sink_attention",
                        functools.partial(triton_attention.sink_attention, split_keys=splits))
    if blocks:
        name = "_INTERPRET_SPLIT_BLOCKS" if splits else "_INTERPRET_FWD_BLOCKS"
        monkeypatch.setattr(triton_attention, name, dict(getattr(triton_attention, name), **blocks))


@pytest.mark.parametrize("path", PATHS, ids=lambda path: path[0])
@pytest.mark.parametrize("case", CASES, ids=lambda case: case[0])
def test_triton_reads_and_writes_no_hostile_value_outside_its_buffers(monkeypatch, path, case):
    """torch.ops.fastprobe.sink_attention with hostile sink / statistics ends, horizons, starts,
    group ids, mask bytes and windows: every load and store of the prefill kernel, or of the
    decode split and merge kernels, stays inside the launch's tensors."""
    _, num_queries, num_keys, head_dim, value_dim, dtype, splits, blocks = path
    _, causal, make = case
    fp.set_backend("triton")
    force_split_keys(monkeypatch, splits, blocks)
    q = torch.randn(BATCH, HEADS, num_queries, head_dim).to(dtype)
    k = torch.randn(BATCH, KV_HEADS, num_keys, head_dim).to(dtype)
    v = torch.randn(BATCH, KV_HEADS, num_keys, value_dim).to(dtype)
    with bounds_checked() as launches, load_budget(LOAD_BUDGET):
        outputs = run_op(q, k, v, causal, **make(num_keys))
    assert len(launches) == (2 if splits else 1)
    assert outputs[0].shape == (BATCH, HEADS, num_queries, value_dim)


@pytest.mark.parametrize("splits", [0, 2], ids=["prefill", "decode-split"])
def test_unchecked_public_call_stays_in_bounds(monkeypatch, splits):
    """The public function where its host checks are skipped (torch.func.vmap): mask bytes other
    than 0 / 1, segments and blocks that are not runs and group ids outside [0, G) reach the
    kernels in their prepared forms, all inside the buffers."""
    fp.set_backend("triton")
    force_split_keys(monkeypatch, splits)
    num_queries, num_keys = (1, 29) if splits else (29, 29)
    q = torch.randn(1, BATCH, HEADS, num_queries, 16)
    k, v = torch.randn(2, 1, BATCH, KV_HEADS, num_keys, 16).unbind(0)
    mask = torch.randint(0, 4, (1, BATCH, num_keys))
    scattered = torch.randint(-3, 3, (1, BATCH, num_keys))  # ids that resume: neither runs nor refused
    groups = torch.randint(-(2**40), 2**40, (1, BATCH, num_keys))

    def call(q, k, v, mask, segments, blocks, groups):
        result = fp.sink_attention(q, k, v, key_padding_mask=mask, segment_ids=segments, bidirectional_blocks=blocks,
                                   key_groups=groups, num_groups=GROUPS, num_sink=2, window=5, return_entropy=True)
        return result.out

    with bounds_checked() as launches, load_budget(LOAD_BUDGET):
        out = torch.func.vmap(call)(q, k, v, mask, scattered, scattered.flip(-1), groups)
    assert len(launches) == (2 if splits else 1)
    assert out.shape == (1, BATCH, HEADS, num_queries, 16)


@pytest.mark.parametrize("splits", [0, 2], ids=["prefill", "decode-split"])
def test_hand_made_prepared_forms_stay_in_bounds(monkeypatch, splits):
    """The public function with prepared forms that are not re-checked (built by hand, or changed
    after their check): a SegmentSpans, a BlockHorizon, a KeyGroups and a KeyMasks holding hostile
    values. Neither the op layer (a padding mask's sink ends are found by a gather at the segment
    starts) nor the kernels index outside a buffer with them."""
    from fastprobe.ops.attention import BlockHorizon, KeyGroups, KeyMasks, SegmentSpans

    fp.set_backend("triton")
    force_split_keys(monkeypatch, splits)
    num_queries, num_keys = (1, 29) if splits else (29, 29)
    q = torch.randn(BATCH, HEADS, num_queries, 16)
    k, v = torch.randn(2, BATCH, KV_HEADS, num_keys, 16).unbind(0)
    keys = (BATCH, num_keys)
    spans = SegmentSpans(hostile_int64(keys, num_keys), hostile_int64(keys, num_keys))
    blocks = BlockHorizon(hostile_int64(keys, num_keys), num_queries)
    groups = KeyGroups(hostile_group_ids(num_keys), GROUPS)
    masks = KeyMasks(torch.randint(0, 256, keys, dtype=torch.uint8), hostile_int64(keys, num_keys),
                     hostile_int64(keys, num_keys), 2, 1)
    mask = torch.rand(keys) < 0.8
    with bounds_checked() as launches, load_budget(LOAD_BUDGET):
        for padding in (mask, masks):
            fp.sink_attention(q, k, v, key_padding_mask=padding, segment_ids=spans, bidirectional_blocks=blocks,
                              key_groups=groups, num_sink=2, window=5, return_entropy=True)
    assert len(launches) == (4 if splits else 2)
