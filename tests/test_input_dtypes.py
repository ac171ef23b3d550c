"""Input dtypes outside SPEC's list (float32, bfloat16, float16; float64 runs the reference): the
float8 variants are refused by every public op with a TypeError naming the argument, before any
kernel runs (they used to run through the reference backend)."""

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
