"""sink_attention: attention with sink tokens, a sliding window, head masks, grouped-query
heads and per-head statistics read from the running softmax.

For query i at position p = Lk - Lq + i (queries are the last Lq positions, so prefill and
decoding with a KV cache both work), visible keys j, s_j = scale q_i . k_j and an optional
per-head sink logit c (one more, value-less entry of the softmax):
  p_j = exp(s_j - lse),  lse = log(sum_j exp(s_j) + exp(c))
  out = sum_j p_j v_j,  sink_mass = sum_{first stat_tokens real keys} p_j,
  group_mass[g] = sum_{group_j = g} p_j,  entropy = -sum_j p_j log p_j - p_c log p_c
The kernels keep these as extra accumulators of a blocked online softmax: no [Lq, Lk]
matrix is ever materialised. `fastprobe.reference.sink_attention` is the specification.
"""

from __future__ import annotations

import functools
import numbers
import operator
from typing import Callable, NamedTuple, Optional

import torch

from .. import reference
from ..backend import resolve
from ._common import (
    DTYPE_NAMES, FLOAT32_MAX, FLOAT32_TINY, PATCHED_MODEL_HINT, address, autocast_cast, bool_as_uint8, check_dtype,
    check_float32_range, check_int, check_op_tensors, check_real, check_same_device, check_tensor, cpp, custom_op,
    first_bad_index, is_compiling, new_output, new_output_like, on_device, output_dtype, plain_mode,
    refuse_dtensor, register_forward_only, runs_plain, skips_host_checks, without_autocast,
)

__all__ = [
    "AttentionOutput", "BlockHorizon", "KeyGroups", "KeyMasks", "SegmentSpans", "block_horizon", "key_masks",
    "prepare_key_groups", "segment_spans", "sink_attention",
]


class AttentionOutput(NamedTuple):
    """Result of sink_attention. Statistics are float32 (float64 for float64 input)."""

    out: torch.Tensor  # [B, Hq, Lq, Dv], input dtype; a view of a [B, Lq, Hq, Dv] buffer
    lse: torch.Tensor  # [B, Hq, Lq], natural log of the softmax denominator (sink included)
    sink_mass: torch.Tensor  # [B, Hq, Lq], weight on the first stat_tokens real keys
    group_mass: Optional[torch.Tensor]  # [B, Hq, Lq, G] with key_groups, else None
    entropy: Optional[torch.Tensor]  # [B, Hq, Lq] with return_entropy=True, else None


class KeyMasks(NamedTuple):
    """A key padding mask in the kernels' form, made once by key_masks and reusable as
    sink_attention's key_padding_mask by every call with the same keys, num_sink and
    stat_tokens (the layers of one forward): it skips re-checking the mask and re-deriving
    where each row's sinks and statistics tokens end."""

    key_real: Optional[torch.Tensor]  # uint8 [B, Lk], 1 = real key, or None (all real)
    # int64 [B]: real keys j < sink_end[b] are sinks; with segments [B, Lk]: the sinks of the
    # query at p are the real keys of its segment j < sink_end[b, p]
    sink_end: torch.Tensor
    stat_end: torch.Tensor  # the same for the keys that count in sink_mass
    num_sink: int
    stat_tokens: int
    num_keys: Optional[int] = None  # the Lk it was made for, checked on reuse (None: not checked)


def key_masks(key_padding_mask: Optional[torch.Tensor], batch: int, num_keys: int, *, num_sink: int = 0,
              stat_tokens: int = 1, device=None, segment_ids=None) -> KeyMasks:
    """key_padding_mask ([B, Lk] bool or 0/1, True = real key, or None) in the kernels' form;
    with segment_ids (ids or SegmentSpans) the sinks and statistics keys are counted in every
    segment afresh, and only calls with those segments may reuse it. Its tensors are the caller's
    own (without padding, copies of the ends that unmasked calls share)."""
    num_sink = check_int(num_sink, "num_sink", 0)
    stat_tokens = check_int(stat_tokens, "stat_tokens", 0)
    if key_padding_mask is None and segment_ids is None:
        shared = _constant_key_masks(batch, num_keys, num_sink, stat_tokens, device)
        return shared._replace(sink_end=shared.sink_end.clone(), stat_end=shared.stat_end.clone(), num_keys=num_keys)
    key_real = check_mask(key_padding_mask, "key_padding_mask", (batch, num_keys), "[B, Lk]", key_padding_mask)
    if key_real is not None:
        device = key_real.device
    if segment_ids is not None:
        anchor = key_real if key_real is not None else getattr(segment_ids, "start", segment_ids)  # (its device)
        spans = check_segments(segment_ids, (batch, num_keys), anchor)
        return KeyMasks(key_real, _segment_real_keys_end(key_real, spans, num_sink),
                        _segment_real_keys_end(key_real, spans, stat_tokens), num_sink, stat_tokens, num_keys)
    return KeyMasks(
        key_real,
        _first_real_keys_end(key_real, batch, num_keys, num_sink, device),
        _first_real_keys_end(key_real, batch, num_keys, stat_tokens, device),
        num_sink,
        stat_tokens,
        num_keys,
    )


def _check_key_masks(masks: KeyMasks, batch: int, num_keys: int, num_sink, stat_tokens, q: torch.Tensor,
                     segmented: bool) -> KeyMasks:
    """A reused KeyMasks must have been made for these keys and options (and with segments
    exactly when the call has them). Every layer of a forward checks it again (a NamedTuple holds
    no mark, and resize_ or set_ could change a tensor after a check): each tensor's metadata is
    read once, q's device once."""
    if masks.num_sink != num_sink or masks.stat_tokens != stat_tokens:
        raise ValueError(
            f"key_padding_mask is a KeyMasks made for num_sink={masks.num_sink}, stat_tokens={masks.stat_tokens}, "
            f"but this call has num_sink={num_sink}, stat_tokens={stat_tokens}"
        )
    if masks.num_keys is not None and masks.num_keys != num_keys:  # (without key_real, nothing else says)
        raise ValueError(f"key_padding_mask is a KeyMasks made for Lk = {masks.num_keys} keys, but this call has "
                         f"Lk = {num_keys}; make one for these keys with key_masks")
    ends = (batch, num_keys) if segmented else (batch,)
    if isinstance(masks.sink_end, torch.Tensor) and masks.sink_end.dim() != len(ends):
        raise ValueError("key_padding_mask is a KeyMasks made " + ("without segments, but this call has segment_ids; "
                         "make it with key_masks(..., segment_ids=...)" if segmented else
                         "for segments, but this call has no segment_ids"))
    device = q.device
    for name, tensor, shape, dtype in (
        ("key_real", masks.key_real, (batch, num_keys), torch.uint8),
        ("sink_end", masks.sink_end, ends, torch.int64),
        ("stat_end", masks.stat_end, ends, torch.int64),
    ):
        if tensor is None and name == "key_real":
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"key_padding_mask is a KeyMasks whose {name} is a {type(tensor).__name__}, not a tensor")
        if tensor.device != device:
            check_same_device(q, "q", tensor, f"key_padding_mask.{name}")
        if tensor.shape != shape:
            raise ValueError(f"key_padding_mask is a KeyMasks whose {name} has shape {tuple(tensor.shape)}, not {list(shape)}")
        if tensor.dtype != dtype or not tensor.is_contiguous():  # what the kernels read
            raise TypeError(f"key_padding_mask is a KeyMasks whose {name} is not a contiguous {dtype} tensor "
                            f"(got {tensor.dtype}); make it with key_masks")
    return masks


def _segment_real_keys_end(real: Optional[torch.Tensor], spans: "SegmentSpans", count: int) -> torch.Tensor:
    """end [B, Lk] int64 such that the first `count` real keys of p's segment are exactly its
    real keys j < end[b, p] (fewer: just past the segment). No host sync."""
    start, last = spans
    count = min(count, start.shape[-1])  # (past Lk: every key; added to int64 positions it overflowed)
    if count == 0:
        return start.clone()
    if real is None:
        return torch.minimum(start + count, last + 1)
    # real keys before each position, and the count that p's segment's count-th real key makes
    before = torch.nn.functional.pad(real.clamp(max=1).cumsum(-1, dtype=torch.int64), (1, 0))  # [B, Lk + 1]
    # (clamped: any nonzero byte is one real key, see _first_real_keys_end)
    # (a hand-made SegmentSpans is not re-checked: its starts are clamped into before's [0, Lk]
    # for the gather, which would index outside it, a device-side assert on CUDA; checked ones are
    # in [0, p] already, and the kernels clamp the starts they read themselves)
    target = before.gather(1, start.clamp(0, before.shape[1] - 1)) + count
    # before[p + 1] >= target first at the count-th real key p (before is non-decreasing)
    position = torch.searchsorted(before[:, 1:].contiguous(), target.contiguous())
    return torch.minimum(position + 1, last + 1)


_CONSTANTS: dict = {}  # (what, its sizes..., device) -> a tensor that is only ever read
_CONSTANT_MASKS: dict = {}  # (B, both ends, num_sink, stat_tokens, device) -> KeyMasks of kept ends
_KEPT_AT_MOST = 256  # entries of either cache: a full one is emptied (sizes past it are rare, and cheap to remake)


def constant_tensor(key: tuple, device, make: Callable[[torch.device], torch.Tensor]) -> torch.Tensor:
    """make(device), made once per (key, device) and then reused: tensors that every call of a
    kind reads and none writes (the key ends of calls without a padding mask, dual_path_attention's
    guided rows), so such a call allocates and fills nothing for them (host time is most of a
    short call's, bench/NOTES.md). Made fresh, and not kept, while tracing or compiling, under a
    dispatch mode (fake tensors) or while capturing a CUDA graph (a tensor made inside a capture
    is filled only at replay). (Looked up in plain mode only: a traced size is a SymInt, which
    has no hash.)"""
    plain = plain_mode()
    if plain:
        kept = _CONSTANTS.get((*key, device))  # (a tensor's device: already in the key's form)
        if kept is not None:
            return kept
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not plain:  # traced, compiled or under a dispatch mode (fake tensors): never kept
        return make(device)
    kept = _CONSTANTS.get((*key, device))
    if kept is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return make(device)
        with torch.inference_mode(False):  # a plain tensor, also when first made in inference mode
            kept = make(device)
        if device.type == "cuda":  # filled before any stream reads it
            torch.cuda.current_stream(device).synchronize()
        if len(_CONSTANTS) >= _KEPT_AT_MOST:
            _CONSTANTS.clear()
            _CONSTANT_MASKS.clear()
        _CONSTANTS[(*key, device)] = kept
    return kept


def is_kept_constant(key: tuple, tensor: torch.Tensor) -> bool:
    """Whether constant_tensor kept `tensor` for key (not one made fresh while tracing, compiling
    or capturing)."""
    return _CONSTANTS.get((*key, tensor.device)) is tensor


def _constant_ends(batch: int, end: int, device) -> torch.Tensor:
    """torch.full((batch,), end), a constant_tensor: the key ends of every call without a padding mask."""
    return constant_tensor(("key ends", batch, end), device,
                           lambda where: torch.full((batch,), end, dtype=torch.int64, device=where))


def _constant_key_masks(batch: int, num_keys: int, num_sink: int, stat_tokens: int, device) -> KeyMasks:
    """key_masks without padding or segments: the same ends in every row, from _constant_ends,
    and the KeyMasks itself kept with them (one lookup per call; a decoding step's longer keys
    find the same one)."""
    ends_at = (min(num_sink, num_keys), min(stat_tokens, num_keys))
    plain = plain_mode()  # (else never looked up nor kept: traced sizes are SymInts, which have no hash)
    if plain:
        masks = _CONSTANT_MASKS.get((batch, *ends_at, num_sink, stat_tokens, device))
        if masks is not None:  # (a tensor's device is already in the key's form)
            return masks
    ends = [_constant_ends(batch, end, device) for end in ends_at]
    masks = KeyMasks(None, *ends, num_sink, stat_tokens)
    kept = plain and all(is_kept_constant(("key ends", batch, end), tensor) for end, tensor in zip(ends_at, ends))
    if kept:  # (neither made fresh while tracing, compiling or capturing)
        if len(_CONSTANT_MASKS) >= _KEPT_AT_MOST:  # (its own: num_sink or stat_tokens past Lk add keys, not ends)
            _CONSTANT_MASKS.clear()
        _CONSTANT_MASKS[(batch, *ends_at, num_sink, stat_tokens, ends[0].device)] = masks
    return masks


def _first_real_keys_end(real: Optional[torch.Tensor], batch: int, num_keys: int, count: int, device) -> torch.Tensor:
    """end [B] int64 such that the first `count` real keys of row b are exactly the real keys
    j < end[b] (when the row has fewer real keys: an end past all of them). No host sync."""
    count = min(count, num_keys)  # (past Lk: every key; compared with int32 sums, 2^31 and up wrapped)
    if real is None or count == 0:  # (no key: count 0; argmax of an empty row would raise)
        return _constant_ends(batch, count, device)
    # real: uint8, any nonzero byte a real key as the kernels read it (a bool mask's bytes are not
    # all 0/1 when made by view(torch.bool) of other bytes): counted as 1 each
    if count == 1:  # just past the first real key (a row without one has nothing to count anyway)
        return real.clamp(max=1).argmax(-1) + 1
    reached = real.clamp(max=1).cumsum(-1, dtype=torch.int32) >= count
    first = reached.to(torch.int8).argmax(-1) + 1
    return torch.where(reached.any(-1), first, torch.full_like(first, num_keys))


# Every backend's path: the prepared arguments of _sink_attention_op and its preallocated
# outputs -> None. key_real uint8 [B, Lk] or None (all real); sink_end, stat_end int64 [B] (or
# [B, Lk] per position with segments, see KeyMasks);
# head_mask uint8 [Hq] or None; sink_logit float32 [Hq] or None; key_groups int32 [B, Lk] or None;
# start, horizon int64 [B, Lk] or None (key_bounds).


@without_autocast
def _reference_kernel(q, k, v, args, out, lse, sink_mass, group_mass, entropy) -> None:
    batch, num_queries, num_keys = q.shape[0], q.shape[2], k.shape[2]
    key_index = torch.arange(num_keys, device=q.device)
    real = torch.ones(batch, num_keys, dtype=torch.bool, device=q.device) if args["key_real"] is None else args["key_real"].bool()
    # sink keys j < sink_end[b] (the row's), or with per-position ends j < sink_end[b, p] (the
    # query's: [B, Lq, Lk]); the same for the statistics keys
    sink, stat = (real & (key_index < ends[:, None]) if ends.dim() == 1
                  else real[:, None, :] & (key_index < ends[:, num_keys - num_queries:, None])
                  for ends in (args["sink_end"], args["stat_end"]))
    result = reference.attention_from_masks(
        q, k, v, real, sink, stat,
        scale=args["scale"], causal=args["causal"], window=args["window"] or None,
        head_mask=args["head_mask"], sink_logit=args["sink_logit"],
        key_groups=args["key_groups"], num_groups=args["num_groups"], softcap=args["softcap"] or None,
        key_range=reference.key_range_pairs(args["start"], args["horizon"], num_queries, args["causal"]),
    )
    out.copy_(result["out"])
    lse.copy_(result["lse"])
    sink_mass.copy_(result["sink_mass"])
    if group_mass is not None:
        group_mass.copy_(result["group_mass"])
    if entropy is not None:
        entropy.copy_(result["entropy"])


def _cpp_kernel(q, k, v, args, out, lse, sink_mass, group_mass, entropy) -> None:
    batch, num_heads, num_queries, head_dim = q.shape
    # every argument by position, in the binding's order (csrc/attention.cpp): pybind11 matches
    # keywords by name, ~1 us each, which a decoding step's call pays per layer
    cpp().sink_attention(
        DTYPE_NAMES[q.dtype],
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
        batch, num_heads, k.shape[1], num_queries, k.shape[2], head_dim, v.shape[3],
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        args["scale"], args["causal"], args["window"],
        address(args["key_real"]), args["sink_end"].data_ptr(), args["stat_end"].data_ptr(),
        address(args["head_mask"]), address(args["sink_logit"]),
        address(args["key_groups"]), args["num_groups"],
        lse.data_ptr(), sink_mass.data_ptr(), address(group_mass), address(entropy),
        torch.get_num_threads(), args["softcap"], address(args["horizon"]),  # softcap, horizon
        address(args["start"]), args["sink_end"].dim() == 2,  # start, row_ends
    )


@functools.lru_cache(maxsize=None)
def _triton_attention():
    """The Triton launchers' module, imported on first use and then kept (as _common.cpp: an
    import statement costs ~0.3-0.5 us a call even when the module is loaded)."""
    from ..kernels import attention

    return attention


def _triton_kernel(q, k, v, args, out, lse, sink_mass, group_mass, entropy) -> None:
    with on_device(q):
        _triton_attention().sink_attention(q, k, v, out, lse, sink_mass, group_mass, entropy, **args)


_KERNELS = {"reference": _reference_kernel, "cpp": _cpp_kernel, "triton": _triton_kernel}


def new_attention_output(q: torch.Tensor, value_dim: int) -> torch.Tensor:
    """A fresh out [B, Hq, Lq, Dv] in q's dtype, strided as a [B, Lq, Hq, Dv] buffer: transformers'
    layout, whose transpose(1, 2) the integration hands on without a copy."""
    batch, num_heads, num_queries, _ = q.shape
    return new_output((batch, num_heads, num_queries, value_dim), q.device, q.dtype,
                      (num_queries * num_heads * value_dim, value_dim, num_heads * value_dim, 1))


def _outputs(q: torch.Tensor, value_dim: int, num_groups: Optional[int], return_entropy: bool):
    """(out, lse, sink_mass, group_mass, entropy), fresh: out from new_attention_output, the
    statistics contiguous; group_mass [B, Hq, Lq, G] only with num_groups, entropy only when asked
    for (else None)."""
    batch, num_heads, num_queries, _ = q.shape
    stats_shape, stats_dtype, device = (batch, num_heads, num_queries), output_dtype(q), q.device
    out = new_attention_output(q, value_dim)
    lse = new_output(stats_shape, device, stats_dtype)
    sink_mass = new_output_like(lse)
    group_mass = None if num_groups is None else new_output((*stats_shape, num_groups), device, stats_dtype)
    entropy = new_output_like(lse) if return_entropy else None
    return out, lse, sink_mass, group_mass, entropy


def _attend(q, k, v, args: dict, return_entropy: bool) -> tuple:
    """The call on prepared arguments (see _prepare) by the backend that resolve picks, into
    fresh outputs (_outputs; group_mass with key_groups, entropy when asked for, else None)."""
    num_groups = None if args["key_groups"] is None else args["num_groups"]
    outputs = _outputs(q, v.shape[-1], num_groups, return_entropy)
    if outputs[0].numel() > 0 or outputs[1].numel() > 0:
        _KERNELS[resolve(q.device, q.dtype, "sink_attention")](q, k, v, args, *outputs)
    return outputs


def _op_outputs(outputs: tuple) -> tuple:
    """The custom op's five tensors (it returns no None): an absent group_mass is [B, Hq, Lq, 0],
    an absent entropy [0]."""
    out, lse, sink_mass, group_mass, entropy = outputs
    if group_mass is None:
        group_mass = new_output((*lse.shape, 0), lse.device, lse.dtype)
    if entropy is None:
        entropy = new_output((0,), lse.device, lse.dtype)
    return out, lse, sink_mass, group_mass, entropy


def op_qkv_specs(op: str, q, k, v) -> tuple:
    """(q's shape, Lk, check_op_tensors' specs of k and v) for an attention op's body: q, k, v 4-D,
    k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv] in q's dtype (any strides), one of INPUT_DTYPES, and
    check_head_shapes' rules, so that every backend refuses the same shapes before any kernel runs."""
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape  # (each .shape makes a torch.Size: read once)
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        raise ValueError(f"{op}: q, k and v must be 4-D, got {list(q_shape)}, {list(k_shape)}, {list(v_shape)}")
    check_dtype(q, f"{op}: q")
    check_head_shapes(q_shape, k_shape, v_shape, f"{op}: ")
    batch, head_dim, (_, num_kv_heads, num_keys, _) = q_shape[0], q_shape[3], k_shape
    return q_shape, num_keys, (("k", k, (batch, num_kv_heads, num_keys, head_dim), q.dtype, False),
                               ("v", v, (batch, num_kv_heads, num_keys, v_shape[3]), q.dtype, False))


def _check_op_args(q, k, v, scale, window, key_real, sink_end, stat_end, head_mask, sink_logit, key_groups,
                   num_groups, softcap, horizon, start) -> None:
    """What the kernels read through raw pointers, and the scalars they take, checked in the op:
    it is reachable directly (torch.ops.fastprobe.sink_attention), past sink_attention's checks,
    and every backend must refuse what one refuses (the C++ kernel raised on a NaN scale or a
    negative window or softcap where the reference and Triton ran). Sizes come from q [B, Hq, Lq,
    D] and k [B, Hkv, Lk, D] (check_head_shapes: D, Dv >= 1, Hq % Hkv == 0, Lq <= Lk); the kernels
    check unit head-dim strides and the values (group ids; ends and key bounds are clamped)."""
    q_shape, num_keys, qkv_specs = op_qkv_specs("sink_attention", q, k, v)
    batch, num_heads = q_shape[0], q_shape[1]
    check_scale(scale, q_shape[3])
    check_int(window, "window", 0)  # (0: none)
    if softcap != 0:  # (0: none; NaN is not 0)
        check_real(softcap, "softcap", positive=True)
    keys = (batch, num_keys)
    ends = keys if sink_end.dim() == 2 else (batch,)  # ([B, Lk]: per position, with segments)
    if key_groups is None:
        if num_groups != 0:  # (what the C++ kernel refuses; the others ignored it)
            raise ValueError(f"sink_attention: num_groups must be 0 without key_groups, got {num_groups}")
    else:
        check_num_groups(num_groups, "sink_attention: num_groups")
    check_op_tensors("sink_attention", q.device, (
        *qkv_specs,
        ("key_real", key_real, keys, torch.uint8, True),
        ("sink_end", sink_end, ends, torch.int64, True),
        ("stat_end", stat_end, ends, torch.int64, True),
        ("head_mask", head_mask, (num_heads,), torch.uint8, True),
        ("sink_logit", sink_logit, (num_heads,), None if sink_logit is None else output_dtype(q), True),
        ("key_groups", key_groups, keys, torch.int32, True),
        ("horizon", horizon, keys, torch.int64, True),
        ("start", start, keys, torch.int64, True),
    ))


@custom_op("fastprobe::sink_attention")
def _sink_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    window: int,
    key_real: Optional[torch.Tensor],
    sink_end: torch.Tensor,
    stat_end: torch.Tensor,
    head_mask: Optional[torch.Tensor],
    sink_logit: Optional[torch.Tensor],
    key_groups: Optional[torch.Tensor],
    num_groups: int,
    softcap: float,
    horizon: Optional[torch.Tensor],
    start: Optional[torch.Tensor],
    return_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op on prepared arguments (see _prepare); window 0 and softcap 0 mean none. What
    torch.compile, autograd and dispatch modes see; plain eager calls take _attend directly."""
    _check_op_args(q, k, v, scale, window, key_real, sink_end, stat_end, head_mask, sink_logit, key_groups, num_groups,
                   softcap, horizon, start)
    args = dict(
        scale=scale, causal=causal, window=window, key_real=key_real, sink_end=sink_end, stat_end=stat_end,
        head_mask=head_mask, sink_logit=sink_logit, key_groups=key_groups, num_groups=num_groups, softcap=softcap,
        horizon=horizon, start=start,
    )
    return _op_outputs(_attend(q, k, v, args, return_entropy))


@_sink_attention_op.register_fake
def _(q, k, v, scale, causal, window, key_real, sink_end, stat_end, head_mask, sink_logit, key_groups, num_groups, softcap, horizon,
      start, return_entropy):
    # (new_output makes fake or meta tensors here, like q)
    return _op_outputs(_outputs(q, v.shape[-1], None if key_groups is None else num_groups, return_entropy))


register_forward_only(_sink_attention_op, "sink_attention", inputs="q, k, v and sink_logit", after=PATCHED_MODEL_HINT)


# ---- Argument checks (before any kernel runs; every message names the argument). ----


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        # D ** -0.5 as a plain float: operator.index pins a symbolic head_dim (torch.compile
        # dynamic=True) to its value, a guard on D; of the SymInt itself the op's float argument
        # got a float guard that torch 2.4 could not evaluate, so it recompiled on every call
        return operator.index(head_dim) ** -0.5
    if type(scale) is float and FLOAT32_TINY <= scale <= FLOAT32_MAX:  # (the common case, without the ABC check)
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a positive number or None, got {type(scale).__name__}")
    return check_float32_range(float(scale), "scale", positive=True)


def check_mask(mask, name: str, shape: tuple, layout: str, reference_tensor: torch.Tensor) -> Optional[torch.Tensor]:
    """A boolean (or 0/1 integer) mask of `shape` as uint8, or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a boolean tensor of shape {layout}, got {type(mask).__name__}")
    if type(mask) is not torch.Tensor and not is_compiling():  # (a subclass: a DTensor is refused by name)
        refuse_dtensor(mask, name)
    check_same_device(reference_tensor, "q", mask, name)
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {list(shape)}, got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be a boolean or integer (0/1) tensor, got {mask.dtype}")
    if mask.dtype != torch.bool and not skips_host_checks(mask):
        bad = first_bad_index((mask != 0) & (mask != 1))
        if bad is not None:
            raise ValueError(f"{name} must hold only 0/1 (or True/False), got {mask[bad].item()} at {list(bad)}")
    if mask.dtype == torch.bool:
        return bool_as_uint8(mask.contiguous())  # same bytes: no copy, read-only in the kernels
    return (mask != 0).to(torch.uint8).contiguous()


def _check_key_ids(ids, name: str, what: str, shape: tuple, q: torch.Tensor) -> None:
    """ids (key_groups, bidirectional_blocks) must be an integer tensor [B, Lk] on q's device."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be an integer tensor of shape [B, Lk], got {type(ids).__name__}")
    check_same_device(q, "q", ids, name)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor ({what}), got {ids.dtype}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape [B, Lk] = {list(shape)}, got {tuple(ids.shape)}")


class KeyGroups(NamedTuple):
    """key_groups in the kernels' form, made once by prepare_key_groups and reusable by every
    call with the same keys (the layers of one forward): it skips re-checking the ids' range (a
    host sync per call). It holds its own copy of the ids; a KeyGroups built by hand, or whose ids
    were changed, is not re-checked: the C++ kernel then refuses an id outside [0, num_groups),
    the Triton kernel counts such a key in no group."""

    ids: torch.Tensor  # int32 [B, Lk], contiguous, every id in [0, num_groups)
    num_groups: int


def prepare_key_groups(key_groups: torch.Tensor, num_groups: Optional[int] = None) -> KeyGroups:
    """key_groups ([B, Lk] integer ids in [0, num_groups); num_groups default max id + 1)
    checked once and in the kernels' form, for calls with these keys."""
    shape = tuple(getattr(key_groups, "shape", ()))
    if isinstance(key_groups, torch.Tensor) and key_groups.dim() != 2:
        raise ValueError(f"key_groups must have shape [B, Lk], got {shape}")
    _check_key_ids(key_groups, "key_groups", "group ids", shape, key_groups)
    ids, num_groups = _checked_group_ids(key_groups, num_groups)
    # the caller's own int32 ids are copied: writing to them later cannot change what was checked
    return KeyGroups(ids.clone() if ids is key_groups else ids, num_groups)


INT32_MAX = 2**31 - 1  # the largest group count the kernels' int32 ids allow


def check_num_groups(num_groups, name: str = "num_groups") -> int:
    """G in [1, 2^31 - 1] (the kernels' group ids are int32; the C++ kernel refuses more, and
    group_mass [B, Hq, Lq, G] is allocated before it runs), or an error naming `name`."""
    num_groups = check_int(num_groups, name, 1)
    if num_groups > INT32_MAX:
        raise ValueError(f"{name} must fit the kernels' int32 group ids (<= 2**31 - 1), got {num_groups}")
    return num_groups


def _checked_group_ids(key_groups: torch.Tensor, num_groups) -> tuple[torch.Tensor, int]:
    """(int32 contiguous ids, G) with every id in [0, G): one host sync (two without
    num_groups), skipped under torch.compile and torch.func.vmap, which need num_groups; there an
    id outside [0, G) becomes -1 before the cast (not 2**32 + 1 -> 1): refused by the C++
    kernel, counted in no group by Triton's, as an unchecked KeyGroups."""
    given = key_groups
    if key_groups.dtype in (torch.uint16, torch.uint32, torch.uint64):  # (no max or comparison for them on the CPU)
        key_groups = key_groups.to(torch.int64)  # (an id >= 2**63 turns negative: refused as outside)
    if num_groups is None:
        if skips_host_checks(key_groups):
            raise ValueError("num_groups must be given where key_groups cannot be read (torch.compile, "
                             "torch.func.vmap, meta tensors): it sets the output shape")
        num_groups = max(int(key_groups.max()) + 1, 1) if key_groups.numel() else 1
        if num_groups > INT32_MAX:  # (the count is the ids' own: name them, not the num_groups not given)
            raise ValueError(f"key_groups must hold ids below 2**31 - 1 (the kernels' int32 ids), got {num_groups - 1}")
    num_groups = check_num_groups(num_groups)
    outside = (key_groups < 0) | (key_groups >= num_groups)
    if skips_host_checks(key_groups):
        key_groups = key_groups.masked_fill(outside, -1)
    else:
        bad = first_bad_index(outside)
        if bad is not None:
            raise ValueError(f"key_groups must hold ids in [0, num_groups = {num_groups}), got {given[bad].item()} "
                             f"at {list(bad)}")
    return key_groups.to(torch.int32).contiguous(), num_groups


def _check_key_groups(key_groups, num_groups, shape: tuple, q: torch.Tensor) -> tuple[Optional[torch.Tensor], int]:
    if key_groups is None:
        if num_groups is not None:
            raise ValueError("num_groups was given without key_groups")
        return None, 0
    if isinstance(key_groups, KeyGroups):
        prepared_count = check_num_groups(key_groups.num_groups, "key_groups.num_groups")
        if num_groups is not None and num_groups != prepared_count:
            raise ValueError(f"num_groups ({num_groups}) differs from the KeyGroups' num_groups ({prepared_count}); "
                             "leave it out")
        ids = _check_prepared(key_groups, "ids", "key_groups", "prepare_key_groups", shape, q, torch.int32)
        return ids, prepared_count
    _check_key_ids(key_groups, "key_groups", "group ids", shape, q)
    return _checked_group_ids(key_groups, num_groups)


class BlockHorizon(NamedTuple):
    """bidirectional_blocks in the kernels' form, made once by block_horizon and reusable by every
    causal call with the same keys and at most as many queries (the layers of one forward): it
    skips re-checking the blocks (a sort and a host sync per call)."""

    horizon: Optional[torch.Tensor]  # int64 [B, Lk] (see causal_horizon), or None: no block
    num_queries: int  # it was checked for the last num_queries positions as queries


def block_horizon(bidirectional_blocks: torch.Tensor, num_queries: int) -> BlockHorizon:
    """bidirectional_blocks ([B, Lk] block ids) checked and turned into the kernels' causal horizon
    for calls with up to num_queries queries."""
    if isinstance(bidirectional_blocks, torch.Tensor) and bidirectional_blocks.dim() != 2:
        raise ValueError(f"bidirectional_blocks must have shape [B, Lk], got {tuple(bidirectional_blocks.shape)}")
    shape = tuple(getattr(bidirectional_blocks, "shape", ()))
    num_queries = check_int(num_queries, "num_queries", 0)
    if shape and num_queries > shape[1]:
        raise ValueError(f"num_queries ({num_queries}) must be <= Lk ({shape[1]})")
    return BlockHorizon(causal_horizon(bidirectional_blocks, shape, num_queries, True, bidirectional_blocks), num_queries)


def _run_ends(goes_on: torch.Tensor) -> torch.Tensor:
    """int64 [B, Lk]: the last position of the run holding p, where goes_on[b, p] says that p's
    run goes on at p + 1."""
    num_keys = goes_on.shape[-1]
    position = torch.arange(num_keys, device=goes_on.device).expand_as(goes_on)
    run_end = torch.where(goes_on, num_keys, position)
    return run_end.flip(-1).cummin(-1).values.flip(-1)  # the first run end at or after p


def _split_id(ids: torch.Tensor, ignore_negative: bool) -> Optional[tuple[int, int]]:
    """(row, id) of the first id of ids [B, n] whose positions are not one run of consecutive
    positions (negative ids ignored with ignore_negative), or None. One host sync."""
    values, order = ids.sort(dim=-1, stable=True)  # equal ids in position order
    split = (values[:, 1:] == values[:, :-1]) & (order[:, 1:] - order[:, :-1] != 1)
    if ignore_negative:
        split &= values[:, 1:] >= 0
    bad = first_bad_index(split)
    return None if bad is None else (bad[0], int(values[bad[0], bad[1] + 1]))


def causal_horizon(blocks, shape: tuple, num_queries: int, causal: bool, q: torch.Tensor) -> Optional[torch.Tensor]:
    """bidirectional_blocks ([B, Lk] integer ids; negative: no block, or a BlockHorizon) as the
    kernels' causal horizon: int64 [B, Lk], horizon[b, p] = the last position of the run of equal
    ids holding p (p itself outside blocks), so that with causal the query at p sees keys
    j <= horizon[b, p]. None without blocks or without causal (blocks then change nothing). A
    block must be one run from any query position on: an id that resumes after other tokens
    would make a query see keys beyond a gap, which no horizon says."""
    if blocks is None:
        return None
    if isinstance(blocks, BlockHorizon):
        return _check_block_horizon(blocks, shape, num_queries, q) if causal else None
    _check_key_ids(blocks, "bidirectional_blocks", "block ids", shape, q)
    if not causal or blocks.numel() == 0:
        return None
    ids = blocks.to(torch.int64).clamp(min=-1)  # every negative id: no block
    # a run goes on at p + 1 when p + 1 holds p's id >= 0
    goes_on = torch.zeros_like(ids, dtype=torch.bool)
    goes_on[:, :-1] = (ids[:, 1:] == ids[:, :-1]) & (ids[:, :-1] >= 0)
    if not skips_host_checks(ids):
        split = _split_id(ids[:, shape[1] - num_queries:], ignore_negative=True)
        if split is not None:
            raise ValueError(
                f"bidirectional_blocks must give each block one contiguous run of positions from the first query "
                f"on; block id {split[1]} of row {split[0]} resumes after other tokens"
            )
    return _run_ends(goes_on).contiguous()


class SegmentSpans(NamedTuple):
    """segment_ids in the kernels' form, made once by segment_spans and reusable by every call
    with the same keys (the layers of one forward): it skips re-checking the segments (a sort
    and a host sync per call). One built by hand, or changed after its check, is not re-checked
    either: the kernels clamp a start to [0, p] and an end to [p, Lk - 1], and nothing indexes
    outside a buffer with them."""

    start: torch.Tensor  # int64 [B, Lk]: the first position of the segment holding p
    end: torch.Tensor  # int64 [B, Lk]: its last position


def segment_spans(segment_ids: torch.Tensor) -> SegmentSpans:
    """segment_ids ([B, Lk] integer ids, each segment one run of consecutive positions) checked
    and turned into the kernels' per-position key bounds."""
    shape = tuple(getattr(segment_ids, "shape", ()))
    if isinstance(segment_ids, torch.Tensor) and segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must have shape [B, Lk], got {shape}")
    return check_segments(segment_ids, shape, segment_ids)


def check_segments(segments, shape: tuple, q: torch.Tensor) -> Optional[SegmentSpans]:
    """segment_ids (ids [B, Lk] or a SegmentSpans) checked against the call (shape, q's device)
    and in the kernels' form, or None."""
    if segments is None:
        return None
    if isinstance(segments, SegmentSpans):
        for field in ("start", "end"):
            _check_prepared(segments, field, "segment_ids", "segment_spans", shape, q)
        return segments
    _check_key_ids(segments, "segment_ids", "segment ids", shape, q)
    ids = segments.to(torch.int64)
    if not skips_host_checks(ids) and ids.numel() > 0:
        split = _split_id(ids, ignore_negative=False)
        if split is not None:
            raise ValueError(f"segment_ids must give each segment one contiguous run of positions; segment id "
                             f"{split[1]} of row {split[0]} resumes after other tokens")
    goes_on = torch.zeros_like(ids, dtype=torch.bool)
    goes_on[:, :-1] = ids[:, 1:] == ids[:, :-1]
    # p starts a run unless p - 1 goes on into it: the start is the latest run start at or before p
    starts_here = torch.ones_like(goes_on)
    starts_here[:, 1:] = ~goes_on[:, :-1]
    position = torch.arange(shape[1], device=ids.device).expand_as(ids)
    start = torch.where(starts_here, position, 0).cummax(-1).values
    return SegmentSpans(start.contiguous(), _run_ends(goes_on).contiguous())


def key_bounds(blocks, spans: Optional[SegmentSpans], shape: tuple, num_queries: int, causal: bool,
               q: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(start, horizon): the kernels' per-position key bounds, int64 [B, Lk] or None, from the
    blocks and the checked segments (check_segments). The query at p sees keys
    start[b, p] <= j <= horizon[b, p] (the kernels clamp both around p); without a horizon:
    j <= p causal, every later key otherwise. Blocks extend the causal bound, the segment ends
    limit it."""
    horizon = causal_horizon(blocks, shape, num_queries, causal, q)
    if spans is None:
        return None, horizon
    if not causal:
        return spans.start, spans.end
    return spans.start, None if horizon is None else torch.minimum(horizon, spans.end)


def _check_block_horizon(blocks: BlockHorizon, shape: tuple, num_queries: int,
                         q: torch.Tensor) -> Optional[torch.Tensor]:
    """A reused BlockHorizon must have been made for these keys and at least these queries."""
    if blocks.num_queries < num_queries:
        raise ValueError(f"bidirectional_blocks is a BlockHorizon checked for {blocks.num_queries} queries, but this "
                         f"call has {num_queries}; make it with block_horizon(blocks, {num_queries})")
    if blocks.horizon is None:
        return None
    return _check_prepared(blocks, "horizon", "bidirectional_blocks", "block_horizon", shape, q)


def _check_prepared(prepared: NamedTuple, field: str, argument: str, maker: str, shape: tuple,
                    q: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A prepared form's (BlockHorizon, SegmentSpans, KeyGroups) tensor field must be what the
    kernels read: a contiguous tensor of `dtype` and `shape` on q's device."""
    tensor, kind = getattr(prepared, field), type(prepared).__name__
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{argument} is a {kind} whose {field} is a {type(tensor).__name__}, not a tensor")
    check_same_device(q, "q", tensor, f"{argument}.{field}")
    if tuple(tensor.shape) != shape or tensor.dtype != dtype or not tensor.is_contiguous():
        kind_of = str(dtype).removeprefix("torch.")
        raise ValueError(f"{argument} is a {kind} whose {field} is not a contiguous {kind_of} tensor of shape "
                         f"{list(shape)} (got {tensor.dtype}, {tuple(tensor.shape)}); make it with {maker}")
    return tensor


def _kernel_layout(x: torch.Tensor) -> torch.Tensor:
    """The kernels read the head dimension contiguously; other strides are free."""
    return x if x.stride()[-1] == 1 else x.contiguous()  # (stride() whole: stride(-1) parses its argument, ~2x slower)


def _check_softcap(softcap) -> float:
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
    return check_float32_range(float(softcap), "softcap", positive=True)


def check_head_shapes(q_shape, k_shape, v_shape, where: str = "") -> None:
    """The shape rules of q [B, Hq, Lq, D], k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv] that every
    backend relies on, or a ValueError (its message after `where`, e.g. "sink_attention: "): head
    dims D, Dv >= 1, Hkv >= 1 dividing Hq (grouped-query attention), Lq <= Lk (the queries are the
    last Lq of the Lk positions)."""
    (_, num_heads, num_queries, head_dim), (_, num_kv_heads, num_keys, _), value_dim = q_shape, k_shape, v_shape[3]
    if head_dim == 0 or value_dim == 0:
        raise ValueError(f"{where}q, k and v need head dims >= 1, got D = {head_dim} and Dv = {value_dim}")
    if num_kv_heads == 0:
        raise ValueError(f"{where}k and v need at least one key/value head, got k of shape {tuple(k_shape)}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"{where}the number of query heads ({num_heads}) must be a multiple of the number of key/value heads "
            f"({num_kv_heads}) for grouped-query attention"
        )
    if num_queries > num_keys:
        raise ValueError(
            f"{where}q has Lq = {num_queries} queries but k has only Lk = {num_keys} keys; queries are the last Lq of "
            "the Lk positions, so Lq <= Lk"
        )


def check_attention_inputs(q, k, v):
    """The checks every attention op shares: (q, k, v in the kernels' layout, B, Lq, Lk); v's
    head width Dv may differ from q and k's D (multi-head latent attention, e.g. DeepSeek-V3's
    D = 192, Dv = 128). (Each shape and q's device read once: a decoding step pays this per layer.)"""
    q = check_tensor(q, "q", 4, "[B, Hq, Lq, D]")
    k = check_tensor(k, "k", 4, "[B, Hkv, Lk, D]")
    v = check_tensor(v, "v", 4, "[B, Hkv, Lk, Dv]")
    device = q.device
    if k.device != device or v.device != device:
        check_same_device(q, "q", k, "k")
        check_same_device(q, "q", v, "v")
    q, k, v = autocast_cast((q, k, v), device)  # (as SDPA under torch.autocast)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    batch, _, num_queries, head_dim = q_shape
    if k_shape[:3] != v_shape[:3]:
        raise ValueError(
            f"k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv] must agree on B, Hkv and Lk, got {tuple(k_shape)} and {tuple(v_shape)}"
        )
    if k_shape[0] != batch:
        raise ValueError(f"k has batch size {k_shape[0]} but q has {batch}")
    key_head_dim = k_shape[3]
    if key_head_dim != head_dim:
        raise ValueError(f"k has head dim {key_head_dim} but q has {head_dim}; they must match")
    check_head_shapes(q_shape, k_shape, v_shape)
    return _kernel_layout(q), _kernel_layout(k), _kernel_layout(v), batch, num_queries, k_shape[2]


def _prepare(q, k, v, scale, causal, window, num_sink, key_padding_mask, head_mask, sink_logit, key_groups, num_groups, stat_tokens, softcap,
             bidirectional_blocks, segment_ids):
    q, k, v, batch, num_queries, num_keys = check_attention_inputs(q, k, v)
    num_heads, head_dim = q.shape[1], q.shape[3]
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    window = 0 if window is None else check_int(window, "window", 1)
    num_sink = check_int(num_sink, "num_sink", 0)
    stat_tokens = check_int(stat_tokens, "stat_tokens", 0)
    keys = (batch, num_keys)
    # (the options a plain call leaves None skip their checks' calls: a decoding step pays these per layer)
    spans = None if segment_ids is None else check_segments(segment_ids, keys, q)
    if isinstance(key_padding_mask, KeyMasks):
        masks = _check_key_masks(key_padding_mask, batch, num_keys, num_sink, stat_tokens, q, spans is not None)
    elif key_padding_mask is None and spans is None:  # the ends every unmasked call shares
        masks = _constant_key_masks(batch, num_keys, num_sink, stat_tokens, q.device)
    else:
        if isinstance(key_padding_mask, torch.Tensor):
            check_same_device(q, "q", key_padding_mask, "key_padding_mask")
        masks = key_masks(key_padding_mask, batch, num_keys, num_sink=num_sink, stat_tokens=stat_tokens,
                          device=q.device, segment_ids=spans)
    head_keep = None if head_mask is None else check_mask(head_mask, "head_mask", (num_heads,), "[Hq]", q)
    if sink_logit is not None:
        if not isinstance(sink_logit, torch.Tensor) or not sink_logit.is_floating_point():
            raise TypeError("sink_logit must be a floating-point tensor of shape [Hq]")
        check_dtype(sink_logit, "sink_logit")
        check_same_device(q, "q", sink_logit, "sink_logit")
        if tuple(sink_logit.shape) != (num_heads,):
            raise ValueError(f"sink_logit must have shape [Hq] = [{num_heads}], got {tuple(sink_logit.shape)}")
        sink_logit = sink_logit.to(output_dtype(q)).contiguous()
    groups, num_groups = _check_key_groups(key_groups, num_groups, keys, q)
    start = horizon = None
    if bidirectional_blocks is not None or spans is not None:
        start, horizon = key_bounds(bidirectional_blocks, spans, keys, num_queries, causal, q)
    return dict(
        q=q, k=k, v=v,
        scale=check_scale(scale, head_dim), causal=causal, window=window, key_real=masks.key_real,
        sink_end=masks.sink_end, stat_end=masks.stat_end,
        head_mask=head_keep, sink_logit=sink_logit, key_groups=groups, num_groups=num_groups,
        softcap=_check_softcap(softcap),
        horizon=horizon, start=start,
    )


def sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = True,
    window: Optional[int] = None,
    num_sink: int = 0,
    key_padding_mask: Optional[torch.Tensor] = None,
    head_mask: Optional[torch.Tensor] = None,
    sink_logit: Optional[torch.Tensor] = None,
    key_groups: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    stat_tokens: int = 1,
    return_entropy: bool = False,
    softcap: Optional[float] = None,
    bidirectional_blocks: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> AttentionOutput:
    """Fused attention with sinks, a sliding window, head masks and grouped-query heads,
    returning per-query attention statistics without materialising attention weights.

    Args:
        q: [B, Hq, Lq, D] queries (float32, bfloat16, float16; float64 runs the reference).
            They are the last Lq of the Lk key positions (prefill: Lq = Lk; decoding
            with a KV cache: Lq = 1).
        k, v: [B, Hkv, Lk, D] keys and [B, Hkv, Lk, Dv] values, Hq a multiple of Hkv (query
            head h uses key/value head h // (Hq / Hkv); K and V are never expanded). Dv may
            differ from D (multi-head latent attention).
        scale: score scale (default D ** -0.5).
        causal: query at position p sees keys j <= p; False: every key.
        window: optional sliding window w >= 1: causal p - w < j <= p, bidirectional |p - j| < w.
        num_sink: the first num_sink real keys of each row stay visible outside the window.
        key_padding_mask: optional [B, Lk], True / 1 = real key, False / 0 = padding (left or
            right); "the first token" of a row is its first real key. Or the KeyMasks that
            key_masks made from it, reused by calls with the same keys, num_sink and
            stat_tokens (e.g. every layer of one forward).
        head_mask: optional [Hq], False = pruned head: out 0, lse -inf, statistics 0, no
            compute spent on it.
        sink_logit: optional [Hq] learned sink logits: exp(sink_logit) joins the softmax
            denominator (a value-less entry; it lowers every key's weight). Finite: it is not
            checked (a host sync per call); +inf or NaN gives NaN outputs.
        key_groups: optional [B, Lk] integer group id of every key, in [0, num_groups) (checked:
            a host sync per call). Or the KeyGroups that prepare_key_groups made from them,
            checked once and reused by calls with the same keys (e.g. every layer of one forward).
        num_groups: G (default: max id + 1, one more host sync; required under torch.compile,
            torch.func.vmap and with meta tensors; a KeyGroups carries its own).
        stat_tokens: sink_mass is the weight on the first stat_tokens real keys (default 1,
            the BOS sink).
        return_entropy: also return each query's attention entropy (nats; the sink entry,
            when there is one, counts as one more outcome).
        softcap: optional logit soft cap c (Gemma 2): scores become c tanh(score / c).
        bidirectional_blocks: optional [B, Lk] integer block ids (negative: none). With causal,
            positions of one block also see the block's later positions (Gemma 3's image
            tokens, PaliGemma's prefix: transformers' block_sequence_ids); the window and the
            padding mask still apply. From the first query on, each block must be one run of
            consecutive positions. Or the BlockHorizon that block_horizon made from them, reused
            by calls with the same keys (e.g. every layer of one forward).
        segment_ids: optional [B, Lk] integer segment ids: a query sees only the keys of its own
            segment, sink keys included (packed sequences, Llama 4's chunked attention); each
            segment must be one run of consecutive positions. Key blocks of other segments cost
            nothing. Or the SegmentSpans that segment_spans made from them, reused by calls with
            the same keys.

    Returns:
        AttentionOutput(out [B, Hq, Lq, Dv] in q's dtype (a view of a [B, Lq, Hq, Dv] buffer),
        lse, sink_mass [B, Hq, Lq], group_mass [B, Hq, Lq, G] or None, entropy [B, Hq, Lq] or
        None), lse and statistics in float32 (float64 for float64 input). A query with nothing to
        attend to (every key masked and no sink logit) gets out 0, lse -inf and zero statistics.

    Forward only: backward through it raises. Raises TypeError / ValueError naming the argument
    for bad shapes, dtypes, devices, masks or group ids before any kernel runs. The checks of
    values (0/1 masks, group ids in range, blocks and segments as runs) are host syncs, skipped
    under torch.compile and torch.func.vmap and for meta tensors (the C++ kernel still refuses a
    group id out of range). Under torch.autocast, as SDPA, float32/bfloat16/float16 q, k and v
    are cast to autocast's dtype for their device (float64 is left alone).
    """
    args = _prepare(
        q, k, v, scale, causal, window, num_sink, key_padding_mask, head_mask, sink_logit, key_groups, num_groups,
        stat_tokens, softcap, bidirectional_blocks, segment_ids,
    )
    if not isinstance(return_entropy, bool):
        raise TypeError(f"return_entropy must be a bool, got {type(return_entropy).__name__}")
    if runs_plain(args.values()):  # eager, nothing for the dispatcher: no custom op between
        return AttentionOutput(*_attend(args.pop("q"), args.pop("k"), args.pop("v"), args, return_entropy))
    out, lse, sink_mass, group_mass, entropy = _sink_attention_op(
        args.pop("q"), args.pop("k"), args.pop("v"), **args, return_entropy=return_entropy
    )
    return AttentionOutput(
        out=out,
        lse=lse,
        sink_mass=sink_mass,
        group_mass=group_mass if key_groups is not None else None,
        entropy=entropy if return_entropy else None,
    )
