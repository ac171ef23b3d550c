"""Input dtypes outside SPEC's list (float32, bfloat16, float16; float64 runs the reference): the
float8 variants are refused by every public op with a TypeError naming the argument, before any
kernel runs (they used to run through the reference backend). And the attention ops under
torch.autocast: they take q, k and v as SDPA does there (cast to autocast's dtype)."""

import pytest
import torch

import fastprobe as fp
from fastprobe.ops import _common, attention, bridge, concepts, divergence, dual_attention

FLOAT8 = [getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
          if hasattr(torch, name)]
MODULES = (attention, bridge, concepts, divergence, dual_attention)


def _kernel_ran(*args, **kwargs):
    raise AssertionError("a kernel was about to run: the op did not refuse its arguments")


def qkv(dtype):
    return [torch.randn(shape).to(dtype) for shape in ((1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 5, 8))]


# (argument named in the error, call(dtype) with that argument, and only it where it can be alone, in dtype)
CALLS = [
    ("draft_logits", lambda d: fp.draft_divergence(torch.randn(2, 3, 7).to(d))),
    ("target_logits", lambda d: fp.draft_divergence(torch.randn(2, 3, 7), torch.randn(3, 7).to(d))),
    ("weights", lambda d: fp.draft_divergence(torch.randn(2, 3, 7), weights=torch.tensor([0.5, 0.5]).to(d))),
    ("logits", lambda d: fp.concept_mass(torch.randn(3, 7).to(d), fp.ConceptSet.from_ids([[1, 2], [3]]))),
    ("q", lambda d: fp.sink_attention(*qkv(d))),
    ("sink_logit", lambda d: fp.sink_attention(*qkv(torch.float32), sink_logit=torch.zeros(2).to(d))),
    ("q", lambda d: fp.dual_path_attention(*qkv(d), torch.zeros(1, 5, dtype=torch.bool), gamma=0.5)),
    ("student_logits", lambda d: fp.bridge_loss(torch.randn(3, 7).to(d), torch.randn(3, 7).to(d), beta=0.5)),
    ("student_hidden", lambda d: fp.FusedLinearBridgeLoss(beta=0.5)(
        torch.randn(3, 4).to(d), torch.randn(7, 4), torch.randn(3, 4), torch.randn(7, 4))),
]


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
@pytest.mark.parametrize("name, call", CALLS, ids=[f"{i}-{c[0]}" for i, c in enumerate(CALLS)])
def test_float8_inputs_are_refused_by_name(name, call, dtype, monkeypatch):
    for module in MODULES:
        monkeypatch.setattr(module, "resolve", _kernel_ran)
    words = rf"^{name} must be a float32, bfloat16, float16 or float64 tensor, got {dtype}"
    with pytest.raises(TypeError, match=words):
        call(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, *FLOAT8, torch.int64,
                                   torch.complex64], ids=str)
def test_check_dtype_accepts_spec_dtypes_only(dtype):
    tensor = torch.zeros(2, dtype=dtype)
    if dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        _common.check_dtype(tensor, "x")
    else:
        with pytest.raises(TypeError, match=f"x must be a float32, bfloat16, float16 or float64 tensor, got {dtype}"):
            _common.check_dtype(tensor, "x")


def _attention_calls():
    """(name, call(q, k, v) -> output tuple) for the two attention ops, statistics included."""
    image = torch.tensor([[False, True, True, False, False]])
    return [
        ("sink", lambda q, k, v: tuple(fp.sink_attention(q, k, v, num_sink=1, window=2, return_entropy=True))[:3]
         + (fp.sink_attention(q, k, v, return_entropy=True).entropy,)),
        ("dual", lambda q, k, v: tuple(fp.dual_path_attention(q, k, v, image, gamma=0.5, return_paths=True))),
    ]


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name, call", _attention_calls(), ids=[c[0] for c in _attention_calls()])
def test_attention_under_autocast_takes_qkv_as_sdpa_does(name, call, autocast):
    """A model run under torch.autocast hands attention float32 q and k (its rotary embedding
    promotes them) with a lower-precision v; SDPA casts all three to autocast's dtype, and so do
    the attention ops: the same bits as the cast inputs outside autocast. (It used to refuse
    the mixed dtypes, and float32 inputs ran in float32.)"""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8).to(autocast)
    with torch.autocast("cpu", dtype=autocast):
        got = call(q, k, v)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        uniform = call(q, k.to(autocast), v.float())  # (any mix of the three lower-precision dtypes)
    want = call(q.to(autocast), k.to(autocast), v)
    assert got[0].dtype == sdpa.dtype == autocast
    for got_field, uniform_field, want_field in zip(got, uniform, want):
        if want_field is not None:
            assert torch.equal(got_field, want_field) and torch.equal(uniform_field, want_field)
    with torch.autocast("cpu", dtype=autocast):  # float64 is left alone (it runs the reference)
        assert call(q.double(), k.double(), v.double())[0].dtype == torch.float64
        with pytest.raises(TypeError, match="q, k and v must share one dtype"):
            call(q.double(), k, v)  # (SDPA refuses that mix under autocast too)
    with pytest.raises(TypeError, match="q, k and v must share one dtype"):  # outside autocast: no casts
        call(q, k, v)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_ops_compute_as_outside_autocast(backend):
    """torch.autocast casts no op's arithmetic: the logit ops give, for float32 logits, the bits they
    give outside it, and the attention ops those of q, k and v cast to autocast's dtype, in every
    backend. (The reference's einsum and matrix products ran in bfloat16 inside the ops' bodies:
    draft_divergence's jsd off by ~1e-3, attention's output by an ulp.)"""
    logits, drafts = torch.randn(4, 9), torch.randn(2, 4, 9)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    image = torch.tensor([[False, True, True, False, False]])
    concepts = fp.ConceptSet.from_ids([[1, 3], [2, 5, 7]])
    calls = [lambda *qkv: tuple(fp.draft_divergence(drafts, logits, weights=torch.tensor([0.3, 0.7]))),
             lambda *qkv: tuple(fp.concept_mass(logits, concepts)),
             lambda *qkv: (fp.bridge_loss(logits, logits.flip(0), beta=0.5, reduction="none"),),
             lambda *qkv: tuple(fp.sink_attention(*qkv, return_entropy=True))[:2],
             lambda *qkv: fp.dual_path_attention(*qkv, image, gamma=0.5, return_paths=True)]
    with fp.use_backend(backend):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = [call(q, k, v) for call in calls]
        want = [call(q.bfloat16(), k.bfloat16(), v.bfloat16()) for call in calls]
    for got_fields, want_fields in zip(got, want):
        for got_field, want_field in zip(got_fields, want_fields):
            assert torch.equal(got_field, want_field)


def test_autocast_of_another_device_type_casts_nothing(monkeypatch):
    """Only autocast for the inputs' device type applies (CUDA's autocast leaves CPU tensors alone)."""
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    real_enabled = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda kind="cuda": kind != "cpu" or real_enabled(kind))
    monkeypatch.setattr(_common, "_any_autocast", lambda: True)  # (as with CUDA's autocast on)
    assert fp.sink_attention(q, k, v).out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp.sink_attention(q, k, v).out.dtype == torch.bfloat16


def test_attention_under_autocast_compiles_fullgraph():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8).bfloat16()

    def run(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            result = fp.sink_attention(q, k, v, return_entropy=True)
        return result.out, result.entropy

    got = torch.compile(run, fullgraph=True)(q, k, v)
    want = run(q, k, v)
    assert got[0].dtype == torch.bfloat16
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
