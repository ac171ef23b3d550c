"""Peak memory one call allocates beyond its inputs.

CUDA: the caching allocator's peak during the call, minus what was allocated before.
CPU: torch's CPU allocations are not tracked, so the call runs once in a fresh
process and the growth of the process's peak resident set (VmHWM) across the call
is reported; libraries and threads are warmed up on a tiny input first.
"""

import ctypes
import ctypes.util
import importlib.util
import math
import statistics
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch


def bench_devices():
    """The devices a suite measures on: the CPU, and CUDA when present."""
    return [pytest.param("cpu")] + ([pytest.param("cuda")] if torch.cuda.is_available() else [])


def skip_flex_unless_timed(impl: str, device: str) -> None:
    """Skips a FlexAttention row (impl "flex...") where it is not timed: on the CPU (it compiles
    for minutes there) and with a torch that has no FlexAttention (before 2.5)."""
    if not impl.startswith("flex"):
        return
    if device == "cpu":
        pytest.skip("FlexAttention is timed on CUDA only (on the CPU it compiles for minutes)")
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        pytest.skip(f"FlexAttention needs torch 2.5+ (this is {torch.__version__})")


def on_sdpa_backend(backend: str, call):
    """`call` with SDPA pinned to one backend (a torch.nn.attention.SDPBackend name, e.g.
    "CUDNN_ATTENTION": on Hopper faster than the flash backend that SDPA's fixed priority picks
    first). Where that backend has no kernel for a case, SDPA raises: skip_unless_sdpa_backend_runs."""

    def pinned(*inputs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend)):
            return call(*inputs)

    pinned.__name__ = pinned.__qualname__ = f"{call.__name__}_on_{backend.lower()}"
    return pinned


def skip_unless_sdpa_backend_runs(impl: str, call, inputs: tuple) -> None:
    """Skips a row pinned to one SDPA backend (impl "sdpa-cudnn...") where that backend has no kernel
    for the case (its device, dtype, shape or torch version), with torch's reasons; a row that
    runs has made its first call (outside the timing, as measure's own first call)."""
    if "cudnn" not in impl:
        return
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:
            call(*inputs)
        except RuntimeError as error:
            if not any(text in str(error) for text in ("No available kernel", "No viable backend")):
                raise
            reasons = "; ".join(dict.fromkeys(str(warning.message) for warning in caught)) or str(error)
            pytest.skip(f"{impl}: SDPA's backend has no kernel for this case ({reasons})"[:500])


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


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def _return_freed_memory() -> None:
    """glibc's malloc_trim(0): memory freed by earlier calls goes back to the OS instead of
    staying resident in malloc's arenas, where a later call would reuse it without growing the
    resident set (no-op without glibc)."""
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is not None:
        trim(0)


def print_rss_growth(warm_up, call) -> None:
    """In the child: warm up, then print how far the resident set peaks above its size
    before `call` (bytes). What the warm-up freed is returned to the OS first (so a warm-up
    on the full inputs, e.g. a torch.compile peer's compile, hides nothing), then the peak
    (VmHWM) is reset to the current size by writing 5 to /proc/self/clear_refs; getrusage's
    ru_maxrss cannot be used, as Linux carries it over from the parent through fork and exec."""
    warm_up()
    _return_freed_memory()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_bytes("VmRSS")
    call()
    print(max(_status_bytes("VmHWM") - before, 0))


def print_peak_of(impl_name: str, impl, small: tuple, full: tuple) -> None:
    """print_rss_growth of impl(*full) in the child, warmed up on the small inputs; a
    torch.compile peer warms up on the full ones (it compiles for their shapes, and the
    compile's memory is not the call's)."""
    warm = full if impl_name.startswith("torch.compile") else small
    print_rss_growth(lambda: impl(*warm), lambda: impl(*full))


def on_fresh_thread(run) -> None:
    """Runs `run()` on a new thread (with the caller's grad mode, which is per thread) and
    re-raises what it raised. The thread's Python stack starts nearly empty, as in a user's
    script, instead of under pytest's ~60 frames: on CPython 3.11 / 3.12 each thread's frames
    live in 16 KiB chunks that are mmap'ed and munmap'ed every time a call crosses a chunk
    boundary (python/cpython#142183, fixed in 3.13.x), and at pytest's depth model-level
    generation loops hit a boundary on every step: 40-70% slower depending on the depth alone."""
    grad_enabled, failure = torch.is_grad_enabled(), []

    def target():
        try:
            with torch.set_grad_enabled(grad_enabled):
                run()
        except BaseException as error:  # handed to the calling thread
            failure.append(error)

    worker = threading.Thread(target=target, name="fastprobe-bench")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


# Interleaved rounds of a fastprobe row and each peer on the CPU: a shared machine's speed drifts
# by tens of percent within a minute (2026-12-04: the dual path took 1.05x and 1.84x one
# sink_attention call in two runs of the same suite minutes apart), which moves the ratio of two
# medians timed one after the other; a ratio taken within a block of neighbouring calls does not.
PAIRED_BUDGET_S = 3.0  # time aimed at per peer; at least PAIRED_BLOCKS[0] blocks, at most [1]
PAIRED_BLOCKS = (4, 10)


def paired_blocks(time_row, time_peer, blocks: int, stop=lambda: False) -> list:
    """Timings in blocks of four neighbouring calls, row, peer, peer, row: in each block a steady
    drift adds as much to the row's two times as to the peer's two, and each side runs once first
    and once second after the other, so neither drift nor the order of a pair favours one.
    time_row / time_peer: () -> seconds of one call; no block starts once stop() is true.
    Returns [(row's two times, peer's two times)] a block."""
    timings = []
    for _ in range(blocks):
        if stop():
            break
        first = time_row()
        peer_times = (time_peer(), time_peer())
        timings.append(((first, time_row()), peer_times))
    return timings


def median_quartiles(values: list) -> tuple:
    """(median, low quartile, high quartile) of two or more values."""
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), low, high


def paired_speedup(call, peer, inputs: tuple, clock=time.perf_counter) -> dict:
    """The peer's time over call's in paired_blocks (call, peer, peer, call). Returns the median
    of the blocks' ratios (the peer's two times over call's), their quartiles, and the number of
    blocks."""

    def timed(run):
        start = clock()
        run(*inputs)
        return clock() - start

    timed(peer)  # (untimed: a compiled peer compiles here)
    first = timed(call) + timed(peer)
    blocks = min(max(math.ceil(PAIRED_BUDGET_S / max(2 * first, 1e-9)), PAIRED_BLOCKS[0]), PAIRED_BLOCKS[1])
    timings = paired_blocks(lambda: timed(call), lambda: timed(peer), blocks)
    speedup, low, high = median_quartiles([sum(theirs) / max(sum(mine), 1e-12) for mine, theirs in timings])
    return dict(speedup=speedup, low=low, high=high, blocks=blocks)


def paired_peers(impl: str, baseline, peers: dict) -> list:
    """The implementations a fastprobe row is paired with: its suite's declared baseline (first;
    it may be another fastprobe row, e.g. the dual path's one sink_attention call) and every peer
    (an implementation that is not fastprobe's)."""
    names = [baseline] if baseline in peers and baseline != impl else []
    return names + [name for name in peers if not name.startswith("fastprobe") and name not in names]


def _timed_on(device: str, name: str, call, inputs: tuple) -> bool:
    """Whether the suite times `name` on this device (its own row is not skipped there)."""
    try:
        skip_flex_unless_timed(name, device)
        skip_unless_sdpa_backend_runs(name, call, inputs)
    except pytest.skip.Exception:
        return False
    return True


def triton_configs(call) -> list:
    """What one more call of `call` launches through kernels/_launch.py's launch_tuned, in launch
    order without repeats: "kernel: BLOCK_V=2048, ..., num_warps=8, num_stages=1", the config
    this process's autotuner chose for each (tuning on that call if it had not). The pick can
    differ between runs where configs time alike: concept_mass's H200 medians moved between 0.91
    and 1.30 ms across runs of the same kernel (bench/NOTES.md, session 38), each run's spread narrow."""
    from fastprobe.kernels import _launch

    original = _launch.launch_tuned
    used = []

    def recording(tuned, kernel, grid, args, flags, key):
        original(tuned, kernel, grid, args, flags, key)
        config = _launch._CHOSEN[(tuned, key)]
        settings = [f"{name}={value}" for name, value in config.kwargs.items()]
        settings += [f"num_warps={config.num_warps}", f"num_stages={config.num_stages}"]
        used.append(f"{kernel.__name__}: {', '.join(settings)}")

    modules = [module for name, module in list(sys.modules.items())
               if name.startswith("fastprobe.kernels.") and getattr(module, "launch_tuned", None) is original]
    for module in modules:
        module.launch_tuned = recording
    try:
        call()
    finally:
        for module in modules:
            module.launch_tuned = original
    return list(dict.fromkeys(used))


def measure(benchmark, request, device: str, impl: str, call, inputs: tuple, script: str, peers=None) -> None:
    """Times `call(*inputs)` with pytest-benchmark and records its peak extra memory.

    CUDA: compile/autotune first, then 20 synchronised rounds (200 for a call under a
    millisecond, e.g. decoding, whose round-to-round spread is larger); the run's copy bandwidth
    is measured once (the JSON then reports each op's fraction of it). CPU: the peak is taken
    in a fresh process running `script --peak-rss impl`, and the rounds run on a fresh thread
    (see on_fresh_thread); fastprobe gets 15 rounds, the slower peers 5. `peers`: the suite's
    implementations by name (taking the same inputs); on the CPU a fastprobe row is then also
    timed in alternation with each of paired_peers (paired_speedup), recorded in extra_info
    "paired" (peer -> speedup, low, high, blocks); not on CUDA, whose device time is budgeted to
    the second (bench/NOTES.md, "The next GPU session"). On CUDA a fastprobe row records the
    autotuned configs it runs with in extra_info "triton_configs" (triton_configs)."""
    if device == "cuda":
        request.getfixturevalue("copy_bandwidth")
        call(*inputs)
        benchmark.extra_info["peak_extra_bytes"] = cuda_peak_extra_bytes(lambda: call(*inputs))
        if impl.startswith("fastprobe"):
            benchmark.extra_info["triton_configs"] = triton_configs(lambda: call(*inputs))

        def run():
            call(*inputs)
            torch.cuda.synchronize()

        start = time.perf_counter()
        run()
        rounds = 200 if time.perf_counter() - start < 1e-3 else 20
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=2, iterations=1)
    else:
        benchmark.extra_info["peak_extra_bytes"] = cpu_peak_extra_bytes(script, impl)
        rounds = 15 if impl.startswith("fastprobe") else 5
        on_fresh_thread(lambda: benchmark.pedantic(lambda: call(*inputs), rounds=rounds, warmup_rounds=1, iterations=1))
        if peers is None or not impl.startswith("fastprobe") or getattr(benchmark, "disabled", False):
            return
        paired = benchmark.extra_info["paired"] = {}
        for name in paired_peers(impl, benchmark.extra_info.get("baseline"), peers):
            if _timed_on(device, name, peers[name], inputs):
                on_fresh_thread(lambda name=name: paired.update({name: paired_speedup(call, peers[name], inputs)}))
