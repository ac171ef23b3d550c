"""Where a call's time goes on a CUDA machine: the host's share and the GPU's.

The H200 run of 2026-11-30 (bench/NOTES.md) saw every fastprobe call cost about 0.2 ms more
than its kernels could explain (a decoding step over a 4096-key window took 0.29 ms, prefill
of 1024 tokens 0.32 ms against SDPA's 0.10 ms), while the same Python path takes about 35 us
per call on this project's CPU machine. This script splits each call's time into:
  host:   until the call returns, the GPU idle before it (Python, checks, launches);
  graph:  one replay of the call captured in a CUDA graph (its kernels alone, no host work;
          "-" when the call cannot be captured, e.g. a check that syncs);
  whole:  one call and a synchronize, what the benchmarks time;
  b2b:    per call of ROUNDS calls back to back, one synchronize at the end (as in a model's
          forward: host time overlaps the GPU's, so the larger of the two shows);
medians of 200 rounds, in microseconds, then a cProfile of the host side of the slowest one (by
own and by cumulative time), torch.profiler's table of its dispatcher ops and CUDA runtime calls, and
one prefill launch split into Triton's binder and its launcher, beside a few host primitives.
It runs in bench/gpu.sh before the benchmarks (into setup.log), where the cases left when its
deadline (FASTPROBE_DEADLINE, bench/_deadline.py) has passed are skipped, and alone:

    python3 bench/host_overhead.py

With --decode (no GPU needed): the host cost of one decoding step's attention call on the CPU, in a
tiny Llama (Lq = 1, Lk = 26, 1 thread), fastprobe's patched attention function against sdpa's, each
called with the arguments its model handed layer 0 (captured from a real step); microseconds per
call of CPU time (time.process_time: a loaded machine's preemption does not count), min and median
of the rounds, the two alternated in every round:

    python3 bench/host_overhead.py --decode [ROUNDS]
"""

import cProfile
import io
import pstats
import statistics
import sys
import time
import timeit

import torch
import torch.nn.functional as F

import fastprobe as fp
from fastprobe.kernels import attention as triton_attention
from fastprobe.methods._batching import cache_argument, output_cache
from fastprobe.ops.attention import prepare_key_groups

try:
    from bench._deadline import past_deadline
except ImportError:  # run as a script (bench/ itself on sys.path)
    from _deadline import past_deadline

ROUNDS = 200


def medians(call) -> tuple:
    """(host, whole) median seconds of ROUNDS calls, each started on an idle GPU."""
    host, whole = [], []
    for _ in range(ROUNDS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        call()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        host.append(returned - start)
        whole.append(time.perf_counter() - start)
    return statistics.median(host), statistics.median(whole)


def back_to_back(call) -> float:
    """Seconds per call of ROUNDS calls launched back to back, then one synchronize."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(ROUNDS):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / ROUNDS


def graph_replay(call):
    """Median seconds of one replay of `call` captured in a CUDA graph, or None."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            call()  # (allocations of the capture come from the graph's pool)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
    except Exception as error:  # a host sync or an unsupported launch inside the call
        return None, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(ROUNDS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times), None


def cases(device: str = "cuda") -> dict:
    """name -> call; on `device` (bench/precompile_triton.py compiles the same launches on CPU tensors)."""
    dtype = torch.bfloat16
    heads, dim = 32, 128

    def qkv(queries, keys):
        shape = lambda length: (1, heads, length, dim)  # noqa: E731
        return (torch.randn(shape(queries), device=device, dtype=dtype),
                torch.randn(shape(keys), device=device, dtype=dtype),
                torch.randn(shape(keys), device=device, dtype=dtype))  # fmt: skip

    q, k, v = qkv(1024, 1024)
    groups = (torch.arange(1024, device=device) % 3).expand(1, -1)
    prepared = prepare_key_groups(groups, 3)  # checked once: no host sync per call
    keep = torch.ones(heads, dtype=torch.bool, device=device)
    dq, dk, dv = qkv(1, 32768)
    # the launcher alone, on outputs allocated once (what the op layer adds is the difference)
    out, lse, sink_mass = torch.empty_like(q), *(torch.empty(1, heads, 1024, device=device) for _ in range(2))
    ends = torch.ones(1, dtype=torch.int64, device=device)
    launcher_args = dict(scale=dim**-0.5, causal=True, window=0, key_real=None, sink_end=ends, stat_end=ends,
                         head_mask=None, sink_logit=None, key_groups=None, num_groups=1)  # fmt: skip
    return {
        "sdpa causal L=1024": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "fastprobe causal L=1024": lambda: fp.sink_attention(q, k, v),
        "triton launcher only L=1024": lambda: triton_attention.sink_attention(
            q, k, v, out, lse, sink_mass, None, None, **launcher_args
        ),
        "fastprobe head_mask L=1024": lambda: fp.sink_attention(q, k, v, head_mask=keep),
        "fastprobe groups+entropy L=1024": lambda: fp.sink_attention(
            q, k, v, key_groups=groups, num_groups=3, return_entropy=True
        ),
        "fastprobe prepared groups+entropy L=1024": lambda: fp.sink_attention(
            q, k, v, key_groups=prepared, return_entropy=True
        ),
        "sdpa decode Lk=32768": lambda: F.scaled_dot_product_attention(dq, dk, dv),
        "fastprobe decode Lk=32768": lambda: fp.sink_attention(dq, dk, dv),
        "fastprobe decode window=4096": lambda: fp.sink_attention(dq, dk, dv, window=4096, num_sink=4),
    }


def loop_us(call, number: int = 2000) -> float:
    """Best of 5 loops of `number` calls, microseconds per call (host-only work, no launches)."""
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def launch_parts(device: str = "cuda") -> None:
    """Triton's share of one prefill launch, and what a few host primitives cost on this machine
    (the same loop on the project's CPU machine tells how much slower this host runs Python)."""
    q, k, v = (torch.randn(1, 32, 1024, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    out, lse, sink_mass = torch.empty_like(q), *(torch.empty(1, 32, 1024, device=device) for _ in range(2))
    ends = torch.ones(1, dtype=torch.int64, device=device)
    kernel, captured = triton_attention._attention_fwd_kernel, {}
    unbound_run = type(kernel).run

    def spy(self, *args, grid, warmup, **kwargs):
        captured.update(args=args, kwargs=kwargs, grid=grid)
        captured["compiled"] = unbound_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return captured["compiled"]

    kernel.run = spy.__get__(kernel)
    try:
        for _ in range(3):
            triton_attention.sink_attention(q, k, v, out, lse, sink_mass, None, None, scale=128**-0.5, causal=True,
                                            window=0, key_real=None, sink_end=ends, stat_end=ends, head_mask=None,
                                            sink_logit=None, key_groups=None, num_groups=1)  # fmt: skip
    finally:
        del kernel.run
    args, kwargs, grid, compiled = captured["args"], captured["kwargs"], captured["grid"], captured["compiled"]
    binder = kernel.device_caches[torch.cuda.current_device()][-1]
    bound = binder(*args, **kwargs)[0]
    grid = tuple(grid(bound) if callable(grid) else grid)
    grid += (1,) * (3 - len(grid))  # (a compiled kernel takes all three)
    values = tuple(bound.values())
    launches = {
        "kernel[grid](*args, **flags) (Triton's run)": lambda: kernel[grid](*args, **kwargs),
        # (Triton 3.6's and 3.9's launcher takes every bound argument, constexprs too; 3.0's the others)
        "compiled[grid](*bound values) (no binder)": lambda: compiled[grid](*values),
    }
    print(f"\nOne prefill launch ({len(args)} arguments, {len(kwargs)} keywords), host us, median of {ROUNDS}:")
    for name, call in launches.items():
        print(f"  {name:48s} {medians(call)[0] * 1e6:8.1f}")
    shape, bf16 = (1, 32, 1024, 128), torch.bfloat16

    def device_context():
        with torch.cuda.device(q.device):
            pass

    primitives = {
        "Triton's binder alone": lambda: binder(*args, **kwargs),
        "torch.empty on the GPU": lambda: torch.empty(shape, dtype=bf16, device=q.device),
        "torch.empty on the CPU": lambda: torch.empty(shape, dtype=bf16),
        "with torch.cuda.device(q.device): pass": device_context,
        "q.stride()": q.stride,
        "tuple(q.shape)": lambda: tuple(q.shape),
        "pure Python: sum(range(100))": lambda: sum(range(100)),
    }
    print("Host primitives, us per call (best of 5 x 2000):")
    for name, call in primitives.items():
        print(f"  {name:48s} {loop_us(call):8.2f}")


def decode_step_calls() -> dict:
    """name -> call: layer 0's attention function of one decoding step of a tiny Llama (transformers'
    sdpa, then fastprobe's after fp.patch), called with the arguments the model handed it."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 128, (1, 25))
    calls = {}
    for name in ("sdpa", "fastprobe"):
        if name == "fastprobe":
            fp.patch(model)
        with torch.no_grad():
            prefill = model(prompt, use_cache=True)
        captured = {}
        function = ALL_ATTENTION_FUNCTIONS[name]

        def first_call(module, *args, function=function, **kwargs):
            captured.setdefault("call", (function, module, args, kwargs))
            return function(module, *args, **kwargs)

        # a local override of the registry's entry (4.x and 5.x models both look it up there), taken back after
        ALL_ATTENTION_FUNCTIONS[name] = first_call
        try:
            with torch.no_grad():
                cache = {cache_argument(model): output_cache(prefill)}  # (transformers 5.x: cache; 4.x: past_key_values)
                model(prefill.logits[:, -1:].argmax(-1), **cache, use_cache=True)
        finally:
            del ALL_ATTENTION_FUNCTIONS[name]
        function, module, args, kwargs = captured["call"]
        calls[name] = lambda function=function, module=module, args=args, kwargs=kwargs: function(
            module, *args, **kwargs)
    return calls


def decode_step(rounds: int = 7, number: int = 2000) -> None:
    """Print decode_step_calls' CPU time per call (see the module docstring)."""
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    calls = decode_step_calls()
    times = {name: [] for name in calls}
    with torch.no_grad():  # (as in generate)
        for _ in range(rounds):
            for name, call in calls.items():
                for _ in range(200):
                    call()
                best = min(timeit.repeat(call, number=number, repeat=3, timer=time.process_time))
                times[name].append(best / number * 1e6)
    print(f"decode-step attention call, tiny Llama (Lq = 1, Lk = 26, 1 thread), CPU us per call over {rounds} rounds:")
    for name, values in times.items():
        print(f"  {name:10s} min {min(values):6.2f}  median {statistics.median(values):6.2f}  "
              f"({', '.join(f'{value:.1f}' for value in values)})")


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    with open("/proc/cpuinfo") as cpuinfo:
        print(next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "cpu ?"))
    print(f"{'call':34s} {'host us':>9s} {'graph us':>9s} {'whole us':>9s} {'b2b us':>9s}")
    slowest, slowest_host = None, 0.0
    for name, call in cases().items():
        if past_deadline():  # (bench/gpu.sh's FASTPROBE_DEADLINE: each case compiles, then times)
            print(f"{name:34s} skipped: past the deadline (FASTPROBE_DEADLINE)")
            continue
        for _ in range(10):  # compile, autotune, caches
            call()
        host, whole = medians(call)
        replay, why = graph_replay(call)
        shown = "-" if replay is None else f"{replay * 1e6:9.1f}"
        chained = back_to_back(call)
        print(f"{name:34s} {host * 1e6:9.1f} {shown:>9s} {whole * 1e6:9.1f} {chained * 1e6:9.1f}"
              + (f"  ({why})" if why else ""))
        if name.startswith("fastprobe") and host > slowest_host:
            slowest, slowest_host = (name, call), host
    if slowest is None or past_deadline():
        print("cProfile and the launch's parts skipped: past the deadline (FASTPROBE_DEADLINE)")
        return
    name, call = slowest
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(ROUNDS):
        call()
    torch.cuda.synchronize()
    profiler.disable()
    for order, rows in (("tottime", 25), ("cumulative", 40)):
        report = io.StringIO()
        pstats.Stats(profiler, stream=report).sort_stats(order).print_stats(rows)
        print(f"\ncProfile of {ROUNDS} calls of '{name}', by {order}:")
        print("\n".join(report.getvalue().splitlines()[:rows + 12]))
    runtime_profile(name, call)
    launch_parts()


def runtime_profile(name: str, call) -> None:
    """torch.profiler's CPU side of ROUNDS calls: the dispatcher's ops (CUDA allocations included)
    and the CUDA runtime and driver calls (kernel launches), by self CPU time; what cProfile
    cannot see inside C calls."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            for _ in range(ROUNDS):
                call()
            torch.cuda.synchronize()
    except Exception as error:  # (no CUPTI, say: the launch's parts still run)
        print(f"\ntorch.profiler failed: {type(error).__name__}: {error}")
        return
    print(f"\ntorch.profiler, {ROUNDS} calls of '{name}', by self CPU time:")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=48))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--decode"]:
        decode_step(*(int(value) for value in sys.argv[2:3]))
    else:
        main()
