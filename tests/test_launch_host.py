"""The attention launchers' host-side shortcuts (session 30): the strides _check_qkv reads once
are the ones launched (also for the doubled copy of q that a huge scale makes), and the autotune
keys are still (q's dtype, *constexprs, *length buckets) for every kernel."""

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.jit import JITFunction  # noqa: E402

from fastprobe.kernels import attention as triton_attention  # noqa: E402
from fastprobe.kernels import dual_attention as triton_dual  # noqa: E402


@pytest.fixture
def launched(monkeypatch):
    """Every launch as (kernel name, {argument name: value}), none run; launch_tuned's (flags, key)
    in a second list. Compiled path (interpreter off), autotuned (launch_tuned replaced)."""
    if not isinstance(triton_attention._attention_fwd_kernel, JITFunction):
        pytest.skip("the kernels are the interpreter's here (TRITON_INTERPRET=1 before import)")
    launches, keys = [], []

    def run(kernel, *args, grid, warmup, **kwargs):
        launches.append((kernel.fn.__name__, dict(zip(kernel.arg_names, args), **kwargs)))

    def launch_tuned(tuned, kernel, grid, args, flags, key):
        keys.append((kernel.fn.__name__, flags, key))
        kernel[grid](*args, **flags)

    monkeypatch.setattr(JITFunction, "run", run)
    monkeypatch.setattr(triton_attention, "launch_tuned", launch_tuned)
    monkeypatch.setattr(triton_attention, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(triton_dual, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(triton_attention, "autotune_enabled", lambda: True)
    return launches, keys


def test_check_qkv_returns_the_strides_it_checked_and_names_each_tensor():
    q = torch.zeros(2, 4, 3, 64)[..., :40]  # (rows 64 apart: not contiguous, unit head stride)
    k, v = torch.zeros(2, 2, 5, 40), torch.zeros(2, 5, 2, 24).transpose(1, 2)
    out = torch.zeros(2, 3, 4, 24).transpose(1, 2)
    sizes, strides = triton_attention._check_qkv(q, k, v, out)
    assert sizes == (2, 4, 2, 3, 5, 40, 24)
    assert strides == q.stride() + k.stride() + v.stride() + out.stride()
    for name in ("q", "k", "v", "out"):
        given = dict(q=q, k=k, v=v, out=out)
        wide = given[name].new_zeros(*given[name].shape[:3], 2 * given[name].shape[3])
        given[name] = wide[..., ::2]
        with pytest.raises(ValueError, match=f"^{name} must have a unit stride along its head dimension, got 2"):
            triton_attention._check_qkv(*given.values())


def _strides_launched(named: dict, prefix: str) -> tuple:
    return tuple(named[f"stride_{prefix}{axis}"] for axis in ("b", "h", "m" if prefix in "qo" else "n", "d"))


@pytest.mark.parametrize("split_keys", [0, 2], ids=["prefill", "split"])
@pytest.mark.parametrize("scale", [0.5, 3e38], ids=["scale", "huge-scale"])  # (3e38 log2(e): q doubled in a copy)
def test_sink_attention_launches_the_strides_of_the_tensors_it_passes(launched, split_keys, scale):
    launches, _ = launched
    B, Hq, Hkv, Lq, Lk, D = 1, 4, 2, 2, 40, 16
    q = torch.zeros(B, Hq, Lq, 2 * D)[..., :D]  # not dense: its doubled copy is contiguous, other strides
    k, v = torch.zeros(B, Hkv, Lk, D), torch.zeros(B, Lk, Hkv, D).transpose(1, 2)
    out = torch.zeros(B, Lq, Hq, D).transpose(1, 2)
    stats = [torch.zeros(B, Hq, Lq) for _ in range(2)]
    ends = torch.zeros(B, dtype=torch.int64)
    triton_attention.sink_attention(
        q, k, v, out, *stats, None, None, scale=scale, causal=True, window=0, key_real=None, sink_end=ends,
        stat_end=ends, head_mask=None, sink_logit=None, key_groups=None, num_groups=1, split_keys=split_keys,
    )  # fmt: skip
    args = launches[0][1]
    q_launched = args["q_ptr"]
    assert (q_launched is q) == (scale < 1e38)
    assert _strides_launched(args, "q") == q_launched.stride()  # (the copy's own, contiguous, with the huge scale)
    assert (q_launched.stride() == q.stride()) == (scale < 1e38)
    assert _strides_launched(args, "k") == k.stride() and _strides_launched(args, "v") == v.stride()
    merged = launches[-1][1]  # (prefill: the same launch)
    assert merged["out_ptr"] is out and _strides_launched(merged, "o") == out.stride()


@pytest.mark.parametrize("split_keys", [0, 2], ids=["prefill", "split"])
def test_dual_path_attention_launches_the_strides_of_the_tensors_it_passes(launched, split_keys):
    launches, _ = launched
    B, Hq, Hkv, Lq, Lk, D = 1, 4, 1, 2, 40, 16
    q = torch.zeros(B, Hq, Lq, 2 * D)[..., :D]
    k, v = torch.zeros(B, Hkv, Lk, D), torch.zeros(B, Lk, Hkv, D).transpose(1, 2)
    out = torch.zeros(B, Lq, Hq, D).transpose(1, 2)
    triton_dual.dual_path_attention(
        q, k, v, out, None, None, scale=3e38, causal=True, key_real=None, drop=torch.zeros(B, Lk, dtype=torch.uint8),
        rows=torch.ones(B, Lq, dtype=torch.uint8), gamma=1.0, orthogonalize=True, eps=1e-6, split_keys=split_keys,
    )  # fmt: skip
    args = launches[0][1]
    assert args["q_ptr"] is not q and _strides_launched(args, "q") == args["q_ptr"].stride() != q.stride()
    assert _strides_launched(args, "k") == k.stride() and _strides_launched(args, "v") == v.stride()
    merged = launches[-1][1]
    assert merged["out_ptr"] is out and _strides_launched(merged, "o") == out.stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_autotune_keys_are_the_dtype_the_constexprs_and_the_length_buckets(launched, dtype):
    _, keys = launched
    B, Hq, Hkv, Lq, Lk, D = 1, 4, 2, 3, 300, 16
    q, k, v = torch.zeros(B, Hq, Lq, D, dtype=dtype), *(torch.zeros(B, Hkv, Lk, D, dtype=dtype) for _ in range(2))
    ends = torch.zeros(B, dtype=torch.int64)
    for split_keys, entropy in ((0, False), (0, True), (2, False), (2, True)):
        stats = [torch.zeros(B, Hq, Lq) for _ in range(3)]
        triton_attention.sink_attention(
            q, k, v, torch.zeros_like(q), *stats[:2], None, stats[2] if entropy else None, scale=0.5, causal=True,
            window=0, key_real=None, sink_end=ends, stat_end=ends, head_mask=None, sink_logit=None, key_groups=None,
            num_groups=1, split_keys=split_keys,
        )  # fmt: skip
    for split_keys in (0, 2):
        triton_dual.dual_path_attention(
            q, k, v, torch.zeros_like(q), None, None, scale=0.5, causal=False, key_real=None,
            drop=torch.zeros(B, Lk, dtype=torch.uint8), rows=torch.ones(B, Lq, dtype=torch.uint8), gamma=1.0,
            orthogonalize=True, eps=1e-6, split_keys=split_keys,
        )  # fmt: skip
    names = [name for name, _, _ in keys]
    assert names == ["_attention_fwd_kernel"] * 2 + ["_attention_split_kernel"] * 2 + ["_dual_fwd_kernel",
                                                                                          "_dual_split_kernel"]
    buckets = (4, 512)  # (powers of two of Lq and Lk)
    for name, flags, key in keys:
        assert key == (dtype, *flags.values(), *(buckets if "fwd" in name else ())), name
    assert len({key for _, _, key in keys}) == len(keys)  # (entropy, the path and the kernel separate them)
