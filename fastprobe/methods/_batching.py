"""What the methods share: tokenised batches on the model's device, padded correctly."""

from __future__ import annotations

import contextlib
import copy
import inspect
import numbers
import warnings
import weakref
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import torch

from ..integrations.transformers import execution_device, unwrapped
from ..ops._common import autocast_dtype, check_bool


def check_count(value, name: str, minimum: int = 1) -> int:
    """value as an int, or a ValueError naming `name` unless it is an integer >= minimum (0 or 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a non-negative" if minimum == 0 else "a positive"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")
    return int(value)


def shared_vocabulary(sizes: Sequence[int], tokenizer, what: str, models: str) -> int:
    """The vocabulary the models share, min(sizes) (their logits, or their input embeddings:
    `what`): sizes may differ only by padding rows past len(tokenizer) (an embedding matrix rounded
    up, e.g. to a multiple of 64), which no token id reaches; else a ValueError saying that
    `models` (e.g. "the drafts and the target") must share the tokenizer."""
    vocab = min(sizes)
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the models' vocabularies ({', '.join(map(str, sizes))} "
            f"{what}) differ beyond padding: the smallest has fewer entries; {models} must share the tokenizer"
        )
    return vocab


def embedding_rows(model) -> Optional[int]:
    """Rows of model's input-embedding table (the token ids it embeds: [0, rows)); None where the
    model does not tell."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def check_input_embeddings(models: Sequence, tokenizer, what: str, sharers: str) -> None:
    """Every model's input-embedding table holds the tokenizer's ids (shared_vocabulary's rule,
    `what` and `sharers` its wording), checked before any forward pass: a smaller table fails deep
    inside torch's embedding (on CUDA, a device assert). Models that do not tell their table's
    size are skipped; their logits are checked as they come."""
    sizes = [rows for rows in map(embedding_rows, models) if rows is not None]
    if sizes:
        shared_vocabulary(sizes, tokenizer, what, sharers)


def check_embedded(input_ids: torch.Tensor, attention_mask: torch.Tensor, models: Sequence, tokenizer, texts,
                   first: int, what: str) -> None:
    """A ValueError naming the text (or the pad token) and the model, before any forward, where a
    batch's token id [B, L] (padding included: it is embedded too) is past a model's input-embedding
    rows: a tokenizer with more tokens than the model embeds (tokens added to it without
    model.resize_token_embeddings) failed inside torch's embedding (on CUDA, a device assert that
    loses the context). texts: the batch's texts, numbered from `first`."""
    if input_ids.numel() == 0:
        return
    top = int(input_ids.max())
    for model in models:
        rows = embedding_rows(model)
        if rows is None or top < rows:
            continue
        row, column = (input_ids >= rows).nonzero()[0].tolist()
        where = ("the pad token" if not attention_mask[row, column]
                 else f"text {first + row} ({texts[row]!r})")
        raise ValueError(
            f"{what}: {where} has token id {int(input_ids[row, column])}, past the {rows} rows of "
            f"{type(model).__name__}'s input embedding table (the tokenizer has {len(tokenizer)} tokens): resize "
            "the model's embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer))), or use the "
            "model's own tokenizer")


def require_pandas():
    try:
        import pandas
    except ImportError as error:
        raise ImportError("fastprobe's methods return pandas DataFrames: pip install pandas "
                          "(or pip install 'fastprobe[plot]')") from error
    return pandas


@contextlib.contextmanager
def eval_mode(*models) -> Iterator[None]:
    """The models in eval mode for the duration (no dropout: a measurement is reproducible and
    the same as from a model loaded for inference), then every module's own training flag back as
    it was, mixed flags included, also when the block raises. Models already in eval mode are
    left alone. (Each flag is put back on its module alone: module.train(flag) would set the
    module's children too.)"""
    flags = {id(module): (module, module.training) for model in models for module in model.modules()}
    if not any(training for _, training in flags.values()):
        yield
        return
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model in models:  # through train(): a model's own side effects (transformers' hub kernels mode)
            model.train(flags[id(model)][1])
        for module, training in flags.values():
            module.training = training


@contextlib.contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """For the block, torch.autocast off on `device`'s type where it is on, so the block computes in
    its tensors' own dtypes (float32 for float32), then autocast as it was; nothing done where it
    is off. For math that must not drop to autocast's bfloat16 / float16 (a projection, fitting a
    probe): autocast also caches the cast of a weight that requires grad for its whole region, so
    an optimizer loop inside one would keep running the first step's weights."""
    if autocast_dtype(device) is None:
        yield
        return
    with torch.autocast(device.type, enabled=False):
        yield


@contextlib.contextmanager
def padding_ready(tokenizer) -> Iterator[None]:
    """Batches need a pad token: a tokenizer without one (GPT-2's) borrows its eos token for the
    duration. The tokenizer's padding side is kept; the attention mask makes either side right."""
    if tokenizer.pad_token is not None:
        yield
        return
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad batches with")
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.pad_token = None


def generate_settings(model, pad_token_id: Optional[int], generate_kwargs: dict, **ours) -> dict:
    """generate's keyword arguments: the caller's, `ours` over them, and pad_token_id where neither
    a passed generation_config nor the model's has one (generate warns at every call otherwise).
    With a passed generation_config the fields are folded into a copy of it: generate takes a
    config or its fields, not both (transformers deprecates the mix); the caller's is left alone."""
    settings = dict(generate_kwargs, **ours)
    given = settings.pop("generation_config", None)
    config = given if given is not None else getattr(model, "generation_config", None)
    if settings.get("pad_token_id") is None and getattr(config, "pad_token_id", None) is None \
            and pad_token_id is not None:
        settings["pad_token_id"] = pad_token_id
    if given is None:
        return settings
    folded = copy.deepcopy(given)
    return dict(folded.update(**settings), generation_config=folded)  # update returns the non-fields


def effective_generation_config(model, generate_kwargs: dict):
    """The GenerationConfig that model.generate(**generate_kwargs) runs with: the passed
    generation_config (else the model's), completed from the model's as transformers completes it
    (5.x: each field the passed one leaves None; 4.5x: each field at its global default), with
    generate_kwargs' fields over it. Asked of transformers itself (generate's own preparation, on
    copies), so a passed config that leaves eos, do_sample, temperature or num_beams unset reads
    as the model's values, as generate reads it."""
    # (the fields folded into a passed config, as generate gets them: no warning about the mix)
    settings = generate_settings(model, None, generate_kwargs)
    return model._prepare_generation_config(settings.pop("generation_config", None), **settings)[0]


def pad_or_eos(tokenizer) -> Optional[int]:
    """The id generate pads finished rows with: the tokenizer's pad token, else its eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def embedded_pad_id(model, tokenizer) -> int:
    """An id to pad with where padding is embedded though masked (teacher-forced batches, the
    filling generate feeds back for finished rows): the tokenizer's pad token, else its eos, the
    first that the model's input-embedding rows hold (a pad token added to the tokenizer without
    model.resize_token_embeddings is past them: an IndexError inside torch's embedding, on CUDA a
    device assert), else 0."""
    rows = embedding_rows(model)
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    return next((i for i in ids if i is not None and (rows is None or i < rows)), 0)


def forward_parameters(model) -> frozenset:
    """The names model.forward takes (empty when its signature cannot be read): of the model inside
    a PEFT or compiled wrapper, whose own forward takes (*args, **kwargs) and passes them on."""
    try:
        return frozenset(inspect.signature(unwrapped(model).forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


CACHE_NAMES = ("cache", "past_key_values")  # a forward's KV cache argument and output: transformers 5.x, then 4.x


def cache_argument(model) -> str:
    """The name under which model.forward takes a KV cache."""
    parameters = forward_parameters(model)
    return next((name for name in CACHE_NAMES if name in parameters), "past_key_values")


def output_cache(output):
    """The KV cache a forward returned (None when it returned none). Read from the fields the
    output holds: a transformers 5.x output's past_key_values is a property aliasing `cache` that
    logs a deprecation warning when read (even where the output has no cache, or no cache field)."""
    fields = getattr(output, "__dict__", {})
    return next((fields[name] for name in CACHE_NAMES if fields.get(name) is not None), None)


def takes_position_ids(model) -> bool:
    return "position_ids" in forward_parameters(model)


def multimodal_positions(model) -> bool:
    """Whether the model has multimodal rotary positions (Qwen2-VL's mrope: temporal, height and
    width positions for image tokens), which it computes from the batch (image grids, attention
    mask) only when it is given no position_ids: 2D ones would put image tokens at text positions."""
    config = getattr(model, "config", None)
    configs = (config, getattr(config, "text_config", None))
    ropes = (getattr(c, name, None) for c in configs for name in ("rope_parameters", "rope_scaling"))
    return any(isinstance(rope, dict) and "mrope_section" in rope for rope in ropes)


def _context(model) -> Optional[int]:
    """The context length the (text) config gives, or None."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = (getattr(config, name, None) for name in ("n_positions", "max_position_embeddings"))
    return next((size for size in sizes if isinstance(size, int)), None)


def _position_tables(model, context: int) -> list:
    """The model's embedding tables other than the tokens' with about `context` rows (its learned
    positions; OPT's has 2 more)."""
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return [module for module in model.modules() if isinstance(module, torch.nn.Embedding) and module is not tokens
            and context <= module.num_embeddings <= context + 2]


# model -> (its learned position tables found, position_offset): one walk over the modules per model
# (a mixture of experts on transformers 4.5x has one module per expert: ~20 ms a walk)
_POSITIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _positions(model) -> tuple[bool, int]:
    found = _POSITIONS.get(model)
    if found is None:
        context = _context(model)
        tables = _position_tables(model, context) if context is not None else []
        pads = [table.padding_idx for table in tables if table.padding_idx is not None]
        found = _POSITIONS[model] = (bool(tables), pads[0] + 1 if pads else 0)
    return found


def position_offset(model) -> int:
    """The first real token's position id: padding_idx + 1 for a learned position table with a
    padding row (RoBERTa, XLM-R, CamemBERT count positions from there, the padding row below), else 0."""
    return _positions(model)[1]


def model_positions(model, attention_mask: torch.Tensor) -> torch.Tensor:
    """The position_ids generate gives a batch (real_positions), in the model's numbering
    (from position_offset)."""
    return real_positions(attention_mask) + position_offset(model)


def learned_positions(model) -> Optional[int]:
    """How many positions a model with a learned position table (GPT-2, OPT, BERT, RoBERTa) takes,
    or None for models without a hard limit (rotary, ALiBi): the config's context, when an
    embedding table other than the tokens' has that many rows, less the rows below the first real
    position (RoBERTa's 2)."""
    has_tables, offset = _positions(model)
    return _context(model) - offset if has_tables else None


def trained_positions(model) -> Optional[int]:
    """How many positions a model without learned position tables (rotary, ALiBi) was configured
    for (its config's max_position_embeddings or n_positions, which rope scaling's configs give as
    the scaled length), or None: such a model runs past them without an error, on positions it
    was not trained for (learned tables are learned_positions' hard limit instead)."""
    return None if _positions(model)[0] else _context(model)


def moved_to(model, inputs: Mapping) -> dict:
    """A copy of a mapping of model inputs with its tensors on the model's execution device
    (execution_device: for weights offloaded by accelerate, whose parameters are meta placeholders,
    its hooks' device, not meta), the floating ones (pixel values, input embeddings) in its
    parameters' dtype, the others (ids, masks) in their own; other values as they are."""
    parameter, device = next(model.parameters()), execution_device(model)
    return {name: value.to(device, parameter.dtype if value.is_floating_point() else value.dtype)
            if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}


def on_model(model, batch) -> dict:
    """A copy of a batch of model inputs on the model's device (floating tensors, e.g. pixel
    values, in its dtype), with_positions."""
    return with_positions(model, moved_to(model, batch))


def with_positions(model, batch) -> dict:
    """A copy of a batch of model inputs with position_ids counted over real tokens where the
    model takes them and the batch has none (not for multimodal rotary positions, which the model
    computes), and without them where the model does not take them."""
    batch = dict(batch)
    if not takes_position_ids(model):
        batch.pop("position_ids", None)
    elif "position_ids" not in batch and batch.get("attention_mask") is not None and not multimodal_positions(model):
        batch["position_ids"] = model_positions(model, batch["attention_mask"])
    return batch


@contextlib.contextmanager
def _sides(tokenizer, padding: Optional[str], truncation: Optional[str]) -> Iterator[None]:
    """The tokenizer pads and truncates on the given sides for the duration (None: its own)."""
    wanted = {"padding_side": padding, "truncation_side": truncation}
    kept = {name: getattr(tokenizer, name) for name, side in wanted.items() if side is not None}
    for name, side in wanted.items():
        if side is not None:
            setattr(tokenizer, name, side)
    try:
        yield
    finally:
        for name, side in kept.items():
            setattr(tokenizer, name, side)


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted over the real tokens of its row (what generate gives as
    position_ids), 0 on padding before the first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last real token, for left or right padding."""
    columns = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (columns * (attention_mask != 0)).argmax(-1)


def iterates_keys(value) -> bool:
    """Whether iterating `value` gives its keys, not its entries: a dict, a pandas DataFrame (its
    column names)."""
    return isinstance(value, Mapping) or hasattr(value, "columns")


def as_texts(texts, name: str = "texts") -> list[str]:
    """texts as a non-empty list of strings (one string: a list of one), else a TypeError or
    ValueError naming them."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, bytes) or iterates_keys(texts) or not isinstance(texts, Iterable):
        # (a table's column, df["text"], is a list of texts)
        raise TypeError(f"{name} must be a string or a list of strings, got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise ValueError(f"{name} is empty")
    wrong = [text for text in texts if not isinstance(text, str)]
    if wrong:
        raise TypeError(f"{name} must be a string or a list of strings, got an element {wrong[0]!r}")
    return texts


def special_tokens_around(tokenizer) -> tuple[int, int]:
    """(before, after): how many special tokens the tokenizer puts before a text (a bos or cls) and
    after it (an eos or sep: a "<s> $A </s>" template, Llama's add_eos_token)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    starts = (at for at in range(len(full) - len(plain) + 1) if full[at:at + len(plain)] == plain)
    return next(((at, len(full) - at - len(plain)) for at in starts), (0, 0))


def appended_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer appends after a text (special_tokens_around)."""
    return special_tokens_around(tokenizer)[1]


def encode_prompts(tokenizer, texts: Sequence[str], appended: int, **truncation):
    """The tokenizer's padded batch of texts (return_tensors="pt"), each row without the `appended`
    special tokens the tokenizer puts after a text (appended_tokens): a prompt ends where its
    continuation begins, not in an eos."""
    if not appended:
        return tokenizer(texts, padding=True, return_tensors="pt", **truncation)
    from transformers.data.data_collator import pad_without_fast_tokenizer_warning

    rows = tokenizer(texts, **truncation)["input_ids"]
    # (pad, not __call__, since the appended tokens go between encoding and padding: transformers 4.5x's
    # advice to a fast tokenizer's pad to use __call__ instead does not apply, and its own helper skips it)
    return pad_without_fast_tokenizer_warning(tokenizer, {"input_ids": [row[:-appended] for row in rows]},
                                              return_tensors="pt")


# max_length=None where neither the configs nor the tokenizer give a context length
FALLBACK_MAX_LENGTH = 512
# tokenizer.model_max_length above this is transformers' "no limit known" placeholder (int(1e30)), not a context
_KNOWN_TOKENIZER_LIMIT = 10**9


def default_max_length(model, tokenizer, readers: Sequence = (), new_tokens: int = 0,
                       read_tokens: Optional[int] = None) -> int:
    """max_length=None's length: the most tokens a text may have so that it and the `new_tokens`
    that follow it fit the positions the config of the model (and of each reader, `read_tokens`
    after it) gives, learned or rotary; with no config that gives one, the tokenizer's
    model_max_length (less new_tokens) where set, else FALLBACK_MAX_LENGTH. At least 1."""
    read_tokens = new_tokens if read_tokens is None else read_tokens
    rooms = [positions - tokens for reader, tokens in ((model, new_tokens), *((r, read_tokens) for r in readers))
             if (positions := learned_positions(reader) or trained_positions(reader)) is not None]
    known = getattr(tokenizer, "model_max_length", None)
    if not rooms and isinstance(known, int) and known < _KNOWN_TOKENIZER_LIMIT:
        rooms = [known - new_tokens]
    return max(min(rooms), 1) if rooms else FALLBACK_MAX_LENGTH


def text_batches(model, tokenizer, texts: Sequence[str], batch_size: int, max_length: Optional[int], progress: bool,
                 what: str, *, prompts: bool = False, position_ids: bool = True, readers: Sequence = (),
                 new_tokens: int = 0, generated: int = 0, read_tokens: Optional[int] = None):
    """Tokenised batches on the model's device: input_ids, attention_mask and, for models that
    take them (and unless position_ids=False, e.g. for generate, which makes its own),
    position_ids counted over real tokens (as generate does), so a left-padded row sees the same
    positions as the text alone. Texts are padded and truncated to max_length tokens (None:
    default_max_length's) on the tokenizer's sides; prompts=True pads on the left (as generate
    needs) and truncates on the left (a prompt keeps its end, where the continuation starts),
    without the special tokens the tokenizer appends (an eos would stand between the prompt and
    its continuation). Tokens that follow a text into a forward: `new_tokens` into the model's own
    (teacher forcing), `generated` into its generate (those it feeds back, max_new_tokens - 1),
    `read_tokens` (default new_tokens) into the other `readers` of the batches (drafts). A batch
    longer, with them, than the learned positions
    of the model or a reader is refused, naming the one; so is a token id (the pad token's too)
    past the input-embedding rows of the model or a reader (check_embedded). One longer than the
    positions a rotary (or ALiBi) model's config gives runs, as the model would, with a UserWarning
    naming max_length (once a call; transformers' generate says it too, in its own words, but once a
    process)."""
    from tqdm.auto import tqdm

    texts = as_texts(texts)
    check_count(batch_size, "batch_size")
    read_tokens = new_tokens if read_tokens is None else read_tokens
    if max_length is None:
        max_length = default_max_length(model, tokenizer, readers, max(new_tokens, generated), read_tokens)
    check_count(max_length, "max_length")
    check_bool(progress, "progress")  # (progress="no" is truthy)
    device = execution_device(model)
    positions = position_ids and takes_position_ids(model) and not multimodal_positions(model)
    # (reader, its positions, the tokens that follow a text into it), the least room (positions less
    # those tokens) first: learned positions (a longer batch is refused) and those its config gives
    # (rotary: a longer batch runs, out of their training)
    followed = [(model, max(new_tokens, generated)), *((reader, read_tokens) for reader in readers)]

    def least_room_first(positions_of):
        entries = [(reader, found, after) for reader, after in followed if (found := positions_of(reader)) is not None]
        return sorted(entries, key=lambda entry: entry[1] - entry[2])

    learners, trainees = least_room_first(learned_positions), least_room_first(trained_positions)
    starts = range(0, len(texts), batch_size)
    side = "left" if prompts else None
    appended = appended_tokens(tokenizer) if prompts else 0
    for start in tqdm(starts, desc=what, unit="batch", disable=not progress):
        # the tokenizer is lent a pad token and sides for this call only, not across the yield: a
        # caller whose loop raises (its traceback kept, the generator left open) gets it back as it was
        with padding_ready(tokenizer), _sides(tokenizer, padding=side, truncation=side):
            encoded = encode_prompts(tokenizer, texts[start:start + batch_size], appended, truncation=True,
                                     max_length=max_length)
        empty = (encoded["attention_mask"].sum(-1) == 0).nonzero().flatten().tolist()  # (on the CPU still)
        if empty:  # (a tokenizer that adds no BOS encodes "" to nothing: the model would read padding alone)
            raise ValueError(f"{what}: text {start + empty[0]} ({texts[start + empty[0]]!r}) has no tokens")
        check_embedded(encoded["input_ids"], encoded["attention_mask"], (model, *readers), tokenizer,
                       texts[start:start + batch_size], start, what)
        length = encoded["input_ids"].shape[1]
        over = next((entry for entry in learners if length + entry[2] > entry[1]), None)
        if over is not None:
            limited, limit, after = over
            plus = f" plus {after} tokens that follow them" if after else ""
            whose = type(limited).__name__ if limited is model else f"a draft ({type(limited).__name__})"
            fix = (f"pass max_length <= {limit - after} (texts are truncated to it; --max-length in the "
                   "fastprobe command)" if limit > after else "generate fewer new tokens")
            raise ValueError(f"{what}: texts of {length} tokens{plus}, but {whose} has learned positions for "
                             f"{limit} tokens only; {fix}")
        past = next((entry for entry in trainees if length + entry[2] > entry[1]), None)
        if past is not None:  # (said once a call: the first such batch)
            trainee, trained, after = past
            plus = f" plus {after} tokens that follow them" if after else ""
            whose = type(trainee).__name__ if trainee is model else f"a draft ({type(trainee).__name__})"
            warnings.warn(f"{what}: texts of {length} tokens{plus} run past the {trained} positions {whose}'s config "
                          f"gives (max_position_embeddings): the model was not trained there and its outputs "
                          f"past them may mean little; pass max_length <= {max(trained - after, 1)} to truncate "
                          "(--max-length in the fastprobe command)", UserWarning, stacklevel=3)
            trainees = []
        batch = {name: encoded[name].to(device) for name in ("input_ids", "attention_mask")}
        if positions:
            batch["position_ids"] = model_positions(model, batch["attention_mask"])
        yield batch
