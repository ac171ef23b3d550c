"""The interpreter's bounds check (tests/_interpreter_bounds.py) that the hostile-index tests of
the Triton kernels rely on: one element past a buffer, or a gather index past its block, is
refused, and accesses inside the buffers pass."""

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from ._interpreter_bounds import bounds_checked  # noqa: E402


@triton.jit
def _copy(src, dst, load_n, store_n):
    offs = tl.arange(0, 16)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < load_n), mask=offs < store_n)


if hasattr(tl, "gather"):  # Triton 3.3+

    @triton.jit
    def _gather(src, dst, shift):
        offs = tl.arange(0, 8)
        tl.store(dst + offs, tl.gather(tl.load(src + offs), offs + shift, axis=0))


@pytest.mark.interpreter
@pytest.mark.parametrize("access", ["load", "store"])
def test_an_access_one_element_past_a_buffer_is_refused(access):
    src, dst = torch.arange(8.0), torch.zeros(8)
    with bounds_checked():
        _copy[(1,)](src, dst, 8, 8)  # in bounds: passes
        with pytest.raises(Exception, match="OutOfBounds"):
            _copy[(1,)](src, dst, *{"load": (9, 8), "store": (8, 9)}[access])
    assert torch.equal(dst, src)


@pytest.mark.interpreter
@pytest.mark.skipif(not hasattr(tl, "gather"), reason="tl.gather is Triton 3.3+")
def test_a_gather_index_outside_its_block_is_refused():
    src, dst = torch.arange(8.0), torch.zeros(8)
    with bounds_checked():
        _gather[(1,)](src, dst, 0)  # in bounds: passes
        with pytest.raises(Exception, match="OutOfBounds"):
            _gather[(1,)](src, dst, -1)
    assert torch.equal(dst, src)
