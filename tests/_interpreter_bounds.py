"""Bounds checking for Triton kernels run through the interpreter (TRITON_INTERPRET=1).

The interpreter reads and writes raw host memory with no check: a kernel that addresses past
a buffer reads whatever lies there (or crashes the process). Under ``bounds_checked()`` every
launch records the byte extent of each tensor argument, and every load, store and gather
checks, before it runs, that each of its active lanes stays inside one of them:

* a masked-in load or store address (all bytes of the element) must lie in the extent
  [data_ptr + lowest offset, data_ptr + highest offset + element size) of a tensor
  argument of that launch;
* a gather index must lie in [0, size along its axis) (numpy would wrap a negative one).

A violation raises OutOfBounds, which the interpreter re-raises as an InterpreterError
whose message names it.
"""

import contextlib

import numpy as np
import torch
from triton.runtime import interpreter


class OutOfBounds(AssertionError):
    pass


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """[first byte, past the last byte) of the elements a strided tensor covers."""
    start = tensor.data_ptr()
    if tensor.numel() == 0:
        return start, start
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()) if size > 0)
    return start, start + (last + 1) * tensor.element_size()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif hasattr(value, "base") and isinstance(getattr(value, "base"), torch.Tensor):  # a TensorWrapper
        yield value.base
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


@contextlib.contextmanager
def bounds_checked():
    """Patch the interpreter (class attributes, restored on exit) so that every launch inside
    this context checks its memory accesses; yields the list of launches' extents seen."""
    extents: list[tuple[int, int]] = []
    launches: list[list[tuple[int, int]]] = []
    executor = interpreter.GridExecutor
    builder = interpreter.InterpreterBuilder
    # (create_gather came with tl.gather, Triton 3.3: an older interpreter has nothing to patch)
    saved = {(owner, name): getattr(owner, name)
             for owner, name in ((executor, "_init_args_hst"), (builder, "create_masked_load"),
                                 (builder, "create_masked_store"), (builder, "create_gather"))
             if hasattr(owner, name)}

    def init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = saved[(executor, "_init_args_hst")](self, args_dev, kwargs)
        extents[:] = [_extent(t) for t in _tensors(list(args_hst) + list(kwargs_hst.values()))]
        launches.append(list(extents))
        return args_hst, kwargs_hst

    def check(ptrs, mask, what: str) -> None:
        addresses = np.broadcast_to(ptrs.data, np.broadcast_shapes(ptrs.data.shape, mask.data.shape))
        active = addresses[np.broadcast_to(mask.data, addresses.shape)].astype(np.uint64)
        if active.size == 0:
            return
        width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        inside = np.zeros(active.shape, dtype=bool)
        for start, end in extents:
            inside |= (active >= start) & (active + width <= end)
        if not inside.all():
            bad = int(active[~inside][0])
            near = min(extents, key=lambda e: min(abs(bad - e[0]), abs(bad - e[1])), default=None)
            raise OutOfBounds(f"{what} at address {bad:#x}, outside every tensor argument (nearest {near})")

    def masked_load(self, ptrs, mask, other, *rest):
        check(ptrs, mask, "load")
        return saved[(builder, "create_masked_load")](self, ptrs, mask, other, *rest)

    def masked_store(self, ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return saved[(builder, "create_masked_store")](self, ptrs, value, mask, *rest)

    def gather(self, src, indices, axis):
        size = src.data.shape[axis]
        if indices.data.size and (indices.data.min() < 0 or indices.data.max() >= size):
            raise OutOfBounds(f"gather index outside [0, {size}): {indices.data.min()} .. {indices.data.max()}")
        return saved[(builder, "create_gather")](self, src, indices, axis)

    replacements = {"_init_args_hst": init_args_hst, "create_masked_load": masked_load,
                    "create_masked_store": masked_store, "create_gather": gather}
    try:
        for (owner, name) in saved:
            setattr(owner, name, replacements[name])
        yield launches
    finally:
        for (owner, name), original in saved.items():
            setattr(owner, name, original)
