"""Null-space projection: estimate the directions along which a modality (an image, a prefix, a
persona) shifts a model's hidden state, and project them out at one layer.

    with_image = [processor(images=images, text=prompts_with_image, return_tensors="pt", padding=True)]
    without_image = [processor(text=prompts, return_tensors="pt", padding=True)]
    shifts = shift_vectors(vlm, with_image, without_image, layer=8)      # [M, H], row m = pair m
    basis = bias_subspace(shifts, k=4)                                   # U [H, k], orthonormal columns
    with project_out(vlm, basis, layer=8):                               # h <- (I - U U^T) h
        ids = vlm.generate(**inputs, max_new_tokens=32)
    handle = project_out(vlm, basis, layer=8); ...; handle.remove()      # or keep it until removed

Shift vectors. Pair m is the same input with and without the modality (e.g. one prompt with and
without its image); each side is pooled at `layer` (the output of transformer block `layer`, as
in fastprobe.methods.probes, whose collector runs it) and shift_m = h_with_m - h_without_m. The
inputs are texts (with a tokenizer) or batches of model inputs (what a processor returns).

The subspace. Stack the shifts S [M, H] = A diag(s) B^T (SVD); the bias subspace is spanned by
the top-k right singular vectors U = B[:, :k] [H, k] (no centring: the common shift itself is
the bias). Computed in float64.

The projection. A forward hook on block `layer` replaces its output hidden state (every
position, prompt and generated tokens alike, so generate with a KV cache sees it on every step)
by h - (h U) U^T, in the hidden state's dtype and device, computed in float32 or wider even under
torch.autocast (U re-orthonormalised in float64 first, so a rounded one still removes its whole
span). The model's weights and U are never modified;
remove() restores the model's outputs exactly. (transformers 5 records output_hidden_states
through forward hooks on the blocks, installed on the first call that asks: this hook runs before
them, registered first, so they see the projected state. transformers 4.53 appends each block's
input in the model's own loop, after the previous block's hooks: the projected state too.
transformers 4.54-4.5x record a block's output inside its forward, before any hook: block `layer`'s
state before the projection, though every later block reads the projected one.)
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Optional

import torch

from ._batching import autocast_off
from .probes import (
    _batch_rows, _checked_batches, _hidden_of, _resolve_layer, collect_hidden_states,
    collect_hidden_states_from_batches, transformer_blocks,
)

__all__ = ["Projection", "bias_subspace", "project_out", "shift_vectors"]


# ---------------------------------------------------------------- shift vectors


def _kind_of(inputs, name: str) -> tuple:
    """("texts", inputs) for a string or strings, ("batches", inputs) for a dict of model inputs or
    dicts of them, the strings or dicts read into a list once (a generator is read once); ValueError
    otherwise."""
    if isinstance(inputs, str) or isinstance(inputs, Mapping):
        return "texts" if isinstance(inputs, str) else "batches", inputs
    try:
        items = list(inputs)
    except TypeError:
        raise ValueError(f"{name} must be texts or batches of model inputs, got {type(inputs).__name__}") from None
    if not items:
        raise ValueError(f"{name} is empty")
    if all(isinstance(item, str) for item in items):
        return "texts", items
    if all(isinstance(item, Mapping) for item in items):
        return "batches", items
    kinds = {type(item).__name__ for item in items if not isinstance(item, (str, Mapping))}
    if kinds:
        raise ValueError(f"{name} must be texts or batches (dicts of model inputs such as {{'input_ids': ..., "
                         f"'attention_mask': ...}}), got an element of type {sorted(kinds)[0]}")
    raise ValueError(f"{name} must be all texts or all batches (dicts of model inputs), not a mix")


def _rows_of(inputs, kind: str) -> int:
    if kind == "texts":
        return 1 if isinstance(inputs, str) else len(inputs)
    return sum(_batch_rows(batch) for batch in _checked_batches(inputs))


def _pooled(model, inputs, kind: str, layer: int, tokenizer, pool: str, batch_size: int, max_length: int,
            progress: bool) -> torch.Tensor:
    if kind == "texts":
        states = collect_hidden_states(model, tokenizer, inputs, layers=[layer], pool=pool, batch_size=batch_size,
                                       max_length=max_length, progress=progress)
    else:
        states = collect_hidden_states_from_batches(model, inputs, layers=[layer], pool=pool, progress=progress)
    return states[layer]


def shift_vectors(
    model,
    with_modality,
    without_modality,
    *,
    layer: int,
    tokenizer=None,
    pool: str = "last",
    batch_size: int = 8,
    max_length: Optional[int] = None,
    progress: bool = True,
) -> torch.Tensor:
    """[M, H] float32 on the CPU: row m = h(with_modality[m]) - h(without_modality[m]), each the
    hidden state at `layer` (block output; negative from the end) pooled by `pool` ("last": the
    last real token, "mean": over real tokens).

    with_modality / without_modality: M paired inputs each, as texts (tokenizer needed; batched by
    batch_size, truncated to max_length; None: the checkpoint's context) or as batches of model
    inputs (a dict or a list of dicts, e.g. a processor's output with and without pixel values),
    rows in pair order. The two sides may be of different kinds. ValueError when they hold
    different numbers of rows. The model runs as called: under torch.autocast its states carry
    autocast's rounding, and a shift, the difference of two of them, carries it relative to the
    (smaller) shift."""
    if pool not in ("last", "mean"):
        raise ValueError(f"pool must be 'last' or 'mean' (a shift is one vector per input), got {pool!r}")
    _resolve_layer(layer, len(transformer_blocks(model)))
    with_kind, with_modality = _kind_of(with_modality, "with_modality")
    without_kind, without_modality = _kind_of(without_modality, "without_modality")
    kinds = with_kind, without_kind
    if "texts" in kinds and tokenizer is None:
        raise ValueError("texts need a tokenizer: pass tokenizer=")
    rows = [_rows_of(inputs, kind) for inputs, kind in zip((with_modality, without_modality), kinds)]
    if rows[0] != rows[1]:
        raise ValueError(f"with_modality holds {rows[0]} inputs but without_modality {rows[1]}: they must be pairs")
    options = dict(layer=layer, tokenizer=tokenizer, pool=pool, batch_size=batch_size, max_length=max_length,
                   progress=progress)
    with_states = _pooled(model, with_modality, kinds[0], **options)
    without_states = _pooled(model, without_modality, kinds[1], **options)
    return with_states - without_states  # shift = with - without


# ---------------------------------------------------------------- the subspace


def bias_subspace(shifts: torch.Tensor, k: int) -> torch.Tensor:
    """U [H, k] float32 (on the shifts' device): the top-k right singular vectors of the stacked
    shift vectors [M, H] (any floating dtype; the SVD runs in float64 on the CPU), orthonormal
    columns, ordered by singular value, each column's sign fixed so its largest entry is
    positive. k must be in 1..min(M, H); shifts of rank below k (singular values at their
    dtype's rounding level count as 0) raise ValueError."""
    if not isinstance(shifts, torch.Tensor) or not shifts.is_floating_point():
        raise ValueError(f"shifts must be a floating tensor [M, H], got {getattr(shifts, 'dtype', type(shifts))}")
    if shifts.dim() != 2 or shifts.numel() == 0:
        raise ValueError(f"shifts must be a non-empty [M, H] tensor (one shift vector a row), got {tuple(shifts.shape)}")
    rows, width = shifts.shape
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= min(rows, width):
        raise ValueError(f"k must be an integer in 1..min(M, H) = 1..{min(rows, width)} for shifts of shape "
                         f"{tuple(shifts.shape)}, got {k!r}")
    stacked = shifts.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(stacked).all()):
        raise ValueError("shifts hold NaN or infinite values")
    _, singular, right = torch.linalg.svd(stacked, full_matrices=False)  # S = A diag(s) B^T, right = B^T
    # a direction whose singular value is at the input dtype's rounding level (relative to the
    # largest) is noise: float32 shifts that are multiples of one vector leave ~1e-8 s_0
    noise = max(torch.finfo(shifts.dtype).eps, 1e-12) * max(float(singular[0]), 1e-300)
    if float(singular[k - 1]) <= noise:
        raise ValueError(f"the shifts span fewer than k = {k} directions (singular values {singular[:k].tolist()}): "
                         "choose a smaller k")
    basis = right[:k].T.contiguous()  # [H, k]
    largest = basis.gather(0, basis.abs().argmax(0, keepdim=True))
    basis = basis * torch.sign(largest)  # singular vectors have arbitrary signs: fix them
    return basis.to(shifts.device, torch.float32)


# ---------------------------------------------------------------- the projection


def _hidden_size(model) -> Optional[int]:
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text, "hidden_size", None)
    return size if isinstance(size, int) else None


def _checked_basis(basis, hidden_size: Optional[int]) -> torch.Tensor:
    """An orthonormal float64 CPU basis [H, k] of the span of `basis` (a vector [H] is one
    direction), which must have orthonormal columns up to its dtype's rounding."""
    if not isinstance(basis, torch.Tensor) or not basis.is_floating_point():
        raise ValueError(f"basis must be a floating tensor [H, k] (bias_subspace's U), got "
                         f"{getattr(basis, 'dtype', type(basis))}")
    if basis.dim() not in (1, 2) or basis.numel() == 0:
        raise ValueError(f"basis must be [H, k] or one direction [H], got shape {tuple(basis.shape)}")
    copy = basis.detach().to("cpu", torch.float64).reshape(basis.shape[0], -1)
    if hidden_size is not None and copy.shape[0] != hidden_size:
        raise ValueError(f"basis has {copy.shape[0]} rows but the model's hidden size is {hidden_size}")
    if not bool(torch.isfinite(copy).all()):
        raise ValueError("basis holds NaN or infinite values")
    gram = copy.T @ copy  # U^T U = I for orthonormal columns
    tolerance = 1e-2 if basis.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if float((gram - torch.eye(copy.shape[1], dtype=torch.float64)).abs().max()) > tolerance:
        raise ValueError("basis must have orthonormal columns (U^T U = I), as bias_subspace returns: "
                         "a projection needs them")
    # re-orthonormalise: a rounded U (bfloat16) makes I - U U^T miss its own span by ~1e-3;
    # U = Q R with diag(R) > 0 gives Q ~ U column by column and I - Q Q^T the exact projection
    q, r = torch.linalg.qr(copy)
    return q * torch.sign(torch.diagonal(r))


class Projection:
    """The hook project_out registered: h <- h - (h U) U^T on block `layer`'s output. .remove()
    takes it off (idempotent); as a context manager it is removed on exit."""

    def __init__(self, model, basis: torch.Tensor, layer: int):
        self.model, self.layer = model, layer
        self.basis = basis  # orthonormal float64 CPU copy [H, k]
        self._converted: dict = {}  # (device, dtype) -> basis there
        # (prepend: before the hooks through which transformers 5 records output_hidden_states)
        self._handle = transformer_blocks(model)[layer].register_forward_hook(self._hook, prepend=True)

    @property
    def active(self) -> bool:
        """Whether the hook is still on the model (False after remove())."""
        return self._handle is not None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """h - (h U) U^T, computed in float32 or wider (under torch.autocast too, whose bfloat16
        matrix products would leave ~1e-3 of the span in), returned in h's dtype and device."""
        if hidden.shape[-1] != self.basis.shape[0]:
            raise ValueError(f"block {self.layer}'s hidden state has {hidden.shape[-1]} features but the basis "
                             f"{self.basis.shape[0]} rows")
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        key = (hidden.device, dtype)
        if key not in self._converted:
            self._converted[key] = self.basis.to(hidden.device, dtype)
        basis, work = self._converted[key], hidden.to(dtype)
        with autocast_off(hidden.device):
            return (work - (work @ basis) @ basis.T).to(hidden.dtype)

    def _hook(self, module, args, output):
        projected = self.project(_hidden_of(output))
        if isinstance(output, torch.Tensor):
            return projected
        if isinstance(output, (tuple, list)):
            return type(output)((projected, *output[1:]))
        raise TypeError(f"block {self.layer} returns {type(output).__name__}; project_out handles a tensor or a tuple")

    def remove(self) -> None:
        """Takes the hook off the model (again: nothing)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "Projection":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Projection(layer={self.layer}, k={self.basis.shape[1]}, active={self.active})"


def project_out(model, basis: torch.Tensor, *, layer: int) -> Projection:
    """Projects the subspace spanned by `basis` (U [H, k] with orthonormal columns, e.g.
    bias_subspace's; or one unit vector [H]) out of the hidden state after transformer block
    `layer` (negative from the end): h <- (I - U U^T) h at every position, in every forward and
    generate call until the returned Projection is removed (.remove(), or use it in a with
    block). Checks the layer and the basis (width = the model's hidden size, orthonormal
    columns, up to their dtype's rounding) before touching the model. U is copied, never
    modified, and the copy made exactly orthonormal in float64 (Q of U = Q R), so a rounded U
    (bfloat16) still has its whole span removed."""
    if "_orig_mod" in model._modules or getattr(model, "_compiled_call_impl", None) is not None:
        raise RuntimeError("project_out on a model compiled by torch.compile: a hook added after compiling is "
                           "not seen by the compiled forward, which would run unprojected; call project_out "
                           "before compiling (the compiled forward then includes it)")
    blocks = transformer_blocks(model)
    resolved = _resolve_layer(layer, len(blocks))
    return Projection(model, _checked_basis(basis, _hidden_size(model)), resolved)
