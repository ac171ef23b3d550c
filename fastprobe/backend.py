"""Which implementation runs an operation: the C++ kernels (CPU), the Triton
kernels (CUDA, or CPU through the Triton interpreter) or the PyTorch reference.

"auto" (the default) picks by device: CPU tensors -> C++, CUDA tensors ->
Triton, anything else or float64 -> reference. `set_backend()` or the
environment variable FASTPROBE_BACKEND forces one; a forced backend that cannot
run the call raises instead of falling back.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import os
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "cpp", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_forced: Optional[str] = None  # set_backend's, for the whole process


def _environment_variable(name: str, default: str) -> Callable[[], str]:
    """A function that reads os.environ.get(name, default) now, every call (monkeypatch.setenv and
    os.environ[name] = ... take effect at once), but without os.environ.get's KeyError for an unset
    name, ~1-5 us per read and most of resolve()'s time on a decoding step: one lookup in the dict
    that os.environ's own setters keep current. os.environ.get itself if os.environ was replaced
    or has no such dict (not CPython)."""
    environ = os.environ
    data, encode, decode = (getattr(environ, attribute, None) for attribute in ("_data", "encodekey", "decodevalue"))
    if not isinstance(data, dict) or encode is None or decode is None:
        return lambda: os.environ.get(name, default)
    key = encode(name)

    def read() -> str:
        if os.environ is not environ:
            return os.environ.get(name, default)
        value = data.get(key)
        return default if value is None else decode(value)

    return read


_backend_variable = _environment_variable("FASTPROBE_BACKEND", "auto")
_interpret_variable = _environment_variable("TRITON_INTERPRET", "0")
_autotune_variable = _environment_variable("FASTPROBE_AUTOTUNE", "1")
_scoped: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastprobe_backend", default=None)


def _check_name(name: str, source: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a str, one of {', '.join(BACKENDS)}; got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every operation, in every thread ("auto": choose by device, whatever
    FASTPROBE_BACKEND says; None: follow FASTPROBE_BACKEND again). A use_backend block takes
    precedence in its own thread."""
    global _forced
    _forced = None if name is None else _check_name(name, "backend")


def get_backend() -> str:
    """The backend in force: the innermost use_backend()'s in this thread, else set_backend()'s,
    else FASTPROBE_BACKEND's, else "auto"."""
    scoped = _scoped.get()
    if scoped is not None:
        return scoped
    if _forced is not None:
        return _forced
    return _check_name(_backend_variable(), "FASTPROBE_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: force a backend inside the block, for this thread (or asyncio task) only,
    where set_backend() is process-wide. (A backward that autograd runs on another thread, as
    for CUDA tensors, uses the backend its forward saw.)"""
    token = _scoped.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _scoped.reset(token)


@functools.lru_cache(maxsize=None)
def _cpp_import() -> tuple[bool, str]:
    """(available, why not): whether the compiled CPU extension fastprobe._C imports (looked up
    once: resolve() runs on every call of every op)."""
    try:
        importlib.import_module(f"{__package__}._C")
    except ImportError as error:  # built without a compiler, or a broken install
        return False, f"fastprobe._C did not import ({error})"
    return True, ""


def cpp_status() -> tuple[bool, str]:
    """(available, description): whether fastprobe._C imports, and what it runs now (described
    on each call: the lane count and the bfloat16 pair scores can be switched at run time)."""
    ok, why = _cpp_import()
    if not ok:
        return False, why
    from . import _C

    threads = "with OpenMP" if _C.has_openmp() else "without OpenMP"
    float16 = ", F16C float16 conversion" if _C.has_f16c() else ""
    lanes = f", {_C.attention_lanes()}-lane attention"  # 16 with the AVX-512 code, else 8
    if _C.attention_bf16_pairs():  # bfloat16 Q K^T by VDPBF16PS (AVX512-BF16)
        lanes += " (bfloat16 scores by AVX512-BF16)"
    return True, f"compiled extension fastprobe._C {threads}; {_C.simd_clone()} code{lanes}{float16}"


@functools.lru_cache(maxsize=None)
def _warn_no_cpp() -> None:
    """Once per process: "auto" runs CPU tensors through the PyTorch reference (tens of times
    slower) because the C++ extension did not import, e.g. fastprobe imported from a source
    checkout that was never built (python run in the checkout's root shadows an installed copy)."""
    import sys
    import warnings

    # pointed at the first frame outside fastprobe and torch: the user's call of the op (a patched
    # model's: its attention call), however many frames of ours and of torch's custom-op dispatch
    # lie between (stacklevel 2 is resolve, this function's caller)
    internal = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    warnings.warn(
        f"fastprobe: CPU tensors run the slow PyTorch reference: {cpp_status()[1]}. Build and install the "
        "package (pip install -e . in the checkout), or run outside the checkout's root so that the "
        "installed copy is imported; fastprobe.set_backend('reference') silences this.",
        RuntimeWarning, stacklevel=level)


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through the interpreter."""
    return _interpret_variable() not in ("", "0")


def autotune_enabled() -> bool:
    """FASTPROBE_AUTOTUNE=0 makes the Triton launchers use their first config that survives
    pruning instead of tuning (GPU test runs, where tuning every shape would dominate)."""
    return _autotune_variable() != "0"


def triton_status(device_type: str = "cuda") -> tuple[bool, str]:
    """(available, reason): whether Triton kernels can run on tensors of this device type."""
    if not _triton_installed():
        return False, "triton is not installed"
    if device_type == "cuda":
        if interpreter_enabled():
            return False, "TRITON_INTERPRET=1 is set, so Triton runs on CPU tensors only"
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    if device_type == "cpu":
        if not interpreter_enabled():
            return False, "CPU tensors need the Triton interpreter (set TRITON_INTERPRET=1 before importing triton)"
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    return False, f"no Triton path for {device_type} tensors"


_DEVICE_TYPES: dict = {}  # torch.device -> device.type (which makes a new string per read, ~0.2 us)


def _device_type(device: torch.device) -> str:
    """device.type, looked up once per device (resolve runs on every call of every op)."""
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


def resolve(device: torch.device, dtype: torch.dtype, op: str) -> str:
    """The backend that runs `op` on tensors of this device and dtype: "reference",
    "cpp" or "triton". Raises RuntimeError when a forced backend cannot run it."""
    choice = get_backend()
    if choice == "reference":
        return "reference"
    if choice == "auto":
        if dtype not in KERNEL_DTYPES:
            return "reference"
        device_type = _device_type(device)
        if device_type == "cpu":
            if _cpp_import()[0]:
                return "cpp"
            _warn_no_cpp()
        if device_type == "cuda" and _triton_installed() and not interpreter_enabled():
            return "triton"
        return "reference"
    if dtype not in KERNEL_DTYPES:
        raise RuntimeError(
            f"{op}: backend {choice!r} supports float32, bfloat16 and float16 inputs, got {dtype}; "
            "use the 'reference' backend for other dtypes"
        )
    if choice == "cpp":
        ok, why = _cpp_import()
        if device.type != "cpu":
            raise RuntimeError(f"{op}: backend 'cpp' runs on CPU tensors, got {device.type} tensors")
        if not ok:
            raise RuntimeError(f"{op}: backend 'cpp' is not available: {why}")
        return "cpp"
    ok, why = triton_status(device.type)
    if not ok:
        raise RuntimeError(f"{op}: backend 'triton' cannot run on {device.type} tensors: {why}")
    return "triton"
