"""float16 <-> float32 in the C++ kernels (csrc/common.h), bit for bit against torch's own
conversion: the F16C instructions that x86-64-v3 CPUs and newer run, and the portable code that
every other CPU runs (and that the ops here never reach when the CPU has F16C)."""

import pytest
import torch

import fastprobe as fp
from fastprobe.backend import cpp_status

pytestmark = pytest.mark.skipif(not cpp_status()[0], reason="needs the C++ extension")

PATHS = [
    pytest.param(True, id="f16c"),
    pytest.param(False, id="portable"),
]


def skip_without(hardware: bool) -> None:
    from fastprobe import _C

    if hardware and not _C.has_f16c():
        pytest.skip("this CPU or build has no F16C path")


def halves_to_float(bits: torch.Tensor, hardware: bool) -> torch.Tensor:
    from fastprobe import _C

    out = torch.full(bits.shape, float("nan"), dtype=torch.float32)  # poisoned
    _C._fp16_to_float(bits.data_ptr(), bits.numel(), out.data_ptr(), hardware)
    return out


def floats_to_half(values: torch.Tensor, hardware: bool) -> torch.Tensor:
    from fastprobe import _C

    out = torch.full(values.shape, 0x7E01, dtype=torch.int16)  # poisoned: a NaN torch never makes
    _C._float_to_fp16(values.data_ptr(), values.numel(), out.data_ptr(), hardware)
    return out


def assert_same_bits(mine: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bits; NaN only needs to stay NaN (payloads and quiet bits are not specified)."""
    as_float = torch.float16 if mine.dtype == torch.int16 else torch.float32
    mine_nan, expected_nan = mine.view(as_float).isnan(), expected.view(as_float).isnan()
    assert torch.equal(mine_nan, expected_nan)
    same = (mine == expected) | expected_nan
    assert same.all(), f"{int((~same).sum())} differ, first at {int((~same).nonzero()[0])}"


@pytest.mark.parametrize("hardware", PATHS)
@pytest.mark.parametrize("count", [65536, 65533, 7, 1])  # whole 8-lane runs and tails
def test_every_half_to_float(hardware, count):
    skip_without(hardware)
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    offset = 65536 - count  # the tail lies at the end: every pattern is still seen at count 65533
    bits = every[offset:]
    expected = bits.view(torch.float16).float().view(torch.int32)
    assert_same_bits(halves_to_float(bits, hardware).view(torch.int32), expected)


def float_cases() -> torch.Tensor:
    """Every half, the midpoints between neighbouring halves (ties round to even) and one float
    ulp either side of them, the overflow boundary, float32 subnormals, specials, random bits."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    finite = every[every.isfinite()].double().unique()
    midpoints = ((finite[1:] + finite[:-1]) / 2).float()
    ulp_up = torch.nextafter(midpoints, torch.full_like(midpoints, float("inf")))
    ulp_down = torch.nextafter(midpoints, torch.full_like(midpoints, float("-inf")))
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 65536.0, 1e30, 2.0**-24, 2.0**-25,
                          2.0**-25 * 1.0000001, 2.0**-14, 1e-40, 1e-45, 0.0, -0.0,
                          float("inf"), float("-inf"), float("nan")])
    generator = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-2**31, 2**31, (1 << 20,), generator=generator, dtype=torch.int64)
    random_floats = random_bits.to(torch.int32).view(torch.float32)
    cases = [finite.float(), midpoints, ulp_up, ulp_down, edges, -edges, random_floats]
    return torch.cat(cases)


@pytest.mark.parametrize("hardware", PATHS)
def test_float_to_half_rounds_to_nearest_even(hardware):
    skip_without(hardware)
    values = float_cases()
    for count in (values.numel(), values.numel() - 5, 3):  # tails of 5 and 3 elements
        part = values[values.numel() - count:]
        expected = part.to(torch.float16).view(torch.int16)
        assert_same_bits(floats_to_half(part, hardware), expected)


def test_info_names_the_code_path():
    from fastprobe import _C

    assert isinstance(_C.simd_clone(), str) and _C.simd_clone()
    assert ("F16C" in cpp_status()[1]) == _C.has_f16c()
    assert ("AVX512-BF16" in cpp_status()[1]) == _C.attention_bf16_pairs()


def test_bf16_pair_scores_switch():
    """set_attention_bf16_pairs returns the previous setting; forbidden, or at 8 lanes, no call
    scores by pairs; allowed, only a CPU with AVX512-BF16 does (and then at 16 lanes)."""
    from fastprobe import _C

    previous = _C.set_attention_bf16_pairs(False)
    try:
        assert not _C.attention_bf16_pairs()
        assert _C.set_attention_bf16_pairs(True) is False
        lanes = _C.set_attention_lanes(8)
        try:
            assert not _C.attention_bf16_pairs()
        finally:
            _C.set_attention_lanes(lanes)
        if _C.attention_bf16_pairs():
            assert _C.attention_lanes() == 16
    finally:
        _C.set_attention_bf16_pairs(previous)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_op_rows_read_every_finite_value_exactly(dtype, layout):
    """What the kernels' multi-versioned loaders (csrc/common.h, load_floats) make of every finite
    float16 and bfloat16 value, seen through an op: a one-token vocabulary's lse is its logit
    itself (exp(0) = 1, log 1 = 0), in float64. Contiguous float16 rows take F16C where the CPU has
    it; a vocabulary stride other than 1 takes the portable conversion inside the clone."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = every[torch.isfinite(every)]
    logits = finite[:, None] if layout == "contiguous" else finite[None, :].t()  # [N, 1], stride_v 1 or N
    with fp.use_backend("cpp"):
        lse = fp.concept_mass(logits, fp.ConceptSet([0], [0, 1])).lse
    assert torch.equal(lse, finite.double())


@pytest.mark.parametrize("convert", ["_fp16_to_float", "_float_to_fp16"])
def test_conversion_bindings_refuse_null_pointers_and_negative_counts(convert):
    """The test bindings check what every binding checks: a null buffer or a count outside
    [0, 2^62] is an error, before anything is read (they used to dereference null)."""
    from fastprobe import _C

    function = getattr(_C, convert)
    buffer = torch.zeros(4, dtype=torch.float32)
    with pytest.raises(ValueError, match="src pointer is null"):
        function(0, 4, buffer.data_ptr(), False)
    with pytest.raises(ValueError, match="out pointer is null"):
        function(buffer.data_ptr(), 4, 0, False)
    with pytest.raises(ValueError, match=r"count must be in \[0, 2\^62\], got -1"):
        function(buffer.data_ptr(), -1, buffer.data_ptr(), False)
    function(0, 0, 0, False)  # nothing to convert: no buffer needed


@pytest.mark.parametrize("num_queries", [5, 1], ids=["prefill", "decode"])
def test_bf16_outputs_keep_infinities(num_queries):
    """float32 -> bfloat16 where the kernels store their outputs (csrc/common.h, float_to_bf16_bits):
    +-inf stays +-inf, as torch's cast makes it (not a NaN). Seen through attention's output over
    value rows that hold +-inf, every key visible (causal=False: no masked key's 0 * inf)."""
    q = torch.randn(1, 2, num_queries, 8).bfloat16()
    k, v = torch.randn(2, 1, 2, 6, 8).bfloat16()
    v[..., 0], v[..., 1] = float("inf"), float("-inf")
    with fp.use_backend("cpp"):
        out = fp.sink_attention(q, k, v, causal=False).out
    assert (out[..., 0] == float("inf")).all() and (out[..., 1] == float("-inf")).all()
    assert torch.isfinite(out[..., 2:]).all()
