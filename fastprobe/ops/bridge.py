"""bridge_loss: the logit-bridge distillation loss, fused forward and gradient.

P_S = softmax(z_S / T), and the bridge target Q = softmax((z_T + beta stopgrad(z_S)) / T),
i.e. Q proportional to P_T P_S^beta. Per row,
  "forward": KL(Q || P_S),  gradient (P_S - Q) / T                      (the default)
  "reverse": KL(P_S || Q),  gradient P_S (g - KL) / T with g = log P_S - log Q
beta = 0 is ordinary forward-KL distillation. The fused kernels compute every row's loss
and its gradient in one call (online log-sum-exp over the vocabulary), into a gradient
buffer of their own; the backward only scales that buffer by the incoming gradient of
each row. Reductions are plain tensor ops on the per-row losses, so autograd hands the
backward exactly the per-row scale, whatever the reduction.

Dtypes: student and teacher logits may differ in dtype (a bfloat16 student under autocast, a
float32 teacher; or the reverse). Among float32, bfloat16 and float16 the fast kernels read each
input in its own dtype (no [N, V] copy of either) and compute in float32, giving the bits of the
same call with both cast to their common dtype (torch.promote_types: the wider one; float32 for
bfloat16 with float16) beforehand, the gradient then rounded to the student's dtype. With a
float64 input the reference runs, in float64. The loss is float32, or float64 when either input
is float64; the gradient w.r.t. the student logits is in the student's dtype.

Range: the fast kernels form each bridge logit as (z_T - a_T) + beta (z_S - a_S) in float32, from
per-row anchors a. The C++ kernel computes a row whose largest finite |z_S| or |z_T| times
(1 + |beta|) max(1, 1 / T) is over 2^100 (logits ~1e38; |beta| or 1 / T over ~1e28 with logits
~100) whole in double: its loss and gradient are the reference's rounded to float32 (+inf past
float32's range). In the Triton kernel, where beta times the spread of a row's student logits, or the
teacher's spread, nears float32's largest value (3.4e38), that row's loss is NaN, +inf or imprecise
(kernels/bridge.py, Wide logits; the float64 reference's is not). Logits of magnitude 1e4 at
|beta| up to 2 are tested exact to float32.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import reference
from ..backend import resolve
from ._common import (
    CUDAGRAPH_UNSAFE,
    DTYPE_NAMES,
    FLOAT32_MAX,
    autocast_dtype,
    backend_dtype,
    batched_gradient,
    check_bool,
    check_dtype,
    check_int,
    check_op_inv_temperature,
    check_op_logits,
    check_op_tensors,
    check_real,
    check_same_device,
    check_temperature,
    check_tensor,
    cpp,
    custom_op,
    graph_kept,
    is_compiling,
    new_output,
    on_device,
    output_dtype,
    refuse_double_backward,
    refuse_dtensor,
    requires_grad,
    skips_host_checks,
    tracing,
    without_autocast,
)

__all__ = ["BridgeLoss", "FusedLinearBridgeLoss", "beta_schedule", "bridge_loss"]

DIRECTIONS = ("forward", "reverse")
REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------- the fused op

# Every backend: (student, teacher, labels, ignore_index, beta, inv_temperature, reverse,
# loss, grad) -> None, writing loss [N] and, when grad has N * V elements, the gradient of
# each row's loss w.r.t. the student logits (ignored rows: loss 0 and zero gradient).


@without_autocast
def _reference_rows(student, teacher, labels, ignore_index, beta, inv_temperature, reverse, loss, grad) -> None:
    # The gradient by SPEC's formulas (autograd is not available below the op's dispatch), in the
    # loss's dtype (float64 when either input is: a float32 student with a float64 teacher too).
    temperature = 1.0 / inv_temperature
    z_s, z_t = student.to(loss.dtype), teacher.to(loss.dtype)
    rows = reference.bridge_rows(z_s, z_t, beta=beta, temperature=temperature, direction=DIRECTIONS[int(reverse)])
    keep = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    loss.copy_(torch.where(keep, rows, torch.zeros_like(rows)))
    if grad.numel() > 0:
        log_p = torch.log_softmax(z_s * inv_temperature, dim=-1)
        log_q = torch.log_softmax(reference.bridge_logits(z_s, z_t, beta) * inv_temperature, dim=-1)
        p = log_p.exp()
        if reverse:  # P (g - KL) / T with g = log P - log Q
            g = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
            row_grad = p * (g - rows[:, None]) * inv_temperature
        else:  # (P - Q) / T
            row_grad = (p - log_q.exp()) * inv_temperature
        # (an ignored row, and a loss of +inf, a constant for every nearby z_S: gradient 0)
        grad.copy_(torch.where((keep & (rows != float("inf")))[:, None], row_grad, torch.zeros_like(row_grad)))


def _cpp_rows(student, teacher, labels, ignore_index, beta, inv_temperature, reverse, loss, grad) -> None:
    num_rows, vocab = student.shape
    cpp().bridge_loss(
        DTYPE_NAMES[student.dtype], DTYPE_NAMES[teacher.dtype],  # (each read in its own dtype)
        student.data_ptr(), teacher.data_ptr(), num_rows, vocab, *student.stride(), *teacher.stride(),
        0 if labels is None else labels.data_ptr(), ignore_index,
        beta, inv_temperature, int(reverse),
        loss.data_ptr(), grad.data_ptr() if grad.numel() > 0 else 0, grad.numel() > 0,
        torch.get_num_threads(),
    )


def _triton_rows(student, teacher, labels, ignore_index, beta, inv_temperature, reverse, loss, grad) -> None:
    from ..kernels import bridge as triton_bridge

    with on_device(student):
        triton_bridge.bridge_loss(
            student, teacher, labels, ignore_index, beta, inv_temperature, reverse, loss,
            grad if grad.numel() > 0 else None,
        )


_ROWS = {"reference": _reference_rows, "cpp": _cpp_rows, "triton": _triton_rows}


def beta_tensor(beta: float) -> torch.Tensor:
    """beta as the op takes it: a float64 0-dim CPU tensor. Under torch.compile a Python float
    handed to a custom op (or to a tensor constructor) is specialized, one compiled graph per
    value: a beta schedule recompiled every step and hit the recompile limit after 8 values
    (fullgraph=True: an error). One that feeds a tensor op, as this addition, stays a runtime
    input. (The op reads it on the host, so CUDA graphs leave the op out: CUDAGRAPH_UNSAFE.)"""
    return torch.zeros((), dtype=torch.float64, device="cpu") + beta


@custom_op("fastprobe::bridge_loss", tags=CUDAGRAPH_UNSAFE)
def _bridge_loss_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: Optional[torch.Tensor],
    ignore_index: int,
    beta: torch.Tensor,
    inv_temperature: float,
    reverse: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss [N] (float32; float64 when either logits are float64) and, with compute_grad,
    the gradient of each row's loss w.r.t. the student logits [N, V] in the student's dtype (else
    [0]). student and teacher may differ in dtype: each is read in its own (see the module's doc).
    beta: a float64 0-dim CPU tensor (beta_tensor).
    That gradient is the autograd backward's buffer: a backward that frees the graph scales it
    in place and returns it, so a caller of this op keeps it only if it runs no such backward."""
    # what the kernels read through raw pointers, checked here too: this op is reachable directly
    # (torch.ops.fastprobe.bridge_loss), past the public functions' checks
    check_op_logits("bridge_loss", "student", student, "[N, V]")
    num_rows, vocab = student.shape
    check_dtype(teacher, "bridge_loss: teacher")  # (any of the logits' dtypes, the student's or not)
    check_op_tensors("bridge_loss", student.device, (
        ("teacher", teacher, student.shape, None, False),  # (any strides)
        ("labels", labels, (num_rows,), torch.int64, True),
    ))
    check_op_tensors("bridge_loss", torch.device("cpu"), (("beta", beta, (), torch.float64, False),))
    # (the kernels compute in float32; the reference would give NaN or divide by 0 silently)
    beta_value = beta.item()
    if not -FLOAT32_MAX <= beta_value <= FLOAT32_MAX:
        raise ValueError(f"bridge_loss: beta must be finite in float32, got {beta_value}")
    check_op_inv_temperature("bridge_loss", inv_temperature)
    loss = new_output((num_rows,), student.device, output_dtype(student, teacher))
    grad = new_output((num_rows, vocab) if compute_grad else (0,), student.device, student.dtype)
    if num_rows > 0:
        # the fast backends take any mix of float32, bfloat16 and float16; a float64 input makes the
        # common dtype float64: the reference
        backend = resolve(student.device, backend_dtype(student, teacher), "bridge_loss")
        _ROWS[backend](student, teacher, labels, ignore_index, beta_value, inv_temperature, reverse, loss, grad)
    return loss, grad


@_bridge_loss_op.register_fake
def _(student, teacher, labels, ignore_index, beta, inv_temperature, reverse, compute_grad):
    num_rows, vocab = student.shape
    loss = student.new_empty((num_rows,), dtype=output_dtype(student, teacher))
    grad = student.new_empty((num_rows, vocab) if compute_grad else (0,))
    return loss, grad


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1])
    # The gradient buffer is an output no loss differentiates; autograd would otherwise hand the
    # backward a zero-filled [N, V] tensor as its incoming gradient (one more [N, V] allocation
    # and fill per backward: 750 against 500 MiB peak at N=2048, V=32000 float32).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


# Rows of a 16-bit gradient scaled per row at a time on the CPU, through float32 (mixed-dtype
# broadcasting takes a slow path there: 155 against 10 ms at N=2048, V=32000 bfloat16).
_SCALE_ROWS_CHUNK = 64


def _scale_rows(grad: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> None:
    """out = grad * weights[:, None] (out may be grad), the product in float32, rounded once to
    grad's dtype. weights [N] float32 or float64; one weight for every row (an expanded scalar:
    the "mean" and "sum" reductions) is applied as a 0-dim multiplier, the fast path."""
    if weights.numel() == 0:
        return
    factor_dtype = torch.promote_types(grad.dtype, torch.float32)
    if weights.stride(0) == 0:
        torch.mul(grad, weights[0].to(factor_dtype), out=out)
    elif grad.dtype == factor_dtype or grad.device.type != "cpu" or tracing():
        # (traced, one product: a loop over row chunks would make torch.compile specialize N)
        torch.mul(grad, weights.to(factor_dtype)[:, None], out=out)
    else:
        for first in range(0, grad.shape[0], _SCALE_ROWS_CHUNK):
            rows = slice(first, first + _SCALE_ROWS_CHUNK)
            out[rows] = grad[rows].to(factor_dtype).mul_(weights[rows, None].to(factor_dtype))


def _backward(ctx, grad_rows, _grad_of_buffer):
    refuse_double_backward("bridge_loss")
    (grad,) = ctx.saved_tensors
    if grad_rows is None:  # (no gradient reached the per-row losses)
        return None, None, None, None, None, None, None, None
    if grad.dim() != 2:  # (the [0] marker: the forward computed none)
        raise RuntimeError(
            "bridge_loss: no gradient was computed, because student_logits did not require grad "
            "(or grad mode was off) when the loss was computed"
        )
    # d loss / d z_n = grad_rows[n] * (the buffer's row n): in place when nothing will read the
    # buffer again (the graph is freed after this backward), else into a new tensor, so that a
    # second backward through a kept graph finds it intact
    if batched_gradient(grad_rows):  # (a batch of them: out of place, a product per row of each)
        factor_dtype = torch.promote_types(grad.dtype, torch.float32)
        scaled = (grad.to(factor_dtype) * grad_rows.to(factor_dtype)[:, None]).to(grad.dtype)
    else:
        scaled = grad if graph_kept() is False else torch.empty_like(grad)
        _scale_rows(grad, grad_rows, scaled)
    return scaled, None, None, None, None, None, None, None


_bridge_loss_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- validation


def _check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_beta(beta) -> float:
    if isinstance(beta, torch.Tensor):
        raise TypeError("beta must be a Python float (a runtime value), got a tensor; use float(beta)")
    return check_real(beta, "beta", positive=False)


def _check_ignore_index(ignore_index) -> int:
    return check_int(ignore_index, "ignore_index", -(2**63))


def _check_logits(student_logits, teacher_logits) -> tuple[torch.Tensor, torch.Tensor]:
    """Both [N, V] (or [..., V]) on one device, each of the logits' dtypes (not necessarily the
    same one); returned flattened to [N, V]."""
    ndim = student_logits.dim() if isinstance(student_logits, torch.Tensor) else 2
    student = check_tensor(student_logits, "student_logits", max(ndim, 2), "[N, V] (or [..., V])")
    teacher = check_tensor(teacher_logits, "teacher_logits", ndim, f"{list(student.shape)} like student_logits")
    check_same_device(student, "student_logits", teacher, "teacher_logits")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student.shape)}, got {tuple(teacher.shape)}"
        )
    if student.shape[-1] == 0:
        raise ValueError("student_logits has an empty vocabulary (V = 0)")
    return student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])


def _check_labels(labels, leading_shape: torch.Size, device: torch.device) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be an integer tensor of shape {list(leading_shape)}, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != leading_shape:
        raise ValueError(f"labels must have shape {list(leading_shape)} (one per row of the logits), got {list(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device} but student_logits is on {device}; move them to one device")
    flat = labels.reshape(-1).to(torch.int64).contiguous()
    if labels.dtype == torch.uint64 and not skips_host_checks(labels) and bool((flat < 0).any()):
        # (a label >= 2**63 wraps to a negative int64: one that wrapped onto ignore_index dropped its row)
        raise ValueError("labels must be < 2**63 (they are compared with ignore_index as int64)")
    return flat


# ---------------------------------------------------------------- public API


def bridge_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    direction: str = "forward",
    labels: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The logit-bridge distillation loss, differentiable w.r.t. student_logits.

    Q = softmax((z_T + beta stopgrad(z_S)) / T) and P_S = softmax(z_S / T); each row's loss
    is KL(Q || P_S) (direction="forward") or KL(P_S || Q) ("reverse"). beta = 0 is plain
    forward-KL distillation (torch.nn.functional.kl_div with log_target). Unlike Hinton's
    recipe no T^2 factor is applied: multiply the loss by T^2 yourself if you want it.

    Args:
        student_logits, teacher_logits: [N, V] (or [..., V], flattened) logits, each float32,
            bfloat16 or float16 (float64 runs the reference, in float64). Their dtypes may
            differ (a bfloat16 student under autocast, a float32 teacher): each is read in its
            own, with no converted copy, and the result is the one of both cast to their common
            dtype (torch.promote_types) beforehand. teacher_logits get no gradient. -inf
            entries are masked vocabulary.
        beta: the bridge exponent, a Python float (a runtime value: changing it recompiles no
            kernel, and under torch.compile a second value recompiles once, into a graph that
            takes every later value as an input; a new temperature, direction or reduction
            recompiles there). Older torch (2.4) specializes a Python float that is an input of
            the compiled function itself, one graph per value (fullgraph=True: an error at the
            recompile limit); there give the compiled function an int step and let
            BridgeLoss(step=...) derive beta inside it (at most 4 compiles on torch 2.4).
        labels: optional integer tensor of the logits' leading shape; rows whose label is
            ignore_index give loss 0 and gradient 0.
        reduction: "mean" over the kept rows (0 when no row is kept, never NaN), "sum", or
            "none" (the per-row losses, in the logits' leading shape).

    The loss is float32 (float64 when either logits are float64). The gradient is computed with
    the loss (when student_logits requires grad) into a buffer of the op's own, [N, V] in
    student_logits' dtype, kept until the backward, which scales it by each row's incoming
    gradient in place (into a second [N, V] tensor only when the graph is kept, retain_graph=True, or on torch
    without a way to tell, before 2.5; FusedLinearBridgeLoss avoids [N, V] altogether). Under
    torch.compile the compiled backward may take that buffer over (torch's donated buffers): a
    backward with retain_graph=True then raises torch's error saying so; set
    torch._functorch.config.donated_buffer = False before the first compile to keep graphs. A row
    whose student or bridge logits are all -inf gives NaN. A row whose loss is +inf (reverse: Q
    masks a token P keeps; forward with beta = 0: P masks a token Q keeps) has gradient 0: its
    loss is +inf for every nearby z_S.
    """
    student, teacher = _check_logits(student_logits, teacher_logits)
    leading_shape = student_logits.shape[:-1]
    flat_labels = _check_labels(labels, leading_shape, student.device)
    beta = _check_beta(beta)
    inv_temperature = 1.0 / check_temperature(temperature)
    reverse = _check_choice(direction, "direction", DIRECTIONS) == "reverse"
    _check_choice(reduction, "reduction", REDUCTIONS)
    ignore_index = _check_ignore_index(ignore_index)

    compute_grad = torch.is_grad_enabled() and requires_grad(student_logits)
    # (detached: the teacher takes no gradient, so a loss of a frozen student has none to give)
    rows, _ = _bridge_loss_op(
        student, teacher.detach(), flat_labels, ignore_index, beta_tensor(beta), inv_temperature, reverse, compute_grad
    )
    keep = None if flat_labels is None else flat_labels != ignore_index
    return reference.reduce_rows(rows, keep, reduction).reshape(leading_shape if reduction == "none" else ())


def beta_schedule(step: int, total: int, beta_start: float, beta_end: float) -> float:
    """beta at `step` of a run of `total` steps: linear from beta_start (step 0) to
    beta_end (step total), held at the ends outside [0, total]. Errors name the argument: a step
    that is no number (or NaN), a total that is no integer >= 1, a beta_start or beta_end outside
    float32's finite range (check_real)."""
    if isinstance(step, bool) or not isinstance(step, (numbers.Real, torch.SymInt, torch.SymFloat, torch.Tensor)):
        raise TypeError(f"step must be a number (the training step), got {type(step).__name__}")
    if not isinstance(total, torch.SymInt):  # (traced: an int the caller's code made)
        total = check_int(total, "total", 1)
    beta_start = check_real(beta_start, "beta_start", positive=False)
    beta_end = check_real(beta_end, "beta_end", positive=False)
    # fraction = clamp(step, 0, total) / total: clamped as a step (an int, or a SymInt under
    # torch.compile), not as a float fraction. torch 2.11's inductor cast a float max/min of a traced
    # step to int64 in its C++ code (std::max(int64_t(0.0), int64_t(step / total))): beta stayed
    # beta_start for the whole schedule, silently
    fraction = min(max(step, 0), total) / total
    if not is_compiling() and isinstance(fraction, float) and math.isnan(fraction):  # (min and max pass a NaN on)
        raise ValueError(f"step must be a number, got {step}")
    return float(beta_start + (beta_end - beta_start) * fraction)


def _optional(check):
    """check, letting None through (an option that may be unset)."""
    return lambda value: None if value is None else check(value)


# (a weight of FSDP2's fully_shard read outside the forward that gathers it is a DTensor)
FSDP_WEIGHT_HINT = ("a parameter of FSDP2's fully_shard is whole only inside the forward of the module fully_shard "
                    "was applied to: compute the loss there, or in a method of that module registered with "
                    "torch.distributed.fsdp.register_fsdp_forward_method")


class _LossOptions:
    """The loss modules' options: beta, or a linear schedule of it over `total_steps` (beta_start
    -> beta_end), and the loss's own. Each is checked where it is set, at construction and on any
    later assignment (loss_fn.reduction = ...), and stored as checked (floats as float): a bad
    value raises there, never at a later call. (Listed before torch.nn.Module among a module's
    bases, so that this __setattr__ runs before Module's.)"""

    _OPTION_CHECKS = {
        "beta": _optional(_check_beta),
        "beta_start": _optional(lambda value: check_real(value, "beta_start", positive=False)),
        "beta_end": _optional(lambda value: check_real(value, "beta_end", positive=False)),
        "total_steps": _optional(lambda value: check_int(value, "total_steps", 1)),
        "temperature": check_temperature,
        "direction": lambda value: _check_choice(value, "direction", DIRECTIONS),
        "ignore_index": _check_ignore_index,
        "reduction": lambda value: _check_choice(value, "reduction", REDUCTIONS),
    }

    # beta comes from a fixed beta or a schedule (total_steps): unsetting one needs the other
    _BETA_SOURCES = {"beta": "total_steps", "total_steps": "beta"}

    def __setattr__(self, name, value) -> None:
        check = self._OPTION_CHECKS.get(name)
        value = value if check is None else check(value)
        other = self._BETA_SOURCES.get(name)
        if value is None and other is not None and other in vars(self) and vars(self)[other] is None:
            raise ValueError(f"{name} = None would leave the loss without a beta ({other} is None too): give beta, "
                             "or beta_start, beta_end and total_steps for a schedule")
        super().__setattr__(name, value)

    def _init_beta(self, beta, beta_start, beta_end, total_steps) -> None:
        if total_steps is None and beta is None:
            raise ValueError("give beta, or beta_start, beta_end and total_steps for a schedule")
        if total_steps is None and (beta_start is not None or beta_end is not None):
            # (they were kept and never used: the fixed beta ran throughout)
            raise ValueError("beta_start and beta_end make a schedule only with total_steps (the run's length): give "
                             "total_steps, or leave them out for the fixed beta")
        self.beta, self.beta_start, self.beta_end, self.total_steps = beta, beta_start, beta_end, total_steps
        self._check_schedule()

    def _check_schedule(self) -> None:
        if self.total_steps is not None and (self.beta_start is None or self.beta_end is None):
            raise ValueError("a beta schedule needs beta_start, beta_end and total_steps")

    def beta_at(self, step: Optional[int]) -> float:
        """The schedule's beta at `step` (the fixed beta without a schedule or a step). A loss
        with only a schedule needs the step (without it, a loop that forgot step= trained at
        beta_start throughout)."""
        if self.total_steps is None or step is None:
            if self.beta is None:
                raise ValueError(f"this {type(self).__name__} follows a beta schedule (beta_start {self.beta_start} to "
                                 f"beta_end {self.beta_end} over {self.total_steps} steps) and has no fixed beta: "
                                 "pass step= (the training step)")
            return self.beta
        self._check_schedule()
        return beta_schedule(step, self.total_steps, self.beta_start, self.beta_end)


class BridgeLoss(_LossOptions, torch.nn.Module):
    """bridge_loss as a module, with an optional linear beta schedule.

        loss_fn = BridgeLoss(beta_start=0.0, beta_end=1.0, total_steps=10_000)
        loss = loss_fn(student_logits, teacher_logits, labels=labels, step=step)

    beta: a fixed beta; or beta_start, beta_end and total_steps: beta_schedule(step, total_steps,
    beta_start, beta_end) at each call's step (a schedule without a fixed beta needs step=). With
    both, a call without a step uses the fixed beta. The other options are bridge_loss's; each is
    checked where it is set, at construction or on a later assignment.
    """

    def __init__(self, beta: Optional[float] = None, *, temperature: float = 1.0, direction: str = "forward",
                 ignore_index: int = -100, reduction: str = "mean", beta_start: Optional[float] = None,
                 beta_end: Optional[float] = None, total_steps: Optional[int] = None):
        super().__init__()
        self._init_beta(beta, beta_start, beta_end, total_steps)
        self.temperature, self.direction, self.ignore_index, self.reduction = temperature, direction, ignore_index, reduction

    def forward(self, student_logits, teacher_logits, labels=None, step: Optional[int] = None) -> torch.Tensor:
        """bridge_loss(student_logits, teacher_logits, labels=labels) with this module's options,
        beta at `step` on a schedule (see the class)."""
        return bridge_loss(
            student_logits, teacher_logits, beta=self.beta_at(step), temperature=self.temperature,
            direction=self.direction, labels=labels, ignore_index=self.ignore_index, reduction=self.reduction,
        )


# ---------------------------------------------------------------- fused linear form


def _chunk_logits(device: torch.device) -> int:
    """Logits per chunk of the fused linear form by default. CPU: 8M (a 2-core matrix product
    is efficient at a few hundred rows, and memory stays small). CUDA: 256M (about 2k rows at
    V = 128k, 512 MiB per [rows, V] bfloat16 tensor). Each chunk reads the [V, H] weights for
    its products and adds its share into the float32 [V, H] weight gradient, so few rows per
    chunk pay those passes many times: N = 8192, H = 4096, V = 128256 in 65-row chunks (8M
    logits) took 535 ms on an H200, against 126 ms for computing the whole logits."""
    return 1 << (28 if device.type == "cuda" else 23)


# Elements of the product a lower-precision chunk's weight gradient is formed in before it is
# added into the float32 weight gradient (64 MiB in bfloat16): the whole [V, H] product would
# be one more weight-sized tensor (1 GiB at V = 128256, H = 4096).
_WEIGHT_GRAD_SLAB = 1 << 25


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """grad_weight (float32 [V, H]) += grad_logits^T [V, n] @ hidden [n, H], a product in the
    inputs' dtype formed a slab of vocabulary rows at a time (no float32 copy of either input)."""
    slab = max(1, _WEIGHT_GRAD_SLAB // max(hidden.shape[1], 1))
    for first in range(0, grad_weight.shape[0], slab):
        grad_weight[first:first + slab].add_(grad_logits[:, first:first + slab].t() @ hidden)


class _FusedLinearBridge(torch.autograd.Function):
    """Rows in chunks: logits of a chunk (student with, teacher without gradient), the fused
    op's loss and logit gradient, then that chunk's share of the input and weight gradients.
    All gradients are formed in the forward; the backward scales them by the loss's gradient."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                labels, options):
        beta, inv_temperature, reverse, ignore_index, reduction, chunk_rows, float32_weight_grad, grad_mode = options
        beta = beta_tensor(beta)
        num_rows = student_hidden.shape[0]
        # (needs_input_grad says which inputs require grad even under torch.no_grad, where no
        # backward will run: there an evaluation would form a float32 [V, H] weight gradient)
        want = ctx.needs_input_grad if grad_mode else (False,) * 3
        compute_grad = any(want[:3])
        grad_hidden = torch.zeros_like(student_hidden) if want[0] else None
        # (accumulated in float32 at least, float64 for float64 weights)
        weight_dtype = torch.promote_types(student_weight.dtype, torch.float32) if float32_weight_grad else student_weight.dtype
        grad_weight = torch.zeros_like(student_weight, dtype=weight_dtype) if want[1] else None
        grad_bias = None
        if student_bias is not None and want[2]:
            grad_bias = torch.zeros_like(student_bias, dtype=torch.promote_types(student_bias.dtype, torch.float32))
        # the loss's dtype: float32, float64 when either side's hidden states are (as the op's)
        loss_dtype = output_dtype(student_hidden, teacher_hidden)
        device = student_hidden.device
        if reduction == "mean":  # d mean / d row = 1 / (kept rows), a tensor: no host sync
            kept = torch.tensor(num_rows, device=device) if labels is None else (labels != ignore_index).sum()
            row_scale = 1.0 / kept.clamp(min=1).to(loss_dtype)
        else:  # sum: the rows' gradients as they are
            row_scale = None
        # A 16-bit logit gradient is left unscaled by 1 / N here and the row scale is applied in
        # the backward with the loss's gradient, in float32 (GradScaler's scale included): scaled
        # here, in float16, d loss / d logits ~ (P_S - Q) / N fell below float16's range (flushed
        # to 0 or a subnormal) before the loss scale could lift it. Not where the weight gradient
        # is summed in 16 bits (float32_weight_grad=False), whose unscaled row sums could overflow.
        # (whatever the hidden states' dtype: under torch.autocast float32 ones give 16-bit logits)
        deferred = row_scale is not None and (
            grad_weight is None or grad_weight.dtype not in (torch.float16, torch.bfloat16))
        losses = []
        # (the chunk count as an int, the row count left symbolic: range(0, num_rows, chunk_rows) made
        # torch.compile specialize N and V, one graph per batch size)
        num_chunks = int((num_rows + chunk_rows - 1) // chunk_rows)
        for index in range(num_chunks):
            start = index * chunk_rows
            rows = slice(start, num_rows if index == num_chunks - 1 else start + chunk_rows)
            chunk_hidden, chunk_teacher = _row_major(student_hidden[rows]), _row_major(teacher_hidden[rows])
            student_logits = torch.nn.functional.linear(chunk_hidden, student_weight, student_bias)
            # (in the teacher's own dtype, which the fused op reads as it is: e.g. a bfloat16 teacher,
            # a float32 student, no float32 copy of the teacher's chunk)
            teacher_logits = torch.nn.functional.linear(chunk_teacher, teacher_weight, teacher_bias)
            chunk_labels = None if labels is None else labels[rows]
            loss, grad_logits = _bridge_loss_op(
                student_logits, teacher_logits, chunk_labels, ignore_index, beta, inv_temperature, reverse, compute_grad
            )
            del student_logits, teacher_logits  # (freed now, not when the next chunk's replace them)
            losses.append(loss)
            if row_scale is not None and not deferred:  # d(reduced loss) / d logits, in float32 (or float64)
                grad_logits.mul_(row_scale)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ student_weight  # [n, V] @ [V, H]
            if grad_weight is not None:  # += [V, n] @ [n, H]
                if weight_dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.t(), chunk_hidden)
                else:
                    _accumulate_weight_grad(grad_weight, grad_logits, chunk_hidden)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)
            del grad_logits  # at most one chunk's three [rows, V] tensors live at a time
        rows_loss = torch.cat(losses) if losses else student_hidden.new_zeros(0, dtype=loss_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias, row_scale if deferred else None)
        ctx.weight_dtype, ctx.bias_dtype = student_weight.dtype, None if student_bias is None else student_bias.dtype
        ctx.scaled_in_place = False
        total = rows_loss.sum()
        return total if row_scale is None else total * row_scale.to(total.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        refuse_double_backward("FusedLinearBridgeLoss")
        # The gradients were formed in the forward: scale them by the loss's gradient (a 0-dim
        # float32 factor) in place, no second copy of a weight-sized tensor, unless the graph is
        # kept for another backward. Where torch cannot tell (2.4, tracing) in place too, and a
        # second backward through the same loss then raises.
        if ctx.scaled_in_place:
            raise RuntimeError(
                "FusedLinearBridgeLoss: a second backward through the same loss needs torch >= 2.5 "
                "(to know the graph is kept) and eager mode"
            )
        # (a batch of incoming gradients: a batch of products, out of place)
        ctx.scaled_in_place = graph_kept() is not True and not batched_gradient(grad_output)
        *gradients, row_scale = ctx.saved_tensors
        factor = grad_output if row_scale is None else grad_output * row_scale.to(grad_output.dtype)
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else _scaled(g, factor, ctx.scaled_in_place) for g in gradients
        )
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _row_major(rows: torch.Tensor) -> torch.Tensor:
    """A chunk's hidden states with unit stride along H (a copy of a chunk of column-major ones):
    torch 2.7's bfloat16 CPU matrix product got one row of a column-major matrix wrong (stride
    (1, N)), and a product reads rows of unit stride faster anyway."""
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _scaled(grad: torch.Tensor, factor: torch.Tensor, in_place: bool) -> torch.Tensor:
    """grad * factor, the product in float32 at least and rounded once to grad's dtype (in place
    in grad when in_place)."""
    if grad.dtype == torch.promote_types(grad.dtype, factor.dtype):
        return grad.mul_(factor) if in_place else grad * factor
    product = (grad.to(torch.promote_types(grad.dtype, torch.float32)) * factor).to(grad.dtype)
    return grad.copy_(product) if in_place else product


class FusedLinearBridgeLoss(_LossOptions, torch.nn.Module):
    """bridge_loss computed from hidden states and LM-head weights, chunk by chunk, so the
    full [N, V] logits never exist. Gradients flow to student_hidden, student_weight and
    student_bias (accumulated across chunks in float32, float64 for float64 weights, with
    float32_weight_grad, the default); the teacher side gets none. Reductions "mean" and "sum".

        loss_fn = FusedLinearBridgeLoss(beta=0.5)
        loss = loss_fn(student_hidden, lm_head_s.weight, teacher_hidden, lm_head_t.weight, labels=labels)

    Each side's hidden states, weight [V, H] and optional bias [V] share one dtype (as
    torch.nn.functional.linear needs them outside torch.autocast: a mismatch is refused, never
    converted, so no silent copy of a weight is made; under autocast, e.g. bfloat16 hidden states
    with float32 weights, its products take them) and student_hidden's device. The two sides may
    differ in dtype (e.g. a bfloat16 teacher distilled into a float32 student): each chunk's logits
    reach the fused op in their side's dtype, read as they are, with no copy in the other's
    (bridge_loss's dtype rule: the loss is the one of both cast to their common dtype; float64 on
    either side runs the reference in float64 and gives a float64 loss).

    chunk_rows: rows per chunk, an integer >= 1 (default: about 8M logits per chunk on CPU and
    256M on CUDA, at least 1 row; see _chunk_logits).
    """

    _OPTION_CHECKS = {
        **_LossOptions._OPTION_CHECKS,
        "reduction": lambda value: _check_choice(value, "FusedLinearBridgeLoss's reduction", ("mean", "sum")),
        "chunk_rows": _optional(lambda value: check_int(value, "chunk_rows", 1)),
        "float32_weight_grad": lambda value: check_bool(value, "float32_weight_grad"),
    }

    def __init__(self, beta: Optional[float] = None, *, temperature: float = 1.0, direction: str = "forward",
                 ignore_index: int = -100, reduction: str = "mean", chunk_rows: Optional[int] = None,
                 float32_weight_grad: bool = True, beta_start: Optional[float] = None,
                 beta_end: Optional[float] = None, total_steps: Optional[int] = None):
        super().__init__()
        self._init_beta(beta, beta_start, beta_end, total_steps)
        self.temperature, self.direction, self.ignore_index, self.reduction = temperature, direction, ignore_index, reduction
        self.chunk_rows, self.float32_weight_grad = chunk_rows, float32_weight_grad

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, step: Optional[int] = None) -> torch.Tensor:
        """The loss (a scalar) of student logits student_hidden [N, Hs] @ student_weight [V, Hs]^T
        (+ student_bias [V]) against the teacher's, computed chunk by chunk; labels [N] with
        ignore_index as in bridge_loss; beta at `step` on a schedule (as BridgeLoss)."""
        # (its gradients are formed in the forward, per chunk; torch 2.4's Dynamo cannot trace the query)
        if not is_compiling() and torch._C._are_functorch_transforms_active():
            raise NotImplementedError(
                "FusedLinearBridgeLoss does not run under torch.func transforms (vmap, grad, jacrev, ...); "
                "bridge_loss on the logits does (vmap of a loss, then backward)"
            )
        inputs = {"student_hidden": student_hidden, "student_weight": student_weight, "student_bias": student_bias,
                  "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight, "teacher_bias": teacher_bias}
        for name, tensor in inputs.items():
            refuse_dtensor(tensor, name, "FusedLinearBridgeLoss", FSDP_WEIGHT_HINT)
        hidden = check_tensor(student_hidden, "student_hidden", 2, "[N, Hs]")
        weight = check_tensor(student_weight, "student_weight", 2, "[V, Hs]")
        t_hidden = check_tensor(teacher_hidden, "teacher_hidden", 2, "[N, Ht]")
        t_weight = check_tensor(teacher_weight, "teacher_weight", 2, "[V, Ht]")
        if weight.shape[1] != hidden.shape[1]:
            raise ValueError(f"student_weight must be [V, Hs] with Hs = {hidden.shape[1]}, got {list(weight.shape)}")
        if t_weight.shape[1] != t_hidden.shape[1]:
            raise ValueError(f"teacher_weight must be [V, Ht] with Ht = {t_hidden.shape[1]}, got {list(t_weight.shape)}")
        if t_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"teacher_weight has V = {t_weight.shape[0]} rows but student_weight has {weight.shape[0]}")
        if t_hidden.shape[0] != hidden.shape[0]:
            raise ValueError(f"teacher_hidden has {t_hidden.shape[0]} rows but student_hidden has {hidden.shape[0]}")
        vocab = weight.shape[0]
        if vocab == 0:
            raise ValueError("student_weight has no rows: an empty vocabulary (V = 0)")
        autocast = autocast_dtype(hidden.device) is not None  # (its matrix products take mixed dtypes)
        for side, side_hidden, side_weight, bias in (("student", hidden, weight, student_bias),
                                                     ("teacher", t_hidden, t_weight, teacher_bias)):
            if side_weight.dtype != side_hidden.dtype and not autocast:
                raise TypeError(f"{side}_weight dtype {side_weight.dtype} must match {side}_hidden dtype "
                                f"{side_hidden.dtype} (outside torch.autocast)")
            if bias is not None:
                check_tensor(bias, f"{side}_bias", 1, f"[V] = [{vocab}] (or None)")
                if bias.shape[0] != vocab:
                    raise ValueError(f"{side}_bias must have shape [V] = [{vocab}], got {list(bias.shape)}")
                if bias.dtype != side_weight.dtype and not autocast:
                    raise TypeError(f"{side}_bias dtype {bias.dtype} must match {side}_weight dtype "
                                    f"{side_weight.dtype}")
        for name, tensor in (("student_weight", weight), ("student_bias", student_bias), ("teacher_hidden", t_hidden),
                             ("teacher_weight", t_weight), ("teacher_bias", teacher_bias)):
            if tensor is not None:
                check_same_device(hidden, "student_hidden", tensor, name)
        flat_labels = _check_labels(labels, hidden.shape[:1], hidden.device)
        chunk_rows = self.chunk_rows or max(1, _chunk_logits(hidden.device) // vocab)
        options = (
            _check_beta(self.beta_at(step)), 1.0 / self.temperature,  # (the options were checked when set)
            self.direction == "reverse", self.ignore_index,
            self.reduction, chunk_rows, self.float32_weight_grad, torch.is_grad_enabled(),
        )
        with torch.no_grad():  # the teacher side never takes a gradient
            t_hidden, t_weight = t_hidden.detach(), t_weight.detach()
            t_bias = None if teacher_bias is None else teacher_bias.detach()
        return _FusedLinearBridge.apply(hidden, weight, student_bias, t_hidden, t_weight, t_bias, flat_labels, options)
