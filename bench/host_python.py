"""The host-side Python of a Triton attention call, measured without a GPU: fp.sink_attention on
bfloat16 CPU tensors forced onto the Triton path, with Triton's JITFunction.run replaced by a
no-op (so: the op layer, the launcher and the autotune lookup; not Triton's binder, the CUDA
launch or torch's CUDA allocations, which bench/host_overhead.py sees on a GPU). Each case is
timed as it runs now and as it ran before kernels/_launch.py (every launch through
triton.autotune's run(), triton.cdiv and triton.next_power_of_2), interleaved, best of 6 x 1000
(fewer rounds, or none, once bench/gpu.sh's FASTPROBE_DEADLINE has passed: bench/_deadline.py).

    python bench/host_python.py
"""

import os
import time

import torch
import triton
from triton.runtime.jit import JITFunction

import fastprobe as fp
from fastprobe.kernels import attention as triton_attention
from fastprobe.ops import attention as attention_ops

try:
    from bench._deadline import past_deadline
except ImportError:  # run as a script (bench/ itself on sys.path)
    from _deadline import past_deadline


class _Chosen(dict):
    """An autotuner cache that has `config` for every key (nothing is benchmarked)."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def __contains__(self, key):
        return True

    def __getitem__(self, key):
        return self.config


def main() -> None:
    os.environ["FASTPROBE_AUTOTUNE"] = "1"
    JITFunction.run = lambda kernel, *args, grid, warmup, **kwargs: None  # no compile, no launch
    attention_ops.resolve = lambda device, dtype, op: "triton"
    triton_attention._attention_fwd_tuned.cache = _Chosen(triton_attention._FWD_CONFIGS[0])
    triton_attention._attention_split_tuned.cache = _Chosen(triton_attention._SPLIT_CONFIGS[0])
    now = (triton_attention.launch_tuned, triton_attention.next_pow2, triton_attention.cdiv)
    before = (lambda tuned, kernel, grid, args, flags, key: tuned[grid](*args, **flags),
              triton.next_power_of_2, triton.cdiv)  # fmt: skip

    def qkv(queries, keys):
        return [torch.zeros(1, 32, length, 128, dtype=torch.bfloat16) for length in (queries, keys, keys)]

    prefill, decode = qkv(1024, 1024), qkv(1, 32768)
    cases = {
        "prefill B=1, H=32, L=1024, D=128": lambda: fp.sink_attention(*prefill),
        "decode 1 query, 32768 keys (split + merge)": lambda: fp.sink_attention(*decode),
    }
    for name, call in cases.items():
        best = {}
        for _ in range(6):
            if past_deadline():  # (bench/gpu.sh's FASTPROBE_DEADLINE: the rounds so far, or none)
                print(f"{name}: {'rounds cut' if best else 'skipped'}: past the deadline (FASTPROBE_DEADLINE)")
                break
            for label, helpers in (("before", before), ("now", now)):
                triton_attention.launch_tuned, triton_attention.next_pow2, triton_attention.cdiv = helpers
                for _ in range(100):
                    call()
                start = time.perf_counter()
                for _ in range(1000):
                    call()
                best[label] = min(best.get(label, float("inf")), (time.perf_counter() - start) / 1000 * 1e6)
        if len(best) == 2:
            print(f"{name}: before {best['before']:.1f} us, now {best['now']:.1f} us per call")


if __name__ == "__main__":
    main()
