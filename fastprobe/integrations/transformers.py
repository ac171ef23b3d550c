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

Mask semantics. The mask function never builds an [Lq, Lk] mask: like flash attention's, it
returns the 2D key padding mask [B, Lk] (True = real token; all True without padding) and the
kernel computes causality and windows from positions (queries are the last Lq keys: prefill, and
decoding with a dynamic cache; a static cache's buffer is cut to the slots that hold tokens, which
the mask covers, without a host sync while decoding, and a compiled decoding step gets the mask as
[B, 1, 1, Lk]: see _written_keys). The mask transformers would have built is read from its
`mask_function`: only transformers' own index functions are accepted (causal, bidirectional,
sliding-window overlays, combined with and_masks/or_masks; blocks of tokens that see each other
both ways, which the kernels take as bidirectional_blocks: 5.x's blockwise overlay (Gemma 3's
image tokens, PaliGemma's prefix) and Gemma 3's image groups in 4.5x releases after 4.53; and
segments that keep each token within its own, which the kernels take as segment_ids: packed
sequences (position ids restarting, no attention mask) and Llama 4's chunked attention, whose
chunks' first tokens are then the "first tokens" of sink_mass and num_sink); anything else (a
model's private overlay) is refused. The accepted
function is evaluated on one row of positions, so the window is exactly what the sdpa and eager
masks keep on the installed version. In transformers 5.x that is, for sliding_window = w:
    causal          kv > q - w and kv <= q   ->  fastprobe window w      (q - w < j <= q)
    bidirectional   |q - kv| <= w            ->  fastprobe window w + 1  (|q - j| < w + 1)
(flash attention reads a bidirectional window as |q - kv| < w; the sdpa and eager masks are the
reference here). The pattern rides on the returned mask tensor as an attribute, so each layer
gets the pattern of the mask it was given. A mask made elsewhere (a 2D mask the caller passes
straight to the attention, or none) falls back to flash attention's reading of the module's
arguments (is_causal, sliding_window); a 4D mask is refused, except in a module patch did not
list (a vision tower) when it is the block diagonal of images packed in one row (Pixtral's) or
only expands a key padding mask (Idefics3's in 4.57). Flash attention's packing kwargs
(cu_seq_lens_q/k, max_length_q/k: DataCollatorWithFlattening(return_flash_attn_kwargs=True)'s, or
Qwen2-VL's tower's in 4.5x) are read as flash attention reads them: one row, no cached keys, each
sequence attending within itself. In a patched layer they are its segments (those of sink_mass and
num_sink), with or without packed position ids: the mask must hold no padding, and segments it has
must be theirs (else refused; see _layer_packed_segments).

Guidance. With patch(model, guidance=...) the chosen layers run fastprobe.dual_path_attention,
which needs the image-key mask [B, Lk] of every call. The model's forward pre-hook keeps it:
ImageKeys holds a bool [B, T] over every token of the running sequences (the columns of the 2D
attention mask generate grows), started afresh by a forward on an empty cache and extended by
each decoding step; a layer's keys are its last Lk columns. Image keys are the positions of the
image token id in the input_ids of a forward that starts the sequences or carries images
(pixel_values); tokens fed by decoding steps are text (a generated placeholder id has a text
embedding). Padding needs nothing more: padded keys are out of the key padding mask.
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
import warnings
import weakref
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import torch

from ..ops._common import check_int, check_real, is_compiling
from ..ops.attention import (
    BlockHorizon, KeyGroups, SegmentSpans, block_horizon, key_masks, prepare_key_groups, segment_spans, sink_attention,
)
from ..ops.dual_attention import dual_path_attention

__all__ = [
    "AttentionRecord", "GuidanceOptions", "ImageKeys", "PatchOptions", "attention_layers", "forward_arguments",
    "is_patched", "patch", "patch_options", "record_attention", "unpatch", "update_patch",
]

KEY = "fastprobe"
STATISTICS = ("sink_mass", "group_mass", "entropy")
_STATE = "_fastprobe_state"  # on the patched model and on each of its self-attention modules
# on each self-attention module: its layer index. On the module rather than in a table keyed by the
# module's id, so copies of the module that keep its attributes (copy.deepcopy, pickle, and
# DataParallel's replicas, which share the model's state: options, recorder) find their layer
_LAYER = "_fastprobe_layer"
# id(config) -> (a weak reference to the config, a WeakSet of the _PatchStates of the models whose
# patch switched it); weak: a patched model deleted without unpatch must not be kept alive from here
_SWITCHED: dict = {}
_PATTERN = "_fastprobe_pattern"  # on the key padding masks the mask function returns
# on every module of a patched model (copies keep it, as _LAYER): a module that calls fastprobe's
# attention without being one of its layers (a vision tower's) belongs to a patched model
_PART = "_fastprobe_part"
# Held while patch, unpatch or record_attention change a model's patch state. Two threads patching
# one unpatched model at once both found it unpatched and both hooked it (unpatch then removed one
# pair of hooks, and the other failed every later forward); two entering record_attention on one
# model would both find no recorder and both record. Reentrant: record_attention patches under it.
_PATCHING = threading.RLock()


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
            raise TypeError(f"head_mask[{layer}] must be a 1-D boolean (or 0/1) tensor of shape [heads], got "
                            f"{type(keep).__name__} ({why})") from None
        if keep.is_floating_point() or keep.is_complex() or keep.dim() != 1:
            raise TypeError(f"head_mask[{layer}] must be a 1-D boolean (or 0/1) tensor of shape [heads], "
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
                      if name not in ("_threads", "recorder", "_layer_refs", "_head_mask_copies")}
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
        self._threads = threading.local()
        self._head_mask_copies = (self.options, {})
        self.module_ids = frozenset()  # (the original's modules; the copy's config is not shared)
        self.__dict__.setdefault("ungrouped_layers", self.__dict__.pop("tower_layers", frozenset()))
        if self.__dict__.setdefault("patched_by", "user") == "block":  # (the block ends for the original only)
            self.patched_by = "method"
        self.__dict__.pop("kv_sharing", None)  # (a state pickled while the masks' pass-through was on the classes)
        _masking_utils()

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
        """This thread's _ForwardState (with fresh image keys after the options changed)."""
        found = getattr(self._threads, "forward", None)
        if found is None:
            found = self._threads.forward = _ForwardState()
        if found.options_version != self._options_version:
            guidance = self.options.guidance
            found.image_keys = None if guidance is None else ImageKeys(guidance.image_token_id)
            found.options_version = self._options_version
        return found

    def head_mask(self, layer: int, device: torch.device) -> Optional[torch.Tensor]:
        """The layer's head mask on the attention's device (copied there once). Each copy is kept
        with the options it was made from: a forward in another thread that read the options
        before update_patch replaced them adds its copy to the old options' (read apart, the old
        mask went among the new options' copies, and every later forward pruned the old heads)."""
        options, copies = self._head_mask_copies
        keep = options.head_mask.get(layer)
        if keep is None:
            return None
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


# ---------------------------------------------------------------- transformers lookups


_INTERFACES: Optional[tuple] = None  # (masking_utils, AttentionInterface, AttentionMaskInterface), imported once


def _masking_utils():
    """transformers.masking_utils, after registering "fastprobe" (idempotent). The mask function
    calls it at every forward: the imports (~3 us through transformers' lazy modules) run once,
    the registrations are checked every time (two dict lookups)."""
    global _INTERFACES
    if _INTERFACES is None:
        _INTERFACES = _import_interfaces()
    masking_utils, AttentionInterface, AttentionMaskInterface = _INTERFACES
    if AttentionInterface._global_mapping.get(KEY) is not attention_forward:
        AttentionInterface.register(KEY, attention_forward)
    if AttentionMaskInterface._global_mapping.get(KEY) is not key_padding_mask:
        AttentionMaskInterface.register(KEY, key_padding_mask)
    return masking_utils


def _import_interfaces() -> tuple:
    try:
        import transformers
    except ImportError as error:
        raise ImportError("fastprobe.patch needs transformers: pip install 'transformers>=4.53'") from error
    try:
        from transformers import masking_utils
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError as error:  # before 4.53 models built their own [L, L] masks
        raise ImportError(
            f"fastprobe.patch needs transformers >= 4.53 (masking_utils and the AttentionMaskInterface); "
            f"found {transformers.__version__}"
        ) from error
    # Taken as a constant while tracing (see _evaluated_pattern). Marked here, when a model is first
    # patched, not as a decorator: torch.compiler.assume_constant_result imports torch._dynamo (and
    # with it sympy and triton, ~1 s, and sets TORCHINDUCTOR_CACHE_DIR in os.environ) on `import fastprobe`.
    torch.compiler.assume_constant_result(_evaluated_pattern)
    _note_qualnames(masking_utils)
    return masking_utils, AttentionInterface, AttentionMaskInterface


def _is_cross_attention(module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "CrossAttention" in type(module).__name__


def _self_attention_modules(model) -> list:
    """The self-attention modules in model order: what transformers' attention modules share
    (an integer layer_idx for the cache and an is_causal flag), cross-attention left out."""
    from transformers import PreTrainedModel

    return [
        module for module in model.modules()
        if not isinstance(module, PreTrainedModel) and isinstance(getattr(module, "layer_idx", None), int)
        and hasattr(module, "is_causal") and not _is_cross_attention(module)
    ]


def unwrapped(model):
    """The transformers model inside the wrappers users hold it in: a PEFT model's base model
    (get_base_model(): its adapters are layers of that model) and torch.compile's module
    (_orig_mod), nested any way; any other object as it is. fastprobe's entry points patch,
    record and read the model inside (through a wrapper's attribute forwarding, a PEFT model
    looked patched while unpatch stripped it half)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # no transformers model to unwrap: the caller says what is missing (_masking_utils)
        return model

    while isinstance(model, torch.nn.Module) and not isinstance(model, PreTrainedModel):
        inner = model._modules.get("_orig_mod")
        if inner is None and hasattr(model, "peft_config") and callable(getattr(type(model), "get_base_model", None)):
            inner = model.get_base_model()
        if not isinstance(inner, torch.nn.Module) or inner is model:
            break
        model = inner
    return model


def execution_device(model) -> torch.device:
    """Where the model computes: its first parameter's device, or for weights offloaded by
    accelerate's hooks (meta placeholders) the first hook's execution device."""
    parameter = next(model.parameters(), None)
    if parameter is None or not parameter.is_meta:
        return torch.device("cpu") if parameter is None else parameter.device
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if isinstance(device, int):  # (an index on the accelerator, as accelerate reads it)
            accelerator = getattr(torch, "accelerator", None)  # (torch >= 2.6)
            found = accelerator.current_accelerator() if accelerator is not None else None
            return torch.device("cuda" if found is None else found.type, device)
        if device is not None:
            return torch.device(device)
    return parameter.device


def attention_layers(model) -> list:
    """fastprobe's layers of a model: its self-attention modules in model order (the rows of
    record_attention's tables and the keys of head_mask)."""
    model = unwrapped(model)
    state = getattr(model, _STATE, None)
    return list(state.layers) if state is not None else _check_architecture(model)


def layer_heads(layers: list) -> list:
    """Each layer's query heads (None where neither the module nor its config says): the module's
    own count first (num_heads, num_attention_heads), then its config's num_attention_heads. A
    vision tower's layers may have other counts than the text model's, and a model with per-layer
    counts keeps them on its modules."""
    def count(module):
        for owner, name in ((module, "num_heads"), (module, "num_attention_heads"),
                            (getattr(module, "config", None), "num_attention_heads")):
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None
    return [count(module) for module in layers]


def _ungrouped_layers(model, layers: list) -> frozenset:
    """The layers whose keys are not the token sequence that key groups describe (the input_ids of
    the forward): a vision or audio tower's that are fastprobe layers (Gemma 4's; their config is
    the model's vision_config or audio_config, their keys an image's patches), and an
    encoder-decoder's decoder layers (T5Gemma's; their config is its decoder config, their keys the
    decoder's tokens)."""
    parts = ("vision", "audio") + (("decoder",) if getattr(model.config, "is_encoder_decoder", False) else ())
    ungrouped = {id(getattr(config, name)) for config in _configs(model)
                 for name in getattr(config, "sub_configs", {}) or {}
                 if name.startswith(parts) and getattr(config, name, None) is not None}
    return frozenset(index for index, module in enumerate(layers) if id(getattr(module, "config", None)) in ungrouped)


def _configs(model) -> list:
    """Every config the model's attention dispatch reads: its own, nested sub-configs (e.g. a VLM's
    text_config) and those of sub-models, each once."""
    from transformers import PreTrainedModel

    found, queue = {}, [model.config]
    queue += [m.config for m in model.modules() if isinstance(m, PreTrainedModel)]
    while queue:
        config = queue.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        queue += [getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {}]
        queue = [c for c in queue if c is not None]
    return list(found.values())


def _implementation(config) -> Optional[str]:
    return getattr(config, "_attn_implementation_internal", getattr(config, "_attn_implementation", None))


def _write_implementation(config, implementation: Optional[str]) -> None:
    if hasattr(config, "_attn_implementation_internal"):
        config._attn_implementation_internal = implementation
    else:  # no internal attribute: the public property setter
        config._attn_implementation = implementation


def _layer_config(module, model):
    """The config a self-attention module dispatches on."""
    return getattr(module, "config", model.config)


def _switch(model, layers: list, configs: list) -> None:
    """Switches the model and its sub-models (every config in `configs`) to "fastprobe"."""
    if not hasattr(model, "set_attn_implementation"):  # transformers 4.53; its sub-models hold copies of sub-configs
        for config in configs:
            _write_implementation(config, KEY)
        return
    model.set_attn_implementation(KEY)
    if all(_layer_config(m, model) is not model.config for m in layers):
        # a wrapper with no attention code of its own (LLaVA's): 4.54-4.55 leave its config, 4.56+ switch it
        _write_implementation(model.config, KEY)


def _live_states(config) -> Any:
    """The _PatchStates of the live patches that switched this config object (several models may
    share one config), or ()."""
    config_ref, states = _SWITCHED.get(id(config), (None, ()))
    return states if config_ref is not None and config_ref() is config else ()


def _implementation_before_fastprobe(config) -> Optional[str]:
    """The config's attention implementation as it was before any live patch switched it: its own,
    or, where the patch of another model sharing the config switched it, what that one restores."""
    for other in _live_states(config):
        for known, implementation in other.previous:
            if known is config:
                return implementation
    return _implementation(config)


def _restore(previous: list) -> None:
    """Writes each config's previous implementation back. Done per config, not through
    set_attn_implementation(previous): that re-validates (sdpa may turn into eager) and spreads one
    value over sub-configs that may have differed."""
    for config, implementation in previous:
        _write_implementation(config, implementation)


def _refuse(model, why: str, consequence: str = "Its attention would not run through fastprobe, so it is refused "
                                                 "rather than left silently unpatched.") -> NotImplementedError:
    return NotImplementedError(f"fastprobe cannot patch {type(model).__name__}: {why}. {consequence}")


def _check_architecture(model) -> list:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"fastprobe.patch takes a transformers PreTrainedModel, got {type(model).__name__}")
    # (named as attention, or dispatching through the interface under another name: LongCat-Flash's MLA)
    attention_like = sorted({type(m).__name__ for m in model.modules() if not isinstance(m, PreTrainedModel)
                             and (_named_attention(type(m)) or _calls_interface(type(m)))})
    no_attention = _refuse(model, "it has no attention layers (in this configuration all its layers are recurrent, "
                                  "state-space, convolutional or linear attention)",
                           "There is nothing for fastprobe's attention to run.")
    if not attention_like:
        raise no_attention
    # The flag transformers sets on models whose attention goes through the AttentionInterface.
    flagged = getattr(type(model), "_supports_attention_backend", False)
    if not flagged and not _hybrid_family(model):
        raise _refuse(model, "transformers does not mark it as running its attention through the AttentionInterface "
                             "(the class does not set _supports_attention_backend)")
    unmarked = _unmarked_sub_model(model)
    if unmarked is not None:  # BLIP-2's T5 language model, a LLaVA's data2vec-vision tower
        raise _refuse(model, f"its {unmarked[0]} ({unmarked[1]}) has attention of its own, and transformers does not "
                             "mark that class as running it through the AttentionInterface (it does not set "
                             "_supports_attention_backend)")
    # transformers 4.53's GPT-2, Kosmos-2 (and other models not on masking_utils) build their own 4D masks
    own_masks = sorted({f"{type(m).__name__} ({method})" for m in model.modules() if isinstance(m, PreTrainedModel)
                        for method in _OWN_MASK_METHODS if hasattr(m, method)})
    if own_masks:
        raise _refuse(model, f"{', '.join(own_masks)} builds its own [L, L] masks instead of asking transformers' "
                             "AttentionMaskInterface")
    layers = _self_attention_modules(model)
    if not layers:
        # Doge: a layer_idx but no is_causal (its attention adds a dynamic mask of its own)
        softmax = [m for m in model.modules() if _named_attention(type(m)) and _calls_interface(type(m))]
        if _hybrid_family(model) and not softmax:  # (Kimi Linear of delta-attention layers alone)
            raise no_attention
        undeclared = sorted({type(m).__name__ for m in softmax
                             if isinstance(getattr(m, "layer_idx", None), int) and not hasattr(m, "is_causal")})
        if undeclared:
            raise _refuse(model, f"{', '.join(undeclared)} does not declare is_causal, so fastprobe cannot tell how "
                                 "it masks its keys")
        raise _refuse(model, f"none of its attention modules ({', '.join(attention_like)}) is a language model's "
                             "self-attention layer (a module with layer_idx and is_causal), which is what fastprobe "
                             "patches: a model without one (a vision or audio encoder, a DistilBERT-style text "
                             "encoder) is not supported on its own (a vision-language model's tower runs through "
                             "fastprobe beside its language model)", "There would be no layer to patch or record.")
    bypassing = [] if flagged else [type(m).__name__ for m in layers if not _calls_interface(type(m))]
    if bypassing:
        raise _refuse(model, f"{', '.join(sorted(set(bypassing)))} does not dispatch through transformers' "
                             "AttentionInterface (ALL_ATTENTION_FUNCTIONS)")
    merged = sorted({type(m).__name__ for m in layers if _attends_to_another_sequence(type(m))})
    if merged:  # T5Gemma 2's decoder: keys [its own tokens, the encoder's], under one concatenated mask
        raise _refuse(model, f"{', '.join(merged)} attends to its own tokens and another sequence's (the encoder's) "
                             "in one call, under a mask concatenated from both, which fastprobe's causal and padding "
                             "patterns do not describe", "It is refused rather than run under the wrong mask.")
    # DeepSeek-V3.2, GLM-MoE-DSA, GLM-5-Next, Qwen4-Exp: an indexer picks each query's keys
    sparse = sorted({type(m).__name__ for m in layers if getattr(m, "indexer", None) is not None})
    if sparse:
        raise _refuse(model, f"{', '.join(sparse)} attends to the keys its indexer selects for each query (sparse "
                             "attention), which fastprobe does not reproduce")
    return layers


# Methods of models that build their own 4D masks rather than asking the AttentionMaskInterface
_OWN_MASK_METHODS = ("_update_causal_mask", "_prepare_decoder_attention_mask")


def _unmarked_sub_model(model) -> Optional[tuple]:
    """(path, class name) of the first sub-model with attention modules of its own (not those of
    a sub-model inside it) whose class transformers does not mark as dispatching attention
    through the AttentionInterface, or None: a marked model may hold an unmarked one (BLIP-2 a T5
    language model, whose position bias fastprobe cannot add; a LLaVA a data2vec-vision tower,
    whose attention would bypass fastprobe). The parts of a hybrid family's model (Qwen 3.5's
    vision model) are unmarked as the model is, and dispatch through the interface as it does."""
    from transformers import PreTrainedModel

    hybrid = _hybrid_family(model)

    def first_unmarked(module, path: str) -> Optional[tuple]:
        for name, child in module.named_children():
            child_path = f"{path}.{name}" if path else name
            if isinstance(child, PreTrainedModel):
                unmarked = not (getattr(type(child), "_supports_attention_backend", False) or hybrid
                                or _hybrid_family(child))
                if unmarked and has_own_attention(child):
                    return child_path, type(child).__name__
            found = first_unmarked(child, child_path)
            if found is not None:
                return found
        return None

    def has_own_attention(module) -> bool:
        return any(not isinstance(child, PreTrainedModel)
                   and (_named_attention(type(child)) or has_own_attention(child)) for child in module.children())

    return first_unmarked(model, "")


def _attends_to_another_sequence(module_class) -> bool:
    """Whether an attention module's forward requires another sequence's states (no default):
    self- and cross-attention merged in one call (T5Gemma 2's decoder). Modules that only may
    take them (GPT-2's, a cross-attention instance of the same class) have a default None."""
    try:
        parameters = inspect.signature(inspect.unwrap(module_class.forward)).parameters
    except (TypeError, ValueError):
        return False
    return any(parameters[name].default is inspect.Parameter.empty for name in
               ("encoder_hidden_states", "key_value_states", "cross_attention_states") if name in parameters)


def _named_attention(cls) -> bool:
    """Whether a module class is named as attention (LlamaAttention, GPT2Attention, MultiheadAttn...)."""
    name = cls.__name__.lower()
    return "attention" in name or "attn" in name


# Decoder families whose attention layers dispatch through the AttentionInterface though their
# classes do not set _supports_attention_backend: hybrids of attention layers with linear-attention
# or state-space layers (the latter are not attention to fastprobe: they run as they are). Each
# is checked against SDPA in tests/test_architectures.py (HYBRIDS); its attention modules must
# also name ALL_ATTENTION_FUNCTIONS (_calls_interface).
_HYBRID_FAMILIES = frozenset({
    "bamba", "falcon_h1", "jamba", "kimi_linear", "nemotron_h", "olmo_hybrid", "qwen3_5", "qwen3_5_text", "qwen3_5_moe",
    "qwen3_5_moe_text", "qwen3_next", "zamba2",
})


def _hybrid_family(model) -> bool:
    """Whether a decoder-only model (its own config, not an encoder-decoder's) is of _HYBRID_FAMILIES."""
    config = model.config
    return not getattr(config, "is_encoder_decoder", False) and getattr(config, "model_type", None) in _HYBRID_FAMILIES


def _calls_interface(module_class) -> bool:
    """Whether an attention module's forward (under its decorators) looks its attention up in
    transformers' ALL_ATTENTION_FUNCTIONS."""
    forward = inspect.unwrap(module_class.forward)
    code = getattr(forward, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


# ---------------------------------------------------------------- the mask function


class _MaskPattern(NamedTuple):
    causal: bool
    window: Optional[int]  # fastprobe's window: causal q - w < j <= q, bidirectional |q - j| < w
    dropped: Optional[torch.Tensor]  # [B] bool: the row's first real token left a sliding cache
    # (num_sink, stat_tokens) -> the mask's KeyMasks, made by the first layer that needs them
    # and reused by the others of this forward; _PACKED -> the cu_seq_lens segments checked against it;
    # (_RECORD_WEIGHTS, Lq, dtype) -> the recorder's weights of the real queries (AttentionRecord.add)
    key_masks: dict
    # why fastprobe cannot reproduce the mask, raised only if a layer attends with it (models make
    # masks for layer types they may not have, e.g. Qwen2-MoE a sliding one of window 0)
    refused: Optional[str] = None
    blocks: Optional[BlockHorizon] = None  # the keys' bidirectional blocks (blockwise overlay)
    segments: Optional[SegmentSpans] = None  # the keys' segments (packed sequences, chunked attention)
    kv_offset: int = 0  # the position of the first key in its row (> 0: a sliding cache dropped the tokens before)
    # the keys are a static cache's buffer: its first slots (as many as the mask covers) hold the
    # row's tokens, the others are not written yet, and the attention reads the first ones only
    static: bool = False
    # the 2D mask over the row's tokens so far (a dynamic cache's full-attention keys are its last
    # columns), for a layer that holds more keys than the mask was sized for (_pattern_over_the_row)
    row: Optional[torch.Tensor] = None
    # made without a 2D mask (the model got no attention_mask): every key is real, so the layers
    # attend with no key padding mask (the kernels' unmasked path; nothing per forward to prepare)
    no_padding: bool = False


_LEAVES = ("causal_mask_function", "bidirectional_mask_function")
_OVERLAYS = ("sliding_window_overlay.", "sliding_window_bidirectional_overlay.")
_COMBINATORS = ("and_masks.", "or_masks.")


def _qualname(fn, default=None):
    """fn's qualified name, read from its code object where it has one (torch.compile traces
    code.co_qualname, not function.__qualname__: a graph break, so fullgraph=True failed).
    Python 3.10's code objects have no co_qualname, and the __qualname__ that Dynamo gives a
    function it traces there is the bare co_name ("and_mask", not "and_masks.<locals>.and_mask"):
    the name noted for the code's place by _note_qualnames comes first."""
    code = getattr(fn, "__code__", None)
    name = getattr(code, "co_qualname", None)  # (Python 3.11+)
    if name is None and code is not None and _QUALNAMES:
        name = _QUALNAMES.get((code.co_filename, code.co_firstlineno, code.co_name))
    return name if name is not None else getattr(fn, "__qualname__", default)


_QUALNAMES: dict = {}  # (Python 3.10) (file, first line, co_name) of a code object -> its qualified name
_QUALNAMES_NOTED: set = set()  # the modules _note_qualnames walked


def _note_qualnames(module) -> None:
    """(Python 3.10, called eagerly: from patch) notes in _QUALNAMES the qualified names of module's
    functions, of its classes' methods and of the functions they define, at any depth."""
    name = getattr(module, "__name__", None)
    if sys.version_info >= (3, 11) or name is None or name in _QUALNAMES_NOTED:
        return
    _QUALNAMES_NOTED.add(name)

    def note(code, qualname: str) -> None:
        _QUALNAMES[(code.co_filename, code.co_firstlineno, code.co_name)] = qualname
        for const in code.co_consts:
            if isinstance(const, type(code)):
                note(const, f"{qualname}.<locals>.{const.co_name}")

    for value in list(vars(module).values()):
        members = vars(value).values() if isinstance(value, type) else (value,)
        for member in members:
            member = getattr(member, "__func__", member)  # (static and class methods)
            code = getattr(member, "__code__", None)
            if getattr(member, "__module__", None) == name and isinstance(code, type(_note_qualnames.__code__)):
                note(code, member.__qualname__)


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__ or ())))


def _mask_structure(fn, masking_utils) -> tuple:
    """`fn` as a nested tuple of the transformers index functions it is made of (names and
    sliding windows), which alone decide its pattern; raises for any part that is not one of
    them (it may index per-token tensors: packed sequences, image blocks)."""
    name = _qualname(fn)
    if name is None:  # (repr only when needed: this runs at every forward)
        name = repr(fn)
    if getattr(fn, "__module__", None) != masking_utils.__name__:
        model_part = _model_bidirectional_part(fn, name)
        if model_part is None:
            raise ValueError(f"{getattr(fn, '__module__', '?')}.{name}")
        return model_part
    if name in _LEAVES:
        return (name,)
    if name.startswith(_OVERLAYS):
        return (name, int(_closure(fn)["sliding_window"]))
    if name.startswith(_COMBINATORS):
        return (name, tuple(_mask_structure(part, masking_utils) for part in _closure(fn)["mask_functions"]))
    raise ValueError(f"{masking_utils.__name__}.{name}")


def _model_bidirectional_part(fn, name: str) -> Optional[tuple]:
    """The or-parts with which a model's own code makes its layers bidirectional (Gemma 3 and
    Step3p7 with use_bidirectional_attention, e.g. EmbeddingGemma), as a _mask_structure part, else
    None: its overlay |q - j| < sliding_window (a window), and the full layers' `lambda *args:
    torch.tensor(True)` (no closure, nothing read but those names: it cannot index per-token data)."""
    if not getattr(fn, "__module__", "").startswith("transformers.models."):
        return None
    if name.startswith("_bidirectional_window_overlay."):
        return (name, int(_closure(fn)["sliding_window"]))
    code = getattr(fn, "__code__", None)
    if name.endswith(".forward.<locals>.<lambda>") and not getattr(fn, "__closure__", None) and code is not None \
            and set(code.co_names) <= {"torch", "tensor", "bool"}:
        return (name,)
    return None


def _windows(structure: tuple) -> list:
    """The sliding windows in a _mask_structure."""
    name, *rest = structure
    if not rest:
        return []
    if isinstance(rest[0], int):
        return [rest[0]]
    return [window for part in rest[0] for window in _windows(part)]


def _is_masking_utils(fn, masking_utils, prefix: str) -> bool:
    """fn is one of masking_utils' functions (or closures) whose qualified name starts with prefix."""
    in_module = getattr(fn, "__module__", None) == masking_utils.__name__
    return in_module and _qualname(fn, "").startswith(prefix)


def _packs_nothing(fn, masking_utils) -> bool:
    """A packed-sequence part whose rows each hold one sequence: its sequence ids (a cumsum of
    position jumps, so non-decreasing from 0) are all 0, and it masks nothing."""
    if not _is_masking_utils(fn, masking_utils, "packed_sequence_mask_function."):
        return False
    return not bool(_closure(fn)["packed_sequence_mask"][:, -1].any())  # one sync, as 5.x's own check


def _unmasks_nothing(fn, masking_utils) -> bool:
    """An image-block part of a batch without images, which unmasks nothing: 4.53's Gemma 3
    token-type function with no image token (its processor sends token_type_ids for text alone).
    (The block parts fastprobe reproduces are taken out before, by _without_key_parts.)"""
    return _is_gemma3_token_types(fn) and not bool((_closure(fn)["token_type_ids"] == 1).any())


def _is_gemma3_token_types(fn) -> bool:
    """fn is 4.5x Gemma 3's image-block mask function (token_type_ids_mask_function)."""
    return getattr(fn, "__module__", None) == "transformers.models.gemma3.modeling_gemma3" and _qualname(
        fn, "").startswith("token_type_ids_mask_function.")


def _block_ids(fn, masking_utils) -> Optional[torch.Tensor]:
    """The block ids [B, T] (-1: none) of a part whose blocks of tokens see each other both ways:
    5.x's blockwise overlay, or Gemma 3's token-type function in the 4.5x releases that group the
    image tokens (image_group_ids; 4.53's joins any image tokens within one image length instead,
    which no blocks say); else None."""
    if _is_masking_utils(fn, masking_utils, "blockwise_overlay."):
        return _closure(fn)["block_sequence_ids"]
    if _is_gemma3_token_types(fn) and "image_group_ids" in _closure(fn):
        closure = _closure(fn)
        return torch.where(closure["token_type_ids"] == 1, closure["image_group_ids"], -1)
    return None


def _without_no_ops(fn, masking_utils):
    """fn less the parts that change nothing, at any depth: and-parts that pack nothing
    (transformers 4.53-4.57 add one to every mask made without an attention mask and a cache; 5.x
    only to really packed rows) and or-parts that unmask nothing."""
    no_op = {"and": _packs_nothing, "or": _unmasks_nothing}
    return _rewritten(fn, masking_utils, lambda kind, part, _: None if no_op[kind](part, masking_utils) else part)


def _rewritten(fn, masking_utils, rewrite):
    """fn with, at any depth, each part of its and_masks / or_masks replaced by rewrite(kind,
    part, siblings) (kind "and" or "or"; None drops the part); fn itself when nothing changes."""
    for kind, combine in (("and", masking_utils.and_masks), ("or", masking_utils.or_masks)):
        if _is_masking_utils(fn, masking_utils, f"{kind}_masks."):
            parts = _closure(fn)["mask_functions"]
            kept = [_rewritten(new, masking_utils, rewrite) for new in (rewrite(kind, part, parts) for part in parts)
                    if new is not None]
            changed = len(kept) != len(parts) or any(new is not old for new, old in zip(kept, parts))
            return combine(*kept) if changed else fn
    return fn


def _has_window(fn, masking_utils) -> bool:
    """fn is or holds (through and_masks / or_masks) a sliding-window overlay."""
    if _is_masking_utils(fn, masking_utils, _OVERLAYS):
        return True
    return _is_masking_utils(fn, masking_utils, _COMBINATORS) and any(
        _has_window(part, masking_utils) for part in _closure(fn)["mask_functions"])


def _segment_part(fn, masking_utils) -> Optional[tuple]:
    """A part that keeps each token within its segment, as (packed sequence ids [B, T], None) or
    (chunk size, left padding [B] or None: chunks counted from 0), else None: packed sequences
    (packed_sequence_mask_function) and chunked attention (chunked_overlay; transformers 4.53's
    and the legacy one of 4.5x with torch < 2.6 ignore left padding)."""
    if _is_masking_utils(fn, masking_utils, "packed_sequence_mask_function."):
        return _closure(fn)["packed_sequence_mask"], None
    if _is_masking_utils(fn, masking_utils, ("chunked_overlay.", "_legacy_chunked_overlay.")):
        closure = _closure(fn)
        return int(closure["chunk_size"]), closure.get("left_padding")
    return None


def _without_key_parts(fn, masking_utils, blocks: list, segments: list):
    """fn less the parts the kernels take from per-key tensors, at any depth: what stays is the
    pattern they are an exception to. Block parts (_block_ids) or-ed in: appends (block ids,
    whether a window is or-ed beside them) to blocks. Segment parts (_segment_part) and-ed in:
    appends them to segments, and unwraps 5.x's remapping of positions to each packed sequence's
    own beside them (positions go up by one within a sequence, so the pattern is the same)."""
    def take(kind, part, siblings):
        if kind == "or":
            ids = _block_ids(part, masking_utils)
            if ids is not None:
                blocks.append((ids, any(_has_window(other, masking_utils) for other in siblings if other is not part)))
            return None if ids is not None else part
        if _packs_nothing(part, masking_utils):
            return None
        found = _segment_part(part, masking_utils)
        if found is not None:
            segments.append(found)
            return None
        packed_beside = any(_is_masking_utils(other, masking_utils, "packed_sequence_mask_function.") for other in siblings)
        if packed_beside and _is_masking_utils(part, masking_utils, "remap_positions_for_packed_sequence."):
            return _closure(part)["mask_function"]
        return part

    return _rewritten(fn, masking_utils, take)


def _key_segments(found: list, kv_offset: int, kv_length: int, batch: int, device) -> tuple:
    """(SegmentSpans of the keys, dropped [B] bool or None) from _without_key_parts' segment finds:
    chunk ids floor((position - left padding) / chunk) of the absolute key positions, or packed
    sequence ids. dropped: rows whose queries' segment began before the first cached key (a
    sliding cache dropped its first tokens, e.g. a chunked layer's)."""
    if len(found) > 1:
        raise NotImplementedError("fastprobe attention got a mask with two segment parts (packed sequences and "
                                  "chunks together)")
    source, left_padding = found[0]
    if isinstance(source, torch.Tensor):  # packed sequence ids (made without a cache: kv_offset 0)
        ids = source[:, kv_offset:kv_offset + kv_length].to(torch.int64)
        if ids.shape[1] != kv_length:
            raise NotImplementedError(f"fastprobe attention got packed sequence ids for {source.shape[1]} positions "
                                      f"but {kv_length} keys")
        ids, dropped = ids.expand(batch, kv_length), None
    else:
        position = torch.arange(kv_offset, kv_offset + kv_length, device=device)
        shift = torch.zeros(batch, dtype=torch.int64, device=device) if left_padding is None else (
            torch.as_tensor(left_padding, device=device).to(torch.int64).expand(batch))
        ids = torch.div(position[None, :] - shift[:, None], source, rounding_mode="floor")
        first_start = shift + ids[:, 0] * source  # where the first cached key's chunk began
        dropped = (first_start < kv_offset) & (ids[:, 0] == ids[:, -1]) if kv_offset > 0 else None
    try:
        return segment_spans(ids.contiguous()), dropped
    except ValueError as why:
        raise NotImplementedError(f"fastprobe attention cannot reproduce these segments: {why}") from None


def _key_blocks(found: list, kv_offset: int, kv_length: int, window: Optional[int],
                q_length: int) -> Optional[BlockHorizon]:
    """The keys' blocks from _without_key_parts' finds (ids [B, >= T] over absolute positions) as the
    kernels' horizon, checked once for the layers of this forward, or None when no key is in a
    block. The kernels apply a window to a block's earlier tokens too, as and(window, or(causal,
    blocks)) does (5.x's Gemma 3); or(and(causal, window), blocks) agrees with it only while no
    block is longer than the window, so a longer one is refused."""
    ids = found[0][0]
    if any(other is not ids and not torch.equal(other, ids) for other, _ in found[1:]):
        raise NotImplementedError("fastprobe attention got a mask with two different blockwise overlays")
    ids = ids[:, kv_offset:kv_offset + kv_length]
    if ids.shape[1] < kv_length:
        ids = torch.nn.functional.pad(ids, (0, kv_length - ids.shape[1]), value=-1)
    if not bool((ids >= 0).any()):
        return None
    if window is not None and any(beside for _, beside in found):
        starts = torch.ones_like(ids, dtype=torch.bool)
        starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
        run = torch.cumsum(starts.flatten(), 0)[(ids >= 0).flatten()]  # run index of every block position
        longest = int(torch.bincount(run).max()) if run.numel() else 0
        if longest > window:
            raise NotImplementedError(
                f"fastprobe attention got bidirectional blocks (image tokens) of {longest} positions under a sliding "
                f"window of {window}; fastprobe reproduces such masks only for blocks no longer than the window"
            )
    try:
        return block_horizon(ids, q_length)
    except ValueError as why:  # a block resuming after a gap
        raise NotImplementedError(f"fastprobe attention cannot reproduce these bidirectional blocks: {why}") from None


def _mask_pattern(mask_function) -> tuple[bool, Optional[int]]:
    """(causal, window) of a mask function made of transformers' index functions, read by
    evaluating it on one query row: the visible keys must be one interval ending at the query
    (causal) or centred on it (bidirectional)."""
    masking_utils = _masking_utils()
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    mask_function = _without_no_ops(mask_function, masking_utils)
    try:
        structure = _mask_structure(mask_function, masking_utils)
    except ValueError as part:
        raise NotImplementedError(
            f"fastprobe attention supports causal and bidirectional masks with an optional sliding window; this "
            f"model asked for a mask built from {part} (e.g. packed sequences, image-token blocks or chunked "
            "attention), which fastprobe cannot reproduce from positions"
        ) from None
    if structure not in _PATTERNS:  # transformers builds new closures every forward: read each structure once
        _PATTERNS[structure] = _evaluated_pattern(mask_function, _windows(structure))
    return _PATTERNS[structure]


_PATTERNS: dict = {}  # _mask_structure -> (causal, window)


def _evaluated_pattern(mask_function, windows: list) -> tuple[bool, Optional[int]]:
    """(causal, window) of mask_function, evaluated on one query row. Taken as a constant while
    tracing, with no guard on mask_function: sound as called, once per _mask_structure key (the
    index functions and windows that alone decide the pattern)."""
    # (on real tensors, also under a dispatch mode: non-strict torch.export and make_fx trace with fake
    # tensors, whose nonzero() has a data-dependent size)
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return _pattern_on_one_row(mask_function, windows)


def _pattern_on_one_row(mask_function, windows: list) -> tuple[bool, Optional[int]]:
    size = 2 * max(windows, default=1) + 8
    zero, query = torch.tensor(0), torch.tensor(size)
    keys = torch.arange(2 * size + 1)
    visible = torch.as_tensor(mask_function(zero, zero, query, keys)).to(torch.bool).expand(keys.shape)
    seen = visible.nonzero().flatten().tolist()
    if seen and len(seen) == seen[-1] - seen[0] + 1:
        first, last = seen[0], seen[-1]
        if last == size:
            return True, None if first == 0 else size - first + 1
        if last == 2 * size and first == 0:
            return False, None
        if last - size == size - first:
            return False, size - first + 1
    raise NotImplementedError(f"fastprobe attention cannot reproduce the mask pattern of {mask_function!r}")


def key_padding_mask(
    batch_size: Optional[int] = None,
    q_length: Optional[int] = None,
    kv_length: Optional[int] = None,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    cache_position: Optional[torch.Tensor] = None,
    device=None,
    allow_is_causal_skip: bool = True,
    **unused: Any,
) -> torch.Tensor:
    """The "fastprobe" entry of transformers' AttentionMaskInterface: the [B, Lk] key padding mask
    (True = real; never an [L, L] mask), carrying the (causal, window) pattern; [B, 1, 1, Lk] for a
    decoding step with a compilable cache (see below). Lk is kv_length, or with a static cache the
    slots that hold tokens (_written_keys)."""
    if getattr(attention_mask, _PATTERN, None) is not None:
        # a mask this function made for an outer model (PaliGemma's, with its prefix block), handed to
        # the inner text model that makes one again: kept as is, as transformers keeps a 4D mask
        return attention_mask
    if q_length is None and cache_position is not None:  # transformers 4.53-4.5x: positions, not offsets
        q_length, q_offset = cache_position.shape[0], cache_position[0]
    found, found_segments = [], []
    if mask_function is not None:
        mask_function = _without_key_parts(mask_function, _masking_utils(), found, found_segments)
    blocks = segments = segments_dropped = None
    written = kv_length  # the keys that hold tokens (fewer in a static cache: see _written_keys)
    try:
        causal, window, refused = *_mask_pattern(mask_function), None
        if causal or window is not None:  # (bidirectional without a window: no order to keep)
            written = _written_keys(q_offset, _as_int(q_length), _as_int(kv_offset), kv_length, attention_mask)
        if found and causal:
            blocks = _key_blocks(found, _as_int(kv_offset), written, window, _as_int(q_length))
        if found_segments:
            rows = batch_size if attention_mask is None else attention_mask.shape[0]
            where = device if attention_mask is None else attention_mask.device
            segments, segments_dropped = _key_segments(found_segments, int(kv_offset), written, rows, where)
    except NotImplementedError as why:
        causal, window, refused = True, None, str(why)
    static = written < kv_length
    if (not static and (causal or window is not None) and q_length == 1 and not allow_is_causal_skip
            and isinstance(q_offset, torch.Tensor) and attention_mask is not None and attention_mask.dim() == 2
            and attention_mask.shape[-1] == kv_offset + kv_length):
        # The decoding step that fills a static buffer's last slot (generate sizes the buffer so, for
        # its last token): its mask covers every slot, and it keeps the static pattern of the steps
        # before (the same keys either way), so that compiled decoding keeps their graph.
        static = True
    if attention_mask is None:
        mask = torch.ones(batch_size, written, dtype=torch.bool, device=device)
    else:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] < (kv_offset + written if static else kv_length):
            raise ValueError(f"fastprobe attention expects a 2D attention mask covering the {written} keys, "
                             f"got shape {tuple(attention_mask.shape)}")
        # A new object (a view, or a copy), never the caller's: it carries the pattern. Contiguous, since
        # generate makes the masks of compilable (static) caches once per step and passes on their
        # .contiguous(), which must be the mask itself to keep the pattern. A static cache's tokens
        # are the mask's first columns.
        mask = attention_mask.to(torch.bool)
        mask = (mask[:, kv_offset:kv_offset + written] if static else mask[:, -kv_length:]).contiguous()
    dropped = segments_dropped  # with segments, each one's first tokens count (see _key_segments)
    if kv_offset > 0 and segments is None:  # a sliding-window cache dropped its oldest kv_offset tokens
        first_real = attention_mask.to(torch.int8).argmax(-1) if attention_mask is not None else 0
        dropped = torch.as_tensor(first_real < kv_offset, device=mask.device).expand(mask.shape[0])
    if q_length == 1 and not allow_is_causal_skip:
        # A decoding step with a compilable (static) cache: generate makes this mask ahead and hands it
        # to the compiled forward, whose mask function (this one) sees it again. transformers returns
        # a 4D mask as it is, but runs a 2D one through .to(), which under torch.compile loses the
        # pattern and would re-read the mask function (Python introspection: a graph break a step).
        mask = mask[:, None, None, :]  # [B, 1, 1, Lk] (_pattern_of reads it back as [B, Lk])
        if static and not is_compiling() and "torch._dynamo" in sys.modules:
            # A static cache's mask covers the slots written so far: one more each step. Its width is
            # marked dynamic (Dynamo would otherwise compile the first step for its width and
            # recompile at the second), so that generate's compiled step makes one graph, as the
            # unpatched model's full-buffer masks do. (No torch.compile, no torch._dynamo imported.)
            torch._dynamo.maybe_mark_dynamic(mask, 3)
    row = None if static else attention_mask
    no_padding = attention_mask is None and dropped is None and segments is None and not static
    setattr(mask, _PATTERN, _MaskPattern(causal, window, dropped, {}, refused, blocks, segments, int(kv_offset),
                                         static, row, no_padding))
    return mask


def _as_int(value):
    """value as an int, a SymInt kept symbolic (int() of a traced length specializes it: non-strict
    torch.export with a dynamic sequence length refused to export)."""
    return value if isinstance(value, (int, torch.SymInt)) else int(value)


def _written_keys(q_offset, q_length: int, kv_offset: int, kv_length: int, attention_mask) -> int:
    """How many of the kv_length keys (positions kv_offset..) hold tokens, the queries being the last
    of them. A dynamic cache holds exactly the tokens so far; a static cache hands over its whole
    buffer, whose slots past the queries are unwritten (zeros), and gives the query offset as a
    tensor on the device, so that compiled decoding needs no host sync. Decoding (one query) with a
    2D attention mask that ends before the buffer does (generate's: one column per token so far)
    takes the tokens from the mask's width, without a sync; keys past the mask are padding to
    transformers too. While compiling, as many queries as keys from position 0 (a prefill) need no
    offset either. Otherwise the offset is read (one sync per mask, i.e. per forward)."""
    if isinstance(q_offset, torch.Tensor):
        if q_length == 1 and attention_mask is not None and attention_mask.dim() == 2 and (
                attention_mask.shape[-1] < kv_offset + kv_length):
            return max(attention_mask.shape[-1] - kv_offset, 1)
        if is_compiling() and kv_offset == 0 and q_length == kv_length:
            # as many queries as keys from position 0: every key written, the only offset that fits is 0
            # (not read: torch.export of transformers 4.5x, whose masks get the offset as a tensor, cannot)
            return kv_length
        q_offset = int(q_offset)
    written = q_offset + q_length - kv_offset
    if not q_length <= written <= kv_length:
        raise NotImplementedError(
            f"fastprobe attention takes the queries to be the last of the keys it attends to; here {q_length} "
            f"queries start at position {q_offset} but the keys are positions {kv_offset}..{kv_offset + kv_length - 1}"
            " (a cache fastprobe does not know?). Use a dynamic or static cache."
        )
    return written


# ---------------------------------------------------------------- the attention function

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
    if _IGNORED_KWARGS.issuperset(kwargs):  # (the usual call: a decoding step's layers pay ~0.2 us less)
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
_RECORD_WEIGHTS = "record weights"  # (the first part of) the key of the recorder's query weights there


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

    state.forward.attended = True
    options, record = state.options, state.recorder
    if record is not None and _recomputed_in_backward():
        record = None  # (its forward was recorded: a second count would pool the layer's queries twice)
    if options.window is not None:
        window = _narrowest(window, options.window)
    guided = None
    if options.guidance is not None and layer in options.guidance.layers:
        guided = _guided_attention(state, layer, query, key, value, padding, causal, window, scaling, softcap, s_aux,
                                   blocks, segments)
        if record is None:
            return guided.transpose(1, 2), None
        # recording a guided layer: its statistics (of the attention weights, which guidance leaves
        # as they are) come from sink_attention over the same keys, a second pass
    stat_tokens = options.stat_tokens
    if dropped is not None and (options.num_sink > 0 or (record is not None and stat_tokens > 1)):
        raise NotImplementedError(
            "this layer's sliding-window cache has dropped the first tokens, so num_sink and stat_tokens > 1 cannot "
            "be honoured while decoding past the window; use them in prefill, or with a full (non-sliding) cache"
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
        key_padding_mask=keys, head_mask=state.head_mask(layer, query.device) if options.head_mask else None,
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


def _guided_attention(state, layer: int, query, key, value, padding, causal, window, scaling, softcap, s_aux,
                      blocks, segments):
    """dual_path_attention on a guided layer, with this forward's image keys: out [B, Hq, Lq, D]."""
    guidance = state.options.guidance
    sinks_outside_window = state.options.num_sink > 0 and window is not None
    if s_aux is not None or softcap is not None or sinks_outside_window or layer in state.options.head_mask:
        what = next(what for found, what in (
            (layer in state.options.head_mask, "a head mask"),
            (s_aux is not None, "learned sink logits (s_aux)"),
            (softcap is not None, "a logit soft cap"),
            (True, "sink keys (num_sink) outside its sliding window"),
        ) if found)
        raise NotImplementedError(f"guidance on layer {layer}: the dual-path kernel does not take {what}; "
                                  "guide other layers (guidance layers=[...]) or drop that option")
    forward = state.forward
    image_keys = forward.image_keys.mask if forward.in_forward else None
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
    others kept, unlike patch(), which resets omitted options to their defaults)."""
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
    _masking_utils()
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
    owner = next((found for found in (getattr(module, _STATE, None) for module in layers) if found is not None), None)
    if owner is not None:
        raise ValueError(
            f"{type(model).__name__}'s attention layers are already patched as part of a {owner.model_name} (the "
            "model fastprobe.patch was called on, which contains this one or is contained in it): patch, record and "
            "unpatch through that model"
        )


def _forward_started(model, args, kwargs) -> None:
    _refuse_weights_asked(kwargs)
    forward = getattr(model, _STATE).forward
    forward.attended = False
    forward.in_forward = False
    forward.packing = None
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


class AttentionRecord:
    """Per-layer, per-head attention statistics of the forward passes run inside
    record_attention, averaged over real (non-padded) query positions and the batch, pooled over
    calls (prefill and every decoding step of generate). Rows are fastprobe's layers (self-attention
    modules in model order); a layer that never ran is NaN, and a head that the patch's head_mask
    switches off records 0 (its weights are all 0). Columns are heads, as many as the layer with
    the most has: a layer with fewer (a vision tower's, beside the text model's) is NaN past its
    own.

        sink_mass   [layers, heads]     weight on the first stat_tokens real tokens (the BOS sink)
        group_mass  [layers, heads, G]  weight on each key group (with key groups), else None
        entropy     [layers, heads]     attention entropy in nats (when recorded), else None
        num_queries [layers]            real queries averaged over (group_mass: those of the
                                        forwards with key groups)

    A statistic that is not recorded reads None; sink_mass, group_mass or entropy read before any
    forward pass ran raises RuntimeError.

    Sums accumulate in place on the device the model computes on (its first parameter's, or the
    execution device of accelerate's offload hooks; layers elsewhere, in a
    model split over devices or a DataParallel replica, add theirs there), in tables allocated when
    recording starts (no [L, L] weights, no host sync, nothing left allocated per layer); the fields
    are computed when read, without waiting for the device. Key groups:
    record_attention(key_groups=...) or set_key_groups(), an integer [B, L] tensor, the group of
    the token at each position of each row (padding included), or the KeyGroups that
    prepare_key_groups made from it; checked once, not per layer. A forward from
    position 0 must have at most L tokens; tokens that decoding appends past position L - 1 (the
    generated ones) are in no group, so while generating a row of group_mass sums to 1 less the
    weight on generated tokens. A vision tower's layers (Gemma 4's; their keys are patches) and an
    encoder-decoder's decoder layers (T5Gemma's; key groups are the encoder's tokens) take no key
    groups: their group_mass is NaN. group_mass averages over the queries of the calls that
    had key groups (groups set mid-record leave the earlier calls out); with more groups set later,
    G grows, the earlier calls' weight on the new groups 0.
    """

    def __init__(self, num_layers: int, num_heads, statistics: tuple, device=None,
                 dtype: torch.dtype = torch.float32, key_groups=None, num_groups=None):
        """num_heads: the heads of every layer (an int), or each layer's (a list, None where unknown),
        or None (all learnt from the layers' calls)."""
        self.statistics = statistics
        self.num_layers = num_layers
        heads = list(num_heads) if isinstance(num_heads, (list, tuple)) else [num_heads] * num_layers
        self._head_counts: list = heads  # each layer's heads (None until known: from its first call)
        self._device, self._dtype = device, dtype
        self._sums: dict = {}  # statistic -> [layers, H] or [layers, H, G] sums (H, G: the most seen)
        # real queries per layer, [all calls, calls with key groups] (group_mass averages over the
        # latter): padded calls' (a device sum), the others' (known on the host: no launch a layer)
        self._counts = torch.zeros(2, num_layers, dtype=dtype, device=device)
        self._host_counts = [[0] * num_layers, [0] * num_layers]
        self._ones: dict = {}  # (device, dtype) -> a vector of ones, the unweighted sums' (_add_as_matvec)
        self._calls = 0  # attention calls added (on the host: reading the fields needs no sync)
        # a compiled forward added calls (it sets this, never reads or counts: Dynamo guards on the
        # value of a Python int it reads, so a count would make a graph per decoding step)
        self._traced_calls = False
        self._key_groups: Optional[KeyGroups] = None  # [B, L], checked
        self._views: dict = {}  # (device, first key's position, Lk) -> KeyGroups of those keys
        self._lock = threading.Lock()
        if heads and None not in heads:  # (else the first calls make them)
            for name in statistics:
                if name != "group_mass":
                    self._table(name, ())
        if key_groups is not None:
            self.set_key_groups(key_groups, num_groups)

    @property
    def num_heads(self) -> Optional[int]:
        """The most heads of a layer, the fields' width (None before any is known)."""
        return max((heads for heads in self._head_counts if heads is not None), default=None)

    @property
    def heads_per_layer(self) -> list:
        """Each layer's heads (None for a layer whose config says none and that has not run)."""
        return list(self._head_counts)

    @property
    def has_head(self) -> torch.Tensor:
        """[layers, heads] bool on the CPU, as wide as the fields: the layer has that head (the
        fields' other columns are NaN; a layer whose heads are unknown has them all)."""
        return self._has_head(max((table.shape[1] for table in self._sums.values()), default=self.num_heads or 0))

    def _has_head(self, width: int) -> torch.Tensor:
        heads = torch.tensor([width if heads is None else heads for heads in self._head_counts], dtype=torch.long)
        return torch.arange(width) < heads.view(-1, 1)

    def __getstate__(self) -> dict:  # (copy.deepcopy or pickle of a record: a snapshot, copied whole
        with self._held():  # while no forward adds to it)
            return copy.deepcopy({name: value for name, value in self.__dict__.items() if name != "_lock"})

    def __setstate__(self, attributes: dict) -> None:
        self._traced_calls = False  # (a record pickled before it had this flag)
        self.__dict__.update(attributes)
        self._lock = threading.Lock()

    def _table(self, name: str, tail: tuple, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The [layers, H, *tail] sums of a statistic, made once (zeros) and widened (zeros
        appended) for a layer with more heads than the others or for more key groups."""
        table = self._sums.get(name)
        shape = (self.num_heads if like is None else like.shape[0], *tail)
        if table is None:
            dtype = self._dtype if like is None else torch.promote_types(self._dtype, like.dtype)
            device = self._device if like is None else like.device
            table = torch.zeros(self.num_layers, *shape, dtype=dtype, device=device)
            self._sums[name] = table
        elif any(want > have for want, have in zip(shape, table.shape[1:])):
            wider = table.new_zeros(self.num_layers, *map(max, shape, table.shape[1:]))
            wider[(slice(None), *map(slice, table.shape[1:]))] = table
            table = self._sums[name] = wider
        return table

    def set_key_groups(self, key_groups: Optional[torch.Tensor], num_groups: Optional[int] = None) -> None:
        """Key groups [B, L] (ids in [0, num_groups)) for the following forward passes; None: none.
        Checked here, once (a host sync or two); the layers' calls reuse them unchecked."""
        self._views = {}
        if key_groups is None:
            self._key_groups = None
            return
        if not isinstance(key_groups, (torch.Tensor, KeyGroups)) or (
                isinstance(key_groups, torch.Tensor) and key_groups.dim() != 2):
            raise TypeError("key_groups must be an integer tensor of shape [batch, tokens], or a KeyGroups")
        if isinstance(key_groups, torch.Tensor):
            key_groups = prepare_key_groups(key_groups, num_groups)
        elif num_groups is not None and num_groups != key_groups.num_groups:
            raise ValueError(f"num_groups ({num_groups}) differs from the KeyGroups' ({key_groups.num_groups})")
        self._key_groups = key_groups
        if "group_mass" in self.statistics and self.num_heads is not None:
            self._table("group_mass", (key_groups.num_groups,))

    def key_groups_for(self, key: torch.Tensor, key_offset: int, num_queries: int) -> Optional[KeyGroups]:
        """The checked groups of this call's keys, the tokens at positions key_offset ..
        key_offset + Lk - 1 of each row, on its device; made once for the layers of a forward that
        share them. Keys past the given tokens (appended by decoding) go in group G, which the
        kernel counts and add() leaves out."""
        if self._key_groups is None or "group_mass" not in self.statistics:
            return None
        batch, num_keys = key.shape[0], key.shape[2]
        groups, count = self._key_groups
        fresh = key_offset + num_keys == num_queries  # a forward from position 0: no cache before it
        if groups.shape[0] != batch or (fresh and num_keys > groups.shape[1]):
            expanded = ""
            if batch != groups.shape[0] and batch % groups.shape[0] == 0:
                expanded = (f"; generate with num_beams or num_return_sequences n runs n rows per input row: pass "
                            f"key_groups.repeat_interleave({batch // groups.shape[0]}, 0)")
            raise ValueError(f"key_groups has shape {tuple(groups.shape)} but this call has batch {batch} and "
                             f"{num_keys} tokens: give a group to every token (set_key_groups before each "
                             f"batch){expanded}")
        where = (key.device, key_offset, num_keys)
        made = self._views.get(where)
        if made is None:
            ids = groups[:, key_offset:key_offset + num_keys].to(key.device)
            if ids.shape[1] < num_keys:  # decoded tokens past the given ones: group G
                ids = torch.cat([ids, ids.new_full((batch, num_keys - ids.shape[1]), count)], dim=1)
                count += 1
            made = KeyGroups(ids.contiguous(), count)
            if not is_compiling():  # (a traced forward makes them in its graph)
                if len(self._views) >= 8:  # one per kind of layer (full, sliding, chunked) and device
                    self._views.clear()
                self._views[where] = made
        return made

    def add(self, layer: int, result, padding: Optional[torch.Tensor], dropped: Optional[torch.Tensor],
            shared: Optional[dict] = None) -> None:
        """Adds one attention call's statistics (its AttentionOutput) to the layer's sums. shared: the
        forward's per-mask cache (_MaskPattern.key_masks), where the layers that share the padding
        mask share the weights of its real queries, or None."""
        # (detached: statistics are never differentiated, and from a forward run with gradients on,
        # the in-place sums held its autograd graph, its activations with it, as long as the record)
        sink_mass, group_mass, entropy = (None if values is None else values.detach()
                                          for values in (result.sink_mass, result.group_mass, result.entropy))
        batch, _, num_queries = sink_mass.shape
        if dropped is not None:  # the first token left the sliding cache: its weight is 0
            sink_mass = sink_mass.masked_fill(dropped.view(batch, 1, 1), 0.0)
        weight = real_queries = None
        if padding is not None:
            weight, real_queries = self._query_weights(padding, num_queries, sink_mass.dtype, shared)
        if group_mass is not None:  # (without group G of decoded tokens past the given ones)
            group_mass = group_mass[..., :self._key_groups.num_groups]
        found = {"sink_mass": sink_mass, "group_mass": group_mass, "entropy": entropy}
        with self._held():  # forwards of several threads may add at once (in-place sums)
            self._accumulate(layer, found, weight, real_queries, batch, num_queries)

    def _held(self):
        """The record's lock, for adding to the sums or reading them whole (a reader never sees one
        call's sums without its query count); none in a traced forward (the graph adds them)."""
        return contextlib.nullcontext() if is_compiling() else self._lock

    def _accumulate(self, layer: int, found: dict, weight: Optional[torch.Tensor], real_queries, batch: int,
                    num_queries: int) -> None:
        heads = found["sink_mass"].shape[1]
        if self._head_counts[layer] != heads:  # (a layer's first call where its config did not say)
            self._head_counts[layer] = heads
        for name in self.statistics:
            values = found[name]
            if values is None or self._add_as_matvec(self._sums.get(name), layer, values, weight):
                continue
            if weight is not None:  # [B, H, Lq, ...] -> sum over real (b, q): [H, ...]
                values = values * weight.view(batch, 1, num_queries, *([1] * (values.dim() - 3)))
            pooled = values.sum(dim=(0, 2))
            table = self._table(name, tuple(pooled.shape[1:]), pooled)
            # (a layer on another device than the tables: a model split over devices, a DataParallel replica)
            table[layer][tuple(map(slice, pooled.shape))].add_(pooled.to(table.device))
        grouped = 2 if found["group_mass"] is not None and "group_mass" in self.statistics else 1
        if weight is None and not is_compiling():
            for counts in self._host_counts[:grouped]:
                counts[layer] += batch * num_queries
        else:
            count = batch * num_queries if weight is None else real_queries.to(self._counts.device)
            self._counts[:grouped, layer].add_(count)
        if is_compiling():
            self._traced_calls = True
        else:
            self._calls += 1

    def _add_as_matvec(self, table: Optional[torch.Tensor], layer: int, values: torch.Tensor,
                       weight: Optional[torch.Tensor]) -> bool:
        """table[layer, h] += sum over (b, q) of values[b, h, q] (times weight[b, 0, q]) as one
        matrix-vector product, one launch for the two or three of the general form, where the (b, q)
        pairs lie along one stride of values: batch 1 (prefill of one row) or one query (a decoding
        step). False (nothing added) elsewhere."""
        batch, heads, num_queries = values.shape[:3]
        if (table is None or values.dim() != 3 or table.shape[1] < heads or table.dtype != values.dtype
                or table.device != values.device or (batch != 1 and num_queries != 1)):
            return False
        matrix = values[0] if batch == 1 else values[:, :, 0].t()  # [H, Lq] or [H, B]
        if weight is not None:
            vector = weight.reshape(-1).to(values.dtype)
        else:
            where = (values.device, values.dtype)
            vector = self._ones.get(where)
            if vector is None or vector.shape[0] < matrix.shape[1]:
                vector = torch.ones(max(matrix.shape[1], 64), dtype=values.dtype, device=values.device)
                if not is_compiling():
                    self._ones[where] = vector
            vector = vector[:matrix.shape[1]]
        table[layer, :heads].addmv_(matrix, vector)
        return True

    @staticmethod
    def _query_weights(padding: torch.Tensor, num_queries: int, dtype: torch.dtype,
                       shared: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [B, 1, Lq]: 1 for a real query, the last Lq keys' padding mask; their count),
        made once per forward where `shared` keeps them (a decoding step's layers add ~4 small ops
        fewer each)."""
        if is_compiling() or isinstance(num_queries, torch.SymInt):
            shared = None  # (traced: a key of the symbolic length would specialize it, a graph per length)
        key = (_RECORD_WEIGHTS, num_queries, dtype)
        made = None if shared is None else shared.get(key)
        if made is None:
            weight = padding[:, -num_queries:].to(dtype).view(padding.shape[0], 1, num_queries)
            made = (weight, weight.sum())
            if shared is not None:
                shared[key] = made
        return made

    def _mean(self, name: str) -> Optional[torch.Tensor]:
        if self._calls == 0 and not self._traced_calls:  # (not the device counts: a bool would wait for the GPU)
            raise RuntimeError("nothing was recorded: run the model inside `with fastprobe.record_attention(model)`")
        with self._held():
            table = self._sums.get(name)
            if table is None or name not in self.statistics:
                return None
            counts = self._counts_on(table.device, table.dtype, int(name == "group_mass"))
            counts = counts.view(-1, *([1] * (table.dim() - 1)))
            mean = torch.where(counts > 0, table / counts.clamp(min=1), torch.full_like(table, float("nan")))
            if any(heads is not None and heads < table.shape[1] for heads in self._head_counts):  # (on the host)
                has_head = self._has_head(table.shape[1])  # (layers with fewer heads than the widest)
                missing = ~has_head.view(*has_head.shape, *([1] * (table.dim() - 2)))
                mean = mean.masked_fill(missing.to(mean.device, non_blocking=True), float("nan"))
            return mean

    @property
    def sink_mass(self) -> Optional[torch.Tensor]:
        """[layers, heads] mean weight on the first stat_tokens real keys (None if not recorded)."""
        return self._mean("sink_mass")

    @property
    def group_mass(self) -> Optional[torch.Tensor]:
        """[layers, heads, G] mean weight on each key group (None if not recorded or no key groups)."""
        return self._mean("group_mass")

    @property
    def entropy(self) -> Optional[torch.Tensor]:
        """[layers, heads] mean attention entropy in nats (None if not recorded)."""
        return self._mean("entropy")

    def _counts_on(self, device, dtype: torch.dtype, kind: int = 0) -> torch.Tensor:
        """The real queries per layer (kind 0: of every call, 1: of the calls with key groups), a new
        tensor: the device's and the host's counts together (the host's copied without waiting for
        the device)."""
        counts = self._counts[kind].to(device, dtype, copy=True)
        if any(self._host_counts[kind]):
            on_host = torch.tensor(self._host_counts[kind], dtype=dtype)
            counts = counts + on_host.to(device, non_blocking=True)
        return counts

    @property
    def num_queries(self) -> torch.Tensor:
        """[layers] real queries averaged over so far (0 for a layer that has not run)."""
        with self._held():
            return self._counts_on(self._counts.device, self._counts.dtype)


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
