"""Compile the attention Triton kernels for sm_90 on a machine without a GPU, for the launches
the host code makes (with FASTPROBE_AUTOTUNE=0: each kernel's first config that survives
pruning), and print each kernel's registers and spilled bytes as ptxas reports them, and what its
PTX holds (asynchronous copies, 16-byte and 2-byte global loads, wgmma instructions).

    python bench/compile_sm90.py

It replaces triton's JITFunction.run for the process: a launch compiles (triton.compile with an
sm_90 target, then ptxas -v) and runs nothing. The inputs are CPU tensors; only their dtypes and
the sizes the host code derives from them matter. A check of what a change does to the kernels'
resources (compare with and without it), not a measurement of speed.
"""

import glob
import os
import re
import subprocess
import tempfile

os.environ["FASTPROBE_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from fastprobe.kernels import attention, dual_attention  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PTXAS = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas*"))[0]
compiled = []  # (kernel, registers, spilled bytes) of the launches since the last clear


def compile_only(kernel, *args, grid, warmup, **kwargs):
    """JITFunction.run without a device: Triton's own binder for an sm_90 target gives the
    signature, constexprs and specialisations a real launch gets (integers equal to 1 become
    constants, pointers and integers divisible by 16 are marked so: what lets the compiler use
    16-byte loads and asynchronous copies), then the compile and ptxas."""
    kwargs["debug"] = False
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # (the run-time options of newer Triton)
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    binary = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as file:
            file.write(binary.asm["ptx"])
        report = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(folder, "kernel.cubin")],
                                capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spilled = re.search(r"(\d+) bytes spill stores", report)
    ptx_text = binary.asm["ptx"]
    # in the PTX: asynchronous (pipelined) copies, 16-byte global loads, Hopper matrix instructions
    shape = {what: len(re.findall(pattern, ptx_text)) for what, pattern in
             (("cp.async", r"\bcp\.async\.c[ga]\b"), ("16-byte loads", r"\bld\.global(?:\.nc)?\.v4\.b32\b"),
              ("2-byte loads", r"\bld\.global(?:\.nc)?\.b16\b"), ("wgmma", r"\bwgmma\.mma_async\b"))}
    compiled.append((kernel.__name__, int(registers.group(1)) if registers else None,
                     int(spilled.group(1)) if spilled else None, shape))


def launch(batch, heads, kv_heads, queries, keys, head_dim, value_dim, dtype, split_keys, dual, blocks=False,
           segments=False):
    """One launch of the sink or dual-path kernels; blocks: with a causal horizon (bidirectional
    blocks); segments: with a start per position and (sink_attention) per-position sink ends."""
    horizon = torch.zeros(batch, keys, dtype=torch.int64) if blocks else None
    start = torch.zeros(batch, keys, dtype=torch.int64) if segments else None
    q = torch.zeros(batch, heads, queries, head_dim, dtype=dtype)
    k = torch.zeros(batch, kv_heads, keys, head_dim, dtype=dtype)
    v = torch.zeros(batch, kv_heads, keys, value_dim, dtype=dtype)
    out = torch.zeros(batch, queries, heads, value_dim, dtype=dtype).transpose(1, 2)
    if dual:
        dual_attention.dual_path_attention(
            q, k, v, out, None, None, scale=0.1, causal=True, key_real=None,
            drop=torch.zeros(batch, keys, dtype=torch.uint8), rows=torch.ones(batch, queries, dtype=torch.uint8),
            gamma=1.0, orthogonalize=True, eps=1e-6, split_keys=split_keys, horizon=horizon, start=start,
        )
    else:
        stats = [torch.zeros(batch, heads, queries) for _ in range(3)]
        ends = torch.zeros((batch, keys) if segments else (batch,), dtype=torch.int64)
        attention.sink_attention(
            q, k, v, out, stats[0], stats[1], None, stats[2], scale=0.1, causal=True, window=0, key_real=None,
            sink_end=ends, stat_end=ends, head_mask=None, sink_logit=None, key_groups=None, num_groups=0,
            split_keys=split_keys, horizon=horizon, start=start,
        )


CASES = {  # name: (B, Hq, Hkv, Lq, Lk, D, Dv, dtype, split_keys: 0 prefill, n the decode path)
    "prefill D=128 bf16": (1, 32, 8, 1024, 1024, 128, 128, torch.bfloat16, 0),
    "decode D=128 bf16": (1, 32, 8, 1, 4096, 128, 128, torch.bfloat16, 4),
    "prefill D=64 float32": (1, 16, 16, 512, 512, 64, 64, torch.float32, 0),
    "prefill D=192 Dv=128 bf16": (1, 16, 16, 1024, 1024, 192, 128, torch.bfloat16, 0),
    "decode D=192 Dv=128 bf16": (1, 16, 16, 1, 4096, 192, 128, torch.bfloat16, 4),
}

if __name__ == "__main__":
    JITFunction.run = compile_only
    for name, case in CASES.items():
        for dual, blocks, segments in ((False, False, False), (True, False, False), (False, True, False),
                                       (True, True, False), (False, False, True), (True, False, True)):
            compiled.clear()
            launch(*case, dual=dual, blocks=blocks, segments=segments)
            extra = (" +blocks" if blocks else "") + (" +segments" if segments else "")
            print(f"{'dual_path' if dual else 'sink'}{extra} {name}: " + "; ".join(
                f"{kernel} {registers} registers, {spilled} B spilled ("
                + ", ".join(f"{what} {count}" for what, count in shape.items()) + ")"
                for kernel, registers, spilled, shape in compiled))
