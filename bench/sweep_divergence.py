"""Times every autotune config (block size, warps, prefetch) of the Triton draft_divergence kernel at the GPU
benchmark shape and prints them against the device's copy bandwidth.

    python -m bench.sweep_divergence   # from the repository root: it imports bench.* (as bench/gpu.sh runs it)
"""

import torch
import triton
import triton.testing

from bench.conftest import measure_copy_bandwidth
from bench.test_divergence_bench import CASES, make_inputs
from fastprobe.kernels import divergence as kernels


def main():
    case = CASES["cuda"]
    drafts, target = make_inputs("cuda", **case)
    K, N, V = drafts.shape
    weights = torch.full((K,), 1.0 / K, device="cuda")
    stats = torch.empty(5 + K, N, device="cuda")
    lse = torch.empty(K + 1, N, device="cuda", dtype=torch.float64)
    one_read = drafts.nbytes + target.nbytes
    copy = measure_copy_bandwidth("cuda")
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s; one read {one_read / 1e9:.2f} GB")
    rows = []
    for config in kernels._prune_configs(kernels._AUTOTUNE_CONFIGS, {}, K_PAD=triton.next_power_of_2(K)):
        launch = lambda: kernels.draft_divergence(drafts, target, weights, 1.0, stats, lse, config=config)  # noqa: E731
        ms = triton.testing.do_bench(launch, warmup=25, rep=100, return_mode="median")
        rows.append((ms, config))
    for ms, config in sorted(rows, key=lambda row: row[0]):
        print(f"BLOCK_V={config.kwargs['BLOCK_V']:5d} warps={config.num_warps:2d} prefetch={config.kwargs['PREFETCH']:d} "
              f"{ms:7.3f} ms  {one_read / (ms * 1e-3) / copy:5.1%} of copy bandwidth (one read)")


if __name__ == "__main__":
    main()
