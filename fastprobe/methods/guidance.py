"""Contrastive guidance for vision-language models (LLaVA-style): steer generation towards what
the image supports, in one pass (dual-path attention) or with the two-pass baseline.

    processor, model = ...                                 # a transformers VLM and its processor
    ids = guided_generate(model, processor, images, prompts, gamma=1.0, layers=range(8),
                          max_new_tokens=32)
    with guidance(model, gamma=1.0, layers=range(8)):      # the same, around any generate call
        ids = model.generate(**prepare_inputs(model, processor, images, prompts), max_new_tokens=32)
    ids = two_pass_generate(model, processor, images, prompts, alpha=1.0, max_new_tokens=32)

Guidance (one pass). On each chosen layer, fastprobe.dual_path_attention computes the attention
output with every key (o_cond) and without the image keys (o_uncond, the language-only path) in
one pass over the keys, and returns o_cond + gamma * (o_cond - o_uncond), with the part along
o_uncond removed (orthogonalize), for the token being generated (SPEC section 5). The image keys
are the positions of the model's image token id (its config's image_token_id; the processor
expands each image placeholder into that many tokens), tracked through generate and its KV cache
by the patched model (fastprobe.integrations.transformers.ImageKeys). gamma = 0 is plain
generation.

Two-pass contrastive decoding (the baseline). Every forward runs twice: as is (logits_cond), and
again with the image keys masked out of the attention mask (logits_uncond; the language-only
path: positions unchanged, no pixel values, its own KV cache); the model returns
(1 + alpha) * logits_cond - alpha * logits_uncond, so generate's processors, sampling and
stopping see the contrasted logits. alpha = 0 is plain generation. The edits generate makes to
the model's cache between steps (beam search's reorder, assisted decoding's crop) are made to the
language-only cache too.

In a hybrid model (Qwen 3.5's vision-language model: attention layers among linear-attention
layers) both remove the image keys from the attention layers only: a linear-attention or
state-space layer has no keys to drop, and its state still holds what it read of the image tokens.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import weakref
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from ._batching import (
    CACHE_NAMES, as_texts, cache_argument, embedded_pad_id, eval_mode, generate_settings, output_cache,
)
from ..integrations.transformers import (
    ImageKeys, config_image_token_id, execution_device, forward_arguments, is_patched, patch_options, patched_with,
    unwrapped,
)
from ..ops._common import check_int

__all__ = ["guidance", "guided_generate", "prepare_inputs", "two_pass_contrast", "two_pass_generate"]

_IMAGE_ARGUMENTS = ("pixel_values", "mm_encoder_outputs", "image_sizes", "pixel_attention_mask")  # not in pass 2
_CACHE_EDITS = ("reorder_cache", "crop")  # generate's edits of a cache between steps (beam search, assisted decoding)
_FOLLOWED = "_fastprobe_two_pass"  # on a model cache whose edits the language-only cache follows


# ---------------------------------------------------------------- inputs


def _image_token_id(model, processor=None) -> int:
    """The image token id of a vision-language model (its config's image_token_id), checked
    against the processor's when one is given. TypeError for a model that names none."""
    found = config_image_token_id(model)
    if found is None:
        raise TypeError(
            f"contrastive guidance needs a vision-language model (LLaVA-style) whose config names its image token "
            f"(image_token_id); {type(model).__name__} names none"
        )
    processor_id = getattr(processor, "image_token_id", None)
    if processor_id is not None and int(processor_id) != found:
        raise ValueError(f"the processor's image token id ({processor_id}) is not the model's ({found}): "
                         "they do not belong together")
    return found


def _model_device_dtype(model) -> tuple:
    """(where the model computes, its dtype): execution_device, so that a model whose weights
    accelerate offloads (meta placeholders) gets its inputs where its hooks run it, not on meta."""
    return execution_device(model), next(model.parameters()).dtype


def prepare_inputs(model, processor, images, prompts: Union[str, Sequence[str]]):
    """The processor's batch for `images` and `prompts` (left padded, as batched generation
    needs), on the model's device, pixel values in its dtype. Every prompt must hold the image
    placeholder (processor.image_token, e.g. "<image>"); ValueError otherwise."""
    token_id = _image_token_id(model, processor)
    prompts = as_texts(prompts, "prompts")
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise TypeError(f"processor must be a vision-language processor (a tokenizer and an image processor, e.g. "
                        f"LlavaProcessor), got {type(processor).__name__}")
    placeholder = getattr(processor, "image_token", None)
    if isinstance(placeholder, str):
        missing = [i for i, prompt in enumerate(prompts) if placeholder not in prompt]
        if missing:
            raise ValueError(f"prompts {missing} contain no image token {placeholder!r}: put it where the image goes "
                             "(guidance contrasts attention with and without the image tokens)")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batch = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    missing = (batch["input_ids"] == token_id).sum(-1).eq(0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"prompts {missing} hold no image token (id {token_id}) after processing: guidance needs "
                         "image tokens in every prompt")
    device, dtype = _model_device_dtype(model)
    return batch.to(device=device, dtype=dtype)  # casts the floating tensors only (pixel values)


def _pad_id(model, processor) -> Optional[int]:
    """The id generate fills finished rows with, and feeds back: the tokenizer's pad, or one the
    model embeds where the pad is past its table (embedded_pad_id); None where the tokenizer has
    no pad (generate's own choice)."""
    tokenizer = getattr(processor, "tokenizer", None)
    return None if getattr(tokenizer, "pad_token_id", None) is None else embedded_pad_id(model, tokenizer)


# ---------------------------------------------------------------- one pass: dual-path attention


@contextlib.contextmanager
def guidance(
    model,
    *,
    gamma: float,
    layers: Optional[Sequence[int]] = None,
    orthogonalize: bool = True,
    rows: str = "last",
    eps: float = 1e-6,
    image_token_id: Optional[int] = None,
) -> Iterator[Any]:
    """Context manager: the model runs with dual-path attention on `layers` (default: every
    self-attention layer of its language model, fastprobe.integrations.attention_layers order)
    inside the block, in any forward or generate call; yields the model.

    The same as fastprobe.patch(model, guidance=dict(...)) for the duration: a patched model
    keeps its other options and gets its previous guidance back afterwards; a model that was not
    patched is unpatched. gamma: strength (0 = plain). rows: "last" guides each row's last real
    query (the token being generated), "all" every query. image_token_id defaults to the
    model config's. The options belong to the model, not to a thread (patched_with): while the
    block is open, the model's forwards in every thread are guided, and blocks of several threads
    on one model must not overlap (to guide concurrently, give each thread its own model, e.g. a
    copy.deepcopy)."""
    options = dict(gamma=gamma, layers=layers, orthogonalize=orthogonalize, rows=rows, eps=eps,
                   image_token_id=image_token_id)
    with patched_with(model, guidance=options):
        yield model


def guided_generate(
    model,
    processor,
    images,
    prompts: Union[str, Sequence[str]],
    *,
    gamma: float,
    layers: Optional[Sequence[int]] = None,
    orthogonalize: bool = True,
    rows: str = "last",
    eps: float = 1e-6,
    **generate_kwargs: Any,
):
    """Generation with contrastive guidance (dual-path attention on `layers`, default every causal one)
    for a transformers vision-language model: the processor's batch of images and prompts (left
    padded), then model.generate(**batch, **generate_kwargs) inside guidance(...). Returns what
    generate returns (token ids [B, prompt + new] by default). gamma = 0 gives exactly the
    unguided generation of the patched model (fastprobe.patch without guidance: the same tokens);
    against the unpatched model's own attention, logits equal to float rounding (the same greedy
    tokens but where bfloat16's rounding separates a near tie).

    Raises TypeError for a model whose config names no image token (not a VLM) or a processor
    without an image processor, ValueError for a prompt without an image token and for layers out
    of range (fastprobe.integrations.attention_layers(model) are the layers). The model generates
    in eval mode (no dropout), each module's training flag restored afterwards; inside guidance()
    and two_pass_contrast() your own calls run in the mode you leave the model in."""
    _image_token_id(model, processor)
    options = dict(gamma=gamma, layers=layers, orthogonalize=orthogonalize, rows=rows, eps=eps)
    settings = generate_settings(model, _pad_id(model, processor), generate_kwargs)
    # (the options are checked before the processor runs)
    with guidance(model, **options), eval_mode(model):
        batch = prepare_inputs(model, processor, images, prompts)
        return model.generate(**batch, **settings)


# ---------------------------------------------------------------- two passes: contrastive decoding


class _TwoPassContrast:
    """The forward hook of two_pass_contrast: reruns each forward without the image keys (its
    own KV cache) and returns (1 + alpha) * logits_cond - alpha * logits_uncond."""

    def __init__(self, model, alpha: float, token_id: int):
        self.alpha = alpha
        self.image_keys = ImageKeys(token_id)
        self.cache = None
        self.running = False
        self.cache_name = cache_argument(model)
        self.inputs: Optional[dict] = None  # the running forward's arguments (before())
        self.followed: list = []  # weak references to the model caches follow() edited

    def follow(self, cache) -> None:
        """Makes the edits generate applies to the model's cache between forwards apply to the
        language-only cache too: beam search's reorder_cache(beam_idx) (each beam continues the
        history of the beam it was picked from; the image-key rows move with them) and assisted
        decoding's crop (the rejected candidate tokens leave). Without it the language-only pass
        would continue other beams' or rejected tokens' histories. Set on the cache instance, once;
        undone by unfollow()."""
        attributes = getattr(cache, "__dict__", None)  # (None for a legacy tuple cache, which generate never edits)
        if attributes is None or _FOLLOWED in attributes:
            return
        for name in _CACHE_EDITS:
            edit = getattr(cache, name, None)
            if edit is not None:
                setattr(cache, name, functools.partial(self._edit_both, name, edit))
        setattr(cache, _FOLLOWED, True)
        self.followed.append(weakref.ref(cache))

    def _edit_both(self, name: str, edit, *args, **kwargs):
        """The model cache's edit `name` (the bound method `edit`), then the same on the
        language-only cache and, for reorder_cache(beam_idx), on the rows of the image keys."""
        result = edit(*args, **kwargs)
        if self.cache is not None:
            getattr(self.cache, name)(*args, **kwargs)
        mask = self.image_keys.mask
        if name == "reorder_cache" and mask is not None:
            beam_idx = args[0] if args else kwargs["beam_idx"]  # row b continues row beam_idx[b]
            self.image_keys.mask = mask.index_select(0, beam_idx.to(mask.device))
        return result

    def unfollow(self) -> None:
        """The model caches follow() edited get their own methods back."""
        for cache in filter(None, (ref() for ref in self.followed)):
            for name in (*_CACHE_EDITS, _FOLLOWED):
                vars(cache).pop(name, None)
        self.followed = []

    def before(self, model, args, kwargs) -> None:
        """The forward pre-hook: the forward's arguments and its image keys, read before the forward
        adds its tokens to the model's cache (whose length says where it starts when no 2D attention
        mask does: transformers 5.x's generate passes none for rows without padding)."""
        if self.running:  # the language-only pass itself
            return
        self.inputs = forward_arguments(model, args, kwargs)
        self.image_keys.update(self.inputs)

    def language_only_inputs(self, inputs: dict) -> dict:
        image_keys = self.image_keys.mask  # [B, T]
        past = image_keys.shape[1] - inputs["input_ids"].shape[1]
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(image_keys)
        elif mask.dim() != 2:
            raise NotImplementedError("two_pass_contrast masks image keys in the 2D attention mask; this forward got "
                                      f"a {mask.dim()}D mask")
        cached = 0 if self.cache is None else self.cache.get_seq_length()
        if past > 0 and cached != past:
            raise RuntimeError(f"two_pass_contrast: the language-only cache holds {cached} tokens but this forward "
                               f"continues {past} (edits of the model's cache other than generate's reorder_cache "
                               "and crop are not supported)")
        unconditional = {k: v for k, v in inputs.items() if k not in (*CACHE_NAMES, *_IMAGE_ARGUMENTS)}
        unconditional["attention_mask"] = (mask.bool() & ~image_keys.to(mask.device)).to(mask.dtype)
        unconditional[self.cache_name] = self.cache if past > 0 else None
        unconditional["use_cache"] = True
        return unconditional

    def __call__(self, model, args, kwargs, output):
        if self.running:  # the language-only pass itself
            return None
        inputs, self.inputs = self.inputs, None
        unconditional = self.language_only_inputs(inputs)
        self.running = True
        try:
            language_only = model(**unconditional)
        finally:
            self.running = False
        self.cache = output_cache(language_only)
        self.follow(output_cache(output))
        output.logits = _contrast(output.logits, language_only.logits, self.alpha)
        return output


def _contrast(cond: torch.Tensor, uncond: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 + alpha) cond - alpha uncond, formed in float32 (or float64) and rounded once to cond's
    dtype (a bfloat16 model's, or under autocast). Where cond is infinite (a token the conditional
    pass rules out: -inf) it stays cond, and alpha = 0 gives cond itself: the formula would give
    NaN there where uncond is infinite too (-inf + inf, or 0 * inf)."""
    if alpha == 0.0:
        return cond
    wide = torch.promote_types(cond.dtype, torch.float32)
    contrast = torch.add(cond.to(wide) * (1.0 + alpha), uncond.to(wide), alpha=-alpha)
    return torch.where(cond.isinf(), cond.to(wide), contrast).to(cond.dtype)


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not abs(float(alpha)) < float("inf"):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return float(alpha)


@contextlib.contextmanager
def two_pass_contrast(model, *, alpha: float, image_token_id: Optional[int] = None) -> Iterator[Any]:
    """Context manager: inside it every forward of the model (and so generate) returns the
    contrasted logits (1 + alpha) * logits_cond - alpha * logits_uncond, where logits_uncond come
    from a second forward with the image keys masked out of the attention mask (same positions,
    no pixel values, its own KV cache). The two-pass contrastive decoding baseline; yields the
    model. Beam search (num_beams, from generate's arguments or a generation config; group beam
    search in 4.5x) and assisted decoding reorder or crop the model's cache between forwards
    (reorder_cache, crop): the language-only cache follows those edits. Other edits that change its
    length or batch raise RuntimeError (contrastive search's batch expansion in 4.5x); a model
    class that reorders caches itself (_reorder_cache: RAG, XLNet, no vision-language model) is
    not followed."""
    alpha = _check_alpha(alpha)
    token_id = _image_token_id(model) if image_token_id is None else image_token_id
    if is_patched(model) and patch_options(model).guidance is not None:
        raise RuntimeError("the model is patched with guidance: two_pass_contrast would guide both passes; "
                           "remove the guidance option first")
    # (on the model inside a PEFT or compiled wrapper: the wrapper's generate runs that model's, past
    # the wrapper's hooks)
    inner = unwrapped(model)
    contrast = _TwoPassContrast(inner, alpha, check_int(token_id, "image_token_id", 0))
    handles = [inner.register_forward_pre_hook(contrast.before, with_kwargs=True),
               inner.register_forward_hook(contrast, with_kwargs=True)]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()
        contrast.unfollow()


def two_pass_generate(
    model,
    processor,
    images,
    prompts: Union[str, Sequence[str]],
    *,
    alpha: float,
    **generate_kwargs: Any,
):
    """Two-pass contrastive decoding (the baseline guided_generate is compared with): the
    processor's batch (left padded), then model.generate inside two_pass_contrast(model, alpha).
    Two forwards per step, two KV caches (beam search reorders both). Returns what generate
    returns; alpha = 0 gives plain generation exactly. Raises as guided_generate, and generates
    in eval mode likewise."""
    _image_token_id(model, processor)
    _check_alpha(alpha)
    settings = generate_settings(model, _pad_id(model, processor), generate_kwargs)
    batch = prepare_inputs(model, processor, images, prompts)
    with two_pass_contrast(model, alpha=alpha), eval_mode(model):
        return model.generate(**batch, **settings)
