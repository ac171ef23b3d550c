"""Shared test set-up.

* Every output a kernel returns starts as NaN (fastprobe.ops._common.POISON_OUTPUTS),
  so an element a kernel forgot to write fails the comparison.
* Inputs are fresh random draws each run; the seed is printed on failure.
* A test that loses the CUDA context (illegal memory access, ...) takes down only itself: its
  xdist worker exits and is replaced, or in one process later gpu tests are skipped
  (tests/_worker_guard.py).
* `-m gpu` tests need CUDA; `-m interpreter` tests run the Triton kernels on CPU
  through the Triton interpreter and need TRITON_INTERPRET=1 set before triton is
  imported, so they run in their own pytest process (see README).
"""

import contextlib
import importlib
import os
import random

import pytest
import torch

import fastprobe
from fastprobe.backend import interpreter_enabled
from fastprobe.ops import _common

from . import _worker_guard

_common.POISON_OUTPUTS = True

INTERPRETER = interpreter_enabled()
HAS_CUDA = torch.cuda.is_available() and not INTERPRETER


def interpreter_numpy_problem(triton_version: str, numpy_version: str):
    """Why the Triton interpreter cannot run the kernels with these versions, or None. Triton 3.0's
    and 3.1's interpreter read scalars out of numpy arrays in ways numpy 2 refuses or computes
    otherwise (checked 2026-12-04: every interpreter test failed with 3.0 and numpy 2.4, and both
    failed with numpy 2.3, where 3.0 with numpy 1.26 passed). Triton 3.2 to 3.6 read a loop bound with
    int() of a 1-element array, which numpy 2.4 refuses (checked 2026-12-07: 3.6 with torch 2.11.0, 417
    of 427 interpreter tests of test_divergence.py and test_attention.py failed with numpy 2.4.6, none
    with 2.3.5; 3.2 with torch 2.6.0 and 3.5 with 2.13.0 failed the same way at their first test,
    and passed test_divergence.py's (3.2: and test_concepts.py's) with numpy 2.3.5; so did 3.3.1 and
    3.4.0 with 2.13.0's Python side; 3.7.1 and 3.9 pass with numpy 2.4)."""
    major_minor = tuple(int(part) for part in triton_version.split(".")[:2])
    numpy_major_minor = tuple(int(part) for part in numpy_version.split(".")[:2])
    if major_minor < (3, 2) and numpy_major_minor >= (2, 0):
        way_out = "numpy<2 (or a newer Triton: 3.9's runs them with numpy 2)"
    elif (3, 2) <= major_minor <= (3, 6) and numpy_major_minor >= (2, 4):
        way_out = "numpy<2.4 (or Triton 3.7+)"
    else:
        return None
    return (f"Triton {triton_version}'s interpreter does not work with numpy {numpy_version}: "
            f"install {way_out} for the -m interpreter tests")


def pytest_configure(config):
    if not config.pluginmanager.is_registered(_worker_guard):  # unless loaded with -p
        config.pluginmanager.register(_worker_guard, "fastprobe_worker_guard")
    if INTERPRETER:  # (a clear refusal instead of hundreds of failures deep inside the interpreter)
        import numpy
        import triton

        problem = interpreter_numpy_problem(triton.__version__, numpy.__version__)
        if problem:
            raise pytest.UsageError(problem)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(
        reason="Triton interpreter tests run in their own process: TRITON_INTERPRET=1 pytest -m interpreter"
    )
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not INTERPRETER:
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A new seed per test, reported in the failure output; FASTPROBE_TEST_SEED=N replays one."""
    replay = os.environ.get("FASTPROBE_TEST_SEED")
    seed = int(replay) if replay else random.SystemRandom().randrange(2**31)
    if _worker_guard.lost_by is None:
        torch.manual_seed(seed)
    else:  # the CUDA context is lost (one process, no xdist): seeding CUDA would raise again
        torch.default_generator.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed
    fastprobe.set_backend(None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    seeds = [value for key, value in item.user_properties if key == "seed"]
    if report.failed and seeds:
        report.sections.append(("fastprobe", f"inputs drawn after torch.manual_seed({seeds[0]}); "
                                              f"replay: FASTPROBE_TEST_SEED={seeds[0]} pytest ..."))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests: they gain nothing from threads, and
    on a busy machine OpenMP barriers make every small op wait for a core (seconds per generate
    instead of milliseconds). Use with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same_bits_per_row(call, num_rows: int, axis: int = 0, thread_counts=(1, 2, 3, 5, 8)) -> tuple:
    """The C++ kernels' row split (csrc/common.h, run_rows): call(rows) returns tensors whose
    dimension `axis` holds the rows; it runs with the C++ backend on the whole batch and on each
    row alone under every thread count (5 rows: whole rows at 1 and 5 threads, the rows' ranges
    spread at 3 and 8, a row alone at 2 and more). Asserts that each row's outputs are the same bits
    every time and returns the whole batch's at the first count."""
    threads = torch.get_num_threads()
    runs = []
    try:
        with fastprobe.use_backend("cpp"):
            for count in thread_counts:
                torch.set_num_threads(count)
                for rows in [slice(None)] + [slice(n, n + 1) for n in range(num_rows)]:
                    runs.append((count, rows, call(rows)))
    finally:
        torch.set_num_threads(threads)
    whole = runs[0][2]
    for count, rows, outputs in runs:
        for n in range(num_rows) if rows.start is None else [rows.start]:
            at = n if rows.start is None else 0
            for got, want in zip(outputs, whole):
                assert torch.equal(got.select(axis, at), want.select(axis, n)), (count, rows, n)
    return whole


# The execution targets a family's tests run on: (backend, device, pytest marks).
TARGETS = [
    pytest.param(("cpp", "cpu"), id="cpp"),
    pytest.param(("triton", "cpu"), id="triton-interp", marks=pytest.mark.interpreter),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=TARGETS)
def target(request):
    """(backend, device) with that backend forced for the test."""
    backend, device = request.param
    fastprobe.set_backend(backend)
    return backend, device


def _prefetching(param):
    (backend, device), = param.values
    return pytest.param((backend, device, True), id=f"{param.id}-prefetch", marks=param.marks)


def prefetch_target(module: str):
    """The `target` fixture of a family whose Triton kernel can load each vocabulary block one
    iteration ahead (an autotuned choice; untuned launches take
    fastprobe.kernels.<module>.UNTUNED_PREFETCH): every Triton target runs twice (ids ending in
    -prefetch: with it), and both ways must be right."""

    @pytest.fixture(params=TARGETS + [_prefetching(param) for param in TARGETS if param.values[0][0] == "triton"])
    def target(request, monkeypatch):
        backend, device, *prefetch = request.param
        fastprobe.set_backend(backend)
        if backend == "triton":
            kernels = importlib.import_module(f"fastprobe.kernels.{module}")
            monkeypatch.setattr(kernels, "UNTUNED_PREFETCH", bool(prefetch))
        return backend, device

    return target


# Kernels accumulate in float32 whatever the input dtype, and tests compare them with
# the float64 reference run on the same (already rounded) input values, so one
# float32-level tolerance serves every input dtype.
RTOL, ATOL = 2e-5, 2e-5
TORCH_RELEASE = tuple(int(part) for part in torch.__version__.split(".")[:2])  # (major, minor)


@contextlib.contextmanager
def forced_lanes(width):
    """The C++ attention kernels forced to the cpp backend and to `width` lanes, floats per vector
    (fastprobe._C.set_attention_lanes; restored after); skipped where the CPU or the build has
    no kernels of that width."""
    from fastprobe import _C

    fastprobe.set_backend("cpp")
    previous = _C.set_attention_lanes(width)
    try:
        if _C.attention_lanes() != width:
            pytest.skip("the 16-lane kernels need an AVX-512 CPU and a multi-versioned build")
        yield
    finally:
        _C.set_attention_lanes(previous)


@pytest.fixture(params=[8, 16], ids=["8-lanes", "16-lanes"])
def cpu_lanes(request):
    """The C++ attention kernels (sink_attention, dual_path_attention) at a lane width
    (forced_lanes): 8 runs the AVX2 / baseline kernels even on an AVX-512 CPU, 16 the AVX-512
    ones."""
    with forced_lanes(request.param):
        yield request.param


@pytest.fixture(params=[False, True], ids=["float32-scores", "bf16-pair-scores"])
def cpu_bf16_pairs(request):
    """The C++ attention kernels at 16 lanes (forced_lanes), their bfloat16 scores by AVX512-BF16
    pairs (True: skipped where the CPU has no AVX512-BF16) or in float32 (False)
    (fastprobe._C.set_attention_bf16_pairs; restored after)."""
    from fastprobe import _C

    with forced_lanes(16):
        previous = _C.set_attention_bf16_pairs(request.param)
        try:
            if _C.attention_bf16_pairs() != request.param:
                pytest.skip("the bfloat16 pair scores need a CPU with AVX512-BF16 and a GCC 12+ build")
            yield request.param
        finally:
            _C.set_attention_bf16_pairs(previous)


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Every output of the C++ attention kernels filled with NaN before each call: an element a
    kernel leaves unwritten then fails the comparison instead of passing by luck."""
    from fastprobe.ops import attention, dual_attention

    for kernels in (attention._KERNELS, dual_attention._KERNELS):
        def poisoned(q, k, v, args, *outputs, kernel=kernels["cpp"]):
            for output in outputs:
                if output is not None:
                    output.fill_(float("nan"))
            kernel(q, k, v, args, *outputs)

        monkeypatch.setitem(kernels, "cpp", poisoned)


def spawn_gloo_ranks(worker, args: tuple, out_dir, seconds: float) -> None:
    """Runs worker(rank, *args) in two spawned processes (gloo ranks) that save rank{r}.pt under
    out_dir. gloo's teardown has been seen to hang (about 1 run in 13): after `seconds` the ranks are
    stopped; the results they saved before tearing down still count, missing ones fail."""
    import time

    import torch.multiprocessing as mp

    ranks = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + seconds
    while not ranks.join(timeout=2) and time.monotonic() < deadline:
        pass
    for process in ranks.processes:
        if process.is_alive():
            process.kill()
    missing = [rank for rank in range(2) if not os.path.exists(os.path.join(out_dir, f"rank{rank}.pt"))]
    assert not missing, f"gloo ranks {missing} saved no results within {seconds:.0f} s"


@pytest.fixture
def one_rank_group(tmp_path):
    """A gloo process group of one rank (this process), torn down afterwards."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is unavailable")
    if os.path.exists("/sys/class/net/lo"):  # (gloo otherwise uses the hostname's address)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()
