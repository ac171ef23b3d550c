"""Where the attention statistics cost: every prefill config that pruning keeps, timed with each
statistic alone and with all of them, at the GPU benchmark's shape (B=1, H=32, D=128, bfloat16).

The benchmark (bench/test_attention_bench.py, "statistics") measures 3 key groups and the entropy
together at +70-105% over the sink mass alone (bench/NOTES.md), against a goal of 5%. This splits
that: per statistic, the time of each kept config and the autotuner's choice, so that a tile
choice (the fastest tile is pruned or not picked) shows apart from the statistic's own work.

    python bench/sweep_attention_stats.py [L ...]        # on a CUDA machine; default L = 4096
    TRITON_INTERPRET=1 python bench/sweep_attention_stats.py --smoke   # the script itself, on CPU

It runs in bench/gpu.sh after the attention benchmarks when a minute is left (into bench.log).
"""

import os
import sys
import time

import torch

from fastprobe.kernels import attention as kernels
from fastprobe.ops import attention as attention_ops
from fastprobe.ops._common import new_output

HEADS, HEAD_DIM = 32, 128


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
    out, lse, sink_mass, group_mass, entropy = attention_ops._outputs(q, v.shape[-1], args["num_groups"], entropy_on,
                                                                      new_output)
    group_mass, entropy = group_mass if groups_on else None, entropy if entropy_on else None
    return lambda: kernels.sink_attention(q, k, v, out, lse, sink_mass, group_mass, entropy, **args)


def kept_configs(call) -> list:
    """The prefill configs that pruning keeps for `call`'s launch (its first one)."""
    kept, launch = [], kernels._launch

    def spy(kernel, tuned, configs, prune, grid, args, flags, interpret_blocks, prune_args, buckets=()):
        if configs is kernels._FWD_CONFIGS and not kept:
            kept.extend(prune(configs, prune_args, **flags))
        launch(kernel, tuned, configs, prune, grid, args, flags, interpret_blocks, prune_args, buckets)

    kernels._launch = spy
    try:
        call()
    finally:
        kernels._launch = launch
    return kept


def sweep(length: int, device: str, dtype: torch.dtype, most: int) -> None:
    q, k, v = (torch.randn(1, HEADS, length, HEAD_DIM, device=device, dtype=dtype) for _ in range(3))
    measure, all_configs = timer(device), kernels._FWD_CONFIGS
    best_plain = None
    print(f"\n== L = {length}: B=1, H={HEADS}, D={HEAD_DIM}, {str(dtype).removeprefix('torch.')}, causal")
    for name, options in variants(length, device).items():
        call = launcher(q, k, v, options)
        os.environ["FASTPROBE_AUTOTUNE"] = "0"
        rows = []
        for cfg in kept_configs(call)[:most]:
            kernels._FWD_CONFIGS = [cfg]  # (pruning a list of one keeps it: the launch runs this config)
            try:
                rows.append((measure(call), cfg))
            finally:
                kernels._FWD_CONFIGS = all_configs
        os.environ["FASTPROBE_AUTOTUNE"] = "1"
        tuned = measure(call) if device == "cuda" else float("nan")
        rows.sort(key=lambda row: row[0])
        best = rows[0][0]
        best_plain = best if best_plain is None else best_plain
        print(f"-- {name}: autotuned {tuned:.3f} ms, best kept config {best:.3f} ms "
              f"({best / best_plain - 1:+.0%} over the sink mass alone's best), {len(rows)} configs kept")
        for ms, cfg in rows:
            blocks = " ".join(f"{key}={value}" for key, value in cfg.kwargs.items())
            print(f"   {ms:8.3f} ms  {blocks} warps={cfg.num_warps} stages={cfg.num_stages}")


def main(argv) -> int:
    smoke = "--smoke" in argv
    lengths = [int(arg) for arg in argv if arg.isdigit()] or ([40] if smoke else [4096])
    device = "cpu" if smoke else "cuda"
    with torch.inference_mode():
        for length in lengths:
            sweep(length, device, torch.float32 if smoke else torch.bfloat16, 2 if smoke else 1 << 10)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
