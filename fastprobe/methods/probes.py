"""Probes: collect hidden states at chosen layers of a transformers model, and train a linear, an
MLP or an attentive probe on them.

    states = collect_hidden_states(model, tokenizer, texts, layers=[4, -1], pool="last")
    fit = train_probe(states[4], labels, kind="linear")          # fit.probe, fit.metrics
    predicted = predict(fit.probe, states[4])                    # class ids (or values)

    tokens = collect_hidden_states(model, tokenizer, texts, layers=[4], pool=None)
    fit = train_probe(tokens[4], labels, mask=tokens.mask, kind="attentive")

    batches = [processor(images=images, text=prompts, return_tensors="pt", padding=True)]
    states = collect_hidden_states_from_batches(vlm, batches, layers=[2])   # a VLM's language model

Layer i is the output of transformer block i (0-based; negative counts from the end): the
residual stream after that block, which is model(..., output_hidden_states=True).hidden_states[i + 1]
for every block but the last (transformers puts the model's final norm, where it has one, on
hidden_states[-1]; layer -1 here is the last block's raw output). The blocks are found by
transformer_blocks(model): model.layers (Llama family), transformer.h (GPT-2), encoder.layer
(BERT), a vision-language model's language model.

Collecting is a forward pass with a forward hook on each chosen block, under torch.no_grad and in
eval mode (no dropout; every module's training flag restored afterwards), without
output_hidden_states, attention weights or a KV cache; the hook of the deepest chosen block stops
the pass, so deeper blocks (and the LM head) never run. Pooling: "last" (each row's last real
token, for left or right padding), "mean" (over real tokens), or None (every token: [N, T, H]
with real tokens first, and a bool mask [N, T]).

Probes are torch.nn.Modules (LinearProbe, MLPProbe, AttentiveProbe) that carry their feature
standardisation (mean, scale; for regression the targets' too) as buffers, so predict and
state_dict use what training saw. Labels: class ids (binary or multi-class, cross-entropy) or
floating values (regression, mean squared error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Iterable, NamedTuple, Optional, Sequence

import torch

from ..integrations.transformers import execution_device, unwrapped
from ..ops._common import check_bool
from ._batching import (
    autocast_off, check_count, eval_mode, forward_parameters, last_real_index, on_model, text_batches,
)

__all__ = [
    "AttentiveProbe", "HiddenStates", "LinearProbe", "MLPProbe", "ProbeFit", "collect_hidden_states",
    "collect_hidden_states_from_batches", "evaluate_probe", "predict", "train_probe", "transformer_blocks",
]

POOLS = ("last", "mean", None)
KINDS = ("linear", "mlp", "attentive")
TASKS = ("auto", "classification", "regression")

# Where the transformer blocks live, first match wins: a vision-language model's language model
# first (transformers >= 4.52, then older LLaVA), then decoder-only and encoder-only models.
_BLOCK_PATHS = (
    "model.language_model.layers", "language_model.model.layers", "language_model.layers",
    "model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
    "encoder.layer", "bert.encoder.layer", "roberta.encoder.layer", "layers", "h",
)


# ---------------------------------------------------------------- the blocks and the layers


def transformer_blocks(model) -> list:
    """The model's transformer blocks in order (decoder layers; BERT's encoder layers; for a
    vision-language model, its language model's): layer i of this module is blocks[i]'s output.
    NotImplementedError when none are found, or for an encoder-decoder model (BART's decoder layers
    would read the encoder's attention mask as their own). Of the model inside a PEFT wrapper."""
    model = unwrapped(model)
    encoder = getattr(model, "get_encoder", None)  # (an encoder itself: None on 4.5x, itself on 5.x)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True and \
            callable(encoder) and encoder() is not model:
        raise NotImplementedError(f"{type(model).__name__} is an encoder-decoder model: collect from a "
                                  "decoder-only or encoder-only model (or pass its encoder, model.get_encoder())")
    for path in _BLOCK_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, torch.nn.ModuleList) and len(found) > 0:
            return list(found)
    # Otherwise: the one ModuleList whose every element holds a transformers attention module
    # (they carry an integer layer_idx for the KV cache).
    candidates = [
        module for module in model.modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and all(map(_holds_attention, module))
    ]
    if len(candidates) == 1:
        return list(candidates[0])
    raise NotImplementedError(f"cannot tell which modules of {type(model).__name__} are its transformer blocks "
                              f"(looked for {', '.join(_BLOCK_PATHS)})")


def _holds_attention(block) -> bool:
    return any(isinstance(getattr(module, "layer_idx", None), int) for module in block.modules())


def _resolve_layers(layers, num_layers: int, name: str = "layers") -> list[int]:
    """Layers as non-negative block indices, in the order given, duplicates dropped."""
    given = [layers] if isinstance(layers, numbers.Integral) and not isinstance(layers, bool) else layers
    try:
        given = list(given)
    except TypeError:
        raise ValueError(f"{name} must be an int or a list of ints, got {layers!r}") from None
    if not given:
        raise ValueError(f"{name} is empty")
    resolved = []
    for layer in given:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ValueError(f"{name} must hold ints, got {layer!r}")
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"{name}: layer {layer} is out of range for a model with {num_layers} transformer "
                             f"blocks (use 0..{num_layers - 1}, or negative from the end)")
        layer = int(layer) % num_layers
        if layer not in resolved:
            resolved.append(layer)
    return resolved


def _resolve_layer(layer, num_layers: int) -> int:
    """One layer (an int, negative from the end) as a non-negative block index."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise ValueError(f"layer must be an int, got {layer!r}")
    return _resolve_layers(layer, num_layers, "layer")[0]


def _check_pool(pool) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be 'last', 'mean' or None, got {pool!r}")


# ---------------------------------------------------------------- pooling


def _hidden_of(output) -> torch.Tensor:
    """A block's hidden state: its output, or the first element (transformers < 4.54 and some
    architectures return a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _real_first(hidden: torch.Tensor, real: torch.Tensor) -> tuple:
    """Every row's real tokens moved to the front, in order (a stable sort on is-padding), zeros
    after them, and the mask that goes with them: the same layout whatever side the batch was
    padded on."""
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices
    gathered = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    mask = real.gather(1, order)
    return gathered.masked_fill(~mask.unsqueeze(-1), 0), mask


def _pool(hidden: torch.Tensor, real: torch.Tensor, pool: Optional[str]):
    """[B, T, H] -> [B, H] ("last", "mean") or ([B, T, H], [B, T]) (None)."""
    if pool == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_real_index(real)]
    if pool == "mean":
        # mean_t h[t] over real tokens, in float32 at least (padding's states selected out, not
        # multiplied by 0: a non-finite one there would make the mean NaN)
        real = real.unsqueeze(-1) != 0
        summed = hidden.to(torch.promote_types(hidden.dtype, torch.float32)).masked_fill(~real, 0).sum(1)
        return summed / real.sum(1).clamp(min=1)
    return _real_first(hidden, real)


def _pad_tokens(pieces: list, length: int) -> torch.Tensor:
    """Batches of [B, T_b, ...] zero-padded on the right to [sum B, length, ...]."""
    padded = []
    for piece in pieces:
        widths = [0, 0] * (piece.dim() - 2) + [0, length - piece.shape[1]]
        padded.append(torch.nn.functional.pad(piece, widths))
    return torch.cat(padded)


# ---------------------------------------------------------------- the collector


class _StopForward(Exception):
    """Raised by the deepest chosen block's hook: nothing after it is needed."""


@dataclasses.dataclass
class HiddenStates:
    """What a collector returns. features: {layer: [N, H]} pooled, or {layer: [N, T, H]} with
    pool=None (real tokens first, zeros after); mask: bool [N, T] (True = real token) with
    pool=None, else None. Layers are keys as non-negative block indices; states[layer] also takes
    negative ones."""

    features: dict
    mask: Optional[torch.Tensor]
    num_layers: int
    pool: Optional[str]

    def __getitem__(self, layer: int) -> torch.Tensor:
        resolved = _resolve_layer(layer, self.num_layers)
        if resolved not in self.features:
            raise KeyError(f"layer {layer} was not collected (collected: {self.layers})")
        return self.features[resolved]

    @property
    def layers(self) -> list[int]:
        """The collected layers, as non-negative block indices in collection order."""
        return list(self.features)

    def __len__(self) -> int:
        return next(iter(self.features.values())).shape[0]

    def __repr__(self) -> str:  # (shapes, not every value: features of real sizes flooded a notebook)
        first = next(iter(self.features.values()), None)
        shape = "" if first is None else f", each {list(first.shape)} {first.dtype}"
        return f"HiddenStates(layers={self.layers}{shape}, pool={self.pool!r}, num_layers={self.num_layers})"


class _Collector:
    """Forward hooks on the chosen blocks that pool each batch's hidden states as they pass; the
    hook of the deepest block raises _StopForward."""

    def __init__(self, blocks: list, layers: list[int], pool: Optional[str], device, dtype):
        self.layers, self.pool, self.device, self.dtype = layers, pool, device, dtype
        self.deepest = max(layers)
        self.features = {layer: [] for layer in layers}
        self.masks: list = []
        self.real: Optional[torch.Tensor] = None  # bool [B, T] of the running batch
        self.rows = 0  # rows of the batches run before it
        self.handles = [blocks[layer].register_forward_hook(self.hook_for(layer)) for layer in layers]

    def hook_for(self, layer: int):
        def hook(module, args, output):
            hidden = _hidden_of(output)
            if hidden.shape[:2] != self.real.shape:
                raise ValueError(f"the attention_mask is {tuple(self.real.shape)} (batch, tokens) but layer {layer}'s "
                                 f"hidden state is {tuple(hidden.shape)}: pass the mask that matches input_ids")
            pooled = _pool(hidden, self.real.to(hidden.device), self.pool)
            if self.pool is None:
                pooled, mask = pooled
                if layer == self.deepest:
                    self.masks.append(mask.to(self.device))
            self.features[layer].append(pooled.to(self.device, self.dtype or hidden.dtype))
            if layer == self.deepest:
                raise _StopForward

        return hook

    def run(self, model, batch: dict, options: dict) -> None:
        self.real = _real_tokens(batch)
        has_tokens = self.real.any(dim=1)
        if not bool(has_tokens.all()):  # its "last" would be a padding token's state, its "mean" zeros
            row = self.rows + int((~has_tokens).nonzero()[0])
            raise ValueError(f"input {row} has no tokens (an empty text, or an attention_mask row of zeros): "
                             "there is nothing to pool")
        self.rows += self.real.shape[0]
        try:
            model(**batch, **options)
        except _StopForward:
            return
        raise RuntimeError(f"the forward pass of {type(model).__name__} never ran transformer block {self.deepest}")

    def result(self, num_layers: int) -> HiddenStates:
        if self.pool is not None:
            features = {layer: torch.cat(self.features[layer]) for layer in self.layers}
            return HiddenStates(features, None, num_layers, self.pool)
        length = max(mask.shape[1] for mask in self.masks)
        features = {layer: _pad_tokens(self.features[layer], length) for layer in self.layers}
        return HiddenStates(features, _pad_tokens(self.masks, length), num_layers, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _real_tokens(batch: dict) -> torch.Tensor:
    """bool [B, T]: True at real tokens (the attention mask; every token without one)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask != 0
    ids = batch.get("input_ids", batch.get("inputs_embeds"))
    return torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)


def _quiet_options(model) -> dict:
    """Keyword arguments that keep a forward lean where the model takes them: no KV cache, no
    attention weights, no hidden-state tuple."""
    named = forward_parameters(model)
    wanted = {"use_cache": False, "output_attentions": False, "output_hidden_states": False}
    return {name: value for name, value in wanted.items() if name in named}


def _collect(model, blocks: list, layers: list[int], batches: Iterable[dict], pool, on_device: bool,
             dtype) -> HiddenStates:
    """Runs the batches with hooks on blocks[layer] for the (resolved) layers."""
    device = execution_device(model) if on_device else torch.device("cpu")
    collector = _Collector(blocks, layers, pool, device, dtype)
    options = _quiet_options(model)
    try:
        with torch.no_grad(), eval_mode(model):  # (no dropout; each module's flag back afterwards)
            for batch in batches:
                collector.run(model, batch, options)
    finally:
        collector.remove()
        if hasattr(batches, "close"):  # a generator of tokenised texts gives the tokenizer's pad token back now,
            batches.close()             # not when a kept traceback (a notebook's) finally lets it go
    return collector.result(len(blocks))


def _check_output(dtype, on_device) -> None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    check_bool(on_device, "on_device")


def collect_hidden_states(model, tokenizer, texts: Sequence[str], *, layers, pool: Optional[str] = "last",
                          batch_size: int = 8, max_length: Optional[int] = None, on_device: bool = False,
                          dtype: Optional[torch.dtype] = torch.float32, progress: bool = True) -> HiddenStates:
    """Hidden states of `texts` at `layers` (block indices, negative from the end; layer i is
    block i's output), batched with the tokenizer's padding side (position ids counted over real
    tokens, so a padded text gives what it gives alone) and truncated to max_length tokens
    (None: the checkpoint's context, as fastprobe.methods says).

    pool: "last" (each text's last real token), "mean" (over its real tokens) -> [N, H] per
    layer; None -> [N, T, H] per layer and HiddenStates.mask [N, T]. Results on the CPU in
    float32, or on the model's device with on_device=True; dtype=None keeps the dtype the blocks
    return (the model's: under torch.autocast a float32 model's residual stream stays float32,
    computed in autocast's precision).
    progress: a tqdm bar over batches."""
    blocks = transformer_blocks(model)
    layers = _resolve_layers(layers, len(blocks))  # bad arguments fail before the tokenizer runs
    _check_pool(pool)
    _check_output(dtype, on_device)
    batches = text_batches(model, tokenizer, texts, batch_size, max_length, progress, "hidden states")
    return _collect(model, blocks, layers, batches, pool, on_device, dtype)


def collect_hidden_states_from_batches(model, batches, *, layers, pool: Optional[str] = "last",
                                       on_device: bool = False, dtype: Optional[torch.dtype] = torch.float32,
                                       progress: bool = True) -> HiddenStates:
    """As collect_hidden_states, from batches that are already model inputs: a dict (e.g. what a
    tokenizer or a vision-language processor returns) or a list of them. Each batch needs
    input_ids or inputs_embeds; rows are read through its attention_mask (all real without
    one). Tensors go to the model's device, floating ones (pixel values) in the model's dtype.
    A left-padded batch without position_ids gets them counted over real tokens (as generate
    does), where the model takes them. The caller's batches are not modified."""
    blocks = transformer_blocks(model)
    layers = _resolve_layers(layers, len(blocks))
    _check_pool(pool)
    _check_output(dtype, on_device)
    check_bool(progress, "progress")
    batches = _checked_batches(batches)
    from tqdm.auto import tqdm

    ready = (on_model(model, batch) for batch in tqdm(batches, desc="hidden states", unit="batch",
                                                        disable=not progress))
    return _collect(model, blocks, layers, ready, pool, on_device, dtype)


def _checked_batches(batches) -> list:
    batches = [batches] if isinstance(batches, Mapping) else list(batches)
    if not batches:
        raise ValueError("batches is empty")
    for index, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise ValueError(f"batches[{index}] must be a dict of model inputs, got {type(batch).__name__}")
        tokens = batch.get("input_ids", batch.get("inputs_embeds"))
        if not isinstance(tokens, torch.Tensor) or tokens.dim() < 2:
            raise ValueError(f"batches[{index}] needs input_ids [B, T] or inputs_embeds [B, T, H] as tensors")
        if tokens.shape[0] == 0:  # (it failed inside the model's attention, reshaping 0 elements)
            raise ValueError(f"batches[{index}] holds no rows (batch size 0): leave empty batches out")
        mask = batch.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(tokens.shape[:2])):
            raise ValueError(f"batches[{index}]: attention_mask must be a tensor of shape {tuple(tokens.shape[:2])}")
    return batches


def _batch_rows(batch: Mapping) -> int:
    """How many rows (sequences) a batch of model inputs holds."""
    return int(batch.get("input_ids", batch.get("inputs_embeds")).shape[0])


# ---------------------------------------------------------------- the probes


class _Probe(torch.nn.Module):
    """What every probe shares: the task, the output width, the feature standardisation
    x -> (x - feature_mean) / feature_scale and, for regression, the output scaling
    y = raw * target_scale + target_mean (all identity until train_probe sets them)."""

    rank = 2  # features [N, H]; the attentive probe takes [N, T, H]

    def __init__(self, in_features: int, num_outputs: int, task: str):
        super().__init__()
        check_count(in_features, "in_features")
        check_count(num_outputs, "num_outputs")
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        self.in_features, self.num_outputs, self.task = int(in_features), int(num_outputs), task
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_scale", torch.ones(in_features))
        self.register_buffer("target_mean", torch.zeros(num_outputs))
        self.register_buffer("target_scale", torch.ones(num_outputs))

    def standardized(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_scale

    def rescaled(self, outputs: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return outputs
        return outputs * self.target_scale + self.target_mean

    def _no_mask(self, mask) -> None:
        if mask is not None:
            raise ValueError(f"mask is for the attentive probe (token features); {type(self).__name__} takes pooled "
                             "features [N, H]")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_outputs={self.num_outputs}, task={self.task!r}"


class LinearProbe(_Probe):
    """outputs = W x + b on standardised features [N, H] -> [N, num_outputs] (class logits, or
    regression values)."""

    def __init__(self, in_features: int, num_outputs: int = 2, *, task: str = "classification"):
        super().__init__(in_features, num_outputs, task)
        self.linear = torch.nn.Linear(in_features, num_outputs)

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, num_outputs] class logits or values (in the targets' units) of raw features [N, H],
        standardised here; mask must be None."""
        self._no_mask(mask)
        return self.rescaled(self.linear(self.standardized(features)))


class MLPProbe(_Probe):
    """One hidden layer: outputs = W2 dropout(gelu(W1 x + b1)) + b2 on standardised features."""

    def __init__(self, in_features: int, num_outputs: int = 2, *, hidden_size: int = 256, dropout: float = 0.1,
                 task: str = "classification"):
        super().__init__(in_features, num_outputs, task)
        check_count(hidden_size, "hidden_size")
        _check_dropout(dropout)
        self.hidden = torch.nn.Linear(in_features, hidden_size)
        self.dropout = torch.nn.Dropout(dropout)
        self.output = torch.nn.Linear(hidden_size, num_outputs)

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As LinearProbe.forward: [N, num_outputs] from raw features [N, H]; mask must be None."""
        self._no_mask(mask)
        hidden = torch.nn.functional.gelu(self.hidden(self.standardized(features)))
        return self.rescaled(self.output(self.dropout(hidden)))


class AttentiveProbe(_Probe):
    """num_queries learned queries attend over token features [N, T, H] (padding masked out),
    then a linear head reads the pooled vectors:
        weights[n, q, t] = softmax_t(q_q . x[n, t] / sqrt(H))   (t over real tokens)
        pooled[n, q] = sum_t weights[n, q, t] x[n, t]
        outputs[n] = W concat_q(pooled[n, q]) + b"""

    rank = 3

    def __init__(self, in_features: int, num_outputs: int = 2, *, num_queries: int = 4, dropout: float = 0.0,
                 task: str = "classification"):
        super().__init__(in_features, num_outputs, task)
        check_count(num_queries, "num_queries")
        _check_dropout(dropout)
        self.queries = torch.nn.Parameter(torch.randn(num_queries, in_features) / math.sqrt(in_features))
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(num_queries * in_features, num_outputs)

    def attention_weights(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, num_queries, T]: each query's attention over the tokens (0 on padding)."""
        return self._weights(self.standardized(features), mask)

    def _weights(self, standardized: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        scores = torch.einsum("qh,nth->nqt", self.queries, standardized) / math.sqrt(self.in_features)
        if mask is not None:
            scores = scores.masked_fill(~mask.bool().unsqueeze(1), float("-inf"))
        return scores.softmax(dim=-1)

    def forward(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, num_outputs] class logits or values (in the targets' units) of raw token features
        [N, T, H], standardised here, with mask [N, T] (True = real token; None: all real)."""
        # (standardised once: both products read the same [N, T, H] tensor, which autograd keeps once)
        standardized = self.standardized(features)
        weights = self._weights(standardized, mask)
        pooled = torch.einsum("nqt,nth->nqh", weights, standardized)
        return self.rescaled(self.head(self.dropout(pooled.flatten(1))))


def _check_dropout(dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")


# ---------------------------------------------------------------- checking features and labels


def _tensor_of(value, name: str) -> torch.Tensor:
    """value as a tensor outside autograd (numpy arrays and lists of numbers are read, not copied
    where possible; a tensor that requires grad is detached: training never backpropagates into
    the caller's graph)."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if callable(getattr(value, "to_numpy", None)):  # a pandas Series or DataFrame: by position, whatever its index
        value = value.to_numpy()
    if not getattr(getattr(value, "flags", None), "writeable", True):  # (pandas' copy-on-write arrays: torch warns)
        value = value.copy()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a tensor or an array of numbers, got {type(value).__name__}") from None


def _as_features(features, name: str = "features") -> torch.Tensor:
    features = _tensor_of(features, name)
    if not features.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {features.dtype}")
    if features.dim() == 0 or features.numel() == 0:
        raise ValueError(f"{name} is empty")
    _check_finite(features, name)
    return features


def _check_finite(values: torch.Tensor, name: str) -> None:
    """ValueError for NaN or infinite values, or values beyond float32's range (probes compute in
    float32)."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    if values.dtype == torch.float64 and float(values.abs().max()) > torch.finfo(torch.float32).max:
        raise ValueError(f"{name} holds values beyond float32's range ({float(values.abs().max()):.3g}); probes "
                         "compute in float32: rescale them")


def _check_rank(features: torch.Tensor, kind_rank: int, kind: str, name: str = "features") -> None:
    if features.dim() != kind_rank:
        want = "[N, H] (pooled)" if kind_rank == 2 else "[N, T, H] (token features, pool=None)"
        raise ValueError(f"{name} must be {want} for the {kind} probe, got shape {tuple(features.shape)}")


def _as_mask(mask, features: torch.Tensor, name: str = "mask") -> Optional[torch.Tensor]:
    if mask is None:
        return None
    mask = _tensor_of(mask, name)
    if tuple(mask.shape) != tuple(features.shape[:2]):
        raise ValueError(f"{name} must have shape {tuple(features.shape[:2])} (rows, tokens), got {tuple(mask.shape)}")
    mask = mask.to(features.device) != 0
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"{name}: every row needs at least one real token")
    return mask


def _infer_task(labels: torch.Tensor, task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "auto":
        return "regression" if labels.is_floating_point() else "classification"
    return task


def _targets_per_row(labels: torch.Tensor) -> int:
    """A regression's targets per row: 1 for [N], D for [N, D]."""
    return 1 if labels.dim() == 1 else labels.shape[1]


def _as_labels(labels, rows: int, task: str, name: str = "labels", width: Optional[int] = None) -> torch.Tensor:
    """labels checked for the task (width: the targets per row a regression must have, if fixed)."""
    labels = _tensor_of(labels, name)
    if labels.dim() == 0 or labels.shape[0] != rows:
        raise ValueError(f"{name} has {labels.shape[0] if labels.dim() else 'no'} rows but the features have {rows}")
    if task == "classification":
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"{name} must be class ids (an integer or bool tensor [N]) for classification, "
                             f"got {labels.dtype} {tuple(labels.shape)}")
        if bool((labels < 0).any()):
            raise ValueError(f"{name} must be class ids >= 0")
        return labels.long()
    if labels.dim() > 2:
        raise ValueError(f"{name} must be [N] or [N, D] for regression, got {tuple(labels.shape)}")
    if width is not None and _targets_per_row(labels) != width:
        raise ValueError(f"{name} must have {width} target(s) per row, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        _check_finite(labels, name)
    return labels.float()


# ---------------------------------------------------------------- training


class ProbeFit(NamedTuple):
    """train_probe's result: the trained probe (eval mode), metrics (train_loss, and
    train_accuracy for classification or train_r2 for regression; val_* the same on the
    validation rows when there are any) and history (per epoch, the training loss as its steps
    ran, averaged over the epoch's rows (each step's loss weighted by its rows): cross-entropy, or
    for regression the mean squared error of the standardised targets; the metrics' losses are in
    the targets' own units)."""

    probe: torch.nn.Module
    metrics: dict
    history: list


def _make_probe(kind: str, in_features: int, num_outputs: int, task: str, hidden_size: int, dropout: float,
                num_queries: int) -> _Probe:
    if kind == "linear":
        return LinearProbe(in_features, num_outputs, task=task)
    if kind == "mlp":
        return MLPProbe(in_features, num_outputs, hidden_size=hidden_size, dropout=dropout, task=task)
    return AttentiveProbe(in_features, num_outputs, num_queries=num_queries, dropout=dropout, task=task)


def _mean_and_scale(rows: torch.Tensor) -> tuple:
    """Per-column mean and std of [R, C] (in float64 on the CPU); scale 1 where a column is
    constant: its std is at rounding level relative to its mean, or below float32's smallest
    normal number (a column of tiny but varying values is scaled like any other)."""
    rows = rows.detach().to("cpu", torch.float64)
    mean, std = rows.mean(0), rows.std(0, unbiased=False)
    constant = (std <= 1e-12 * mean.abs()) | (std < torch.finfo(torch.float32).tiny)
    return mean, torch.where(constant, torch.ones_like(std), std)


def _set_standardization(probe: _Probe, features: torch.Tensor, labels: torch.Tensor,
                         mask: Optional[torch.Tensor]) -> None:
    """Feature mean and scale over the training rows (over real tokens for token features);
    for regression also the targets' mean and scale, so the probe learns values of order 1."""
    flat = features.reshape(-1, features.shape[-1]) if mask is None else features[mask]
    with torch.no_grad():
        for buffer, value in zip((probe.feature_mean, probe.feature_scale), _mean_and_scale(flat)):
            buffer.copy_(value)
        if probe.task == "regression":
            targets = labels.reshape(labels.shape[0], -1)
            for buffer, value in zip((probe.target_mean, probe.target_scale), _mean_and_scale(targets)):
                buffer.copy_(value)


def _loss(outputs: torch.Tensor, labels: torch.Tensor, task: str,
          target_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy, or the mean squared error mean((y - f)^2); with target_scale (training) that
    of the standardised targets, mean(((y - f) / target_scale)^2), so every output counts alike
    whatever its units and the loss stays of order 1."""
    if task == "classification":
        return torch.nn.functional.cross_entropy(outputs, labels)
    error = labels.reshape(outputs.shape) - outputs
    return (error if target_scale is None else error / target_scale).pow(2).mean()


def _split(rows: int, fraction, seed: int) -> tuple:
    """(train rows, validation rows): a seeded random permutation, the validation rows first."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be a number in [0, 1), got {fraction!r}")
    held_out = int(round(fraction * rows))
    if rows - held_out < 1:
        raise ValueError(f"validation_fraction={fraction} leaves no training rows out of {rows}")
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    return order[held_out:], order[:held_out]


def _rows(tensor: Optional[torch.Tensor], index: torch.Tensor) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor[index.to(tensor.device)]


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """For the block, the CPU generator (parameter init) and, when training on CUDA, that device's
    (dropout) seeded with `seed`, their states given back after it; no other generator is touched
    (torch.manual_seed would reseed every GPU's, even when training on the CPU)."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def _normal(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """tensor, or a normal copy of an inference tensor (one made under torch.inference_mode, which
    autograd cannot save for backward)."""
    return tensor.clone() if tensor is not None and tensor.is_inference() else tensor


def train_probe(
    features,
    labels,
    *,
    kind: str = "linear",
    mask=None,
    task: str = "auto",
    validation_fraction: float = 0.2,
    validation_data: Optional[tuple] = None,
    epochs: int = 100,
    batch_size: Optional[int] = None,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    standardize: bool = True,
    hidden_size: int = 256,
    dropout: float = 0.1,
    num_queries: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> ProbeFit:
    """Trains a probe of `kind` ("linear", "mlp" on pooled features [N, H]; "attentive" on token
    features [N, T, H] with mask [N, T]) to predict `labels`, with AdamW (lr, weight_decay) for
    `epochs` passes, full batch (batch_size=None) or shuffled mini-batches; returns ProbeFit.

    task "auto": integer/bool labels [N] are classification (classes 0..max, cross-entropy;
    binary is 2 classes), floating labels [N] or [N, D] regression (mean squared error).
    Validation rows: validation_data=(features, labels) or (features, labels, mask), else a
    seeded random validation_fraction of the rows (0 = none). standardize: per-feature mean and
    std of the training rows (and, for regression, the targets' mean and std: training
    minimises the squared error of the standardised targets, each output alike whatever its
    units), kept in the probe (applied at predict time too). Seeded and deterministic (the
    global RNG is left as it was); trains on the features' device in float32, also under
    torch.autocast (which is off for the call: the fit is the same inside and outside it) and
    under torch.no_grad or torch.inference_mode (gradients are on for the fit); the
    caller's tensors are never modified (nor backpropagated into: they are read detached)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    features = _as_features(features).to(torch.float32)  # a copy unless already float32; never written
    _check_rank(features, AttentiveProbe.rank if kind == "attentive" else _Probe.rank, kind)
    if kind != "attentive" and mask is not None:
        raise ValueError(f"mask is for the attentive probe; the {kind} probe takes pooled features [N, H]")
    mask = _as_mask(mask, features)
    labels = _tensor_of(labels, "labels")
    task = _infer_task(labels, task)
    labels = _as_labels(labels, features.shape[0], task).to(features.device)
    check_count(epochs, "epochs")
    check_count(seed, "seed", minimum=0)
    check_bool(standardize, "standardize")
    check_bool(progress, "progress")
    if batch_size is not None:
        check_count(batch_size, "batch_size")
    train_rows, val_rows = _split(features.shape[0], 0.0 if validation_data is not None else validation_fraction, seed)
    train = (_rows(features, train_rows), _rows(labels, train_rows), _rows(mask, train_rows))
    if validation_data is not None:
        validation = _validation_set(validation_data, kind, task, features, labels, mask)
    else:
        held_out = (_rows(features, val_rows), _rows(labels, val_rows), _rows(mask, val_rows))
        validation = held_out if len(val_rows) else None
    num_outputs = _num_outputs(task, train[1], validation)
    # in float32 under torch.autocast too: its region caches each weight's bfloat16 cast, so every
    # step would run the first step's weights
    # and with gradients on under torch.no_grad / inference_mode too (a script that collects features
    # and fits a probe in one such block): the fit is the same inside and outside them
    with (_seeded(features.device, seed), autocast_off(features.device), torch.inference_mode(False),
          torch.enable_grad()):
        train = tuple(map(_normal, train))
        probe = _make_probe(kind, features.shape[-1], num_outputs, task, hidden_size, dropout, num_queries)
        probe.to(features.device)
        if standardize:
            _set_standardization(probe, *train)
        history = _fit(probe, train, epochs, batch_size, lr, weight_decay, seed, progress)
    probe.eval()
    metrics = {f"train_{name}": value for name, value in evaluate_probe(probe, *train).items()}
    if validation is not None:
        metrics.update({f"val_{name}": value for name, value in evaluate_probe(probe, *validation).items()})
    return ProbeFit(probe, metrics, history)


def _validation_set(validation_data, kind: str, task: str, features: torch.Tensor, labels: torch.Tensor,
                    mask: Optional[torch.Tensor]) -> tuple:
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
        raise ValueError("validation_data must be (features, labels) or (features, labels, mask)")
    val_features = _as_features(validation_data[0], "validation_data features").to(features.device, torch.float32)
    _check_rank(val_features, features.dim(), kind, "validation_data features")
    if val_features.shape[-1] != features.shape[-1]:
        raise ValueError(f"validation_data features have {val_features.shape[-1]} features, the training features "
                         f"{features.shape[-1]}")
    val_mask = validation_data[2] if len(validation_data) == 3 else None
    if kind != "attentive" and val_mask is not None:
        raise ValueError(f"validation_data has a mask, but the {kind} probe takes pooled features")
    if mask is not None and val_mask is None:  # (the probe would attend to the validation rows' padding)
        raise ValueError("validation_data has no mask, but the training features have one: pass (features, labels, "
                         "mask)")
    val_mask = _as_mask(val_mask, val_features, "validation_data mask")
    width = _targets_per_row(labels) if task == "regression" else None  # (as the training labels)
    val_labels = _as_labels(validation_data[1], val_features.shape[0], task, "validation_data labels", width)
    return val_features, val_labels.to(features.device), val_mask


def _num_outputs(task: str, labels: torch.Tensor, validation: Optional[tuple]) -> int:
    """The probe's outputs, from the training rows' labels (not the held-out split's: a class seen
    only in validation is not learned) and the validation labels' highest class."""
    if task == "regression":
        return _targets_per_row(labels)
    classes = labels.unique()
    if classes.numel() < 2:  # (any one class, not only 0: all-1 labels trained a probe that never saw a 0)
        raise ValueError(f"labels hold a single class ({int(classes[0])}) in the training rows: a classifier needs "
                         "at least two (the validation split may have taken a rare class's rows: change seed or "
                         "validation_fraction, or pass validation_data)")
    highest = int(labels.max()) if validation is None else max(int(labels.max()), int(validation[1].max()))
    return highest + 1


def _fit(probe: _Probe, train: tuple, epochs: int, batch_size: Optional[int], lr: float, weight_decay: float,
         seed: int, progress: bool) -> list:
    if progress:
        from tqdm.auto import tqdm
    else:  # (a probe on plain tensors needs no tqdm, which only transformers brings in)
        def tqdm(iterable, **_):
            return iterable

    features, labels, mask = train
    rows = features.shape[0]
    step = rows if batch_size is None else min(batch_size, rows)
    shuffle = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    probe.train()
    losses = []
    for _ in tqdm(range(epochs), desc="probe", unit="epoch", disable=not progress):
        order = torch.randperm(rows, generator=shuffle).to(features.device) if step < rows else None
        total = torch.zeros((), device=features.device)
        for start in range(0, rows, step):
            index = None if order is None else order[start:start + step]
            batch = (features, labels, mask) if index is None else (features[index], labels[index], _rows(mask, index))
            loss = _loss(probe(batch[0], batch[2]), batch[1], probe.task, probe.target_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * batch[0].shape[0]
        losses.append(total / rows)
    return torch.stack(losses).tolist()  # one host sync, after training


# ---------------------------------------------------------------- using a probe


@contextlib.contextmanager
def _evaluating(probe: torch.nn.Module):
    """The probe in eval mode without gradients, each module's own training flag back afterwards."""
    with eval_mode(probe), torch.no_grad():
        yield


def _probe_of(probe) -> _Probe:
    """The probe module: itself, or the one a ProbeFit (train_probe's result) holds."""
    probe = probe.probe if isinstance(probe, ProbeFit) else probe
    if not isinstance(probe, _Probe):
        raise TypeError(f"probe must be a LinearProbe, MLPProbe or AttentiveProbe (or train_probe's ProbeFit), "
                        f"got {type(probe).__name__}")
    return probe


def _outputs(probe: _Probe, features, mask, batch_size: int) -> torch.Tensor:
    check_count(batch_size, "batch_size")
    features = _as_features(features)
    kind = type(probe).__name__
    _check_rank(features, probe.rank, kind)
    if features.shape[-1] != probe.in_features:
        raise ValueError(f"features have {features.shape[-1]} features but the probe takes {probe.in_features}")
    if probe.rank == 2 and mask is not None:
        raise ValueError(f"mask is for the attentive probe; {kind} takes pooled features [N, H]")
    mask = _as_mask(mask, features)
    device = probe.feature_mean.device
    pieces = []
    with _evaluating(probe), autocast_off(device):  # (in float32, as trained)
        for start in range(0, features.shape[0], batch_size):
            chunk = features[start:start + batch_size].to(device, torch.float32)
            chunk_mask = None if mask is None else mask[start:start + batch_size].to(device)
            pieces.append(probe(chunk, chunk_mask))
    return torch.cat(pieces)


def predict(probe: _Probe, features, mask=None, *, batch_size: int = 4096) -> torch.Tensor:
    """The probe's (or a ProbeFit's probe's) predictions for `features` ([N, H], or [N, T, H] and
    mask for the attentive probe), standardised as in training: class ids [N] for classification,
    values [N] (or [N, D]) for regression, in float32 also under torch.autocast (as train_probe).
    Eval mode and no gradient for the call."""
    probe = _probe_of(probe)
    outputs = _outputs(probe, features, mask, batch_size)
    if probe.task == "classification":
        return outputs.argmax(dim=-1)
    return outputs.squeeze(-1) if probe.num_outputs == 1 else outputs


def evaluate_probe(probe: _Probe, features, labels, mask=None, *, batch_size: int = 4096) -> dict:
    """{"loss", "accuracy"} (classification: cross-entropy) or {"loss", "r2"} (regression: mean
    squared error in the targets' units; r2 pooled over outputs, 1 - sum (y - f)^2 /
    sum (y - mean y)^2, NaN for constant targets) of the probe on these rows, as floats computed
    in float64 from the probe's float32 outputs (also under torch.autocast). probe may be a
    ProbeFit."""
    probe = _probe_of(probe)
    # on the CPU in float64: squares of large targets stay finite (and MPS has no float64)
    outputs = _outputs(probe, features, mask, batch_size).to("cpu", torch.float64)
    labels = _as_labels(labels, outputs.shape[0], probe.task, width=probe.num_outputs).cpu()
    labels = labels.double() if probe.task == "regression" else labels
    if probe.task == "classification" and int(labels.max()) >= probe.num_outputs:
        raise ValueError(f"labels hold class {int(labels.max())} but the probe has {probe.num_outputs} classes")
    metrics = {"loss": float(_loss(outputs, labels, probe.task))}
    if probe.task == "classification":
        metrics["accuracy"] = float((outputs.argmax(-1) == labels).double().mean())
    else:
        target = labels.reshape(outputs.shape)
        # r2 = 1 - sum (y - f)^2 / sum (y - mean y)^2
        residual = (target - outputs).pow(2).sum()
        spread = (target - target.mean(0)).pow(2).sum()
        metrics["r2"] = float(1.0 - residual / spread) if float(spread) > 0 else float("nan")
    return metrics
