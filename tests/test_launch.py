"""The Triton launch helpers every kernel module shares (kernels/_launch.py): an autotuned
kernel is launched through triton.autotune once per key, then with the config it chose; and
the keys the attention launchers give separate everything the autotuner tunes on."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
import triton  # noqa: E402

from fastprobe.kernels import _launch  # noqa: E402
from fastprobe.kernels import attention as triton_attention  # noqa: E402


def test_integer_helpers_match_triton():
    for n in [*range(0, 5000), 2**20 - 1, 2**20, 2**20 + 1, 2**40 + 3]:
        assert _launch.next_pow2(n) == triton.next_power_of_2(max(n, 1)), n
    for a in [*range(0, 300), 2**31 - 1, 2**31, 2**40 + 7]:
        for b in (1, 2, 3, 16, 17, 64, 255):
            assert _launch.cdiv(a, b) == triton.cdiv(a, b), (a, b)


class FakeLaunchable:
    """Stands for kernel / autotuner[grid]: records each launch; as an autotuner, remembers the
    config it "chose" in best_config, as triton.autotune does."""

    def __init__(self, chooses=None):
        self.launches, self.chooses, self.best_config = [], chooses, None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
            if self.chooses is not None:
                self.best_config = self.chooses

        return run


def test_launch_tuned_tunes_once_per_key_then_launches_the_choice():
    chosen = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=3)
    tuned, kernel = FakeLaunchable(chooses=chosen), FakeLaunchable()
    args, flags = (1, 2), {"CAUSAL": True}
    _launch.launch_tuned(tuned, kernel, (4,), args, flags, ("key", 1))
    assert len(tuned.launches) == 1 and not kernel.launches
    _launch.launch_tuned(tuned, kernel, (5,), args, flags, ("key", 1))
    assert len(tuned.launches) == 1
    assert tuned.launches[0][2] == dict(flags, enable_fp_fusion=True)
    assert kernel.launches == [
        ((5,), args, dict(flags, enable_fp_fusion=True, BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=3))
    ]
    _launch.launch_tuned(tuned, kernel, (4,), args, flags, ("key", 2))  # another key: tuned again
    assert len(tuned.launches) == 2 and len(kernel.launches) == 1
    other_choice = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2)
    other_tuned = FakeLaunchable(chooses=other_choice)  # another kernel with the same key: its own choice
    _launch.launch_tuned(other_tuned, kernel, (4,), args, flags, ("key", 1))
    assert len(other_tuned.launches) == 1 and len(kernel.launches) == 1


def test_every_triton_launch_asks_for_fused_multiply_adds():
    """Each `kernel[grid](...)` in kernels/ passes **FP_FUSION (Triton 3.10 stops contracting
    a * b + c by default; the kernels' error and timings were measured with it), and the
    installed Triton's CUDA backend takes that option."""
    launches, missing = 0, []
    for path in sorted(Path(_launch.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                launches += 1
                spread = [kw.value.id for kw in node.keywords if kw.arg is None and isinstance(kw.value, ast.Name)]
                if "FP_FUSION" not in spread:
                    missing.append(f"{path.name}:{node.lineno}")
    assert launches >= 13 and not missing, missing
    assert _launch.FP_FUSION == {"enable_fp_fusion": True}
    cuda_options = pytest.importorskip("triton.backends.nvidia.compiler").CUDAOptions
    assert "enable_fp_fusion" in {field.name for field in dataclasses.fields(cuda_options)}


@pytest.fixture
def captured_keys(monkeypatch):
    """The keys the attention launchers give launch_tuned (no kernel runs)."""
    keys = []
    monkeypatch.setattr(triton_attention, "launch_tuned", lambda tuned, kernel, grid, args, flags, key: keys.append(key))
    monkeypatch.setattr(triton_attention, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(triton_attention, "autotune_enabled", lambda: True)
    return keys


def _launch_sink_attention(dtype, queries, keys, entropy=False):
    q = torch.zeros(1, 4, queries, 16, dtype=dtype)
    k = v = torch.zeros(1, 2, keys, 16, dtype=dtype)
    out = torch.zeros_like(q)
    stats = [torch.zeros(1, 4, queries) for _ in range(3)]
    ends = torch.zeros(1, dtype=torch.int64)
    triton_attention.sink_attention(
        q, k, v, out, stats[0], stats[1], None, stats[2] if entropy else None, scale=0.25, causal=True, window=0,
        key_real=None, sink_end=ends, stat_end=ends, head_mask=None, sink_logit=None, key_groups=None, num_groups=1,
        split_keys=0,
    )


def test_attention_keys_separate_dtype_constexprs_and_length_buckets(captured_keys):
    _launch_sink_attention(torch.bfloat16, 100, 100)
    _launch_sink_attention(torch.bfloat16, 110, 120)  # same buckets (128, 128): the same key
    _launch_sink_attention(torch.float16, 100, 100)  # another dtype
    _launch_sink_attention(torch.bfloat16, 100, 300)  # another key-length bucket
    _launch_sink_attention(torch.bfloat16, 300, 300)  # another query-length bucket
    _launch_sink_attention(torch.bfloat16, 100, 100, entropy=True)  # another constexpr
    first, same, *others = captured_keys
    assert first == same
    assert len({first, *others}) == 1 + len(others)


import triton.language as tl  # noqa: E402

_SCALE = tl.constexpr(2.0)  # a constexpr global of a helper: part of the cache keys that call it


@triton.jit
def _scaled(x):
    return x * _SCALE


@triton.jit
def _scale_kernel(pointer):
    tl.store(pointer, _scaled(tl.load(pointer)))


def _rehash(*functions):
    for function in functions:
        function.hash = None


def test_settled_cache_keys_do_not_depend_on_what_was_hashed_first(monkeypatch):
    """Triton 3.6 merged a helper's constexpr globals into its caller's key before hashing the
    helper, so a kernel hashed before its helpers got another key than one hashed after them (a
    kernel compiled ahead by bench/precompile_triton.py then compiled again on the GPU machine).
    That order, put into this Triton's DependenciesFinder, and settle_cache_keys must still give
    the key of hashing the helper first."""
    from triton.runtime import jit

    if not isinstance(_scale_kernel, jit.JITFunction) or not hasattr(jit.DependenciesFinder, "_update_hash"):
        pytest.skip("needs Triton's compiler (not the interpreter) and its DependenciesFinder")

    def update_hash_as_triton_3_6(self, func):  # merge the helper's globals, then hash it
        if not isinstance(func, jit.JITFunction):  # Triton 3.4 and older pass every name here (tl too)
            return
        self.used_global_vals.update(func.used_global_vals)
        self.hasher.update((func.cache_key + str(getattr(func, "noinline", False))).encode("utf-8"))

    monkeypatch.setattr(jit.DependenciesFinder, "_update_hash", update_hash_as_triton_3_6)
    _rehash(_scale_kernel, _scaled)
    _scaled.used_global_vals = {}
    kernel_first = _scale_kernel.cache_key
    _rehash(_scale_kernel, _scaled)
    _scaled.cache_key  # noqa: B018  (the helper first)
    helper_first = _scale_kernel.cache_key
    if kernel_first == helper_first:
        pytest.skip("this Triton keeps no helper globals in its cache keys (3.0, 3.4): no order to settle")
    _rehash(_scale_kernel, _scaled)
    _scaled.used_global_vals = {}
    _scale_kernel.cache_key  # noqa: B018  (the kernel first again)
    _launch.settle_cache_keys({"_scale_kernel": _scale_kernel, "_scaled": _scaled, "other": 3})
    assert _scale_kernel.cache_key == helper_first
    monkeypatch.undo()
    _rehash(_scale_kernel, _scaled)
    assert _scale_kernel.cache_key == helper_first  # (and what this Triton computes by itself)


def test_attention_launcher_still_refuses_what_it_cannot_launch(captured_keys):
    """The launcher's own checks (it is reachable past the op's): k and v of another batch or head
    width, and a head dimension without a unit stride, are refused by name before any launch."""
    q = torch.zeros(1, 4, 3, 16)
    k = v = torch.zeros(1, 2, 5, 16)
    stats = [torch.zeros(1, 4, 3) for _ in range(2)]
    ends = torch.zeros(1, dtype=torch.int64)

    def launch(q, k, v, out):
        triton_attention.sink_attention(
            q, k, v, out, *stats, None, None, scale=0.25, causal=True, window=0, key_real=None, sink_end=ends,
            stat_end=ends, head_mask=None, sink_logit=None, key_groups=None, num_groups=1, split_keys=0,
        )

    with pytest.raises(ValueError, match="k and v must be"):
        launch(q, torch.zeros(2, 2, 5, 16), v, torch.zeros_like(q))
    with pytest.raises(ValueError, match="k and v must be"):
        launch(q, torch.zeros(1, 2, 5, 8), v, torch.zeros_like(q))
    with pytest.raises(ValueError, match="out must have a unit stride along its head dimension, got 2"):
        launch(q, k, v, torch.zeros(1, 4, 3, 32)[..., ::2])
    with pytest.raises(ValueError, match="v must have a unit stride along its head dimension, got 3"):
        launch(q, k, torch.zeros(1, 2, 5, 48)[..., ::3], torch.zeros_like(q))
    launch(q, k, torch.zeros(1, 2, 5, 3)[..., ::3], torch.zeros(1, 4, 3, 1))  # (a width of 1: any stride)
    assert len(captured_keys) == 1


# ---- the constexprs each launch gets (kept per combination of options by the launchers) ----

from triton.runtime.jit import JITFunction  # noqa: E402

from fastprobe.kernels import dual_attention as triton_dual  # noqa: E402


@pytest.fixture
def recorded_launches(monkeypatch):
    """Every kernel launch as (kernel name, grid, {argument name: value}), none run: Triton's
    JITFunction.run is replaced, so the launchers' real path (checks, constexprs, pruning without
    a device, grids) is what is recorded. Untuned (FASTPROBE_AUTOTUNE=0: no benchmarking)."""
    if not isinstance(triton_attention._attention_fwd_kernel, JITFunction):
        pytest.skip("the kernels are the interpreter's here (TRITON_INTERPRET=1 before import)")
    launches = []

    def run(kernel, *args, grid, warmup, **kwargs):
        named = dict(zip(kernel.arg_names, args), **kwargs)
        launches.append((kernel.fn.__name__, grid(named) if callable(grid) else grid, named))

    monkeypatch.setattr(JITFunction, "run", run)
    monkeypatch.setenv("FASTPROBE_AUTOTUNE", "0")
    return launches


def _pad(n, least):  # max(least, the smallest power of two >= n)
    return max(least, 1 << max(n - 1, 0).bit_length())


# each on its own, all at once, none (then the same in reverse: a constexpr kept from another
# combination would show)
_ATTENTION_OPTIONS = [
    {}, {"causal": False}, {"key_real": True}, {"horizon": True}, {"start": True}, {"row_ends": True},
    {"head_mask": True}, {"sink_logit": True}, {"groups": 3}, {"groups": 20}, {"entropy": True}, {"softcap": 2.0},
    {"causal": False, "key_real": True, "horizon": True, "start": True, "row_ends": True, "head_mask": True,
     "sink_logit": True, "groups": 5, "entropy": True, "softcap": 1.5},
]  # fmt: skip


@pytest.mark.parametrize("interpreted", [False, True], ids=["compiled", "interpreted"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("split_keys", [0, 2], ids=["prefill", "split"])
def test_attention_launches_get_the_constexprs_of_their_own_options(recorded_launches, monkeypatch, interpreted, dtype,
                                                                   split_keys):  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreted else "0")  # (the launchers' branch and UPCAST)
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 3, 40, 40, 24
    for options in _ATTENTION_OPTIONS + _ATTENTION_OPTIONS[::-1]:
        q, k = torch.zeros(B, Hq, Lq, D, dtype=dtype), torch.zeros(B, Hkv, Lk, D, dtype=dtype)
        v = torch.zeros(B, Hkv, Lk, Dv, dtype=dtype)
        out, stats = torch.zeros(B, Hq, Lq, Dv, dtype=dtype), [torch.zeros(B, Hq, Lq) for _ in range(3)]
        groups = options.get("groups", 0)
        ends = torch.zeros((B, Lk) if options.get("row_ends") else (B,), dtype=torch.int64)
        given = dict(
            key_real=torch.ones(B, Lk, dtype=torch.uint8) if options.get("key_real") else None,
            horizon=torch.zeros(B, Lk, dtype=torch.int64) if options.get("horizon") else None,
            start=torch.zeros(B, Lk, dtype=torch.int64) if options.get("start") else None,
            head_mask=torch.ones(Hq, dtype=torch.uint8) if options.get("head_mask") else None,
            sink_logit=torch.zeros(Hq) if options.get("sink_logit") else None,
            key_groups=torch.zeros(B, Lk, dtype=torch.int32) if groups else None,
        )
        group_mass = torch.zeros(B, Hq, Lq, groups) if groups else None
        entropy = stats[2] if options.get("entropy") else None
        recorded_launches.clear()
        triton_attention.sink_attention(
            q, k, v, out, stats[0], stats[1], group_mass, entropy, scale=0.5, causal=options.get("causal", True),
            window=0, sink_end=ends, stat_end=ends, num_groups=max(groups, 1), softcap=options.get("softcap", 0.0),
            split_keys=split_keys, **given,
        )  # fmt: skip
        expected = dict(
            CAUSAL=options.get("causal", True), HAS_KEY_REAL="key_real" in options, HAS_HORIZON="horizon" in options,
            HAS_START="start" in options, ROW_ENDS="row_ends" in options, HAS_HEAD_MASK="head_mask" in options,
            HAS_GROUPS=groups > 0, ENTROPY="entropy" in options, HAS_SOFTCAP="softcap" in options, HEAD_DIM=D,
            VALUE_DIM=Dv, BLOCK_DV=_pad(Dv, 16), DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
            UPCAST=interpreted and dtype == torch.bfloat16,
        )  # fmt: skip
        merged = {}
        if split_keys:
            (split, split_grid, split_args), (merge, merge_grid, merge_args) = recorded_launches
            assert (split, merge) == ("_attention_split_kernel", "_attention_merge_kernel")
            block_r, splits = _pad(Hq // Hkv * Lq, 16), split_args["num_splits"]
            assert split_grid == (splits * B * Hkv,) and merge_grid == (B * Hq * Lq,)
            assert merge_args["num_splits"] == splits
            launched = split_args
            expected.update(G_PAD=_pad(max(groups, 1), 2), BLOCK_R=block_r)
            merged = dict(VALUE_DIM=Dv, BLOCK_DV=_pad(Dv, 16), BLOCK_R=block_r, G_PAD=_pad(max(groups, 1), 2),
                          S_PAD=_pad(splits, 1), HAS_HEAD_MASK="head_mask" in options,
                          HAS_SINK_LOGIT="sink_logit" in options, HAS_GROUPS=groups > 0, ENTROPY="entropy" in options)
            assert {name: merge_args[name] for name in merged} == merged, options
            assert "HAS_SINK_LOGIT" not in split_args  # (the merge adds the sink logit)
        else:
            ((kernel, grid, launched),) = recorded_launches
            assert kernel == "_attention_fwd_kernel"
            assert grid == (-(-Lq // launched["BLOCK_M"]) * B * Hq,)
            expected.update(G_PAD=_pad(max(groups, 1), 16), HAS_SINK_LOGIT="sink_logit" in options)
        assert {name: launched[name] for name in expected} == expected, options
        for name, tensor in given.items():  # what is given is what the kernel reads
            if tensor is not None:
                assert launched.get(f"{name}_ptr", merge_args.get(f"{name}_ptr") if merged else None) is tensor, name


_DUAL_OPTIONS = [
    {}, {"causal": False}, {"key_real": True}, {"horizon": True}, {"start": True}, {"orthogonalize": False},
    {"paths": True},
    {"causal": False, "key_real": True, "horizon": True, "start": True, "orthogonalize": False, "paths": True},
]  # fmt: skip


@pytest.mark.parametrize("interpreted", [False, True], ids=["compiled", "interpreted"])
@pytest.mark.parametrize("split_keys", [0, 2], ids=["prefill", "split"])
def test_dual_attention_launches_get_the_constexprs_of_their_own_options(recorded_launches, monkeypatch, interpreted,
                                                                        split_keys):  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpreted else "0")
    B, Hq, Hkv, Lq, Lk, D, Dv, dtype = 1, 4, 1, 2, 40, 32, 16, torch.bfloat16
    for options in _DUAL_OPTIONS + _DUAL_OPTIONS[::-1]:
        q, k = torch.zeros(B, Hq, Lq, D, dtype=dtype), torch.zeros(B, Hkv, Lk, D, dtype=dtype)
        v = torch.zeros(B, Hkv, Lk, Dv, dtype=dtype)
        out = torch.zeros(B, Hq, Lq, Dv, dtype=dtype)
        paths = [torch.zeros_like(out), torch.zeros_like(out)] if options.get("paths") else [None, None]
        recorded_launches.clear()
        triton_dual.dual_path_attention(
            q, k, v, out, *paths, scale=0.5, causal=options.get("causal", True),
            key_real=torch.ones(B, Lk, dtype=torch.uint8) if options.get("key_real") else None,
            drop=torch.zeros(B, Lk, dtype=torch.uint8), rows=torch.ones(B, Lq, dtype=torch.uint8), gamma=1.0,
            orthogonalize=options.get("orthogonalize", True), eps=1e-6, split_keys=split_keys,
            horizon=torch.zeros(B, Lk, dtype=torch.int64) if options.get("horizon") else None,
            start=torch.zeros(B, Lk, dtype=torch.int64) if options.get("start") else None,
        )  # fmt: skip
        expected = dict(
            CAUSAL=options.get("causal", True), HAS_KEY_REAL="key_real" in options, HAS_HORIZON="horizon" in options,
            HAS_START="start" in options, HEAD_DIM=D, VALUE_DIM=Dv, BLOCK_DV=_pad(Dv, 16), UPCAST=interpreted,
        )  # fmt: skip
        guidance = dict(ORTHOGONALIZE=options.get("orthogonalize", True), WRITE_PATHS="paths" in options)
        if split_keys:
            (split, split_grid, split_args), (merge, merge_grid, merge_args) = recorded_launches
            assert (split, merge) == ("_dual_split_kernel", "_dual_merge_kernel")
            block_r, splits = _pad(Hq // Hkv * Lq, 16), split_args["num_splits"]
            assert split_grid == (splits * B * Hkv,) and merge_grid == (B * Hq * Lq,)
            assert {name: split_args[name] for name in expected} == expected, options
            assert split_args["BLOCK_R"] == block_r and not {"ORTHOGONALIZE", "WRITE_PATHS"} & split_args.keys()
            merged = dict(guidance, VALUE_DIM=Dv, BLOCK_DV=_pad(Dv, 16), BLOCK_R=block_r, S_PAD=_pad(splits, 1))
            assert {name: merge_args[name] for name in merged} == merged, options
        else:
            ((kernel, grid, launched),) = recorded_launches
            assert kernel == "_dual_fwd_kernel" and grid == (-(-Lq // launched["BLOCK_M"]) * B * Hq,)
            expected.update(guidance)
            assert {name: launched[name] for name in expected} == expected, options
