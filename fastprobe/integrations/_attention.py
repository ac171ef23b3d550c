"""The "fastprobe" attention function, in transformers' AttentionInterface: a patched layer's call,
its options and mask pattern put in the kernels' arguments (sink_attention, or dual_path_attention on
guided layers), the statistics handed to the active record."""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..ops._common import is_compiling
from ..ops.attention import SegmentSpans, key_masks, sink_attention
from ..ops.dual_attention import dual_path_attention
from ._lookups import KEY, _LAYER, _PART, _PATTERN, _STATE, _SWITCHED
from ._masks import _MaskPattern, _masking_utils_module, key_padding_mask

if TYPE_CHECKING:
    from .transformers import PatchOptions

def _register_interfaces() -> None:
    """Registers "fastprobe" with transformers' AttentionInterface and AttentionMaskInterface
    (idempotent: checked at patch and at unpickling, which registers it again in a fresh process)."""
    masking_utils = _masking_utils_module()  # (first: it says what to install where transformers is missing)
    from transformers.modeling_utils import AttentionInterface

    for interface, function in ((AttentionInterface, attention_forward),
                                (masking_utils.AttentionMaskInterface, key_padding_mask)):
        if interface._global_mapping.get(KEY) is not function:
            interface.register(KEY, function)


_IGNORED_KWARGS = {
    "position_ids", "cache_position", "use_cache", "position_embeddings", "past_key_values", "past_key_value",
    "output_hidden_states", "return_dict", "layer_idx", "encoder_hidden_states", "token_type_ids",
    "logits_to_keep",  # the LM head's business (GOT-OCR2 passes its kwargs down to attention)
    "mm_token_type_ids",  # which tokens are images: the masks already say it (LLaVA-OV-1.5's tower gets it)
    # the loss's and the MoE routers' business, passed down with the model's kwargs: the Trainer's
    # num_items_in_batch (evaluate, predict), output_router_logits (Mixtral, Qwen2-MoE: collected from the routers)
    "num_items_in_batch", "output_router_logits",
    # DataCollatorWithFlattening(return_seq_idx=True)'s sequence index, for state-space layers' kernels;
    # sdpa and eager ignore it too (their packed sequences come from the position ids, as fastprobe's)
    "seq_idx",
}
_UNSUPPORTED_KWARGS = {  # (the packing kwargs arrive here only without cu_seq_lens_q: see _packing_boundaries)
    "cu_seq_lens_k": "packed-sequence boundaries without cu_seq_lens_q",
    "max_length_q": "a packed-sequence length without cu_seq_lens_q",
    "max_length_k": "a packed-sequence length without cu_seq_lens_q",
    "position_bias": "an additive position bias", "attention_bias": "an additive attention bias",
    "head_mask": "transformers' head_mask (use fastprobe.patch(model, head_mask=...))",
    "output_attentions": "attention weights (use fastprobe.record_attention for statistics)",
}
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@functools.lru_cache(maxsize=None)
def _output_collector():
    """transformers' output collector (5.x: utils.output_capturing), or None where it has none."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # (4.5x: the kwarg reaches the attention function)
        return None
    return _active_collector


def _weights_collected() -> bool:
    """Whether transformers (5.x: utils.output_capturing) collects this forward's attention weights
    from its attention modules' outputs. Most models also pass output_attentions down to the
    attention function (refused in _check_kwargs); GPT-2's model pops it first, so without this
    check a patched GPT-2 returned output_attentions=True's attentions as an empty tuple. (Not
    checked while torch.compile traces: the collector is a context variable.)"""
    if is_compiling():  # (first: dynamo warns of tracing an lru_cache-wrapped function)
        return False
    collector = _output_collector()
    if collector is None:
        return False
    collected = collector.get()
    return collected is not None and "attentions" in collected


def _refuse_weights_asked(kwargs: dict) -> None:
    """transformers 4.5x (no output collector): a forward asked for attention weights (transformers
    refuses config.output_attentions itself under another implementation than eager). Most models
    pass the flag on to the attention function (refused in _check_kwargs); 4.5x's GPT-2 attention
    keeps it, and a patched GPT-2 returned a tuple of None for the weights."""
    if is_compiling() or _output_collector() is not None:  # (5.x: _weights_collected)
        return
    if kwargs.get("output_attentions"):
        raise _weights_refused("")


def _weights_refused(how: str) -> NotImplementedError:
    return NotImplementedError(f"fastprobe attention got output_attentions=True{how}: "
                               f"{_UNSUPPORTED_KWARGS['output_attentions']}")


def _check_kwargs(kwargs: dict) -> None:
    if _weights_collected():
        raise _weights_refused(" (the forward collects them)")
    if kwargs.keys() <= _IGNORED_KWARGS:  # (the usual call: a decoding step's layers pay ~0.2 us less; not
        # set.issuperset(kwargs), which Dynamo before torch 2.8 does not trace: a graph break a layer)
        return
    for name, value in kwargs.items():
        if name in _IGNORED_KWARGS or value is None or value is False:
            continue
        why = _UNSUPPORTED_KWARGS.get(name, "an argument fastprobe does not know how to honour")
        raise NotImplementedError(f"fastprobe attention got {name}={type(value).__name__}: {why}")


def _packing_boundaries(kwargs: dict, query, key) -> Optional[tuple]:
    """(cu_seq_lens_q, cu_seq_lens_k or None), flash attention's packing kwargs, popped from kwargs
    with max_length_q/k (which only size flash attention's work); None without cu_seq_lens_q.
    They are integer [sequences + 1] boundaries (DataCollatorWithFlattening(return_flash_attn_kwargs=
    True) makes int32 ones) of sequences packed in one row of self-attention: checked here without a
    host sync, their values by _packed_ids."""
    if kwargs.get("cu_seq_lens_q") is None:
        return None
    bounds, key_bounds, _, _ = (kwargs.pop(name, None) for name in _PACKING_KWARGS)
    for name, given in (("cu_seq_lens_q", bounds), ("cu_seq_lens_k", key_bounds)):
        if given is not None and (not isinstance(given, torch.Tensor) or given.dim() != 1 or
                                  given.is_floating_point() or given.is_complex() or given.dtype == torch.bool):
            what = getattr(given, "dtype", type(given).__name__)
            raise TypeError(f"fastprobe attention takes {name} as a 1-D integer tensor [sequences + 1], got "
                            f"{what} of shape {tuple(getattr(given, 'shape', ()))}")
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise NotImplementedError(
            "fastprobe attention takes packed sequences (cu_seq_lens_q/k) only as flash attention packs them: one "
            f"row of self-attention with no cached keys; got {query.shape[0]} rows, {query.shape[2]} queries and "
            f"{key.shape[2]} keys"
        )
    return bounds, key_bounds


def _packed_ids(bounds: torch.Tensor, key_bounds: Optional[torch.Tensor], length: int) -> torch.Tensor:
    """Segment ids int64 [1, length] (on the CPU) of the packed sequences whose boundaries are
    bounds (0 = b_0 <= b_1 <= ... <= b_n = length: sequence i is b_i <= p < b_{i+1}); key_bounds,
    if given, must be the same. Reads the boundaries: one host sync."""
    given = [bounds] if key_bounds is None else [bounds, key_bounds.to(bounds.device)]
    values = torch.cat(given).tolist()
    cuts, key_cuts = values[:bounds.shape[0]], values[bounds.shape[0]:]
    if key_bounds is not None and key_cuts != cuts:
        raise NotImplementedError("fastprobe attention takes packed sequences (cu_seq_lens) only where the query and "
                                  f"key boundaries agree; got cu_seq_lens_q={cuts} and cu_seq_lens_k={key_cuts}")
    lengths = [end - start for start, end in zip(cuts[:-1], cuts[1:])]
    if not cuts or cuts[0] != 0 or cuts[-1] != length or any(size < 0 for size in lengths):
        raise NotImplementedError(f"fastprobe attention got cu_seq_lens={cuts}: packed-sequence boundaries must go "
                                  f"up from 0 to the row's {length} tokens")
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths, dtype=torch.int64))[None]


def _tower_segments(packed: Optional[tuple], attention_mask, query, key) -> Optional[torch.Tensor]:
    """Segment ids [1, L] of the sequences packed in one row of self-attention in a module patch did
    not list (a vision tower), each attending within itself, else None; fastprobe runs no options
    or statistics there. Two forms: cu_seq_lens (_packing_boundaries; Qwen2-VL's tower in
    transformers 4.5x) with a 4D mask, if any, that is their block diagonal; or a 4D mask alone
    that is a block diagonal (Pixtral's tower)."""
    length = query.shape[2]
    if packed is None:
        if attention_mask is None or attention_mask.dim() != 4 or query.shape[0] != 1 or (
                key.shape[2] != length or tuple(attention_mask.shape[-2:]) != (length, length)):
            return None
        visible = _visible(attention_mask)
        goes_on = visible.reshape(-1, length, length)[0].diagonal(-1)  # i sees i - 1
        ids = torch.nn.functional.pad((~goes_on).cumsum(0), (1, 0))  # a new segment wherever i does not
        return ids[None] if _is_block_diagonal(visible, ids) else None  # else refused later
    ids = _packed_ids(*packed, length).to(query.device)
    if attention_mask is not None:
        if attention_mask.dim() != 4:
            raise NotImplementedError("fastprobe attention got packed sequences (cu_seq_lens) with a 2D mask")
        if not _is_block_diagonal(_visible(attention_mask[..., -length:, -length:]), ids[0].to(attention_mask.device)):
            raise NotImplementedError("fastprobe attention got packed sequences (cu_seq_lens) with a 4D mask that is "
                                      "not their block diagonal")
    return ids


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """A 4D mask as booleans (additive float masks: visible where 0)."""
    return mask == 0 if mask.is_floating_point() else mask.bool()


def _is_block_diagonal(visible: torch.Tensor, ids: torch.Tensor) -> bool:
    """visible [..., L, L] is exactly the block diagonal of the segments with ids [L] (runs)."""
    return bool((visible == (ids[:, None] == ids[None, :])).all())


_PACKED = "cu_seq_lens"  # the key of the checked packing in a mask's per-forward cache (_MaskPattern.key_masks)


def _layer_packed_segments(state, packed: tuple, padding, segments, masks_made, length: int, device) -> SegmentSpans:
    """The segments of a patched layer given cu_seq_lens: the boundaries' SegmentSpans, checked
    against the mask: it must hold no padding, and the segments it has (transformers 5.x's from
    packed position ids, made by key_padding_mask) must be the same. The check is made once per
    mask of a forward: masks_made (the mask's per-forward cache) remembers the spans it passed, and
    the KeyMasks made there before are dropped (made for other segments). A 2D mask not made by
    key_padding_mask (no cache) is checked at every call."""
    spans = state.packed_spans(*packed, length, device)
    if masks_made is not None and masks_made.get(_PACKED) is spans:
        return spans
    no_padding = torch.ones((), dtype=torch.bool, device=device) if padding is None else padding.all()
    agree = torch.ones_like(no_padding) if segments is None else (
        (segments.start == spans.start).all() & (segments.end == spans.end).all())
    no_padding, agree = torch.stack([no_padding, agree]).tolist()  # one host sync
    if not no_padding:
        raise NotImplementedError(
            "fastprobe attention takes packed sequences (cu_seq_lens) in a row without padding (flash attention "
            "would ignore cu_seq_lens there); this attention mask pads some tokens: drop the attention mask "
            "(DataCollatorWithFlattening makes none) or the cu_seq_lens kwargs"
        )
    if not agree:
        raise ValueError(
            "fastprobe attention got packed sequences whose cu_seq_lens boundaries differ from the segments of the "
            "attention mask (position_ids restarting at other tokens, or chunked attention's chunks); it will not "
            "pick one: give position_ids that restart exactly at the cu_seq_lens boundaries, or omit them"
        )
    if masks_made is not None:
        masks_made.clear()
        masks_made[_PACKED] = spans
    return spans


def _pattern_of(module, attention_mask, is_causal, sliding_window, num_keys: int):
    """(key padding mask [B, Lk] or None, causal, window, dropped, the mask's KeyMasks cache or None,
    bidirectional blocks (a BlockHorizon) or None, segments (SegmentSpans) or None, the position of
    the first key in its row)."""
    pattern = getattr(attention_mask, _PATTERN, None) if attention_mask is not None else None
    if pattern is not None:
        if pattern.refused is not None:
            raise NotImplementedError(pattern.refused)
        if attention_mask.shape[-1] != num_keys:
            return _pattern_over_the_row(module, attention_mask, pattern, num_keys)
        padding = attention_mask if attention_mask.dim() == 2 else attention_mask[:, 0, 0, :]
        if pattern.no_padding:  # (made without a 2D mask: every key real, no mask to read)
            padding = None
        return (padding, pattern.causal, pattern.window, pattern.dropped, pattern.key_masks, pattern.blocks,
                pattern.segments, pattern.kv_offset)
    # Not made by our mask function: flash attention's reading of the module's arguments.
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    padding = _padding_of_4d(module, attention_mask, num_keys)
    if padding is not None:  # (a 4D mask alone decides, as in sdpa: no causal order)
        return padding, False, sliding_window, None, None, None, None, 0
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise NotImplementedError(  # (Mllama's vision tower: its padded patches masked as queries and keys)
                f"fastprobe attention takes a 2D key padding mask [batch, keys]; {type(module).__name__} gave it a "
                f"{attention_mask.dim()}D mask (a custom or precomputed mask), which it will not guess the meaning of"
            )
        if attention_mask.shape[-1] < num_keys:
            raise ValueError(f"the attention mask covers {attention_mask.shape[-1]} keys but there are {num_keys}")
        # (a 2D mask covers every token of the row so far; the keys are the last of them)
        return attention_mask[:, -num_keys:] != 0, causal, sliding_window, None, None, None, None, \
            attention_mask.shape[-1] - num_keys
    return attention_mask, causal, sliding_window, None, None, None, None, 0


def _pattern_over_the_row(module, attention_mask: torch.Tensor, pattern: _MaskPattern, num_keys: int):
    """_pattern_of for a causal full-attention layer that holds more keys than its mask was made
    for. MiniMax (transformers 5.x) sizes its decoding masks from its first layer's cache, a
    linear-attention layer's, which holds no keys: each step's mask covers one key, and SDPA and
    eager broadcast it over all of them, so left padding is ignored and a padded row's tokens come
    out wrong. Here the keys are the row's last tokens (a dynamic cache's layer holds every token
    so far), read from the 2D mask the pattern was made from, as for a plain 2D mask."""
    row = pattern.row
    moved = pattern.causal and pattern.window is None and pattern.blocks is None and pattern.segments is None
    too_short = row is not None and row.shape[-1] < num_keys
    if attention_mask.shape[-1] > num_keys or pattern.static or not moved or too_short:
        raise ValueError(
            f"the attention mask covers {attention_mask.shape[-1]} keys but there are {num_keys}: the model made its "
            f"mask for another number of keys than layer {getattr(module, 'layer_idx', None)} holds, and fastprobe "
            "cannot move its pattern onto them (more keys in the mask, a static cache, a window, blocks, segments, "
            "or a 2D mask over fewer tokens)")
    if row is None:  # (made without a 2D mask: no padding)
        return None, True, None, None, None, None, None, 0
    return row[:, -num_keys:] != 0, True, None, None, None, None, None, row.shape[-1] - num_keys


def _written_part(attention_mask, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values that hold tokens: a static cache's buffer (_MaskPattern.static) is cut to
    the slots its mask covers (views; the kernels take any stride but the head dimension's)."""
    pattern = getattr(attention_mask, _PATTERN, None) if attention_mask is not None else None
    if pattern is None or not pattern.static:  # (every call but a static cache's)
        return key, value
    # (the mask never covers more slots than the buffer: cut without comparing, which under
    # torch.compile would guard on the mask's width, and the step filling the last slot recompile)
    written = attention_mask.shape[-1]
    return key[:, :, :written], value[:, :, :written]


def _padding_of_4d(module, attention_mask, num_keys: int) -> Optional[torch.Tensor]:
    """The key padding mask [B, Lk] that a 4D mask [B, 1 or H, Lq, Lk] expands when every query
    (and head) sees the same keys, in a module patch did not list (Idefics3's vision tower in
    transformers 4.57 expands its patch mask so); else None."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] != num_keys or (
            hasattr(module, _LAYER)):
        return None
    visible = _visible(attention_mask)
    first = visible[:, :1, :1, :]
    return first[:, 0, 0, :] if bool((visible == first).all()) else None


def _narrowest(*windows: Optional[int]) -> Optional[int]:
    given = [w for w in windows if w is not None]
    return min(given) if given else None


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    s_aux: Optional[torch.Tensor] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The "fastprobe" entry of transformers' AttentionInterface: query [B, Hq, Lq, D], key
    [B, Hkv, Lk, D] and value [B, Hkv, Lk, Dv] -> (attn_output [B, Lq, Hq, Dv], None). s_aux
    (gpt-oss's learned sinks) is the kernel's sink_logit, softcap Gemma 2's logit soft cap."""
    packed = _packing_boundaries(kwargs, query, key)
    _check_kwargs(kwargs)
    if dropout and module.training:
        raise NotImplementedError(f"fastprobe attention is for inference: attention dropout {dropout} in training mode")
    state = getattr(module, _STATE, None)
    layer = getattr(module, _LAYER, None) if state is not None else None
    tower = _tower_segments(packed, attention_mask, query, key) if layer is None else None
    if tower is not None:  # a vision tower's images packed in one row: each attends within itself
        # (both ways under a block-diagonal mask, which alone decides, as in sdpa; else as flash reads it)
        causal = attention_mask is None and bool(
            is_causal if is_causal is not None else getattr(module, "is_causal", False))
        return _plain_attention(query, key, value, None, causal, sliding_window, scaling, softcap, s_aux, None,
                                tower), None
    key, value = _written_part(attention_mask, key, value)
    padding, causal, window, dropped, masks_made, blocks, segments, kv_offset = _pattern_of(
        module, attention_mask, is_causal, sliding_window, key.shape[2]
    )
    if packed is not None:  # a patched layer's packed sequences (flash attention's kwargs): its segments
        where = query.device if padding is None else padding.device
        segments = _layer_packed_segments(state, packed, padding, segments, masks_made, key.shape[2], where)
    if padding is not None and padding.device != query.device:  # a model split over devices (device_map)
        padding = padding.to(query.device, non_blocking=True)
        dropped = None if dropped is None else dropped.to(query.device, non_blocking=True)
        if blocks is not None and blocks.horizon is not None:
            blocks = blocks._replace(horizon=blocks.horizon.to(query.device, non_blocking=True))
        if segments is not None:
            segments = SegmentSpans(*(bound.to(query.device, non_blocking=True) for bound in segments))
        masks_made = None
    if layer is None:  # cross-attention, or a model switched to "fastprobe" without patch()
        if state is None:
            _warn_if_switched_by_another(module)
        return _plain_attention(query, key, value, padding, causal, window, scaling, softcap, s_aux, blocks,
                                segments), None

    forward = state.forward
    forward.attended = True
    options, record = state.forward_options(forward), state.recorder
    if record is not None and _recomputed_in_backward():
        record = None  # (its forward was recorded: a second count would pool the layer's queries twice)
    if options.window is not None:
        window = _narrowest(window, options.window)
    guided = None
    if options.guidance is not None and layer in options.guidance.layers:
        guided = _guided_attention(state, options, layer, query, key, value, padding, causal, window, scaling,
                                   softcap, s_aux, blocks, segments)
        if record is None:
            return guided.transpose(1, 2), None
        # recording a guided layer: its statistics (of the attention weights, which guidance leaves
        # as they are) come from sink_attention over the same keys, a second pass
    stat_tokens = options.stat_tokens
    if dropped is not None and (options.num_sink > 0 or (record is not None and stat_tokens > 1)):
        # one query: a decoding step; more: a chunk of a chunked prefill (or tokens appended to a cache)
        when = ("while decoding past the window" if query.shape[2] == 1 else
                f"in a forward of {query.shape[2]} queries after that, such as a later chunk of a chunked prefill "
                "(generate's prefill_chunk_size)")
        raise NotImplementedError(
            f"this layer's sliding-window cache has dropped the first tokens, so num_sink and stat_tokens > 1 cannot "
            f"be honoured {when}; use them in one whole prefill (no prefill_chunk_size), or with a full "
            "(non-sliding) cache"
        )
    keys = padding
    if masks_made is not None and (padding is not None or segments is not None):
        made_for = (options.num_sink, stat_tokens)  # the layers of one forward share the mask: prepared once
        keys = masks_made.get(made_for)
        if keys is None:
            keys = masks_made[made_for] = key_masks(padding, key.shape[0], key.shape[2], num_sink=options.num_sink,
                                                    stat_tokens=stat_tokens, segment_ids=segments,
                                                    device=key.device)
    result = sink_attention(
        query, key, value, scale=scaling, causal=causal, window=window, num_sink=options.num_sink,
        key_padding_mask=keys, head_mask=state.head_mask(layer, query.device, options) if options.head_mask else None,
        sink_logit=s_aux,
        key_groups=record.key_groups_for(key, kv_offset, query.shape[2])
        if record is not None and layer not in state.ungrouped_layers else None,
        stat_tokens=stat_tokens,
        return_entropy=record is not None and "entropy" in record.statistics, softcap=softcap,
        bidirectional_blocks=blocks, segment_ids=segments,
    )
    if record is not None:
        record.add(layer, result, padding, dropped, masks_made)
    return (result.out if guided is None else guided).transpose(1, 2), None


def _recomputed_in_backward() -> bool:
    """Whether this attention call runs inside autograd's backward: activation (gradient)
    checkpointing recomputing a layer whose forward already ran."""
    return not is_compiling() and torch._C._current_graph_task_id() != -1


def _warn_if_switched_by_another(module) -> None:
    """A module of another model that shares a config object with a patched model (two models
    made from one config) runs fastprobe's attention too: say so, since that model is often the
    unpatched reference a patched one is compared with."""
    if getattr(module, "_is_replica", False):  # a DataParallel replica shares its own model's config
        return
    config = getattr(module, "config", None)
    config_ref, states = _SWITCHED.get(id(config), (None, ()))
    if states and config_ref() is config:
        if not any(id(module) in state.module_ids for state in states):
            warnings.warn(
                f"fastprobe: this {type(module).__name__} runs fastprobe's attention (without options or recording) "
                "because its model shares its config object with a model that fastprobe.patch switched. Give each "
                "model its own config (copy.deepcopy(config) made before patching) to keep it unpatched, e.g. as a "
                "reference.",
                stacklevel=2,
            )
    elif not getattr(module, _PART, False):
        # a config that names "fastprobe" but that no live patch switched: a copy of a patched
        # model's config (copy.deepcopy, from_config), or attn_implementation="fastprobe"
        warnings.warn(
            f"fastprobe: this {type(module).__name__} runs fastprobe's attention (without options or recording; "
            "forward-only) but belongs to no patched model: its config names \"fastprobe\", e.g. a copy of a "
            "patched model's config (copy.deepcopy(config), from_config(config)). Call "
            "model.set_attn_implementation(\"sdpa\") (or \"eager\") for transformers' attention, or "
            "fastprobe.patch(model).",
            stacklevel=2,
        )


def _last_real_rows(padding: Optional[torch.Tensor], num_queries: int, count: int, device) -> torch.Tensor:
    """bool [B, Lq] (or [Lq] without padding): each row's last `count` real queries (the queries
    are the last Lq keys); a row with no real query: its last `count`."""
    if padding is None:
        return torch.arange(num_queries, device=device) >= num_queries - count
    real = padding[:, -num_queries:]
    real = real | ~real.any(-1, keepdim=True)
    from_end = real.flip(-1).to(torch.int32).cumsum(-1).flip(-1)  # real queries at or after each one
    return real & (from_end <= count)


def _guided_attention(state, options: PatchOptions, layer: int, query, key, value, padding, causal, window, scaling,
                      softcap, s_aux, blocks, segments):
    """dual_path_attention on a guided layer, with this forward's image keys: out [B, Hq, Lq, D]."""
    guidance = options.guidance
    sinks_outside_window = options.num_sink > 0 and window is not None
    if s_aux is not None or softcap is not None or sinks_outside_window or layer in options.head_mask:
        what = next(what for found, what in (
            (layer in options.head_mask, "a head mask"),
            (s_aux is not None, "learned sink logits (s_aux)"),
            (softcap is not None, "a logit soft cap"),
            (True, "sink keys (num_sink) outside its sliding window"),
        ) if found)
        raise NotImplementedError(f"guidance on layer {layer}: the dual-path kernel does not take {what}; "
                                  "guide other layers (guidance layers=[...]) or drop that option")
    forward = state.forward
    image_keys = forward.image_keys.mask if forward.in_forward and forward.image_keys is not None else None
    batch, num_queries, num_keys = query.shape[0], query.shape[2], key.shape[2]
    if image_keys is None or image_keys.shape[0] != batch or image_keys.shape[1] < num_keys:
        if _recomputed_in_backward():
            raise RuntimeError(
                f"guidance on layer {layer}: gradient checkpointing recomputes the layer in backward, past the "
                "forward that tracked its image keys; guidance is forward-only: run the model under torch.no_grad() "
                "or call model.gradient_checkpointing_disable()"
            )
        seen = "none" if image_keys is None else f"{tuple(image_keys.shape)}"
        raise RuntimeError(
            f"guidance on layer {layer} has {num_keys} keys for batch {batch} but the tracked image keys are {seen}: "
            "call the patched model itself (its forward tracks them from input_ids), not one of its sub-modules "
            "or its forward method (transformers 4.5x's generate with prefill_chunk_size calls model.forward, past "
            "the hooks that track them)"
        )
    drop = image_keys[:, -num_keys:]
    if drop.device != query.device:  # a model split over devices
        drop = drop.to(query.device, non_blocking=True)
    rows = guidance.rows
    count = min(forward.image_keys.kept_logits, num_queries)  # (assisted decoding: its candidates + 1)
    if rows == "last" and num_queries > 1 and (padding is not None or count > 1):  # (right padding: the last real)
        rows = _last_real_rows(padding, num_queries, count, query.device)
    return dual_path_attention(
        query, key, value, drop, gamma=guidance.gamma, orthogonalize=guidance.orthogonalize, eps=guidance.eps,
        rows=rows, scale=scaling, causal=causal, key_padding_mask=padding, bidirectional_blocks=blocks, window=window,
        segment_ids=segments,
    )


def _plain_attention(query, key, value, padding, causal, window, scaling, softcap, s_aux, blocks,
                     segments) -> torch.Tensor:
    """No options, no statistics. Bidirectional attention with more queries than keys (cross-
    attention) runs in query chunks of at most Lk: each query is independent there."""
    num_queries, num_keys = query.shape[2], key.shape[2]
    chunks = [query]
    if num_queries > num_keys and not causal and window is None and num_keys > 0:
        chunks = query.split(num_keys, dim=2)
    outs = [
        sink_attention(chunk, key, value, scale=scaling, causal=causal, window=window, key_padding_mask=padding,
                       sink_logit=s_aux, softcap=softcap, bidirectional_blocks=blocks,
                       segment_ids=segments).out.transpose(1, 2)
        for chunk in chunks
    ]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
