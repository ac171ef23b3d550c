"""concept_mass: the probability of answer concepts, each a set of variant token ids.

With y = logits / T, p = softmax(y), lse = log sum_v exp(y_v) and, per concept c,
lse_c = log sum_{v in c} exp(y_v):
  mass[n, c]                  = sum_{v in c} p_v          = exp(log_mass)
  log_mass[n, c]              = lse_c - lse                (stable; differentiable)
  top_share[n, c]             = max_{v in c} p_v / mass    = exp(max_{v in c} y_v - lse_c)
  concentration_entropy[n, c] = -sum_{v in c} q_v log q_v, q_v = p_v / mass = exp(y_v - lse_c)
  top_token[n, c]             = the variant with the largest p_v
The fused kernels take one streaming pass over each row for lse and gather the variants'
logits; nothing of size [N, V] is allocated in the forward.

Gradient (log_mass, mass = exp(log_mass) and lse are differentiable):
  d log_mass[n, c] / d z[n, v] = ([v in c] q_v - p_v) / T,   d lse[n] / d z[n, v] = p_v / T
so with g the incoming gradient of log_mass (plus mass * the gradient of mass) and h that of lse:
  grad_z[n, v] = (p_v (h - sum_c g[n, c]) + sum_{c contains v} g[n, c] q_cv) / T
The fused backwards form log p_v = (z_v - M) / T - ln S from the forward's row_state (each row's
largest logit M and ln S, S = sum_v exp((z_v - M) / T), kept apart): the float64 lse = M / T + ln S
holds ln S only to |M / T| 2^-53, which lost ln 2 for a tied max at |M / T| = 1e17 (T = 1e-16 with
logits ~10).
The backward writes the first term for every v in one pass, then overwrites each concept
token once with its total (overlapping concepts accumulate exactly, without atomics),
reading the concept-token incidence by column (the ConceptSet's vocabulary-sorted transpose).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from .. import reference
from ..backend import get_backend, resolve, use_backend
from ._common import (
    DTYPE_NAMES,
    INT64_MAX,
    batched_gradient,
    check_finite_lse,
    check_op_inv_temperature,
    check_op_logits,
    check_op_tensors,
    check_temperature,
    check_tensor,
    cpp,
    custom_op,
    lse_parts,
    nan_where_not_finite,
    new_output,
    no_second_derivative,
    on_device,
    output_dtype,
    register_refusing_backward,
    skips_host_checks,
    without_autocast,
)

__all__ = ["ConceptMass", "ConceptSet", "Variant", "answer_variants", "concept_mass"]


# ---------------------------------------------------------------- ConceptSet


class Variant(NamedTuple):
    """One surface form of an answer and the token ids the tokenizer gives it."""

    text: str
    token_ids: tuple[int, ...]

    @property
    def single_token(self) -> bool:
        return len(self.token_ids) == 1


# The vocabulary is cut into blocks of this many ids for the kernels that stream it and
# pick out the concept ids as they pass (id_block_starts below).
ID_BLOCK = 256
MAX_TOKEN_ID = 2**31  # ids are below it: the id index then takes at most 32 MiB


class _Index(NamedTuple):
    """The concept-token incidence in the two orders the kernels read it.

    By concept (CSR): concept c owns token_ids[offsets[c]:offsets[c + 1]].
    By vocabulary id (its transpose): vocab_ids holds the U distinct ids in increasing order;
    id vocab_ids[u] has the memberships j in [vocab_offsets[u], vocab_offsets[u + 1]), each a
    variant of concept vocab_concepts[j]; token_slots[t] is the slot u of token_ids[t]
    (vocab_ids[token_slots[t]] == token_ids[t]). All int64, except id_block_starts (int32):
    the first u with vocab_ids[u] >= k * ID_BLOCK, for k = 0 .. ceil((max id + 1) / ID_BLOCK)
    (the last entry is U)."""

    token_ids: torch.Tensor  # [T]
    offsets: torch.Tensor  # [C + 1]
    vocab_ids: torch.Tensor  # [U]
    vocab_offsets: torch.Tensor  # [U + 1]
    vocab_concepts: torch.Tensor  # [T]
    token_slots: torch.Tensor  # [T]
    id_block_starts: torch.Tensor  # [ceil((max id + 1) / ID_BLOCK) + 1] int32


def _index_array(value, name: str) -> np.ndarray:
    """A 1-D integer array (from a tensor, array or sequence), or a TypeError/ValueError naming `name`."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name} must hold integers (int32 or int64), got {value.dtype}")
        if value.is_meta:  # (no values to read: the set's index is built from them)
            raise ValueError(f"{name} is a meta tensor (no data); a ConceptSet needs the ids themselves")
        array = value.detach().cpu().numpy()
    else:
        array = np.asarray(value)
        if array.size == 0:
            array = array.astype(np.int64)
        if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got {array.dtype} values")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    if array.dtype.kind == "u" and array.size and int(array.max()) > INT64_MAX:  # (as int64 it wrapped negative)
        raise ValueError(f"{name} must hold values below 2**63 (int64), got {int(array.max())}")
    return array.astype(np.int64)


def _transpose(token_ids: np.ndarray, concept_of: np.ndarray) -> tuple[np.ndarray, ...]:
    """(vocab_ids, vocab_offsets, vocab_concepts, token_slots, id_block_starts): see _Index."""
    order = np.argsort(token_ids, kind="stable")  # memberships by id
    vocab_ids, counts = np.unique(token_ids[order], return_counts=True)
    vocab_offsets = np.concatenate([[0], np.cumsum(counts)])
    token_slots = np.empty_like(order)
    token_slots[order] = np.repeat(np.arange(vocab_ids.size), counts)  # membership j is token order[j]
    num_blocks = -(-(int(vocab_ids[-1]) + 1) // ID_BLOCK)
    id_block_starts = np.searchsorted(vocab_ids, np.arange(num_blocks + 1) * ID_BLOCK).astype(np.int32)
    return vocab_ids, vocab_offsets, concept_of[order], token_slots, id_block_starts


class ConceptSet:
    """Concepts, each a set of variant token ids, in CSR form.

    Concept c owns ``token_ids[offsets[c]:offsets[c + 1]]``. Checked on construction: ids
    are integers >= 0, offsets are integers going from 0 to len(token_ids) without
    decreasing, no concept is empty, names (optional) has one string per concept.
    Duplicate ids within a concept are removed (the first occurrence is kept, so the order
    of variants, which breaks ties for ``top_token``, is preserved); concepts may overlap.
    Ids at or above the vocabulary size are rejected when the set meets logits.

    The tensors live on one device (that of ``token_ids``); ``concept_mass`` needs them on
    the logits' device: ``concepts.to(logits.device)``.

    Build one from lists with ``ConceptSet.from_ids`` or from answer strings and a tokenizer
    with ``ConceptSet.from_answers``; the latter also records every variant (``variants``)
    and the multi-token ones (``multi_token``, ``multi_token_prefixes``).
    """

    def __init__(self, token_ids, offsets, names: Optional[Sequence[str]] = None):
        device = token_ids.device if isinstance(token_ids, torch.Tensor) else torch.device("cpu")
        if isinstance(offsets, torch.Tensor) and offsets.device != device:
            raise ValueError(f"offsets is on {offsets.device} but token_ids is on {device}")
        ids = _index_array(token_ids, "token_ids")
        offs = _index_array(offsets, "offsets")
        if offs.size < 2:
            raise ValueError(f"offsets must have C + 1 >= 2 entries (at least one concept), got {offs.size}")
        if offs[0] != 0 or offs[-1] != ids.size:
            raise ValueError(
                f"offsets must start at 0 and end at len(token_ids) = {ids.size}, got {offs[0]} ... {offs[-1]}"
            )
        lengths = np.diff(offs)
        if (lengths < 0).any():
            c = int(np.flatnonzero(lengths < 0)[0])
            raise ValueError(f"offsets must be non-decreasing, but offsets[{c + 1}] < offsets[{c}]")
        self.names = None if names is None else self._check_names(names, lengths.size)
        if (lengths == 0).any():
            c = int(np.flatnonzero(lengths == 0)[0])
            raise ValueError(f"concept {self._label(c)} is empty: every concept needs at least one token id")
        concept_of = np.repeat(np.arange(lengths.size), lengths)
        if (ids < 0).any():
            t = int(np.flatnonzero(ids < 0)[0])
            raise ValueError(f"token_ids must be >= 0, got {ids[t]} in concept {self._label(int(concept_of[t]))}")
        if (ids >= MAX_TOKEN_ID).any():  # (the id index's size grows with the largest id)
            t = int(np.flatnonzero(ids >= MAX_TOKEN_ID)[0])
            raise ValueError(f"token_ids must be < 2**31 (a vocabulary's ids), got {ids[t]} in concept "
                             f"{self._label(int(concept_of[t]))}")

        # drop repeated ids within a concept, keeping first occurrences in order
        _, first = np.unique(np.stack([concept_of, ids]), axis=1, return_index=True)
        keep = np.sort(first)
        ids, concept_of = ids[keep], concept_of[keep]
        offs = np.concatenate([[0], np.cumsum(np.bincount(concept_of, minlength=lengths.size))])

        self.max_id = int(ids.max())  # a Python int, so the vocabulary check needs no host sync
        arrays = (ids, offs, *_transpose(ids, concept_of))
        with torch.inference_mode(False):  # (normal tensors: concept_mass saves them for a backward)
            self._index = _Index(*(torch.from_numpy(a).to(device) for a in arrays))
        self.variants: Optional[tuple[tuple[Variant, ...], ...]] = None
        self.multi_token: Optional[tuple[tuple[tuple[int, ...], ...], ...]] = None
        self.multi_token_prefixes: Optional[tuple[tuple[int, ...], ...]] = None

    @staticmethod
    def _check_names(names, num_concepts: int) -> tuple[str, ...]:
        if isinstance(names, str) or not all(isinstance(name, str) for name in names):
            raise TypeError("names must be a sequence of strings, one per concept")
        names = tuple(names)
        if len(names) != num_concepts:
            raise ValueError(f"names has {len(names)} entries but there are {num_concepts} concepts")
        return names

    def _label(self, c: int) -> str:
        return f"{c} ({self.names[c]!r})" if self.names is not None else str(c)

    # -- construction helpers

    @classmethod
    def from_ids(cls, concepts: Union[Mapping[str, Sequence[int]], Sequence[Sequence[int]]]) -> "ConceptSet":
        """From one list of token ids per concept: ``{"Paris": [12, 40], ...}`` or ``[[12, 40], ...]``
        (one concept is ``[[12, 40]]``: a flat list of ids is refused, not read as one concept
        per id)."""
        if isinstance(concepts, (str, bytes)) or not isinstance(concepts, Iterable):
            raise TypeError("concepts must be a mapping {name: token ids} or a list of token-id lists, got "
                            f"{type(concepts).__name__}")
        names = list(concepts.keys()) if isinstance(concepts, Mapping) else None
        lists = list(concepts.values()) if isinstance(concepts, Mapping) else list(concepts)
        for c, ids in enumerate(lists):
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable) or getattr(ids, "ndim", 1) == 0:
                where = f"concepts[{names[c]!r}]" if names is not None else f"concepts[{c}]"
                raise TypeError(f"{where} must be a list of token ids (one list per concept), got {ids!r}; "
                                "one concept of ids 12 and 40 is [[12, 40]]")
        return cls(*_csr(lists), names)

    @classmethod
    def from_answers(
        cls,
        tokenizer,
        answers: Union[Mapping[str, Union[str, Sequence[str]]], Sequence[str]],
        variants: Union[Iterable[str], Callable[[str], Iterable[str]]] = ("space", "lower", "title", "upper"),
    ) -> "ConceptSet":
        """Concepts from answer strings: ``{"Paris": ["Paris", "paris"], ...}`` (or a list of
        answers, each its own concept), with the surface variants a model may produce.

        tokenizer: a transformers tokenizer or a tokenizers.Tokenizer (anything with ``encode``).
        answers: a mapping {name: alias string or list of alias strings}, or a list of answer
        strings (not one string).
        variants: which forms of each alias to add (a collection of names; one name alone,
        ``variants="space"``, is taken as ``("space",)``), or a callable
        ``alias -> iterable of surface strings``:
          "lower", "title", "upper"  the alias lower-cased, Title-cased (str.title), UPPER-cased,
                                     besides the alias as given;
          "space"                    each case form with and without a leading space (the
                                     form a word takes after another word in byte-level BPE);
                                     without it the alias keeps its own leading whitespace.
        Every surface form is encoded on its own with ``tokenizer.encode(text,
        add_special_tokens=False)`` (any transformers tokenizer, or a tokenizers.Tokenizer),
        so the tokenizer's own normalisation applies: forms it maps to the same tokens (an
        uncased WordPiece lower-cases, strips accents and ignores the leading space) are one
        variant. Forms that contain the tokenizer's unknown token are dropped (they would
        score the unknown token, not the answer).

        The CSR holds each concept's single-token variants, the form the fused op scores.
        Recorded beside it, per concept: ``variants`` (every distinct Variant(text,
        token_ids)), ``multi_token`` (the token sequences of multi-token variants, to be
        scored by teacher forcing) and ``multi_token_prefixes`` (their distinct first tokens,
        kept apart: never mixed into the single-token mass). A concept with no single-token
        variant raises ValueError (the fused op has nothing to score for it).
        """
        if isinstance(tokenizer, str) or not callable(getattr(tokenizer, "encode", None)):
            raise TypeError("tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer (with an encode "
                            f"method), got {type(tokenizer).__name__}")
        variants = _variant_forms(variants)  # (checked once, before any concept)
        if isinstance(answers, Mapping):
            for name, aliases in answers.items():
                if not isinstance(aliases, Iterable):
                    raise TypeError(f"answers[{name!r}] must be an alias string or a list of alias strings, got "
                                    f"{type(aliases).__name__}")
            items = [(name, [aliases] if isinstance(aliases, str) else list(aliases)) for name, aliases in answers.items()]
        elif isinstance(answers, str) or not isinstance(answers, Iterable):
            raise TypeError("answers must be a mapping {name: aliases} or a list of answer strings, got "
                            + ("one string" if isinstance(answers, str) else type(answers).__name__))
        else:
            items = [(answer, [answer]) for answer in answers]
        if not items:
            raise ValueError("answers is empty: need at least one concept")
        per_concept = [answer_variants(tokenizer, aliases, variants, name=name) for name, aliases in items]

        names = [name for name, _ in items]
        singles = [[v.token_ids[0] for v in found if v.single_token] for found in per_concept]
        missing = [f"{name!r} ({', '.join(repr(v.text) for v in found[:4]) or 'no tokens'})"
                   for name, found, ids in zip(names, per_concept, singles) if not ids]
        if missing:
            raise ValueError(
                "no single-token variant under this tokenizer for " + "; ".join(missing) +
                ": the fused op scores single-token variants; score multi-token answers by teacher forcing"
            )
        concepts = cls(*_csr(singles), names)
        concepts.variants = tuple(per_concept)
        concepts.multi_token = tuple(tuple(v.token_ids for v in found if not v.single_token) for found in per_concept)
        concepts.multi_token_prefixes = tuple(tuple(_unique(seq[0] for seq in multi)) for multi in concepts.multi_token)
        return concepts

    # -- accessors

    # The properties give copies: the index was checked once, on construction, and the results rest on
    # it (an id written in place past the vocabulary would go unnoticed: the C++ kernels would refuse it,
    # the Triton kernels skip it and give wrong statistics).

    @property
    def token_ids(self) -> torch.Tensor:
        """[T] int64 variant ids, concept after concept (a copy)."""
        return self._index.token_ids.clone()

    @property
    def offsets(self) -> torch.Tensor:
        """[C + 1] int64: concept c owns token_ids[offsets[c]:offsets[c + 1]] (a copy)."""
        return self._index.offsets.clone()

    @property
    def device(self) -> torch.device:
        """The device of the set's tensors (that of token_ids)."""
        return self._index.token_ids.device

    def __len__(self) -> int:
        return self._index.offsets.numel() - 1

    def variant_ids(self, c: int) -> list[int]:
        """The variant ids of concept c."""
        offsets = self._index.offsets
        return self._index.token_ids[int(offsets[c]) : int(offsets[c + 1])].tolist()

    def to(self, device) -> "ConceptSet":
        """The same concepts with their tensors on `device` (self if already there)."""
        device = torch.device(device)
        if device == self.device:
            return self
        moved = object.__new__(ConceptSet)
        moved.__dict__.update(self.__dict__)
        with torch.inference_mode(False):  # (as in __init__)
            moved._index = _Index(*(t.to(device) for t in self._index))
        return moved

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:3]) + (", ..." if len(self) > 3 else "") if self.names else ""
        return (f"ConceptSet({len(self)} concepts, {self._index.token_ids.numel()} token ids"
                f"{': ' + shown if shown else ''}; device={self.device})")


def answer_variants(
    tokenizer,
    aliases: Union[str, Sequence[str]],
    variants: Union[Iterable[str], Callable[[str], Iterable[str]]] = ("space", "lower", "title", "upper"),
    *,
    name: Optional[str] = None,
) -> tuple[Variant, ...]:
    """The distinct Variant(text, token_ids) of one answer's aliases under `tokenizer`, in
    first-seen order: what ConceptSet.from_answers records per concept (see there for
    `variants`), single- and multi-token alike. name: the answer, for error messages."""
    aliases = [aliases] if isinstance(aliases, str) else list(aliases)
    if not all(isinstance(alias, str) for alias in aliases) or not any(alias.strip() for alias in aliases):
        what = "an answer" if name is None else f"answer {name!r}"
        raise ValueError(f"{what} needs a non-empty list of alias strings (not all blank), got {aliases!r}")
    forms = _variant_forms(variants)
    unknown = _unknown_id(tokenizer)
    found: dict[tuple[int, ...], Variant] = {}
    # (a blank alias, or a blank form of one, would score the whitespace token, not an answer)
    texts = (text for alias in aliases if alias.strip() for text in forms(alias) if text.strip())
    anchor = _plain_ids(tokenizer, _ANCHOR)
    for text in _unique(texts):
        token_ids = _encode(tokenizer, text, anchor)
        if token_ids and token_ids not in found and unknown not in token_ids:
            found[token_ids] = Variant(text, token_ids)
    return tuple(found.values())


_CASE_FORMS = {"lower": str.lower, "title": str.title, "upper": str.upper}
_VARIANT_NAMES = frozenset(_CASE_FORMS) | {"space"}


def _variant_forms(variants) -> Callable[[str], Iterable[str]]:
    """alias -> its surface forms: a callable as given, or the named forms (a collection of names,
    or one name: "space" is ("space",), not its letters); else a TypeError naming variants."""
    if callable(variants):
        return variants
    if isinstance(variants, str):
        variants = (variants,)
    elif not isinstance(variants, Iterable):
        raise TypeError("variants must be a collection of form names (e.g. ('space', 'lower')) or a callable "
                        f"alias -> surface strings, got {type(variants).__name__}")
    return _surface_forms(frozenset(variants))


def _surface_forms(variants: frozenset) -> Callable[[str], list[str]]:
    unknown = variants - _VARIANT_NAMES
    if unknown:
        raise ValueError(f"variants must name forms among {sorted(_VARIANT_NAMES)}, got {sorted(unknown)}")

    def forms(alias: str) -> list[str]:
        body = alias.strip()
        cases = [body] + [_CASE_FORMS[name](body) for name in ("lower", "title", "upper") if name in variants]
        prefixes = ("", " ") if "space" in variants else (alias[: len(alias) - len(alias.lstrip())],)
        return [prefix + case for case in cases for prefix in prefixes]

    return forms


def _csr(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids, offsets) of one list of ids per concept."""
    lists = [np.asarray(ids) if len(ids) else np.zeros(0, np.int64) for ids in lists]
    offsets = np.concatenate([[0], np.cumsum([ids.size for ids in lists], dtype=np.int64)])
    return (np.concatenate(lists) if lists else np.zeros(0, np.int64)), offsets


def _unique(items: Iterable) -> list:
    """Distinct items in first-seen order."""
    return list(dict.fromkeys(items))


def _unknown_id(tokenizer) -> Optional[int]:
    """The unknown token's id: a transformers tokenizer's unk_token_id, else the unk_token of its
    backend's model or of a tokenizers.Tokenizer's model (a fast tokenizer whose config names no
    unk_token still maps unknown characters to its WordPiece model's; None when none has one)."""
    if getattr(tokenizer, "unk_token_id", None) is not None:
        return tokenizer.unk_token_id
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # (a tokenizers.Tokenizer is its own)
    token = getattr(getattr(backend, "model", None), "unk_token", None)
    return backend.token_to_id(token) if token and hasattr(backend, "token_to_id") else None


_ANCHOR = "\n"  # a form is encoded after it, as a continuation (see _encode)


def _plain_ids(tokenizer, text: str) -> tuple[int, ...]:
    encoded = tokenizer.encode(text, add_special_tokens=False)
    return tuple(int(i) for i in getattr(encoded, "ids", encoded))  # tokenizers.Encoding has .ids


def _encode(tokenizer, text: str, anchor: tuple[int, ...]) -> tuple[int, ...]:
    """text's tokens as a continuation of earlier text: encoded after a newline (whose tokens are
    `anchor`), those dropped. Alone at the start, a SentencePiece-style tokenizer (Metaspace,
    add_prefix_space) gives "Paris" its word-start token, the one of " Paris": the no-space form's
    own token was never found. Where the newline's tokens are not a prefix (merged with the text),
    as is."""
    after = _plain_ids(tokenizer, _ANCHOR + text)
    return after[len(anchor):] if after[:len(anchor)] == anchor else _plain_ids(tokenizer, text)


# ---------------------------------------------------------------- the op


class ConceptMass(NamedTuple):
    """Per-row concept statistics (float32; float64 for float64 logits; top_token int64).

    mass, log_mass and lse are differentiable with respect to the logits; top_share,
    concentration_entropy and top_token are not."""

    mass: torch.Tensor  # [N, C]
    log_mass: torch.Tensor  # [N, C]
    top_share: torch.Tensor  # [N, C]
    concentration_entropy: torch.Tensor  # [N, C]
    top_token: torch.Tensor  # [N, C] int64
    lse: torch.Tensor  # [N]


@without_autocast
def _reference_forward(logits, index: _Index, inv_temperature, out: ConceptMass, row_state) -> None:
    result = reference.concept_mass(logits, index.token_ids, index.offsets, temperature=1.0 / inv_temperature)
    for field, tensor in zip(ConceptMass._fields, out):
        tensor.copy_(result[field])
    row_state.copy_(lse_parts(logits.double(), inv_temperature))  # M and ln S


def _cpp_forward(logits, index: _Index, inv_temperature, out: ConceptMass, row_state) -> None:
    num_tokens, vocab = logits.shape
    cpp().concept_mass(
        DTYPE_NAMES[logits.dtype],
        logits.data_ptr(), num_tokens, vocab, *logits.stride(),
        index.token_ids.data_ptr(), index.token_ids.numel(),
        index.offsets.data_ptr(), index.offsets.numel() - 1,
        inv_temperature,
        *(tensor.data_ptr() for tensor in out),
        row_state.data_ptr(),
        torch.get_num_threads(),
    )


def _triton_forward(logits, index: _Index, inv_temperature, out: ConceptMass, row_state) -> None:
    from ..kernels import concepts as triton_concepts

    with on_device(logits):
        triton_concepts.concept_mass(logits, index, ID_BLOCK, inv_temperature, out, row_state)


_FORWARD = {"reference": _reference_forward, "cpp": _cpp_forward, "triton": _triton_forward}


def _check_op_args(op: str, logits, specs, vocab_ids, vocab_offsets, vocab_concepts, memberships: int,
                   id_block_starts, inv_temperature: float) -> None:
    """What the kernels read through raw pointers, checked in the ops: they are reachable directly
    (torch.ops.fastprobe.concept_mass, concept_mass_backward), past concept_mass's checks.
    logits [N, V] floating-point with V >= 1; specs (check_op_tensors) and the transpose's tensors: 1-D,
    contiguous, int64 (vocab_concepts of `memberships` entries), id_block_starts int32 with at
    least one entry. The values are not checked here (that would be a host sync per call): the
    C++ kernels check them before any row, and the Triton kernels keep every address formed
    from one inside its buffer (a hostile index gives unspecified statistics there, never an
    access outside a buffer; see kernels/concepts.py)."""
    check_op_logits(op, "logits", logits, "[N, V]")
    if id_block_starts.numel() == 0:
        raise ValueError(f"{op}: id_block_starts must have at least 1 entry, got 0")
    check_op_tensors(op, logits.device, (
        *specs,
        ("vocab_ids", vocab_ids, (vocab_ids.numel(),), torch.int64, True),
        ("vocab_offsets", vocab_offsets, (vocab_ids.numel() + 1,), torch.int64, True),
        ("vocab_concepts", vocab_concepts, (memberships,), torch.int64, True),
        ("id_block_starts", id_block_starts, (id_block_starts.numel(),), torch.int32, True),
    ))
    check_op_inv_temperature(op, inv_temperature)


@custom_op("fastprobe::concept_mass")
def _concept_mass_op(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    offsets: torch.Tensor,
    vocab_ids: torch.Tensor,
    vocab_offsets: torch.Tensor,
    vocab_concepts: torch.Tensor,
    token_slots: torch.Tensor,
    id_block_starts: torch.Tensor,
    inv_temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mass, log_mass, top_share, concentration_entropy, top_token, lse, row_state) for the
    concepts given by an _Index (the transpose is read by the Triton forward and by the backward).
    row_state [2, N] (the statistics' dtype) holds each row's largest logit M and ln S, S = sum_v
    exp((z_v - M) / T), for the backward: lse = M / T + ln S in float64 holds ln S only to
    |M / T| 2^-53."""
    if offsets.numel() < 2:
        raise ValueError(f"concept_mass: offsets must have C + 1 >= 2 entries, got {offsets.numel()}")
    num_ids = token_ids.numel()  # T, and the memberships in vocab_concepts: one per concept token
    specs = (("token_ids", token_ids, (num_ids,), torch.int64, True),
             ("offsets", offsets, (offsets.numel(),), torch.int64, True),
             ("token_slots", token_slots, (num_ids,), torch.int64, True))
    _check_op_args("concept_mass", logits, specs, vocab_ids, vocab_offsets, vocab_concepts, num_ids, id_block_starts,
                   inv_temperature)
    index = _Index(token_ids, offsets, vocab_ids, vocab_offsets, vocab_concepts, token_slots, id_block_starts)
    num_tokens, num_concepts = logits.shape[0], offsets.numel() - 1
    dtype = output_dtype(logits)
    stats = [new_output((num_tokens, num_concepts), logits.device, dtype) for _ in range(4)]
    top_token = new_output((num_tokens, num_concepts), logits.device, torch.int64)
    # lse in float64 (for every input dtype): M / T is exact in it at any magnitude
    out = ConceptMass(*stats, top_token, new_output((num_tokens,), logits.device, torch.float64))
    row_state = new_output((2, num_tokens), logits.device, dtype)
    if num_tokens > 0:
        backend = resolve(logits.device, logits.dtype, "concept_mass")
        _FORWARD[backend](logits, index, inv_temperature, out, row_state)
    return (*out, row_state)


@_concept_mass_op.register_fake
def _(logits, token_ids, offsets, vocab_ids, vocab_offsets, vocab_concepts, token_slots, id_block_starts,
      inv_temperature):
    num_tokens, num_concepts = logits.shape[0], offsets.shape[0] - 1
    dtype = output_dtype(logits)
    stats = [logits.new_empty((num_tokens, num_concepts), dtype=dtype) for _ in range(4)]
    top_token = logits.new_empty((num_tokens, num_concepts), dtype=torch.int64)
    row_state = logits.new_empty((2, num_tokens), dtype=dtype)
    return (*stats, top_token, logits.new_empty((num_tokens,), dtype=torch.float64), row_state)


# -- backward: grad_z = (p (h - sum_c g_c) + sum_{c contains v} g_c q_cv) / T


@without_autocast
def _reference_backward(logits, index: _Index, top_share, top_token, row_state, grad_concept, coef, inv_temperature,
                        grad):
    y = logits.double() * inv_temperature
    # p_v (h - sum_c g_c); p by softmax, which subtracts the row's max from y first: exp(y - lse)
    # loses p wherever y ~ lse is large (T = 1e-30: y ~ 1e30, whose ulp is ~1e14)
    base = torch.softmax(y, dim=-1) * coef[:, None]
    counts = index.vocab_offsets.diff()
    ids = torch.repeat_interleave(index.vocab_ids, counts)  # one entry per (id, concept) membership
    concepts = index.vocab_concepts
    # q_cv = p_v / mass_c = exp(y_v - y_top) top_share_c, from the concept's largest variant
    y_top = y.gather(1, top_token)[:, concepts]
    share = top_share[:, concepts].double()
    q = torch.exp(y[:, ids] - y_top) * share
    term = torch.where(share > 0, grad_concept[:, concepts] * q, torch.zeros_like(q))
    grad.copy_(base.index_add(1, ids, term) * inv_temperature)


def _cpp_backward(logits, index: _Index, top_share, top_token, row_state, grad_concept, coef, inv_temperature, grad):
    num_tokens, vocab = logits.shape
    cpp().concept_mass_backward(
        DTYPE_NAMES[logits.dtype],
        logits.data_ptr(), num_tokens, vocab, *logits.stride(),
        index.vocab_ids.data_ptr(), index.vocab_ids.numel(),
        index.vocab_offsets.data_ptr(), index.vocab_concepts.data_ptr(), index.vocab_concepts.numel(),
        top_share.shape[1],
        top_share.data_ptr(), top_token.data_ptr(), row_state.data_ptr(), grad_concept.data_ptr(), coef.data_ptr(),
        inv_temperature,
        grad.data_ptr(),
        torch.get_num_threads(),
    )


def _triton_backward(logits, index: _Index, top_share, top_token, row_state, grad_concept, coef, inv_temperature,
                     grad):
    from ..kernels import concepts as triton_concepts

    with on_device(logits):
        triton_concepts.concept_mass_backward(
            logits, index, ID_BLOCK, top_share, top_token, row_state, grad_concept, coef, inv_temperature, grad
        )


_BACKWARD = {"reference": _reference_backward, "cpp": _cpp_backward, "triton": _triton_backward}


@custom_op("fastprobe::concept_mass_backward")
def _concept_mass_backward_op(
    grad_log_mass: torch.Tensor,
    grad_lse: torch.Tensor,
    logits: torch.Tensor,
    top_share: torch.Tensor,
    top_token: torch.Tensor,
    row_state: torch.Tensor,
    vocab_ids: torch.Tensor,
    vocab_offsets: torch.Tensor,
    vocab_concepts: torch.Tensor,
    id_block_starts: torch.Tensor,
    inv_temperature: float,
) -> torch.Tensor:
    """Gradient of (log_mass, lse) with respect to the logits, in the logits' dtype; the only
    [N, V] allocation. row_state: the forward's [2, N] (each row's M and ln S)."""
    if top_share.dim() != 2:
        raise ValueError(f"concept_mass_backward: top_share must be [N, C], got {list(top_share.shape)}")
    num_tokens, num_concepts = logits.shape[0] if logits.dim() else 0, top_share.shape[1]  # (logits: checked below)
    specs = (("grad_log_mass", grad_log_mass, (num_tokens, num_concepts), None, False),  # (converted below)
             ("grad_lse", grad_lse, (num_tokens,), None, False),
             ("top_share", top_share, (num_tokens, num_concepts), output_dtype(logits), True),
             ("top_token", top_token, (num_tokens, num_concepts), torch.int64, True),
             ("row_state", row_state, (2, num_tokens), output_dtype(logits), True))
    _check_op_args("concept_mass_backward", logits, specs, vocab_ids, vocab_offsets, vocab_concepts,
                   vocab_concepts.numel(), id_block_starts, inv_temperature)
    empty = vocab_ids.new_empty(0)
    index = _Index(empty, empty, vocab_ids, vocab_offsets, vocab_concepts, empty, id_block_starts)
    grad = new_output(logits.shape, logits.device, logits.dtype)
    if logits.shape[0] > 0:
        # a concept that is all -inf in a row (top_share 0, log_mass -inf) has gradient 0 by convention
        masked = top_share == 0
        grad_concept = torch.where(masked, 0.0, grad_log_mass.to(top_share.dtype)).contiguous()
        coef = (grad_lse.to(top_share.dtype) - grad_concept.sum(-1)).contiguous()  # h - sum_c g_c
        backend = resolve(logits.device, logits.dtype, "concept_mass")
        _BACKWARD[backend](logits, index, top_share, top_token, row_state, grad_concept, coef, inv_temperature, grad)
    return grad


@_concept_mass_backward_op.register_fake
def _(grad_log_mass, grad_lse, logits, top_share, top_token, row_state, vocab_ids, vocab_offsets, vocab_concepts,
      id_block_starts, inv_temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    logits, _, _, vocab_ids, vocab_offsets, vocab_concepts, _, id_block_starts, inv_temperature = inputs
    mass, log_mass, top_share, concentration_entropy, top_token, lse, row_state = output
    ctx.mark_non_differentiable(top_share, concentration_entropy, row_state)
    ctx.set_materialize_grads(False)  # an output no loss used passes None, not a zero-filled tensor
    ctx.save_for_backward(logits, vocab_ids, vocab_offsets, vocab_concepts, id_block_starts, mass, top_share, top_token,
                          row_state)
    ctx.inv_temperature = inv_temperature
    ctx.backend = get_backend()  # (for a backward on autograd's device thread, outside use_backend's scope)


def _backward(ctx, grad_mass, grad_log_mass, _top_share, _entropy, _top_token, grad_lse, _row_state):
    logits, vocab_ids, vocab_offsets, vocab_concepts, id_block_starts, mass, top_share, top_token, row_state = (
        ctx.saved_tensors)
    # mass = exp(log_mass): its gradient reaches the logits through log_mass
    grad_concept = torch.zeros_like(top_share) if grad_log_mass is None else grad_log_mass
    if grad_mass is not None:
        grad_concept = grad_concept + grad_mass * mass
    if grad_lse is None:
        grad_lse = torch.zeros_like(row_state[0])
    # (a batch of incoming gradients goes through the dispatcher, whose fallback loops over it)
    batched = batched_gradient(grad_concept, grad_lse)
    backward_op = _concept_mass_backward_op.op if batched else _concept_mass_backward_op
    with use_backend(ctx.backend):
        grad = backward_op(
            grad_concept, grad_lse, logits, top_share, top_token, row_state, vocab_ids, vocab_offsets, vocab_concepts,
            id_block_starts, ctx.inv_temperature,
        )
    return grad, None, None, None, None, None, None, None, None


_concept_mass_op.register_autograd(_backward, setup_context=_setup_context)
# (the gradient is right under create_graph=True; a second backward through it raises, naming the op)
register_refusing_backward(_concept_mass_backward_op, no_second_derivative("concept_mass"))


def _check_concepts(concepts, logits: torch.Tensor) -> ConceptSet:
    if not isinstance(concepts, ConceptSet):
        raise TypeError(
            "concepts must be a fastprobe.ConceptSet (ConceptSet(token_ids, offsets), ConceptSet.from_ids "
            f"or ConceptSet.from_answers), got {type(concepts).__name__}"
        )
    if concepts.device != logits.device:
        raise ValueError(
            f"concepts is on {concepts.device} but logits is on {logits.device}; "
            "move it with concepts.to(logits.device)"
        )
    vocab = logits.shape[1]
    if concepts.max_id >= vocab:
        token_ids = concepts.token_ids.cpu()
        t = int(torch.nonzero(token_ids >= vocab)[0])
        c = int(torch.searchsorted(concepts.offsets.cpu(), t, right=True)) - 1
        raise ValueError(
            f"concepts: token id {int(token_ids[t])} of concept {concepts._label(c)} is outside the "
            f"vocabulary of logits [0, V) = [0, {vocab})"
        )
    return concepts


def concept_mass(logits: torch.Tensor, concepts: ConceptSet, *, temperature: float = 1.0) -> ConceptMass:
    """Probability mass of each concept (a set of variant token ids) at each row of logits.

    Args:
        logits: [N, V] (float32, bfloat16, float16; float64 runs the reference), any
            strides. -inf entries are masked vocabulary.
        concepts: a ConceptSet of C concepts with ids in [0, V), on the logits' device.
        temperature: divides every logit.

    Returns:
        ConceptMass(mass, log_mass, top_share, concentration_entropy, top_token, lse):
        [N, C] float32 statistics (float64 for float64 logits; see the module docstring for
        the math), top_token [N, C] int64 vocabulary ids, lse [N] = logsumexp(logits / T)
        (natural log). On ties top_token is the variant that comes first in the concept.
        A concept whose variants are all -inf in a row has mass 0, log_mass -inf,
        top_share 0, concentration_entropy 0 (no mass, nothing concentrated) and top_token
        its first variant.

    mass, log_mass and lse have a gradient with respect to the logits (fused backward;
    overlapping concepts accumulate); top_share, concentration_entropy and top_token do
    not. The gradient of log_mass for a concept that is all -inf in that row is taken as 0.

    Raises TypeError/ValueError naming the argument for bad shapes, dtypes, devices,
    temperature or token ids outside [0, V) before any kernel runs, and ValueError after
    the kernel for a row whose logits are all -inf or not finite (found from the kernel's
    lse, no extra pass; under torch.compile, where it would be a host sync, such a row's
    statistics are NaN instead, and the top_token of a concept holding a NaN logit is one of its
    variants, which one depending on the backend and the variants' order).
    """
    logits = check_tensor(logits, "logits", 2, "[N, V]")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary (V = 0)")
    concepts = _check_concepts(concepts, logits)
    inv_temperature = 1.0 / check_temperature(temperature)

    mass, log_mass, top_share, entropy, top_token, lse, _ = _concept_mass_op(logits, *concepts._index, inv_temperature)
    if skips_host_checks(lse):  # (no host sync: such a row's statistics are NaN)
        finite = torch.isfinite(lse)[:, None]
        mass, log_mass, top_share, entropy = (nan_where_not_finite(x, finite) for x in (mass, log_mass, top_share, entropy))
    elif logits.shape[0] > 0:
        check_finite_lse(lse, lambda row: f"logits[{row}]")
    return ConceptMass(mass, log_mass, top_share, entropy, top_token, lse.to(output_dtype(logits)))
