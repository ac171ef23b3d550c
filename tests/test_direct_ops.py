"""The custom ops called directly (torch.ops.fastprobe.<name> and the Python op objects), past the
public functions' checks: every inconsistency between their tensor arguments that would let a
kernel read or write outside a buffer (shapes that must agree, the dtypes the kernels read,
contiguity where they read densely, one device) is refused with a ValueError / TypeError naming
the argument, before any kernel runs. The checks read tensor metadata only (no host sync); the
values (ids, ends) stay the kernels' own to check or clamp."""

import pytest
import torch

import fastprobe as fp
from fastprobe.ops import attention, concepts, divergence, dual_attention

OPS = {
    "draft_divergence": (divergence, divergence._draft_divergence_op),
    "concept_mass": (concepts, concepts._concept_mass_op),
    "concept_mass_backward": (concepts, concepts._concept_mass_backward_op),
    "sink_attention": (attention, attention._sink_attention_op),
    "dual_path_attention": (dual_attention, dual_attention._dual_path_attention_op),
}


# ---------------------------------------------------------------- valid arguments, in schema order


def divergence_args() -> dict:
    return dict(draft=torch.randn(3, 5, 37), target=torch.randn(5, 37), weights=torch.full((3,), 1 / 3),
                inv_temperature=1.0, lse_in=None, lse_only=False)


def _index():
    return fp.ConceptSet.from_ids([[1, 2], [3], [0, 3, 7]])._index


def concept_args() -> dict:
    return dict(logits=torch.randn(3, 10), **_index()._asdict(), inv_temperature=1.0)


def concept_backward_args() -> dict:
    index = _index()
    num_concepts = index.offsets.numel() - 1
    first_variants = index.token_ids[index.offsets[:-1]]
    return dict(grad_log_mass=torch.randn(3, num_concepts), grad_lse=torch.randn(3, dtype=torch.float64),
                logits=torch.randn(3, 10), top_share=torch.rand(3, num_concepts) + 0.5,
                top_token=first_variants.expand(3, num_concepts).contiguous(), row_state=torch.randn(2, 3),
                vocab_ids=index.vocab_ids, vocab_offsets=index.vocab_offsets, vocab_concepts=index.vocab_concepts,
                id_block_starts=index.id_block_starts, inv_temperature=1.0)


def _qkv() -> dict:  # B = 2, Hq = 4, Hkv = 2, Lq = 5, Lk = 9, D = 8
    return dict(q=torch.randn(2, 4, 5, 8), k=torch.randn(2, 2, 9, 8), v=torch.randn(2, 2, 9, 8))


def _key_bounds() -> dict:  # horizon: j <= p (causal); start: every key
    return dict(horizon=torch.arange(9).expand(2, 9).contiguous(), start=torch.zeros(2, 9, dtype=torch.int64))


def sink_args() -> dict:
    return dict(**_qkv(), scale=0.3, causal=True, window=0, key_real=torch.ones(2, 9, dtype=torch.uint8),
                sink_end=torch.ones(2, dtype=torch.int64), stat_end=torch.ones(2, dtype=torch.int64),
                head_mask=torch.ones(4, dtype=torch.uint8), sink_logit=torch.zeros(4),
                key_groups=torch.randint(0, 2, (2, 9), dtype=torch.int32), num_groups=2, softcap=0.0,
                **_key_bounds(), return_entropy=True)


def dual_args() -> dict:
    key_bounds = _key_bounds()
    return dict(**_qkv(), drop=(torch.rand(2, 9) < 0.3).to(torch.uint8), rows=torch.ones(2, 5, dtype=torch.uint8),
                key_real=torch.ones(2, 9, dtype=torch.uint8), gamma=0.5, orthogonalize=True, eps=1e-6, scale=0.3,
                causal=True, horizon=key_bounds["horizon"], start=key_bounds["start"], window=0, return_paths=True)


BASE = {
    "draft_divergence": divergence_args,
    "concept_mass": concept_args,
    "concept_mass_backward": concept_backward_args,
    "sink_attention": sink_args,
    "dual_path_attention": dual_args,
}


# ---------------------------------------------------------------- inconsistent arguments

U8, I32, I64 = torch.uint8, torch.int32, torch.int64
F16, BF16, F32, F64, F8 = torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn


def expanded(shape, dtype, fill=1):
    """A tensor of `shape` that holds one element (stride 0): a kernel reading it densely reads
    past its storage."""
    return torch.full((1,) * len(shape), fill, dtype=dtype).expand(shape)


def fresh(tensor):
    """A copy of a slice in memory of its own: a kernel reading past it reads past an allocation
    (which AddressSanitizer sees), not into the rest of the sliced tensor."""
    return tensor.clone(memory_format=torch.contiguous_format)


def strided(shape, dtype):
    """A non-contiguous tensor of `shape` (the transpose of a [.., last, first] one)."""
    return torch.zeros(tuple(reversed(shape)), dtype=dtype).t()


def meta(tensor):
    return tensor.to("meta")


# (op, what is wrong, the arguments changed from the op's valid ones, error, words in its message).
# "meta" cases put one tensor on another device (the meta device stands in for a GPU); they are
# called through the op's body, since torch's dispatcher hands a call with a meta tensor to the
# fake implementation, which runs no kernel.
CASES = [
    # draft_divergence: draft [K, N, V], target [N, V], weights [K], lse_in [K + 1, N] float64
    ("draft_divergence", "draft 2-D", lambda a: dict(draft=torch.randn(5, 37)), ValueError, "draft must be"),
    ("draft_divergence", "draft int", lambda a: dict(draft=a["draft"].to(I64)), TypeError, "draft must be"),
    ("draft_divergence", "draft float8", lambda a: dict(draft=a["draft"].to(F8), target=a["target"].to(F8)),
     TypeError, "draft must be a float32, bfloat16, float16 or float64 tensor"),
    ("draft_divergence", "draft K=0", lambda a: dict(draft=torch.randn(0, 5, 37), weights=torch.ones(0)),
     ValueError, "draft must be"),
    ("draft_divergence", "target fewer rows", lambda a: dict(target=torch.randn(2, 37)), ValueError, "target must"),
    ("draft_divergence", "target shorter vocab", lambda a: dict(target=torch.randn(5, 30)), ValueError, "target must"),
    ("draft_divergence", "target 1-D", lambda a: dict(target=torch.randn(5 * 37)), ValueError, "target must"),
    ("draft_divergence", "target int64", lambda a: dict(target=a["target"].to(I64)), TypeError, "target must"),
    ("draft_divergence", "weights short", lambda a: dict(weights=torch.full((2,), 0.5)), ValueError, "weights must"),
    ("draft_divergence", "weights float16", lambda a: dict(weights=a["weights"].to(F16)), TypeError, "weights must"),
    ("draft_divergence", "weights float64", lambda a: dict(weights=a["weights"].to(F64)), TypeError, "weights must"),
    ("draft_divergence", "weights expanded", lambda a: dict(weights=expanded((3,), F32, 1 / 3)),
     ValueError, "weights must be contiguous"),
    ("draft_divergence", "lse_in shape", lambda a: dict(lse_in=torch.zeros(2, 5, 4, dtype=F64)),
     ValueError, "lse_in must"),
    ("draft_divergence", "lse_in one part", lambda a: dict(lse_in=torch.zeros(4, 5, dtype=F64)),
     ValueError, "lse_in must"),
    ("draft_divergence", "lse_in float32", lambda a: dict(lse_in=torch.zeros(2, 4, 5)), TypeError, "lse_in must"),
    ("draft_divergence", "lse_in expanded", lambda a: dict(lse_in=expanded((2, 4, 5), F64)),
     ValueError, "lse_in must be contiguous"),
    ("draft_divergence", "lse_in with lse_only", lambda a: dict(lse_in=torch.zeros(2, 4, 5, dtype=F64), lse_only=True),
     ValueError, "lse_only"),
    ("draft_divergence", "meta target", lambda a: dict(target=meta(a["target"])), ValueError, "target is on meta"),
    ("draft_divergence", "meta weights", lambda a: dict(weights=meta(a["weights"])), ValueError, "weights is on meta"),
    ("draft_divergence", "meta lse_in", lambda a: dict(lse_in=torch.zeros(2, 4, 5, dtype=F64, device="meta")),
     ValueError, "lse_in is on meta"),
    # concept_mass: logits [N, V]; the _Index's int64 tensors (id_block_starts int32), 1-D, contiguous
    ("concept_mass", "logits 3-D", lambda a: dict(logits=torch.randn(1, 3, 10)), ValueError, "logits must be"),
    ("concept_mass", "logits int", lambda a: dict(logits=a["logits"].to(I64)), TypeError, "logits must be"),
    ("concept_mass", "logits float8", lambda a: dict(logits=a["logits"].to(F8)),
     TypeError, "logits must be a float32, bfloat16, float16 or float64 tensor"),
    ("concept_mass", "logits empty vocabulary", lambda a: dict(logits=torch.randn(3, 0)), ValueError, "V >= 1"),
    ("concept_mass", "token_ids int32", lambda a: dict(token_ids=a["token_ids"].to(I32)), TypeError, "token_ids must"),
    ("concept_mass", "token_ids 2-D", lambda a: dict(token_ids=fresh(a["token_ids"][None])),
     ValueError, "token_ids must"),
    ("concept_mass", "token_ids expanded", lambda a: dict(token_ids=expanded((6,), I64)),
     ValueError, "token_ids must be contiguous"),
    ("concept_mass", "offsets int32", lambda a: dict(offsets=a["offsets"].to(I32)), TypeError, "offsets must"),
    ("concept_mass", "offsets one entry", lambda a: dict(offsets=torch.zeros(1, dtype=I64)),
     ValueError, "offsets must"),
    ("concept_mass", "offsets expanded", lambda a: dict(offsets=expanded((4,), I64, 0)),
     ValueError, "offsets must be contiguous"),
    ("concept_mass", "token_slots short", lambda a: dict(token_slots=fresh(a["token_slots"][:-1])),
     ValueError, "token_slots must"),
    ("concept_mass", "token_slots int32", lambda a: dict(token_slots=a["token_slots"].to(I32)),
     TypeError, "token_slots must"),
    ("concept_mass", "vocab_ids int32", lambda a: dict(vocab_ids=a["vocab_ids"].to(I32)), TypeError, "vocab_ids must"),
    ("concept_mass", "vocab_offsets short", lambda a: dict(vocab_offsets=fresh(a["vocab_offsets"][:-1])),
     ValueError, "vocab_offsets must"),
    ("concept_mass", "vocab_concepts short", lambda a: dict(vocab_concepts=fresh(a["vocab_concepts"][:-1])),
     ValueError, "vocab_concepts must"),
    ("concept_mass", "id_block_starts int64", lambda a: dict(id_block_starts=a["id_block_starts"].to(I64)),
     TypeError, "id_block_starts must"),
    ("concept_mass", "id_block_starts empty", lambda a: dict(id_block_starts=torch.zeros(0, dtype=I32)),
     ValueError, "id_block_starts must"),
    ("concept_mass", "meta token_ids", lambda a: dict(token_ids=meta(a["token_ids"])),
     ValueError, "token_ids is on meta"),
    ("concept_mass", "meta offsets", lambda a: dict(offsets=meta(a["offsets"])), ValueError, "offsets is on meta"),
    ("concept_mass", "meta id_block_starts", lambda a: dict(id_block_starts=meta(a["id_block_starts"])),
     ValueError, "id_block_starts is on meta"),
    # concept_mass_backward: logits [N, V]; top_share [N, C] float32, top_token [N, C] int64, row_state [2, N] float32
    ("concept_mass_backward", "logits more rows", lambda a: dict(logits=torch.randn(4, 10)),
     ValueError, "grad_log_mass must have shape"),
    ("concept_mass_backward", "logits 1-D", lambda a: dict(logits=torch.randn(10)), ValueError, "logits must be"),
    ("concept_mass_backward", "logits float8", lambda a: dict(logits=a["logits"].to(F8)),
     TypeError, "logits must be a float32, bfloat16, float16 or float64 tensor"),
    ("concept_mass_backward", "logits empty vocabulary", lambda a: dict(logits=torch.randn(3, 0)), ValueError,
     "V >= 1"),
    ("concept_mass_backward", "grad_log_mass one row", lambda a: dict(grad_log_mass=fresh(a["grad_log_mass"][:1])),
     ValueError, "grad_log_mass must"),
    ("concept_mass_backward", "grad_lse one row", lambda a: dict(grad_lse=fresh(a["grad_lse"][:1])),
     ValueError, "grad_lse must"),
    ("concept_mass_backward", "top_share 1-D", lambda a: dict(top_share=fresh(a["top_share"][0])),
     ValueError, "top_share must"),
    ("concept_mass_backward", "top_share one row", lambda a: dict(top_share=fresh(a["top_share"][:1])),
     ValueError, "top_share must"),
    ("concept_mass_backward", "top_share bfloat16", lambda a: dict(top_share=a["top_share"].to(BF16)),
     TypeError, "top_share must"),
    ("concept_mass_backward", "top_share expanded", lambda a: dict(top_share=expanded((3, 3), F32, 0.5)),
     ValueError, "top_share must be contiguous"),
    ("concept_mass_backward", "top_token one row", lambda a: dict(top_token=fresh(a["top_token"][:1])),
     ValueError, "top_token must"),
    ("concept_mass_backward", "top_token int32", lambda a: dict(top_token=a["top_token"].to(I32)),
     TypeError, "top_token must"),
    ("concept_mass_backward", "top_token expanded", lambda a: dict(top_token=expanded((3, 3), I64)),
     ValueError, "top_token must be contiguous"),
    ("concept_mass_backward", "row_state float64", lambda a: dict(row_state=a["row_state"].double()), TypeError,
     "row_state must"),
    ("concept_mass_backward", "row_state one row", lambda a: dict(row_state=fresh(a["row_state"][:, :1])), ValueError,
     "row_state must"),
    ("concept_mass_backward", "vocab_ids int32", lambda a: dict(vocab_ids=a["vocab_ids"].to(I32)),
     TypeError, "vocab_ids must"),
    ("concept_mass_backward", "vocab_offsets short", lambda a: dict(vocab_offsets=fresh(a["vocab_offsets"][:-1])),
     ValueError, "vocab_offsets must"),
    ("concept_mass_backward", "vocab_concepts int32", lambda a: dict(vocab_concepts=a["vocab_concepts"].to(I32)),
     TypeError, "vocab_concepts must"),
    ("concept_mass_backward", "vocab_concepts expanded", lambda a: dict(vocab_concepts=expanded((6,), I64, 0)),
     ValueError, "vocab_concepts must be contiguous"),
    ("concept_mass_backward", "id_block_starts empty", lambda a: dict(id_block_starts=torch.zeros(0, dtype=I32)),
     ValueError, "id_block_starts must"),
    ("concept_mass_backward", "meta top_share", lambda a: dict(top_share=meta(a["top_share"])),
     ValueError, "top_share is on meta"),
    ("concept_mass_backward", "meta row_state", lambda a: dict(row_state=meta(a["row_state"])), ValueError,
     "row_state is on meta"),
    ("concept_mass_backward", "meta vocab_ids", lambda a: dict(vocab_ids=meta(a["vocab_ids"])),
     ValueError, "vocab_ids is on meta"),
]

# q, k, v: the same for both attention ops
for _op in ("sink_attention", "dual_path_attention"):
    CASES += [
        (_op, "q 3-D", lambda a: dict(q=fresh(a["q"][0])), ValueError, "q, k and v must be 4-D"),
        (_op, "k batch 1", lambda a: dict(k=fresh(a["k"][:1])), ValueError, "k must have shape"),
        (_op, "k head dim", lambda a: dict(k=fresh(a["k"][..., :4])), ValueError, "k must have shape"),
        (_op, "k bfloat16", lambda a: dict(k=a["k"].to(BF16)), TypeError, "k must be a float32"),
        (_op, "q, k, v float8", lambda a: {name: a[name].to(F8) for name in "qkv"},
         TypeError, "q must be a float32, bfloat16, float16 or float64 tensor"),
        (_op, "v fewer keys", lambda a: dict(v=fresh(a["v"][:, :, :7])), ValueError, "v must have shape"),
        (_op, "v fewer heads", lambda a: dict(v=fresh(a["v"][:, :1])), ValueError, "v must have shape"),
        (_op, "v float16", lambda a: dict(v=a["v"].to(F16)), TypeError, "v must be a float32"),
        (_op, "key_real short", lambda a: dict(key_real=fresh(a["key_real"][:, :5])), ValueError, "key_real must"),
        (_op, "key_real bool", lambda a: dict(key_real=a["key_real"].bool()), TypeError, "key_real must be a uint8"),
        (_op, "key_real expanded", lambda a: dict(key_real=expanded((2, 9), U8)),
         ValueError, "key_real must be contiguous"),
        (_op, "horizon short", lambda a: dict(horizon=fresh(a["horizon"][:, :5])), ValueError, "horizon must"),
        (_op, "horizon int32", lambda a: dict(horizon=a["horizon"].to(I32)), TypeError, "horizon must"),
        (_op, "start short", lambda a: dict(start=fresh(a["start"][:1])), ValueError, "start must"),
        (_op, "start int32", lambda a: dict(start=a["start"].to(I32)), TypeError, "start must"),
        (_op, "start strided", lambda a: dict(start=strided((2, 9), I64)), ValueError, "start must be contiguous"),
        # the shapes every backend refuses (the reference ran Lq > Lk and D = 0, and failed in einsum or with a
        # ZeroDivisionError on the heads; the kernels refused some of them, each its own)
        (_op, "k, v no heads", lambda a: dict(k=torch.randn(2, 0, 9, 8), v=torch.randn(2, 0, 9, 8)),
         ValueError, "at least one key/value head"),
        (_op, "Hq not a multiple of Hkv", lambda a: dict(k=torch.randn(2, 3, 9, 8), v=torch.randn(2, 3, 9, 8)),
         ValueError, "multiple of the number of key/value heads"),
        (_op, "q, k head dim 0", lambda a: dict(q=torch.randn(2, 4, 5, 0), k=torch.randn(2, 2, 9, 0)),
         ValueError, "head dims >= 1"),
        (_op, "v head dim 0", lambda a: dict(v=torch.randn(2, 2, 9, 0)), ValueError, "head dims >= 1"),
        (_op, "Lq > Lk", lambda a: dict(q=torch.randn(2, 4, 10, 8)), ValueError, "Lq = 10 queries but k has only Lk = 9"),
        (_op, "meta k", lambda a: dict(k=meta(a["k"])), ValueError, "k is on meta"),
        (_op, "meta key_real", lambda a: dict(key_real=meta(a["key_real"])), ValueError, "key_real is on meta"),
        (_op, "meta horizon", lambda a: dict(horizon=meta(a["horizon"])), ValueError, "horizon is on meta"),
    ]

CASES += [  # (every backend refuses what one refuses: the reference would run on any inverse temperature)
    (op, f"inv_temperature {value}", lambda a, value=value: dict(inv_temperature=value), ValueError,
     f"{op}: inv_temperature must be a positive number")
    for op in ("draft_divergence", "concept_mass", "concept_mass_backward")
    for value in (-1.0, 0.0, 1e-50, float("nan"), float("inf"), 1e39)
]
CASES += [
    # sink_attention: sink_end, stat_end int64 [B] (or both [B, Lk]); head_mask uint8 [Hq]; sink_logit float32 [Hq];
    # key_groups int32 [B, Lk] with num_groups >= 1
    ("sink_attention", "sink_end short", lambda a: dict(sink_end=fresh(a["sink_end"][:1])),
     ValueError, "sink_end must"),
    ("sink_attention", "sink_end int32", lambda a: dict(sink_end=a["sink_end"].to(I32)), TypeError, "sink_end must"),
    ("sink_attention", "sink_end expanded", lambda a: dict(sink_end=expanded((2,), I64)),
     ValueError, "sink_end must be contiguous"),
    ("sink_attention", "stat_end short", lambda a: dict(stat_end=fresh(a["stat_end"][:1])),
     ValueError, "stat_end must"),
    ("sink_attention", "stat_end per position only", lambda a: dict(stat_end=torch.ones(2, 9, dtype=I64)),
     ValueError, "stat_end must"),
    ("sink_attention", "sink_end per position only", lambda a: dict(sink_end=torch.ones(2, 9, dtype=I64)),
     ValueError, "stat_end must"),
    ("sink_attention", "head_mask short", lambda a: dict(head_mask=fresh(a["head_mask"][:2])),
     ValueError, "head_mask must"),
    ("sink_attention", "head_mask bool", lambda a: dict(head_mask=a["head_mask"].bool()), TypeError, "head_mask must"),
    ("sink_attention", "sink_logit short", lambda a: dict(sink_logit=fresh(a["sink_logit"][:2])),
     ValueError, "sink_logit must"),
    ("sink_attention", "sink_logit float16", lambda a: dict(sink_logit=a["sink_logit"].to(F16)),
     TypeError, "sink_logit must"),
    ("sink_attention", "key_groups short", lambda a: dict(key_groups=fresh(a["key_groups"][:, :5])),
     ValueError, "key_groups must"),
    ("sink_attention", "key_groups int64", lambda a: dict(key_groups=a["key_groups"].to(I64)),
     TypeError, "key_groups must"),
    ("sink_attention", "key_groups strided", lambda a: dict(key_groups=strided((2, 9), I32)),
     ValueError, "key_groups must be contiguous"),
    ("sink_attention", "num_groups 0", lambda a: dict(num_groups=0), ValueError, "num_groups must"),
    ("sink_attention", "meta sink_end", lambda a: dict(sink_end=meta(a["sink_end"])),
     ValueError, "sink_end is on meta"),
    ("sink_attention", "meta head_mask", lambda a: dict(head_mask=meta(a["head_mask"])),
     ValueError, "head_mask is on meta"),
    ("sink_attention", "meta sink_logit", lambda a: dict(sink_logit=meta(a["sink_logit"])),
     ValueError, "sink_logit is on meta"),
    ("sink_attention", "meta key_groups", lambda a: dict(key_groups=meta(a["key_groups"])),
     ValueError, "key_groups is on meta"),
    # dual_path_attention: drop uint8 [B, Lk]; rows uint8 [B, Lq]
    ("dual_path_attention", "drop short", lambda a: dict(drop=fresh(a["drop"][:, :5])), ValueError, "drop must"),
    ("dual_path_attention", "drop bool", lambda a: dict(drop=a["drop"].bool()), TypeError, "drop must"),
    ("dual_path_attention", "drop expanded", lambda a: dict(drop=expanded((2, 9), U8)),
     ValueError, "drop must be contiguous"),
    ("dual_path_attention", "rows per query only", lambda a: dict(rows=fresh(a["rows"][0])), ValueError, "rows must"),
    ("dual_path_attention", "rows short", lambda a: dict(rows=fresh(a["rows"][:, :3])), ValueError, "rows must"),
    ("dual_path_attention", "rows bool", lambda a: dict(rows=a["rows"].bool()), TypeError, "rows must"),
    ("dual_path_attention", "meta drop", lambda a: dict(drop=meta(a["drop"])), ValueError, "drop is on meta"),
    ("dual_path_attention", "meta rows", lambda a: dict(rows=meta(a["rows"])), ValueError, "rows is on meta"),
]


def case_args(op: str, change) -> tuple:
    args = BASE[op]()
    args.update(change(args))
    return tuple(args.values())


def _kernel_ran(*args, **kwargs):
    raise AssertionError("a kernel was about to run: the op did not refuse its arguments")


def on(device, args: dict) -> dict:
    return {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in args.items()}


@pytest.mark.parametrize("op", sorted(OPS))
def test_valid_arguments_run(op, target):
    """The valid arguments every case changes pass the checks and run, both ways in, in the
    target's backend and in the reference."""
    backend, device = target
    args = tuple(on(device, BASE[op]()).values())
    for each in (backend, "reference"):
        fp.set_backend(each)
        direct = getattr(torch.ops.fastprobe, op)(*args)
        assert len(direct) == len(OPS[op][1](*args))


@pytest.mark.parametrize("op", ["sink_attention", "dual_path_attention"])
def test_more_queries_than_keys_are_refused_by_every_kernel(op, target):
    """Queries are the last Lq of the Lk positions: besides the public functions, every kernel
    backend refuses Lq > Lk when the op is called directly (the Triton launchers ran such a call,
    leaving the queries before the first key nothing to attend to, where C++ raised)."""
    backend, device = target
    args = on(device, BASE[op]())
    args["q"] = torch.randn(2, 4, 10, 8, device=device)  # Lq = 10 > Lk = 9
    if op == "dual_path_attention":
        args["rows"] = torch.ones(2, 10, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError, match=r"num_queries \(10\) must be <= num_keys \(9\)|Lq = 10 .* Lk = 9"):
        getattr(torch.ops.fastprobe, op)(*args.values())


@pytest.mark.parametrize("op, what, change, error, words", CASES, ids=[f"{case[0]}: {case[1]}" for case in CASES])
def test_inconsistent_arguments_are_refused_before_any_kernel(op, what, change, error, words, monkeypatch):
    module, op_object = OPS[op]
    args = case_args(op, change)
    monkeypatch.setattr(module, "resolve", _kernel_ran)  # (resolve picks the kernel, just before it runs)
    calls = [op_object.body] if what.startswith("meta") else [getattr(torch.ops.fastprobe, op), op_object]
    for call in calls:
        with pytest.raises(error, match=words):
            call(*args)


class _ChecksPassed(Exception):
    pass


def _checks_passed(*args, **kwargs):
    raise _ChecksPassed


@pytest.mark.parametrize("op", sorted(OPS))
def test_the_checks_read_no_values(op, monkeypatch):
    """The checks read tensor metadata only (no host sync per call): valid arguments as meta
    tensors, whose values cannot be read, pass them and reach the kernel choice."""
    module, op_object = OPS[op]
    args = tuple(meta(a) if isinstance(a, torch.Tensor) else a for a in BASE[op]().values())
    monkeypatch.setattr(module, "resolve", _checks_passed)
    with pytest.raises(_ChecksPassed):
        op_object.body(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(OPS))
def test_tensors_on_two_devices_are_refused(op, monkeypatch):
    """One tensor on the CPU, the others on the GPU: refused, naming it (a C++ kernel would read
    a GPU address, a Triton kernel a host one)."""
    module, op_object = OPS[op]
    args = on("cuda", BASE[op]())
    anchor = "logits" if op == "concept_mass_backward" else next(iter(args))  # (whose device the others must share)
    monkeypatch.setattr(module, "resolve", _kernel_ran)
    for name, value in args.items():
        if name == anchor or not isinstance(value, torch.Tensor):
            continue
        moved = tuple(dict(args, **{name: value.cpu()}).values())
        for call in (getattr(torch.ops.fastprobe, op), op_object):
            with pytest.raises(ValueError, match=f"{name} is on cpu"):
                call(*moved)


def bridge_args() -> dict:
    return dict(student=torch.randn(3, 7), teacher=torch.randn(3, 7), labels=torch.zeros(3, dtype=I64),
                ignore_index=-100, beta=torch.tensor(0.5, dtype=F64), inv_temperature=1.0, reverse=False,
                compute_grad=True)


@pytest.mark.parametrize("op", sorted(BASE) + ["bridge_loss"])
def test_one_meta_tensor_among_real_ones_is_refused(op):
    """torch's dispatcher hands a call with any meta tensor to the op's fake implementation, whose
    outputs are made like the first tensor: with that one real, they were real, uninitialised, and
    returned as results. Refused, naming the meta tensor (bridge_loss's 0-dim CPU beta mixes with
    any device, as torch's scalars do)."""
    args = (bridge_args if op == "bridge_loss" else BASE[op])()
    for name, value in args.items():
        if not isinstance(value, torch.Tensor):
            continue
        moved = tuple(dict(args, **{name: meta(value)}).values())
        with pytest.raises(ValueError, match=f"{name} is on meta|is on meta but {name} is on cpu"):
            getattr(torch.ops.fastprobe, op)(*moved)
    real = {name: meta(value) if isinstance(value, torch.Tensor) and name != "beta" else value
            for name, value in args.items()}
    assert all(t.is_meta for t in getattr(torch.ops.fastprobe, op)(*real.values()))  # (meta with a CPU beta: runs)


def test_bridge_loss_backward_without_the_gradient_it_did_not_compute_is_refused():
    """The op called directly with compute_grad=False on a student that requires grad forms no
    logit gradient (its buffer is the [0] marker), so a backward through its loss has none to
    scale: a RuntimeError saying why, not a [N, 0] gradient that autograd refuses by shape. (The
    public functions ask for the gradient whenever the student requires grad.)"""
    args = dict(bridge_args(), compute_grad=False)
    student = args["student"].requires_grad_()
    loss, grad = torch.ops.fastprobe.bridge_loss(*args.values())
    assert grad.shape == (0,)
    with pytest.raises(RuntimeError, match="bridge_loss: no gradient was computed, because student_logits did not"):
        loss.sum().backward()
    assert student.grad is None
    # with the gradient computed, the same backward gives d sum(loss) / d student
    student.grad = None
    loss, _ = torch.ops.fastprobe.bridge_loss(*dict(args, compute_grad=True).values())
    loss.sum().backward()
    assert student.grad is not None and student.grad.shape == student.shape
