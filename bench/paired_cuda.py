"""Ratios that are goals, timed in pairs on one device: each block runs a row, its peer, the peer,
the row (bench/_memory.py's paired_blocks), so that the host's and the GPU's drift within a
run (the H200 machine's host time per call moved 107 -> 163 us between two calls of one session)
adds to both sides alike. Two clocks per side:
  whole:  each call waited for (torch.cuda.synchronize), what the pytest-benchmark rows time;
  stream: STREAM_CALLS calls back to back between two CUDA events, per call (a model's pattern:
          the host's time hides behind the GPU's where the GPU's is longer).
The ratio is the row's time over its peer's (1.10 = 10% slower), the median of the blocks' with
their quartiles; then each side's median milliseconds. The pairs:
  - dual_path_attention (rows "all") over one sink_attention call (issue goal: <= 1.15x on GPU),
    bench/test_dual_attention_bench.py's case;
  - the recording forward (fp.record_attention on the patched model) over the SDPA forward (goal
    <= 1.2x), and the two parts of that gap: the patched forward without recording over the SDPA
    forward, and the recording forward over the patched forward; bench/test_patch_bench.py's case.

    python3 -m bench.paired_cuda [BLOCKS]   (default 30; without a GPU, the CPU cases, whole calls only)

bench/gpu.sh runs it after the timed pass when its families include dual_attention or patch, with
the budget's time left (FASTPROBE_DEADLINE: no block starts after it), into bench.log.
"""

import statistics
import sys
import time

import torch

from bench import test_dual_attention_bench as dual
from bench import test_patch_bench as patch

from bench._deadline import past_deadline
from bench._memory import median_quartiles, paired_blocks

STREAM_CALLS = 10


def patched_forward(ids):
    """The patched model's forward with no recording."""
    return patch.model_for(ids, "patched")(input_ids=ids, use_cache=False).logits


def pairs(device: str) -> dict:
    """name -> (row, peer, inputs)."""
    dual_inputs = dual.make_inputs(device, **dual.CASES[device])
    ids = patch.make_inputs(device, **patch.CASES[device])
    patch.models(device, patch.CASES[device]["dtype"])
    return {
        "dual path / one sink_attention call": (dual.fastprobe_dual, dual.fastprobe_single, dual_inputs),
        "recording forward / SDPA forward": (patch.fastprobe_record, patch.sdpa_forward, ids),
        "patched forward / SDPA forward": (patched_forward, patch.sdpa_forward, ids),
        "recording forward / patched forward": (patch.fastprobe_record, patched_forward, ids),
    }


def clocks(device: str) -> dict:
    """name -> timer(call, inputs) -> seconds per call."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def whole(call, inputs):
        sync()
        start = time.perf_counter()
        call(*inputs)
        sync()
        return time.perf_counter() - start

    def stream(call, inputs):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync()
        begin.record()
        for _ in range(STREAM_CALLS):
            call(*inputs)
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) * 1e-3 / STREAM_CALLS

    return {"whole": whole, "stream": stream} if cuda else {"whole": whole}


def paired(timer, row, peer, inputs, blocks: int) -> tuple:
    """(ratio median, low quartile, high quartile, row's median s, peer's median s, blocks run)."""
    for call in (row, peer, row, peer):  # compiles, autotunes, caches
        timer(call, inputs)
    timings = paired_blocks(lambda: timer(row, inputs), lambda: timer(peer, inputs), blocks, stop=past_deadline)
    if len(timings) < 2:
        return None
    ratio, low, high = median_quartiles([sum(mine) / sum(theirs) for mine, theirs in timings])
    mine = statistics.median([time for times, _ in timings for time in times])
    theirs = statistics.median([time for _, times in timings for time in times])
    return ratio, low, high, mine, theirs, len(timings)


def main(blocks: int = 30) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"paired timing on {name}, torch {torch.__version__}, {blocks} blocks of row, peer, peer, row")
    print(f"{'pair':40s} {'clock':6s} {'ratio':>6s} {'quartiles':>13s} {'row ms':>9s} {'peer ms':>9s} blocks")
    with torch.no_grad():
        for pair, (row, peer, inputs) in pairs(device).items():
            inputs = inputs if isinstance(inputs, tuple) else (inputs,)
            for clock, timer in clocks(device).items():
                if past_deadline():
                    print(f"{pair:40s} {clock:6s} skipped: past the deadline (FASTPROBE_DEADLINE)")
                    continue
                result = paired(timer, row, peer, inputs, blocks)
                if result is None:
                    print(f"{pair:40s} {clock:6s} too few blocks before the deadline")
                    continue
                ratio, low, high, mine, theirs, ran = result
                print(f"{pair:40s} {clock:6s} {ratio:6.3f} {low:6.3f}-{high:6.3f} {mine * 1e3:9.3f} "
                      f"{theirs * 1e3:9.3f} {ran}", flush=True)


if __name__ == "__main__":
    main(*(int(value) for value in sys.argv[1:2]))
