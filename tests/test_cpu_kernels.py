"""The C++ kernels (csrc/) called directly through fastprobe._C, as a hostile caller could: the
bindings check what they can (sizes, strides, the concept arrays) before reading anything, and an
error on one of the OpenMP threads comes back as a Python exception instead of aborting Python."""

import os

import pytest
import torch

import fastprobe as fp
from fastprobe.backend import cpp_status

pytestmark = pytest.mark.skipif(not cpp_status()[0], reason="needs the C++ extension")

INT64_MIN = -(2**63)


def cpp():
    from fastprobe import _C

    return _C


# ---- errors on the threads of run_rows (csrc/common.h) ----------------------------------------


@pytest.mark.parametrize("logits", [8191, 8192], ids=["inline", "threads"])  # either side of kInlineLogits
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])  # whole rows per thread, and rows spread (split_rows)
def test_run_rows_raises_an_error_of_any_thread(rows, threads, logits):
    """Three steps a row (two parts, one row step) run when nothing fails, inline or on threads; a
    failure making a thread's scratch or in any step comes back as RuntimeError and the process
    lives on."""
    assert cpp()._run_rows(rows, threads, logits, 0, 0) == 3 * rows
    with pytest.raises(RuntimeError, match="the failure a test asked for"):
        cpp()._run_rows(rows, threads, logits, 1, 0)  # thread 0's scratch
    for stage in (2, 3):
        for failing_row in {0, rows - 1}:
            with pytest.raises(RuntimeError, match="the failure a test asked for"):
                cpp()._run_rows(rows, threads, logits, stage, failing_row)
    assert cpp()._run_rows(rows, threads, logits, 0, 0) == 3 * rows


def _under_address_sanitizer() -> bool:
    return "asan" in os.environ.get("LD_PRELOAD", "")


def _address_space() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@pytest.mark.skipif(_under_address_sanitizer(), reason="ASan aborts on a failed allocation by design")
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc")
def test_scratch_that_cannot_be_allocated_raises_memory_error():
    """draft_divergence's per-thread scratch is [K + 1, 2048] floats: 250k drafts (one broadcast
    value) ask 2 GB a thread, which a process kept to 1 GB more address space cannot have. The
    bad_alloc on the threads once called std::terminate (Python aborted)."""
    resource = pytest.importorskip("resource")
    draft = torch.zeros(1, 1, 1).expand(250_000, 1, 1)
    threads = torch.get_num_threads()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    try:
        torch.set_num_threads(2)
        with fp.use_backend("cpp"):
            resource.setrlimit(resource.RLIMIT_AS, (_address_space() + (1 << 30), hard))
            with pytest.raises(MemoryError):
                fp.draft_divergence(draft)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        torch.set_num_threads(threads)
    with fp.use_backend("cpp"):  # and the kernels still run
        assert torch.isfinite(fp.draft_divergence(torch.randn(2, 3, 5)).jsd).all()


# ---- the concept arrays (csrc/concepts.cpp) ----------------------------------------------------


def _concept_mass(offsets, token_ids=None, vocab=8):
    """concept_mass called directly with these offsets ([C + 1]) over one row of `vocab` logits."""
    logits = torch.randn(1, vocab)
    token_ids = torch.arange(vocab, dtype=torch.int64) if token_ids is None else token_ids
    offsets = torch.tensor(offsets, dtype=torch.int64)
    num_concepts = offsets.numel() - 1
    outputs = [torch.full((1, num_concepts), float("nan")) for _ in range(4)]
    outputs += [torch.full((1, num_concepts), -1, dtype=torch.int64), torch.full((1,), float("nan"), dtype=torch.float64),
                torch.full((2, 1), float("nan"))]
    cpp().concept_mass("float32", logits.data_ptr(), 1, vocab, *logits.stride(), token_ids.data_ptr(),
                       token_ids.numel(), offsets.data_ptr(), num_concepts, 1.0,
                       *(tensor.data_ptr() for tensor in outputs), 2)
    return outputs


def _concept_mass_backward(vocab_offsets, vocab=8):
    """concept_mass_backward called directly with these vocab_offsets ([U + 1]) over one concept
    that holds every id, one row."""
    logits = torch.randn(1, vocab)
    vocab_offsets = torch.tensor(vocab_offsets, dtype=torch.int64)
    num_ids = vocab_offsets.numel() - 1
    vocab_ids = torch.arange(num_ids, dtype=torch.int64)
    memberships = int(vocab_offsets[-1])
    vocab_concepts = torch.zeros(memberships, dtype=torch.int64)
    top_share, top_token = torch.full((1, 1), 0.5), torch.zeros(1, 1, dtype=torch.int64)
    row_state, grad_concept, coef = torch.zeros(2, 1), torch.ones(1, 1), torch.zeros(1)
    grad = torch.full((1, vocab), float("nan"))
    cpp().concept_mass_backward("float32", logits.data_ptr(), 1, vocab, *logits.stride(), vocab_ids.data_ptr(),
                                num_ids, vocab_offsets.data_ptr(), vocab_concepts.data_ptr(), memberships, 1,
                                top_share.data_ptr(), top_token.data_ptr(), row_state.data_ptr(), grad_concept.data_ptr(),
                                coef.data_ptr(), 1.0, grad.data_ptr(), 2)
    return grad


def test_concept_offsets_checked_without_overflow():
    """Offsets whose steps wrap around int64 (2^62 four times is 2^64 = 0) once passed the check
    and the kernel then read token_ids at offsets near 2^62 (here: std::terminate)."""
    _concept_mass([0, 3, 8])  # (valid)
    wrapping = [0, 2**62, INT64_MIN, -(2**62), 0, 8]
    with pytest.raises(IndexError, match="offsets goes past the end at 0"):
        _concept_mass(wrapping)
    with pytest.raises(IndexError, match="offsets decreases at 1"):
        _concept_mass([0, 5, 3, 8])
    with pytest.raises(IndexError, match="offsets has an empty entry at 1"):
        _concept_mass([0, 3, 3, 8])
    _concept_mass_backward([0, 1, 1, 2])  # (valid: an id may belong to no concept)
    with pytest.raises(IndexError, match="vocab_offsets goes past the end at 0"):
        _concept_mass_backward([0, 2**62, INT64_MIN, -(2**62), 0, 2])



def test_concept_backward_chunks_of_ids_without_memberships():
    """concept_mass_backward's chunks hold at most 2048 vocabulary ids as well as 2048 memberships
    (the per-id scratch is 2048 floats): 3000 ids of which only the first and the last belong to
    the concept (an id may belong to none, called directly) give the gradient of those two alone."""
    vocab, num_ids = 4096, 3000
    logits = torch.randn(1, vocab)

    def grad_of(vocab_ids, vocab_offsets):
        memberships = int(vocab_offsets[-1])
        vocab_concepts = torch.zeros(memberships, dtype=torch.int64)
        top_share, top_token = torch.full((1, 1), 0.5), torch.zeros(1, 1, dtype=torch.int64)
        row_max = logits.amax(1)  # row_state: M, then ln S
        row_state = torch.stack([row_max, torch.logsumexp(logits - row_max, 1)]).contiguous()
        grad_concept, coef = torch.ones(1, 1), torch.zeros(1)
        grad = torch.full((1, vocab), float("nan"))
        cpp().concept_mass_backward("float32", logits.data_ptr(), 1, vocab, *logits.stride(), vocab_ids.data_ptr(),
                                    vocab_ids.numel(), vocab_offsets.data_ptr(), vocab_concepts.data_ptr(),
                                    memberships, 1, top_share.data_ptr(), top_token.data_ptr(), row_state.data_ptr(),
                                    grad_concept.data_ptr(), coef.data_ptr(), 1.0, grad.data_ptr(), 2)
        return grad

    offsets = torch.ones(num_ids + 1, dtype=torch.int64)
    offsets[0], offsets[-1] = 0, 2
    got = grad_of(torch.arange(num_ids, dtype=torch.int64), offsets)
    want = grad_of(torch.tensor([0, num_ids - 1]), torch.tensor([0, 1, 2]))
    assert want[0, [0, num_ids - 1]].abs().min() > 0  # (the two ids have a gradient)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- sizes and strides -------------------------------------------------------------------------


def _divergence(sizes, strides, draft=None, stats_rows=None):
    """draft_divergence called directly on a float32 draft with these [K, N, V] sizes and strides."""
    num_drafts, num_tokens, vocab = sizes
    draft = torch.randn(2, 3, 5) if draft is None else draft
    weights = torch.full((num_drafts,), 1.0 / num_drafts) if num_drafts < 100 else torch.ones(1)
    stats = torch.full((5 + min(num_drafts, 100), min(num_tokens, 100)), float("nan"))
    lse = torch.full((1 + min(num_drafts, 100), min(num_tokens, 100)), float("nan"), dtype=torch.float64)
    cpp().draft_divergence("float32", "float32", draft.data_ptr(), num_drafts, num_tokens, vocab, *strides, 0, 0, 0,
                           weights.data_ptr(), 1.0, 0, False, stats.data_ptr(), lse.data_ptr(), 1)
    return stats, lse


def test_negative_strides_are_refused():
    """torch makes no negative strides: one would read before the buffer."""
    draft = torch.randn(2, 3, 5)
    _divergence((2, 3, 5), draft.stride(), draft)
    with pytest.raises(ValueError, match="draft has a negative stride -1"):
        _divergence((2, 3, 5), (15, 5, -1), draft)
    # a dimension of size 1 is never stepped: its stride may be anything (torch leaves some as they were)
    _divergence((1, 3, 5), (-7, 5, 1), draft)


def test_sizes_whose_offsets_overflow_int64_are_refused():
    """Sizes times strides past 2^62 (a hostile call: no buffer is that large) are refused before
    anything is read, instead of wrapping into small offsets."""
    draft = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="draft has an element offset beyond 2"):
        _divergence((2, 2**40, 5), (15, 2**30, 1), draft)
    with pytest.raises(ValueError, match="draft has an element offset beyond 2"):  # spans within, their sum past
        _divergence((2, 0, 2), (2**61, 1, 2**61 + 1), draft)  # (no token: nothing would be read)
    with pytest.raises(ValueError, match=r"N must be in \[0, 2\^62\]"):
        _divergence((2, 2**63 - 1, 5), (15, 0, 1), draft)
    with pytest.raises(ValueError, match="stats has more than 2"):  # broadcast input, [5 + K, N] output
        _divergence((2**31, 2**31, 5), (0, 0, 1), draft)
    # broadcast inputs (stride 0) of sizes a real output can hold are fine
    stats, _ = _divergence((3, 4, 5), (0, 0, 1), draft)
    assert torch.isfinite(stats).all()


def test_attention_layout_checks():
    """The attention bindings check q, k, v and out the same way: negative strides and offsets past
    2^62 are refused, before any pointer is read (here: nulls)."""
    def call(batch=1, num_keys=4, q_strides=(32, 32, 8, 1), head_dim=8):
        cpp().sink_attention("float32", 0, 0, 0, 0, batch, 1, 1, 4, num_keys, head_dim, 8,
                             *q_strides, 32, 32, 8, 1, 32, 32, 8, 1, 32, 32, 8, 1,
                             0.5, True, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)

    with pytest.raises(ValueError, match="q has a negative stride"):
        call(q_strides=(32, 32, -8, 1))
    with pytest.raises(ValueError, match="q has an element offset beyond 2"):
        call(batch=2**40, q_strides=(2**30, 32, 8, 1))
    with pytest.raises(ValueError, match=r"the \[B, Lk\] key arrays has more than 2"):
        call(batch=2**31, num_keys=2**32, q_strides=(0, 0, 0, 1))
    with pytest.raises(ValueError, match="q pointer is null"):  # (what the valid sizes reach)
        call()


# Arguments of the kernels that the public functions check first: called directly, each binding
# refuses them itself, before reading a pointer (the nulls here) where it can.
def _null_sink_attention(batch=0, num_heads=1, num_kv_heads=1, q_s3=1, scale=0.5, softcap=0.0, key_groups=0,
                         num_groups=0):
    cpp().sink_attention("float32", 0, 0, 0, 0, batch, num_heads, num_kv_heads, 4, 4, 8, 8,
                         32, 32, 8, q_s3, 32, 32, 8, 1, 32, 32, 8, 1, 32, 32, 8, 1,
                         scale, True, 0, 0, 0, 0, 0, 0, key_groups, num_groups, 0, 0, 0, 0, 1, softcap)


def _null_draft_divergence(inv_temperature=1.0, lse_in=0, lse_only=False):
    cpp().draft_divergence("float32", "float32", 0, 1, 0, 5, 5, 5, 1, 0, 0, 0, 0, inv_temperature, lse_in,
                           lse_only, 0, 0, 1)


def _null_bridge_loss(beta=0.5, inv_temperature=1.0):
    cpp().bridge_loss("float32", "float32", 0, 0, 0, 5, 5, 1, 5, 1, 0, -100, beta, inv_temperature, False, 0, 0,
                      False, 1)


@pytest.mark.parametrize("call, error", [
    (lambda: _null_sink_attention(num_heads=3, num_kv_heads=2), r"num_heads \(3\) must be a multiple of num_kv_heads"),
    (lambda: _null_sink_attention(q_s3=2), r"the last \(head dim\) stride of q, k, v and out must be 1"),
    (lambda: _null_sink_attention(scale=float("nan")), "scale must be finite and > 0 in float32"),
    (lambda: _null_sink_attention(scale=1e-50), "scale must be finite and > 0 in float32"),  # (0 in float32)
    (lambda: _null_sink_attention(softcap=-1.0), r"softcap must be 0 \(none\) or finite and > 0 in float32"),
    (lambda: _null_sink_attention(softcap=1e-50), r"softcap must be 0 \(none\) or finite and > 0 in float32"),
    (lambda: _null_sink_attention(key_groups=64, num_groups=2**31), "num_groups must fit the int32 group ids"),
    (lambda: _null_sink_attention(num_groups=2), "key_groups and num_groups > 0 go together"),
    (lambda: _null_sink_attention(key_groups=64), "key_groups and num_groups > 0 go together"),
    (lambda: _null_draft_divergence(inv_temperature=0.0), "inv_temperature must be finite and > 0 in float32"),
    (lambda: _null_draft_divergence(inv_temperature=1e50), "inv_temperature must be finite and > 0 in float32"),
    (lambda: _null_draft_divergence(lse_in=64, lse_only=True), "lse_only computes the lse, so lse_in must be 0"),
    (lambda: _null_bridge_loss(beta=float("inf")), "beta must be finite in float32"),
    (lambda: _null_bridge_loss(beta=1e50), "beta must be finite in float32"),  # (inf in float32)
    (lambda: _null_bridge_loss(inv_temperature=float("nan")), "inv_temperature must be finite and > 0 in float32"),
], ids=["heads", "head-stride", "scale-nan", "scale-underflow", "softcap-negative", "softcap-underflow",
        "num-groups-int32", "num-groups-alone", "key-groups-alone", "inv-temperature-0", "inv-temperature-overflow",
        "lse-only-with-lse-in", "beta-inf", "beta-overflow", "bridge-inv-temperature"])
def test_scalar_arguments_are_refused_by_the_bindings(call, error):
    with pytest.raises(ValueError, match=error):
        call()


def test_group_mass_without_key_groups_is_refused():
    """sink_attention with somewhere to write group_mass but no key groups to sum it by: refused
    (it would be left unwritten), not ignored."""
    q = torch.randn(1, 1, 4, 8)
    out, stats = torch.empty_like(q), [torch.empty(1, 1, 4) for _ in range(2)]
    group_mass, ends = torch.full((1, 1, 4, 2), float("nan")), torch.ones(1, dtype=torch.int64)

    def call(group_mass_ptr):
        cpp().sink_attention("float32", q.data_ptr(), q.data_ptr(), q.data_ptr(), out.data_ptr(), 1, 1, 1, 4, 4, 8, 8,
                             *q.stride(), *q.stride(), *q.stride(), *out.stride(), 0.5, True, 0, 0, ends.data_ptr(),
                             ends.data_ptr(), 0, 0, 0, 0, stats[0].data_ptr(), stats[1].data_ptr(), group_mass_ptr, 0,
                             1)

    call(0)  # (valid)
    with pytest.raises(ValueError, match="group_mass is given without key_groups"):
        call(group_mass.data_ptr())


def test_attention_lanes_other_than_8_or_16_are_refused():
    lanes = cpp().attention_lanes()
    for width in (0, 4, 12, 32):
        with pytest.raises(ValueError, match="lanes must be 8 or 16"):
            cpp().set_attention_lanes(width)
    assert cpp().attention_lanes() == lanes


def test_narrow_items_count_each_rows_own_statistics_keys(cpu_lanes):
    """Two query rows of one head (an item of kNarrowSoftmaxRows rows: softmax_rows_block) whose
    per-position stat ends differ inside one block of keys: each row's sink_mass sums its own stat
    keys (StatKeys::count with row ends), as the reference does."""
    from fastprobe.ops.attention import _sink_attention_op

    num_keys = 40
    q, k, v = torch.randn(1, 1, 2, 8), torch.randn(1, 1, num_keys, 8), torch.randn(1, 1, num_keys, 8)
    sink_end = torch.zeros(1, num_keys, dtype=torch.int64)
    stat_end = torch.zeros(1, num_keys, dtype=torch.int64)
    stat_end[0, -2], stat_end[0, -1] = 5, 27  # the queries' positions: Lk - 2 and Lk - 1

    def call(q, k, v):
        return _sink_attention_op(q, k, v, 0.3, True, 0, None, sink_end, stat_end, None, None, None, 0, 0.0, None,
                                  None, True)

    got = call(q, k, v)
    with fp.use_backend("reference"):
        want = call(q.double(), k.double(), v.double())
    for index, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5, msg=lambda m: f"output {index}: {m}")


# ---- thread counts and the inline path (csrc/attention_core.h, run_attention) -------------------


def _bits(tensors) -> list:
    """The tensors' bits, to compare exactly (NaN payloads included)."""
    return [None if t is None else t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)
            for t in tensors]


# (B, Hq, Hkv, Lq, Lk): decoding and prefill, each below the C++ kernel's inline work limit
# (kInlineWork, 2^16 multiply-adds: one thread at any thread count) and above it (a parallel
# region at 2 and 3 threads). Lk < 512 keeps one key range per item at every count: the same plan.
@pytest.mark.parametrize("shape", [(1, 8, 2, 1, 9), (1, 8, 8, 1, 300), (1, 2, 1, 8, 8), (2, 4, 2, 45, 70)],
                         ids=["decode-inline", "decode-parallel", "prefill-inline", "prefill-parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_same_bits_at_any_thread_count(shape, dtype):
    """sink_attention and dual_path_attention give the same bits on 1, 2 and 3 threads, inline or
    in a parallel region: each item's rows see the same keys in the same order wherever it runs."""
    B, Hq, Hkv, Lq, Lk = shape
    D = 64
    q = torch.randn(B, Hq, Lq, D).to(dtype)
    k, v = torch.randn(B, Hkv, Lk, D).to(dtype), torch.randn(B, Hkv, Lk, D).to(dtype)
    key_groups = torch.randint(0, 3, (B, Lk))
    drop_keys = torch.rand(B, Lk) < 0.3
    sink_logit = torch.randn(Hq)

    def calls():
        sink = fp.sink_attention(q, k, v, num_sink=2, window=7, sink_logit=sink_logit, key_groups=key_groups,
                                 num_groups=3, return_entropy=True)
        dual = fp.dual_path_attention(q, k, v, drop_keys, gamma=0.5, rows="all", return_paths=True)
        return _bits(list(sink) + list(dual))

    threads = torch.get_num_threads()
    try:
        with fp.use_backend("cpp"):
            runs = []
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                runs.append(calls())
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for expected, got in zip(runs[0], run):
            assert (expected is None) == (got is None)
            if expected is not None:
                assert torch.equal(expected, got)


# ---- the online log-sum-exp (lse_update in csrc/common.h) --------------------------------------


@pytest.mark.parametrize("vocab", [2048, 8192, 32000])
@pytest.mark.parametrize("gap", [0.1, 0.7, 2.3])
def test_lse_of_many_near_tied_logits_keeps_its_precision(vocab, gap):
    """One logit 0 and every other -gap: a block's exp sum adds the same term 2047 times, where
    float32 rounding is most one-sided. Added in order (a build whose loop is not vectorised, e.g.
    tests/sanitize.sh's) the lse was off by up to 2.2e-5 (gaps 0.1, 2.3); the block sum in float32
    runs of 512 added in double keeps it within 5e-6 there, ~1e-6 in vectorised builds. Through
    concept_mass's lse and draft_divergence's (every row of each kernel goes through it)."""
    from fastprobe.ops.divergence import _draft_divergence_op

    logits = torch.full((2, vocab), -gap)
    logits[:, 0] = 0.0
    logits[1, vocab // 2] = 0.0  # the max again, in a later block
    want = torch.logsumexp(logits.double(), -1)
    with fp.use_backend("cpp"):
        concept_lse = fp.concept_mass(logits, fp.ConceptSet.from_ids([[0]])).lse
        _, divergence_lse = _draft_divergence_op(logits[None], logits, torch.ones(1), 1.0)
    torch.testing.assert_close(concept_lse.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(divergence_lse, torch.stack([want, want]), rtol=0, atol=1e-5)


# ---- float32 block sums in runs (for_runs in csrc/common.h) ----------------------------------


@pytest.mark.parametrize("vocab", [2048, 8192, 32000])
@pytest.mark.parametrize("gap", [0.1, 0.5, 1.5])
def test_sums_of_many_near_tied_terms_keep_their_precision(vocab, gap):
    """Rows of one logit 0 (10 for the bridge's student) and every other -gap (a second draft
    -gap / 2, the target -0.3): every block sum of draft_divergence and of bridge_loss forward
    adds the same term 2047 times. Added in order in float32 (a build whose loops are not
    vectorised, e.g. tests/sanitize.sh's) the entropies were off by up to 1.5 times the tolerance
    below and the bridge's loss by 1.4; the sums in float32 runs of kLseRun added in double keep them
    within it."""
    from fastprobe import reference

    drafts = torch.full((2, 1, vocab), -gap)
    drafts[:, :, 0] = 0.0
    drafts[1] *= 0.5
    target = torch.full((1, vocab), -0.3)
    target[:, 0] = 0.0
    student = torch.full((1, vocab), -gap)
    student[:, 0] = 10.0
    with fp.use_backend("cpp"):
        result = fp.draft_divergence(drafts, target)
        loss = fp.bridge_loss(student, target, beta=0.0, reduction="none")
    want = reference.draft_divergence(drafts.double(), target.double())
    for field in ("jsd", "kl_mixture_target", "mixture_entropy", "draft_entropy", "target_entropy"):
        torch.testing.assert_close(getattr(result, field).double(), want[field], rtol=2e-5, atol=2e-5,
                                   msg=lambda m: f"{field}: {m}")
    want_loss = reference.bridge_loss(student.double(), target.double(), beta=0.0, reduction="none")
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=2e-5)


# ---- small calls: thread counts (run_rows in csrc/common.h) ------------------------------------


# One vocabulary range a row: 5 rows are whole rows at 1 and 5 threads, their steps spread at 3 and
# 8, and a row alone runs inline (no parallel region) at any count; so do all 5 rows below
# kInlineLogits (csrc/common.h: 8192 logits, V = 64 and 200), not at V = 4000.
@pytest.mark.parametrize("vocab", [64, 200, 4000])
def test_row_kernels_same_bits_for_small_calls(vocab):
    """draft_divergence, bridge_loss (loss and gradient) and concept_mass (forward and backward)
    give each row of a small call (V <= 4000) the same bits alone, in a batch and on 1, 2, 3, 5 and
    8 threads, and match the reference."""
    from .conftest import same_bits_per_row
    from fastprobe import reference

    generator = torch.Generator().manual_seed(0)
    drafts = 3 * torch.randn(3, 5, vocab, generator=generator)
    target = 3 * torch.randn(5, vocab, generator=generator)
    student = 3 * torch.randn(5, vocab, generator=generator)
    concepts = fp.ConceptSet.from_ids([[c, (7 * c + 3) % vocab] for c in range(20)])

    def divergence(rows):
        result = fp.draft_divergence(drafts[:, rows], target[rows])
        return tuple(getattr(result, field) for field in ("jsd", "kl_mixture_target", "target_entropy"))

    def bridge(rows):
        logits = student[rows].clone().requires_grad_()
        loss = fp.bridge_loss(logits, target[rows], beta=0.5, reduction="none")
        loss.sum().backward()
        return loss.detach(), logits.grad

    def concept(rows):
        logits = student[rows].clone().requires_grad_()
        result = fp.concept_mass(logits, concepts)
        result.log_mass.sum().backward()
        return result.mass, result.concentration_entropy, logits.grad

    jsd = same_bits_per_row(divergence, 5)[0]
    loss = same_bits_per_row(bridge, 5)[0]
    mass = same_bits_per_row(concept, 5)[0]
    want = reference.draft_divergence(drafts.double(), target.double())
    torch.testing.assert_close(jsd.double(), want["jsd"], rtol=1e-5, atol=1e-5)
    want_loss = reference.bridge_loss(student.double(), target.double(), beta=0.5, reduction="none")
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=1e-5)
    want_mass = reference.concept_mass(student.double(), concepts.token_ids, concepts.offsets)["mass"]
    torch.testing.assert_close(mass.double(), want_mass, rtol=1e-5, atol=1e-6)
