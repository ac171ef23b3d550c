"""Random soft prompts: n vectors drawn from a Gaussian fitted to the model's input embedding
table, appended right after each prompt's tokens, freshly drawn for every generation.

    ids = soft_prompt_generate(model, tokenizer, texts, n=8, max_new_tokens=20)   # new tokens [B, new]
    gaussian = fit_embedding_gaussian(model, per_dimension=True)                 # fit once, reuse
    ids, soft = soft_prompt_generate(model, tokenizer, texts, n=8, gaussian=gaussian, seed=0,
                                     return_soft_prompts=True, max_new_tokens=20)
    soft = draw_soft_prompts(model, 8, rows=len(texts), seed=0)                  # [B, 8, H]
    inputs = soft_prompt_inputs(model, batch["input_ids"], batch["attention_mask"], soft_prompts=soft)
    ids = model.generate(**inputs, max_new_tokens=20)                            # your own generate call

The Gaussian. By default isotropic, N(mu, sigma^2 I), with mu and sigma the mean and standard
deviation of every entry of model.get_input_embeddings().weight; with per_dimension=True,
N(mu_d, diag(sigma_d^2)) with the mean and standard deviation of each column (hidden
dimension). Every row of the table counts, padding and never-trained rows included (the pad
token's row, rows padding the vocabulary to a round size); exclude_token_ids leaves chosen rows
out. Where the embedding module multiplies its rows by a constant (Gemma 3's embed_scale), the
fit is scaled the same way, so soft vectors are drawn like the token embeddings the model sees.

Placement. Each row's real tokens (attention mask 1) move to the right edge in order, padding
to their left (what decoder-only generate needs; a right-padded batch is re-packed that way, a
left-padded one is kept as is), the row's n soft vectors follow them, and the attention mask is
extended by n ones. Generate counts positions over the mask (cumsum - 1), so in a row with r
real tokens the soft vectors sit at positions r .. r + n - 1 and the first new token at r + n,
as for that prompt alone. With inputs_embeds, generate returns the new tokens only; use
max_new_tokens (what max_length counts with inputs_embeds differs between transformers
versions). n = 0 is plain generation.

Learned positions. A model with a table of learned positions (GPT-2: config.n_positions) takes
r + n + new - 1 positions for its longest row (the last new token is never fed back): a prompt
with its soft vectors, or a max_new_tokens, that runs past the table is a ValueError naming n or
max_new_tokens before the model runs. Without max_new_tokens generate goes by max_length, which
with inputs_embeds counts differently across transformers versions: then the forward that would
run past the table raises the ValueError instead. Rotary and other unbounded positions are not
limited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from ..integrations.transformers import execution_device
from ..ops._common import check_bool
from ._batching import (
    appended_tokens, as_texts, check_count, effective_generation_config, embedded_pad_id, encode_prompts, eval_mode,
    generate_settings, learned_positions, padding_ready,
)

__all__ = [
    "EmbeddingGaussian", "draw_soft_prompts", "fit_embedding_gaussian", "soft_prompt_generate", "soft_prompt_inputs",
]

_CHUNK_ENTRIES = 1 << 22  # table entries per float64 chunk while fitting (32 MiB): the table is never copied whole
# soft_prompt_generate builds these (generate counts position_ids over the extended mask)
_MODEL_INPUTS = ("inputs", "input_ids", "inputs_embeds", "attention_mask", "position_ids")


# ---------------------------------------------------------------- the Gaussian


@dataclasses.dataclass(frozen=True)
class EmbeddingGaussian:
    """A Gaussian fitted to an input embedding table: mean and std are float32 tensors on the
    table's device (for a table offloaded by accelerate, its execution device), scalars ([]) for
    the isotropic fit or [hidden_size] per dimension."""

    mean: torch.Tensor
    std: torch.Tensor
    hidden_size: int

    @property
    def per_dimension(self) -> bool:
        """Whether mean and std are per hidden dimension ([hidden_size]) rather than scalars."""
        return self.mean.dim() == 1


def _input_embeddings(model):
    """(embedding module, its weight [V, H]); ValueError naming `model` when there is none."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        embedding = None
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"model: {type(model).__name__} has no input embedding table "
                         "(model.get_input_embeddings() must return a module with a 2D weight [vocab, hidden])")
    return embedding, weight


def _float_table(model, weight: torch.Tensor) -> torch.Tensor:
    """The embedding table where its entries are the embeddings themselves (a floating dtype,
    float8 included); a table stored as integers (int8 / uint8 quantized, packed 4-bit) holds
    codes, not embeddings, so fitting or drawing in its dtype would be silently wrong: a
    ValueError naming `model`."""
    if not weight.dtype.is_floating_point:
        raise ValueError(
            f"model: {type(model).__name__}'s input embedding table is stored as {weight.dtype} (quantized codes, "
            "not embeddings), so its Gaussian cannot be fitted from it nor soft vectors drawn in its dtype; load the "
            "model with the embedding table unquantized, or fit the Gaussian on a float model with the same table "
            "(EmbeddingGaussian) and pass soft prompts to soft_prompt_inputs yourself")
    return weight


def _table_device(embedding, weight: torch.Tensor) -> torch.device:
    """Where the table's rows are read: its device, or for a table offloaded by accelerate (a meta
    placeholder, loaded by its hook at each forward) its hook's execution device."""
    return execution_device(embedding) if weight.is_meta else weight.device


@contextlib.contextmanager
def _loaded(model, embedding, weight: torch.Tensor):
    """The table's weight for the duration: as it is, or for a table offloaded by accelerate (a meta
    placeholder) loaded onto its execution device by the module's hook, as its forward loads it,
    then offloaded again. A meta table with no hook to load it holds no values: a ValueError."""
    if not weight.is_meta:
        yield weight
        return
    if getattr(embedding, "_hf_hook", None) is None:
        raise ValueError(f"model: {type(model).__name__}'s input embedding table is on the meta device (no values "
                         "loaded): load the model's weights before fitting or drawing from its table")
    from accelerate.utils import align_module_device

    with align_module_device(embedding):
        yield embedding.weight


def _embedding_scale(embedding, weight: torch.Tensor) -> float:
    """The constant the embedding module multiplies its rows by (Gemma 3: sqrt(H), rounded to the
    table's dtype as its forward does); 1 for a plain nn.Embedding."""
    scale = getattr(embedding, "embed_scale", None)
    if scale is None:
        return 1.0
    return float(torch.as_tensor(scale).to(weight.dtype))


def _kept_rows(exclude_token_ids: Iterable[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    if isinstance(exclude_token_ids, torch.Tensor):  # (its elements are 0-dim tensors, not integers)
        if exclude_token_ids.is_floating_point() or exclude_token_ids.dtype == torch.bool:
            raise ValueError(f"exclude_token_ids must hold integer token ids, got a {exclude_token_ids.dtype} tensor")
        exclude_token_ids = exclude_token_ids.flatten().tolist()
    if isinstance(exclude_token_ids, (str, bytes)) or not isinstance(exclude_token_ids, Iterable):
        raise TypeError(f"exclude_token_ids must be a collection of token ids, got {type(exclude_token_ids).__name__}")
    excluded = list(exclude_token_ids)
    bad = [i for i in excluded if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"exclude_token_ids must be token ids in [0, {vocab_size}), got {bad}")
    if vocab_size - len(set(excluded)) < 2:
        raise ValueError("exclude_token_ids leaves fewer than two rows of the embedding table to fit")
    keep = torch.ones(vocab_size, dtype=torch.bool, device=device)
    keep[torch.tensor(excluded, dtype=torch.long, device=device)] = False
    return keep


def _row_chunks(weight: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype):
    """(rows, kept) per chunk of the table: rows [c, H] in `dtype`, kept [c, 1] bool."""
    step = max(1, _CHUNK_ENTRIES // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        yield weight[start:start + step].to(dtype), keep[start:start + step, None]


def _table_moments(weight: torch.Tensor, keep: torch.Tensor, per_dimension: bool):
    """Mean and unbiased standard deviation (as torch.std) of the kept rows' entries, per column
    when per_dimension, in float64 on the table's device (float32 on MPS, which has no float64)."""
    dtype = torch.float32 if weight.device.type == "mps" else torch.float64
    reduce = (lambda x: x.sum(0)) if per_dimension else (lambda x: x.sum())
    count = keep.sum().to(dtype) * (1 if per_dimension else weight.shape[1])
    # mean = sum_kept x / count   (left-out rows selected away, not weighted by 0: 0 * inf is NaN)
    mean = sum(reduce(rows.where(kept, 0)) for rows, kept in _row_chunks(weight, keep, dtype)) / count
    # var = sum_kept (x - mean)^2 / (count - 1)   (two passes: no cancellation)
    squares = sum(reduce((rows - mean).square().where(kept, 0)) for rows, kept in _row_chunks(weight, keep, dtype))
    return mean, (squares / (count - 1)).sqrt()


def fit_embedding_gaussian(model, *, per_dimension: bool = False,
                           exclude_token_ids: Iterable[int] = ()) -> EmbeddingGaussian:
    """The Gaussian of model.get_input_embeddings().weight [V, H]: the mean and standard deviation
    (unbiased, as torch.std) of all its entries (default), or of each hidden dimension's column
    (per_dimension=True). Every row counts, padding rows included, except exclude_token_ids (e.g.
    [tokenizer.pad_token_id]). Times the embedding module's embed_scale where it has one. Computed
    in float64 over chunks of rows on the table's device (a table offloaded by accelerate is loaded
    there by its hook for the fit, then offloaded again); the table is read, never changed. Rows
    with NaN or infinite entries are a ValueError naming them, unless excluded."""
    check_bool(per_dimension, "per_dimension")
    embedding, weight = _input_embeddings(model)
    weight = _float_table(model, weight)
    keep = _kept_rows(exclude_token_ids, weight.shape[0], _table_device(embedding, weight))
    with torch.no_grad(), _loaded(model, embedding, weight) as weight:
        mean, std = _table_moments(weight.detach(), keep, per_dimension)
        if not bool(torch.isfinite(mean).all() & torch.isfinite(std).all()):
            bad = ((~torch.isfinite(weight.detach())).any(-1) & keep).nonzero().flatten().tolist()
            raise ValueError(f"model: the input embedding table has NaN or infinite entries in rows "
                             f"{bad[:20]}{' ...' if len(bad) > 20 else ''}; leave them out with exclude_token_ids")
        scale = _embedding_scale(embedding, weight)
    return EmbeddingGaussian(mean=(mean * scale).float(), std=(std * abs(scale)).float(), hidden_size=weight.shape[1])


# ---------------------------------------------------------------- drawing


def _check_seed(seed) -> None:
    if seed is None or isinstance(seed, torch.Generator):
        return
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be None, an integer in [0, 2**64) or a torch.Generator, got {seed!r}")


def _standard_normal(shape: tuple, seed, device: torch.device) -> torch.Tensor:
    """z ~ N(0, I) in float32: from torch's global generator on `device` (seed None), a fresh CPU
    generator seeded with an int (the same draws on every device), or the given torch.Generator
    (the seed checked by _check_seed)."""
    if seed is None:
        return torch.randn(shape, dtype=torch.float32, device=device)
    if isinstance(seed, torch.Generator):
        return torch.randn(shape, dtype=torch.float32, device=seed.device, generator=seed)
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, dtype=torch.float32, generator=generator)


def _gaussian_for(model, weight: torch.Tensor, gaussian: Optional[EmbeddingGaussian], per_dimension: bool):
    check_bool(per_dimension, "per_dimension")
    if gaussian is None:
        return fit_embedding_gaussian(model, per_dimension=per_dimension)
    if not isinstance(gaussian, EmbeddingGaussian):
        raise ValueError("gaussian must be an EmbeddingGaussian (from fit_embedding_gaussian), "
                         f"got {type(gaussian).__name__}")
    if gaussian.hidden_size != weight.shape[1]:
        raise ValueError(f"gaussian was fitted to hidden size {gaussian.hidden_size}, the model's is {weight.shape[1]}")
    shapes = ((), (gaussian.hidden_size,))
    for name in ("mean", "std"):
        value = getattr(gaussian, name)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or tuple(value.shape) not in shapes:
            raise ValueError(f"gaussian.{name} must be a floating tensor of shape [] or [{gaussian.hidden_size}], "
                             f"got {_describe(value)}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"gaussian.{name} must be finite, got NaN or infinite values")
    if not bool((gaussian.std >= 0).all()):
        raise ValueError("gaussian.std must be non-negative")
    if per_dimension and not gaussian.per_dimension:
        raise ValueError("per_dimension=True, but the gaussian given is isotropic (fitted with per_dimension=False)")
    return gaussian


def draw_soft_prompts(model, n: int, *, rows: Optional[int] = None, gaussian: Optional[EmbeddingGaussian] = None,
                      per_dimension: bool = False, seed: Union[None, int, torch.Generator] = None) -> torch.Tensor:
    """n soft vectors [n, H], or `rows` independent soft prompts [rows, n, H], drawn from
    `gaussian` (default: fit_embedding_gaussian(model, per_dimension=per_dimension), fitted anew),
    in the embedding table's dtype and on its device (for a table offloaded by accelerate, its
    execution device).

    seed: None draws from torch's global generator on that device (fresh draws every call); an int
    makes the draws reproducible (its own CPU generator; the global RNG is left alone); a
    torch.Generator is used and advanced (drawn on its device)."""
    n = check_count(n, "n", 0)
    if rows is not None:
        rows = check_count(rows, "rows", 1)
    _check_seed(seed)
    embedding, weight = _input_embeddings(model)
    weight = _float_table(model, weight)  # (the draws are cast to its dtype)
    gaussian = _gaussian_for(model, weight, gaussian, per_dimension)
    shape = (n, weight.shape[1]) if rows is None else (rows, n, weight.shape[1])
    device = _table_device(embedding, weight)
    noise = _standard_normal(shape, seed, device)
    # x = mu + sigma * z,  z ~ N(0, I)   (mu, sigma scalars or per dimension, broadcast over the last axis)
    soft = gaussian.mean.to(noise.device) + gaussian.std.to(noise.device) * noise
    return soft.to(device=device, dtype=weight.dtype)


# ---------------------------------------------------------------- placing them after the prompts


def _check_prompts(input_ids, attention_mask, vocab_size: int, device: torch.device):
    """input_ids and attention_mask as [B, L] tensors on `device` (1D: one prompt; no mask: all
    real), checked: integer ids in [0, vocab_size) at real positions (padding's ids become 0), a
    0/1 mask of the same shape, a real token in every row. Returns new tensors (the caller's are
    never written)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex \
            or input_ids.dtype == torch.bool or input_ids.dim() not in (1, 2) or input_ids.shape[-1] == 0:
        raise ValueError("input_ids must be a non-empty integer tensor [batch, length] (or [length] for one prompt), "
                         f"got {_describe(input_ids)}")
    ids = input_ids.reshape(-1, input_ids.shape[-1]).to(device=device, dtype=torch.long)
    if ids.shape[0] == 0:
        raise ValueError("input_ids holds no prompt (batch size 0)")
    if attention_mask is None:
        mask = torch.ones_like(ids)
    elif not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {_describe(attention_mask)}")
    else:
        mask = attention_mask.reshape(ids.shape).to(device)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    empty = (mask == 0).all(-1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask: rows {empty} have no real token (a soft prompt follows a prompt)")
    real = ids[mask == 1]
    if bool(((real < 0) | (real >= vocab_size)).any()):
        raise ValueError(f"input_ids must be token ids in [0, {vocab_size}) (the embedding table's rows), "
                         f"got values in [{int(real.min())}, {int(real.max())}] at real positions")
    # padding is embedded though masked: whatever its id (a pad token added to the tokenizer past the
    # table), row 0 is embedded in its place
    return ids.masked_fill(mask == 0, 0), mask


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _check_soft_prompts(soft_prompts, batch_size: int, hidden_size: int) -> torch.Tensor:
    """soft_prompts as [B, n, H]: [n, H] is shared by every row."""
    if not isinstance(soft_prompts, torch.Tensor) or not soft_prompts.dtype.is_floating_point \
            or soft_prompts.dim() not in (2, 3) or soft_prompts.shape[-1] != hidden_size \
            or (soft_prompts.dim() == 3 and soft_prompts.shape[0] != batch_size):
        raise ValueError(f"soft_prompts must be a floating tensor [n, {hidden_size}] or [{batch_size}, n, "
                         f"{hidden_size}] (input_ids' batch size, the hidden size), got {_describe(soft_prompts)}")
    if soft_prompts.dim() == 2:
        return soft_prompts.unsqueeze(0).expand(batch_size, -1, -1)
    return soft_prompts


def _position_limit(model, mask: torch.Tensor, n: int, name: str, new_tokens: Optional[int] = None):
    """(the model's learned positions or None, the longest row's real tokens r); ValueError naming
    `name` when r + n soft vectors already run past the positions (positions count real tokens),
    whose advice leaves room for new_tokens (generate's max_new_tokens) where given."""
    limit = learned_positions(model)
    longest = int(mask.sum(-1).max())
    if limit is not None and longest + n > limit:
        most = limit - longest - max((new_tokens or 1) - 1, 0)  # the last new token needs no position
        if most >= 0:
            advice = f"use at most {most} soft vectors" + (f" (for max_new_tokens={new_tokens})" if new_tokens else "")
            advice += " or shorter prompts"
        else:
            advice = "shorten the prompts" + (" or max_new_tokens" if new_tokens else "")
        raise ValueError(f"{name}: the longest prompt has {longest} real tokens, plus {n} soft vectors is "
                         f"{longest + n} positions, but {type(model).__name__} has learned positions for {limit} "
                         f"tokens only; {advice}")
    return limit, longest


def _left_packed(ids: torch.Tensor, mask: torch.Tensor):
    """Each row's real tokens moved to the right edge, in order, its padding to the left: a stable
    sort of the row by its mask (0 before 1). A left-padded batch comes back unchanged."""
    order = torch.sort((mask != 0).long(), dim=-1, stable=True).indices
    return ids.gather(-1, order), mask.gather(-1, order)


def soft_prompt_inputs(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                       soft_prompts: torch.Tensor) -> dict:
    """{"inputs_embeds", "attention_mask"} for model.generate (or a forward): each row's prompt
    embeddings (model.get_input_embeddings() of its real tokens, left packed) followed by its soft
    vectors, and the mask extended by ones over them. soft_prompts: [B, n, H] (one per row, e.g.
    draw_soft_prompts(model, n, rows=B)) or [n, H] (the same for every row), cast to the model's
    dtype; gradients flow to them, not to the table. Left or right padding both work. generate
    counts positions over the mask; a forward of a padded batch needs them given,
    position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0), or a model with learned
    positions (GPT-2) sees a padded row's tokens shifted by its padding."""
    embedding, weight = _input_embeddings(model)
    ids, mask = _check_prompts(input_ids, attention_mask, weight.shape[0], _table_device(embedding, weight))
    soft = _check_soft_prompts(soft_prompts, ids.shape[0], weight.shape[1])
    _position_limit(model, mask, soft.shape[1], "soft_prompts")
    ids, mask = _left_packed(ids, mask)
    with torch.no_grad():
        prompt = embedding(ids)  # [B, L, H]
    soft = soft.to(device=prompt.device, dtype=prompt.dtype)
    return {
        "inputs_embeds": torch.cat([prompt, soft], dim=1),  # [B, L + n, H]
        "attention_mask": torch.cat([mask, mask.new_ones(soft.shape[:2])], dim=1),
    }


# ---------------------------------------------------------------- generation


def _prompt_batch(tokenizer, texts, input_ids, attention_mask):
    """(input_ids, attention_mask) from texts and a tokenizer (its padding side), or as given. A
    text's tokens are the tokenizer's without the special tokens it appends after a text (an eos
    or sep: Llama's add_eos_token, a "$A </s>" template), as text_batches gives prompts: the soft
    vectors and the continuation follow the prompt, not an end of text."""
    if tokenizer is None and texts is None:
        if input_ids is None:
            raise ValueError("give the prompts as texts with a tokenizer, or as input_ids (and attention_mask)")
        return input_ids, attention_mask
    if input_ids is not None or attention_mask is not None:
        raise ValueError("give the prompts either as texts with a tokenizer or as input_ids, not both")
    if tokenizer is None or texts is None:
        raise ValueError("texts and tokenizer go together: give both (or input_ids instead)")
    texts = as_texts(texts)
    with padding_ready(tokenizer):
        encoded = encode_prompts(tokenizer, texts, appended_tokens(tokenizer))
    empty = (encoded["attention_mask"].sum(-1) == 0).nonzero().flatten().tolist()
    if empty:  # (a soft prompt follows a prompt)
        raise ValueError(f"text {empty[0]} ({texts[empty[0]]!r}) has no tokens (without the ones the tokenizer "
                         "appends after a text)")
    return encoded["input_ids"], encoded["attention_mask"]


def _generate_settings(model, tokenizer, generate_kwargs: dict) -> dict:
    given = [name for name in _MODEL_INPUTS if name in generate_kwargs]
    if given:
        raise ValueError(f"soft_prompt_generate builds the model inputs itself: do not pass {given} "
                         "(give input_ids and attention_mask as its own arguments)")
    # (the id generate fills finished rows with, and feeds back: one the model embeds)
    return generate_settings(model, None if tokenizer is None else embedded_pad_id(model, tokenizer), generate_kwargs)


def _max_new_tokens(model, settings: dict) -> Optional[int]:
    """max_new_tokens as generate will read it (effective_generation_config: given, in the
    generation_config passed, else the model's); None when generate goes by max_length instead."""
    return effective_generation_config(model, settings).max_new_tokens


def _room_message(model, limit: int, longest: int, n: int) -> str:
    room = limit - longest - n + 1  # one new token per forward at positions longest + n - 1 .. limit - 1
    return (f"the longest prompt ({longest} real tokens) and n={n} soft vectors leave room for {room} new "
            f"token{'s' if room != 1 else ''} in the {limit} learned positions of {type(model).__name__}")


@contextlib.contextmanager
def _position_guard(model, limit: Optional[int], longest: int, n: int):
    """For the duration: a ValueError, before the forward that would feed a position past the
    learned ones (generate counts them from the mask and passes them as position_ids)."""
    if limit is None:
        yield
        return

    def check(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.numel() and int(positions.max()) >= limit:
            raise ValueError("generate (going by max_length, no max_new_tokens given) would run past the learned "
                             f"positions: {_room_message(model, limit, longest, n)}; "
                             f"pass max_new_tokens <= {limit - longest - n + 1}")

    handle = model.register_forward_pre_hook(check, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def soft_prompt_generate(
    model,
    tokenizer=None,
    texts: Union[str, Sequence[str], None] = None,
    *,
    n: int,
    input_ids: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    gaussian: Optional[EmbeddingGaussian] = None,
    per_dimension: bool = False,
    seed: Union[None, int, torch.Generator] = None,
    return_soft_prompts: bool = False,
    **generate_kwargs: Any,
):
    """Generation with n random soft vectors after each prompt: the prompts (texts with a
    tokenizer, any padding side, without the eos or sep the tokenizer appends after a text; or
    input_ids with an optional attention_mask), one soft prompt
    per row from draw_soft_prompts (fresh every call unless seeded), placed by
    soft_prompt_inputs, then model.generate(inputs_embeds=..., attention_mask=...,
    **generate_kwargs) (e.g. max_new_tokens, do_sample, pixel_values for a vision-language model).

    Returns what generate returns (the new token ids [B, new] by default), or (that, the soft
    prompts [B, n, H]) with return_soft_prompts=True. n = 0 gives plain generation. The seed
    covers the soft vectors only, not generate's sampling; the num_return_sequences copies of a
    row share its soft prompt. The model generates in eval mode (no dropout: the randomness is
    the soft vectors'), each module's training flag restored afterwards; soft_prompt_inputs leaves
    the mode of your own calls to you."""
    n = check_count(n, "n", 0)
    _check_seed(seed)
    embedding, weight = _input_embeddings(model)
    settings = _generate_settings(model, tokenizer, generate_kwargs)
    input_ids, attention_mask = _prompt_batch(tokenizer, texts, input_ids, attention_mask)
    ids, mask = _check_prompts(input_ids, attention_mask, weight.shape[0], _table_device(embedding, weight))
    new_tokens = _max_new_tokens(model, settings)
    limit, longest = _position_limit(model, mask, n, f"n={n}", new_tokens)
    if limit is not None and new_tokens is not None and longest + n + new_tokens - 1 > limit:
        raise ValueError(f"max_new_tokens={new_tokens}: {_room_message(model, limit, longest, n)}")
    soft = draw_soft_prompts(model, n, rows=ids.shape[0], gaussian=gaussian, per_dimension=per_dimension, seed=seed)
    inputs = soft_prompt_inputs(model, ids, mask, soft_prompts=soft)
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    if getattr(model, "device", None) == torch.device("meta") and not encoder_decoder:
        # an offloaded model's placeholders: transformers 4.5x's generate starts the empty input_ids of an
        # inputs_embeds prompt on model.device (meta: "Tensor.item() cannot be called on meta tensors")
        inputs["input_ids"] = inputs["inputs_embeds"].new_empty((inputs["inputs_embeds"].shape[0], 0), dtype=torch.long)
    with _position_guard(model, None if new_tokens is not None else limit, longest, n), eval_mode(model):
        output = model.generate(**inputs, **settings)
    return (output, soft) if return_soft_prompts else output
