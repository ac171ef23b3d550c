"""Where the attention statistics cost: every prefill config that pruning keeps, timed with each
statistic alone and with all of them, at the GPU benchmark's shape (B=1, H=32, D=128, bfloat16).

The benchmark (bench/test_attention_bench.py, "statistics") measures 3 key groups and the entropy
together at +70-105% over the sink mass alone (bench/NOTES.md), against a goal of 5%. This splits
that: per statistic, the time of each kept config and the autotuner's choice, so that a tile
choice (the fastest tile is pruned or not picked) shows apart from the statistic's own work.

Then the narrow heads of the recording benchmark's model (B=1, H=8, L=8192, D=16, bfloat16,
causal; bench/NOTES.md "Narrow heads"): every kept config and the wider tiles that compile there
without spills but that the register model prunes (NARROW_CANDIDATES), each checked against the
first kept config's outputs (a miscompiled tile shows as a difference), and SDPA at that shape.

Then the dual path (bench/test_dual_attention_bench.py's case: B=1, H=32, D=128, 576 image keys
after 5 text tokens, every row guided): every config pruning keeps, the dual kernel beside one
sink_attention launch on the same config, each checked against the first config's output. The
dual path's goal is 1.15x one call; on the H200 of 2026-12-04 it took 1.17-1.24x, its autotuner
picking 64-row tiles where sink_attention picks 128 (bench/NOTES.md, "H200 runs of session 39").

    python bench/sweep_attention_stats.py [L ...]        # on a CUDA machine; default L = 4096
    TRITON_INTERPRET=1 python bench/sweep_attention_stats.py --smoke   # the script itself, on CPU

It runs in bench/gpu.sh after the attention benchmarks when a minute is left (into bench.log).
"""

import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

from fastprobe.kernels import attention as kernels
from fastprobe.kernels import dual_attention
from fastprobe.ops import attention as attention_ops

HEADS, HEAD_DIM = 32, 128
NARROW = dict(heads=8, length=8192, head_dim=16)  # bench/test_patch_bench.py's model at L=8192
# (BLOCK_M, BLOCK_N, warps, stages): spill-free for sm_90 at D <= 32, pruned by the register model
NARROW_CANDIDATES = [(128, 128, 8, 3), (128, 128, 8, 2), (64, 128, 4, 2), (128, 64, 4, 3)]
try:  # the dual path's dropped (image) keys: its benchmark's
    from bench.test_dual_attention_bench import IMAGE_START, IMAGE_TOKENS
except ImportError:  # run as a script (bench/ itself on sys.path)
    from test_dual_attention_bench import IMAGE_START, IMAGE_TOKENS


def variants(length: int, device: str) -> dict:
    """name -> keyword arguments of fastprobe.sink_attention (the sink mass is always computed)."""
    cyclic = (torch.arange(length, device=device) % 3).expand(1, -1)
    runs = torch.full((1, length), 2, dtype=torch.int64, device=device)
    runs[:, 0], runs[:, 1 : min(577, length)] = 0, 1  # BOS, an image, text (a prompt's groups)
    return {
        "sink mass only": {},
        "entropy": dict(return_entropy=True),
        "3 groups, cyclic": dict(key_groups=cyclic, num_groups=3),
        "3 groups, runs": dict(key_groups=runs, num_groups=3),
        "groups (cyclic) + entropy": dict(key_groups=cyclic, num_groups=3, return_entropy=True),
        "groups (runs) + entropy": dict(key_groups=runs, num_groups=3, return_entropy=True),
    }


def timer(device: str):
    """Median milliseconds of a call: triton's do_bench on CUDA, a few perf_counter rounds on CPU."""
    if device == "cuda":
        import triton.testing

        return lambda call: triton.testing.do_bench(call, warmup=10, rep=50, return_mode="median")

    def cpu_ms(call):
        call()
        start = time.perf_counter()
        call()
        return (time.perf_counter() - start) * 1e3

    return cpu_ms


def launcher(q, k, v, options: dict):
    """The kernels' launch of fastprobe.sink_attention(q, k, v, **options), its arguments checked
    and its outputs allocated once: the timed call has no host sync (the group ids' range check
    syncs) and no op-layer host time."""
    args = attention_ops._prepare(q, k, v, None, True, None, 0, None, None, None, options.get("key_groups"),
                                  options.get("num_groups"), 1, None, None, None)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    entropy_on, groups_on = options.get("return_entropy", False), args["key_groups"] is not None
    # the op layer's own allocation (_attend's): group_mass only with groups, entropy only when asked for
    out, lse, sink_mass, group_mass, entropy = attention_ops._outputs(
        q, v.shape[-1], args["num_groups"] if groups_on else None, entropy_on)

    def call():
        kernels.sink_attention(q, k, v, out, lse, sink_mass, group_mass, entropy, **args)

    call.outputs = [tensor for tensor in (out, lse, sink_mass, group_mass, entropy) if tensor is not None]
    return call


@contextlib.contextmanager
def untuned():
    """Launches inside take the first config pruning keeps (FASTPROBE_AUTOTUNE=0); the variable
    is restored after."""
    before = os.environ.get("FASTPROBE_AUTOTUNE")
    os.environ["FASTPROBE_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTPROBE_AUTOTUNE"]
        else:
            os.environ["FASTPROBE_AUTOTUNE"] = before


def dual_launcher(q, k, v):
    """The kernels' launch of the dual path over q, k, v (every row guided, gamma 1, the image
    keys of the benchmark dropped), its output allocated once."""
    drop = torch.zeros(q.shape[0], k.shape[2], dtype=torch.uint8, device=q.device)
    drop[:, IMAGE_START:IMAGE_START + IMAGE_TOKENS] = 1
    rows = torch.ones(q.shape[0], q.shape[2], dtype=torch.uint8, device=q.device)
    out = torch.empty_like(q)

    def call():
        dual_attention.dual_path_attention(q, k, v, out, None, None, scale=q.shape[-1] ** -0.5, causal=True,
                                           key_real=None, drop=drop, rows=rows, gamma=1.0, orthogonalize=True,
                                           eps=1e-6, split_keys=0)  # fmt: skip

    call.outputs = [out]
    return call


def kept_configs(call, module=kernels) -> list:
    """The prefill configs that pruning keeps for `call`'s launch (its first one) through
    `module`'s _launch (the kernel module's, attention or dual_attention)."""
    kept, launch = [], module._launch

    def spy(kernel, tuned, configs, prune, grid, args, flags, interpret_blocks, prune_args, buckets=()):
        if configs is module._FWD_CONFIGS and not kept:
            kept.extend(prune(configs, prune_args, **flags))
        launch(kernel, tuned, configs, prune, grid, args, flags, interpret_blocks, prune_args, buckets)

    module._launch = spy
    try:
        call()
    finally:
        module._launch = launch
    return kept


def sweep(length: int, device: str, dtype: torch.dtype, most: int) -> None:
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    measure = timer(device)
    best_plain = None
    print(f"\n== L = {length}: B=1, H={HEADS}, D={HEAD_DIM}, {str(dtype).removeprefix('torch.')}, causal")
    for name, options in variants(length, device).items():
        call = launcher(q, k, v, options)
        with untuned():
            kept = kept_configs(call)
        rows = [(measure(lambda: forced(call, cfg)), cfg) for cfg in kept[:most]]
        tuned = measure(call) if device == "cuda" else float("nan")
        rows.sort(key=lambda row: row[0])
        best = rows[0][0]
        best_plain = best if best_plain is None else best_plain
        print(f"-- {name}: autotuned {tuned:.3f} ms, best kept config {best:.3f} ms "
              f"({best / best_plain - 1:+.0%} over the sink mass alone's best), {len(rows)} configs kept")
        for ms, cfg in rows:
            blocks = " ".join(f"{key}={value}" for key, value in cfg.kwargs.items())
            print(f"   {ms:8.3f} ms  {blocks} warps={cfg.num_warps} stages={cfg.num_stages}")


def narrow_launches(device: str, dtype: torch.dtype, length: int) -> tuple:
    """(q, k, v, {name: launch}) of the narrow sweep: per statistic set, the kept configs and
    the candidates, each a triton.Config."""
    q, k, v = (torch.randn(1, NARROW["heads"], length, NARROW["head_dim"], device=device, dtype=dtype)
               for _ in range(3))
    candidates = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
                  for bm, bn, nw, ns in NARROW_CANDIDATES]
    launches = {}
    for name, options in (("sink mass", {}), ("entropy", dict(return_entropy=True))):
        call = launcher(q, k, v, options)
        with untuned():
            kept = kept_configs(call)
        launches[name] = (call, kept + [cfg for cfg in candidates if cfg not in kept], len(kept))
    return q, k, v, launches


def forced(call, cfg, module=kernels):
    """Runs call with its prefill launch (through `module`, as in kept_configs) on cfg alone:
    untuned (the autotuner keeps its own list), from a config list of one (pruning a list of one
    keeps it)."""
    all_configs = module._FWD_CONFIGS
    module._FWD_CONFIGS = [cfg]
    try:
        with untuned():
            return call()
    finally:
        module._FWD_CONFIGS = all_configs


def checked_run(call, cfg, first, module=kernels) -> tuple:
    """Runs call forced onto cfg (forced) with its outputs poisoned with NaN first, so that what a
    config leaves unwritten shows as a difference. Returns (copies of its outputs, the largest
    |difference| from `first`'s, the first config's copies, or 0 when first is None)."""
    for tensor in call.outputs:
        tensor.fill_(float("nan"))
    forced(call, cfg, module)
    outputs = [tensor.float() for tensor in call.outputs]  # (copies: the next launch overwrites)
    first = outputs if first is None else first
    return outputs, max(float((a - b).abs().nan_to_num(float("inf")).max()) for a, b in zip(outputs, first))


def sweep_dual(device: str, dtype: torch.dtype, length: int, most: int) -> None:
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    dual, single = dual_launcher(q, k, v), launcher(q, k, v, {})
    measure = timer(device)
    with untuned():
        kept = kept_configs(dual, dual_attention)
    tuned_dual, tuned_single = (measure(dual), measure(single)) if device == "cuda" else (float("nan"),) * 2
    print(f"\n== dual path: B=1, H={HEADS}, L={length}, D={HEAD_DIM}, {str(dtype).removeprefix('torch.')}, causal, "
          f"{IMAGE_TOKENS} image keys; autotuned {tuned_dual:.3f} ms against one sink_attention "
          f"{tuned_single:.3f} ms ({tuned_dual / tuned_single:.2f}x)")
    rows, first = [], None
    for cfg in kept[:most]:
        outputs, diff = checked_run(dual, cfg, first, dual_attention)
        first = first or outputs
        rows.append((measure(lambda: forced(dual, cfg, dual_attention)), measure(lambda: forced(single, cfg)), cfg,
                     diff))
    best_single = min(row[1] for row in rows)
    for dual_ms, single_ms, cfg, diff in sorted(rows, key=lambda row: row[0]):
        blocks = " ".join(f"{key}={value}" for key, value in cfg.kwargs.items())
        print(f"-- {dual_ms:8.3f} ms ({dual_ms / best_single:.2f}x the best single call), one call {single_ms:8.3f} ms "
              f"on this config ({dual_ms / single_ms:.2f}x)  {blocks} warps={cfg.num_warps} stages={cfg.num_stages}"
              f"  max |diff| vs the first {diff:.2e}")


def sweep_narrow(device: str, dtype: torch.dtype, length: int) -> None:
    q, k, v, launches = narrow_launches(device, dtype, length)
    measure = timer(device)
    sdpa = measure(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"\n== narrow heads: B=1, H={NARROW['heads']}, L={length}, D={NARROW['head_dim']}, "
          f"{str(dtype).removeprefix('torch.')}, causal; SDPA {sdpa:.3f} ms")
    for name, (call, configs, num_kept) in launches.items():
        rows, first = [], None
        for index, cfg in enumerate(configs):
            outputs, diff = checked_run(call, cfg, first)
            first = first or outputs
            rows.append((measure(lambda: forced(call, cfg)), cfg, index < num_kept, diff))
        for ms, cfg, kept, diff in sorted(rows, key=lambda row: row[0]):
            blocks = " ".join(f"{key}={value}" for key, value in cfg.kwargs.items())
            print(f"-- {name}: {ms:8.3f} ms ({ms / sdpa:.2f}x SDPA)  {blocks} warps={cfg.num_warps} "
                  f"stages={cfg.num_stages}  {'kept' if kept else 'candidate'}, max |diff| vs the first {diff:.2e}")


def main(argv) -> int:
    smoke = "--smoke" in argv
    lengths = [int(arg) for arg in argv if arg.isdigit()] or ([40] if smoke else [4096])
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.inference_mode():
        sweep_dual(device, dtype, 40 if smoke else 4096, 2 if smoke else 1 << 10)  # (first: the newest question)
        for length in lengths:
            sweep(length, device, dtype, 2 if smoke else 1 << 10)
        sweep_narrow(device, dtype, 40 if smoke else NARROW["length"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
