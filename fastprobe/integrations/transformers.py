"""fastprobe's fused attention inside transformers models.

    fastprobe.patch(model)                        # same outputs as before, fastprobe kernels
    with fastprobe.record_attention(model) as record:
        model(**batch)                            # or model.generate(...)
    record.sink_mass                              # [layers, heads], no attention weights kept
    fastprobe.patch(model, window=1024, num_sink=4)        # streaming-style attention
    fastprobe.patch(model, head_mask={3: keep})            # pruned heads cost nothing
    fastprobe.patch(vlm, guidance=dict(gamma=1.0, layers=range(8)))   # contrastive guidance (dual path)
    fastprobe.unpatch(model)                      # the previous implementation, exactly

How it plugs in. transformers (>= 4.53: masking_utils and the AttentionMaskInterface, through
5.x) looks attention up by name: `config._attn_implementation` selects a function in
`AttentionInterface` (the attention) and one in `AttentionMaskInterface` (the mask the model
builds once per forward). fastprobe registers both under the new key "fastprobe" (registering a
key is transformers' extension API; nothing existing is replaced) and switches one model instance
to it with `set_attn_implementation`. Options live on that model (an attribute its self-attention
modules share), so two models in one process can be patched differently.

Guidance. With patch(model, guidance=...) the chosen layers run fastprobe.dual_path_attention,
which needs the image-key mask [B, Lk] of every call. The model's forward pre-hook keeps it:
ImageKeys holds a bool [B, T] over every token of the running sequences (the columns of the 2D
attention mask generate grows), started afresh by a forward on an empty cache and extended by
each decoding step; a layer's keys are its last Lk columns. Image keys are the positions of the
image token id in the input_ids of a forward that starts the sequences or carries images
(pixel_values); tokens fed by decoding steps are text (a generated placeholder id has a text
embedding). Padding needs nothing more: padded keys are out of the key padding mask.

The parts: _lookups (the model's modules and configs, the architecture checks), _masks (the mask
function), _attention (the attention function), _record (AttentionRecord); this module holds the
options, the patch state and hooks, patch / unpatch and record_attention.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import numbers
import sys
import threading
import weakref
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch

from ..ops._common import check_int, check_real
from ..ops.attention import SegmentSpans, segment_spans
from ._attention import _packed_ids, _refuse_weights_asked, _register_interfaces
from ._lookups import (
    KEY, STATISTICS, _LAYER, _PART, _PATCHING, _PATTERN, _STATE, _SWITCHED, _check_architecture, _configs, _implementation,
    _implementation_before_fastprobe, _layer_config, _live_states, _refuse, _restore, _switch, _ungrouped_layers,
    attention_layers, execution_device, layer_heads, unwrapped,
)
from ._masks import _note_qualnames
from ._record import AttentionRecord

__all__ = [
    "AttentionRecord", "GuidanceOptions", "ImageKeys", "PatchOptions", "attention_layers", "forward_arguments",
    "is_patched", "patch", "patch_options", "record_attention", "unpatch", "update_patch",
]


# ---------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class GuidanceOptions:
    """Contrastive guidance: fastprobe.dual_path_attention on the chosen layers (SPEC section 5).

    gamma: guidance strength; 0 gives plain attention (o_cond).
    layers: the guided layers (indices into attention_layers(model)), sorted.
    image_token_id: the token id whose positions are the dropped (image) keys.
    orthogonalize, eps: as in dual_path_attention.
    rows: "last" (each row's last real query: the token being generated) or "all". With a KV
        cache each token keeps the keys and values of the states it was generated with, so "last"
        guides every generated token once (at its step); "all" guides every token at every layer.
        A forward that keeps the logits of its last k > 1 queries (logits_to_keep=k: assisted and
        prompt-lookup decoding check k - 1 candidate tokens at once) has its last k real queries
        guided under "last", each the token generated at its step. A prefill in chunks
        (generate's prefill_chunk_size) guides each chunk's last query under "last" (a forward
        cannot tell the last chunk from a new turn's prompt): not the same as one prefill.
    """

    gamma: float
    layers: tuple
    image_token_id: int
    orthogonalize: bool = True
    rows: str = "last"
    eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class PatchOptions:
    """What a patched model does beyond plain attention (all default to nothing).

    num_sink: the first num_sink real tokens stay visible to every query outside its window.
    window: a sliding window w for every self-attention layer (a query at p sees p - w < j <= p,
        in a bidirectional layer |p - j| < w; a layer with its own, narrower window keeps that one).
    head_mask: layer -> bool [heads] (False = pruned: output 0, no compute spent on it).
    record: the statistics record_attention collects ("sink_mass", "group_mass", "entropy").
    stat_tokens: sink_mass is the attention weight on the first stat_tokens real tokens.
    guidance: contrastive guidance on chosen layers (GuidanceOptions), or None.
    """

    num_sink: int = 0
    window: Optional[int] = None
    head_mask: Mapping[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    record: tuple = ("sink_mass",)
    stat_tokens: int = 1
    guidance: Optional[GuidanceOptions] = None


def _check_statistics(record, name: str = "record") -> tuple:
    try:
        record = (record,) if isinstance(record, str) else tuple(record)
    except TypeError:  # (None, a number)
        raise TypeError(f"{name} must be a statistic's name or a sequence of them (among {STATISTICS}), got "
                        f"{type(record).__name__}") from None
    unknown = [s for s in record if s not in STATISTICS]
    if unknown:
        raise ValueError(f"{name} must name statistics among {STATISTICS}, got {unknown}")
    return tuple(dict.fromkeys(record))  # (a statistic named twice is recorded once: its sums were added twice)


def _head_mask_rows(head_mask, layer_heads: list) -> dict:
    """{layer: bool [H] on the CPU} from a mapping layer -> [H] or a [layers, H] tensor, checked
    against each layer's heads where its config says them (layer_heads)."""
    num_layers = len(layer_heads)
    if head_mask is None:
        return {}
    if isinstance(head_mask, torch.Tensor):
        if head_mask.dim() != 2 or head_mask.shape[0] != num_layers:
            raise ValueError(f"head_mask as a tensor must have shape [layers, heads] = [{num_layers}, H], "
                             f"got {tuple(head_mask.shape)}")
        counts = sorted({heads for heads in layer_heads if heads is not None})
        if len(counts) > 1:
            raise ValueError(f"head_mask as a [layers, heads] tensor needs one head count, but the layers have "
                             f"{counts} heads: pass a mapping layer -> bool [that layer's heads]")
        head_mask = dict(enumerate(head_mask))
    if not isinstance(head_mask, Mapping):
        raise TypeError("head_mask must be a mapping layer -> bool [heads] or a [layers, heads] tensor, "
                        f"got {type(head_mask).__name__}")
    rows = {}
    for layer, keep in head_mask.items():
        layer = check_int(layer, "head_mask layer", 0)
        if layer >= num_layers:
            raise ValueError(f"head_mask names layer {layer}, but the model has {num_layers} self-attention layers")
        try:
            keep = torch.as_tensor(keep).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as why:  # (None, a string, a meta tensor)
            raise TypeError(f"head_mask[{layer}] must be a 1-D boolean (or integer 0/1) tensor of shape [heads], got "
                            f"{type(keep).__name__} ({why})") from None
        if keep.is_floating_point() or keep.is_complex() or keep.dim() != 1:
            raise TypeError(f"head_mask[{layer}] must be a 1-D boolean (or integer 0/1) tensor of shape [heads], "
                            f"got {keep.dtype} of shape {tuple(keep.shape)}")
        num_heads = layer_heads[layer]
        if num_heads is not None and keep.shape[0] != num_heads:
            raise ValueError(f"head_mask[{layer}] must have shape [heads] = [{num_heads}], got {tuple(keep.shape)}")
        if ((keep != 0) & (keep != 1)).any():
            raise ValueError(f"head_mask[{layer}] must hold only 0/1 (or True/False)")
        rows[layer] = keep != 0
    return rows


def config_image_token_id(model) -> Optional[int]:
    """The image token id a vision-language model's config names (image_token_id, or LLaVA's
    older image_token_index), or None."""
    config = getattr(model, "config", None)
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
    return None


_GUIDANCE_KEYS = ("gamma", "layers", "image_token_id", "orthogonalize", "rows", "eps")


def _guidance_options(guidance, layers: list, model) -> Optional[GuidanceOptions]:
    """GuidanceOptions from a mapping (gamma required; layers default: every causal layer, i.e. the
    language model's, not a vision tower's) or from GuidanceOptions, checked against the model's
    layers (attention modules in attention_layers order)."""
    if guidance is None:
        return None
    if isinstance(guidance, GuidanceOptions):
        guidance = dataclasses.asdict(guidance)
    if not isinstance(guidance, Mapping):
        raise TypeError(f"guidance must be a dict (gamma, layers, orthogonalize, rows, eps, image_token_id) or "
                        f"GuidanceOptions, got {type(guidance).__name__}")
    unknown = sorted(set(guidance) - set(_GUIDANCE_KEYS))
    if unknown:
        raise ValueError(f"guidance got unknown keys {unknown}; it takes {list(_GUIDANCE_KEYS)}")
    if "gamma" not in guidance:
        raise ValueError("guidance needs gamma (the guidance strength), e.g. guidance=dict(gamma=1.0)")
    num_layers, named = len(layers), guidance.get("layers")
    if named is None:  # (a vision tower's attention may be a fastprobe layer: Gemma 4's)
        named = [index for index, module in enumerate(layers) if module.is_causal]
    elif isinstance(named, numbers.Integral) or isinstance(named, (str, bytes)):
        raise TypeError(f"guidance layers must be a list of layer indices (or None: every causal one), got {named!r}")
    chosen = sorted({check_int(layer, "guidance layer", 0) for layer in named})
    if not chosen:
        raise ValueError("guidance layers is empty: name at least one layer (or omit guidance)")
    if chosen[-1] >= num_layers:
        raise ValueError(f"guidance layers names layer {chosen[-1]}, but the model has {num_layers} self-attention "
                         f"layers (0..{num_layers - 1})")
    bidirectional = [f"{index} ({type(layers[index]).__name__})" for index in chosen if not layers[index].is_causal]
    if bidirectional:
        raise ValueError(f"guidance layers names layer {', '.join(bidirectional)}, which is not causal (a vision "
                         "tower's or an encoder's): guidance drops the image tokens' keys of the language model's "
                         "layers")
    image_token_id = guidance.get("image_token_id")
    if image_token_id is None:
        image_token_id = config_image_token_id(model)
        if image_token_id is None:
            raise ValueError(f"guidance needs the image token id: {type(model).__name__}'s config names none "
                             "(image_token_id); pass guidance=dict(..., image_token_id=...)")
    rows = guidance.get("rows", "last")
    if rows not in ("last", "all"):
        raise ValueError(f"guidance rows must be 'last' or 'all', got {rows!r}")
    orthogonalize = guidance.get("orthogonalize", True)
    if not isinstance(orthogonalize, bool):
        raise TypeError(f"guidance orthogonalize must be a bool, got {type(orthogonalize).__name__}")
    return GuidanceOptions(
        gamma=check_real(guidance["gamma"], "guidance gamma", positive=False),
        layers=tuple(chosen),
        image_token_id=check_int(image_token_id, "guidance image_token_id", 0),
        orthogonalize=orthogonalize,
        rows=rows,
        eps=check_real(guidance.get("eps", 1e-6), "guidance eps", positive=True),
    )


def _make_options(layers: list, num_sink=0, window=None, head_mask=None, record=("sink_mass",), stat_tokens=1,
                  guidance=None, model=None) -> PatchOptions:
    return PatchOptions(
        num_sink=check_int(num_sink, "num_sink", 0),
        window=None if window is None else check_int(window, "window", 1),
        head_mask=_head_mask_rows(head_mask, layer_heads(layers)),
        record=_check_statistics(record),
        stat_tokens=check_int(stat_tokens, "stat_tokens", 0),
        guidance=_guidance_options(guidance, layers, model),
    )


# ---------------------------------------------------------------- image keys


def forward_arguments(model, args: tuple, kwargs: dict) -> dict:
    """A forward call's arguments by name (what a forward pre-hook with kwargs sees; generate
    passes keywords only, so binding the signature is needed only for positional calls)."""
    if not args:
        return kwargs
    import inspect

    return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)


_IMAGE_INPUTS = ("pixel_values", "mm_encoder_outputs")


class ImageKeys:
    """Which tokens of the running sequences are image tokens: bool [B, T] over every token the
    model has seen (the columns of the 2D attention mask; a layer's Lk keys are the last Lk).

    update() is called with each forward's arguments: a forward on an empty cache starts afresh
    (prefill, or generate without a cache), a forward on a cache of P tokens appends its tokens
    to the first P columns (a cropped cache drops the columns past P). A forward's tokens are
    image keys where input_ids equals the image token id and the forward starts the sequences,
    carries images (pixel_values) or goes on with a prompt (several tokens, fewer of whose logits
    it keeps: generate's prefill chunks, a new turn); decoding steps and assisted decoding's
    candidates (a logits row per token) add text keys."""

    def __init__(self, image_token_id: int):
        self.image_token_id = image_token_id
        self.mask: Optional[torch.Tensor] = None
        self.kept_logits = 1  # the last forward's queries whose logits generate uses (_kept_logits)

    def update(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        input_ids = inputs.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            self.mask = None
            raise NotImplementedError(
                "fastprobe finds image keys from input_ids (the positions of the image token id): this forward got "
                f"{'inputs_embeds' if inputs.get('inputs_embeds') is not None else 'no input_ids'}; pass input_ids"
            )
        batch, length = input_ids.shape
        past = _cached_length(inputs, length)
        self.kept_logits = _kept_logits(inputs)
        prompt = length > 1 and self.kept_logits < length
        if past == 0 or prompt or any(inputs.get(name) is not None for name in _IMAGE_INPUTS):
            new = input_ids == self.image_token_id
        else:
            new = torch.zeros(batch, length, dtype=torch.bool, device=input_ids.device)
        if past == 0:
            self.mask = new
            return new
        known = self.mask
        if known is None or known.shape[0] != batch or known.shape[1] < past:
            seen = "nothing" if known is None else f"{tuple(known.shape)} (batch, tokens)"
            self.mask = None
            raise RuntimeError(
                f"fastprobe lost track of the image keys: this forward continues a cache of {past} tokens for batch "
                f"{batch}, but it has seen {seen}. Start each sequence with a forward on an empty cache (as generate "
                "does)"
            )
        self.mask = torch.cat([known[:, :past], new.to(known.device)], dim=1)
        return self.mask


def _cached_length(inputs: Mapping[str, Any], num_new: int) -> int:
    """Tokens already in the cache: the 2D attention mask's width minus the new tokens (what
    generate passes), else the cache's own length, else 0. With a static cache generate passes the
    masks it made ahead with key_padding_mask (one, or one per layer type), which cover one layer
    type's keys: the tokens so far where they start at position 0 (kv_offset; a static buffer's
    keys are cut to its written slots)."""
    mask = inputs.get("attention_mask")
    masks = mask.values() if isinstance(mask, Mapping) else [mask]
    made = [each for each in masks if getattr(each, _PATTERN, None) is not None]
    if made:
        from_start = [each for each in made if getattr(each, _PATTERN).kv_offset == 0]
        if from_start:
            return max(from_start[0].shape[-1] - num_new, 0)
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return max(mask.shape[1] - num_new, 0)
    cache = inputs.get("cache", inputs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


class _ForwardState:
    """What the forward passes of a patched model run by one thread track: a patched model may run
    in several threads at once (their calls, cu_seq_lens and image keys must not mix)."""

    def __init__(self):
        # this forward reached fastprobe's attention (the safety net of _forward_done). A flag set
        # afresh by each forward, not a running count: torch.compile guards on what a forward reads
        # of it, and a count read at the start would recompile every decoding step. None: no forward
        # started under this patch in this thread (one that started before the model was patched
        # ends with its hooks, and is not checked)
        self.attended: Optional[bool] = None
        self.in_forward = False  # inside a forward of the patched model (its hooks track the image keys)
        self.options: Optional[PatchOptions] = None  # the options it started with (_PatchState.forward_options)
        self.packing: Optional[_Packing] = None  # this forward's cu_seq_lens, read (see packed_spans)
        self.image_keys: Optional[ImageKeys] = None
        self.options_version = -1  # the options the image keys were made for


class _PatchState:
    """Everything patch() put on a model: the options, the self-attention modules (their order is
    fastprobe's layer index), what to restore, the active recorder and, per thread, the state of
    its forward passes."""

    def __init__(self, layers: list, previous: list, options: PatchOptions):
        self.layers = layers  # (held weakly: see the property)
        self.previous = previous
        self.recorder: Optional[AttentionRecord] = None
        self.hooks: list = []
        self._threads = threading.local()  # .forward: the thread's _ForwardState
        self._options_version = 0
        self.module_ids: frozenset = frozenset()  # every module of the patched model
        self.model_name = "model"  # the patched model's class name
        self.ungrouped_layers: frozenset = frozenset()  # layers that take no key groups (_ungrouped_layers)
        # Whom the patch is for: "user" (patch or update_patch called), "block" (record_attention or
        # patched_with on an unpatched model, for the block), "method" (prune_heads, or kept after such
        # a block for the options changed inside it): a "method" patch is removed once its options are
        # back to the defaults (_unpatch_if_unneeded).
        self.patched_by = "user"
        self.model_ref: Optional[weakref.ref] = None  # the patched model (set by patch; None: not known)
        self.without_model = False  # a deep copy of a part of the patched model (__deepcopy__)
        self.set_options(options)

    @property
    def layers(self) -> list:
        """The self-attention modules, in fastprobe's layer order. Held through weak references: each
        of them holds this state (_STATE), so a list of them here made a reference cycle, and a
        patched model dropped without unpatch kept its attention modules (their weights) alive until
        the cyclic garbage collector happened to run."""
        return [ref() for ref in self._layer_refs]

    @layers.setter
    def layers(self, modules) -> None:
        self._layer_refs = tuple(weakref.ref(module) for module in modules)

    def __getstate__(self) -> dict:
        # (a copy made inside record_attention is not recording: that block ends for the original only)
        attributes = {name: value for name, value in self.__dict__.items()
                      if name not in ("_threads", "recorder", "_layer_refs", "_head_mask_copies", "model_ref")}
        attributes["layers"] = self.layers  # (the modules themselves: a copy's are the copied modules)
        return attributes

    def __setstate__(self, attributes: dict) -> None:
        """copy.deepcopy (or pickle) of a patched model copies this state with the model: its layers
        are then the copy's modules (the copy is patched as the original was, and unpatch(copy)
        restores the copy only). Unpickled in another process, it registers "fastprobe" with
        transformers again (the copy's config names it)."""
        attributes = dict(attributes)
        attributes.pop("_head_masks", None)  # (a state pickled before the copies went with their options)
        layers = attributes.pop("layers")
        self.__dict__.update(attributes)
        self.layers = layers
        self.recorder = None
        self.model_ref = None  # (a pickle cannot say whether the patched model came with its layers: not known)
        self._threads = threading.local()
        self._head_mask_copies = (self.options, {})
        self.module_ids = frozenset()  # (the original's modules; the copy's config is not shared)
        self.__dict__.setdefault("without_model", False)
        self.__dict__.setdefault("ungrouped_layers", self.__dict__.pop("tower_layers", frozenset()))
        if self.__dict__.setdefault("patched_by", "user") == "block":  # (the block ends for the original only)
            self.patched_by = "method"
        self.__dict__.pop("kv_sharing", None)  # (a state pickled while the masks' pass-through was on the classes)
        _register_interfaces()

    def __deepcopy__(self, memo: dict) -> "_PatchState":
        """copy.deepcopy: a copy of the patched model gets a copy of this state (__setstate__). A copy
        of a part of it only (its backbone model.model, a decoder layer) has no patched model to own
        that copy (hooks, a state to patch, record and unpatch through): its copied configs get the
        implementation they had before patch, so the part runs as it did unpatched (it ran the
        original's options, pruned heads included, and could be neither patched nor unpatched), and
        patch takes it as unpatched (without_model). A model copied after one of its layers in one
        deepcopy gets that copy too: its forward says the implementation was switched, and patch
        switches it back. A state unpickled since (model_ref None) is copied as pickle does."""
        copied = memo[id(self)] = _PatchState.__new__(_PatchState)  # (its layers hold it: entered before them)
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        model = self.model_ref() if self.model_ref is not None else None
        if model is not None and id(model) in memo:  # (deepcopy enters a model before its attributes)
            copied.model_ref = weakref.ref(memo[id(model)])
        elif model is not None:
            copied.without_model = True
            _restore(copied.previous)
        return copied

    def set_options(self, options: PatchOptions) -> None:
        tracked = getattr(getattr(self, "options", None), "guidance", None)
        self.options = options
        self._head_mask_copies = (options, {})  # {(layer, device): its head mask there}, with their options
        # Each thread's image keys start afresh when what they track changes: guidance switched on
        # or off, or another image token id. Other changes (a head mask, prune_heads, record, gamma,
        # the guided layers) keep them, so a cached sequence goes on guided after update_patch.
        # (a version bumped at every change was a recompile of the compiled forward's hooks each time)
        guided = options.guidance
        if (tracked is None) != (guided is None) or (
                guided is not None and tracked.image_token_id != guided.image_token_id):
            self._options_version += 1

    @property
    def forward(self) -> _ForwardState:
        """This thread's _ForwardState (with fresh image keys after the options changed, outside a
        forward: one in progress keeps those of the options it started with)."""
        found = getattr(self._threads, "forward", None)
        if found is None:
            found = self._threads.forward = _ForwardState()
        if found.options_version != self._options_version and not found.in_forward:
            guidance = self.options.guidance
            found.image_keys = None if guidance is None else ImageKeys(guidance.image_token_id)
            found.options_version = self._options_version
        return found

    def forward_options(self, forward: _ForwardState) -> PatchOptions:
        """The options of this thread's forward: those in force when it started, so that an
        update_patch from another thread meanwhile applies from that thread's next forward, and
        every layer of one forward runs with one set (read per layer, a forward ran some layers with
        the old head mask and the rest with the new). A sub-module called on its own: the current.
        forward: this thread's _ForwardState (self.forward, looked up once by the caller)."""
        return forward.options if forward.in_forward and forward.options is not None else self.options

    def head_mask(self, layer: int, device: torch.device, options: PatchOptions) -> Optional[torch.Tensor]:
        """The layer's head mask of `options` on the attention's device (copied there once, for
        the current options). Copies are kept with the options they were made from: a forward
        that started before update_patch replaced them copies its old mask each call and keeps
        none (kept among the new options' copies, the old mask pruned every later forward)."""
        keep = options.head_mask.get(layer)
        if keep is None:
            return None
        made_for, copies = self._head_mask_copies
        if made_for is not options:
            return keep.to(device)
        key = (layer, device)
        if key not in copies:
            copies[key] = keep.to(device)
        return copies[key]

    def packed_spans(self, bounds: torch.Tensor, key_bounds: Optional[torch.Tensor], length: int,
                     device: torch.device) -> SegmentSpans:
        """The SegmentSpans on `device` of the sequences packed at cu_seq_lens bounds (and key_bounds).

        Made once per forward: a model hands the same cu_seq_lens tensors to every layer, so they are
        read (a host sync) by the first layer, and the others find them here by identity. The cache
        is the patch state's rather than a mask's (_MaskPattern.key_masks): the boundaries are the
        same for every layer, while a forward can have two masks (full and sliding layers) or none
        made by key_padding_mask. Weak references, so a later tensor reusing a freed one's id never
        matches; emptied when the model's forward starts, so boundaries written in place between
        forwards are read afresh."""
        forward = self.forward
        found = forward.packing
        if found is None or found.length != length or found.bounds() is not bounds or (
                (found.key_bounds is None) != (key_bounds is None)) or (
                key_bounds is not None and found.key_bounds() is not key_bounds):
            on_cpu = segment_spans(_packed_ids(bounds, key_bounds, length))  # (checked on the CPU: no device sync)
            key_ref = None if key_bounds is None else weakref.ref(key_bounds)
            found = forward.packing = _Packing(weakref.ref(bounds), key_ref, length, {on_cpu.start.device: on_cpu})
        if device not in found.spans:
            on_cpu = next(iter(found.spans.values()))
            found.spans[device] = SegmentSpans(*(bound.to(device) for bound in on_cpu))
        return found.spans[device]


class _Packing(NamedTuple):
    """cu_seq_lens read once (_PatchState.packed_spans)."""

    bounds: weakref.ref  # cu_seq_lens_q
    key_bounds: Optional[weakref.ref]  # cu_seq_lens_k, if given
    length: int  # the row's tokens
    spans: dict  # device -> SegmentSpans (first: the CPU's)


# ---------------------------------------------------------------- patch / unpatch


def is_patched(model) -> bool:
    """Whether fastprobe.patch(model) is in force (on the model inside a PEFT or compile wrapper)."""
    return getattr(unwrapped(model), _STATE, None) is not None


def _changed_options(before: PatchOptions, after: PatchOptions) -> list:
    """The names of the options whose values differ (head masks compared per layer by value)."""
    def same(name: str, first, second) -> bool:
        if name == "head_mask":
            return first.keys() == second.keys() and all(torch.equal(first[layer], second[layer]) for layer in first)
        return first == second

    return [field.name for field in dataclasses.fields(PatchOptions)
            if not same(field.name, getattr(before, field.name), getattr(after, field.name))]


def patch_options(model) -> PatchOptions:
    """The options a patched model runs with."""
    state = getattr(unwrapped(model), _STATE, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not patched: call fastprobe.patch(model) first")
    return state.options


def update_patch(model, **changes):
    """patch(model) again with its current options, those named in `changes` replaced (the
    others kept, unlike patch(), which resets omitted options to their defaults). The read and the
    patch hold _PATCHING, so calls from several threads keep each other's changes."""
    with _PATCHING:
        current = patch_options(model)
        options = {field.name: getattr(current, field.name) for field in dataclasses.fields(current)}
        return patch(model, **{**options, **changes})


def _patch_for(model, patched_by: str, **options) -> None:
    """patch() on fastprobe's own behalf: for a block ("block") or a method ("method")."""
    patch(model, **options)
    getattr(unwrapped(model), _STATE).patched_by = patched_by


def _set_options(model, **changes) -> None:
    """update_patch on fastprobe's own behalf (prune_heads, a block undoing its changes): whom the
    patch is for stays as it was, and a patch made for a method goes once its options are back to
    the defaults."""
    with _PATCHING:
        state = getattr(unwrapped(model), _STATE)
        patched_by = state.patched_by
        update_patch(model, **changes)
        state.patched_by = patched_by
        _unpatch_if_unneeded(model)


def _unpatch_if_unneeded(model) -> None:
    """Unpatches a model patched for a method (not by the user, and no block open on it) whose
    options are all back to their defaults: a restored prune_heads leaves the model as it found it."""
    state = getattr(unwrapped(model), _STATE, None)
    if (state is not None and state.patched_by == "method" and state.recorder is None
            and not _changed_options(PatchOptions(), state.options)):
        unpatch(model)


@contextlib.contextmanager
def patched_with(model, **changes) -> Iterator[Any]:
    """Context manager: the model runs with `changes` to its patch options inside the block
    (update_patch) and gets the previous values back afterwards (unless the block unpatched it);
    a model that was not patched is patched with them and unpatched afterwards, unless its options
    were changed inside the block (prune_heads, patch) and not changed back: then it stays patched
    with those, the block's own changes that were not changed again inside it undone (and is
    unpatched when a prune_heads kept that way is restored, unless patch was called). Yields the
    model.
    Options belong to the model, not to a thread: blocks of several threads on one model that
    overlap without nesting leave it with the options of whichever exits last."""
    unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(PatchOptions)})
    if unknown:
        raise TypeError(f"patched_with: {', '.join(unknown)} is not a patch option "
                        f"(see fastprobe.integrations.PatchOptions)")
    if not is_patched(model):
        _patch_for(model, "block", **changes)
        options = patch_options(model)
        try:
            yield model
        finally:
            if is_patched(model):
                changed = _changed_options(options, patch_options(model))
                if not changed:
                    unpatch(model)
                else:  # (changed inside the block, a prune_heads: kept; the block's other changes undone)
                    _keep_for_method(model)
                    defaults = PatchOptions()
                    _set_options(model, **{name: getattr(defaults, name) for name in changes if name not in changed})
        return
    previous = {name: getattr(patch_options(model), name) for name in changes}
    _set_options(model, **changes)
    try:
        yield model
    finally:
        if is_patched(model):
            _set_options(model, **previous)


def _keep_for_method(model) -> None:
    """A block's own patch that outlives the block for the options changed inside it: now a method's
    (unless the user patched it inside the block), removed when those are changed back."""
    state = getattr(unwrapped(model), _STATE)
    if state.patched_by == "block":
        state.patched_by = "method"


def _under_patching_lock(function):
    """function (patch, unpatch) run holding _PATCHING: one change of patch state at a time."""
    @functools.wraps(function)
    def holding_the_lock(*args, **kwargs):
        with _PATCHING:
            return function(*args, **kwargs)
    return holding_the_lock


@_under_patching_lock
def patch(
    model,
    *,
    num_sink: int = 0,
    window: Optional[int] = None,
    head_mask: Union[None, Mapping[int, Any], torch.Tensor] = None,
    record: Union[str, Sequence[str]] = ("sink_mass",),
    stat_tokens: int = 1,
    guidance: Union[None, Mapping[str, Any], GuidanceOptions] = None,
):
    """Runs the model's attention through fastprobe.sink_attention; returns the model.

    Registers "fastprobe" with transformers' AttentionInterface and AttentionMaskInterface and
    switches this model instance (and its sub-models) to it; other models are untouched, unless
    they share a config object with it (two models made from one config): those run fastprobe's
    attention too, without options, and their forwards warn. Without
    options the outputs equal the unpatched model's (within float rounding), with and without
    padding, in prefill and in generate with a dynamic KV cache. Calling patch() on a patched model
    replaces its options (omitted ones return to their defaults).

    Args (see PatchOptions): num_sink, window, head_mask (layer -> bool [heads], or a [layers,
    heads] tensor; layers are the self-attention modules in model order, transformers' layer_idx for
    decoder-only and encoder-only models), record (statistics record_attention collects),
    stat_tokens, guidance.

    guidance=dict(gamma=..., layers=[...], orthogonalize=True, rows="last", eps=1e-6,
    image_token_id=None) runs fastprobe.dual_path_attention on the chosen layers (default: every
    causal layer, the language model's; a vision tower's cannot be chosen) of a vision-language
    model: o_cond over every key, o_uncond without the image keys,
    out = o_cond + gamma * (o_cond - o_uncond) (orthogonalized) on each row's last real query
    ("last": the token being generated) or on every query ("all"). The image keys are the
    positions of image_token_id (default: the model config's image_token_id), tracked through
    generate and its KV cache (see ImageKeys). gamma = 0 gives the unguided outputs. A guided layer
    keeps its sliding window and bidirectional blocks but takes no head mask, learned sinks, soft cap
    or sink keys with a window (NotImplementedError); recording it costs a second attention pass
    for the statistics.

    Raises NotImplementedError for a model whose attention does not go through transformers'
    attention interface (it is never left silently unpatched), TypeError / ValueError for bad
    options. At run time, masks fastprobe cannot reproduce (custom 4D masks, packed sequences with
    padding or over several rows) and training-mode dropout raise instead of computing
    something else. The attention is forward-only: a backward through a patched model raises (run
    it under torch.no_grad(); unpatch to train). Packed sequences (position ids restarting at 0
    without an attention mask, and/or flash attention's cu_seq_lens kwargs) each attend within
    themselves, with their own sinks and statistics.

    Threads: patch, update_patch and unpatch (and record_attention's patch of an unpatched model)
    run one at a time, and change the model for every thread. A forward that another thread is
    running meanwhile may run some layers each way, or fail (unpatched mid-forward, its remaining
    layers get the mask made for fastprobe): change a model while no forward of it runs.
    """
    wrapper, model = model, unwrapped(model)  # (a PEFT or compiled wrapper: its model is patched, it is returned)
    _register_interfaces()
    if sys.version_info < (3, 11):  # (the model's own mask functions, for _model_bidirectional_part)
        for module_name in {type(module).__module__ for module in model.modules()}:
            if module_name.startswith("transformers.models."):
                _note_qualnames(sys.modules.get(module_name))
    state = getattr(model, _STATE, None)
    layers = state.layers if state is not None else _check_architecture(model)
    if state is None:
        _refuse_layers_patched_through_another(model, layers)
    options = _make_options(layers, num_sink, window, head_mask, record, stat_tokens, guidance, model)
    if state is not None:
        if any(_implementation(_layer_config(m, model)) != KEY for m in layers):
            # switched away since (set_attn_implementation): switched back; unpatch still restores what it had before
            _switch(model, layers, [config for config, _ in state.previous])
        state.set_options(options)
        state.without_model = False  # (a model deep-copied after one of its layers: its patch again)
        state.patched_by = "user"  # (fastprobe's own changes go through _set_options, which keeps it)
        return wrapper

    _pass_masks_through(model)
    previous = [(config, _implementation_before_fastprobe(config)) for config in _configs(model)]
    _switch(model, layers, [config for config, _ in previous])
    # set_attn_implementation only warns for a class it cannot switch: check every layer did.
    stuck = sorted({type(m).__name__ for m in layers if _implementation(_layer_config(m, model)) != KEY})
    if stuck:
        _restore(previous)
        raise _refuse(model, f"setting its attention implementation left {', '.join(stuck)} on another one")

    state = _PatchState(layers, previous, options)
    state.model_ref = weakref.ref(model)
    state.module_ids = frozenset(id(module) for module in model.modules())
    state.model_name = type(model).__name__
    state.ungrouped_layers = _ungrouped_layers(model, layers)
    for key, (config_ref, states) in list(_SWITCHED.items()):
        if config_ref() is None or not states:  # configs or models gone without unpatch
            del _SWITCHED[key]
    for config, _ in previous:
        config_ref, states = _SWITCHED.get(id(config), (None, None))
        if config_ref is None or config_ref() is not config:
            config_ref, states = _SWITCHED[id(config)] = (weakref.ref(config), weakref.WeakSet())
        states.add(state)
    for index, module in enumerate(layers):
        setattr(module, _STATE, state)
        setattr(module, _LAYER, index)
    setattr(model, _STATE, state)
    for module in model.modules():
        setattr(module, _PART, True)
    state.hooks = [model.register_forward_pre_hook(_forward_started, with_kwargs=True),
                   model.register_forward_hook(_forward_left, always_call=True),
                   model.register_forward_hook(_forward_done)]
    return wrapper


_SLICES_KV_SHARED = "_maybe_slice_kv_shared_inputs"


def _pass_masks_through(model) -> None:
    """Gemma 4 (transformers 5.2x) with KV-shared layers: before the first of them, a prefill keeps
    only the last logits_to_keep queries (those layers write no cache) and cuts the 4D masks' query
    rows to match (_maybe_slice_kv_shared_inputs), which fails on fastprobe's [B, Lk] key padding
    masks. Those need no cut: fastprobe's queries are always the last of the keys. Each of the
    model's modules whose class defines the method gets a _MasksPassThrough in its place, on the
    module itself (its class, and every other model of it, untouched; unpatch removes it)."""
    for module in model.modules():
        owner = next((cls for cls in type(module).__mro__ if _SLICES_KV_SHARED in cls.__dict__), None)
        if owner is not None and "causal_mask_mapping" in inspect.signature(owner.__dict__[_SLICES_KV_SHARED]).parameters:
            module.__dict__[_SLICES_KV_SHARED] = _MasksPassThrough(module)


class _MasksPassThrough:
    """One module's _maybe_slice_kv_shared_inputs while it is patched: fastprobe's masks go around
    its class's method untouched, any other mask through it as before. Holds the module weakly (a
    reference cycle would keep a dropped model's weights until the cyclic collector ran); a deep
    copy or pickle of the model gets one for its own module."""

    def __init__(self, module):
        self._module = weakref.ref(module)
        parameters = list(inspect.signature(getattr(type(module), _SLICES_KV_SHARED)).parameters)
        self._masks_at = parameters.index("causal_mask_mapping") - 1  # (in the bound call's args: self left out)

    def __reduce__(self):
        return _MasksPassThrough, (self._module(),)

    def __call__(self, *args, **kwargs):
        module = self._module()
        sliced_by_class = getattr(type(module), _SLICES_KV_SHARED).__get__(module)
        at = self._masks_at
        masks = args[at] if len(args) > at else kwargs["causal_mask_mapping"]
        ours = {kind: mask for kind, mask in masks.items() if getattr(mask, _PATTERN, None) is not None}
        if not ours:
            return sliced_by_class(*args, **kwargs)
        uncut = {kind: None if kind in ours else mask for kind, mask in masks.items()}
        if len(args) > at:
            args = (*args[:at], uncut, *args[at + 1:])
        else:
            kwargs = {**kwargs, "causal_mask_mapping": uncut}
        *sliced, cut_masks = sliced_by_class(*args, **kwargs)
        return (*sliced, {**cut_masks, **ours})


def _refuse_layers_patched_through_another(model, layers: list) -> None:
    """A model whose attention layers are already patched as part of another model (a sub-model of
    a patched model, or the model around a patched sub-model): patching it too would replace their
    options and unpatching it would strip them from the other. Refused, naming that model."""
    owner = next((found for found in (getattr(module, _STATE, None) for module in layers)
                  if found is not None and not found.without_model), None)  # (not a copy's part: __deepcopy__)
    if owner is not None:
        raise ValueError(
            f"{type(model).__name__}'s attention layers are already patched as part of a {owner.model_name} (the "
            "model fastprobe.patch was called on, which contains this one or is contained in it): patch, record and "
            "unpatch through that model"
        )


def _forward_started(model, args, kwargs) -> None:
    _refuse_weights_asked(kwargs)
    state = getattr(model, _STATE)
    state.forward.in_forward = False  # (left set by an interrupted forward)
    forward = state.forward  # (its image keys made afresh if the options changed)
    forward.attended = False
    forward.packing = None
    forward.options = state.options
    if forward.image_keys is not None:  # guidance: the image-key mask of this forward's keys
        forward.image_keys.update(forward_arguments(model, args, kwargs))
    forward.in_forward = True


def _kept_logits(arguments: Mapping[str, Any]) -> int:
    """How many of a forward's last queries give logits generate uses: logits_to_keep where it is an
    integer above 1 (assisted decoding: the candidates + 1), else 1 (generate's prefill and steps;
    a direct call, which keeps all (0), is guided at its last query as documented)."""
    kept = arguments.get("logits_to_keep")
    return kept if isinstance(kept, int) and not isinstance(kept, bool) and kept > 1 else 1


def _forward_left(model, args, output) -> None:
    """A forward of the patched model ended, returning or raising (always_call): its image keys
    are no longer current (a later call of a sub-module must not guide with them). torch runs
    always_call hooks on an Exception only: after a KeyboardInterrupt the flag stays set until the
    thread's next forward of the model, and a sub-module called directly before it is guided with
    the interrupted forward's image keys instead of refused."""
    getattr(model, _STATE).forward.in_forward = False


def _forward_done(model, args, output) -> None:
    """The safety net: a forward of a patched model that never reached fastprobe's attention."""
    forward = getattr(model, _STATE).forward
    if forward.attended is False:  # (None: the forward started before this patch, in another thread)
        switched = sorted({str(_implementation(_layer_config(m, model))) for m in getattr(model, _STATE).layers} - {KEY})
        if switched:
            raise RuntimeError(
                f"{type(model).__name__} is patched but its attention implementation was switched to "
                f"{', '.join(map(repr, switched))} since (set_attn_implementation?), so this forward ran without "
                "fastprobe: call fastprobe.patch(model, ...) to switch back, or fastprobe.unpatch(model) first")
        raise RuntimeError(
            f"{type(model).__name__} ran a forward pass without calling fastprobe's attention: its attention does "
            "not go through transformers' AttentionInterface (call fastprobe.unpatch(model))"
        )


@_under_patching_lock
def unpatch(model):
    """Restores the attention implementation the model had before patch() (exactly, per config)
    and removes every option; returns the model. A model that is not patched is returned as is."""
    wrapper, model = model, unwrapped(model)  # (a PEFT or compiled wrapper: its model is unpatched)
    state = getattr(model, _STATE, None)
    if state is None:
        return wrapper
    if state.recorder is not None:
        raise RuntimeError("fastprobe.unpatch inside record_attention: leave the with block first")
    for config, _ in state.previous:
        states = _live_states(config)
        if states:
            states.discard(state)
    # a config that another live patch (a model sharing it) still switched stays switched: that one restores it
    _restore([(config, implementation) for config, implementation in state.previous if not _live_states(config)])
    for hook in state.hooks:
        hook.remove()
    for module in state.layers:
        if module is not None:  # (None: a module replaced in the model since, and freed)
            delattr(module, _STATE)
            delattr(module, _LAYER)
    for module in model.modules():
        if _PART in module.__dict__:
            delattr(module, _PART)
        if isinstance(module.__dict__.get(_SLICES_KV_SHARED), _MasksPassThrough):
            del module.__dict__[_SLICES_KV_SHARED]
    delattr(model, _STATE)
    return wrapper


# ---------------------------------------------------------------- recording


@contextlib.contextmanager
def record_attention(
    model,
    *,
    key_groups: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    statistics: Union[None, str, Sequence[str]] = None,
) -> Iterator[AttentionRecord]:
    """Context manager: the AttentionRecord of every forward pass run inside it.

        with fastprobe.record_attention(model) as record:
            model(**batch)
        record.sink_mass   # [layers, heads]

    statistics defaults to the model's patch option `record` ("sink_mass"); "group_mass" also
    needs key_groups ([B, L] integer ids, the group of each token position; tokens generated past
    them are in none, see AttentionRecord), "entropy" asks the kernel for it. A model that is not
    patched is patched (no options) for the duration of the block, and stays patched if its options
    were changed inside it (prune_heads, patch) and not changed back, rather than losing them (a
    prune_heads kept that way unpatches it when restored, as it would outside the block).

    Every forward pass of the model while the block is open counts, whichever thread runs it
    (generate in a streamer's thread included): keep other threads' passes off the model while
    recording if they should not be pooled in. Each pass counts whole: with assisted or
    prompt-lookup generation, the candidate tokens the model rejects are in the record too. A pass
    that raises part-way (an out-of-memory error caught and retried) leaves the layers it ran in the
    record, each layer averaged over the passes it saw (num_queries says how many queries): open a
    new block for the retry to keep the layers alike. The
    passes of torch.nn.DataParallel's replicas of the model count (they share its patch), but
    key_groups cannot follow them: each replica runs a slice of the batch, which its [B, L] rows
    no longer match (refused). With gradient (activation) checkpointing, the layers that backward
    recomputes are not counted again. A model the block patches is patched and unpatched for every
    thread: open and close it while no other thread runs the model (or patch the model first).
    """
    chosen = None if statistics is None else _check_statistics(statistics, "statistics")
    if num_groups is not None and key_groups is None:  # (it was ignored)
        raise ValueError("num_groups counts key_groups' groups: give it with key_groups, or later with "
                         "record.set_key_groups(key_groups, num_groups)")
    model = unwrapped(model)  # (of a PEFT or compiled wrapper: the model it holds)
    with _PATCHING:
        temporary = not is_patched(model)
        if temporary:
            _patch_for(model, "block")
        try:  # (a model patched for the block is unpatched whatever fails, the checks below included)
            state = getattr(model, _STATE)
            if state.recorder is not None:
                raise RuntimeError("record_attention is already active on this model")
            chosen = state.options.record if chosen is None else chosen
            if key_groups is not None and "group_mass" not in chosen:
                chosen = chosen + ("group_mass",)
            parameter = next(model.parameters(), None)
            dtype = torch.float64 if parameter is not None and parameter.dtype == torch.float64 else torch.float32
            record = AttentionRecord(len(state.layers), layer_heads(state.layers), chosen,
                                     device=execution_device(model), dtype=dtype, key_groups=key_groups,
                                     num_groups=num_groups)
            state.recorder = record
            options = state.options
        except BaseException:
            if temporary:
                unpatch(model)
            raise
    try:
        yield record
    finally:
        with _PATCHING:
            state.recorder = None
            if temporary and not _changed_options(options, state.options):
                unpatch(model)
            elif is_patched(model):  # (kept patched with the options changed inside the block)
                if temporary:
                    _keep_for_method(model)
                _unpatch_if_unneeded(model)  # (a method's patch whose options went back inside the block)
        record._views, record._ones = {}, {}  # (the block's per-forward caches: a kept record holds its sums only)
