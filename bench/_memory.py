"""Peak memory one call allocates beyond its inputs.

CUDA: the caching allocator's peak during the call, minus what was allocated before.
CPU: torch's CPU allocations are not tracked, so the call runs once in a fresh
process and the growth of the process's peak resident set (ru_maxrss) across the
call is reported; libraries and threads are warmed up on a tiny input first.
"""

import resource
import subprocess
import sys

import torch


def cuda_peak_extra_bytes(call) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def cpu_peak_extra_bytes(script: str, *args: str) -> int:
    """Runs `python script --peak-rss *args` and returns the byte count it prints."""
    done = subprocess.run([sys.executable, script, "--peak-rss", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory child failed:\n{done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def print_rss_growth(warm_up, call) -> None:
    """In the child: warm up, then print the peak-RSS growth (bytes) across `call`."""
    warm_up()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)  # ru_maxrss is in KiB on Linux
