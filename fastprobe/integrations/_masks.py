"""The "fastprobe" mask function, in transformers' AttentionMaskInterface.

Mask semantics. The mask function never builds an [Lq, Lk] mask: like flash attention's, it
returns the 2D key padding mask [B, Lk] (True = real token; all True without padding) and the
kernel computes causality and windows from positions (queries are the last Lq keys: prefill, and
decoding with a dynamic cache; a static cache's buffer is cut to the slots that hold tokens, which
the mask covers, without a host sync while decoding, and a compiled decoding step gets the mask as
[B, 1, 1, Lk]: see _written_keys). The mask transformers would have built is read from its
`mask_function`: only transformers' own index functions are accepted (causal, bidirectional,
sliding-window overlays, combined with and_masks/or_masks; blocks of tokens that see each other
both ways, which the kernels take as bidirectional_blocks: 5.x's blockwise overlay (Gemma 3's
image tokens, PaliGemma's prefix) and the image groups of Gemma 3 (4.5x releases after 4.53, 5.x
before the overlay) and Gemma 4 (5.x before the overlay); and
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
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple, Optional

import torch

from ..ops._common import is_compiling
from ..ops.attention import BlockHorizon, SegmentSpans, block_horizon, segment_spans
from ._lookups import _PATTERN


_MASKING_UTILS = None  # transformers.masking_utils, imported once (_masking_utils_module)


def _masking_utils_module():
    """transformers.masking_utils (imported on first use: `import fastprobe` needs no transformers)."""
    global _MASKING_UTILS
    if _MASKING_UTILS is not None:
        return _MASKING_UTILS
    try:
        import transformers
    except ImportError as error:
        raise ImportError("fastprobe.patch needs transformers: pip install 'transformers>=4.53'") from error
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    if getattr(masking_utils, "AttentionMaskInterface", None) is None:  # before 4.53 models built their own [L, L] masks
        raise ImportError(
            f"fastprobe.patch needs transformers >= 4.53 (masking_utils and the AttentionMaskInterface); "
            f"found {transformers.__version__}"
        )
    # Taken as a constant while tracing (see _evaluated_pattern). Marked here, on first use, not as a
    # decorator: torch.compiler.assume_constant_result imports torch._dynamo (and with it sympy and
    # triton, ~1 s, and sets TORCHINDUCTOR_CACHE_DIR in os.environ) on `import fastprobe`.
    torch.compiler.assume_constant_result(_evaluated_pattern)
    _note_qualnames(masking_utils)
    _MASKING_UTILS = masking_utils
    return masking_utils


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
    if _module_of(fn) != masking_utils.__name__:
        model_part = _model_bidirectional_part(fn, name)
        if model_part is None:
            raise ValueError(f"{_module_of(fn) or '?'}.{name}")
        return model_part
    if name in _LEAVES:
        return (name,)
    if name.startswith(_OVERLAYS):
        return (name, int(_closure(fn)["sliding_window"]))
    if name.startswith(_COMBINATORS):
        return (name, tuple(_mask_structure(part, masking_utils) for part in _closure(fn)["mask_functions"]))
    raise ValueError(f"{masking_utils.__name__}.{name}")


def _module_of(fn) -> Optional[str]:
    """The name of the module that defines fn: its __module__, else (torch before 2.11's Dynamo reads
    the __module__ of a closure made inside the compiled forward as absent) its code's file from the
    last "transformers" folder on (.../transformers/models/gemma3/modeling_gemma3.py ->
    transformers.models.gemma3.modeling_gemma3); None for a file outside transformers."""
    module = getattr(fn, "__module__", None)
    code = getattr(fn, "__code__", None)
    if module is not None or code is None:
        return module
    path = code.co_filename.replace("\\", "/")
    start = path.rfind("/transformers/")
    if start < 0 or not path.endswith(".py"):
        return None
    return path[start + 1:-3].replace("/", ".")


def _model_bidirectional_part(fn, name: str) -> Optional[tuple]:
    """The or-parts with which a model's own code makes its layers bidirectional (Gemma 3 and
    Step3p7 with use_bidirectional_attention, e.g. EmbeddingGemma), as a _mask_structure part, else
    None: its overlay |q - j| < sliding_window (a window), and the full layers' `lambda *args:
    torch.tensor(True)` (no closure, nothing read but those names: it cannot index per-token data)."""
    if not (_module_of(fn) or "").startswith("transformers.models."):
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
    in_module = _module_of(fn) == masking_utils.__name__
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
    if not _is_model_token_types(fn):
        return False
    groups = _model_image_groups(fn)
    if groups is not None:
        return not bool((groups >= 0).any())
    return not bool((_closure(fn)["token_type_ids"] == 1).any())


# The models whose own token_type_ids_mask_function or-s their image blocks into the mask (4.5x
# and the 5.x releases before the blockwise overlay, e.g. 5.8)
_TOKEN_TYPE_MODELS = ("transformers.models.gemma3.modeling_gemma3", "transformers.models.gemma4.modeling_gemma4")


def _is_model_token_types(fn) -> bool:
    """fn is Gemma 3's or Gemma 4's own image-block mask function (token_type_ids_mask_function)."""
    return _module_of(fn) in _TOKEN_TYPE_MODELS and _qualname(fn, "").startswith(
        "token_type_ids_mask_function.")


def _model_image_groups(fn) -> Optional[torch.Tensor]:
    """The image group ids [B, T] (-1: text) of a model's own image-block mask function, by the
    tensors its inner mask reads: group_ids (Gemma 3 in 5.x) or image_group_ids alone (Gemma 4 in
    5.x), each -1 for text already; token_type_ids and image_group_ids (Gemma 3 in 4.54-4.57: the
    groups of the image tokens, type 1); else None (4.53's rule: any image tokens within one image
    length, which no groups say)."""
    if not _is_model_token_types(fn):
        return None
    closure = _closure(fn)
    if "group_ids" in closure:
        return closure["group_ids"]
    if "image_group_ids" not in closure:
        return None
    if "token_type_ids" not in closure:
        return closure["image_group_ids"]
    return torch.where(closure["token_type_ids"] == 1, closure["image_group_ids"], -1)


def _block_ids(fn, masking_utils) -> Optional[torch.Tensor]:
    """The block ids [B, T] (-1: none) of a part whose blocks of tokens see each other both ways:
    5.x's blockwise overlay, or a model's own image groups (_model_image_groups); else None."""
    if _is_masking_utils(fn, masking_utils, "blockwise_overlay."):
        return _closure(fn)["block_sequence_ids"]
    return _model_image_groups(fn)


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
    masking_utils = _masking_utils_module()
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
        mask_function = _without_key_parts(mask_function, _masking_utils_module(), found, found_segments)
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
