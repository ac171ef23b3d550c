"""Host-side helpers every Triton kernel module shares: launching an autotuned kernel without
triton.autotune's per-launch cost, and integer arithmetic without Triton's constexpr-function
wrappers (triton.cdiv and triton.next_power_of_2 cost about 1.5 us a call in newer Triton,
several per launch). And the check of the inverse temperature the vocabulary kernels take.

triton.autotune's run() rebuilds a dict of every argument and tests each name's membership in a
list of argument names (quadratic in the ~50-70 arguments of the attention kernels), then
collects every tensor's dtype, on every launch: about 30 us of host time per launch on this
project's CPU machine, paid on every decoding step. The first launch of a key still goes through
it (it prunes, benchmarks the configs and keeps the best); later launches with the same key
launch the kernel with that config directly.
"""

from typing import Hashable

import torch
import triton
from triton.runtime.jit import JITFunction

from ..ops._common import check_float32_range

_CHOSEN: dict = {}  # (autotuner, key) -> the config it chose

# Every launch asks for contracted multiply-adds (FMA) itself: the kernels' float32 error and
# their timings were measured with them. Triton up to 3.9 contracts by default (3.9 warns once per
# process while TRITON_DEFAULT_FP_FUSION is unset), 3.10 stops; TRITON_FORCE_DISABLE_FP_FUSION=1
# still turns it off. The interpreter ignores the option.
FP_FUSION = {"enable_fp_fusion": True}


# The dtypes the kernels read (each input pointer its own: Triton compiles per pointer type).
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def autotune(**options):
    """triton.autotune(**options). Triton 3.2's and 3.3's ask the active GPU driver for its
    benchmarker when a kernel module is imported, which raises "0 active drivers" on a machine
    without a GPU (the interpreter's and the CPU tests'): there the driver is asked at the first
    tuning instead (3.2's autotune does not pass do_bench on: the Autotuner is built here)."""
    if not triton.__version__.startswith(("3.2.", "3.3.")):
        return triton.autotune(**options)
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    def bench(call, quantiles):
        return driver.active.get_benchmarker()(call, quantiles=quantiles)

    configs, key = options.pop("configs"), options.pop("key")
    return lambda fn: Autotuner(fn, fn.arg_names, configs, key, None, None, do_bench=bench, **options)


def launch_tuned(tuned, kernel, grid, args: tuple, flags: dict, key: Hashable) -> None:
    """kernel[grid](*args, **flags) with the config `tuned` (kernel's triton.autotune wrapper)
    chose. key must determine the autotuner's own key: every value it tunes on (flags and the
    arguments it names) and the dtypes of the tensors whose dtype can vary."""
    config = _CHOSEN.get((tuned, key))
    if config is None:
        tuned[grid](*args, **flags, **FP_FUSION)
        _CHOSEN[(tuned, key)] = tuned.best_config
        return
    kernel[grid](*args, **flags, **FP_FUSION, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def check_inv_temperature(inv_temperature) -> float:
    """inv_temperature as a Python float (a float argument: an int 1 would be specialized), or a
    ValueError unless the float32 the kernels take it as holds it finite, > 0 and normal
    ([1.2e-38, 3.4e38]: 1e39 would be inf there and 1e-50 zero, NaN statistics either way;
    the C++ kernels refuse them too)."""
    return check_float32_range(float(inv_temperature), "inv_temperature", positive=True)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, b > 0, as triton.cdiv."""
    return -(-a // b)


def settle_cache_keys(namespace: dict) -> None:
    """Give the Triton functions in `namespace` (a kernel module's globals: its kernels and the
    helpers it calls or imports) the cache keys they get in any process, whatever it launches
    first. Triton 3.6 hashes a kernel with the constexpr globals its helpers use only when those
    helpers were hashed before it (it merges a helper's globals, then hashes the helper), so a
    kernel's key depended on which kernel the process hashed first: dual_path_attention's
    differed between a process that first ran sink_attention and one that did not, and compiled
    again on the GPU machine although bench/precompile_triton.py had compiled it (bench/NOTES.md,
    "H200, third run"). Hashing again, until no key changes, gives every function the globals of
    all it calls. (Triton 3.0 keeps no globals in the key; 3.9 hashes the helper first, so its
    keys come out the same; versions between were not checked.)"""
    functions = [value for value in namespace.values() if isinstance(value, JITFunction)]
    for _ in range(8):  # (a pass completes one more level of calls; the kernels nest fewer)
        keys = [function.cache_key for function in functions]
        for function in functions:
            function.hash = None
        if [function.cache_key for function in functions] == keys:
            return
