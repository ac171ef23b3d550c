"""sink_attention's softmax sum where one key dominates (a BOS attention sink) and each other key's
weight is below half a float32 ulp of it. The kernels sum a block of keys, then add the block's sum
to the running one, l ~ 1: a block of 64 keys 22 below the sink sums to 1.8e-8, under half an ulp
of 1 (6e-8), and was lost whole, so 1 - sink_mass (the mass left for the real tokens, tiny in sink
heads) came out 0 however many keys shared it, as did the entropy's log-sum term. The running sum
is kept in two parts now (a compensated addition per block), and only the sink's own block loses
its small terms (63 of the 4095 here: ~1.5% of 1 - sink_mass). PyTorch's float32 softmax, which
sums in vector lanes, keeps 1 - sink_mass within a few percent, the bound here."""

import math

import pytest
import torch

import fastprobe as fp
from fastprobe import reference

HEAD_DIM, NUM_KEYS = 16, 4096
GAP = 22.0  # exp(-22) ~ 2.8e-10: one key's weight, and a 64-key block's 1.8e-8, under 6e-8


def sink_dominated(num_queries, num_heads=1, num_kv_heads=1, num_keys=NUM_KEYS, gap=GAP):
    """q = e_0 and k[:, 0] = scores (scale 1): key 0 scores 0, every other key -gap, exactly."""
    q = torch.zeros(1, num_heads, num_queries, HEAD_DIM)
    q[..., 0] = 1.0
    k = torch.zeros(1, num_kv_heads, num_keys, HEAD_DIM)
    k[0, :, 1:, 0] = -gap
    return q, k, torch.randn(1, num_kv_heads, num_keys, HEAD_DIM)


# decode: one row (C++: the keys of the only item split in ranges, merged after; Triton:
# split-K); decode-gqa: four query heads on one kv head (C++: the row-vector softmax); heads:
# eight kv heads (C++: enough items that none is split, 1 - sink_mass read exactly 0); prefill
@pytest.mark.parametrize("num_queries, num_heads, num_kv_heads", [(1, 1, 1), (1, 4, 1), (1, 8, 8), (64, 1, 1)],
                         ids=["decode", "decode-gqa", "decode-heads", "prefill"])
def test_non_sink_mass_survives_a_dominant_sink(target, num_queries, num_heads, num_kv_heads):
    backend, device = target
    q, k, v = sink_dominated(num_queries, num_heads, num_kv_heads)
    got = fp.sink_attention(q.to(device), k.to(device), v.to(device), scale=1.0, causal=False,
                            return_entropy=True)
    want = reference.sink_attention(q.double(), k.double(), v.double(), scale=1.0, causal=False)
    rest = (NUM_KEYS - 1) * math.exp(-GAP)  # the true 1 - sink_mass is rest / (1 + rest) ~ 1.1e-6
    torch.testing.assert_close(1.0 - want["sink_mass"], torch.full_like(want["sink_mass"], rest / (1 + rest)))
    # within a few float32 ulps of 1 (6e-8 each), as torch.softmax in float32 is
    torch.testing.assert_close((1.0 - got.sink_mass.double()).cpu(), 1.0 - want["sink_mass"], rtol=0.1, atol=0)
    # entropy = log(1 + rest) + gap rest / (1 + rest) ~ 2.6e-5: its log term is 4% of it
    torch.testing.assert_close(got.entropy.double().cpu(), want["entropy"], rtol=1e-3, atol=0)
    torch.testing.assert_close(got.lse.double().cpu(), want["lse"], rtol=0, atol=1e-6)


def test_torch_float32_softmax_keeps_the_non_sink_mass():
    """The peer the test above holds fastprobe to: float32 softmax over the same scores."""
    q, k, _ = sink_dominated(1)
    weights = torch.softmax((q @ k.transpose(-1, -2)).float(), dim=-1)
    rest = (NUM_KEYS - 1) * math.exp(-GAP)
    assert abs((1.0 - weights[..., 0].double().item()) - rest / (1 + rest)) < 0.1 * rest


def alternating_groups(num_queries, num_keys=40, gap=20.0, dtype=torch.float16):
    """q = e_0 and k[:, 0] = scores (scale 1): even keys (group 0) score 0, odd keys (group 1)
    -gap, so that every key block holds both groups and group 1's weights are exp(-gap)."""
    q = torch.zeros(1, 1, num_queries, HEAD_DIM)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, num_keys, HEAD_DIM)
    k[0, 0, 1::2, 0] = -gap
    groups = (torch.arange(num_keys) % 2).to(torch.int32)[None]
    return q.to(dtype), k.to(dtype), torch.randn(1, 1, num_keys, HEAD_DIM).to(dtype), groups


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("gap", [20.0, 40.0])
@pytest.mark.parametrize("num_queries", [1, 40], ids=["one-query", "prefill"])
def test_a_low_group_keeps_its_mass_with_16_bit_inputs(target, dtype, gap, num_queries):
    """group_mass of a group far below the max (2e-9 and 4e-18 of the mass here) to float32's
    relative precision, as a float32 softmax gives it, whatever the input dtype. The Triton kernel
    sums the groups of a block whose keys mix groups by a one-hot product of the weights split
    hi + lo in the input dtype: in float16, whose range ends at 6e-8, both parts of a weight 17+
    below the max were 0, and group 1's mass came out 0 (now: float32 parts at tf32)."""
    backend, device = target
    q, k, v, groups = alternating_groups(num_queries, gap=gap, dtype=dtype)
    got = fp.sink_attention(q.to(device), k.to(device), v.to(device), scale=1.0, causal=False,
                            key_groups=groups.to(device), num_groups=2)
    want = reference.sink_attention(q.double(), k.double(), v.double(), scale=1.0, causal=False,
                                    key_groups=groups, num_groups=2)
    rest = 20 * math.exp(-gap) / (20 + 20 * math.exp(-gap))
    torch.testing.assert_close(want["group_mass"][..., 1], torch.full_like(want["group_mass"][..., 1], rest))
    torch.testing.assert_close(got.group_mass.double().cpu(), want["group_mass"], rtol=1e-4, atol=0)


@pytest.mark.interpreter
def test_non_sink_mass_survives_the_merge_of_many_key_splits(monkeypatch):
    """The Triton decode path's merge adds the splits' sums l_s with compensation too. Forced to
    32 splits of 128 keys, each split without the sink sums to 3.6e-8, under half an ulp of the
    sink's split (l ~ 1): summed plainly, the lse (log(1 + rest) ~ 1.1e-6, read to float32's
    relative precision where 1 - sink_mass is not) came out 14% off and the entropy 0.6% (the
    decode case above, with longer splits, passed so); compensated, 0.4% and 0.02%."""
    from .test_attention import force_triton_split_keys

    force_triton_split_keys(monkeypatch, "attention", "sink_attention", 32)
    q, k, v = sink_dominated(1)
    got = fp.sink_attention(q, k, v, scale=1.0, causal=False, return_entropy=True)
    want = reference.sink_attention(q.double(), k.double(), v.double(), scale=1.0, causal=False)
    torch.testing.assert_close(1.0 - got.sink_mass.double(), 1.0 - want["sink_mass"], rtol=0.1, atol=0)
    torch.testing.assert_close(got.lse.double(), want["lse"], rtol=2e-2, atol=0)
    torch.testing.assert_close(got.entropy.double(), want["entropy"], rtol=1e-3, atol=0)


@pytest.mark.parametrize("num_queries", [1, 64], ids=["decode", "prefill"])
def test_a_later_larger_key_rescales_the_kept_rounding_errors(num_queries):
    """The running sum's second part (the block sums' rounding errors: ~1.1e-6 after the sink's
    keys here) is rescaled with the first when a later key raises the max. The last key 22 above
    the sink makes that factor e^-22; left unscaled, the C++ kernels' second part put 1.1e-6 into
    l (entropy 1.1e-6 for 6.4e-9, lse 2e-6 off). Eight kv heads: enough items that no item's keys
    are split in ranges (the merge rescales the parts itself)."""
    q, k, v = sink_dominated(num_queries, 8, 8)
    k[0, :, -1, 0] = GAP
    with fp.use_backend("cpp"):
        got = fp.sink_attention(q, k, v, scale=1.0, causal=False, return_entropy=True)
    want = reference.sink_attention(q.double(), k.double(), v.double(), scale=1.0, causal=False)
    torch.testing.assert_close(got.entropy.double(), want["entropy"], rtol=1e-3, atol=0)
    torch.testing.assert_close(got.lse.double(), want["lse"], rtol=0, atol=1e-6)
