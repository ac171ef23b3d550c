"""concept_mass: fastprobe vs the eager PyTorch computation (softmax, gather, segment
sums: fastprobe.reference.concept_mass) and vs torch.compile of the same code (compiled
before the timing), measured in the same run: many rows a call, and one row a call (an answer's
availability at each decoding step; the C++ kernel then spreads the row over the threads).

    pytest bench/test_concepts_bench.py --benchmark-json=bench/results/<device>.json
"""

import os
import sys

import pytest
import torch

import fastprobe as fp
from fastprobe import reference

try:
    from . import _memory
except ImportError:  # run as a script for the CPU peak-memory child
    import _memory

# The shapes: 1000 concepts of 8 variants over a Qwen-sized vocabulary, CPU float32
# and GPU bfloat16.
CASES = {
    "cpu": dict(num_tokens=512, vocab=151936, num_concepts=1000, variants=8, dtype=torch.float32),
    "cuda": dict(num_tokens=4096, vocab=151936, num_concepts=1000, variants=8, dtype=torch.bfloat16),
}
STEP_CASES = {device: dict(case, num_tokens=1) for device, case in CASES.items()}


def make_inputs(device, num_tokens, vocab, num_concepts, variants, dtype):
    """Random logits, and concepts of `variants` distinct random ids each (a fixed draw)."""
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(0, vocab, (num_concepts, 4 * variants), generator=generator)
    lists = [list(dict.fromkeys(row.tolist()))[:variants] for row in draws]  # distinct within a concept
    concepts = fp.ConceptSet.from_ids(lists).to(device)
    logits = torch.randn(num_tokens, vocab, device=device, dtype=dtype)
    return logits, concepts


def fastprobe_call(logits, concepts):
    return fp.concept_mass(logits, concepts)


def fastprobe_separate_stats(logits, concepts):
    """The Triton path with the concept statistics in a second launch (one program per row and
    tile of concepts) instead of at the end of each row's program, where the row's dependent
    index loads run with no vocabulary streaming beside them (GPU only: the C++ kernel has one
    way)."""
    from fastprobe.kernels import concepts as triton_concepts

    before = os.environ.get(triton_concepts._STATS_ENV)
    os.environ[triton_concepts._STATS_ENV] = "separate"
    try:
        return fp.concept_mass(logits, concepts)
    finally:
        if before is None:
            del os.environ[triton_concepts._STATS_ENV]
        else:
            os.environ[triton_concepts._STATS_ENV] = before


def eager(logits, concepts):
    return reference.concept_mass(logits, concepts.token_ids, concepts.offsets)


_compiled_eager = None


def compiled(logits, concepts):
    global _compiled_eager
    if _compiled_eager is None:
        _compiled_eager = torch.compile(reference.concept_mass, dynamic=False)
    return _compiled_eager(logits, concepts.token_ids, concepts.offsets)


IMPLS = {"fastprobe": fastprobe_call, "eager": eager, "torch.compile": compiled}
STEP_IMPLS = {f"{name}-step": call for name, call in IMPLS.items()}
GPU_IMPLS = {"fastprobe-separate-stats": fastprobe_separate_stats}


# Forward and backward of a weighted sum of log_mass (training through an answer's mass): the
# gradient with respect to the logits. CPU only for now: the GPU sessions' device time is
# planned to the second (bench/NOTES.md, "The next GPU session").
def with_weights(logits, concepts):
    """(logits, concepts, a fixed random weight per row and concept)."""
    generator = torch.Generator().manual_seed(1)
    weights = torch.randn(logits.shape[0], len(concepts), generator=generator).to(logits.device)
    return logits, concepts, weights


def fastprobe_grad(logits, concepts, weights):
    z = logits.detach().requires_grad_()
    return torch.autograd.grad((weights * fp.concept_mass(z, concepts).log_mass).sum(), z)


def eager_grad(logits, concepts, weights):
    z = logits.detach().requires_grad_()
    log_mass = reference.concept_mass(z, concepts.token_ids, concepts.offsets)["log_mass"]
    return torch.autograd.grad((weights * log_mass).sum(), z)


_compiled_grad = None


def compiled_grad(logits, concepts, weights):
    global _compiled_grad
    if _compiled_grad is None:
        _compiled_grad = torch.compile(eager_grad, dynamic=False)
    return _compiled_grad(logits, concepts, weights)


GRAD_IMPLS = {"fastprobe-grad": fastprobe_grad, "eager-grad": eager_grad, "torch.compile-grad": compiled_grad}


def run_case(benchmark, request, device, impl, impls, case, op, baseline, make=make_inputs):
    inputs = make(device, **case)
    benchmark.group = f"{op}-{device}"
    benchmark.extra_info.update(
        impl=impl,
        baseline=baseline,
        shape=dict(N=case["num_tokens"], V=case["vocab"], C=case["num_concepts"], variants=case["variants"]),
        dtype=str(case["dtype"]),
        input_bytes=inputs[0].nbytes,
    )
    if make is make_inputs:  # a forward: one read of the logits is its floor
        benchmark.extra_info["bytes_one_read"] = inputs[0].nbytes
    _memory.measure(benchmark, request, device, impl, impls[impl], inputs, __file__, peers=impls)


@pytest.mark.parametrize("impl", list(IMPLS) + list(GPU_IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_concept_mass(benchmark, device, impl, request):
    if impl in GPU_IMPLS and device != "cuda":
        pytest.skip(f"{impl}: a way of the Triton kernel only")
    run_case(benchmark, request, device, impl, {**IMPLS, **GPU_IMPLS}, CASES[device], "concept_mass", "eager")


@pytest.mark.parametrize("impl", list(GRAD_IMPLS))
@pytest.mark.parametrize("device", ["cpu"])
def test_concept_mass_forward_backward(benchmark, device, impl, request):
    run_case(benchmark, request, device, impl, GRAD_IMPLS, CASES[device], "concept_mass_forward_backward",
             "eager-grad", make=lambda device, **case: with_weights(*make_inputs(device, **case)))


@pytest.mark.parametrize("impl", list(STEP_IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_concept_mass_step(benchmark, device, impl, request):
    run_case(benchmark, request, device, impl, STEP_IMPLS, STEP_CASES[device], "concept_mass_step", "eager-step")


if __name__ == "__main__" and sys.argv[1:2] == ["--peak-rss"]:
    name = sys.argv[2]
    step, grad = name.endswith("-step"), name.endswith("-grad")
    impl = {**IMPLS, **STEP_IMPLS, **GRAD_IMPLS}[name]
    small = make_inputs("cpu", 2, 64, 4, 2, torch.float32)
    full = make_inputs("cpu", **(STEP_CASES if step else CASES)["cpu"])
    if grad:
        small, full = with_weights(*small), with_weights(*full)
    _memory.print_peak_of(name, impl, small, full)
