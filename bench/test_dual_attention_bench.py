"""dual_path_attention: fastprobe's one pass vs one sink_attention call (the goal: at most
1.3x on CPU, 1.15x on GPU), vs two SDPA calls (every key, then without the image keys) merged
by the guidance formula (on CUDA also both calls on SDPA's cuDNN backend, where it takes the mask),
and on CUDA vs two FlexAttention calls, in the same run. Every peer gets its masks made outside
the timed call (as a model's forward makes them once for all its layers).

    pytest bench/test_dual_attention_bench.py --benchmark-json=bench/results/<device>.json
"""

import functools
import sys

import pytest
import torch
import torch.nn.functional as F

import fastprobe as fp

try:
    from . import _memory
except ImportError:  # run as a script for the CPU peak-memory child
    import _memory

# A LLaVA-style prompt: 576 image tokens after a 5-token prefix; every row guided.
CASES = {
    "cpu": dict(batch=1, heads=16, length=2048, head_dim=64, dtype=torch.float32),
    "cuda": dict(batch=1, heads=32, length=4096, head_dim=128, dtype=torch.bfloat16),
}
IMAGE_START, IMAGE_TOKENS, GAMMA = 5, 576, 1.0


def make_inputs(device, batch, heads, length, head_dim, dtype):
    """(q, k, v, drop [B, L]: the image keys, the SDPA peers' [B, 1, L, L] mask of the second call:
    causal and not an image key)."""
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, dtype=dtype) for _ in range(3))
    drop = torch.zeros(batch, length, dtype=torch.bool, device=device)
    drop[:, IMAGE_START : IMAGE_START + IMAGE_TOKENS] = True
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    text_mask = causal & ~drop[:, None, None, :]
    return q, k, v, drop, text_mask


def guidance(o_cond, o_uncond, eps=1e-6):
    delta = o_cond - o_uncond
    u = o_uncond / (o_uncond.norm(dim=-1, keepdim=True) + eps)
    return o_cond + GAMMA * (delta - (delta * u).sum(-1, keepdim=True) * u)


def fastprobe_dual(q, k, v, drop, text_mask):
    return fp.dual_path_attention(q, k, v, drop, gamma=GAMMA, rows="all")


def fastprobe_single(q, k, v, drop, text_mask):
    return fp.sink_attention(q, k, v).out


def sdpa_two_calls(q, k, v, drop, text_mask):
    """SDPA's own choice of backend for each call (flash for the causal one; a mask rules flash out)."""
    o_cond = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # (every row sees key 0, a text key: no row of the second call is fully masked, none is NaN)
    o_uncond = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask)
    return guidance(o_cond.float(), o_uncond.float()).to(q.dtype)


# both calls on the cuDNN backend (on Hopper the fastest SDPA; skips where it has no kernel for the mask)
sdpa_cudnn_two_calls = _memory.on_sdpa_backend("CUDNN_ATTENTION", sdpa_two_calls)


@functools.lru_cache(maxsize=None)
def _flex(length, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    def causal_text(b, h, q_idx, kv_idx):
        image = (kv_idx >= IMAGE_START) & (kv_idx < IMAGE_START + IMAGE_TOKENS)
        return (kv_idx <= q_idx) & ~image

    full = create_block_mask(causal, None, None, length, length, device=device)
    text = create_block_mask(causal_text, None, None, length, length, device=device)
    return torch.compile(flex_attention, dynamic=False), full, text


def flex_two_calls(q, k, v, drop, text_mask):
    flex, full, text = _flex(k.shape[2], str(q.device))
    o_cond = flex(q, k, v, block_mask=full)
    o_uncond = flex(q, k, v, block_mask=text)
    return guidance(o_cond.float(), o_uncond.float()).to(q.dtype)


IMPLS = {
    "fastprobe-dual": fastprobe_dual,
    "fastprobe-sink_attention": fastprobe_single,
    "sdpa-two-calls": sdpa_two_calls,
    "sdpa-cudnn-two-calls": sdpa_cudnn_two_calls,
    "flex-two-calls": flex_two_calls,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("device", _memory.bench_devices())
def test_dual_path_attention(benchmark, device, impl, request):
    _memory.skip_flex_unless_timed(impl, device)
    case = CASES[device]
    inputs = make_inputs(device, **case)
    _memory.skip_unless_sdpa_backend_runs(impl, IMPLS[impl], inputs)
    benchmark.group = f"dual_path_attention-{device}"
    benchmark.extra_info.update(
        impl=impl, baseline="fastprobe-sink_attention", dtype=str(case["dtype"]),
        shape=dict(B=case["batch"], H=case["heads"], L=case["length"], D=case["head_dim"], image=IMAGE_TOKENS),
        input_bytes=sum(t.nbytes for t in inputs[:4]), mask_bytes=inputs[4].nbytes,
    )
    with torch.no_grad():
        _memory.measure(benchmark, request, device, impl, IMPLS[impl], inputs, __file__, peers=IMPLS)


if __name__ == "__main__" and sys.argv[1:2] == ["--peak-rss"]:
    impl = IMPLS[sys.argv[2]]
    small = make_inputs("cpu", 1, 2, 16, 8, torch.float32)
    full = make_inputs("cpu", **CASES["cpu"])
    with torch.no_grad():
        _memory.print_rss_growth(lambda: impl(*small), lambda: impl(*full))
