"""draft_divergence: fastprobe vs the eager PyTorch computation (softmax, mixture,
logs) and vs torch.compile of the same code (compiled before the timing), measured in the
same run: many tokens a call, and one token a call (drafts scoring each decoding step; the C++
kernel then spreads the vocabulary over the threads).

    pytest bench/test_divergence_bench.py --benchmark-json=bench/results/<device>.json
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

# The shapes: CPU float32, and a Qwen-sized vocabulary in bfloat16 on GPU.
CASES = {
    "cpu": dict(num_drafts=4, num_tokens=256, vocab=32000, dtype=torch.float32),
    "cuda": dict(num_drafts=4, num_tokens=4096, vocab=151936, dtype=torch.bfloat16),
}
# One token a call, a Qwen-sized vocabulary.
STEP_CASES = {
    "cpu": dict(num_drafts=4, num_tokens=1, vocab=151936, dtype=torch.float32),
    "cuda": dict(num_drafts=4, num_tokens=1, vocab=151936, dtype=torch.bfloat16),
}


def make_inputs(device, num_drafts, num_tokens, vocab, dtype):
    drafts = torch.randn(num_drafts, num_tokens, vocab, device=device, dtype=dtype)
    target = torch.randn(num_tokens, vocab, device=device, dtype=dtype)
    return drafts, target


def eager(drafts, target):
    return reference.draft_divergence(drafts, target)


_compiled_eager = None


def compiled(drafts, target):
    global _compiled_eager
    if _compiled_eager is None:
        _compiled_eager = torch.compile(eager, dynamic=False)
    return _compiled_eager(drafts, target)


IMPLS = {
    "fastprobe": lambda d, t: fp.draft_divergence(d, t),
    "eager": eager,
    "torch.compile": compiled,
}


STEP_IMPLS = {f"{name}-step": call for name, call in IMPLS.items()}


def run_case(benchmark, request, device, impl, impls, case, op, baseline):
    drafts, target = make_inputs(device, **case)
    benchmark.group = f"{op}-{device}"
    benchmark.extra_info.update(
        impl=impl,
        baseline=baseline,
        shape=dict(K=case["num_drafts"], N=case["num_tokens"], V=case["vocab"]),
        dtype=str(case["dtype"]),
        input_bytes=drafts.nbytes + target.nbytes,
        bytes_one_read=drafts.nbytes + target.nbytes,
    )
    _memory.measure(benchmark, request, device, impl, impls[impl], (drafts, target), __file__, peers=impls)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_draft_divergence(benchmark, device, impl, request):
    run_case(benchmark, request, device, impl, IMPLS, CASES[device], "draft_divergence", "eager")


@pytest.mark.parametrize("impl", list(STEP_IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_draft_divergence_step(benchmark, device, impl, request):
    run_case(benchmark, request, device, impl, STEP_IMPLS, STEP_CASES[device], "draft_divergence_step",
             "eager-step")


if __name__ == "__main__" and sys.argv[1:2] == ["--peak-rss"]:
    name = sys.argv[2]
    step = name.endswith("-step")
    impl = (STEP_IMPLS if step else IMPLS)[name]
    small = make_inputs("cpu", 2, 2, 64, torch.float32)
    full = make_inputs("cpu", **(STEP_CASES if step else CASES)["cpu"])
    _memory.print_peak_of(name, impl, small, full)
