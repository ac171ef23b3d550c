"""Randomised calls of every op: shapes, dtypes, memory layouts (transposed storage, gaps
between elements, stride-0 broadcasts, overlapping views), masked and extreme values and option combinations
drawn together, each checked against the float64 reference (or, where the input is invalid,
against a clear error). The family test files pin each feature down one at a time; this file
looks for the combinations they miss. `tests/sanitize.sh` runs it (and the rest of the suite)
against a C++ extension built with AddressSanitizer and UndefinedBehaviorSanitizer."""

import contextlib
import functools
import os

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import fastprobe as fp
from fastprobe import reference
from fastprobe.ops.attention import key_masks

from . import test_attention, test_bridge, test_concepts, test_divergence, test_dual_attention

# FASTPROBE_FUZZ=n multiplies the number of examples, for a longer search
FUZZ_SCALE = int(os.environ.get("FASTPROBE_FUZZ", "1"))
LAYOUTS = ["contiguous", "permuted", "gapped", "broadcast", "overlapping"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def small(target):
    """Whether the target is the (slow) Triton interpreter: smaller shapes, fewer examples."""
    backend, device = target
    return backend == "triton" and device == "cpu"


def fuzz(target, case, cpu_examples):
    """Run case(target, data) on cpu_examples hypothesis draws; a quarter on Triton targets,
    where the interpreter is slow and, on a GPU, each new combination of flags compiles."""
    backend, _ = target
    count = (max(4, cpu_examples // 4) if backend == "triton" else cpu_examples) * FUZZ_SCALE

    def run(data):
        torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="torch seed"))  # replayable draws
        with drawn_threads(target, data):
            case(target, data)

    health = [HealthCheck.too_slow, HealthCheck.data_too_large]
    # the draws follow the test's seed (tests/conftest.py), so FASTPROBE_TEST_SEED=N replays them
    # (hypothesis' own seed and example database would not)
    drawn = seed(torch.initial_seed())(given(data=st.data())(run))
    settings(max_examples=count, deadline=None, database=None, suppress_health_check=health)(drawn)()


@contextlib.contextmanager
def drawn_threads(target, data):
    """On the C++ target, a drawn thread count for the call: the kernels split rows across
    threads differently with fewer rows than threads (draft_divergence and concept_mass by
    vocabulary ranges and concept chunks, attention by key splits)."""
    threads = torch.get_num_threads()
    if target[0] == "cpp":
        torch.set_num_threads(data.draw(st.sampled_from([threads, 1, 3, 8]), label="threads"))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def relayout(x: torch.Tensor, layout: str, dim: int, poison: float = float("nan")) -> torch.Tensor:
    """x in another memory layout. "permuted": the dims stored in reverse order (so, e.g., the
    last dim is strided); "gapped": a poisoned element after each one along `dim`;
    "broadcast": x's slice 0 along `dim` repeated with stride 0; "overlapping" (floating and bool
    tensors of 2+ dims): an unfold-like view of x's elements in which the slices along `dim` (along
    the dim before it, for the last) start one element apart, so consecutive ones share memory
    (these two change the values; the caller compares against the reference on the returned
    tensor; integer ids keep their layout, whose rules, such as segments as runs, they would break)."""
    if x.dim() == 0 or layout == "contiguous":
        return x
    dim = dim % x.dim()
    if layout == "permuted":
        order = list(reversed(range(x.dim())))
        return x.permute(order).contiguous().permute(order)
    if layout == "gapped":
        shape = list(x.shape)
        shape[dim] *= 2
        poison = poison if x.is_floating_point() else 1
        buffer = torch.full(shape, poison, dtype=x.dtype, device=x.device)
        index = [slice(None)] * x.dim()
        index[dim] = slice(0, None, 2)
        view = buffer[tuple(index)]
        view.copy_(x)
        return view
    if layout == "broadcast":
        return x.narrow(dim, 0, min(1, x.shape[dim])).expand(x.shape)
    if layout == "overlapping":
        if x.dim() < 2 or x.numel() == 0 or not (x.is_floating_point() or x.dtype == torch.bool):
            return x
        strides = list(x.contiguous().stride())
        strides[dim if dim < x.dim() - 1 else dim - 1] = 1  # (the view needs fewer elements than x has)
        return x.flatten().clone().as_strided(x.shape, strides)
    raise ValueError(layout)


def draw_layout(data, x, label, poison: float = float("nan")):
    layout = data.draw(st.sampled_from(LAYOUTS), label=f"{label} layout")
    dim = data.draw(st.integers(0, max(0, x.dim() - 1)), label=f"{label} layout dim")
    return relayout(x, layout, dim, poison)


def draw_rows_vocab_dtype(target, data, min_rows, max_rows, max_vocab, long_vocab=None):
    """(N, V, dtype); V at most 80 under the interpreter; with long_vocab, V may instead span
    several of the C++ kernels' 8192-logit vocabulary ranges (up to long_vocab)."""
    num_rows = data.draw(st.integers(min_rows, max_rows), label="N")
    if long_vocab is not None and not small(target) and data.draw(st.booleans(), label="long rows"):
        vocab = data.draw(st.integers(8193, long_vocab), label="V")
    else:
        vocab = data.draw(st.integers(1, 80 if small(target) else max_vocab), label="V")
    return num_rows, vocab, data.draw(st.sampled_from(DTYPES), label="dtype")


def draw_logits(data, shape, dtype, label, allow_empty_rows=False):
    """Random logits of `shape`: a scale (up to 1e4), a fraction of -inf entries, each row
    (last dim) keeping at least one finite entry unless allow_empty_rows."""
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label=f"{label} seed"))
    scale = data.draw(st.sampled_from([1.0, 8.0, 1e4]), label=f"{label} scale")
    masked = data.draw(st.sampled_from([0.0, 0.3, 0.9]), label=f"{label} masked fraction")
    x = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    drop = torch.rand(shape, generator=generator) < masked
    if not allow_empty_rows and x.shape[-1] > 0:
        keep = torch.randint(0, x.shape[-1], shape[:-1], generator=generator)
        drop.scatter_(-1, keep.unsqueeze(-1), False)
    x[drop] = float("-inf")
    return x.to(dtype), scale


def tolerance(scale):
    """Logits of magnitude 1e4 leave float32 rounding of that size in each log-sum-exp."""
    return (1e-4, 1e-4) if scale > 100 else (test_divergence.RTOL, test_divergence.ATOL)



def has_empty_row(*logits):
    """Whether any row (last dim) of these logits is entirely -inf."""
    return any(x is not None and x.shape[-1] > 0 and (x == float("-inf")).all(-1).any() for x in logits)


def call_or_raise(invalid, message, op, *args, **kwargs):
    """op(*args, **kwargs), or, when the input is invalid, the ValueError it must raise."""
    if invalid:
        with pytest.raises(ValueError, match=message):
            op(*args, **kwargs)
        return None
    return op(*args, **kwargs)


def assert_untouched(before, tensors):
    """The inputs still hold what copies taken before the call hold."""
    for i, (original, tensor) in enumerate(zip(before, tensors)):
        assert torch.equal(original, tensor), f"input {i} was modified"


def draw_divergence_logits(target, data, num_drafts, num_tokens, vocab, dtype):
    """Drafts [K, N, V] and, or not, a target [N, V] (in the drafts' dtype or another), in drawn
    layouts; (draft, target, scale)."""
    _, device = target
    draft, scale = draw_logits(data, (num_drafts, num_tokens, vocab), dtype, "draft")
    draft = draw_layout(data, draft.to(device), "draft")
    target_logits = None
    if data.draw(st.booleans(), label="with target"):
        target_dtype = data.draw(st.sampled_from([dtype, *DTYPES]), label="target dtype")
        target_logits, target_scale = draw_logits(data, (num_tokens, vocab), target_dtype, "target")
        target_logits = draw_layout(data, target_logits.to(device), "target")
        scale = max(scale, target_scale)
    return draft, target_logits, scale


def _draft_divergence_case(target, data):
    _, device = target
    num_drafts = data.draw(st.integers(1, 5), label="K")
    num_tokens, vocab, dtype = draw_rows_vocab_dtype(target, data, 0, 6, 700, long_vocab=20000)
    draft, target_logits, scale = draw_divergence_logits(target, data, num_drafts, num_tokens, vocab, dtype)
    weights = test_divergence.random_weights(num_drafts, device) if data.draw(st.booleans(), label="weighted") else None
    temperature = data.draw(st.sampled_from([1.0, 0.6, 2.5]), label="temperature")
    inputs = [x for x in (draft, target_logits) if x is not None]
    before = [x.clone() for x in inputs]

    # a broadcast along the vocabulary can turn a row all -inf: that must raise, naming the row
    result = call_or_raise(
        has_empty_row(draft, target_logits), "row", fp.draft_divergence, draft, target_logits, weights=weights,
        temperature=temperature,
    )  # fmt: skip
    assert_untouched(before, inputs)
    if result is not None:
        rtol, atol = tolerance(scale)
        want = test_divergence.expected(draft, target_logits, weights, temperature)
        test_divergence.assert_matches(result, want, has_target=target_logits is not None, rtol=rtol, atol=atol)



def _sharded_divergence_case(target, data):
    """draft_divergence over a vocabulary cut into 1-4 uneven shards (the tensor-parallel
    form's steps in one process), against the float64 reference of the whole vocabulary."""
    _, device = target
    num_drafts = data.draw(st.integers(1, 4), label="K")
    num_tokens, vocab, dtype = draw_rows_vocab_dtype(target, data, 1, 5, 500)
    cuts = sorted(data.draw(st.sets(st.integers(1, vocab - 1), max_size=3), label="shard cuts")) if vocab > 1 else []
    shards = list(zip([0] + cuts, cuts + [vocab]))
    draft, target_logits, scale = draw_divergence_logits(target, data, num_drafts, num_tokens, vocab, dtype)
    if has_empty_row(draft, target_logits):
        return  # a broadcast along the vocabulary emptied a row: the unsharded case covers it
    weights = test_divergence.random_weights(num_drafts, device)
    temperature = data.draw(st.sampled_from([1.0, 0.6, 2.5]), label="temperature")
    result, _ = test_divergence.combine_shards(draft, target_logits, weights, temperature, shards)
    rtol, atol = tolerance(scale)
    want = test_divergence.expected(draft, target_logits, weights, temperature)
    test_divergence.assert_matches(result, want, has_target=target_logits is not None, rtol=rtol, atol=atol)


def _concept_mass_case(target, data):
    _, device = target
    num_tokens, vocab, dtype = draw_rows_vocab_dtype(target, data, 0, 6, 900, long_vocab=20000)
    logits, scale = draw_logits(data, (num_tokens, vocab), dtype, "logits", allow_empty_rows=True)
    logits = draw_layout(data, logits.to(device), "logits")
    # sometimes more concepts than the C++ kernels' 2048-concept chunks (over a vocabulary where an
    # id falls in a few dozen of them at most: an id in thousands sums thousands of float32
    # gradient terms that cancel, off by more than the tolerance however it is computed)
    many = not small(target) and vocab >= 256 and data.draw(st.integers(0, 3), label="many concepts") == 0
    num_concepts = data.draw(st.integers(2049, 2300) if many else st.integers(1, 12), label="C")
    concepts = test_concepts.random_concepts(vocab, num_concepts, max_variants=9, device=device)
    temperature = data.draw(st.sampled_from([1.0, 0.6, 2.5]), label="temperature")
    original = logits.clone()

    result = call_or_raise(has_empty_row(logits), "row", fp.concept_mass, logits, concepts, temperature=temperature)
    assert_untouched([original], [logits])
    if result is None:
        return
    rtol, atol = tolerance(scale)
    test_concepts.assert_matches(result, test_concepts.expected(logits, concepts, temperature), rtol=rtol, atol=atol)
    if num_tokens > 0:  # the fused backward of log_mass, mass and lse
        weights = [torch.randn(num_tokens, num_concepts, device=device), torch.randn(num_tokens, num_concepts, device=device),
                   torch.randn(num_tokens, device=device)]
        got = test_concepts.fused_gradient(logits, concepts, temperature, weights)
        want = test_concepts.reference_gradient(logits, concepts, temperature, weights)
        assert got.dtype == dtype and not torch.isnan(got).any()
        grad_rtol, grad_atol = test_concepts.GRAD_TOLERANCE[dtype]
        torch.testing.assert_close(got.cpu().double(), want, rtol=grad_rtol, atol=grad_atol)



def _bridge_loss_case(target, data):
    _, device = target
    num_rows, vocab, dtype = draw_rows_vocab_dtype(target, data, 1, 7, 900, long_vocab=20000)
    # one vocabulary mask shared by student and teacher (padded vocabulary entries)
    student, _ = draw_logits(data, (num_rows, vocab), torch.float64, "student")
    teacher = torch.randn(num_rows, vocab, dtype=torch.float64) * data.draw(st.sampled_from([1.0, 8.0]), label="teacher scale")
    teacher[student == float("-inf")] = float("-inf")
    student = draw_layout(data, student.to(device=device, dtype=dtype), "student")
    teacher_dtype = data.draw(st.sampled_from([dtype, *DTYPES]), label="teacher dtype")  # (the student's, or another)
    teacher = draw_layout(data, teacher.to(device=device, dtype=teacher_dtype), "teacher")
    options = dict(
        beta=data.draw(st.sampled_from(test_bridge.BETAS), label="beta"),
        temperature=data.draw(st.sampled_from([1.0, 0.6, 2.5]), label="temperature"),
        direction=data.draw(st.sampled_from(["forward", "reverse"]), label="direction"),
        reduction=data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
    )
    if data.draw(st.booleans(), label="labels"):
        options["labels"] = test_bridge.random_labels(num_rows, device)
    before = [student.clone(), teacher.clone()]
    rows_options = dict(options, reduction="none")
    want_rows = reference.bridge_loss(student.double(), teacher.double(), **rows_options).cpu()
    if not want_rows.isfinite().all():
        # a row whose P_S or Q does not exist (all -inf, e.g. after a broadcast along the
        # vocabulary) has loss NaN, found without a host synchronisation; a row where one side
        # is masked and the other is not, +inf. Their gradients are undefined: losses only.
        rows = fp.bridge_loss(student, teacher, **rows_options)
        assert torch.equal(rows.isnan().cpu(), want_rows.isnan()), "NaN rows"
        torch.testing.assert_close(rows.cpu().double(), want_rows, rtol=test_bridge.RTOL, atol=test_bridge.ATOL, equal_nan=True)
    else:
        test_bridge.assert_matches(student, teacher, **options)
    assert_untouched(before, [student, teacher])


def draw_attention_inputs(target, data):
    """q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] in drawn layouts and the key padding
    mask (or None), with Lq <= Lk, GQA ratios 1-4, odd head dims and Dv mostly D; (q, k, v, mask, dtype)."""
    _, device = target
    batch = data.draw(st.integers(1, 3), label="B")
    kv_heads = data.draw(st.integers(1, 3), label="Hkv")
    heads = kv_heads * data.draw(st.integers(1, 4), label="GQA ratio")
    num_keys = data.draw(st.integers(1, 40 if small(target) else 150), label="Lk")
    num_queries = data.draw(st.one_of(st.just(1), st.just(num_keys), st.integers(1, num_keys)), label="Lq")
    head_dim = data.draw(st.sampled_from([4, 16, 40] if small(target) else [1, 3, 16, 40, 64, 80, 128]), label="D")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    magnitude = data.draw(st.sampled_from([1.0, 30.0]), label="q magnitude")
    q, k, v = test_attention.random_qkv(batch, heads, kv_heads, num_queries, num_keys, head_dim, dtype, device, magnitude)
    value_dim = data.draw(st.sampled_from([head_dim, head_dim, 5, 24]), label="Dv")
    if value_dim != head_dim:  # multi-head latent attention's narrower (or wider) value heads
        v = torch.randn(batch, kv_heads, num_keys, value_dim).to(device=device, dtype=dtype)
    q, k, v = (draw_layout(data, x, name) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    mask = None
    if data.draw(st.booleans(), label="padding"):
        # any pattern of real keys, holes included; a row may have none
        mask = torch.rand(batch, num_keys, device=device) < data.draw(st.sampled_from([0.5, 0.9]), label="real share")
        mask = draw_layout(data, mask, "mask")
    return q, k, v, mask, dtype


def draw_blocks(data, batch, num_keys, device):
    """Bidirectional block ids [B, Lk] (or None): rows cut into segments at random places, each
    segment a block of its own id or no block (-1), as int32 or int64 in a drawn layout."""
    if not data.draw(st.booleans(), label="bidirectional blocks"):
        return None
    cuts = torch.rand(batch, num_keys) < data.draw(st.sampled_from([0.05, 0.3]), label="block cut rate")
    segment = cuts.long().cumsum(-1)
    in_block = torch.rand(batch, num_keys + 1) < 0.6
    blocks = torch.where(in_block.gather(1, segment), segment, -1)
    blocks = blocks.to(device=device, dtype=data.draw(st.sampled_from([torch.int32, torch.int64]), label="block dtype"))
    return draw_layout(data, blocks, "blocks")


def draw_segments(data, batch, num_keys, device):
    """Segment ids [B, Lk] (or None): rows cut into runs at random places, each run an arbitrary
    id (negative ones too), as int32 or int64 in a drawn layout."""
    if not data.draw(st.booleans(), label="segments"):
        return None
    cuts = torch.rand(batch, num_keys) < data.draw(st.sampled_from([0.02, 0.1, 0.4]), label="segment cut rate")
    run = cuts.long().cumsum(-1)
    ids = torch.randperm(2 * num_keys + 2).gather(0, run.flatten()).view(batch, num_keys) - num_keys
    ids = ids.to(device=device, dtype=data.draw(st.sampled_from([torch.int32, torch.int64]), label="segment dtype"))
    return draw_layout(data, ids, "segments")


@contextlib.contextmanager
def triton_key_splits(target, data, rows):
    """On Triton targets, a drawn split_keys for the attention launchers: None (their choice),
    0 (the prefill kernel) or n >= 1 (the decode path: keys split across n programs, then
    merged), which they would only choose for long caches. rows: (Hq / Hkv) Lq."""
    backend, _ = target
    if backend != "triton" or rows > 128:
        yield
        return
    from fastprobe.kernels import attention as triton_attention
    from fastprobe.kernels import dual_attention as triton_dual

    splits = data.draw(st.sampled_from([None, 0, 1, 3]), label="split_keys")
    launchers = [(triton_attention, "sink_attention"), (triton_dual, "dual_path_attention")]
    originals = [getattr(module, name) for module, name in launchers]
    for (module, name), original in zip(launchers, originals):
        setattr(module, name, functools.partial(original, split_keys=splits))
    try:
        yield
    finally:
        for (module, name), original in zip(launchers, originals):
            setattr(module, name, original)


def _sink_attention_case(target, data):
    _, device = target
    q, k, v, mask, dtype = draw_attention_inputs(target, data)
    batch, heads, _, _ = q.shape
    num_keys = k.shape[2]
    options = dict(
        causal=data.draw(st.booleans(), label="causal"),
        window=data.draw(st.one_of(st.none(), st.integers(1, num_keys + 2)), label="window"),
        num_sink=data.draw(st.integers(0, 4), label="num_sink"),
        stat_tokens=data.draw(st.integers(0, 3), label="stat_tokens"),
        key_padding_mask=mask,
    )
    if data.draw(st.booleans(), label="head mask"):
        options["head_mask"] = torch.rand(heads, device=device) < 0.7
    if data.draw(st.booleans(), label="sink logit"):
        options["sink_logit"] = 2 * torch.randn(heads, device=device)
    if data.draw(st.booleans(), label="key groups"):
        num_groups = data.draw(st.integers(1, 5), label="G")
        options["key_groups"] = draw_layout(data, torch.randint(0, num_groups, (batch, num_keys), device=device), "groups")
        options["num_groups"] = num_groups
    if data.draw(st.booleans(), label="softcap"):
        options["softcap"] = data.draw(st.sampled_from([5.0, 30.0]), label="softcap value")
    options["bidirectional_blocks"] = draw_blocks(data, batch, num_keys, device)
    options["segment_ids"] = draw_segments(data, batch, num_keys, device)
    with_entropy = data.draw(st.booleans(), label="entropy")
    before = [x.clone() for x in (q, k, v)]

    call_options = dict(options)
    if data.draw(st.booleans(), label="prepared KeyMasks"):  # as fastprobe.patch passes the mask
        segments = options["segment_ids"]
        if segments is not None:
            call_options["segment_ids"] = segments = fp.ops.attention.segment_spans(segments)
        call_options["key_padding_mask"] = key_masks(
            mask, batch, num_keys, num_sink=options["num_sink"], stat_tokens=options["stat_tokens"], device=device,
            segment_ids=segments,
        )

    with triton_key_splits(target, data, heads // k.shape[1] * q.shape[2]):
        result = fp.sink_attention(q, k, v, return_entropy=with_entropy, **call_options)
    assert_untouched(before, (q, k, v))
    want = test_attention.expected(q, k, v, **options)
    test_attention.assert_matches(result, want, dtype, "key_groups" in options, with_entropy, **test_attention.score_tolerance(q, k, v))



def _dual_path_attention_case(target, data):
    _, device = target
    q, k, v, mask, dtype = draw_attention_inputs(target, data)
    batch, _, num_queries, _ = q.shape
    num_keys = k.shape[2]
    drop = draw_layout(data, torch.rand(batch, num_keys, device=device) < data.draw(st.sampled_from([0.0, 0.4, 1.0]), label="dropped share"), "drop")
    rows = data.draw(st.sampled_from(["last", "all", "mask"]), label="rows")
    options = dict(
        gamma=data.draw(st.sampled_from([0.0, 0.7, 2.0]), label="gamma"),
        orthogonalize=data.draw(st.booleans(), label="orthogonalize"),
        causal=data.draw(st.booleans(), label="causal"),
        rows=torch.rand(batch, num_queries, device=device) < 0.5 if rows == "mask" else rows,
        key_padding_mask=mask,
        bidirectional_blocks=draw_blocks(data, batch, num_keys, device),
        window=data.draw(st.one_of(st.none(), st.integers(1, num_keys + 2)), label="window"),
        segment_ids=draw_segments(data, batch, num_keys, device),
    )
    before = [x.clone() for x in (q, k, v)]

    with triton_key_splits(target, data, q.shape[1] // k.shape[1] * num_queries):
        got = fp.dual_path_attention(q, k, v, drop, return_paths=True, **options)
    assert_untouched(before, (q, k, v))
    want = test_dual_attention.expected(q, k, v, drop, **options)
    test_dual_attention.assert_paths_match(got, want, dtype, options, atol=test_attention.score_tolerance(q, k, v)["atol"])



def _fused_linear_case(target, data):
    _, device = target
    num_rows = data.draw(st.integers(1, 20), label="N")
    hidden_s, hidden_t = data.draw(st.integers(1, 40), label="Hs"), data.draw(st.integers(1, 40), label="Ht")
    vocab = data.draw(st.integers(1, 60 if small(target) else 300), label="V")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    # Hidden states and weights go to torch's matmul, not to a fastprobe kernel. Its bfloat16 CPU
    # GEMM (torch 2.13, 17+ rows) reads some rows of odd length past their end (31 -> 32 elements,
    # 33 -> more), times 0: a NaN there (a gap of a row-strided view) made 16 of 17 rows NaN. A large
    # finite poison still shows any gap element that is used.
    poison = 1e4
    h_s = draw_layout(data, torch.randn(num_rows, hidden_s).to(device=device, dtype=dtype), "student_hidden", poison)
    w_s = draw_layout(data, (torch.randn(vocab, hidden_s) / hidden_s**0.5).to(device=device, dtype=dtype), "student_weight", poison)
    h_t = draw_layout(data, torch.randn(num_rows, hidden_t).to(device=device, dtype=dtype), "teacher_hidden", poison)
    w_t = draw_layout(data, (torch.randn(vocab, hidden_t) / hidden_t**0.5).to(device=device, dtype=dtype), "teacher_weight", poison)
    b_s = torch.randn(vocab).to(device=device, dtype=dtype) if data.draw(st.booleans(), label="student bias") else None
    b_t = torch.randn(vocab).to(device=device, dtype=dtype) if data.draw(st.booleans(), label="teacher bias") else None
    labels = test_bridge.random_labels(num_rows, device) if data.draw(st.booleans(), label="labels") else None
    options = dict(
        beta=data.draw(st.sampled_from(test_bridge.BETAS), label="beta"),
        temperature=data.draw(st.sampled_from([1.0, 0.6, 2.5]), label="temperature"),
        direction=data.draw(st.sampled_from(["forward", "reverse"]), label="direction"),
        reduction=data.draw(st.sampled_from(["mean", "sum"]), label="reduction"),
    )
    chunk_rows = data.draw(st.sampled_from([None, 1, 3, num_rows + 5]), label="chunk_rows")
    float32_weight_grad = data.draw(st.booleans(), label="float32_weight_grad")

    trained = [x.detach().clone().requires_grad_() for x in (h_s, w_s) + ((b_s,) if b_s is not None else ())]
    loss_fn = fp.FusedLinearBridgeLoss(chunk_rows=chunk_rows, float32_weight_grad=float32_weight_grad, **options)
    fused = loss_fn(trained[0], trained[1], h_t, w_t, labels=labels, student_bias=trained[2] if b_s is not None else None,
                    teacher_bias=b_t)
    fused.backward()

    plain = [x.detach().cpu().double().requires_grad_() for x in trained]
    logits_s = torch.nn.functional.linear(*plain)
    logits_t = torch.nn.functional.linear(h_t.cpu().double(), w_t.cpu().double(), None if b_t is None else b_t.cpu().double())
    if dtype != torch.float32:  # the fused form holds each chunk's logits in the input dtype
        logits_t = logits_t.to(dtype).double()
        logits_s = logits_s + (logits_s.to(dtype).double() - logits_s).detach()  # rounded, same gradient
    logits_s.retain_grad()
    want = reference.bridge_loss(logits_s, logits_t, labels=None if labels is None else labels.cpu(), **options)
    want.backward()
    # bfloat16 rounds each logit gradient to 8 bits before the products: an input gradient is
    # off by a share of the sum of its terms' sizes (|dlogits| |W|, |dlogits|^T |h|, |dlogits|)
    dlogits = logits_s.grad.abs()
    term_sizes = [want.abs().item(), (dlogits @ plain[1].detach().abs()).max().item(),
                  (dlogits.t() @ plain[0].detach().abs()).max().item(), dlogits.sum(0).max().item()]
    # each row's loss is formed in float32, within ATOL of the reference as in test_bridge (a loss near 0,
    # e.g. Q = P_S under a uniform teacher, has no size of its own to be relative to): a sum adds N of them
    loss_floor = test_bridge.ATOL * (num_rows if options["reduction"] == "sum" else 1)
    floors = [loss_floor, 1e-6, 1e-6, 1e-6]
    for i, (name, got, expected) in enumerate([("loss", fused, want)] + [(f"grad {i}", x.grad, y.grad) for i, (x, y) in enumerate(zip(trained, plain))]):
        assert got.dtype == (torch.float32 if name == "loss" else dtype), name
        expected = expected.detach()
        if dtype == torch.float32:
            torch.testing.assert_close(got.cpu().double(), expected, rtol=1e-4, atol=max(1e-5, floors[i]), msg=lambda m: f"{name}: {m}")
        else:
            torch.testing.assert_close(got.cpu().double(), expected, rtol=3e-2, atol=3e-2 * term_sizes[i] + floors[i], msg=lambda m: f"{name}: {m}")


# each op's case and its number of examples per run (a quarter on Triton targets)
CASES = {
    "draft_divergence": (_draft_divergence_case, 40),
    "draft_divergence_sharded": (_sharded_divergence_case, 25),
    "concept_mass": (_concept_mass_case, 40),
    "bridge_loss": (_bridge_loss_case, 40),
    "sink_attention": (_sink_attention_case, 40),
    "dual_path_attention": (_dual_path_attention_case, 40),
    "fused_linear_bridge_loss": (_fused_linear_case, 25),
}


@pytest.mark.parametrize("op", list(CASES))
def test_random_calls(target, op):
    case, examples = CASES[op]
    fuzz(target, case, examples)


def test_draws_follow_the_test_seed():
    """FASTPROBE_TEST_SEED=N replays a fuzz test: its draws follow torch's seed, which the test's
    seed sets (hypothesis drew from a seed of its own, which the replay did not fix)."""
    def draws() -> list:
        drawn = []
        fuzz(("cpp", "cpu"), lambda target, data: drawn.append(data.draw(st.integers(0, 2**60))), 6)
        return drawn

    runs = []
    for replayed in (7, 7, 8):
        torch.manual_seed(replayed)
        runs.append(draws())
    assert runs[0] == runs[1] != runs[2]
