"""Helpers shared by the operation modules: argument checks with clear messages,
output allocation (poisoned with NaN under test), and calls into the C++ kernels."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import numbers
import os
import sys
import typing
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._subclasses.fake_tensor import FakeTensor

# Tests set this so every output starts as NaN (or -1 for integers): an element a
# kernel forgot to write then fails the comparison instead of passing as zero.
POISON_OUTPUTS = os.environ.get("FASTPROBE_POISON", "0") not in ("", "0")

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def new_output(shape: Sequence[int], device: torch.device, dtype: torch.dtype = torch.float32,
               stride: Optional[Sequence[int]] = None) -> torch.Tensor:
    """An uninitialised output of a shape of one or more dimensions (poisoned under test); stride: a dense
    layout other than the contiguous one (e.g. the [B, Hq, Lq, Dv] view of a [B, Lq, Hq, Dv] buffer)."""
    if stride is not None:
        output = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    else:  # (sizes as separate arguments: ~0.3 us less per call than one tuple, a decoding step's three)
        output = torch.empty(*shape, dtype=dtype, device=device)
    return _poisoned(output)


def new_output_like(output: torch.Tensor) -> torch.Tensor:
    """A fresh output of `output`'s shape, strides, dtype and device (poisoned under test): ~0.2 us
    less than new_output, which parses them again."""
    return _poisoned(torch.empty_like(output))


def _poisoned(output: torch.Tensor) -> torch.Tensor:
    """output, filled with NaN (floating) or -1 under test (FASTPROBE_POISON): an element a kernel
    leaves unwritten then fails the comparison."""
    if POISON_OUTPUTS:
        output.fill_(float("nan") if output.dtype.is_floating_point else -1)
    return output


def is_compiling() -> bool:
    """True while torch.compile traces: data-dependent checks (host syncs) are skipped then."""
    return torch.compiler.is_compiling()


def skips_host_checks(*tensors: torch.Tensor) -> bool:
    """True where data-dependent checks (host syncs) cannot run: while torch.compile traces, under
    a functorch transform (vmap has no .item()), and when one of `tensors` (those the check
    reads) is a meta or fake tensor (no data: the call only propagates shapes); the ops then give
    NaN where they refuse."""
    return is_compiling() or torch._C._are_functorch_transforms_active() or any(
        t.is_meta or (type(t) is not torch.Tensor and isinstance(t, FakeTensor)) for t in tensors)


def requires_grad(tensor: torch.Tensor) -> bool:
    """tensor.requires_grad, seen through torch.func.vmap's wrappers (a batched tensor says False
    whatever the tensor it batches says). While torch.compile traces, which cannot unwrap them,
    True under vmap."""
    if is_compiling():
        return tensor.requires_grad or torch._C._are_functorch_transforms_active()
    while torch._C._functorch.is_batchedtensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor.requires_grad


def batched_gradient(*gradients: Optional[torch.Tensor]) -> bool:
    """In a backward: whether an incoming gradient holds a batch of them (torch.autograd.grad with
    is_grads_batched=True, torch.autograd.functional.jacobian with vectorize=True: torch's own vmap,
    whose tensors have no storage for a kernel to read, and no rule for out= or in-place ops with
    an unbatched result)."""
    return not is_compiling() and any(gradient is not None and torch._C._functorch.is_legacy_batchedtensor(gradient)
                                      for gradient in gradients)


def bool_as_uint8(mask: torch.Tensor) -> torch.Tensor:
    """A contiguous bool tensor as uint8 (what the kernels read): the same bytes, no copy, in eager
    mode. Under torch.compile a converting copy instead: torch 2.4's inductor cannot lower
    view(dtype) from bool ("torch.bool is not supported by torch.iinfo"), and inductor fuses
    the copy anyway. Under a functorch transform too: torch 2.4's vmap has no batching rule for
    view(dtype)."""
    return mask.to(torch.uint8) if skips_host_checks() else mask.view(torch.uint8)


# The dtypes the ops compute on (SPEC): the kernels' three, and float64 for the reference. Other
# floating dtypes (float8 variants) are refused rather than run through the reference.
INPUT_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16, torch.float64))


def check_dtype(tensor: torch.Tensor, name: str) -> None:
    """A TypeError naming `name` (e.g. "q", or "draft_divergence: draft" in an op's body) unless
    tensor is float32, bfloat16, float16 or float64 (INPUT_DTYPES)."""
    if tensor.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name} must be a float32, bfloat16, float16 or float64 tensor, got {tensor.dtype}")


def check_tensor(value, name: str, ndim: int, layout: str) -> torch.Tensor:
    """A tensor of one of INPUT_DTYPES with `ndim` dimensions, or a TypeError/ValueError naming `name`."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    if type(value) is not torch.Tensor and not is_compiling():  # (a subclass: a Parameter, a DTensor, ...)
        refuse_dtensor(value, name)
    if value.dtype not in INPUT_DTYPES:  # (the test inline: q, k and v of every decoding step's layer pass here)
        check_dtype(value, name)
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(value.shape)}")
    return dense(value, name)


def dense(value: torch.Tensor, name: str) -> torch.Tensor:
    """value as the kernels read it: strided (a sparse or mkldnn tensor is a TypeError naming
    `name`), with a negative view's sign applied (x.conj().imag of a complex tensor is a view whose
    storage holds -x: its data pointer would hand the kernels the other sign)."""
    if value.layout is not torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    if is_compiling():  # dynamo cannot trace is_neg (and torch.compile drops the bit of its inputs:
        return value    # t * 1 of a negative view gives -t under torch 2.13, outside fastprobe)
    return value.resolve_neg() if value.is_neg() else value


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype torch.autocast gives its lower-precision ops (SDPA among them) on this device's
    type, or None when autocast is off there."""
    if not _any_autocast():  # (the common case, without reading device.type: ~0.3 us a call saved)
        return None
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


def autocast_cast(tensors: tuple, device: torch.device) -> tuple:
    """tensors as SDPA takes them under torch.autocast: float32, bfloat16 and float16 cast to
    autocast's dtype on `device`'s type, float64 left alone; unchanged when autocast is off."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(t if t.dtype == dtype or t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def without_autocast(kernel: Callable) -> Callable:
    """A reference kernel, run with torch.autocast's casts off: it stands in for a fused kernel,
    which computes in the dtypes it is handed (the public functions cast inputs where autocast
    would: attention's q, k and v, as SDPA) and accumulates in float32. Under the caller's
    autocast its einsum and matrix products ran in bfloat16 (draft_divergence's jsd off by ~1e-3,
    attention's output by an ulp), and an eager call's bits differed from a compiled call's."""

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        if not _any_autocast():  # (the common case: no guard to enter)
            return kernel(*args, **kwargs)
        with torch._C._DisableAutocast():
            return kernel(*args, **kwargs)

    return run


def check_same_device(reference: torch.Tensor, reference_name: str, other: torch.Tensor, name: str) -> None:
    if other.device != reference.device:
        raise ValueError(f"{name} is on {other.device} but {reference_name} is on {reference.device}; move them to one device")


def lse_parts(logits: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """[2, ...]: each row's (last dimension's) largest logit M and ln S, S = sum_v exp((x_v - M) / T),
    so lse = M / T + ln S with ln S kept apart (a float64 lse holds it only to |M / T| 2^-53); a row
    of -inf: (-inf, -inf). The reference backends' form of the parts the kernels keep."""
    row_max = logits.amax(-1)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return torch.stack([row_max, torch.logsumexp((logits - shift[..., None]) * inv_temperature, dim=-1)])


LOCAL_TENSOR_HINT = "pass .full_tensor() (the whole tensor) or .to_local() (this rank's part)"
# where DTensor lives: torch.distributed.tensor from torch 2.5 (which keeps torch.distributed._tensor as
# an alias that imports it), torch.distributed._tensor on 2.4 (whose torch.distributed.tensor has none)
_DTENSOR_MODULE = "torch.distributed.tensor" if torch.__version__ >= (2, 5) else "torch.distributed._tensor"


def refuse_dtensor(value, name: str, op: Optional[str] = None, hint: str = LOCAL_TENSOR_HINT) -> None:
    """A TypeError naming `name` (and `op`) for a DTensor (torch.distributed's sharded or
    replicated tensor): the kernels and the chunked products take local tensors, where torch's own
    error ("got mixed torch.Tensor and DTensor", raised in the dispatcher) named neither the
    argument nor a way out, `hint`. (No DTensor exists before its module, _DTENSOR_MODULE, is imported.)"""
    dtensor = getattr(sys.modules.get(_DTENSOR_MODULE), "DTensor", None)
    if dtensor is not None and isinstance(value, dtensor):
        where = f"{op}: " if op else ""
        raise TypeError(f"{where}{name} is a DTensor (placements {tuple(value.placements)}); fastprobe's ops take "
                        f"local tensors: {hint}")


# The kernels compute in float32, so a scalar argument must be a float32 number; a positive one
# (a scale, a softcap, eps) at least float32's smallest normal, so that it and its inverse are
# finite and nonzero there. (Comparisons only: torch.compile traces them on a dynamic float.)
FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny


def check_float32_range(value: float, name: str, positive: bool) -> float:
    """value (a float) if float32 holds it (positive: in [tiny, max]), else a ValueError naming `name`."""
    if positive and not FLOAT32_TINY <= value <= FLOAT32_MAX:
        raise ValueError(f"{name} must be a positive number in float32's range [1.2e-38, 3.4e38], got {value}")
    if not -FLOAT32_MAX <= value <= FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite number in float32's range (|{name}| <= 3.4e38), got {value}")
    return value


def check_op_inv_temperature(op: str, inv_temperature: float) -> None:
    """In an op's body (reachable directly, past the public checks): the kernels take 1 / T in
    float32, and every backend refuses what one does (the reference would run on anything)."""
    if not FLOAT32_TINY <= inv_temperature <= FLOAT32_MAX:
        raise ValueError(f"{op}: inv_temperature must be a positive number in float32's range, got {inv_temperature}")


# Temperatures the kernels take: a log-softmax's shift lse * T = max(x) + T log(sum ...) must stay
# finite in float32 (T ~ 1e38 overflows it: NaN gradients), and so must 1 / T.
TEMPERATURE_RANGE = (1e-30, 1e30)


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    value = float(temperature)
    if not TEMPERATURE_RANGE[0] <= value <= TEMPERATURE_RANGE[1]:
        raise ValueError(f"temperature must be a number in [1e-30, 1e30], got {temperature}")
    return value


def on_device(tensor: torch.Tensor):
    """Context that makes tensor's CUDA device current for a Triton launch (no-op on CPU). (By
    index: torch.cuda.device(torch.device) resolves the index through ~1 us of Python checks, an
    int through ~0.2 us; a CUDA tensor's get_device() is its device's index.)"""
    return torch.cuda.device(tensor.get_device()) if tensor.is_cuda else contextlib.nullcontext()


def address(tensor: Optional[torch.Tensor]) -> int:
    """A C++ kernel's pointer argument: the tensor's data_ptr(), 0 for none."""
    return 0 if tensor is None else tensor.data_ptr()


@functools.lru_cache(maxsize=None)
def cpp():
    """The compiled CPU extension (imported on first use, then kept: a decoding step calls this
    per layer, and an import statement costs ~0.5 us even when the module is loaded)."""
    from .. import _C

    return _C


def first_bad_index(bad: torch.Tensor) -> Optional[tuple]:
    """Index of the first True element of a small boolean tensor, or None (one host sync)."""
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in bad.nonzero()[0])


def output_dtype(*inputs: Optional[torch.Tensor]) -> torch.dtype:
    """Statistics are float32, or float64 when any input (None: absent) is float64 (the reference
    runs; inputs may mix dtypes)."""
    return torch.float64 if any(x is not None and x.dtype == torch.float64 for x in inputs) else torch.float32


def backend_dtype(first: torch.Tensor, *others: Optional[torch.Tensor]) -> torch.dtype:
    """The one dtype backend selection goes by for inputs that may mix dtypes: float64 when any is
    (only the reference takes it), else the first's (the kernels read each in its own dtype)."""
    return torch.float64 if output_dtype(first, *others) == torch.float64 else first.dtype


def check_finite_lse(lse: torch.Tensor, describe: Callable[..., str]) -> None:
    """Raise a ValueError if a kernel reported a non-finite log-sum-exp for some row: the
    row is all -inf or holds NaN or +inf. `describe(*index)` names the row at the first bad
    index of `lse` (e.g. "logits[3]"). One host sync; skip it under torch.compile."""
    # a finite sum means every row's lse is finite (one reduction instead of isfinite, not, any);
    # a sum that overflowed alone (finite rows ~1e38) is looked at row by row
    if math.isfinite(lse.sum().item()):
        return
    bad = first_bad_index(~torch.isfinite(lse))
    if bad is None:
        return
    raise ValueError(
        f"{describe(*bad)} has no finite log-sum-exp: the row is all -inf (no token left unmasked) "
        "or contains NaN or +inf"
    )


INT64_MAX = 2**63 - 1  # what the kernels' integer arguments hold


def nan_where_not_finite(values: torch.Tensor, row_finite: torch.Tensor) -> torch.Tensor:
    """values with NaN in the rows whose lse is not finite (row_finite False, broadcast against
    values): under torch.compile, where the check that refuses such rows (a host sync) is
    skipped, they give NaN in every backend rather than whatever each kernel's guards make."""
    return torch.where(row_finite, values, torch.full_like(values, float("nan")))


def check_bool(value, name: str) -> bool:
    """True or False, or a TypeError naming `name` (an option given as "no" or 0 is truthy or falsy
    by accident)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(value, name: str, minimum: int) -> int:
    """An integer in [minimum, 2^63 - 1] (bools refused), or a TypeError/ValueError naming `name`."""
    if type(value) is int and minimum <= value <= INT64_MAX:  # (the common case, without the ABC check)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{name} must be < 2**63 (an int64), got {value}")
    return int(value)


def check_real(value, name: str, positive: bool) -> float:
    """A real number that float32 holds (check_float32_range; bools refused) as a float, or an
    error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return check_float32_range(float(value), name, positive)


def plain_mode() -> bool:
    """True when nothing that torch's dispatcher must see is active: not tracing or compiling, no
    dispatch / function mode, no functorch transform and no forward-mode AD level."""
    if is_compiling() or torch.jit.is_tracing():  # (first: dynamo traces only these two)
        return False
    return not (torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack()
                or torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0)


def refuse_forward_mode(op: str, values) -> None:
    """A NotImplementedError naming the op under torch.func.grad / vjp / jvp (jacrev, jacfwd, hessian)
    or with a forward-mode dual tensor among `values`: the ops' autograd is reverse mode through
    torch.autograd, and these would meet an error deep in torch or, worse, drop the tangent and
    give 0. (vmap alone passes.)"""
    if is_compiling():
        return
    refused = False
    if torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        kinds = {interpreter.key() for interpreter in retrieve_all_functorch_interpreters()}
        refused = bool(kinds & {TransformType.Grad, TransformType.Jvp})
    if not refused and _forward_ad._current_level >= 0:
        refused = any(isinstance(value, torch.Tensor) and _forward_ad.unpack_dual(value).tangent is not None
                      for value in values)
    if refused:
        raise NotImplementedError(
            f"fastprobe.{op} supports reverse-mode autograd only (loss.backward(), torch.autograd.grad), "
            "not torch.func.grad / vjp / jvp / jacrev / jacfwd or forward-mode AD (dual tensors); "
            "torch.func.vmap works on its own"
        )


def runs_plain(values, recorded: bool = False) -> bool:
    """True when an op call needs nothing from torch's dispatcher: plain_mode(), every tensor a
    plain torch.Tensor (no fake, meta or subclass tensor) and none that autograd has to record
    (recorded=True: tensors that autograd records pass, for a caller that records the call)."""
    if not plain_mode():
        return False
    grad = torch.is_grad_enabled() and not recorded
    for value in values:
        if value is None:  # (the most common argument of a prepared call: skipped first)
            continue
        kind = type(value)
        if kind is torch.Tensor:
            if value.is_meta or (grad and value.requires_grad):
                return False
        elif kind not in _NOT_TENSORS and isinstance(value, torch.Tensor):  # a subclass
            return False
    return True


def tracing() -> bool:
    """True while torch.compile / AOTAutograd / make_fx / jit traces (a proxy or fake dispatch mode
    is active), as opposed to any user dispatch or function mode, forward-AD level or vmap."""
    if is_compiling() or torch.jit.is_tracing():
        return True
    keys = torch._C._TorchDispatchModeKey
    return any(torch._C._get_dispatch_mode(key) is not None for key in (keys.PROXY, keys.FAKE))


def no_second_derivative(op: str) -> str:
    return (f"fastprobe.{op} has no second derivative: backward with create_graph=True (double backward, "
            "gradient penalties) is not supported through it")


def refuse_double_backward(op: str) -> None:
    """In a backward that returns gradients formed in the forward (no graph links them back to the
    inputs): a RuntimeError naming the op under create_graph=True (grad mode on in the backward),
    where a second derivative through them would silently be 0. Eager only (a user's dispatch or
    function mode, a forward-AD level included): tracing passes."""
    if torch.is_grad_enabled() and not tracing():
        raise RuntimeError(no_second_derivative(op))


def graph_kept() -> Optional[bool]:
    """Inside a backward: whether autograd keeps the graph after it (retain_graph or create_graph),
    so that tensors saved for it may be read again and must not be changed in place. None when
    that cannot be known: while tracing or compiling, and on torch without the query (2.4).
    (Outside a backward torch answers True.)"""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return None if query is None or tracing() else bool(query())


_NOT_TENSORS = frozenset((int, float, bool, str, type(None)))  # (skips the isinstance of most arguments)


class CustomOp:
    """A torch.library custom op (what torch.compile, opcheck and autograd see) whose plain eager
    calls run its Python body directly: the dispatcher's boxing and autograd wrapper cost tens of
    microseconds per call, as much as a decoding step's attention kernel. A plain eager call that
    autograd records (an input requires grad) runs the body inside a torch.autograd.Function of
    the op's own setup_context and backward (register_autograd): torch.library's autograd wrapper
    costs ~35 us more a forward and backward on 2.13 (fill_defaults alone ~12 us), twice a
    bridge_loss step at N = 1, V = 1000. register_fake and the rest go to the registered op."""

    def __init__(self, name: str, body: Callable, tags: tuple = ()):
        self.body = body
        self.public_name = name.rpartition("::")[2]
        self.argument_names = tuple(inspect.signature(body).parameters)
        # The op modules use `from __future__ import annotations`; torch 2.4's custom_op infers the
        # schema from the raw (string) annotations and refuses them, so hand it the evaluated ones.
        body.__annotations__ = typing.get_type_hints(body)
        self.op = torch.library.custom_op(name, body, mutates_args=(), **({"tags": tags} if tags else {}))
        self.eager_autograd = None  # (register_autograd)

    def __call__(self, *args, **kwargs):
        if runs_plain(itertools.chain(args, kwargs.values())):
            return self.body(*args, **kwargs)
        # (every argument by position, as the op modules call: setup_context reads them all)
        if (self.eager_autograd is not None and not kwargs and len(args) == len(self.argument_names)
                and runs_plain(args, recorded=True)):
            return self.eager_autograd.apply(*args)
        refuse_forward_mode(self.public_name, itertools.chain(args, kwargs.values()))
        try:
            return self.op(*args, **kwargs)
        except (RuntimeError, NotImplementedError) as dispatch_error:
            # torch's DTensor dispatch refuses the op before it runs ("got mixed torch.Tensor and DTensor",
            # "does not have a sharding strategy registered"), naming no argument: a DTensor that the public
            # checks (check_tensor) do not see, such as labels or weights, is named here (torch's error as its
            # cause, not as an error in handling it), at no cost to a call
            try:
                for name, value in itertools.chain(zip(self.argument_names, args), kwargs.items()):
                    refuse_dtensor(value, name, self.public_name)
            except TypeError as refusal:
                raise refusal from dispatch_error
            raise

    def register_fake(self, fake: Callable) -> Callable:
        """Registers `fake` (what torch.compile traces, and what torch's dispatcher runs for any call
        with a meta tensor among its arguments) behind check_meta_mix."""
        names = self.argument_names

        def checked(*args, **kwargs):
            check_meta_mix(self.public_name, {**dict(zip(names, args)), **kwargs})
            return fake(*args, **kwargs)

        self.op.register_fake(checked)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """Registers the op's autograd with torch (what any call that the dispatcher sees uses) and
        as the torch.autograd.Function that plain eager calls run (see the class docstring): the
        same setup_context(ctx, inputs, output) and backward(ctx, *grads), so the same gradients."""
        self.op.register_autograd(backward, setup_context=setup_context)
        body = self.body

        def forward(ctx, *inputs):
            output = body(*inputs)
            setup_context(ctx, inputs, output)
            return output

        # named as torch.library names its own, so that the graph reads the same either way (grad_fn
        # GeneratedBackwardFor_fastprobe_bridge_loss_defaultBackward, autograd's errors "output 0 of ...")
        overload = self.op._opoverload
        self.eager_autograd = type(
            f"GeneratedBackwardFor_{overload._namespace}_{overload._opname}_{overload._overloadname}",
            (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def __getattr__(self, name: str):
        return getattr(self.op, name)


def check_meta_mix(op: str, arguments: dict) -> None:
    """A ValueError naming them when `arguments` mix meta tensors with real ones (a 0-dim CPU
    tensor, a scalar such as bridge_loss's beta, mixes with any): torch's dispatcher hands such a
    call to the op's fake implementation, whose outputs, made like a real tensor, would be real
    and never written (uninitialised memory returned as results)."""
    tensors = [(name, value) for name, value in arguments.items() if isinstance(value, torch.Tensor)]
    meta = next((name for name, value in tensors if value.is_meta), None)
    real = next(((name, value) for name, value in tensors
                 if not value.is_meta and not (value.dim() == 0 and value.device.type == "cpu")), None)
    if meta is not None and real is not None:
        raise ValueError(f"{op}: {meta} is on meta but {real[0]} is on {real[1].device}; move them to one device")


def custom_op(name: str, tags: tuple = ()) -> Callable[[Callable], CustomOp]:
    """Decorator: register `body` as the custom op `name` (no mutated arguments, torch.Tag tags),
    see CustomOp."""
    return lambda body: CustomOp(name, body, tags)


# The tag of an op whose body reads a tensor argument on the host (a CPU scalar tensor that torch.compile
# keeps a runtime value): a CUDA graph that captured its launch would replay the captured value, so
# inductor leaves such an op outside the graphs it captures. (Absent before torch 2.8, which captured
# no graph with a CPU tensor in it.)
CUDAGRAPH_UNSAFE = ((torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe")
                    and "tags" in inspect.signature(torch.library.custom_op).parameters else ())


# (typing.List: torch 2.4's custom_op takes no list[Tensor] annotation)
@custom_op("fastprobe::refused_backward")
def _refused_backward(message: str, gradients: typing.List[torch.Tensor]) -> typing.List[torch.Tensor]:
    """A traced backward's refusal: raises `message` when the compiled backward runs."""
    raise RuntimeError(message)


@_refused_backward.register_fake
def _(message, gradients):
    return [torch.empty_like(gradient) for gradient in gradients]


# The last sentence of the attention ops' refusal: most of their backward calls come from a patched model.
PATCHED_MODEL_HINT = " A model that fastprobe.patch switched to this attention trains after fastprobe.unpatch(model)."


def register_forward_only(op, name: str, why: str = "", inputs: str = "its inputs", after: str = "") -> None:
    """Autograd for an inference-only custom op: backward raises a clear error (`after`: a last
    sentence). Raised when a backward runs, not when one is traced: torch.compile traces the
    backward of a forward whose inputs require grad (a model in eval mode with trainable weights)
    and must not fail there, so a traced backward returns gradients of the refusing op above in
    place of the inputs'."""
    register_refusing_backward(op, f"fastprobe.{name} is forward-only{why}: training through it is not supported "
                                   f"yet. Use it under torch.no_grad() / torch.inference_mode(), or detach {inputs}."
                                   + after)


def register_refusing_backward(op, message: str) -> None:
    """Autograd for a custom op whose backward raises `message` when it runs (see
    register_forward_only)."""

    def setup_context(ctx, inputs, output):
        ctx.inputs = [(value.shape, value.dtype, value.device) if isinstance(value, torch.Tensor) else None
                      for value in inputs]

    def backward(ctx, *grads):
        if plain_mode():
            raise RuntimeError(message)
        wanted = [index for index, meta in enumerate(ctx.inputs) if meta is not None and ctx.needs_input_grad[index]]
        refused = _refused_backward(message, [torch.empty(ctx.inputs[index][0], dtype=ctx.inputs[index][1],
                                                          device=ctx.inputs[index][2]) for index in wanted])
        gradients = [None] * len(ctx.inputs)
        for index, gradient in zip(wanted, refused):
            gradients[index] = gradient
        return tuple(gradients)

    op.register_autograd(backward, setup_context=setup_context)


def check_op_logits(op: str, name: str, logits: torch.Tensor, layout: str) -> None:
    """The logits a custom op's kernels stream, checked in the op's body (reachable directly, past
    the public checks): of one of INPUT_DTYPES and `layout`'s dimensions (e.g. "[K, N, V]"), none of
    them 0 but N (an empty vocabulary leaves every id outside it); else a ValueError/TypeError naming it."""
    sizes = layout.strip("[]").split(", ")
    if logits.dim() != len(sizes) or any(size == 0 for size, axis in zip(logits.shape, sizes) if axis != "N"):
        nonempty = ", ".join(axis for axis in sizes if axis != "N")
        raise ValueError(f"{op}: {name} must be {layout} with {nonempty} >= 1, got {list(logits.shape)}")
    check_dtype(logits, f"{op}: {name}")


def check_op_tensors(op: str, device: torch.device, specs) -> None:
    """What a custom op's kernels read through raw pointers, checked in the op's body (the op is
    reachable directly, as torch.ops.fastprobe.<op>, past the public function's checks). Each of
    specs is (name, tensor or None (skipped), shape, dtype (None: any, the body converts it),
    contiguous): the tensor must have that shape and dtype, lie on `device` and, with
    contiguous, be contiguous; else a TypeError (dtype) or ValueError naming it. Tensor metadata
    only: no host sync."""
    for name, tensor, shape, dtype, contiguous in specs:
        if tensor is None:
            continue
        if dtype is not None and tensor.dtype != dtype:
            raise TypeError(f"{op}: {name} must be a {str(dtype).removeprefix('torch.')} tensor, got {tensor.dtype}")
        if tensor.shape != shape:
            raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but the other tensors are on {device}")
        if contiguous and not tensor.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (the kernels read it densely), got strides "
                             f"{tensor.stride()}")
