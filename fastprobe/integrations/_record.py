"""AttentionRecord: the per-layer, per-head sums of a record_attention block."""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Optional

import torch

from ..ops._common import is_compiling
from ..ops.attention import KeyGroups, prepare_key_groups

# (the first part of) the key of the record's query weights in a mask's per-forward cache (_MaskPattern.key_masks)
_RECORD_WEIGHTS = "record weights"


def _normal_tensors():
    """For the block, tensors made are normal ones even under torch.inference_mode, which is
    per thread: the record's sums take in-place additions from every thread's forwards (a
    streamer's generate thread runs outside the opener's inference mode), and an inference tensor
    refuses those outside inference mode. (Adding to a normal tensor inside it is allowed.)"""
    if is_compiling() or not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    return torch.inference_mode(False)


class AttentionRecord:
    """Per-layer, per-head attention statistics of the forward passes run inside
    record_attention, averaged over real (non-padded) query positions and the batch, pooled over
    calls (prefill and every decoding step of generate). Rows are fastprobe's layers (self-attention
    modules in model order); a layer that never ran is NaN, and a head that the patch's head_mask
    switches off records 0 (its weights are all 0). Columns are heads, as many as the layer with
    the most has: a layer with fewer (a vision tower's, beside the text model's) is NaN past its
    own.

        sink_mass   [layers, heads]     weight on the first stat_tokens real tokens (the BOS sink)
        group_mass  [layers, heads, G]  weight on each key group (with key groups), else None
        entropy     [layers, heads]     attention entropy in nats (when recorded), else None
        num_queries [layers]            real queries averaged over (group_mass: those of the
                                        forwards with key groups)

    A statistic that is not recorded reads None; sink_mass, group_mass or entropy read before any
    forward pass ran raises RuntimeError.

    Sums accumulate in place on the device the model computes on (its first parameter's, or the
    execution device of accelerate's offload hooks; layers elsewhere, in a
    model split over devices or a DataParallel replica, add theirs there), in tables allocated when
    recording starts (no [L, L] weights, no host sync, nothing left allocated per layer); the fields
    are computed when read, without waiting for the device. Key groups:
    record_attention(key_groups=...) or set_key_groups(), an integer [B, L] tensor, the group of
    the token at each position of each row (padding included), or the KeyGroups that
    prepare_key_groups made from it; checked once, not per layer. A forward from
    position 0 must have at most L tokens; tokens that decoding appends past position L - 1 (the
    generated ones) are in no group, so while generating a row of group_mass sums to 1 less the
    weight on generated tokens. A vision tower's layers (Gemma 4's; their keys are patches) and an
    encoder-decoder's decoder layers (T5Gemma's; key groups are the encoder's tokens) take no key
    groups: their group_mass is NaN. group_mass averages over the queries of the calls that
    had key groups (groups set mid-record leave the earlier calls out); with more groups set later,
    G grows, the earlier calls' weight on the new groups 0.
    """

    def __init__(self, num_layers: int, num_heads, statistics: tuple, device=None,
                 dtype: torch.dtype = torch.float32, key_groups=None, num_groups=None):
        """num_heads: the heads of every layer (an int), or each layer's (a list, None where unknown),
        or None (all learnt from the layers' calls)."""
        self.statistics = statistics
        self.num_layers = num_layers
        heads = list(num_heads) if isinstance(num_heads, (list, tuple)) else [num_heads] * num_layers
        self._head_counts: list = heads  # each layer's heads (None until known: from its first call)
        self._device, self._dtype = device, dtype
        self._sums: dict = {}  # statistic -> [layers, H] or [layers, H, G] sums (H, G: the most seen)
        # real queries per layer, [all calls, calls with key groups] (group_mass averages over the
        # latter): padded calls' (a device sum), the others' (known on the host: no launch a layer)
        with _normal_tensors():
            self._counts = torch.zeros(2, num_layers, dtype=dtype, device=device)
        self._host_counts = [[0] * num_layers, [0] * num_layers]
        self._ones: dict = {}  # (device, dtype) -> a vector of ones, the unweighted sums' (_add_as_matvec)
        self._calls = 0  # attention calls added (on the host: reading the fields needs no sync)
        # a compiled forward added calls (it sets this, never reads or counts: Dynamo guards on the
        # value of a Python int it reads, so a count would make a graph per decoding step)
        self._traced_calls = False
        self._key_groups: Optional[KeyGroups] = None  # [B, L], checked
        self._views: dict = {}  # (device, first key's position, Lk) -> KeyGroups of those keys
        self._lock = threading.Lock()
        if heads and None not in heads:  # (else the first calls make them)
            for name in statistics:
                if name != "group_mass":
                    self._table(name, ())
        if key_groups is not None:
            self.set_key_groups(key_groups, num_groups)

    @property
    def num_heads(self) -> Optional[int]:
        """The most heads of a layer, the fields' width (None before any is known)."""
        return max((heads for heads in self._head_counts if heads is not None), default=None)

    @property
    def heads_per_layer(self) -> list:
        """Each layer's heads (None for a layer whose config says none and that has not run)."""
        return list(self._head_counts)

    @property
    def has_head(self) -> torch.Tensor:
        """[layers, heads] bool on the CPU, as wide as the fields: the layer has that head (the
        fields' other columns are NaN; a layer whose heads are unknown has them all)."""
        return self._has_head(max((table.shape[1] for table in self._sums.values()), default=self.num_heads or 0))

    def _has_head(self, width: int) -> torch.Tensor:
        heads = torch.tensor([width if heads is None else heads for heads in self._head_counts], dtype=torch.long)
        return torch.arange(width) < heads.view(-1, 1)

    def __getstate__(self) -> dict:  # (copy.deepcopy or pickle of a record: a snapshot, copied whole
        with self._held():  # while no forward adds to it)
            return copy.deepcopy({name: value for name, value in self.__dict__.items() if name != "_lock"})

    def __setstate__(self, attributes: dict) -> None:
        self._traced_calls = False  # (a record pickled before it had this flag)
        self.__dict__.update(attributes)
        self._lock = threading.Lock()

    def _table(self, name: str, tail: tuple, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The [layers, H, *tail] sums of a statistic, made once (zeros) and widened (zeros
        appended) for a layer with more heads than the others or for more key groups."""
        table = self._sums.get(name)
        shape = (self.num_heads if like is None else like.shape[0], *tail)
        if table is None:
            dtype = self._dtype if like is None else torch.promote_types(self._dtype, like.dtype)
            device = self._device if like is None else like.device
            with _normal_tensors():
                table = torch.zeros(self.num_layers, *shape, dtype=dtype, device=device)
            self._sums[name] = table
        elif any(want > have for want, have in zip(shape, table.shape[1:])):
            with _normal_tensors():
                wider = table.new_zeros(self.num_layers, *map(max, shape, table.shape[1:]))
                wider[(slice(None), *map(slice, table.shape[1:]))] = table
            table = self._sums[name] = wider
        return table

    def set_key_groups(self, key_groups: Optional[torch.Tensor], num_groups: Optional[int] = None) -> None:
        """Key groups [B, L] (ids in [0, num_groups)) for the following forward passes; None: none.
        Checked here, once (a host sync or two); the layers' calls reuse them unchecked."""
        self._views = {}
        if key_groups is None:
            self._key_groups = None
            return
        if not isinstance(key_groups, (torch.Tensor, KeyGroups)) or (
                isinstance(key_groups, torch.Tensor) and key_groups.dim() != 2):
            raise TypeError("key_groups must be an integer tensor of shape [batch, tokens], or a KeyGroups")
        if isinstance(key_groups, torch.Tensor):
            key_groups = prepare_key_groups(key_groups, num_groups)
        elif num_groups is not None and num_groups != key_groups.num_groups:
            raise ValueError(f"num_groups ({num_groups}) differs from the KeyGroups' ({key_groups.num_groups})")
        self._key_groups = key_groups
        if "group_mass" in self.statistics and self.num_heads is not None:
            self._table("group_mass", (key_groups.num_groups,))

    def key_groups_for(self, key: torch.Tensor, key_offset: int, num_queries: int) -> Optional[KeyGroups]:
        """The checked groups of this call's keys, the tokens at positions key_offset ..
        key_offset + Lk - 1 of each row, on its device; made once for the layers of a forward that
        share them. Keys past the given tokens (appended by decoding) go in group G, which the
        kernel counts and add() leaves out."""
        if self._key_groups is None or "group_mass" not in self.statistics:
            return None
        batch, num_keys = key.shape[0], key.shape[2]
        groups, count = self._key_groups
        fresh = key_offset + num_keys == num_queries  # a forward from position 0: no cache before it
        if groups.shape[0] != batch or (fresh and num_keys > groups.shape[1]):
            expanded = ""
            if batch != groups.shape[0] and batch % groups.shape[0] == 0:
                expanded = (f"; generate with num_beams or num_return_sequences n runs n rows per input row: pass "
                            f"key_groups.repeat_interleave({batch // groups.shape[0]}, 0)")
            raise ValueError(f"key_groups has shape {tuple(groups.shape)} but this call has batch {batch} and "
                             f"{num_keys} tokens: give a group to every token (set_key_groups before each "
                             f"batch){expanded}")
        where = (key.device, key_offset, num_keys)
        made = self._views.get(where)
        if made is None:
            ids = groups[:, key_offset:key_offset + num_keys].to(key.device)
            if ids.shape[1] < num_keys:  # decoded tokens past the given ones: group G
                ids = torch.cat([ids, ids.new_full((batch, num_keys - ids.shape[1]), count)], dim=1)
                count += 1
            made = KeyGroups(ids.contiguous(), count)
            if not is_compiling():  # (a traced forward makes them in its graph)
                if len(self._views) >= 8:  # one per kind of layer (full, sliding, chunked) and device
                    self._views.clear()
                self._views[where] = made
        return made

    def add(self, layer: int, result, padding: Optional[torch.Tensor], dropped: Optional[torch.Tensor],
            shared: Optional[dict] = None) -> None:
        """Adds one attention call's statistics (its AttentionOutput) to the layer's sums. shared: the
        forward's per-mask cache (_MaskPattern.key_masks), where the layers that share the padding
        mask share the weights of its real queries, or None."""
        # (detached: statistics are never differentiated, and from a forward run with gradients on,
        # the in-place sums held its autograd graph, its activations with it, as long as the record)
        sink_mass, group_mass, entropy = (None if values is None else values.detach()
                                          for values in (result.sink_mass, result.group_mass, result.entropy))
        batch, _, num_queries = sink_mass.shape
        if dropped is not None:  # the first token left the sliding cache: its weight is 0
            sink_mass = sink_mass.masked_fill(dropped.view(batch, 1, 1), 0.0)
        weight = real_queries = None
        if padding is not None:
            weight, real_queries = self._query_weights(padding, num_queries, sink_mass.dtype, shared)
        if group_mass is not None:  # (without group G of decoded tokens past the given ones)
            group_mass = group_mass[..., :self._key_groups.num_groups]
        found = {"sink_mass": sink_mass, "group_mass": group_mass, "entropy": entropy}
        with self._held():  # forwards of several threads may add at once (in-place sums)
            self._accumulate(layer, found, weight, real_queries, batch, num_queries)

    def _held(self):
        """The record's lock, for adding to the sums or reading them whole (a reader never sees one
        call's sums without its query count); none in a traced forward (the graph adds them)."""
        return contextlib.nullcontext() if is_compiling() else self._lock

    def _accumulate(self, layer: int, found: dict, weight: Optional[torch.Tensor], real_queries, batch: int,
                    num_queries: int) -> None:
        heads = found["sink_mass"].shape[1]
        if self._head_counts[layer] != heads:  # (a layer's first call where its config did not say)
            self._head_counts[layer] = heads
        for name in self.statistics:
            values = found[name]
            if values is None or self._add_as_matvec(self._sums.get(name), layer, values, weight):
                continue
            if weight is not None:  # [B, H, Lq, ...] -> sum over real (b, q): [H, ...]
                values = values * weight.view(batch, 1, num_queries, *([1] * (values.dim() - 3)))
            pooled = values.sum(dim=(0, 2))
            table = self._table(name, tuple(pooled.shape[1:]), pooled)
            # (a layer on another device than the tables: a model split over devices, a DataParallel replica)
            table[layer][tuple(map(slice, pooled.shape))].add_(pooled.to(table.device))
        grouped = 2 if found["group_mass"] is not None and "group_mass" in self.statistics else 1
        if weight is None and not is_compiling():
            for counts in self._host_counts[:grouped]:
                counts[layer] += batch * num_queries
        else:
            count = batch * num_queries if weight is None else real_queries.to(self._counts.device)
            self._counts[:grouped, layer].add_(count)
        if is_compiling():
            self._traced_calls = True
        else:
            self._calls += 1

    def _add_as_matvec(self, table: Optional[torch.Tensor], layer: int, values: torch.Tensor,
                       weight: Optional[torch.Tensor]) -> bool:
        """table[layer, h] += sum over (b, q) of values[b, h, q] (times weight[b, 0, q]) as one
        matrix-vector product, one launch for the two or three of the general form, where the (b, q)
        pairs lie along one stride of values: batch 1 (prefill of one row) or one query (a decoding
        step). False (nothing added) elsewhere."""
        batch, heads, num_queries = values.shape[:3]
        if (table is None or values.dim() != 3 or table.shape[1] < heads or table.dtype != values.dtype
                or table.device != values.device or (batch != 1 and num_queries != 1)):
            return False
        matrix = values[0] if batch == 1 else values[:, :, 0].t()  # [H, Lq] or [H, B]
        if weight is not None:
            vector = weight.reshape(-1).to(values.dtype)
        else:
            where = (values.device, values.dtype)
            vector = self._ones.get(where)
            if vector is None or vector.shape[0] < matrix.shape[1]:
                vector = torch.ones(max(matrix.shape[1], 64), dtype=values.dtype, device=values.device)
                if not is_compiling():
                    self._ones[where] = vector
            vector = vector[:matrix.shape[1]]
        table[layer, :heads].addmv_(matrix, vector)
        return True

    @staticmethod
    def _query_weights(padding: torch.Tensor, num_queries: int, dtype: torch.dtype,
                       shared: Optional[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [B, 1, Lq]: 1 for a real query, the last Lq keys' padding mask; their count),
        made once per forward where `shared` keeps them (a decoding step's layers add ~4 small ops
        fewer each)."""
        if is_compiling() or isinstance(num_queries, torch.SymInt):
            shared = None  # (traced: a key of the symbolic length would specialize it, a graph per length)
        key = (_RECORD_WEIGHTS, num_queries, dtype)
        made = None if shared is None else shared.get(key)
        if made is None:
            weight = padding[:, -num_queries:].to(dtype).view(padding.shape[0], 1, num_queries)
            made = (weight, weight.sum())
            if shared is not None:
                shared[key] = made
        return made

    def _mean(self, name: str) -> Optional[torch.Tensor]:
        if self._calls == 0 and not self._traced_calls:  # (not the device counts: a bool would wait for the GPU)
            raise RuntimeError("nothing was recorded: run the model inside `with fastprobe.record_attention(model)`")
        with self._held():
            table = self._sums.get(name)
            if table is None or name not in self.statistics:
                return None
            counts = self._counts_on(table.device, table.dtype, int(name == "group_mass"))
            counts = counts.view(-1, *([1] * (table.dim() - 1)))
            mean = torch.where(counts > 0, table / counts.clamp(min=1), torch.full_like(table, float("nan")))
            if any(heads is not None and heads < table.shape[1] for heads in self._head_counts):  # (on the host)
                has_head = self._has_head(table.shape[1])  # (layers with fewer heads than the widest)
                missing = ~has_head.view(*has_head.shape, *([1] * (table.dim() - 2)))
                mean = mean.masked_fill(missing.to(mean.device, non_blocking=True), float("nan"))
            return mean

    @property
    def sink_mass(self) -> Optional[torch.Tensor]:
        """[layers, heads] mean weight on the first stat_tokens real keys (None if not recorded)."""
        return self._mean("sink_mass")

    @property
    def group_mass(self) -> Optional[torch.Tensor]:
        """[layers, heads, G] mean weight on each key group (None if not recorded or no key groups)."""
        return self._mean("group_mass")

    @property
    def entropy(self) -> Optional[torch.Tensor]:
        """[layers, heads] mean attention entropy in nats (None if not recorded)."""
        return self._mean("entropy")

    def _counts_on(self, device, dtype: torch.dtype, kind: int = 0) -> torch.Tensor:
        """The real queries per layer (kind 0: of every call, 1: of the calls with key groups), a new
        tensor: the device's and the host's counts together (the host's copied without waiting for
        the device)."""
        counts = self._counts[kind].to(device, dtype, copy=True)
        if any(self._host_counts[kind]):
            on_host = torch.tensor(self._host_counts[kind], dtype=dtype)
            counts = counts + on_host.to(device, non_blocking=True)
        return counts

    @property
    def num_queries(self) -> torch.Tensor:
        """[layers] real queries averaged over so far (0 for a layer that has not run)."""
        with self._held():
            return self._counts_on(self._counts.device, self._counts.dtype)
