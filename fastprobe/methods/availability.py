"""Answer availability: how much probability a model puts on the gold answer, over all of its
surface forms, at the step where it commits to an answer.

    table = answer_availability(model, tokenizer, prompts, answers, threshold=0.5)
    table[["mass", "available", "top_share", "generated", "correct"]]
    by_correctness(table)                 # mass, availability, concentration: correct vs incorrect
    auroc(table["mass"], table["correct"])   # from fastprobe.methods.uncertainty

The commitment step is the first answer token: the next-token distribution after the prompt, so a
prompt should end where the answer begins ("Q: ... A:"; the variants carry their own leading
space). The gold answer is a concept whose variants are its aliases' surface forms
(fastprobe.ops.concepts.answer_variants: with and without a leading space, case forms, the
tokenizer's normalisation). Its mass sums, over a set of token sequences none a prefix of another,
    single-token variants v:   p(v | prompt)                      (the fused concept_mass)
    multi-token variants s:    prod_i p(s_i | prompt, s_<i)       (teacher forcing)
A variant that extends a shorter one (" US" then " US" + "A") adds nothing: its probability is
already part of the shorter one's. top_share and concentration_entropy describe the single-token
forms (the fused op's): top_share = 1 when all of their mass sits on one form; correct answers tend
to concentrate it, hallucinations to disperse it.

With generate=True the model also answers each prompt (greedy, max_new_tokens); an answer is
correct when it begins with one of the aliases, compared lower-cased with surrounding whitespace
and punctuation stripped and ending on a word boundary (or pass correct=[...] to judge yourself).
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
import string
import unicodedata
from typing import Iterable, Optional, Sequence, Union

import torch

from ..ops._common import check_temperature
from ..ops.concepts import ConceptSet, _variant_forms, answer_variants, concept_mass
from ._batching import (
    as_texts, cache_argument, check_count, embedded_pad_id, embedding_rows, eval_mode, forward_parameters,
    generate_settings, iterates_keys, on_model, output_cache, position_offset, require_pandas, text_batches,
)

__all__ = [
    "answer_availability", "by_correctness", "greedy_answers", "is_correct", "minimal_sequences", "sequence_log_probs",
]

_DEFAULT_VARIANTS = ("space", "lower", "title", "upper")
# (what a greedy generate does not read, and transformers 4.5x warns about when set with do_sample=False)
_SAMPLING_SETTINGS = ("temperature", "top_p", "min_p", "typical_p", "top_k", "epsilon_cutoff", "eta_cutoff")


def minimal_sequences(sequences: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The distinct token sequences none of whose proper prefixes is also in the set, shortest
    first: summing their probabilities counts every continuation once."""
    kept: list[tuple[int, ...]] = []
    for sequence in sorted(dict.fromkeys(map(tuple, sequences)), key=len):  # stable: first seen first
        if not any(sequence[:len(shorter)] == shorter for shorter in kept):
            kept.append(sequence)
    return kept


def _logits_to_keep(model, count: int) -> dict:
    """The forward argument that makes a causal LM compute logits for its last `count` positions
    only (transformers 4.50+: logits_to_keep; 4.45-4.49: num_logits_to_keep), if it has one."""
    parameters = forward_parameters(model)
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: count}
    return {}


def _not_a_causal_lm(model) -> TypeError:
    """The error for a model without logits (or without generate, where it answers): an encoder."""
    return TypeError(f"answer availability needs a causal language model with logits, got {type(model).__name__}")


def _prompt_forward(model, batch: dict, use_cache: bool):
    """The model's output for a left-padded batch, its logits for the last position only where
    the model can (a KV cache with use_cache)."""
    output = model(**batch, use_cache=use_cache, **_logits_to_keep(model, 1))
    if getattr(output, "logits", None) is None:
        raise _not_a_causal_lm(model)
    return output


def _padded(rows: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) [len(rows), longest] of token-id lists, padded on the left or the right."""
    width = max(map(len, rows))
    ids, mask = [], []
    for row in rows:
        padding, real = [pad_id] * (width - len(row)), list(row)
        ids.append(padding + real if left else real + padding)
        mask.append([0] * len(padding) + [1] * len(real) if left else [1] * len(real) + [0] * len(padding))
    shape = (len(rows), width)  # (width 0: no column)
    return torch.tensor(ids, dtype=torch.long).reshape(shape), torch.tensor(mask, dtype=torch.long).reshape(shape)


def _continued(model, cache, prefix_mask: torch.Tensor, rows: list, tails: list, temperature: float,
               pad_id: int) -> torch.Tensor:
    """[R] float64: sum_{i >= 1} log p(s_i | prefix, s_<i) for continuations s whose tails
    s[1:] follow the prefixes in `rows` of a cached, left-padded prefix batch: the tokens
    s[:-1] run from a copy of those rows' KV cache (right padded), so no prefix runs again."""
    fed, fed_mask = _padded([tail[:-1] for tail in tails], pad_id, left=False)
    if fed.shape[1] == 0:  # every continuation is one token: all of it came from the prefix's logits
        return torch.zeros(len(rows), dtype=torch.float64)
    targets, target_mask = _padded([tail[1:] for tail in tails], pad_id, left=False)
    selected = torch.tensor(rows, dtype=torch.long)
    mask = prefix_mask[selected]
    # after each row's real prefix tokens (in the model's numbering: RoBERTa's from 2)
    positions = mask.sum(-1, keepdim=True) + torch.arange(fed.shape[1]) + position_offset(model)
    rows_cache = copy.deepcopy(cache)
    rows_cache.batch_select_indices(selected)  # in place, on the copy
    batch = on_model(model, {"input_ids": fed, "attention_mask": torch.cat([mask, fed_mask], dim=1),
                             "position_ids": positions})
    logits = model(**batch, **{cache_argument(model): rows_cache}, use_cache=True).logits  # [R, width, V]
    log_probs = (logits.double() / temperature).log_softmax(-1).gather(-1, targets.to(logits.device)[..., None])
    return (log_probs[..., 0] * target_mask.to(logits.device)).sum(-1).cpu()


def _cache_object(output):
    """The forward's KV cache as a transformers Cache (4.x models such as GPT-2 may still return
    the legacy tuple of (key, value) pairs), or None where it is none that _continued can copy rows
    of and run on from (see _continuable)."""
    cache = output_cache(output)
    if isinstance(cache, (tuple, list)):
        from transformers import DynamicCache

        cache = DynamicCache.from_legacy_cache(cache)
    return cache if _continuable(cache) else None


def _continuable(cache) -> bool:
    """Whether a forward's cache holds only keys and values of the library's own dynamic kinds,
    whose rows _continued copies out (batch_select_indices) and runs on from: not recurrent or
    linear-attention state (Mamba, Jamba, Bamba, LFM2, Qwen3-Next: LinearAttention layers, which
    cannot select rows; MiniMax's own cache class), static layers, or no cache (RecurrentGemma).
    Earlier transformers 4.x (no cache layers): a cache class of transformers.cache_utils that can
    select rows."""
    from transformers import cache_utils

    if cache is None or type(cache).__module__ != cache_utils.__name__:  # (a model's own subclass)
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:
        return hasattr(cache, "batch_select_indices")
    kinds = tuple(getattr(cache_utils, name) for name in ("DynamicLayer", "DynamicSlidingWindowLayer")
                  if hasattr(cache_utils, name))
    return bool(layers) and all(type(layer) in kinds for layer in layers)


def _whole_sequences(model, prefixes: list, continuations: list, temperature: float, pad_id: int,
                     batch_size: int) -> torch.Tensor:
    """[M] float64: sequence_log_probs without a cache, for models whose state cannot be copied
    and run on from: each prefix + continuation runs whole, right padded (a causal model's real
    positions never see the padding after them, whatever it does with the mask), batch_size at a
    time; only the continuation's positions are taken to float64."""
    totals = torch.zeros(len(prefixes), dtype=torch.float64)
    for start in range(0, len(prefixes), batch_size):
        pairs = list(zip(prefixes[start:start + batch_size], continuations[start:start + batch_size]))
        ids, mask = _padded([list(prefix) + list(continuation) for prefix, continuation in pairs], pad_id, left=False)
        # token i of a continuation after a prefix of n tokens is predicted at position n - 1 + i
        rows = [r for r, (_, continuation) in enumerate(pairs) for _ in continuation]
        positions = [len(prefix) - 1 + i for prefix, continuation in pairs for i in range(len(continuation))]
        targets = torch.tensor([token for _, continuation in pairs for token in continuation], dtype=torch.long)
        # (use_cache: 4.x RecurrentGemma keeps its state in its modules, sized by the last cached call's batch;
        # a cached forward sizes it anew, an uncached one of another batch size fails)
        logits = model(**on_model(model, {"input_ids": ids, "attention_mask": mask}), use_cache=True).logits
        picked = logits[torch.tensor(rows, device=logits.device), torch.tensor(positions, device=logits.device)]
        log_probs = (picked.double() / temperature).log_softmax(-1).gather(-1, targets.to(logits.device)[:, None])
        totals[start:start + len(pairs)] = torch.zeros(len(pairs), dtype=torch.float64).index_add_(
            0, torch.tensor(rows, dtype=torch.long), log_probs[:, 0].cpu())
    return totals


@torch.no_grad()
def sequence_log_probs(model, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], *,
                       temperature: float = 1.0, pad_id: int = 0, batch_size: int = 8) -> torch.Tensor:
    """[M] float64: log p(continuation | prefix) = sum_i log softmax(z_i / T)[s_i] under a causal
    LM, by teacher forcing, for M (prefix, continuation) pairs of token-id lists (a prefix holds
    at least one token). Each distinct prefix runs once, batch_size at a time, keeping its KV
    cache; the continuations of those prefixes then run from copies of their cache rows,
    batch_size at a time: a prefix shared by many continuations (an answer's surface forms after
    one prompt) is not run again for each. A model whose cache cannot be copied row by row and run
    on from (recurrent or linear-attention state: Mamba, Jamba, Qwen3-Next, MiniMax; or none
    returned) runs each prefix + continuation whole instead, right padded. The model runs in eval
    mode (no dropout), each module's training flag restored afterwards."""
    temperature = check_temperature(temperature)
    prefixes, continuations = list(prefixes), list(continuations)  # (generators are read more than once)
    if len(prefixes) != len(continuations):
        raise ValueError(f"prefixes and continuations must pair up, got {len(prefixes)} and {len(continuations)}")
    if any(len(p) == 0 for p in prefixes) or any(len(c) == 0 for c in continuations):
        raise ValueError("every prefix and every continuation needs at least one token")
    batch_size = check_count(batch_size, "batch_size")
    vocab = embedding_rows(model)
    for name, sequences in (("prefixes", prefixes), ("continuations", continuations)):
        _check_token_ids(name, sequences, vocab)
    _check_token_ids("pad_id", [[pad_id]], vocab)
    with eval_mode(model):
        return _sequence_log_probs(model, prefixes, continuations, temperature, pad_id, batch_size, cached=True)


def _check_token_ids(name: str, sequences, vocab: Optional[int]) -> None:
    """A ValueError naming `name` unless every id in sequences is an integer in [0, vocab) (a
    negative id would wrap to the vocabulary's end; one past it fails inside the model)."""
    for i, sequence in enumerate(sequences):
        for token in sequence:
            try:
                value = None if isinstance(token, bool) else operator.index(token)  # (ints, integer 0-d tensors)
            except TypeError:
                value = None
            if value is None or value < 0 or (vocab is not None and value >= vocab):
                where = name if name == "pad_id" else f"{name}[{i}]"
                within = "[0, " + ("..." if vocab is None else str(vocab)) + ")"
                raise ValueError(f"{where} holds {token!r}, not a token id in {within} of the model's vocabulary")


def _sequence_log_probs(model, prefixes, continuations, temperature: float, pad_id: int, batch_size: int,
                        cached: bool) -> torch.Tensor:
    """sequence_log_probs in the model's current mode: with cached, the distinct prefixes run once
    and their continuations from copies of their cache rows, until a prefix batch returns a cache
    that cannot be run on from (_continuable); from there on, and without cached, whole sequences."""
    numbers: dict = {}  # distinct prefix -> its number, in first-seen order
    prefix_of = [numbers.setdefault(tuple(p), len(numbers)) for p in prefixes]
    distinct = list(numbers)
    members_of = [[] for _ in range(0, len(distinct), batch_size)]  # the pairs of each batch of prefixes, in order
    for j, prefix in enumerate(prefix_of):
        members_of[prefix // batch_size].append(j)
    totals = torch.zeros(len(prefixes), dtype=torch.float64)
    for start, members in zip(range(0, len(distinct), batch_size), members_of):
        cache = None
        if cached:
            ids, prefix_mask = _padded(distinct[start:start + batch_size], pad_id, left=True)
            output = model(**on_model(model, {"input_ids": ids, "attention_mask": prefix_mask}), use_cache=True,
                           **_logits_to_keep(model, 1))
            cache = _cache_object(output)
            cached = cache is not None  # (a model's cache is of one kind: later batches go whole at once)
        if cache is None:
            totals[members] = _whole_sequences(model, [prefixes[j] for j in members],
                                               [continuations[j] for j in members], temperature, pad_id, batch_size)
        else:
            totals[members] = _after_prefill(model, output.logits[:, -1], cache, prefix_mask,
                                             [prefix_of[j] - start for j in members],
                                             [continuations[j] for j in members], temperature, pad_id, batch_size)
    return totals


def _after_prefill(model, last_logits: torch.Tensor, cache, prefix_mask: torch.Tensor, rows: list,
                   continuations: list, temperature: float, pad_id: int, batch_size: int) -> torch.Tensor:
    """[M] float64: log p(continuations[j] | prefix rows[j]) for the prefixes of a left-padded
    batch already run with use_cache (last_logits [G, V]: their last position's logits; cache:
    their KV cache, no longer than the batch): s_0 from those logits, the rest from copies of
    the cache rows, batch_size at a time."""
    first = (last_logits.double() / temperature).log_softmax(-1).cpu()  # [G, V]: each s_0
    prefix_mask = prefix_mask.cpu()
    totals = torch.zeros(len(rows), dtype=torch.float64)
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        tails = [list(continuation) for continuation in continuations[chunk]]
        head = first[rows[chunk], [tail[0] for tail in tails]]
        rest = _continued(model, cache, prefix_mask, rows[chunk], tails, temperature, pad_id)
        totals[chunk] = head + rest
    return totals


_WORD_SUFFIXES = "+#"  # part of an answer right after a word: "C++", "C#", "A+"


def _is_edge(character: str) -> bool:
    """Stripped around an answer: whitespace, ASCII punctuation and symbols, Unicode punctuation
    (curly quotes, guillemets, the CJK full stop)."""
    return character.isspace() or character in string.punctuation or unicodedata.category(character)[0] == "P"


def _normalise(text: str) -> str:
    """NFKC-normalised and case-folded ("Zu\u0308rich" is "zürich", "Straße" is "strasse"), whitespace
    collapsed, surrounding punctuation stripped but for what belongs to the answer: a minus sign
    before a digit ("-5") and a + or # run ending a word ("c++")."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start = next((at for at, character in enumerate(text) if not _is_edge(character)), len(text))
    if text[start - 1:start] == "-" and text[start:start + 1].isdigit():
        start -= 1
    end = next((at + 1 for at in range(len(text) - 1, start - 1, -1) if not _is_edge(text[at])), start)
    suffix = end
    while suffix < len(text) and text[suffix] in _WORD_SUFFIXES:
        suffix += 1
    return text[start:suffix]


def is_correct(generated: str, aliases: Union[str, Sequence[str]]) -> bool:
    """Whether a generated answer begins with one of the aliases: NFKC-normalised and case-folded,
    whitespace collapsed, surrounding punctuation stripped (Unicode quotes too; not a number's
    minus sign, nor the + or # that ends "C++" or "C#"), the alias ending on a word boundary
    ("Paris." and "paris, France" match "Paris"; "Parisian" does not; "C++" does not match "C";
    "U.S.S.R." does not match "U.S.") and, for a number, not inside a
    longer number ("1,000" and "3.5" do not match "1" and "3"; "3." does; "-5" does not match "5")."""
    if not isinstance(generated, str):
        raise TypeError(f"generated must be a string, got {type(generated).__name__}")
    answer = _normalise(generated)
    for alias in as_texts(aliases, "aliases"):
        expected = _normalise(alias)
        if expected and answer.startswith(expected) and not _continues(answer, len(expected)):
            return True
    return False


def _continues(answer: str, end: int) -> bool:
    """Whether the word or number that answer[:end] ends in goes on past end."""
    following = answer[end:end + 1]
    if not following:  # the answer ends there
        return False
    number_goes_on = following in ",." and answer[end - 1:end].isdigit() and answer[end + 1:end + 2].isdigit()
    abbreviation_goes_on = following == "." and answer[end + 1:end + 2].isalpha()  # "u.s" of "u.s.s.r"
    return following.isalnum() or following in _WORD_SUFFIXES or number_goes_on or abbreviation_goes_on


class _Answer:
    """One question's gold answer: its aliases, single-token variant ids and multi-token
    variant sequences (a minimal set), and the text of each single-token variant."""

    def __init__(self, tokenizer, aliases, variants, index: int):
        if not isinstance(aliases, str) and not isinstance(aliases, Iterable) or isinstance(aliases, bytes):
            raise TypeError(f"answers[{index}] must be an alias string or a list of alias strings, "
                            f"got {type(aliases).__name__}")
        self.aliases = [aliases] if isinstance(aliases, str) else list(aliases)
        found = answer_variants(tokenizer, self.aliases, variants, name=f"answers[{index}]")
        if not found:
            raise ValueError(f"answers[{index}] ({self.aliases!r}) has no variant the tokenizer can encode")
        kept = minimal_sequences([v.token_ids for v in found])
        self.single_ids = [s[0] for s in kept if len(s) == 1]
        self.multi = [s for s in kept if len(s) > 1]
        self.text_of = {v.token_ids[0]: v.text for v in found if v.single_token}
        # the table's name for it: its first alias with text (a blank one has no variant)
        self.name = next((alias for alias in self.aliases if alias.strip()), self.aliases[0])


def _check_variants_embedded(model, gold: list) -> None:
    """A ValueError naming the answer, before any model runs, where a variant's token id is past the
    model's input-embedding rows (a tokenizer with tokens the model lacks): a multi-token variant's
    ids are fed to the model and read from its logits, which failed with an IndexError (on CUDA, a
    device assert)."""
    rows = embedding_rows(model)
    if rows is None:
        return
    for index, answer in enumerate(gold):
        for ids in [[token] for token in answer.single_ids] + answer.multi:
            if max(ids) >= rows:
                raise ValueError(
                    f"answers[{index}] ({answer.aliases!r}): a variant has token id {max(ids)}, past the {rows} rows "
                    f"of {type(model).__name__}'s input embedding table: the tokenizer has tokens the model lacks "
                    "(resize its embeddings, model.resize_token_embeddings(len(tokenizer)), or use its own tokenizer)")


def _check_arguments(prompts, answers, threshold, temperature, correct, max_new_tokens):
    prompts = as_texts(prompts, "prompts")
    if iterates_keys(answers):
        raise TypeError(f"answers must be a list with one answer (an alias or a list of aliases) per prompt, got "
                        f"{type(answers).__name__} (ConceptSet.from_answers is the one that takes a mapping)")
    answers = [answers] if isinstance(answers, str) else list(answers)
    if len(answers) != len(prompts):
        raise ValueError(f"answers must hold one answer (an alias or a list of aliases) per prompt: "
                         f"{len(prompts)} prompts, {len(answers)} answers")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    check_temperature(temperature)
    if max_new_tokens is not None:
        check_count(max_new_tokens, "max_new_tokens")
    correct = None if correct is None else list(correct)  # (a generator is read once)
    if correct is not None and len(correct) != len(prompts):
        raise ValueError(f"correct must hold one judgement per prompt, got {len(correct)} for {len(prompts)}")
    if correct is not None:  # (bool("false") would be True)
        wrong = next((c for c in correct if isinstance(c, (str, bytes)) or c not in (0, 1)), None)
        if wrong is not None:
            raise TypeError(f"correct must hold bools (or 0 / 1), got {wrong!r}")
    return prompts, answers, correct


def _commitment_step(step_logits: torch.Tensor, batch_answers: list, temperature: float) -> dict:
    """Single-token concept statistics of a batch at the commitment step, from its logits there
    [B, V] (each row against its own answer: the diagonal of concept_mass over the batch's
    concepts). single_token_log_mass is the fused op's stable lse(z_c) - lse(z); single_token_mass
    its float32 mass, or exp(log_mass) in float64 where that mass is below float32's normal range
    (a probability under ~1e-38 rounds to a denormal or to 0 there)."""
    size = len(batch_answers)
    out = {"single_token_mass": torch.zeros(size, dtype=torch.float64),
           "single_token_log_mass": torch.full((size,), -math.inf, dtype=torch.float64),
           "top_share": torch.full((size,), math.nan, dtype=torch.float64),
           "concentration_entropy": torch.full((size,), math.nan, dtype=torch.float64),
           "top_token": torch.full((size,), -1, dtype=torch.long)}
    rows = [i for i, answer in enumerate(batch_answers) if answer.single_ids]
    if rows:
        concepts = ConceptSet.from_ids([batch_answers[i].single_ids for i in rows]).to(step_logits.device)
        result = concept_mass(step_logits[rows], concepts, temperature=temperature)
        own = torch.arange(len(rows), device=step_logits.device)  # row r against concept r
        mass, log_mass = result.mass[own, own].double().cpu(), result.log_mass[own, own].double().cpu()
        out["single_token_log_mass"][rows] = log_mass
        out["single_token_mass"][rows] = torch.where(mass < torch.finfo(torch.float32).tiny, log_mass.exp(), mass)
        out["top_share"][rows] = result.top_share[own, own].double().cpu()
        out["concentration_entropy"][rows] = result.concentration_entropy[own, own].double().cpu()
        out["top_token"][rows] = result.top_token[own, own].long().cpu()
    return out


def _multi_token_log_mass(model, batch_answers: list, batch: dict, temperature: float, pad_id: int,
                          batch_size: int, step_logits: torch.Tensor, cache=None, cached: bool = True) -> torch.Tensor:
    """[B] float64: the log of each row's summed probability of its answer's multi-token variants
    (log sum_s exp(log p(s)), -inf for a row without any), continued
    from the batch's KV cache where given (the prompts' own, with step_logits their last
    position's logits), else with the prompts run again: once each, their variants continued from
    the prompts' cache, or with cached False (a model whose cache cannot be run on from) each
    prompt + variant whole."""
    owners = [i for i, answer in enumerate(batch_answers) for _ in answer.multi]
    sequences = [s for answer in batch_answers for s in answer.multi]
    if cache is not None:
        log_probs = _after_prefill(model, step_logits, cache, batch["attention_mask"], owners, sequences, temperature,
                                   pad_id, batch_size)
    else:
        real = batch["attention_mask"].bool().cpu()
        prompt_ids = [ids[keep].tolist() for ids, keep in zip(batch["input_ids"].cpu(), real)]
        log_probs = _sequence_log_probs(model, [prompt_ids[i] for i in owners], sequences, temperature, pad_id,
                                        batch_size, cached)
    log_mass = torch.full((len(batch_answers),), -math.inf, dtype=torch.float64)
    owned = torch.tensor(owners, dtype=torch.long)
    for row in sorted(set(owners)):  # log sum_s p(s) = logsumexp_s log p(s): no underflow of tiny p(s)
        log_mass[row] = log_probs[owned == row].logsumexp(0)
    return log_mass


def _greedy(model, tokenizer, batch: dict, max_new_tokens: int):
    """(the greedy answers of a left-padded prompt batch, special tokens skipped; the logits
    [B, V] of their first step, i.e. at the commitment step; generate's KV cache, None when it
    returns none)."""
    from transformers import GenerationConfig

    # greedy whatever the model's config says, its sampling settings (an instruct model's temperature,
    # top_p) back at a fresh config's: else transformers 4.5x warns that they "may be ignored"
    fresh = GenerationConfig()
    unsampled = {name: getattr(fresh, name) for name in _SAMPLING_SETTINGS if hasattr(fresh, name)}
    # (one answer per prompt: a sampling config's num_return_sequences would make generate refuse the greedy
    # config, "Greedy methods ... do not support num_return_sequences"; finished rows filled with an id the
    # model embeds, as generate feeds them back)
    settings = generate_settings(model, embedded_pad_id(model, tokenizer), {}, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, num_return_sequences=1, **unsampled, output_logits=True,
                                 return_dict_in_generate=True)
    output = model.generate(**batch, **settings)
    new_tokens = output.sequences[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True), output.logits[0], output_cache(output)


def _prompt_cache(cache, prompt_length: int):
    """generate's KV cache cut back to the prompt's `prompt_length` positions (the generated
    tokens' keys dropped, in place), or None where that would not be the prompt's own cache: not
    a plain DynamicCache (static, hybrid, offloaded, quantized, a model's own subclass with more
    state, such as MiniMax's linear-attention cache), or a layer that is not a plain full-attention
    DynamicLayer (a sliding-window or chunked layer has dropped the prompt's oldest keys).
    Earlier transformers 4.x (no cache layers: key_cache lists) keeps every key in each layer of
    a DynamicCache, sliding windows being masks only: reused when every layer holds the same
    positions. (Later 4.x keeps a sliding-window layer's keys in full in a DynamicLayer: reused.)"""
    from transformers import DynamicCache, cache_utils

    if type(cache) is not DynamicCache:
        return None
    full_layer = getattr(cache_utils, "DynamicLayer", None)
    layers = getattr(cache, "layers", None)
    if full_layer is not None and layers is not None:
        if not layers or any(type(layer) is not full_layer for layer in layers):
            return None
    else:  # [B, H, positions, D] per layer; a skipped layer holds an empty 1-D tensor
        positions = {keys.shape[-2] if keys.dim() == 4 else 0 for keys in getattr(cache, "key_cache", [])}
        if len(positions) != 1:  # a layer short of keys, or no layer
            return None
    generated = cache.get_seq_length() - prompt_length
    if generated > 0:
        cache.crop(-generated)
    return cache


def greedy_answers(model, tokenizer, prompts: Union[str, Sequence[str]], *, max_new_tokens: int = 8,
                   batch_size: int = 8, max_length: Optional[int] = None, progress: bool = True) -> list[str]:
    """The model's greedy answer to every prompt (max_new_tokens at most, special tokens
    skipped), batched with left padding, in eval mode (as sequence_log_probs)."""
    check_count(max_new_tokens, "max_new_tokens")
    answers = []
    with torch.no_grad(), eval_mode(model):
        # (new_tokens: those fed back into the model, all but the last)
        for batch in text_batches(model, tokenizer, prompts, batch_size, max_length, progress, "answers",
                                  prompts=True, position_ids=False, generated=max_new_tokens - 1):
            answers += _greedy(model, tokenizer, batch, max_new_tokens)[0]
    return answers


def answer_availability(model, tokenizer, prompts: Union[str, Sequence[str]], answers, *, threshold: float = 0.5,
                        variants=_DEFAULT_VARIANTS, temperature: float = 1.0, generate: bool = True,
                        max_new_tokens: int = 8, correct: Optional[Sequence[bool]] = None, batch_size: int = 8,
                        max_length: Optional[int] = None, progress: bool = True):
    """The gold answer's probability mass at each prompt's commitment step (see the module's
    docstring): a DataFrame indexed by prompt with columns answer (the first alias), mass,
    log_mass, single_token_mass, multi_token_mass, available (mass >= threshold), top_share,
    concentration_entropy, top_variant (the most probable single-token form), num_variants
    (single-token forms), num_multi_token; with generate=True also generated and correct, and
    with correct given, that column as passed.

    answers: one per prompt, an alias or a list of aliases. variants: which surface forms to add
    (as ConceptSet.from_answers). temperature divides every logit. Prompts are batched
    (batch_size, truncated to max_length tokens, None: the checkpoint's context); multi-token
    variants are scored by teacher forcing in batches of the same size, from the KV cache of the
    prompts' one pass (generate's, cut back to the prompts, with generate=True; a model with
    sliding-window or chunked layers, whose cache has dropped old keys by then, runs the prompts
    once more; a recurrent or hybrid model, whose state cannot be copied row by row, runs each
    prompt + variant whole). Prompts run left padded: a model whose forward lets padding into
    its state (transformers 4.x RecurrentGemma) needs batch_size=1. The model runs in eval mode
    (no dropout), each module's training flag restored afterwards."""
    pandas = require_pandas()
    prompts, answers, correct = _check_arguments(prompts, answers, threshold, temperature, correct,
                                        max_new_tokens if generate else None)
    if generate and not callable(getattr(model, "generate", None)):  # (an encoder: no logits, no generate)
        raise _not_a_causal_lm(model)
    variants = _variant_forms(variants)  # (once: a generator of form names serves every answer)
    gold = [_Answer(tokenizer, aliases, variants, i) for i, aliases in enumerate(answers)]
    _check_variants_embedded(model, gold)
    pad_id = embedded_pad_id(model, tokenizer)  # (the variants' padding)
    # tokens that follow a prompt into the model: generate's but its last (never fed back), and a
    # multi-token variant's but its last (teacher forcing)
    fed_back = max_new_tokens - 1 if generate else 0
    new_tokens = max([0] + [len(s) - 1 for answer in gold for s in answer.multi])
    parts, generated, first = [], [], 0
    with torch.no_grad(), eval_mode(model):
        for batch in text_batches(model, tokenizer, prompts, batch_size, max_length, progress, "answer mass",
                                  prompts=True, position_ids=not generate, new_tokens=new_tokens,
                                  generated=fed_back):
            batch_answers = gold[first:first + batch["input_ids"].shape[0]]
            multi = any(answer.multi for answer in batch_answers)
            if generate:  # generate's prefill: the commitment step's logits and, cut back to the prompts, its cache
                answered, step_logits, cache = _greedy(model, tokenizer, batch, max_new_tokens)
                cache = _prompt_cache(cache, batch["input_ids"].shape[1]) if multi else None
                cached = True  # (else: the prompts' own forward's cache decides, see _sequence_log_probs)
                generated += answered
            else:  # one prefill, whose cache the multi-token variants continue from
                prefill = _prompt_forward(model, batch, use_cache=multi)
                step_logits = prefill.logits[:, -1]  # left padded: each row's last real position
                cache = _cache_object(prefill) if multi else None
                cached = cache is not None
            part = _commitment_step(step_logits, batch_answers, temperature)
            part["multi_token_log_mass"] = _multi_token_log_mass(model, batch_answers, batch, temperature, pad_id,
                                                                 batch_size, step_logits, cache, cached)
            parts.append(part)
            first += len(batch_answers)
    columns = {name: torch.cat([part[name] for part in parts]) for name in parts[0]}
    multi_token_mass = columns["multi_token_log_mass"].exp()
    mass = columns["single_token_mass"] + multi_token_mass
    # log(single + multi) from the two logs: finite where a mass underflows float64 itself
    log_mass = torch.logaddexp(columns["single_token_log_mass"], columns["multi_token_log_mass"])
    table = pandas.DataFrame({
        "answer": [answer.name for answer in gold],
        "mass": mass.numpy(),
        "log_mass": log_mass.numpy(),
        "single_token_mass": columns["single_token_mass"].numpy(),
        "multi_token_mass": multi_token_mass.numpy(),
        "available": (mass >= threshold).numpy(),
        "top_share": columns["top_share"].numpy(),
        "concentration_entropy": columns["concentration_entropy"].numpy(),
        "top_variant": [answer.text_of.get(int(token)) for answer, token in zip(gold, columns["top_token"])],
        "num_variants": [len(answer.single_ids) for answer in gold],
        "num_multi_token": [len(answer.multi) for answer in gold],
    }, index=pandas.RangeIndex(len(prompts), name="prompt"))
    if generate:
        table["generated"] = generated
        table["correct"] = [is_correct(text, answer.aliases) for text, answer in zip(generated, gold)]
    if correct is not None:
        table["correct"] = [bool(c) for c in correct]
    return table


def by_correctness(table):
    """An answer_availability table summarised for correct vs incorrect answers: count, mean
    mass, share available, mean top_share and mean concentration_entropy per group."""
    if "correct" not in table.columns:
        raise ValueError("the table has no correct column: run answer_availability with generate=True or correct=[...]")
    grouped = table.groupby("correct")
    summary = grouped.agg(count=("mass", "size"), mass=("mass", "mean"), available=("available", "mean"),
                          top_share=("top_share", "mean"), concentration_entropy=("concentration_entropy", "mean"))
    summary = summary.reindex([True, False])
    summary["count"] = summary["count"].fillna(0).astype(int)
    return summary
