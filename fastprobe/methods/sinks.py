"""Sink heads: find the heads whose attention goes mostly to the first token, prune them, and
measure what that costs.

    table = score_heads(model, tokenizer, texts)          # layer, head, sink_score, rank
    before = perplexity(model, tokenizer, texts)
    handle = prune_heads(model, table, fraction=0.1)      # the top 10% sink heads
    after = perplexity(model, tokenizer, texts)
    handle.restore()                                      # or restore_heads(model)
    plot_sink_heads(table, "sinks.png")

The sink score of head h in layer l is its attention weight on the first real token, averaged
over every real (non-padded) query position of every text: fastprobe.record_attention reads it
from the fused kernel, so no attention matrix is ever kept. In a chunked-attention layer (Llama
4's) the first token is that of the query's chunk, as the record's sink mass says.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Iterable, Optional, Sequence

import torch

from ._batching import eval_mode, require_pandas, text_batches
from ..ops._common import check_int
from ..integrations.transformers import (
    _patch_for, _set_options, attention_layers, is_patched, layer_heads, patch_options, patched_with,
    record_attention, unwrapped,
)

__all__ = [
    "PrunedHeads", "perplexity", "plot_sink_heads", "prune_heads", "random_heads", "restore_heads", "score_heads",
    "top_heads",
]

_PRUNED = "_fastprobe_pruned"  # the model's active PrunedHeads handles, oldest first


def score_heads(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: Optional[int] = None,
                progress: bool = True):
    """Every head's BOS sink score over `texts`: a DataFrame with one row per (layer, head),
    in that order, and columns layer, head, sink_score (attention weight on the first real token,
    in a chunked layer its chunk's, averaged over all real query positions) and rank (1 = the
    strongest sink head). Heads the texts never reach have no row: a vision tower's, run by images
    only.

    Texts are batched with the tokenizer's padding side and truncated to max_length tokens
    (None: the checkpoint's context, as fastprobe.methods says). The model runs under
    fastprobe.record_attention (patched for the call if it is not already; a patched model
    keeps its options, so heads it prunes score 0, except stat_tokens, which is 1 for the call:
    an option of the model, so for other threads' forwards on it meanwhile too).
    The model runs in eval mode (no dropout), each module's training flag restored afterwards.
    progress: a tqdm bar."""
    pandas = require_pandas()
    with torch.no_grad(), eval_mode(model), patched_with(model, stat_tokens=1), \
            record_attention(model, statistics="sink_mass") as record:
        for batch in text_batches(model, tokenizer, texts, batch_size, max_length, progress, "sink scores"):
            model(**batch)
    scores = record.sink_mass.float().cpu()  # [layers, heads]: NaN past a layer's heads, in layers never run
    reached = (record.num_queries.cpu() > 0)[:, None] & record.has_head
    broken = reached & ~scores.isfinite()
    if broken.any():  # (the model's numbers failed there: an overflow, a NaN weight)
        raise FloatingPointError(f"score_heads: the sink scores of (layer, head) {broken.nonzero().tolist()[:8]} "
                                 "are not finite (the model's outputs overflow or are NaN there?)")
    layer, head = reached.nonzero(as_tuple=True)  # (row-major: in order)
    table = pandas.DataFrame({"layer": layer.numpy(), "head": head.numpy(), "sink_score": scores[layer, head].numpy()})
    table["rank"] = table["sink_score"].rank(ascending=False, method="first").astype(int)
    return table


def _check_table(table, columns: tuple) -> None:
    """A TypeError / ValueError naming `table` unless it is a DataFrame with these columns (a
    score_heads table)."""
    pandas = require_pandas()
    if not isinstance(table, pandas.DataFrame):
        raise TypeError(f"table must be a score_heads DataFrame (columns {', '.join(columns)}), got "
                        f"{type(table).__name__}")
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"table must be a score_heads DataFrame: it has no column {', '.join(missing)}")


def top_heads(table, fraction: float) -> list[tuple[int, int]]:
    """The round(fraction * heads) best-ranked (layer, head) pairs of a score_heads table."""
    _check_table(table, ("layer", "head", "rank"))
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    count = int(round(fraction * len(table)))
    best = table.sort_values("rank").head(count)
    return [(int(layer), int(head)) for layer, head in zip(best["layer"], best["head"])]


def random_heads(table, count: int, *, seed: int = 0, exclude: Iterable[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """`count` (layer, head) pairs of a score_heads table drawn uniformly without replacement
    (seeded), leaving out `exclude`: the control for pruning the top sink heads. exclude takes
    what prune_heads takes as heads: (layer, head) pairs, or a table (every row)."""
    _check_table(table, ("layer", "head"))
    count = check_int(count, "count", 0)  # (a negative count sliced the draw from its end)
    seed = check_int(seed, "seed", 0)  # (else torch's "manual_seed expected a long", naming no argument)
    # (a table's rows: iterated, a DataFrame gives its column names, and excluded nothing)
    excluded = set(_heads_of(exclude, None))
    pool = [(int(l), int(h)) for l, h in zip(table["layer"], table["head"]) if (int(l), int(h)) not in excluded]
    if count > len(pool):
        raise ValueError(f"cannot draw {count} heads from {len(pool)}")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:count]
    return sorted(pool[i] for i in order.tolist())


# ---------------------------------------------------------------- pruning


def _output_projection(model, attention):
    """(weight, axis) of the projection that reads the attention's per-head outputs, where
    weight.narrow(axis, h * D, D) are head h's input features: o_proj / out_proj (Linear, axis 1;
    or a module wrapping one as .linear), GPT-2's c_proj (Conv1D, weight [in, out], axis 0), BERT's
    sibling output.dense."""
    from transformers.pytorch_utils import Conv1D

    candidates = [getattr(attention, name, None) for name in ("o_proj", "out_proj", "c_proj", "dense")]
    names = {id(module): name for name, module in model.named_modules()}
    parent_name = names[id(attention)].rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    output = getattr(parent, "output", None)  # BERT: attention.self (scores) + attention.output.dense
    candidates.append(getattr(output, "dense", None))
    for module in candidates:
        if isinstance(getattr(module, "base_layer", None), torch.nn.Module):  # (a PEFT adapter layer)
            raise NotImplementedError(
                f"{type(attention).__name__}'s output projection is wrapped by an adapter ({type(module).__name__}): "
                "zeroing its base weight would leave the adapter's share of the head; use mode='mask', or merge "
                "the adapter first (merge_and_unload())")
        inner = getattr(module, "linear", None)  # (a wrapper: Gemma 4's vision tower's ClippableLinear)
        module = inner if isinstance(inner, torch.nn.Linear) else module
        if isinstance(module, Conv1D):
            return module.weight, 0
        if isinstance(module, torch.nn.Linear):
            return module.weight, 1
    raise NotImplementedError(f"no output projection found for {type(attention).__name__}: use mode='mask'")


def _head_width(attention, num_heads: int, weight: torch.Tensor, axis: int) -> int:
    """A head's share of the output projection's input features: its value width, which is not
    head_dim where values are narrower than queries and keys (MiMo-V2-Flash's v_head_dim,
    latent attention's)."""
    features = weight.shape[axis]
    if features % num_heads:
        raise NotImplementedError(f"the output projection of {type(attention).__name__} reads {features} features, "
                                  f"not a multiple of its {num_heads} heads: use mode='mask'")
    return features // num_heads


_HEADS_FORMS = "heads must be a list of (layer, head) pairs, a score_heads table, or a table with fraction="


def _heads_of(heads, fraction: Optional[float]) -> list[tuple[int, int]]:
    if fraction is not None:
        if not hasattr(heads, "columns"):
            raise TypeError("fraction needs the score_heads table as `heads`")
        return top_heads(heads, fraction)
    if hasattr(heads, "columns"):  # a table: every row
        return [(int(l), int(h)) for l, h in zip(heads["layer"], heads["head"])]
    if isinstance(heads, str) or not isinstance(heads, Iterable):
        raise TypeError(f"{_HEADS_FORMS}, got {type(heads).__name__}")
    return [_layer_and_head(pair) for pair in heads]


def _layer_and_head(pair) -> tuple[int, int]:
    """One entry of a list of heads as (layer, head) ints, or a TypeError naming heads."""
    try:
        layer, head = pair
        return operator.index(layer), operator.index(head)
    except (TypeError, ValueError):
        raise TypeError(f"{_HEADS_FORMS}, got the entry {pair!r} (one head is a list of one pair: "
                        "[(layer, head)])") from None


class PrunedHeads:
    """What prune_heads did; .restore() undoes it (handles are undone newest first). Plain data (no
    closures): a deep copy or a pickle of the model carries handles that undo the copy's pruning, and
    the weights are found by name when restoring (after model.to(dtype / device) too)."""

    def __init__(self, model, heads: list, mode: str):
        self.model, self.heads, self.mode = model, heads, mode
        self.previous_head_mask = None  # mask: the head mask before
        self.saved: list = []  # zero_o_proj: (parameter name, axis, start, size, original columns)
        self.active = True

    def _undo(self) -> None:
        model = self.model
        if self.mode == "mask":
            if is_patched(model):  # (else the user unpatched in between: nothing left to undo)
                _set_options(model, head_mask=self.previous_head_mask)  # (unpatched if patched for pruning alone)
            return
        with torch.no_grad():
            for name, axis, start, size, original in reversed(self.saved):
                weight = model.get_parameter(name)
                weight.narrow(axis, start, size).copy_(original.to(weight.device, weight.dtype))

    def restore(self) -> None:
        """Undoes this pruning (again: nothing). RuntimeError when a later prune_heads on the
        model is still in force: restore newest first, or call restore_heads(model)."""
        if not self.active:
            return
        active = getattr(self.model, _PRUNED, [])
        if active and active[-1] is not self:
            raise RuntimeError("restore pruned heads newest first (or call restore_heads(model))")
        self._undo()
        self.active = False
        self.saved = []  # (the original columns: restored, no longer needed by a handle kept afterwards)
        active.pop()
        if not active:
            delattr(self.model, _PRUNED)

    def __enter__(self) -> "PrunedHeads":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"PrunedHeads({len(self.heads)} heads, mode={self.mode!r}, active={self.active})"


def prune_heads(model, heads, *, fraction: Optional[float] = None, mode: str = "mask") -> PrunedHeads:
    """Prunes heads: `heads` is a list of (layer, head), or a score_heads table (every row, or its
    top `fraction` by rank). Layers are fastprobe's (transformers' layer_idx for decoder-only and
    encoder-only models). Returns a handle whose .restore() undoes it; also restore_heads(model).

    mode="mask": the kernel's head mask (fastprobe.patch's head_mask option; the model is patched
        if it is not, and unpatched again on restore unless patch() or update_patch() was called
        on it since). A pruned head outputs 0 and costs nothing.
    mode="zero_o_proj": zeroes the head's input columns of the output projection (per query head,
        so right for grouped-query attention too); works under any attention implementation.
    Both remove the head's contribution, so on the same model they give the same outputs. A PEFT
    or compiled wrapper's model is pruned (mode="zero_o_proj" refuses an output projection an
    adapter wraps, and weights offloaded by accelerate)."""
    if mode not in ("mask", "zero_o_proj"):
        raise ValueError(f"mode must be 'mask' or 'zero_o_proj', got {mode!r}")
    model = unwrapped(model)
    pairs = sorted(set(_heads_of(heads, fraction)))
    layers = attention_layers(model)
    num_heads = layer_heads(layers)  # each layer's own (a vision tower's may differ)
    for layer, head in pairs:
        if not 0 <= layer < len(layers):
            raise ValueError(f"head ({layer}, {head}) is outside the model's {len(layers)} layers")
        if num_heads[layer] is None:
            raise NotImplementedError(f"cannot tell how many heads {type(layers[layer]).__name__} (layer {layer}) has")
        if not 0 <= head < num_heads[layer]:
            raise ValueError(f"head ({layer}, {head}) is outside layer {layer}'s {num_heads[layer]} heads")
    handle = PrunedHeads(model, pairs, mode)
    if mode == "mask":
        _prune_by_mask(handle, model, layers, pairs, num_heads)
    else:
        _prune_by_projection(handle, model, layers, pairs, num_heads)
    if not hasattr(model, _PRUNED):
        setattr(model, _PRUNED, [])
    getattr(model, _PRUNED).append(handle)
    return handle


def _prune_by_mask(handle, model, layers: list, pairs: list, num_heads: list) -> None:
    if not is_patched(model):
        _patch_for(model, "method")  # (unpatched when the options are back to the defaults)
    previous = patch_options(model)
    masks = {layer: keep.clone() for layer, keep in previous.head_mask.items()}
    for layer, head in pairs:
        masks.setdefault(layer, torch.ones(num_heads[layer], dtype=torch.bool))[head] = False
    _set_options(model, head_mask=masks)  # (the other options, guidance among them, kept)
    handle.previous_head_mask = previous.head_mask


def _prune_by_projection(handle, model, layers: list, pairs: list, num_heads: list) -> None:
    names = {id(parameter): name for name, parameter in model.named_parameters(remove_duplicate=False)}
    saved = []  # all found before any is zeroed: a head that cannot be pruned leaves every weight as it was
    with torch.no_grad():
        for layer, head in pairs:
            weight, axis = _output_projection(model, layers[layer])
            if weight.is_meta:
                raise NotImplementedError(f"layer {layer}'s output projection is offloaded (a meta placeholder, its "
                                          "values kept by accelerate's hooks): use mode='mask'")
            size = _head_width(layers[layer], num_heads[layer], weight, axis)
            saved.append((names[id(weight)], axis, head * size, size, weight.narrow(axis, head * size, size).clone()))
        for name, axis, start, size, _ in saved:
            model.get_parameter(name).narrow(axis, start, size).zero_()
    handle.saved = saved


def restore_heads(model) -> None:
    """Undoes every prune_heads on the model, newest first."""
    for handle in reversed(list(getattr(unwrapped(model), _PRUNED, []))):
        handle.restore()


# ---------------------------------------------------------------- perplexity and the plot


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8, max_length: Optional[int] = None,
               progress: bool = True) -> float:
    """exp(mean next-token negative log-likelihood) of a causal language model over every real
    (non-padded) predicted token of `texts`, batched like score_heads (in eval mode likewise)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad(), eval_mode(model):
        for batch in text_batches(model, tokenizer, texts, batch_size, max_length, progress, "perplexity"):
            logits = getattr(model(**batch), "logits", None)
            if logits is None:
                raise TypeError(f"perplexity needs a causal language model with logits, got {type(model).__name__}")
            real = batch["attention_mask"] != 0  # a prediction needs a real input and a real target
            # position i predicts token i + 1; the last position predicts nothing (-100): every
            # position kept, so the loss reads the logits [B * L, V] as they are, no sliced copy
            targets = torch.full_like(batch["input_ids"], -100)
            targets[:, :-1] = batch["input_ids"][:, 1:].masked_fill(~(real[:, 1:] & real[:, :-1]), -100)
            loss = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
            total += loss.double().cpu()
            count += int((targets != -100).sum())
    if count == 0:
        raise ValueError("no token to predict: every text is shorter than two tokens")
    return math.exp(total.item() / count)


def plot_sink_heads(table, path, *, title: Optional[str] = None):
    """Writes a layer x head heat map of a score_heads table's sink_score to `path` (any format
    matplotlib saves, by extension); returns the path. Needs matplotlib (pip install
    'fastprobe[plot]'). Draws on its own figure: the pyplot state and backend are left alone."""
    _check_table(table, ("layer", "head", "sink_score"))
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_sink_heads needs matplotlib: pip install 'fastprobe[plot]'") from error
    grid = table.pivot(index="layer", columns="head", values="sink_score").sort_index()
    layers, heads = grid.shape
    figure = Figure(figsize=(max(4.0, 0.5 * heads + 2.0), max(3.0, 0.35 * layers + 1.5)))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, origin="upper")
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(heads), [str(h) for h in grid.columns])
    axes.set_yticks(range(layers), [str(l) for l in grid.index])
    axes.set_title(title or "BOS sink score (attention on the first token)")
    figure.colorbar(image, ax=axes, label="sink score")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path
