"""dual_path_attention: attention with and without the dropped (image) keys in one pass, merged
into contrastive guidance (SPEC section 5).

One pass over K and V keeps two online-softmax states per query, one over the kept keys and one
over the dropped keys (each key feeds exactly one). With (m_1, l_1, a_1) and (m_2, l_2, a_2)
their running max, sum and value accumulators and m = max(m_1, m_2):
  o_uncond = a_1 / l_1                                            (language-only path)
  o_cond   = (a_1 e^(m_1 - m) + a_2 e^(m_2 - m)) / (l_1 e^(m_1 - m) + l_2 e^(m_2 - m))
  dO = o_cond - o_uncond,  u = o_uncond / (||o_uncond|| + eps),  out = o_cond + gamma (dO - <dO, u> u)
on the guided rows (other rows: o_cond). A row with no kept key (l_1 = 0) is not guided.
`fastprobe.reference.dual_path_attention` (two separate attention calls) is the specification.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import torch

from .. import reference
from ..backend import resolve
from ._common import (
    DTYPE_NAMES, PATCHED_MODEL_HINT, address, bool_as_uint8, check_int, check_op_tensors, check_real, cpp, custom_op,
    new_output, on_device, register_forward_only, runs_plain, without_autocast,
)
from .attention import (
    check_attention_inputs, check_mask, check_scale, check_segments, constant_tensor, key_bounds, new_attention_output,
    op_qkv_specs,
)

__all__ = ["dual_path_attention"]


@without_autocast
def _reference_kernel(q, k, v, args, out, o_cond, o_uncond) -> None:
    key_real = args["key_real"]
    real = (torch.ones(q.shape[0], k.shape[2], dtype=torch.bool, device=q.device) if key_real is None
            else key_real.bool())
    result = reference.dual_path_from_masks(
        q, k, v, real, real & ~args["drop"].bool(), gamma=args["gamma"], orthogonalize=args["orthogonalize"],
        eps=args["eps"], rows=args["rows"].bool(), scale=args["scale"], causal=args["causal"],
        window=args["window"] or None,
        key_range=reference.key_range_pairs(args["start"], args["horizon"], q.shape[2], args["causal"]),
    )
    out.copy_(result["out"])
    if o_cond is not None:
        o_cond.copy_(result["o_cond"])
        o_uncond.copy_(result["o_uncond"])


def _cpp_kernel(q, k, v, args, out, o_cond, o_uncond) -> None:
    batch, num_heads, num_queries, head_dim = q.shape
    cpp().dual_path_attention(
        DTYPE_NAMES[q.dtype],
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
        batch, num_heads, k.shape[1], num_queries, k.shape[2], head_dim, v.shape[3],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        args["scale"], args["causal"],
        address(args["key_real"]), args["drop"].data_ptr(), args["rows"].data_ptr(),
        args["gamma"], args["orthogonalize"], args["eps"], address(o_cond), address(o_uncond),
        torch.get_num_threads(), address(args["horizon"]), args["window"], address(args["start"]),
    )  # (by position, in the binding's order: keywords cost ~1 us each in pybind11)


@functools.lru_cache(maxsize=None)
def _triton_dual_attention():
    """The Triton launchers' module, imported on first use and then kept (as _common.cpp: an
    import statement costs ~0.3-0.5 us a call even when the module is loaded)."""
    from ..kernels import dual_attention

    return dual_attention


def _triton_kernel(q, k, v, args, out, o_cond, o_uncond) -> None:
    with on_device(q):
        _triton_dual_attention().dual_path_attention(q, k, v, out, o_cond, o_uncond, **args)


_KERNELS = {"reference": _reference_kernel, "cpp": _cpp_kernel, "triton": _triton_kernel}


def _outputs(q: torch.Tensor, value_dim: int, return_paths: bool) -> tuple:
    """out, o_cond, o_uncond, fresh (attention.new_attention_output); the paths None when not
    asked for."""
    if not return_paths:
        return new_attention_output(q, value_dim), None, None
    return tuple(new_attention_output(q, value_dim) for _ in range(3))


def _attend(q, k, v, args: dict, return_paths: bool) -> tuple:
    """The call on prepared arguments (see _dual_path_attention_op) by the backend that resolve
    picks, into fresh outputs (_outputs)."""
    outputs = _outputs(q, v.shape[-1], return_paths)
    if outputs[0].numel() > 0:
        _KERNELS[resolve(q.device, q.dtype, "dual_path_attention")](q, k, v, args, *outputs)
    return outputs


def _op_outputs(outputs: tuple) -> tuple:
    """The custom op's three tensors (it returns no None): absent paths are [0]."""
    out = outputs[0]
    return out, *(new_output((0,), out.device, out.dtype) if path is None else path for path in outputs[1:])


def _check_op_args(q, k, v, drop, rows, key_real, horizon, start, gamma, eps, scale, window) -> None:
    """What the kernels read through raw pointers, and the scalars they take, checked in the op:
    it is reachable directly (torch.ops.fastprobe.dual_path_attention), past
    dual_path_attention's checks, and every backend must refuse what one refuses (the C++ kernel
    raised on a NaN gamma or a scale <= 0 where the reference and Triton ran). Sizes come from
    q [B, Hq, Lq, D] and k [B, Hkv, Lk, D] (check_head_shapes: D, Dv >= 1, Hq % Hkv == 0, Lq <= Lk);
    the kernels check unit head-dim strides and clamp the key bounds."""
    q_shape, num_keys, qkv_specs = op_qkv_specs("dual_path_attention", q, k, v)
    check_real(gamma, "gamma", positive=False)
    check_real(eps, "eps", positive=True)
    check_scale(scale, q_shape[3])
    check_int(window, "window", 0)  # (0: none)
    batch, num_queries = q_shape[0], q_shape[2]
    keys = (batch, num_keys)
    check_op_tensors("dual_path_attention", q.device, (
        *qkv_specs,
        ("drop", drop, keys, torch.uint8, True),
        ("rows", rows, (batch, num_queries), torch.uint8, True),
        ("key_real", key_real, keys, torch.uint8, True),
        ("horizon", horizon, keys, torch.int64, True),
        ("start", start, keys, torch.int64, True),
    ))


@custom_op("fastprobe::dual_path_attention")
def _dual_path_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop: torch.Tensor,
    rows: torch.Tensor,
    key_real: Optional[torch.Tensor],
    gamma: float,
    orthogonalize: bool,
    eps: float,
    scale: float,
    causal: bool,
    horizon: Optional[torch.Tensor],
    start: Optional[torch.Tensor],
    window: int,
    return_paths: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op on prepared arguments: drop uint8 [B, Lk], rows uint8 [B, Lq], key_real uint8
    [B, Lk] or None, start and horizon int64 [B, Lk] or None (attention.key_bounds), window 0: none.
    What torch.compile, autograd and dispatch modes see; plain eager calls take _attend directly."""
    _check_op_args(q, k, v, drop, rows, key_real, horizon, start, gamma, eps, scale, window)
    args = dict(drop=drop, rows=rows, key_real=key_real, gamma=gamma, orthogonalize=orthogonalize, eps=eps,
                scale=scale, causal=causal, horizon=horizon, start=start, window=window)
    return _op_outputs(_attend(q, k, v, args, return_paths))


@_dual_path_attention_op.register_fake
def _(q, k, v, drop, rows, key_real, gamma, orthogonalize, eps, scale, causal, horizon, start, window, return_paths):
    return _op_outputs(_outputs(q, v.shape[-1], return_paths))  # (new_output makes fake or meta tensors here, like q)


register_forward_only(_dual_path_attention_op, "dual_path_attention", " (it steers generation)", inputs="q, k and v",
                      after=PATCHED_MODEL_HINT)


def _check_rows(rows, batch: int, num_queries: int, q: torch.Tensor) -> torch.Tensor:
    """rows as uint8 [B, Lq] ("last" and "all": a constant_tensor, made once)."""
    if isinstance(rows, str):
        if rows not in ("last", "all"):
            raise ValueError(f"rows must be 'last', 'all' or a boolean mask over query rows, got {rows!r}")
        return constant_tensor(("guided rows", rows, batch, num_queries), q.device,
                               lambda where: bool_as_uint8(reference.guidance_rows(rows, batch, num_queries, where)))
    if not isinstance(rows, torch.Tensor):
        raise TypeError(f"rows must be 'last', 'all' or a boolean tensor [Lq] or [B, Lq], got {type(rows).__name__}")
    shape = (num_queries,) if rows.dim() == 1 else (batch, num_queries)
    mask = check_mask(rows, "rows", shape, "[Lq] or [B, Lq]", q)
    return mask.expand(batch, num_queries).contiguous()


def dual_path_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    drop_keys: torch.Tensor,
    *,
    gamma: float,
    orthogonalize: bool = True,
    eps: float = 1e-6,
    rows: Union[str, torch.Tensor] = "last",
    scale: Optional[float] = None,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    return_paths: bool = False,
    bidirectional_blocks: Optional[torch.Tensor] = None,
    window: Optional[int] = None,
    segment_ids: Optional[torch.Tensor] = None,
):
    """Contrastive attention guidance in one pass: attention with every key (o_cond) and
    without the dropped keys (o_uncond, e.g. without image tokens), merged as
    out = o_cond + gamma * (o_cond - o_uncond) with the part along o_uncond removed.

    Args:
        q, k, v: as in sink_attention ([B, Hq, Lq, D], [B, Hkv, Lk, D] and [B, Hkv, Lk, Dv],
            grouped-query heads).
        drop_keys: [B, Lk] bool, True = a key the language-only path does not see (image token).
        gamma: guidance strength, a Python float (0: out is o_cond exactly, which is plain
            attention to float rounding: not sink_attention's bits). Under torch.compile each
            value compiles a graph of its own (as SDPA's scale does): a sweep
            over more than torch._dynamo.config.recompile_limit (8) values runs the rest eagerly.
        orthogonalize: remove the component of the difference along o_uncond (per head).
        eps: added to ||o_uncond|| before dividing (> 0).
        rows: "last" (default, the token being generated), "all", or a bool mask [Lq] or
            [B, Lq] of the query rows to guide; other rows get o_cond.
        scale, causal, key_padding_mask, bidirectional_blocks, window, segment_ids: as in
            sink_attention (there are no sink keys here).
        return_paths: also return o_cond and o_uncond.

    Returns:
        out [B, Hq, Lq, Dv] in q's dtype, or (out, o_cond, o_uncond) with return_paths. A row
        whose visible keys are all dropped has no language-only path: it is not guided
        (out = o_cond there) and its o_uncond is 0. NaN propagates as in sink_attention: a row
        that sees a NaN score (NaN in q or k, a +inf key) gets NaN out and o_cond, and NaN
        o_uncond when that score is a kept key's. Forward only.
    """
    q, k, v, batch, num_queries, num_keys = check_attention_inputs(q, k, v)
    drop = check_mask(drop_keys, "drop_keys", (batch, num_keys), "[B, Lk]", q)
    if drop is None:
        raise TypeError("drop_keys must be a boolean tensor of shape [B, Lk], got None")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    for name, flag in (("orthogonalize", orthogonalize), ("return_paths", return_paths)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    spans = check_segments(segment_ids, (batch, num_keys), q)
    start, horizon = key_bounds(bidirectional_blocks, spans, (batch, num_keys), num_queries, causal, q)
    args = dict(
        q=q, k=k, v=v, drop=drop,
        rows=_check_rows(rows, batch, num_queries, q),
        key_real=check_mask(key_padding_mask, "key_padding_mask", (batch, num_keys), "[B, Lk]", q),
        gamma=check_real(gamma, "gamma", positive=False),
        orthogonalize=orthogonalize,
        eps=check_real(eps, "eps", positive=True),
        scale=check_scale(scale, q.shape[-1]),
        causal=causal,
        horizon=horizon,
        start=start,
        window=0 if window is None else check_int(window, "window", 1),
    )
    if runs_plain(args.values()):  # eager, nothing for the dispatcher: no custom op between
        out, o_cond, o_uncond = _attend(args.pop("q"), args.pop("k"), args.pop("v"), args, return_paths)
    else:
        out, o_cond, o_uncond = _dual_path_attention_op(**args, return_paths=return_paths)
    return (out, o_cond, o_uncond) if return_paths else out
