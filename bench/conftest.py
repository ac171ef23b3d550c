"""Benchmark set-up shared by the suites.

Each benchmark records in extra_info: `impl` (fastprobe or a peer), `baseline`
(the peer its speed-up is reported against, measured in the same run),
`peak_extra_bytes` (memory allocated beyond the inputs during one call) and,
for memory-bound ops, `bytes_one_read` (the bytes of one read of the inputs).
At the end of the run, speed-ups against the baseline and, on CUDA, the fraction
of the device's copy bandwidth (measured in the same run) are added to the JSON;
machine_info records the command that ran (for bench/report.py's list of runs).
torch.compile'd peers never fall back to eager code (compile_without_eager_fallback).
"""

import datetime
import importlib.metadata
import os
import platform
import shlex

import pytest
import torch


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_slug():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name().lower().replace(" ", "-")
    return "cpu"


def measure_copy_bandwidth(device, num_bytes=2 << 30):
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written."""
    import triton.testing

    source = torch.empty(num_bytes // 4, dtype=torch.float32, device=device).uniform_()
    destination = torch.empty_like(source)
    ms = triton.testing.do_bench(lambda: destination.copy_(source), warmup=50, rep=300, return_mode="median")
    return 2 * num_bytes / (ms * 1e-3)


_COPY_BANDWIDTH = {}


def compile_without_eager_fallback(limit=64):
    """The compiled peers (torch.compile'd references, FlexAttention) compile once per shape and
    mask (dynamic=False), and one family's process compiles flex_attention for every length and
    mask it times. Past dynamo's default of 8 compiles of one function it silently runs that
    function uncompiled: the H200 runs of 2026-11-30 timed FlexAttention decoding at 2.7 ms with a
    1 GiB peak and the dual path's two Flex calls at 35 ms with 7 GiB (eager Flex materialises the
    scores). So the limit is raised, and reaching it fails the row instead of timing eager code
    (the option's names since torch 2.6; 2.4-2.5 have the limit as cache_size_limit, no switch)."""
    import torch._dynamo.config as dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo, name, None) is not None:
            setattr(dynamo, name, max(getattr(dynamo, name), limit))
            break
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if getattr(dynamo, name, None) is not None:
            setattr(dynamo, name, True)
            break


compile_without_eager_fallback()


@pytest.fixture(scope="session")
def copy_bandwidth():
    """Measured once per run on the CUDA device (bytes/s)."""
    if "cuda" not in _COPY_BANDWIDTH:
        _COPY_BANDWIDTH["cuda"] = measure_copy_bandwidth("cuda")
    return _COPY_BANDWIDTH["cuda"]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastprobe_device"] = device_slug()
    machine_info["cpu_threads"] = torch.get_num_threads()
    machine_info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # what ran, for the report's list of runs: bench/gpu.sh's command line where it ran the suite
    machine_info["command"] = os.environ.get("FASTPROBE_BENCH_COMMAND") or \
        "python -m pytest " + shlex.join(str(arg) for arg in config.invocation_params.args)
    machine_info["versions"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "fastprobe": _version("fastprobe"),
    }
    if torch.cuda.is_available():
        machine_info["gpu"] = torch.cuda.get_device_name()
        machine_info["cuda"] = torch.version.cuda
    if "cuda" in _COPY_BANDWIDTH:
        machine_info["copy_bandwidth_bytes_per_s"] = _COPY_BANDWIDTH["cuda"]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Speed-up of every benchmark against its group's baseline, and achieved bandwidth."""
    if "cuda" in _COPY_BANDWIDTH:
        output_json["machine_info"]["copy_bandwidth_bytes_per_s"] = _COPY_BANDWIDTH["cuda"]
    copy = output_json["machine_info"].get("copy_bandwidth_bytes_per_s")
    by_group = {}
    for bench in output_json["benchmarks"]:
        by_group.setdefault(bench["group"], {})[bench["extra_info"].get("impl")] = bench
    for group in by_group.values():
        for bench in group.values():
            info, median = bench["extra_info"], bench["stats"]["median"]
            baseline = group.get(info.get("baseline"))
            if baseline is not None:
                info["speedup_vs_baseline"] = baseline["stats"]["median"] / median
            # against every implementation of the group (e.g. SDPA and eager attention both)
            info["speedup_vs"] = {
                name: other["stats"]["median"] / median for name, other in group.items() if other is not bench
            }
            if info.get("bytes_one_read") and copy:
                info["fraction_of_copy_bandwidth"] = info["bytes_one_read"] / median / copy
