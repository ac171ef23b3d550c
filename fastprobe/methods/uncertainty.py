"""Draft uncertainty: token-level epistemic uncertainty of a target model's text, from K small
draft models that share its tokenizer.

    tokens = token_uncertainty(target, drafts, tokenizer, texts)   # one row per scored token
    table = sequence_scores(tokens)                                # one row per text: sums and means
    auroc(table["epistemic_mean"], labels)                         # labels: 1 = e.g. a wrong answer
    generated, tokens = generate_with_uncertainty(target, drafts, tokenizer, prompts, max_new_tokens=32)

At each position the drafts' next-token distributions q_k and the target's p go through
fastprobe.draft_divergence (fused: no [N, V] probabilities are formed). With the draft mixture
m = sum_k w_k q_k:
    jsd               = H(m) - sum_k w_k H(q_k)   the drafts' disagreement (variance term)
    kl_mixture_target = KL(m || p)                the mixture's distance to the target (bias term)
    epistemic         = jsd + kl = sum_k w_k KL(q_k || p)
The row of token t_{i+1} holds the statistics of the distributions that predicted it (those at
position i), for every real token but a text's first. Vocabularies that differ only by padding
rows (e.g. 32000 vs 32064 logits) are compared on their shared first V entries; a tokenizer with
more tokens than that is refused.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Optional, Sequence, Union

import torch

from ..ops._common import check_temperature, first_bad_index
from ..ops.divergence import check_weights, draft_divergence
from ..integrations.transformers import execution_device
from ._batching import (
    as_texts, check_count, check_input_embeddings, effective_generation_config, eval_mode, generate_settings, on_model,
    pad_or_eos, real_positions, require_pandas, shared_vocabulary, special_tokens_around, text_batches,
)

__all__ = ["MEASURES", "auroc", "generate_with_uncertainty", "scored_positions", "sequence_scores", "token_uncertainty"]

MEASURES = ("epistemic", "jsd", "kl_mixture_target")  # summed and averaged per sequence
_SHARERS = "the drafts and the target"  # (shared_vocabulary's error)
_EMBEDDINGS = "input embedding rows: the target's, then each draft's"


def _check_models(drafts, weights, temperature) -> list:
    """The drafts as a list, with weights and temperature checked before any model runs."""
    if not isinstance(drafts, (torch.nn.Module, Iterable)):
        raise TypeError("drafts must be a draft model or a non-empty list of draft models, got "
                        f"{type(drafts).__name__}")
    one_model = isinstance(drafts, torch.nn.Module) and not isinstance(drafts, torch.nn.ModuleList)
    drafts = [drafts] if one_model else list(drafts)  # a ModuleList holds drafts: it is not one
    if not drafts or not all(isinstance(draft, torch.nn.Module) for draft in drafts):
        raise ValueError("drafts must be a draft model or a non-empty list of draft models")
    if weights is not None:
        check_weights(weights, len(drafts), torch.empty(0, device=getattr(weights, "device", "cpu")))
    check_temperature(temperature)
    return drafts


def _logits(model, batch: dict) -> torch.Tensor:
    """model's logits [B, L, V] for a batch (moved to the model's device)."""
    logits = getattr(model(**on_model(model, batch)), "logits", None)
    if logits is None:
        raise TypeError(f"draft uncertainty needs causal language models with logits, got {type(model).__name__}")
    return logits


def _scored_rows(model, batch: dict, scored: torch.Tensor, device) -> torch.Tensor:
    """model's logits at the scored positions, [N, V] on `device` (its [B, L, V] logits are
    freed on return)."""
    return _logits(model, batch)[scored.to(execution_device(model))].to(device)


def _stacked_drafts(drafts, batch: dict, scored: torch.Tensor, target_rows: torch.Tensor, tokenizer) -> torch.Tensor:
    """[K, N, V] draft logits at the scored positions, V the vocabulary all share, written draft
    by draft into one buffer (one model's logits alive at a time, no second copy of the stack),
    in the widest of the drafts' dtypes: the target's does not enter (draft_divergence reads the
    target in its own dtype, so bfloat16 drafts of a float32 target stay bfloat16)."""
    stacked = None
    for k, draft in enumerate(drafts):
        rows = _scored_rows(draft, batch, scored, target_rows.device)
        vocab = shared_vocabulary([target_rows.shape[-1], rows.shape[-1]] +
                                  ([stacked.shape[-1]] if stacked is not None else []), tokenizer, "logits", _SHARERS)
        # the widest dtype of the drafts so far (never narrower than the stack)
        dtype = rows.dtype if stacked is None else torch.promote_types(stacked.dtype, rows.dtype)
        if stacked is None or dtype != stacked.dtype:  # the first draft, or a wider dtype than so far
            wider = torch.empty((len(drafts), rows.shape[0], vocab), dtype=dtype, device=rows.device)
            if stacked is not None:
                wider[:k].copy_(stacked[:k, :, :vocab])
            stacked = wider
        stacked = stacked[..., :vocab]  # a draft with fewer (padding) columns narrows the view
        stacked[k].copy_(rows[:, :vocab])
        del rows  # before the next draft's forward
    return stacked


def _scored_statistics(target_rows: torch.Tensor, drafts, batch: dict, scored: torch.Tensor, weights,
                       temperature: float, tokenizer):
    """draft_divergence at the positions marked in scored [B, L] (True at i: the distributions
    predicting token i + 1), given the target's logits there (target_rows [N, V], row-major
    order), as a dict of [N] float64 CPU tensors."""
    device = target_rows.device
    draft_logits = _stacked_drafts(drafts, batch, scored, target_rows, tokenizer)  # [K, N, V]
    vocab = draft_logits.shape[-1]
    if isinstance(weights, torch.Tensor):  # given on any device: the statistics run on the target's
        weights = weights.to(device)
    # the target in its own dtype (draft_divergence takes the drafts' or another): no [N, V] copy
    result = draft_divergence(draft_logits, target_rows[:, :vocab], weights=weights, temperature=temperature)
    columns = {name: getattr(result, name) for name in MEASURES + ("target_entropy", "mixture_entropy")}
    return {name: values.double().cpu() for name, values in columns.items()}


def _token_table(statistics: dict, tokenizer, text_index, position, token_id):
    """The long table: one row per scored token, in text then position order. Columns typed
    explicitly: a batch with no scored token makes an empty table, whose lists pandas would type
    float64, and concatenated with the others every token_id would turn float."""
    pandas = require_pandas()
    ids = token_id.tolist()
    decoded = {i: tokenizer.decode([i]) for i in set(ids)}  # each distinct id once
    table = pandas.DataFrame({
        "text": text_index.numpy(), "position": position.numpy(), "token_id": token_id.long().numpy(),
        "token": pandas.Series([decoded[i] for i in ids], dtype=object),
    })
    for name, values in statistics.items():
        table[name] = values.numpy()
    return table


def _concat(pandas, tables: list, num_texts: int):
    table = pandas.concat(tables, ignore_index=True)
    table.attrs["num_texts"] = num_texts
    return table


def _text_positions(tokenizer, texts: Sequence[str], attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] each token's index in its text's own tokens (tokenizer(text)): its position among
    the row's real tokens, plus, after the leading special tokens, the text tokens a left-truncating
    tokenizer (truncation_side="left") cut from the start to fit max_length (the text's length
    alone less the row's real tokens); a right-truncated text keeps its start."""
    positions = real_positions(attention_mask)
    if getattr(tokenizer, "truncation_side", "right") != "left":
        return positions
    lengths = [len(ids) for ids in tokenizer(list(texts), verbose=False)["input_ids"]]  # (verbose: no length warning)
    cut = torch.tensor(lengths, device=positions.device) - attention_mask.sum(-1)  # [B]
    before = special_tokens_around(tokenizer)[0]
    return positions + cut[:, None] * (positions >= before)


def token_uncertainty(target, drafts, tokenizer, texts: Union[str, Sequence[str]], *, weights=None,
                      temperature: float = 1.0, batch_size: int = 8, max_length: Optional[int] = None,
                      progress: bool = True):
    """Per-token draft uncertainty of `texts` under a target model and its drafts (causal LMs
    sharing `tokenizer`): a DataFrame with one row per real token after each text's first, in
    order, with columns text (index into texts), position (the token's index in its text's
    tokens, tokenizer(text)["input_ids"], also where a tokenizer with truncation_side="left" cut
    the text's start to max_length), token_id, token (decoded), epistemic, jsd,
    kl_mixture_target, target_entropy and mixture_entropy (nats). Texts are batched (padding on
    the tokenizer's side does not change the figures) and truncated to max_length tokens (None:
    the checkpoints' context). weights: the drafts' mixture weights [K]
    (default uniform); temperature divides every logit. The models run in eval mode (no
    dropout), each module's training flag restored afterwards."""
    pandas, drafts = require_pandas(), _check_models(drafts, weights, temperature)
    check_input_embeddings([target, *drafts], tokenizer, _EMBEDDINGS, _SHARERS)
    texts = as_texts(texts)
    tables, first = [], 0
    with torch.no_grad(), eval_mode(target, *drafts):
        # (no position_ids: on_model gives each model its own, RoBERTa's counting from 2)
        for batch in text_batches(target, tokenizer, texts, batch_size, max_length, progress, "draft uncertainty",
                                  position_ids=False, readers=drafts):
            real = batch["attention_mask"] != 0
            scored = scored_positions(batch["attention_mask"])
            target_rows = _scored_rows(target, batch, scored, execution_device(target))  # [N, V]
            statistics = _scored_statistics(target_rows, drafts, batch, scored, weights, temperature, tokenizer)
            rows, columns = scored.nonzero(as_tuple=True)
            positions = _text_positions(tokenizer, texts[first:first + real.shape[0]], batch["attention_mask"])
            tables.append(_token_table(statistics, tokenizer, (rows + first).cpu(), positions[rows, columns + 1].cpu(),
                                       batch["input_ids"][rows, columns + 1].cpu()))
            first += real.shape[0]
    return _concat(pandas, tables, len(texts))


def scored_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: True at position i when it and position i + 1 are real tokens, i.e. where
    a next-token distribution predicts a real token of the text."""
    real = attention_mask != 0
    scored = torch.zeros_like(real)
    scored[:, :-1] = real[:, :-1] & real[:, 1:]
    return scored


def _continuation_mask(new_tokens: torch.Tensor, eos_ids: Sequence[int], pad_id: Optional[int] = None) -> torch.Tensor:
    """[B, T] True for each generated token up to and including the row's first eos and, with
    pad_id (the id generate fills finished rows with), before the row's trailing run of pad_id: a
    row that another stopping criterion ended (stop_strings, stopping_criteria, max_time) is
    filled with pad_id from there on, with no eos to tell where."""
    kept = torch.ones_like(new_tokens, dtype=torch.bool)
    if eos_ids:
        is_eos = torch.isin(new_tokens, torch.tensor(list(eos_ids), device=new_tokens.device))
        kept = (is_eos.long().cumsum(-1) - is_eos.long()) == 0
    if pad_id is not None and pad_id not in eos_ids:  # (a pad that is an eos: the eos rule ends the row)
        # trailing[t]: every token from t on is pad_id
        trailing = (new_tokens == pad_id).flip(-1).long().cumprod(-1).flip(-1).bool()
        kept &= ~trailing
    return kept


def _check_generated_ids(new_tokens: torch.Tensor, kept: torch.Tensor, tokenizer, first: int,
                         target_vocab: int) -> None:
    """Every scored generated id [B, T] is one of the tokenizer's: an id past len(tokenizer) (a
    padding row of the target's vocabulary) is outside the scored distributions, and a draft
    whose embedding table ends sooner would fail inside torch's embedding (on CUDA, an assert
    that loses the context), so a ValueError names it before the drafts run."""
    bad = first_bad_index((new_tokens >= len(tokenizer)) & kept)
    if bad is not None:
        raise ValueError(
            f"the target generated token id {int(new_tokens[bad])} (continuation {first + bad[0]}, step {bad[1]}), "
            f"past the tokenizer's {len(tokenizer)} tokens: a padding row of its vocabulary, which the drafts "
            f"cannot read; pass suppress_tokens=list(range({len(tokenizer)}, {target_vocab})) "
            "to keep generate within the tokenizer"
        )


def _eos_ids(config) -> list:
    """The ids generate stops at: the eos_token_id of the config it runs with
    (effective_generation_config)."""
    eos = config.eos_token_id
    return [] if eos is None else [int(i) for i in ([eos] if isinstance(eos, numbers.Integral) else eos)]


def generate_with_uncertainty(target, drafts, tokenizer, prompts: Union[str, Sequence[str]], *,
                              max_new_tokens: int = 32, weights=None, temperature: Optional[float] = None,
                              batch_size: int = 8, max_length: Optional[int] = None, progress: bool = True,
                              **generate_kwargs):
    """The target continues each prompt (target.generate with max_new_tokens and
    generate_kwargs: greedy unless they or its generation config say otherwise), whose logits
    for each new token (generate's, before any logits processor) are the target's side; the
    drafts score the continuation by teacher forcing. temperature divides every logit of the
    scores and, when generate samples, is its sampling temperature too: the scores are of the
    whole softmax(z / T), while generate samples from it after its other logits processors
    (top_k, which the generation config may leave at 50, top_p, ...) have cut its tail; None:
    the generation config's when sampling, else 1.
    max_length truncates the prompts (generate's length is max_new_tokens; None: the
    checkpoints' context less max_new_tokens). Returns (generated,
    tokens): the continuations as strings (special tokens skipped), and a token table as
    token_uncertainty's whose rows are the generated tokens up to and including each
    continuation's first eos, position counted from the continuation's start. With another
    stopping criterion (stop_strings, for which the tokenizer is passed on to generate;
    stopping_criteria; max_time) a continuation ends where generate's pad filling begins: its
    trailing pad tokens are taken for that filling, not scored. With
    num_return_sequences = n (sampling several continuations of a prompt) there are n
    continuations per prompt, prompt after prompt: the table's text is the continuation's
    index, prompt its prompt's. Beam search is refused: its per-step logits belong to beams
    that are reordered and dropped, not to the returned sequences. The models run in eval mode,
    as token_uncertainty's."""
    config = effective_generation_config(target, generate_kwargs)  # (a passed config completed from the model's)
    sampling = bool(config.do_sample)
    if temperature is None:
        temperature = (config.temperature or 1.0) if sampling else 1.0
    pandas, drafts = require_pandas(), _check_models(drafts, weights, temperature)
    check_input_embeddings([target, *drafts], tokenizer, _EMBEDDINGS, _SHARERS)
    check_count(max_new_tokens, "max_new_tokens")
    if (config.num_beams or 1) > 1:
        raise ValueError("generate_with_uncertainty does not support beam search (num_beams > 1): generate's "
                         "per-step logits are the beams', not the returned sequences'; sample or decode greedily")
    prompts = as_texts(prompts, "prompts")
    # (do_sample with the temperature: folded alone into a passed config that leaves do_sample to the model's,
    # it made a config that reads as greedy, of which transformers warns the temperature "may be ignored")
    settings = generate_settings(target, pad_or_eos(tokenizer), generate_kwargs, max_new_tokens=max_new_tokens,
                                 output_logits=True, return_dict_in_generate=True,
                                 **({"do_sample": True, "temperature": temperature} if sampling else {}))
    if config.stop_strings:  # (generate needs the tokenizer for them; it is this function's own argument)
        settings["tokenizer"] = tokenizer
    eos_ids = _eos_ids(config)
    # the id generate fills finished rows with: its config's, else the one generate_settings gave it (as an
    # argument, or folded into a passed config); with neither, generate's own, its eos. Only rows that a
    # criterion other than eos can end are cut there: without one, a row's trailing pad ids are its own
    stopped = config.stop_strings or config.max_time or generate_kwargs.get("stopping_criteria")
    pad_id = None if not stopped else config.pad_token_id if config.pad_token_id is not None else pad_or_eos(tokenizer)
    generated, tables, first = [], [], 0
    with torch.no_grad(), eval_mode(target, *drafts):
        for batch in text_batches(target, tokenizer, prompts, batch_size, max_length, progress, "generate and score",
                                  prompts=True, position_ids=False, readers=drafts, generated=max_new_tokens - 1,
                                  read_tokens=max_new_tokens):  # (the drafts read every generated token)
            prompt_length = batch["input_ids"].shape[1]
            output = target.generate(**batch, **settings)
            sequences = output.sequences
            per_prompt = sequences.shape[0] // batch["input_ids"].shape[0]  # num_return_sequences, prompt-major
            new_tokens = sequences[:, prompt_length:]
            kept = _continuation_mask(new_tokens, eos_ids, pad_id)
            target_rows = torch.stack(output.logits, dim=1)[kept]  # [N, V]: step t's logits predict new token t
            _check_generated_ids(new_tokens, kept, tokenizer, first, target_rows.shape[-1])
            del output
            mask = torch.cat([batch["attention_mask"].repeat_interleave(per_prompt, 0), kept.long()], dim=1)
            full = {"input_ids": sequences, "attention_mask": mask}  # (on_model adds each model's position_ids)
            scored = torch.zeros_like(mask, dtype=torch.bool)
            scored[:, prompt_length - 1:-1] = kept  # position i predicts generated token i + 1
            statistics = _scored_statistics(target_rows, drafts, full, scored, weights, temperature, tokenizer)
            rows, steps = kept.nonzero(as_tuple=True)
            table = _token_table(statistics, tokenizer, (rows + first).cpu(), steps.cpu(), new_tokens[rows, steps].cpu())
            table.insert(1, "prompt", table["text"] // per_prompt)
            tables.append(table)
            generated += [tokenizer.decode(row[keep], skip_special_tokens=True) for row, keep in zip(new_tokens, kept)]
            first += new_tokens.shape[0]
    return generated, _concat(pandas, tables, len(generated))


def sequence_scores(tokens):
    """Per-text scores of a token table (token_uncertainty or generate_with_uncertainty): a
    DataFrame indexed by text with num_tokens and, for each measure in MEASURES, its sum and
    mean over the text's scored tokens (mean NaN for a text with none)."""
    pandas = require_pandas()
    if not isinstance(tokens, pandas.DataFrame):
        raise TypeError("tokens must be the token table (a DataFrame) of token_uncertainty or "
                        f"generate_with_uncertainty, got {type(tokens).__name__}")
    missing = [column for column in ("text", *MEASURES) if column not in tokens.columns]
    if missing:
        raise ValueError(f"tokens must be the token table of token_uncertainty or generate_with_uncertainty: it has "
                         f"no column {', '.join(missing)}")
    num_texts = tokens.attrs.get("num_texts", int(tokens["text"].max()) + 1 if len(tokens) else 0)
    grouped = tokens.groupby("text")
    table = pandas.DataFrame({"num_tokens": grouped.size()})
    for name in MEASURES:
        table[f"{name}_sum"] = grouped[name].sum()
        table[f"{name}_mean"] = grouped[name].mean()
    table = table.reindex(pandas.RangeIndex(num_texts, name="text"))
    table["num_tokens"] = table["num_tokens"].fillna(0).astype(int)
    for name in MEASURES:
        table[f"{name}_sum"] = table[f"{name}_sum"].fillna(0.0)
    return table


def _flat(values, name: str) -> torch.Tensor:
    """A CPU tensor of a tensor, array, list or pandas Series of numbers or bools, flattened; else a
    TypeError naming it. (A Series goes through numpy: torch.as_tensor indexes it by label, and a
    filtered one's labels have gaps.)"""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().flatten()
    import numpy

    array = numpy.array(values)  # a copy: a Series' own array is read-only
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold numbers (or bools), got an array of {array.dtype}")
    return torch.as_tensor(array).flatten()


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for telling labels 1 (positives) from 0: the
    probability that a random positive scores higher than a random negative, ties counting
    half (the Mann-Whitney U statistic over P * N, from average ranks)."""
    pandas = require_pandas()
    scores = pandas.Series(_flat(scores, "scores").to(torch.float64).numpy())
    labels = _flat(labels, "labels")
    if len(scores) != labels.numel():
        raise ValueError(f"scores and labels must have the same length, got {len(scores)} and {labels.numel()}")
    if scores.isna().any():
        raise ValueError("scores hold NaN (a text with no scored token has no mean): drop those texts first")
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("labels must be 0 / 1 (or bool)")
    positive = labels.bool().numpy()
    num_positive, num_negative = int(positive.sum()), int((~positive).sum())
    if num_positive == 0 or num_negative == 0:
        raise ValueError(f"labels must hold both classes, got {num_positive} positives and {num_negative} negatives")
    ranks = scores.rank(method="average").to_numpy()  # 1-based, ties averaged
    # U = sum of the positives' ranks - P (P + 1) / 2 counts the (positive, negative) pairs ordered right
    return float((ranks[positive].sum() - num_positive * (num_positive + 1) / 2) / (num_positive * num_negative))
