"""bridge_loss forward + backward: fastprobe vs the eager PyTorch computation
(fastprobe.reference.bridge_loss and autograd) and vs torch.compile of it, in both
directions (the default KL(Q || P_S), and "reverse", KL(P_S || Q): its rows first check
that every implementation computes fastprobe's loss and gradient on the timed inputs); the
fused-linear form vs computing the logits and then the loss (logits materialised).
On CUDA with liger-kernel installed, also at beta = 0 (forward KL, the same math) vs
Liger's JSD and KL-divergence losses and its fused-linear JSD. Measured in the same run,
with peak memory.

    pytest bench/test_bridge_bench.py --benchmark-json=bench/results/<device>.json
"""

import sys

import pytest
import torch

import fastprobe as fp
from fastprobe import reference

try:
    from . import _memory
except ImportError:  # run as a script for the CPU peak-memory child
    import _memory

BETA = 0.5
# The shapes: logits N x V, and hidden states N x H with V x H LM heads.
CASES = {
    "cpu": dict(num_rows=2048, vocab=32000, hidden=1024, dtype=torch.float32),
    "cuda": dict(num_rows=8192, vocab=128256, hidden=4096, dtype=torch.bfloat16),
}


def make_logits(device, num_rows, vocab, hidden, dtype):
    student = torch.randn(num_rows, vocab, device=device, dtype=dtype)
    teacher = torch.randn(num_rows, vocab, device=device, dtype=dtype)
    return student, teacher


def make_hidden(device, num_rows, vocab, hidden, dtype):
    student_hidden = torch.randn(num_rows, hidden, device=device, dtype=dtype)
    student_weight = torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden**0.5
    teacher_hidden = torch.randn(num_rows, hidden, device=device, dtype=dtype)
    teacher_weight = torch.randn(vocab, hidden, device=device, dtype=dtype) / hidden**0.5
    return student_hidden, student_weight, teacher_hidden, teacher_weight


def fastprobe_step(student, teacher):
    z = student.detach().requires_grad_()
    return torch.autograd.grad(fp.bridge_loss(z, teacher, beta=BETA), z)


def eager_step(student, teacher):
    z = student.detach().requires_grad_()
    return torch.autograd.grad(reference.bridge_loss(z, teacher, beta=BETA), z)


_compiled = {}


def compiled_step(student, teacher):
    if "step" not in _compiled:
        _compiled["step"] = torch.compile(eager_step, dynamic=False)
    return _compiled["step"](student, teacher)


def fused_linear_step(student_hidden, student_weight, teacher_hidden, teacher_weight):
    h, w = student_hidden.detach().requires_grad_(), student_weight.detach().requires_grad_()
    loss = fp.FusedLinearBridgeLoss(beta=BETA)(h, w, teacher_hidden, teacher_weight)
    return torch.autograd.grad(loss, (h, w))


def materialised_linear_step(student_hidden, student_weight, teacher_hidden, teacher_weight):
    h, w = student_hidden.detach().requires_grad_(), student_weight.detach().requires_grad_()
    loss = reference.bridge_loss(h @ w.t(), teacher_hidden @ teacher_weight.t(), beta=BETA)
    return torch.autograd.grad(loss, (h, w))


# ---- Liger-Kernel peers (CUDA): at beta = 0 the bridge loss is forward KL(P_T || P_S), which is
# what Liger's JSD computes at its beta = 0 and its KL loss with log-probability targets. Liger
# takes log-probabilities, so its steps include the log_softmax (and its backward) its users run.


def _liger():
    return pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")


def _logits_step(loss_of):
    """(loss, its gradient for the student logits) of loss_of(student logits, teacher logits)."""

    def step(student, teacher):
        z = student.detach().requires_grad_()
        loss = loss_of(z, teacher)
        return (loss.detach(), *torch.autograd.grad(loss, z))

    return step


def _linear_step(loss_of):
    """(loss, its gradients for student hidden and weight) of loss_of(h, W_s, teacher h, W_t)."""

    def step(student_hidden, student_weight, teacher_hidden, teacher_weight):
        h, w = student_hidden.detach().requires_grad_(), student_weight.detach().requires_grad_()
        loss = loss_of(h, w, teacher_hidden, teacher_weight)
        return (loss.detach(), *torch.autograd.grad(loss, (h, w)))

    return step


fastprobe_forward_kl_step = _logits_step(lambda z, t: fp.bridge_loss(z, t, beta=0.0))
liger_jsd_step = _logits_step(lambda z, t: _liger().LigerJSD(beta=0.0)(z.log_softmax(-1), t.log_softmax(-1)))
liger_kl_step = _logits_step(
    lambda z, t: _liger().LigerKLDIVLoss(reduction="batchmean", log_target=True)(z.log_softmax(-1), t.log_softmax(-1))
)
fastprobe_fused_linear_forward_kl_step = _linear_step(lambda h, w, th, tw: fp.FusedLinearBridgeLoss(beta=0.0)(h, w, th, tw))
# the weight gradient accumulated in the weights' dtype, as Liger's is (the default accumulates in float32)
fastprobe_fused_linear_forward_kl_16bit_grad_step = _linear_step(
    lambda h, w, th, tw: fp.FusedLinearBridgeLoss(beta=0.0, float32_weight_grad=False)(h, w, th, tw))
# and in 512-row chunks (64M logits at V = 128256) instead of the default 256M logits: less memory,
# more passes over the weights (H200, 2026-12-04: 1,442 MiB against Liger's 2,193, 67.7 ms against
# 60.9 in the default chunks and Liger's 102.4)
fastprobe_fused_linear_forward_kl_small_chunks_step = _linear_step(
    lambda h, w, th, tw: fp.FusedLinearBridgeLoss(beta=0.0, float32_weight_grad=False, chunk_rows=512)(h, w, th, tw))
liger_fused_linear_jsd_step = _linear_step(lambda h, w, th, tw: _liger().LigerFusedLinearJSD(jsd_beta=0.0)(h, w, th, tw, None))


LIGER_GROUPS = {
    "bridge_loss_forward_kl": (
        make_logits, {"fastprobe": fastprobe_forward_kl_step, "liger-jsd": liger_jsd_step, "liger-kl": liger_kl_step},
        "liger-jsd",
    ),
    "bridge_fused_linear_forward_kl": (
        make_hidden,
        {"fastprobe-fused-linear": fastprobe_fused_linear_forward_kl_step,
         "fastprobe-fused-linear-16bit-grad": fastprobe_fused_linear_forward_kl_16bit_grad_step,
         "fastprobe-fused-linear-16bit-grad-512-rows": fastprobe_fused_linear_forward_kl_small_chunks_step,
         "liger-fused-linear-jsd": liger_fused_linear_jsd_step},
        "liger-fused-linear-jsd",
    ),
}

# ---- the reverse direction, KL(P_S || Q): (loss, its gradient for the student logits)
fastprobe_reverse_step = _logits_step(lambda z, t: fp.bridge_loss(z, t, beta=BETA, direction="reverse"))
eager_reverse_step = _logits_step(lambda z, t: reference.bridge_loss(z, t, beta=BETA, direction="reverse"))


def compiled_reverse_step(student, teacher):
    if "reverse" not in _compiled:
        _compiled["reverse"] = torch.compile(eager_reverse_step, dynamic=False)
    return _compiled["reverse"](student, teacher)


def assert_same_values(got, want, dtype, name):
    """Each output of a row (loss, gradient) is the other implementation's, to the inputs'
    precision relative to that output's largest entry (a mean's gradient entries are ~1 / (N V))."""
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for output, value, wanted in zip(("loss", "gradient"), got, want, strict=True):
        torch.testing.assert_close(value.float(), wanted.float(), rtol=tolerance, atol=tolerance * wanted.abs().max().item(),
                                   msg=lambda text: f"{name}, {output}: {text}")


LOGIT_IMPLS = {"fastprobe": fastprobe_step, "eager": eager_step, "torch.compile": compiled_step}
REVERSE_IMPLS = {"fastprobe-reverse": fastprobe_reverse_step, "eager-reverse": eager_reverse_step,
                 "torch.compile-reverse": compiled_reverse_step}
LINEAR_IMPLS = {"fastprobe-fused-linear": fused_linear_step, "eager-linear": materialised_linear_step}


@pytest.mark.parametrize("impl", list(LOGIT_IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_bridge_loss_forward_backward(benchmark, device, impl, request):
    case = CASES[device]
    inputs = make_logits(device, **case)
    benchmark.group = f"bridge_loss-{device}"
    benchmark.extra_info.update(
        impl=impl, baseline="eager", shape=dict(N=case["num_rows"], V=case["vocab"]), dtype=str(case["dtype"]),
        input_bytes=sum(t.nbytes for t in inputs),
    )
    _memory.measure(benchmark, request, device, impl, LOGIT_IMPLS[impl], inputs, __file__, peers=LOGIT_IMPLS)


@pytest.mark.parametrize("impl", list(REVERSE_IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_bridge_loss_reverse_forward_backward(benchmark, device, impl, request):
    case = CASES[device]
    inputs = make_logits(device, **case)
    # the row times what fastprobe computes (fastprobe's row: what the eager formula computes)
    other = "eager-reverse" if impl.startswith("fastprobe") else "fastprobe-reverse"
    assert_same_values(REVERSE_IMPLS[impl](*inputs), REVERSE_IMPLS[other](*inputs), case["dtype"], f"{impl} vs {other}")
    benchmark.group = f"bridge_loss_reverse-{device}"
    benchmark.extra_info.update(
        impl=impl, baseline="eager-reverse", shape=dict(N=case["num_rows"], V=case["vocab"]), dtype=str(case["dtype"]),
        input_bytes=sum(t.nbytes for t in inputs),
    )
    _memory.measure(benchmark, request, device, impl, REVERSE_IMPLS[impl], inputs, __file__, peers=REVERSE_IMPLS)


@pytest.mark.parametrize("impl", list(LINEAR_IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_fused_linear_forward_backward(benchmark, device, impl, request):
    case = CASES[device]
    inputs = make_hidden(device, **case)
    benchmark.group = f"bridge_fused_linear-{device}"
    benchmark.extra_info.update(
        impl=impl, baseline="eager-linear", dtype=str(case["dtype"]),
        shape=dict(N=case["num_rows"], H=case["hidden"], V=case["vocab"]),
        input_bytes=sum(t.nbytes for t in inputs),
    )
    _memory.measure(benchmark, request, device, impl, LINEAR_IMPLS[impl], inputs, __file__, peers=LINEAR_IMPLS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("group,impl", [(g, i) for g, (_, impls, _) in LIGER_GROUPS.items() for i in impls])
def test_vs_liger_cuda(benchmark, group, impl, request):
    _liger()
    make, impls, baseline = LIGER_GROUPS[group]
    case = CASES["cuda"]
    inputs = make("cuda", **case)
    # the peers must compute the same loss (a wrong call would make the timing meaningless)
    reference_loss = impls[next(iter(impls))](*inputs)[0].float()
    loss = impls[impl](*inputs)[0].float()
    torch.testing.assert_close(loss, reference_loss, rtol=2e-2, atol=1e-3)
    benchmark.group = f"{group}-cuda"
    benchmark.extra_info.update(
        impl=impl, baseline=baseline, dtype=str(case["dtype"]),
        shape=dict(N=case["num_rows"], V=case["vocab"], **({"H": case["hidden"]} if make is make_hidden else {})),
        input_bytes=sum(t.nbytes for t in inputs),
    )
    _memory.measure(benchmark, request, "cuda", impl, impls[impl], inputs, __file__)


if __name__ == "__main__" and sys.argv[1:2] == ["--peak-rss"]:
    name = sys.argv[2]
    if name in LOGIT_IMPLS or name in REVERSE_IMPLS:
        impl, make = {**LOGIT_IMPLS, **REVERSE_IMPLS}[name], make_logits
    else:
        impl, make = LINEAR_IMPLS[name], make_hidden
    small = make("cpu", 4, 64, 16, torch.float32)
    full = make("cpu", **CASES["cpu"])
    _memory.print_peak_of(name, impl, small, full)
