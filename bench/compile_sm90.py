"""Compile Triton kernels for sm_90 on a machine without a GPU, for the launches the host code
makes (with FASTPROBE_AUTOTUNE=0: each kernel's first config that survives pruning), and print
each kernel's registers and spilled bytes as ptxas reports them, its SASS instruction count, the
instruction count of each loop body (a streaming kernel's cost per block), and what its PTX
holds (asynchronous copies, 16-byte and 2-byte global loads, wgmma instructions).

    python bench/compile_sm90.py                 # the attention and dual-path kernels
    python bench/compile_sm90.py concepts        # concept_mass's forward (bf16, V=151936, 1000 x 8)
    python bench/compile_sm90.py concepts --tree /tmp/old   # the kernels/ of another checkout
    python bench/compile_sm90.py divergence      # draft_divergence (bf16, K=4, V=151936), each kept config
    python bench/compile_sm90.py bridge          # bridge_loss (bf16 and float32, V=32000), each direction

It replaces triton's JITFunction.run for the process: a launch compiles (triton.compile with an
sm_90 target, then ptxas -v and cuobjdump -sass) and runs nothing. The inputs are CPU tensors;
only their dtypes and the sizes the host code derives from them matter. A check of what a change
does to the kernels' resources (compare with and without it, e.g. a `git worktree` of the commit
before it given as --tree), not a measurement of speed.
"""

import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

os.environ["FASTPROBE_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import fastprobe  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS = glob.glob(os.path.join(TOOLS, "ptxas*"))[0]
compiled = []  # (kernel, registers, spilled bytes, PTX and SASS counts) of the launches since the last clear


def _pack_args_as_triton_3_4(kernel, backend, kwargs, bound, specialization, _binder_options):
    """JITFunction._pack_args of newer Triton: Triton 3.4 (which torch 2.8 pins) does this inline
    in JITFunction.run, with the same steps (the options parsed from kwargs, not the binder's)."""
    from triton.runtime.jit import find_paths_if, get_iterable_path

    options = backend.parse_options(kwargs)
    types = [spec[0] for spec in specialization]
    signature = {param.name: kind for param, kind in zip(kernel.params, types)}
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(types, lambda _, kind: kind == "constexpr")}
    values = [spec[1] for spec in specialization]
    attrs = {path: backend.parse_attr(get_iterable_path(values, path))
             for path in find_paths_if(values, lambda _, value: isinstance(value, str))}
    return options, signature, constexprs, attrs


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
    pack = getattr(kernel, "_pack_args", None) or (lambda *a: _pack_args_as_triton_3_4(kernel, *a))
    options, signature, constexprs, attrs = pack(backend, kwargs, bound, specialization, options)
    binary = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as file:
            file.write(binary.asm["ptx"])
        cubin = os.path.join(folder, "kernel.cubin")
        report = subprocess.run([PTXAS, "-v", "--gpu-name", "sm_90a", ptx, "-o", cubin], capture_output=True,
                                text=True).stderr
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    registers = re.search(r"Used (\d+) registers", report)
    spilled = re.search(r"(\d+) bytes spill stores", report)
    ptx_text = binary.asm["ptx"]
    # in the PTX: asynchronous (pipelined) copies, 16-byte global loads, Hopper matrix instructions
    shape = {what: len(re.findall(pattern, ptx_text)) for what, pattern in
             (("cp.async", r"\bcp\.async\.c[ga]\b"), ("16-byte loads", r"\bld\.global(?:\.nc)?\.v4\.b32\b"),
              ("2-byte loads", r"\bld\.global(?:\.nc)?\.b16\b"), ("wgmma", r"\bwgmma\.mma_async\b"))}
    shape["SASS instructions"] = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, flags=re.MULTILINE))
    shape["loop bodies"] = loop_bodies(sass)
    compiled.append((kernel.__name__, int(registers.group(1)) if registers else None,
                     int(spilled.group(1)) if spilled else None, shape))


def loop_bodies(sass: str) -> list:
    """The SASS instruction count of each loop body, in code order: the instructions from a
    backward branch's target to the branch (a loop nested in another counts in both)."""
    instructions = [int(address, 16) for address in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/", sass, flags=re.MULTILINE)]
    bodies = []
    for address, target in re.findall(r"^\s+/\*([0-9a-f]{4,})\*/[^;\n]*\bBRA\s+(?:`\()?0x([0-9a-f]+)", sass, flags=re.MULTILINE):
        address, target = int(address, 16), int(target, 16)
        if target < address:
            bodies.append(sum(target <= at <= address for at in instructions))
    return bodies


def launch(batch, heads, kv_heads, queries, keys, head_dim, value_dim, dtype, split_keys, dual, blocks=False,
           segments=False):
    """One launch of the sink or dual-path kernels; blocks: with a causal horizon (bidirectional
    blocks); segments: with a start per position and (sink_attention) per-position sink ends.
    (The kernels are imported here, after --tree may have redirected fastprobe.kernels.)"""
    from fastprobe.kernels import attention, dual_attention

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


def concepts() -> None:
    """concept_mass's forward over bf16 logits [4, 151936] and 1000 concepts of 8 random ids
    (the benchmark's vocabulary and concepts; the row count does not change the kernel)."""
    import numpy as np

    from fastprobe.kernels import concepts as triton_concepts
    from fastprobe.ops import concepts as concept_ops

    rows, vocab, num_concepts, variants = 4, 151936, 1000, 8
    draw = np.random.default_rng(0)
    concept_set = fastprobe.ConceptSet.from_ids([draw.choice(vocab, variants, replace=False).tolist()
                                                 for _ in range(num_concepts)])
    out = fastprobe.ConceptMass(*(torch.zeros(rows, num_concepts) for _ in range(4)),
                                torch.zeros(rows, num_concepts, dtype=torch.int64), torch.zeros(rows, dtype=torch.float64))
    triton_concepts.concept_mass(torch.zeros(rows, vocab, dtype=torch.bfloat16), concept_set._index,
                                 concept_ops.ID_BLOCK, 1.0, out, torch.zeros(2, rows))


def divergence() -> None:
    """draft_divergence's kernel for the benchmark's drafts (K=4 and a target, bf16 [4, 151936]
    rows; the token count does not change the kernel), once per config the autotuner keeps."""
    from fastprobe.kernels import divergence as triton_divergence

    drafts, rows, vocab = 4, 4, 151936
    draft = torch.zeros(drafts, rows, vocab, dtype=torch.bfloat16)
    target = torch.zeros(rows, vocab, dtype=torch.bfloat16)
    for config in triton_divergence._prune_configs(triton_divergence._AUTOTUNE_CONFIGS, {}, K_PAD=drafts):
        compiled.clear()
        triton_divergence.draft_divergence(draft, target, torch.full((drafts,), 1.0 / drafts), 1.0,
                                           torch.zeros(5 + drafts, rows),
                                           torch.zeros(drafts + 1, rows, dtype=torch.float64), config=config)
        report(f"draft_divergence bf16 K=4 V=151936 {config.kwargs} {config.num_warps} warps")


def bridge() -> None:
    """bridge_loss's kernel for the benchmark's vocabulary (V=32000; the row count does not change the
    kernel): bf16 and float32 logits, forward and reverse, loss only and with the gradient."""
    from fastprobe.kernels import bridge as triton_bridge

    rows, vocab = 4, 32000
    for dtype in (torch.bfloat16, torch.float32):
        for reverse in (False, True):
            for with_grad in (False, True):
                compiled.clear()
                logits = torch.zeros(rows, vocab, dtype=dtype)
                grad = torch.zeros(rows, vocab, dtype=dtype) if with_grad else None
                triton_bridge.bridge_loss(logits, logits, None, -100, 0.5, 1.0, reverse, torch.zeros(rows), grad)
                report(f"bridge_loss {str(dtype)[6:]} V={vocab} {'reverse' if reverse else 'forward'}"
                       f"{' +grad' if with_grad else ''}")


class _TreeKernels:
    """A meta path finder that resolves fastprobe.kernels and its modules to another checkout's
    kernels/ (ahead of an editable install's finder, which maps them by name)."""

    def __init__(self, folder: str):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name == "fastprobe.kernels":
            return importlib.util.spec_from_file_location(name, os.path.join(self.folder, "__init__.py"),
                                                          submodule_search_locations=[self.folder])
        file = os.path.join(self.folder, name.rpartition(".")[2] + ".py")
        if name.startswith("fastprobe.kernels.") and os.path.exists(file):
            return importlib.util.spec_from_file_location(name, file)
        return None


def use_tree(tree: str) -> None:
    """fastprobe.kernels from another checkout's kernels/ (the op layer stays this one's: the
    launchers' signatures must match it)."""
    sys.meta_path.insert(0, _TreeKernels(os.path.join(os.path.abspath(tree), "kernels")))


def report(label: str) -> None:
    print(f"{label}: " + "; ".join(
        f"{kernel} {registers} registers, {spilled} B spilled (" + ", ".join(f"{what} {count}" for what, count in
                                                                           shape.items()) + ")"
        for kernel, registers, spilled, shape in compiled))


if __name__ == "__main__":
    JITFunction.run = compile_only
    arguments = sys.argv[1:]
    if "--tree" in arguments:
        where = arguments.index("--tree")
        use_tree(arguments[where + 1])
        del arguments[where:where + 2]
    if arguments == ["concepts"]:
        concepts()
        report("concept_mass bf16 V=151936, 1000 x 8")
        sys.exit(0)
    if arguments == ["divergence"]:
        divergence()
        sys.exit(0)
    if arguments == ["bridge"]:
        bridge()
        sys.exit(0)
    for name, case in CASES.items():
        for dual, blocks, segments in ((False, False, False), (True, False, False), (False, True, False),
                                       (True, True, False), (False, False, True), (True, False, True)):
            compiled.clear()
            launch(*case, dual=dual, blocks=blocks, segments=segments)
            extra = (" +blocks" if blocks else "") + (" +segments" if segments else "")
            report(f"{'dual_path' if dual else 'sink'}{extra} {name}")
