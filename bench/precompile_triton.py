"""Compile, on this machine and without a GPU, the Triton kernels that bench/gpu.sh compiles on the
H200 machine's CPU (most of the last run's test and warm-up phases), keyed as that machine's
Triton looks them up, so that there it loads them instead:

    /tmp/t36/bin/python bench/precompile_triton.py --tests   # then carry .triton-cache (and .whl)

Families (positional; default all): attention, dual_attention, bridge, concepts, divergence (their
benchmarks' launches) and, with --tests, those and patch, guidance (the GPU tests' launches:
pytest -m gpu on tests/test_FAMILY.py, test_devices.py for patch, FASTPROBE_AUTOTUNE=0). It writes
.triton-cache/kernels.tar.xz (what this run used: each kernel's cubin and metadata, and the C
launcher modules) and .triton-cache/precompiled.txt (what the keys assumed); bench/gpu.sh unpacks
the archive into its TRITON_CACHE_DIR and says in setup.log whether the keys match there and what
compiled anyway. Everything: ~12 min on this 2-core machine, a 13 MiB archive (bench/NOTES.md).
Run it right before the device call, on the tree that will be sent: a kernel's key hashes its
source (and its callees'), so an edit under kernels/ afterwards makes that kernel miss (it then
compiles on the GPU machine as before; nothing breaks). A rerun recompiles only what changed (the
work cache, default /tmp/fastprobe-triton-precompile, is seeded from the archive); the archive
holds what the last run used, so give every family each time.

The keys hash: Triton's version and installed files (triton_key(): the compiler, backends and
language sources and _C/libtriton.so, which differs between the cp311 and cp312 wheels), the
kernel's source, the launch's signature, constexprs and specialisations, the sm_90 backend's hash
(the bundled ptxas's version), the options and the cache-invalidating environment variables.
The GPU machine has Python 3.12, torch 2.11.0+cu130 and triton 3.6.0 (PyPI's cp312 wheel, it
seems: setup.log's comparison tells), so this runs under a Python 3.12 with that same wheel (made
once; torch only has to import, CPU tensors only):

    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/t36
    /tmp/t36/bin/pip install torch==2.13.0 numpy pytest pytest-xdist hypothesis
    /tmp/t36/bin/pip install transformers==5.17.0 pillow pandas "torchvision==0.28.*"   # patch, guidance tests
    /tmp/t36/bin/pip install --no-deps --force-reinstall triton==3.6.0   # (torch 2.13 pulls 3.7)

How: the benchmarks' own launches (bench/test_*_bench.py's CUDA shapes and dtypes, through the op
layer, plus those of bench/host_overhead.py, sweep_divergence.py and sweep_attention_stats.py)
on CPU tensors, with the op layer on the Triton kernels, a stand-in driver that reports an sm_90
device, every launch turned into a compile (JITFunction.run with warmup=True: the real binder,
specialisation and cache, no launch), the autotuner "timing" each config that survives pruning by compiling it, and the
pruning given the H200's shared memory. The fused-linear loss's matrix products are faked (its
kernels need only the chunk shapes). Under --tests each Triton call also runs the reference
implementation into the outputs, so the tests go on past their comparisons, and a torch function
mode keeps the tensors a test puts on "cuda" on the CPU (the tests still see the target
("triton", "cuda"), so they launch their CUDA shapes and configs). Each kernel's launcher (the C module the
GPU machine builds with gcc once per signature) is built too, linked against a stub
libcuda.so.1 (FASTPROBE_PRECOMPILE_LAUNCHERS=0: not). Not covered: the model-level benchmarks
(patch, guidance, methods), inductor's kernels (torch.compile / Flex peers), and shapes drawn at
random per run (hypothesis and a few tests: a handful of kernels still compile there).

Every run ends with each kernel's registers per thread and the compiled variants that spill (read
with cuobjdump from Triton's wheel). `--arch 80` (A100), 86 (A10, RTX 30xx) or 89 (L4, L40S,
RTX 40xx) compiles the same launches for that GPU, with its shared memory in the pruning, into a
work cache of its own and no archive: the check, without such a GPU, that the kernels compile
there and how they use its registers (the register model in kernels/attention.py was fitted on
sm_90).

The file is also bench/gpu.sh's pytest plugin (-p bench.precompile_triton): with
FASTPROBE_TRITON_LOG set, each Triton compile or cache hit appends a line to that file.
"""

import base64
import collections
import functools
import hashlib
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = os.path.join(ROOT, ".triton-cache", "kernels.tar.xz")
INFO = os.path.join(ROOT, ".triton-cache", "precompiled.txt")
WORK = "/tmp/fastprobe-triton-precompile"
H200_SHARED_MEM = 232448  # bytes a block may use (the driver's max_shared_mem on an H100 / H200)
H200_SMS = 132
FAMILIES = ("attention", "dual_attention", "bridge", "concepts", "divergence", "patch", "guidance")
TEST_FILES = {"patch": "tests/test_devices.py"}  # (the others: tests/test_FAMILY.py; patch and guidance: tests only)
# --arch: the compute capability to compile for, with its shared memory per block (opt-in) and a
# representative SM count (decoding's key splits): the GPU machine's sm_90, and the GPUs users
# have besides (A100, A10 / RTX 30xx, L4 / L40S / RTX 40xx), where only a compile here checks the
# kernels. Only sm_90's compiles go into the archive.
ARCHES = {90: (H200_SHARED_MEM, H200_SMS), 80: (166912, 108), 86: (101376, 72), 89: (101376, 142)}
ARCH_VARIABLE = "FASTPROBE_PRECOMPILE_ARCH"  # (the arch, to the case processes and the test plugin)


def _arch() -> int:
    return int(os.environ.get(ARCH_VARIABLE, "90"))


# ---- pytest plugin: the compile log on the GPU machine; the compile-only set-up under --tests ----


_KERNELS_SEEN = [0]  # compiles and cache hits in this process (_add_listener's count)


def _add_listener(path: str) -> None:
    """Append '<hit|compiled> <kernel> <ms> <cache folder>' to `path` for each Triton compile, and
    for a compile the test that made it, its constexprs, specialisations, signature and source
    hash (what the precompile missed, and why)."""
    from triton import knobs

    def listener(src, metadata, metadata_group, times, cache_hit):
        _KERNELS_SEEN[0] += 1
        try:
            folder = _base32(metadata["hash"]) if "hash" in metadata else "?"
            with open(path, "a") as log:
                log.write(f"{'hit' if cache_hit else 'compiled'} {metadata.get('name', '?')} "
                          f"{times.total / 1000:.0f} {folder}\n")
                if not cache_hit:
                    log.write(f"  test {os.environ.get('PYTEST_CURRENT_TEST', '-')}\n"
                              f"  constants {getattr(src, 'constants', '-')}\n  attrs {getattr(src, 'attrs', '-')}\n"
                              f"  signature {getattr(src, 'signature', '-')}\n  source {src.hash()[:16]}\n")
        except Exception:  # never fail a run over the log
            pass

    knobs.compilation.listener = listener


def _cuda_on_cpu() -> None:
    """--tests: tensors and modules a test puts on "cuda" stay on the CPU (a torch function mode
    that rewrites the device arguments of every torch call), and torch.cuda's synchronising and
    seeding calls do nothing."""
    import torch
    from torch.overrides import TorchFunctionMode

    def cpu(value):
        if isinstance(value, torch.device) and value.type == "cuda":
            return torch.device("cpu")
        if isinstance(value, str) and value.startswith("cuda"):
            return "cpu"
        return value

    class CudaOnCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.cuda:
                return args[0]
            kwargs = {key: cpu(value) for key, value in (kwargs or {}).items()}
            return func(*(cpu(arg) for arg in args), **kwargs)

    CudaOnCpu().__enter__()  # for the whole process
    for name in ("synchronize", "manual_seed", "manual_seed_all", "empty_cache", "reset_peak_memory_stats"):
        setattr(torch.cuda, name, lambda *args, **kwargs: None)


def pytest_configure(config):
    if os.environ.get("FASTPROBE_PRECOMPILE") == "tests":
        _setup(os.environ["TRITON_CACHE_DIR"], tests=True)
        _cuda_on_cpu()
        # no CUDA context to lose here: a CUDA call that fails for want of a driver (torch.cuda.Stream
        # with a CUDA build of torch) fails its own test, instead of the worker guard skipping the rest
        for name, module in list(sys.modules.items()):
            if name.endswith("_worker_guard") and hasattr(module, "is_sticky"):
                module.is_sticky = lambda error: False
    path = os.environ.get("FASTPROBE_TRITON_LOG")
    if path:
        try:
            _add_listener(path)
        except Exception:  # (a Triton without knobs.compilation.listener)
            pass


def pytest_collection_modifyitems(config, items):
    """--tests: run the GPU-marked tests, which tests/conftest.py skips without CUDA."""
    if os.environ.get("FASTPROBE_PRECOMPILE") != "tests":
        return
    for item in items:
        item.own_markers = [mark for mark in item.own_markers
                            if not (mark.name == "skip" and "CUDA" in str(mark.kwargs.get("reason", "")))]


# ---- what the keys hash beyond the kernels, here and on the GPU machine ----


def _base32(key: str) -> str:
    return base64.b32encode(bytes.fromhex(key)).decode().rstrip("=")  # Triton's cache folder names


def key_facts(target=None) -> dict:
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    try:
        from triton.runtime.cache import triton_key
    except ImportError:
        from triton.compiler.compiler import triton_key
    target = target or GPUTarget("cuda", 90, 32)
    backend_hash = make_backend(target).hash()
    release = re.search(r"V(\d+\.\d+\.\d+)", backend_hash)
    return {
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "triton_key": hashlib.sha256(triton_key().encode()).hexdigest()[:16],
        "backend": f"{hashlib.sha256(backend_hash.encode()).hexdigest()[:16]} (ptxas {release.group(1) if release else '?'}, sm_{target.arch})",
        "env": str(sorted(get_cache_invalidating_env_vars().items())),
    }


MUST_MATCH = ("triton", "triton_key", "backend", "env")


# ---- the cache on disk: archive, unpack, relink ----


def relink(cache_dir: str) -> int:
    """Point each kernel's group file at the files in its own folder (Triton records absolute
    paths there and ignores a group whose files are elsewhere: a moved cache would miss).
    Returns the number of kernels."""
    kernels = 0
    for folder in os.listdir(cache_dir):
        path = os.path.join(cache_dir, folder)
        if not os.path.isdir(path):
            continue
        for name in os.listdir(path):
            if name.startswith("__grp__") and name.endswith(".json"):
                with open(os.path.join(path, name)) as file:
                    group = json.load(file)
                children = {child: os.path.join(path, child) for child in group.get("child_paths", {})
                            if os.path.exists(os.path.join(path, child))}
                with open(os.path.join(path, name), "w") as file:
                    json.dump({"child_paths": children}, file)
                kernels += 1
    return kernels


def unpack(archive: str, cache_dir: str) -> int:
    import tarfile

    os.makedirs(cache_dir, exist_ok=True)
    with tarfile.open(archive) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(cache_dir, filter="data")
        else:
            tar.extractall(cache_dir)
    return relink(cache_dir)


def pack(cache_dir: str, folders, archive: str) -> int:
    """The kernels in `folders` (cubin, metadata and group; not the TTIR source) as an xz tar."""
    import tarfile

    os.makedirs(os.path.dirname(archive), exist_ok=True)
    temporary = archive + ".tmp"
    with tarfile.open(temporary, "w:xz", preset=6) as tar:
        for folder in sorted(folders):
            for name in sorted(os.listdir(os.path.join(cache_dir, folder))):
                if not name.endswith(".source") and not name.startswith("tmp."):
                    tar.add(os.path.join(cache_dir, folder, name), arcname=f"{folder}/{name}")
    os.replace(temporary, archive)
    return os.path.getsize(archive)


def _read_info() -> dict:
    facts = {}
    if os.path.exists(INFO):
        with open(INFO) as info:
            for line in info:
                key, _, value = line.rstrip("\n").partition(": ")
                facts[key] = value
    return facts


MARKER = ".precompiled-folders"  # in the GPU machine's cache: the folders unpacked (its time: when)


def _changed_since_install(cache_dir: str) -> dict:
    """Folders by kind and origin: precompiled, new (made on this machine) and rewritten (a
    precompiled file written again here: a module that did not load and was rebuilt)."""
    marker = os.path.join(cache_dir, MARKER)
    unpacked, since = set(), 0.0
    if os.path.exists(marker):
        with open(marker) as file:
            unpacked = set(json.load(file))
        since = os.path.getmtime(marker)
    found = {f"{kind} {origin}": [] for kind in ("kernels", "modules") for origin in ("precompiled", "new", "rewritten")}
    for folder in sorted(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else []:
        path = os.path.join(cache_dir, folder)
        if not os.path.isdir(path):
            continue
        names = os.listdir(path)
        kind = "kernels" if any(n.endswith(".cubin") for n in names) else "modules" if any(n.endswith(".so") for n in names) else None
        if kind is None:
            continue
        if folder not in unpacked:
            origin = "new"
        elif any(os.path.getmtime(os.path.join(path, n)) > since for n in names if not n.startswith("__grp__")):
            origin = "rewritten"
        else:
            origin = "precompiled"
        found[f"{kind} {origin}"].append(", ".join(n for n in names if n.endswith((".so", ".cubin"))))
    return found


def install(cache_dir: str) -> int:
    """On the GPU machine (bench/gpu.sh): unpack the carried kernels into `cache_dir` and say
    whether the keys they were compiled under match this machine's."""
    import tarfile

    start = time.perf_counter()
    kernels = unpack(ARCHIVE, cache_dir)
    with tarfile.open(ARCHIVE) as tar:
        folders = sorted({member.name.split("/")[0] for member in tar.getmembers()})
    with open(os.path.join(cache_dir, MARKER), "w") as file:
        json.dump(folders, file)
    assumed = _read_info()
    print(f"== precompiled Triton kernels: {kernels} kernels and {len(folders) - kernels} launcher / driver modules "
          f"unpacked into {cache_dir} in {time.perf_counter() - start:.1f} s (made {assumed.get('made', '?')}, "
          f"families {assumed.get('families', '?')})")
    try:
        from triton.runtime import driver

        here, device = key_facts(driver.active.get_current_target()), True  # (loads the cuda_utils module)
    except Exception as error:  # no device: the facts for sm_90
        print(f"  (no device target: {type(error).__name__}: {error}; facts for sm_90)")
        here, device = key_facts(), False
    for key in ("triton", "python", "triton_key", "backend", "env"):
        print(f"  {key:11s} precompiled {assumed.get(key, '?'):48s} here {here[key]}")
    differ = [key for key in MUST_MATCH if assumed.get(key) != here[key]]
    print("  keys: match (the kernels should load, not compile: see the report at the end of this log)" if not differ
          else f"  keys: DIFFER in {', '.join(differ)}: every kernel will compile here as before")
    found = _changed_since_install(cache_dir)
    utils = [entry for origin in ("precompiled", "new", "rewritten") for entry in found[f"modules {origin}"]
             if "cuda_utils" in entry and origin != "precompiled"]
    if device:
        print("  cuda_utils module: " + ("built here (the precompiled one did not load, or none was carried)" if utils
                                         else "the precompiled one loaded"))
    return 0


def report(cache_dir: str, log_path: str) -> int:
    """After the run (bench/gpu.sh): what the cache holds and what compiled anyway."""
    found = _changed_since_install(cache_dir)
    print("== Triton cache after the run: " + "; ".join(f"{key} {len(entries)}" for key, entries in found.items()))
    if found["modules rewritten"]:
        print(f"  precompiled launcher / driver modules rebuilt here (did not load): {len(found['modules rewritten'])}")
    if found["kernels new"]:
        names = {}
        for entry in found["kernels new"]:
            names[entry] = names.get(entry, 0) + 1
        print("  kernels compiled here: " + ", ".join(f"{name.removesuffix('.cubin')} x{number}"
                                                      for name, number in sorted(names.items(), key=lambda x: -x[1])))
    hits, compiled = {}, {}
    if os.path.exists(log_path):
        with open(log_path) as log:
            for line in log:
                parts = line.split()
                if len(parts) >= 3 and not line.startswith(" "):  # (indented: a compile's details)
                    table = hits if parts[0] == "hit" else compiled
                    seconds, number = table.get(parts[1], (0.0, 0))
                    table[parts[1]] = (seconds + float(parts[2]) / 1000, number + 1)
    total = sum(n for _, n in compiled.values())
    print(f"  in the pytest phases: {sum(n for _, n in hits.values())} cache hits, {total} compiles "
          f"({sum(s for s, _ in compiled.values()):.0f} s of CPU)" + (":" if compiled else ""))
    for name, (seconds, number) in sorted(compiled.items(), key=lambda item: -item[1][0]):
        print(f"    compiled {name} x{number}, {seconds:.0f} s")
    return 0


# ---- compile-only set-up (here, no GPU) ----


def _setup(cache_dir: str, tests: bool = False) -> None:
    """What a process needs before its launches: the cache, the stand-in driver, compile-only
    launches and autotuner benchmarks, and the op layer on the Triton kernels."""
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_STORE_BINARY_ONLY"] = "1"  # cubin + metadata (+ the TTIR source), not every IR
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, ROOT)
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    arch = _arch()
    shared_mem, sms = ARCHES[arch]
    target = GPUTarget("cuda", arch, 32)

    class Utils:
        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": shared_mem, "multiprocessor_count": sms, "max_num_regs": 65536,
                    "warpSize": 32}

    class CompileOnlyDriver:
        """What JITFunction.run asks the driver before it compiles: device, stream and target."""

        utils = Utils()

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

        def get_device_capability(self, device=None):
            return divmod(arch, 10)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            return _compile_only_bench

    driver.set_active(CompileOnlyDriver())
    real_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None and os.environ.get("FASTPROBE_PRECOMPILE_LAUNCHERS", "1") == "1":
            build_launcher(kernel)
        return kernel

    JITFunction.run = compile_only
    Autotuner.do_bench = property(
        lambda self: functools.partial(_compile_only_bench, kernel=getattr(getattr(self, "base_fn", None), "__name__", "?")))

    import fastprobe
    from fastprobe import backend

    try:
        import fastprobe.kernels  # noqa: F401  (an installed fastprobe)
    except ImportError:  # the source tree on sys.path: kernels/ is fastprobe.kernels once installed
        import importlib.util

        kernels = os.path.join(ROOT, "kernels")
        spec = importlib.util.spec_from_file_location("fastprobe.kernels", os.path.join(kernels, "__init__.py"),
                                                      submodule_search_locations=[kernels])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastprobe.kernels"] = module
        spec.loader.exec_module(module)
        fastprobe.kernels = module
    import importlib

    from fastprobe.kernels import attention
    from fastprobe.ops import _common, bridge

    # the device's pruning: its shared memory (with the module's own margin), not the 99 KB fallback
    attention._smem_of = lambda q: int(shared_mem * 0.85)
    attention._sm_count = lambda device_index: sms
    bridge._chunk_logits = lambda device: 1 << 28  # the fused-linear chunks of CUDA

    def triton_backend(device, dtype, op):
        return "triton" if dtype in backend.KERNEL_DTYPES else "reference"

    def zeros_output(shape, device, dtype=torch.float32, stride=None):  # finite outputs (new_output's signature)
        if stride is None:
            return torch.zeros(tuple(shape), dtype=dtype, device=device)
        return torch.empty_strided(tuple(shape), tuple(stride), dtype=dtype, device=device).zero_()

    def then_reference(triton_call, reference_call):
        def call(*args, **kwargs):
            triton_call(*args, **kwargs)
            return reference_call(*args, **kwargs)

        return call

    for name in ("attention", "dual_attention", "bridge", "concepts", "divergence"):
        module = importlib.import_module(f"fastprobe.ops.{name}")
        module.resolve = triton_backend
        if not tests and hasattr(module, "new_output"):
            module.new_output = zeros_output
        if tests:  # the reference fills the outputs, so a test goes on past its first comparison
            for table in vars(module).values():
                if isinstance(table, dict) and {"reference", "cpp", "triton"} <= set(table):
                    table["triton"] = then_reference(table["triton"], table["reference"])
    if not tests:
        _common.new_output = zeros_output


def _stub_libcuda(symbols) -> str:
    """A folder with a libcuda.so.1 that defines `symbols` (empty functions), to link a launcher
    against: the link then records libcuda.so.1 as needed, as it does on a machine with the
    driver, and the GPU machine's real libcuda.so.1 provides the functions when it loads."""
    import subprocess

    symbols = sorted(symbols)
    folder = os.path.join("/tmp/fastprobe-stub-libcuda", hashlib.sha256(" ".join(symbols).encode()).hexdigest()[:16])
    stub = os.path.join(folder, "libcuda.so.1")
    if not os.path.exists(stub):
        os.makedirs(folder, exist_ok=True)
        source = os.path.join(folder, f"stub.{os.getpid()}.c")
        with open(source, "w") as file:
            file.write("".join(f"void {name}(void) {{}}\n" for name in symbols))
        subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", f"{stub}.{os.getpid()}", source],
                       check=True)
        os.replace(f"{stub}.{os.getpid()}", stub)
    return folder


def _build_module(code: str, name: str) -> None:
    """Triton's compile_module_from_src without loading the module (it cannot load without a
    driver): the same source and key, so the GPU machine finds it in its cache."""
    import subprocess
    import sysconfig
    import tempfile

    from triton.backends.nvidia import driver as nvidia
    from triton.runtime.build import _build, platform_key
    from triton.runtime.cache import get_cache_manager

    key = hashlib.sha256((code + platform_key()).encode("utf-8")).hexdigest()
    cache = get_cache_manager(key)
    file_name = f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    if cache.get_file(file_name) is None:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, f"{name}.c")
            with open(path, "w") as file:
                file.write(code)
            symbols = ()
            for _ in range(2):  # the second link against a stub with the driver functions the first left undefined
                built = _build(name, path, folder, [nvidia.libdevice_dir, _stub_libcuda(symbols)], nvidia.include_dirs,
                               nvidia.libraries, [])
                undefined = subprocess.run(["nm", "-D", "--undefined-only", built], capture_output=True, text=True,
                                           check=True).stdout.split()
                symbols = {word for word in undefined if word.startswith("cu")}
            needed = subprocess.run(["readelf", "-d", built], capture_output=True, text=True, check=True).stdout
            if "libcuda.so.1" not in needed:
                raise RuntimeError(f"{name}: the build does not record libcuda.so.1 as needed")
            with open(built, "rb") as file:
                cache.put(file.read(), file_name, binary=True)
    log = os.environ.get("FASTPROBE_TRITON_LOG")
    if log:
        with open(log, "a") as file:
            file.write(f"module {name} 0 {_base32(key)}\n")


_LAUNCHERS = set()


def build_launcher(kernel) -> None:
    """The C launcher the GPU machine builds (gcc) when it first loads `kernel`: the source
    triton.backends.nvidia.driver.CudaLauncher makes, built here and stored under its key."""
    from triton.backends.nvidia import driver as nvidia

    src = kernel.src
    constants = src.constants if hasattr(src, "constants") else dict()
    arg_idx = lambda x: (src.fn.arg_names.index(x), ) if isinstance(x, str) else x  # noqa: E731
    constants = {arg_idx(idx): value for idx, value in constants.items()}
    signature = {idx: value for idx, value in src.signature.items()}
    code = nvidia.make_launcher(constants, signature, getattr(kernel.metadata, "tensordesc_meta", None))
    if code not in _LAUNCHERS:
        _LAUNCHERS.add(code)
        _build_module(code, "__triton_launcher")


def build_driver_module() -> None:
    """triton.backends.nvidia.driver's cuda_utils module (each fresh GPU machine builds it once)."""
    from pathlib import Path

    from triton.backends.nvidia import driver as nvidia

    _build_module(Path(os.path.join(nvidia.dirname, "driver.c")).read_text(), "cuda_utils")


def _compile_only_bench(kernel_call, quantiles=None, kernel="?", **kwargs):
    """The autotuner's benchmark: one call (a compile); a constant time, so the first config wins.
    A config that does not compile (out of shared memory, a ptxas error: the autotuner skips it)
    is written to the run's log, which main() counts."""
    try:
        kernel_call()
    except Exception as error:
        log = os.environ.get("FASTPROBE_TRITON_LOG")
        if log:
            with open(log, "a") as file:
                file.write(f"failed {kernel} {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}\n")
        raise
    return [1.0, 1.0, 1.0] if quantiles else 1.0


class _FakeProducts:
    """Matrix products as zeros of the right shape: the fused-linear loss's products at N = 8192,
    H = 4096, V = 128256 would take hours here, and its kernels need only the chunks' shapes."""

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        self.saved = (F.linear, torch.Tensor.__matmul__, torch.Tensor.addmm_)

        def linear(x, weight, bias=None):
            return torch.zeros(*x.shape[:-1], weight.shape[0], dtype=x.dtype)

        def matmul(a, b):
            return torch.zeros(*a.shape[:-1], b.shape[-1], dtype=torch.promote_types(a.dtype, b.dtype))

        F.linear, torch.Tensor.__matmul__ = linear, matmul
        torch.Tensor.addmm_ = lambda self, *args, **kwargs: self
        return self

    def __exit__(self, *exc):
        import torch
        import torch.nn.functional as F

        F.linear, torch.Tensor.__matmul__, torch.Tensor.addmm_ = self.saved


# ---- the benchmarks' launches ----


def _cases(families) -> list:
    cases = []
    if "attention" in families:
        cases += [f"attention {group} L={length}" for group in ("causal", "sink-window", "all-stats", "head-mask")
                  for length in (1024, 4096, 16384)]
        cases += ["attention decode", "attention host_overhead", "attention latent", "attention blocks",
                  "attention packed", "attention narrow", "attention float16", "attention stats-sweep"]
    if "dual_attention" in families:
        cases += ["dual_attention"]
    if "bridge" in families:
        cases += ["bridge logits", "bridge fused-linear"]
    if "concepts" in families:
        cases += ["concepts"]
    if "divergence" in families:
        cases += ["divergence"]
    return cases


def _launch_case(name: str) -> None:
    import torch

    import fastprobe as fp

    cpu, bf16 = "cpu", torch.bfloat16
    family, _, rest = name.partition(" ")
    if family == "attention":
        from bench import test_attention_bench as bench

        if " L=" in rest:
            group, length = rest.split(" L=")
            q, k, v = bench.make_qkv(cpu, 1, bench.GPU_HEADS, int(length), bench.GPU_HEAD_DIM, bf16)
            calls = {"causal": [bench.fastprobe_causal], "sink-window": [bench.fastprobe_sink_window],
                     "all-stats": [bench.fastprobe_all_stats, bench.fastprobe_all_stats_runs],
                     "head-mask": [bench.fastprobe_masked(f) for f in (0.0, 0.25, 0.5)]}[group]
            for call in calls:
                call(q, k, v)
        elif rest == "decode":
            q, k, v = bench.make_qkv(cpu, 1, bench.GPU_HEADS, bench.DECODE_KEYS, bench.GPU_HEAD_DIM, bf16, num_queries=1)
            bench.fastprobe_causal(q, k, v)
            bench.fastprobe_sink_window(q, k, v)
        elif rest == "stats-sweep":  # bench/sweep_attention_stats.py's variants (autotuned: every kept config)
            from bench import sweep_attention_stats as sweep

            q, k, v = bench.make_qkv(cpu, 1, sweep.HEADS, 4096, sweep.HEAD_DIM, bf16)
            for options in sweep.variants(4096, cpu).values():
                fp.sink_attention(q, k, v, **options)
            *_, launches = sweep.narrow_launches(cpu, bf16, sweep.NARROW["length"])  # each config forced
            for call, configs, _ in launches.values():
                for cfg in configs:
                    sweep.forced(call, cfg)
        elif rest == "host_overhead":  # bench/host_overhead.py's calls (the benchmarks' and a few more)
            from bench import host_overhead

            for label, call in host_overhead.cases(cpu).items():
                if not label.startswith("sdpa"):
                    call()
        else:  # latent, narrow, blocks, packed, float16 (the 16-bit families with a CUDA case)
            cases, make_inputs, impls, _ = bench.VARIANTS[rest]
            inputs, _ = make_inputs(cpu, cases["cuda"])
            for impl, call in impls.items():
                if impl.startswith("fastprobe"):
                    call(*inputs)
    elif family == "dual_attention":
        from bench import test_dual_attention_bench as bench

        inputs = bench.make_inputs(cpu, **bench.CASES["cuda"])
        bench.fastprobe_dual(*inputs)
        bench.fastprobe_single(*inputs)
    elif family == "bridge":  # the benchmark's steps without their backward (plain torch: no kernel)
        from bench import test_bridge_bench as bench

        case = bench.CASES["cuda"]
        with torch.enable_grad():
            if rest == "logits":
                student, teacher = bench.make_logits(cpu, **case)
                student.requires_grad_()
                for beta in (bench.BETA, 0.0):  # fastprobe_step, fastprobe_forward_kl_step
                    fp.bridge_loss(student, teacher, beta=beta)
                fp.bridge_loss(student, teacher, beta=bench.BETA, direction="reverse")  # fastprobe_reverse_step
            else:
                with _FakeProducts():
                    hidden, weight, teacher_hidden, teacher_weight = bench.make_hidden(cpu, **case)
                    hidden.requires_grad_(), weight.requires_grad_()
                    for beta in (bench.BETA, 0.0):  # fused_linear_step, fastprobe_fused_linear_forward_kl_step
                        fp.FusedLinearBridgeLoss(beta=beta)(hidden, weight, teacher_hidden, teacher_weight)
    elif family == "concepts":
        from bench import test_concepts_bench as bench

        for cases in (bench.CASES, bench.STEP_CASES):  # many rows, and one (N = 1 is a constant to Triton)
            bench.fastprobe_call(*bench.make_inputs(cpu, **cases["cuda"]))
        for call in bench.GPU_IMPLS.values():  # (the statistics in a second launch)
            call(*bench.make_inputs(cpu, **bench.CASES["cuda"]))
    elif family == "divergence":
        from bench import test_divergence_bench as bench
        from fastprobe.kernels import divergence as kernels

        fp.draft_divergence(*bench.make_inputs(cpu, **bench.STEP_CASES["cuda"]))  # one token (N = 1: another key)
        drafts, target = bench.make_inputs(cpu, **bench.CASES["cuda"])
        fp.draft_divergence(drafts, target)
        K, N, V = drafts.shape  # bench/sweep_divergence.py: every config
        weights, stats, lse = torch.full((K,), 1.0 / K), torch.empty(5 + K, N), torch.empty(K + 1, N, dtype=torch.float64)
        for config in kernels._prune_configs(kernels._AUTOTUNE_CONFIGS, {}, K_PAD=kernels.next_pow2(K)):
            kernels.draft_divergence(drafts, target, weights, 1.0, stats, lse, config=config)
    else:
        raise ValueError(f"unknown case {name!r}")


def _run_case(name: str, work: str, used_log: str) -> int:
    """One case, in a process of its own (--case): its launches, compiled into `work`."""
    os.environ["FASTPROBE_TRITON_LOG"] = used_log
    _setup(work)
    _add_listener(used_log)
    import torch

    def zeros(*size, generator=None, **kwargs):  # the values never matter; zeros cost less than draws
        return torch.zeros(*size, **kwargs)

    import resource

    def compiles() -> int:  # kernels this process compiled or found in the cache so far
        return _KERNELS_SEEN[0]

    torch.randn = zeros
    note, before = "", compiles()
    try:
        with torch.no_grad():
            _launch_case(name)
    except Exception as error:  # e.g. a check after a launch that did not run; its compiles are done
        what = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        # (an error before the first launch compiled nothing: the case is broken, not done)
        note = f"; after its launches: {what}" if compiles() > before else f"; FAILED before any launch: {what}"
    print(f"peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB, "
          f"{compiles() - before} kernels{note}")
    return 0


def _run_cases(cases, work: str, used_log: str, jobs: int) -> int:
    """Each case in its own process (a case that runs out of memory fails alone), `jobs` at a
    time, and the cases with inputs of gigabytes one at a time; the number of cases that failed
    (their process's exit status, or an error before their first launch: nothing compiled)."""
    import subprocess
    import threading
    from concurrent.futures import ThreadPoolExecutor

    big = threading.Semaphore(1)

    def run(name):
        heavy = name.split()[0] in ("bridge", "concepts", "divergence") or name == "attention decode"
        with big if heavy else _Nothing():
            start = time.perf_counter()
            child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--case", name, "--work", work,
                                      "--used-log", used_log], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, cwd=ROOT)
            output = child.communicate()[0]
            code = child.returncode
        note = output.strip().splitlines()[-1] if output.strip() else ""
        failed = f"  FAILED (exit {code}): {note}" if code else (f"  ({note})" if note else "")
        return f"{time.perf_counter() - start:7.1f} s  {name}{failed}", bool(code) or "FAILED before any launch" in note

    failures = 0
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        for line, failed in pool.map(run, cases):
            print(line, flush=True)
            failures += failed
    return failures


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run_tests(families, work: str, used_log: str, jobs: int) -> int:
    """The GPU tests of these families in compile-only mode (pytest -m gpu, FASTPROBE_AUTOTUNE=0)."""
    import subprocess

    files = [TEST_FILES.get(family, f"tests/test_{family}.py") for family in families]
    files = [file for file in files if os.path.exists(os.path.join(ROOT, file))]
    env = dict(os.environ, FASTPROBE_PRECOMPILE="tests", FASTPROBE_AUTOTUNE="0", TRITON_CACHE_DIR=work,
               FASTPROBE_TRITON_LOG=used_log, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    parallel = ["-n", str(jobs)] if jobs > 1 else []
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.precompile_triton",
               "-m", "gpu", *parallel, *files]
    print("$ " + " ".join(command[1:]), flush=True)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = done.stdout.strip().splitlines()[-25:]
    print("\n".join("  " + line for line in tail), flush=True)
    return done.returncode


def print_resource_usage(work: str, folders) -> None:
    """Per kernel: how many compiled variants, their registers per thread (max 255 on sm_80-90),
    and each variant that spills (cuobjdump's STACK or LOCAL above 0 bytes), with its warps,
    stages and shared memory: the register model in kernels/attention.py was fitted on sm_90."""
    import subprocess

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        print(f"(no {cuobjdump}: registers and spills not read)")
        return
    kernels, spills = {}, []
    for folder in sorted(folders):
        for name in os.listdir(os.path.join(work, folder)):
            if not name.endswith(".cubin"):
                continue
            path = os.path.join(work, folder, name)
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
            fields = {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
            with open(path[: -len(".cubin")] + ".json") as file:
                meta = json.load(file)
            kernel = name[: -len(".cubin")]
            kernels.setdefault(kernel, []).append(fields.get("REG", 0))
            if fields.get("STACK", 0) or fields.get("LOCAL", 0):
                spills.append(f"  {kernel}: {fields.get('STACK', 0)} B stack, {fields.get('LOCAL', 0)} B local "
                              f"({meta.get('num_warps')} warps, {meta.get('num_stages')} stages, "
                              f"{meta.get('shared', 0)} B shared; {folder})")
    print("registers per thread (variants: min-max):")
    for kernel, regs in sorted(kernels.items()):
        print(f"  {kernel:28s} {len(regs):3d}: {min(regs)}-{max(regs)}")
    print(f"{len(spills)} of {sum(map(len, kernels.values()))} variants use a stack frame (register spills)" + (":" if spills else ""))
    for line in spills:
        print(line)


def main(argv) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES), help=f"of {', '.join(FAMILIES)}")
    parser.add_argument("--tests", action="store_true", help="also the GPU tests' launches (-m gpu)")
    parser.add_argument("--only", default="", help="the benchmark cases whose name holds this (e.g. 'causal L=1024')")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", help=f"the uncompressed cache compiled into (default {WORK}, -smNN for another --arch)")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(ARCHES),
                        help="compute capability to compile for (not 90: a check only, no archive)")
    parser.add_argument("--any-version", action="store_true", help="run under another Python / Triton than the "
                        "GPU machine's (the keys will not match there)")
    parser.add_argument("--install", metavar="CACHE_DIR", help="(bench/gpu.sh) unpack the archive there, compare keys")
    parser.add_argument("--report", nargs=2, metavar=("CACHE_DIR", "LOG"), help="(bench/gpu.sh) what compiled anyway")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # (one case, in a child process)
    parser.add_argument("--used-log", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        return _run_case(args.case, args.work, args.used_log)
    if args.install:
        return install(args.install)
    if args.report:
        return report(*args.report)
    unknown = [family for family in args.families if family not in FAMILIES]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(FAMILIES)}")
    cases = [case for case in _cases(args.families) if args.only in case]
    if not cases and not args.tests:  # (an archive of nothing would replace the one there)
        parser.error(f"no case of {', '.join(args.families)} holds --only {args.only!r}")

    import triton

    archive = args.arch == 90  # (the GPU machine's kernels; another arch is a compile check)
    if archive and (sys.version_info[:2] != (3, 12) or triton.__version__ != "3.6.0") and not args.any_version:
        print(f"the GPU machine has Python 3.12 and triton 3.6.0, this is Python {sys.version.split()[0]} with triton "
              f"{triton.__version__}: the keys would not match there (--any-version to go on anyway)", file=sys.stderr)
        return 2
    from triton.backends.compiler import GPUTarget

    work = os.path.abspath(args.work or (WORK if archive else f"{WORK}-sm{args.arch}"))
    os.environ["TRITON_CACHE_DIR"] = work
    os.environ[ARCH_VARIABLE] = str(args.arch)
    facts = key_facts(GPUTarget("cuda", args.arch, 32))
    for key, value in facts.items():
        print(f"{key:11s} {value}")
    if archive and not os.path.isdir(work) and os.path.exists(ARCHIVE):
        print(f"seeded {work} with {unpack(ARCHIVE, work)} kernels from {ARCHIVE}")
    os.makedirs(work, exist_ok=True)
    relink(work)
    used_log = os.path.join(work, f"used.{os.getpid()}.log")
    os.environ["FASTPROBE_TRITON_LOG"] = used_log  # (what this run used: the archive's contents)
    if os.environ.get("FASTPROBE_PRECOMPILE_LAUNCHERS", "1") == "1":
        build_driver_module()
    start = time.perf_counter()
    failures = _run_cases(cases, work, used_log, args.jobs)
    if args.tests:
        _run_tests(args.families, work, used_log, args.jobs)
    compiled, compile_ms, used, failed = 0, 0.0, set(), collections.Counter()
    if os.path.exists(used_log):
        with open(used_log) as log:
            for line in log:
                parts = line.split()
                if line.startswith(" "):  # (a compile's details)
                    continue
                if parts[0] == "failed":  # a config the autotuner skipped
                    failed[" ".join(parts[1:])] += 1
                    continue
                if parts[0] == "compiled":
                    compiled, compile_ms = compiled + 1, compile_ms + float(parts[2])
                used.add(parts[-1])
        os.remove(used_log)
    used = [folder for folder in used if os.path.isdir(os.path.join(work, folder))]
    count_kernels = sum(any(name.endswith(".cubin") for name in os.listdir(os.path.join(work, folder))) for folder in used)
    print_resource_usage(work, used)
    print(f"{sum(failed.values())} autotuner configs did not compile (skipped)" + (":" if failed else ""))
    for what, count in sorted(failed.items()):
        print(f"  {count} x {what}")
    if not archive:
        print(f"{count_kernels} kernels for sm_{args.arch} ({compiled} compiled now, {compile_ms / 1000:.0f} s of "
              f"compiling; the rest from {work}) in {time.perf_counter() - start:.0f} s; no archive (not sm_90)")
        return _failed_cases(failures)
    size = pack(work, used, ARCHIVE)
    with open(INFO, "w") as info:
        for key, value in facts.items():
            info.write(f"{key}: {value}\n")
        info.write(f"families: {' '.join(args.families)}{' +tests' if args.tests else ''}\n"
                   f"kernels: {count_kernels}\n"
                   f"modules: {len(used) - count_kernels}\n"
                   f"made: {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, {time.perf_counter() - start:.0f} s\n")
    print(f"{count_kernels} kernels and {len(used) - count_kernels} launcher / driver modules ({compiled} kernels compiled now, {compile_ms / 1000:.0f} s of compiling; the rest from the work "
          f"cache) in {time.perf_counter() - start:.0f} s; "
          f"{ARCHIVE}: {size / 2**20:.1f} MiB", flush=True)
    return _failed_cases(failures)


def _failed_cases(failures: int) -> int:
    """main's exit status: 1 where a case failed (its kernels then compile on the GPU machine)."""
    if failures:
        print(f"{failures} case(s) FAILED (listed above): their kernels may be missing from the cache", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
