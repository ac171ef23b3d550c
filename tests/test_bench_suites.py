"""The benchmark suites stay runnable (they run only on demand and on the rare GPU machine, where a
broken suite would cost device time): every suite collects, and the implementations each group
times compute the same figures on a small case (the suites time them without comparing outputs,
but for the Liger peers, which need CUDA), and bench/report.py labels its rows right."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None  # torch 2.5+


def test_every_bench_suite_collects():
    run = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    suites = {path.name for path in (ROOT / "bench").glob("test_*_bench.py")}
    collected = {line.split("::")[0].rpartition("/")[2] for line in run.stdout.splitlines() if "::" in line}
    assert suites and suites <= collected, f"suites with no CPU case collected: {sorted(suites - collected)}"


def test_method_bench_implementations_agree(monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("pandas")
    from bench import test_methods_bench as suite

    monkeypatch.setitem(suite.CASES, "cpu", dict(batch=2, length=24, dtype=torch.float32))
    monkeypatch.setattr(suite, "MODEL", dict(num_layers=3, num_heads=2, hidden_size=32, vocab_size=700))
    for cached in (suite.models, suite.texts_and_tokenizer):
        cached.cache_clear()
    try:
        with torch.no_grad():
            batch = suite.make_batch("cpu")
            torch.testing.assert_close(suite.fastprobe_collect(batch), suite.output_hidden_states(batch))
            tokens, eager = suite.fastprobe_uncertainty("cpu"), suite.eager_uncertainty("cpu")
        for name in ("epistemic", "jsd", "kl_mixture_target"):
            torch.testing.assert_close(torch.tensor(tokens[name].to_numpy()), eager[name].double(), atol=1e-5,
                                       rtol=1e-4)
    finally:
        for cached in (suite.models, suite.texts_and_tokenizer):
            cached.cache_clear()


def test_attention_statistics_rows_time_what_they_name():
    """The GPU statistics rows take the key groups their docstrings name, prepared once; on a
    small CPU case they run and their groups are those ids."""
    import fastprobe as fp
    from bench import test_attention_bench as suite

    q, k, v = suite.make_qkv("cpu", 2, 4, 600, 16, torch.float32)
    runs = torch.full((2, 600), 2)
    runs[:, 0], runs[:, 1:577] = 0, 1
    for layout, run, raw in (("cyclic", suite.fastprobe_all_stats, torch.arange(600).expand(2, -1) % 3),
                             ("runs", suite.fastprobe_all_stats_runs, runs)):
        prepared = suite.prepared_groups(layout, 2, 600, k.device)
        assert prepared.num_groups == 3 and torch.equal(prepared.ids, raw.int())
        want = fp.sink_attention(q, k, v, key_groups=raw, num_groups=3, return_entropy=True).out
        assert torch.equal(run(q, k, v), want)


def test_concept_gradient_rows_time_the_same_gradient():
    """The concept_mass forward-backward rows differentiate the same loss: on a small case the
    fused gradient and the eager reference's agree."""
    from bench import test_concepts_bench as suite

    logits, concepts, weights = suite.with_weights(*suite.make_inputs("cpu", 3, 500, 20, 4, torch.float32))
    (fused,), (eager,) = suite.fastprobe_grad(logits, concepts, weights), suite.eager_grad(logits, concepts, weights)
    assert fused.abs().sum() > 0
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-6)


def test_attention_stats_sweep_allocates_through_the_op_layer():
    """bench/sweep_attention_stats.py's launcher calls the op layer's private _prepare / _outputs
    (their signatures change with it): its launches are built on CPU without running a kernel,
    with the outputs each statistic set asks for."""
    pytest.importorskip("triton")
    from bench import sweep_attention_stats as sweep

    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    for name, options in sweep.variants(40, "cpu").items():
        call = sweep.launcher(q, k, v, options)
        groups, entropy = "key_groups" in options, options.get("return_entropy", False)
        assert len(call.outputs) == 3 + groups + entropy, name


@pytest.mark.interpreter
def test_dual_path_sweep_times_each_kept_config_beside_one_attention_call(capsys):
    """bench/sweep_attention_stats.py's dual-path part (through the Triton interpreter): the dual
    kernel's kept configs, each forced through dual_attention's own launch, timed beside one
    sink_attention launch on the same config, with the output's difference from the first config
    (the output is poisoned with NaN before each config runs: what one leaves unwritten differs)."""
    from bench import sweep_attention_stats as sweep

    sweep.sweep_dual("cpu", torch.float32, 24, 2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("-- ")]
    assert len(lines) == 2 and all("one call" in line and "max |diff| vs the first 0.00e+00" in line for line in lines)


def test_report_labels_splits_and_skips(tmp_path, capsys):
    """bench/report.py: the op column is the group less its device suffix (op names hold hyphens),
    an empty or foreign JSON is skipped with a line on stderr, and --merge joins per-family runs."""
    import json

    from bench import report

    def document(*groups):
        return {"machine_info": {"gpu": "NVIDIA H200", "date": "2026-12-01T00:00:00"}, "datetime": "2026-12-01",
                "benchmarks": [{"group": group, "name": f"test[{group}]", "stats": {"median": 1e-3},
                                "extra_info": {"impl": "fastprobe", "shape": {"L": 4096}}} for group in groups]}

    (tmp_path / "a.json").write_text(json.dumps(document("sink_attention_head-mask_L4096-cuda",
                                                         "sink_attention_sink-window_L4096-cuda")))
    (tmp_path / "b.json").write_text(json.dumps(document("sink_attention_bfloat16-decode-cpu",
                                                         "draft_divergence-cuda")))
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "list.json").write_text("[]")
    paths = [str(tmp_path / name) for name in ("a.json", "empty.json", "b.json", "list.json")]
    assert report.merge(str(tmp_path / "merged.json"), paths) == 0
    report.main([str(tmp_path / "merged.json"), str(tmp_path / "missing.json")])
    out, err = capsys.readouterr()
    table = out.partition("\nRuns:")[0].strip().splitlines()  # (the list of runs follows the table)
    ops = [line.split(" | ")[0].removeprefix("| ") for line in table[2:]]
    assert ops == ["sink_attention_head-mask_L4096", "sink_attention_sink-window_L4096",
                   "sink_attention_bfloat16-decode", "draft_divergence"]
    assert all(f"skipped {tmp_path / name}" in err for name in ("empty.json", "list.json", "missing.json"))


@pytest.mark.parametrize("files", [[], ["bench/results/nothing-*.json"]])
def test_report_without_results_is_an_error(files):
    """(`python bench/report.py` with no file, or with a glob that matched none and so passed
    itself, printed the table's header alone and exited 0)"""
    run = subprocess.run([sys.executable, "bench/report.py", *files], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0 and run.stdout == ""
    assert "no pytest-benchmark results in" in run.stderr and "usage: python bench/report.py" in run.stderr


def test_report_devices_and_fastest_peer(tmp_path, capsys):
    """bench/report.py: a row's device is its group's (a run on a CUDA machine has CPU rows too, not
    the GPU's), and each fastprobe row is also compared with the fastest peer of its group (here
    torch.compile, not the declared eager baseline); a group without peers gets "-"."""
    import json

    from bench import report

    def bench(group, impl, median, baseline):
        return {"group": group, "name": f"test[{impl}]", "stats": {"median": median},
                "extra_info": {"impl": impl, "baseline": baseline, "speedup_vs_baseline": 1.0}}

    benchmarks = [bench(f"op-{device}", impl, median, "eager") for device in ("cpu", "cuda")
                  for impl, median in (("fastprobe", 1.0), ("eager", 8.0), ("torch.compile", 4.0))]
    benchmarks.append(bench("stats-cuda", "fastprobe-more", 2.0, "fastprobe"))
    (tmp_path / "run.json").write_text(json.dumps(
        {"machine_info": {"gpu": "NVIDIA H200", "cpu_threads": 16, "date": "2026-12-01"}, "benchmarks": benchmarks}))
    report.main([str(tmp_path / "run.json")])
    lines = capsys.readouterr().out.partition("\nRuns:")[0].strip().splitlines()
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    column = {name: index for index, name in enumerate(table[0])}
    got = [(row[column["device"]], row[column["implementation"]], row[column["vs fastest peer"]]) for row in table[2:]]
    assert got == [("CPU, 16 threads", "fastprobe", "4.00x vs torch.compile"), ("CPU, 16 threads", "eager", "-"),
                   ("CPU, 16 threads", "torch.compile", "-"), ("NVIDIA H200", "fastprobe", "4.00x vs torch.compile"),
                   ("NVIDIA H200", "eager", "-"), ("NVIDIA H200", "torch.compile", "-"),
                   ("NVIDIA H200", "fastprobe-more", "-")]


def test_report_shows_paired_speedups_against_the_baseline_and_the_fastest_peer(tmp_path, capsys):
    """bench/report.py: a row timed in alternation with its peers shows those paired speed-ups
    (median and quartiles), against its declared baseline and its fastest peer, once each; rows
    without them (older runs, the peers' own rows) show "-"."""
    import json

    from bench import report

    paired = {"eager": dict(speedup=7.5, low=7.25, high=8.0, blocks=4),
              "torch.compile": dict(speedup=3.5, low=3.25, high=3.75, blocks=9)}
    benchmarks = [{"group": "op-cpu", "name": f"test[{impl}]", "stats": {"median": median},
                   "extra_info": {"impl": impl, "baseline": baseline, **extra}}
                  for impl, median, baseline, extra in (("fastprobe", 1.0, "eager", {"paired": paired}),
                                                        ("fastprobe-old", 1.0, "torch.compile", {}),
                                                        ("fastprobe-same", 1.0, "torch.compile", {"paired": paired}),
                                                        ("eager", 8.0, "eager", {}),
                                                        ("torch.compile", 4.0, "eager", {}))]
    (tmp_path / "run.json").write_text(json.dumps(
        {"machine_info": {"cpu_threads": 2, "date": "2026-12-04"}, "benchmarks": benchmarks}))
    report.main([str(tmp_path / "run.json")])
    lines = capsys.readouterr().out.partition("\nRuns:")[0].strip().splitlines()
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    column = table[0].index("paired (quartiles)")
    assert [row[column] for row in table[2:]] == [
        "7.50x (7.25-8.00) vs eager; 3.50x (3.25-3.75) vs torch.compile", "-",
        "3.50x (3.25-3.75) vs torch.compile", "-", "-"]


class _SteadilySlowingMachine:
    """A clock and two calls on a machine that slows down steadily: each call costs its base time
    times 1 + 0.05 per call made before it; the peer's base time is twice the call's."""

    def __init__(self):
        self.now, self.calls = 0.0, 0

    def clock(self):
        return self.now

    def work(self, base):
        self.now += base * (1 + 0.05 * self.calls)
        self.calls += 1

    def call(self):
        self.work(0.01)

    def peer(self):
        self.work(0.02)


def test_paired_speedup_holds_on_a_machine_whose_speed_drifts():
    """_memory.paired_speedup: on a machine that slows down call after call, the ratio of two
    medians timed one after the other is off (here the peer's rounds, run later, look 2.7x
    slower), the median of the blocks' ratios is not; the number of blocks follows the budget."""
    from bench import _memory

    machine = _SteadilySlowingMachine()
    separate = [machine.clock()]
    for run in [machine.call] * 15 + [machine.peer] * 5:  # (measure's rounds, one row after the other)
        run()
        separate.append(machine.clock())
    times = [b - a for a, b in zip(separate, separate[1:])]
    assert sorted(times[15:])[2] / sorted(times[:15])[7] > 2.5  # the drift, as separate rows see it

    machine = _SteadilySlowingMachine()
    found = _memory.paired_speedup(machine.call, machine.peer, (), clock=machine.clock)
    assert found["blocks"] == _memory.PAIRED_BLOCKS[1]  # 3 s of budget, ~0.06 s a block: the most blocks
    assert found["low"] == pytest.approx(2.0) and found["speedup"] == pytest.approx(2.0)
    assert found["high"] == pytest.approx(2.0)  # (a linear drift cancels within each block exactly)
    slow = _SteadilySlowingMachine()
    slow.call, slow.peer = (lambda: slow.work(1.0)), (lambda: slow.work(2.0))
    assert _memory.paired_speedup(slow.call, slow.peer, (), clock=slow.clock)["blocks"] == _memory.PAIRED_BLOCKS[0]


def test_paired_speedup_is_not_moved_by_which_call_of_a_pair_runs_second():
    """_memory.paired_speedup against a machine where a call that follows another function's call
    runs 20% slower (caches the other evicted) and the two functions cost the same: each side
    runs as often first as second after the other in a block, so the speed-up is 1."""
    from bench import _memory

    machine, last = _SteadilySlowingMachine(), []

    def run(name):
        machine.now += 0.01 * (1.2 if last and last[-1] != name else 1.0)
        last.append(name)

    found = _memory.paired_speedup(lambda: run("call"), lambda: run("peer"), (), clock=machine.clock)
    assert found["speedup"] == pytest.approx(1.0)


def test_measure_pairs_a_cpu_fastprobe_row_with_its_baseline_and_the_peers_timed_there(monkeypatch):
    """_memory.measure on the CPU with the suite's implementations: a fastprobe row is paired with
    its declared baseline (here another fastprobe row, as the dual path's) and each peer the suite
    times on the CPU (not FlexAttention, skipped there); a peer's row and a disabled benchmark
    (--benchmark-disable) are not paired."""
    from bench import _memory

    class Benchmark:
        disabled = False

        def __init__(self, baseline):
            self.extra_info = {"baseline": baseline}

        def pedantic(self, run, rounds, warmup_rounds, iterations):
            for _ in range(warmup_rounds + rounds):
                run()

    calls = []
    impls = {name: (lambda *inputs, name=name: calls.append(name))
             for name in ("fastprobe-dual", "fastprobe-sink_attention", "sdpa-two-calls", "flex-two-calls")}
    monkeypatch.setattr(_memory, "cpu_peak_extra_bytes", lambda script, impl: 0)
    monkeypatch.setattr(_memory, "PAIRED_BUDGET_S", 0.0)
    benchmark = Benchmark("fastprobe-sink_attention")
    _memory.measure(benchmark, None, "cpu", "fastprobe-dual", impls["fastprobe-dual"], (), "suite.py", peers=impls)
    assert list(benchmark.extra_info["paired"]) == ["fastprobe-sink_attention", "sdpa-two-calls"]
    assert {found["blocks"] for found in benchmark.extra_info["paired"].values()} == {_memory.PAIRED_BLOCKS[0]}
    assert "flex-two-calls" not in calls
    for impl, disabled in (("sdpa-two-calls", False), ("fastprobe-dual", True)):
        benchmark = Benchmark("fastprobe-sink_attention")
        benchmark.disabled = disabled
        calls.clear()
        _memory.measure(benchmark, None, "cpu", impl, impls[impl], (), "suite.py", peers=impls)
        assert "paired" not in benchmark.extra_info and set(calls) == {impl}


def test_triton_configs_names_what_the_autotuner_chose_for_each_launch(monkeypatch):
    """_memory.triton_configs: one more call, each launch through a kernel module's launch_tuned
    named with the config chosen for it (tuned on that call, or earlier), in launch order without
    repeats; the modules get their own launch_tuned back, even when the call raises."""
    pytest.importorskip("triton")
    import triton

    from bench import _memory
    from fastprobe.kernels import _launch, divergence

    launched = []

    class Kernel:
        def __init__(self, name):
            self.__name__ = name

        def __getitem__(self, grid):
            return lambda *args, **options: launched.append((self.__name__, options))

    class Tuned:
        def __init__(self, kernel, config):
            self.kernel, self.best_config = kernel, config

        def __getitem__(self, grid):
            return self.kernel[grid]

    monkeypatch.setattr(_launch, "_CHOSEN", {})
    first = Tuned(Kernel("_first_kernel"), triton.Config({"BLOCK_V": 2048, "PREFETCH": False}, num_warps=8, num_stages=1))
    second = Tuned(Kernel("_second_kernel"), triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=3))
    _launch._CHOSEN[(second, "key")] = second.best_config  # tuned by an earlier row

    def call():
        for tuned in (first, second, first):
            divergence.launch_tuned(tuned, tuned.kernel, (1,), (), {"K_PAD": 4}, "key")

    assert _memory.triton_configs(call) == [
        "_first_kernel: BLOCK_V=2048, PREFETCH=False, num_warps=8, num_stages=1",
        "_second_kernel: BLOCK_M=64, num_warps=4, num_stages=3",
    ]
    assert len(launched) == 3 and launched[1] == ("_second_kernel", {"K_PAD": 4, "enable_fp_fusion": True, "BLOCK_M": 64,
                                                                     "num_warps": 4, "num_stages": 3})
    assert divergence.launch_tuned is _launch.launch_tuned

    def failing():
        raise RuntimeError("kernel failed")

    with pytest.raises(RuntimeError):
        _memory.triton_configs(failing)
    assert divergence.launch_tuned is _launch.launch_tuned


@pytest.fixture
def uncompiled(monkeypatch):
    """torch.compile as the identity: a compiled peer's wrapper still runs (its compile would take
    minutes here). The suites' caches of compiled functions are emptied before and after."""
    from bench import test_attention_bench, test_bridge_bench, test_concepts_bench, test_divergence_bench
    from bench import test_dual_attention_bench

    monkeypatch.setattr(torch, "compile", lambda function, **options: function)
    for suite, name in ((test_divergence_bench, "_compiled_eager"), (test_concepts_bench, "_compiled_eager"),
                        (test_concepts_bench, "_compiled_grad")):
        monkeypatch.setattr(suite, name, None)
    monkeypatch.setattr(test_bridge_bench, "_compiled", {})
    flex_caches = (test_attention_bench._flex, test_attention_bench._flex_documents, test_attention_bench._flex_blocks,
                   test_dual_attention_bench._flex)
    for cache in flex_caches:
        cache.cache_clear()
    yield
    for cache in flex_caches:
        cache.cache_clear()


def _fields(result):
    return result if isinstance(result, dict) else result._asdict()


def test_vocabulary_peers_compute_what_fastprobe_computes(uncompiled):
    """Every implementation timed in a draft_divergence, concept_mass or bridge_loss group computes
    what fastprobe's computes, on a small case (the suites time them without comparing)."""
    from bench import test_bridge_bench as bridge
    from bench import test_concepts_bench as concepts
    from bench import test_divergence_bench as divergence

    for suite, inputs in ((divergence, divergence.make_inputs("cpu", 3, 5, 300, torch.float32)),
                          (concepts, concepts.make_inputs("cpu", 3, 500, 20, 4, torch.float32))):
        impls = {**suite.IMPLS, **suite.STEP_IMPLS}
        want = _fields(impls["fastprobe"](*inputs))
        for name, call in impls.items():
            got = _fields(call(*inputs))
            for field, value in want.items():
                torch.testing.assert_close(got[field], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {field}")
    for impls, make in ((bridge.LOGIT_IMPLS, bridge.make_logits), (bridge.REVERSE_IMPLS, bridge.make_logits),
                        (bridge.LINEAR_IMPLS, bridge.make_hidden)):
        inputs = make("cpu", 16, 300, 8, torch.float32)
        want = next(call for name, call in impls.items() if name.startswith("fastprobe"))(*inputs)
        for name, call in impls.items():
            for got, value in zip(call(*inputs), want, strict=True):
                torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=name)


def test_bridge_reverse_rows_time_the_reverse_loss(uncompiled):
    """The reverse bridge_loss rows take the loss KL(P_S || Q) (the reference's per-row formula, not
    the default direction's) and its gradient; the check every such row makes before timing passes
    for each of them and rejects the default direction's figures."""
    import fastprobe as fp
    from bench import test_bridge_bench as bridge
    from fastprobe import reference

    student, teacher = bridge.make_logits("cpu", 16, 300, 8, torch.float32)
    student = 4 * student  # (peaked distributions: the two directions' losses differ by far more than the tolerance)
    rows = {direction: reference.bridge_rows(student, teacher, beta=bridge.BETA, direction=direction)
            for direction in ("forward", "reverse")}
    assert not torch.allclose(rows["reverse"].mean(), rows["forward"].mean(), rtol=1e-2)
    fastprobe_figures = bridge.fastprobe_reverse_step(student, teacher)
    for name, call in bridge.REVERSE_IMPLS.items():
        figures = call(student, teacher)
        torch.testing.assert_close(figures[0], rows["reverse"].mean(), msg=name)
        bridge.assert_same_values(figures, fastprobe_figures, torch.float32, name)
    z = student.detach().requires_grad_()
    forward_loss = fp.bridge_loss(z, teacher, beta=bridge.BETA)
    forward_figures = (forward_loss.detach(), *torch.autograd.grad(forward_loss, z))
    with pytest.raises(AssertionError, match="default direction, loss"):
        bridge.assert_same_values(forward_figures, fastprobe_figures, torch.float32, "default direction")


def test_attention_peers_compute_what_fastprobe_computes(uncompiled, monkeypatch):
    """Every implementation timed in an attention group computes fastprobe's output (and the
    first-token mass where it reads one) on a small case, the CUDA-only FlexAttention peers too
    (uncompiled, where torch has FlexAttention: 2.5+), with a window that binds;
    dual_path_attention's peers its guided output."""
    import fastprobe as fp
    from bench import test_attention_bench as attention
    from bench import test_dual_attention_bench as dual

    monkeypatch.setattr(attention, "WINDOW", 48)
    small = dict(batch=1, heads=2, length=16, head_dim=8, dtype=torch.float32)
    families = {"cpu": (small, lambda device, case: (attention.make_qkv(device, **case), None), attention.CPU_IMPLS)}
    for family, (cases, make, impls, _) in attention.VARIANTS.items():
        families[family] = (cases["small"], make, impls)
    with torch.no_grad():
        for family, (case, make, impls) in families.items():
            inputs, _ = make("cpu", case)
            sixteen_bit = case["dtype"] != torch.float32
            want = next(call for name, call in impls.items() if name.startswith("fastprobe"))(*inputs)
            for name, call in impls.items():
                if (name.startswith("flex") and not HAS_FLEX) or "cudnn" in name:  # (cuDNN: CUDA only)
                    continue
                got = call(*inputs)
                torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want, msg=f"{family}: {name}",
                                           rtol=1e-2 if sixteen_bit else 1e-4, atol=1e-2 if sixteen_bit else 1e-5)
        for num_queries in (200, 1):  # prefill and decoding, sinks + window
            q, k, v = attention.make_qkv("cpu", 1, 2, 200, 8, torch.float32, num_queries=num_queries)
            want = fp.sink_attention(q, k, v, window=48, num_sink=attention.NUM_SINK)
            torch.testing.assert_close(attention.fastprobe_sink_window(q, k, v), want.out, rtol=1e-4, atol=1e-5)
            if HAS_FLEX:
                out, mass = attention.flex_sink_window_mass(q, k, v)
                for got in (attention.flex_sink_window(q, k, v), out):
                    torch.testing.assert_close(got, want.out, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(mass, want.sink_mass, rtol=1e-4, atol=1e-6)
        inputs = dual.make_inputs("cpu", 1, 2, 600, 8, torch.float32)
        want = dual.fastprobe_dual(*inputs)
        for name in ("sdpa-two-calls", "flex-two-calls") if HAS_FLEX else ("sdpa-two-calls",):
            torch.testing.assert_close(dual.IMPLS[name](*inputs), want, rtol=1e-4, atol=1e-5, msg=name)


def test_dual_path_sdpa_peers_time_only_their_attention():
    """The dual-path SDPA peers take their mask as an input, made outside the timed call as every
    other peer's (they made the causal and text masks inside it, ~2% of their time): a call makes no
    boolean [.., L, L] tensor. The cuDNN row (both calls on SDPA's cuDNN backend) skips, with torch's
    reason, where that backend has no kernel (here: the CPU)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    from bench import _memory
    from bench import test_dual_attention_bench as dual

    inputs = dual.make_inputs("cpu", 1, 2, 600, 8, torch.float32)
    length = inputs[0].shape[2]

    class MasksMade(TorchFunctionMode):  # (torch-level calls: not SDPA's own internals, as torch 2.4's
        def __init__(self):               # math path negating a boolean mask)
            super().__init__()
            self.made = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.made += [str(func) for value in tree_leaves(out) if isinstance(value, torch.Tensor)
                          and value.dtype == torch.bool and tuple(value.shape[-2:]) == (length, length)]
            return out

    peers = [name for name in dual.IMPLS if name.startswith("sdpa") and "cudnn" not in name]
    assert peers
    with torch.no_grad():
        for name in peers:
            dual.IMPLS[name](*inputs)  # (as measure's untimed first call)
            with MasksMade() as mode:
                dual.IMPLS[name](*inputs)
            assert mode.made == [], f"{name} made masks inside its call: {mode.made}"
        assert "sdpa-cudnn-two-calls" in dual.IMPLS
        with pytest.raises(pytest.skip.Exception, match="sdpa-cudnn-two-calls: SDPA's backend has no kernel"):
            _memory.skip_unless_sdpa_backend_runs("sdpa-cudnn-two-calls", dual.IMPLS["sdpa-cudnn-two-calls"], inputs)


def test_flex_rows_skip_where_they_are_not_timed(monkeypatch):
    """A FlexAttention row skips on the CPU and, on CUDA, with a torch that has no FlexAttention
    (torch 2.4: its import would fail the row); every other row, and flex on a CUDA torch 2.5+, runs."""
    from bench import _memory

    _memory.skip_flex_unless_timed("sdpa-flash", "cpu")  # not a flex row: no skip
    with pytest.raises(pytest.skip.Exception, match="CUDA only"):
        _memory.skip_flex_unless_timed("flex-two-calls", "cpu")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("flex_attention") else real_find_spec(name, *a))
    with pytest.raises(pytest.skip.Exception, match="torch 2.5"):
        _memory.skip_flex_unless_timed("flex+lse-mass", "cuda")
    monkeypatch.undo()
    if HAS_FLEX:
        _memory.skip_flex_unless_timed("flex", "cuda")  # torch 2.5+: the row runs


def test_compiled_peers_never_fall_back_to_eager():
    """bench/conftest.py raises dynamo's recompile limit: one family's process compiles
    flex_attention once per shape and mask, and past the default 8 compiles dynamo silently ran it
    uncompiled (the H200's FlexAttention decode and dual-path rows timed eager code). Ten shapes of
    one function compile ten times, here with a backend that only counts."""
    import torch._dynamo.config as dynamo

    limit = "recompile_limit" if getattr(dynamo, "recompile_limit", None) is not None else "cache_size_limit"
    defaults = {limit: 8}
    if getattr(dynamo, "fail_on_recompile_limit_hit", None) is not None:
        defaults["fail_on_recompile_limit_hit"] = False
    compiles = []

    def counting_backend(graph, example_inputs):
        compiles.append(len(example_inputs))
        return graph.forward

    def scaled(x):
        return x * 2 + 1

    with dynamo.patch(**defaults):  # (the suite's settings last only as long as this block)
        import bench.conftest as bench_conftest

        bench_conftest.compile_without_eager_fallback()
        compiled = torch.compile(scaled, backend=counting_backend, dynamic=False)
        try:
            for length in range(1, 11):
                torch.testing.assert_close(compiled(torch.ones(length)), torch.full((length,), 3.0))
        finally:
            torch._dynamo.reset()
    assert len(compiles) == 10


def test_sdpa_backend_rows_skip_where_the_backend_has_no_kernel():
    """The causal and decoding groups time SDPA's cuDNN backend beside its flash one (on Hopper
    cuDNN is the faster); a row pinned to a backend that has no kernel for the case skips and says
    why (here: the CPU has no cuDNN attention), other errors still fail the row, and rows not pinned
    to cuDNN are not called."""
    from bench import _memory
    from bench import test_attention_bench as attention

    assert "sdpa-cudnn" in attention.GPU_GROUPS["causal"][0] and "sdpa-cudnn" in attention.DECODE_IMPLS
    inputs = attention.make_qkv("cpu", 1, 2, 16, 8, torch.float32)
    with pytest.raises(pytest.skip.Exception, match="sdpa-cudnn: SDPA's backend has no kernel for this case"):
        _memory.skip_unless_sdpa_backend_runs("sdpa-cudnn", attention.sdpa_cudnn, inputs)

    def broken(*inputs):
        raise RuntimeError("shapes do not match")

    with pytest.raises(RuntimeError, match="shapes do not match"):
        _memory.skip_unless_sdpa_backend_runs("sdpa-cudnn", broken, inputs)
    _memory.skip_unless_sdpa_backend_runs("sdpa-flash", broken, inputs)


def script_env() -> dict:
    """The environment for a bench/gpu.sh run: this one less its PYTEST_* variables (under xdist
    PYTEST_XDIST_WORKER turns pytest-benchmark off), with this interpreter's folder first on PATH,
    since the script runs `python3`: another Python there (the system's, with another checkout
    installed) would rehearse the script on that checkout's fastprobe."""
    import os

    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def test_gpu_sh_rehearsals_run_this_interpreters_fastprobe():
    """The python3 that bench/gpu.sh runs under script_env() imports the fastprobe these tests import."""
    import fastprobe

    run = subprocess.run(["bash", "-c", "python3 -c 'import fastprobe; print(fastprobe.__file__)'"], cwd=ROOT,
                         env=script_env(), capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == fastprobe.__file__, run.stderr[-2000:]


def test_gpu_sh_extra_steps_fail_the_run_unless_their_time_box_ended_them(tmp_path):
    """bench/gpu.sh's step_done, after the warm-up, the merge, the sweeps and the pairs: exit 0 and
    124 (timeout: their time box is the budget's end) leave the status alone; any other exit (a
    crash, a sticky CUDA error) is said in bench.log and fails the run (it was ignored: status 0)."""
    script = (ROOT / "bench" / "gpu.sh").read_text()
    function = re.search(r"^step_done\(\) \{\n.*?^\}\n", script, re.M | re.S)[0]
    probe = (f"outdir={tmp_path}; status=0\n{function}"
             'step_done 0 ok; step_done 124 "timed out"; echo "status $status"\n'
             'step_done 1 bench.sweep_divergence; echo "status $status"\n')
    run = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60)
    said = "bench/gpu.sh: bench.sweep_divergence exited 1\n"
    assert run.stdout.splitlines() == ["status 0", "status 1"] and run.stderr == said, run
    assert (tmp_path / "bench.log").read_text() == said


def test_gpu_sh_returns_each_family_as_it_ends(tmp_path):
    """bench/gpu.sh rehearsed on the CPU (GPU_DRY_RUN=1: no installs, CPU rows): the merged JSON and
    its table are in OUTDIR as soon as the first family ends, so that a device call killed later
    (its timeout_s) still returns that family's rows (they used to be merged only after the last
    family); and the first family's deadline keeps GPU_FAMILY_MIN_S for the family after it."""
    import json
    import os
    import re
    import signal
    import time

    outdir, budget, hold = tmp_path / "out", 600, 100
    # (without this run's PYTEST_* variables: under xdist PYTEST_XDIST_WORKER turns pytest-benchmark off)
    env = script_env()
    env.update(GPU_DRY_RUN="1", GPU_BENCH_SELECT="cpu and step and fastprobe", GPU_TEST_PROCS="0", GPU_WARM_PROCS="0",
               GPU_BUDGET_S=str(budget), GPU_FAMILY_MIN_S=str(hold))
    started = time.time()
    run = subprocess.Popen(["bash", "bench/gpu.sh", str(outdir), "divergence", "concepts"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first = second = None
    try:
        while second is None and run.poll() is None and time.time() < started + 400:
            time.sleep(0.5)
            log = (outdir / "bench.log").read_text() if (outdir / "bench.log").exists() else ""
            if first is None and "pytest bench/test_divergence_bench.py" in log:
                first = time.time(), int(re.search(r"test_divergence_bench.py.*\(deadline in (\d+) s", log)[1])
            if "pytest bench/test_concepts_bench.py" in log:
                second = time.time()
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # as the device tool kills a call at its timeout
        run.wait()
    assert first is not None and second is not None, (outdir / "bench.log").read_text()
    # the budget ends at started + budget; the timed pass keeps 60 s (the sweep's reserve) and `hold`
    seen, deadline = first
    assert deadline <= started + budget - 60 - hold - seen + 5
    found = list(outdir.glob("cpu-*.json"))
    assert len(found) == 1, (outdir / "bench.log").read_text()
    (merged,) = found
    names = [bench["name"] for bench in json.loads(merged.read_text())["benchmarks"]]
    assert names == ["test_draft_divergence_step[cpu-fastprobe-step]"]
    assert "| draft_divergence_step | CPU" in (outdir / "table.md").read_text()


def test_host_scripts_stop_at_the_deadline(monkeypatch, capsys):
    """bench/host_overhead.py and host_python.py run in bench/gpu.sh's budget under FASTPROBE_DEADLINE
    (bench/_deadline.py), as the pytest phases do: past it they time no further case (they used to
    run on for up to 60 s each whatever the budget had left)."""
    import os
    import time

    pytest.importorskip("triton")
    from bench import host_overhead

    monkeypatch.setenv("FASTPROBE_DEADLINE", str(time.time() - 1))
    ran = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *device: "a GPU")
    monkeypatch.setattr(host_overhead, "cases", lambda: {name: lambda name=name: ran.append(name) for name in "ab"})
    monkeypatch.setattr(host_overhead, "launch_parts", lambda: ran.append("launch_parts"))
    host_overhead.main()
    assert ran == [] and capsys.readouterr().out.count("past the deadline") == 3
    env = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    run = subprocess.run([sys.executable, "-m", "bench.host_python"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("skipped: past the deadline") == 2 and "per call" not in run.stdout, run.stdout


def test_gpu_sh_gives_the_host_scripts_a_deadline(tmp_path):
    """bench/gpu.sh runs the host-time scripts (attention family) under one deadline, GPU_HOST_PERCENT
    of the budget left before the reserve (here 1% of 40 s: none), and skips a script that would start
    within 10 s of its end (they used to get 60 s each whatever the budget)."""
    import os
    import signal
    import time

    outdir = tmp_path / "out"
    env = script_env()
    env.update(GPU_DRY_RUN="1", GPU_TEST_PROCS="0", GPU_WARM_PROCS="0", GPU_BUDGET_S="60", GPU_HOST_PERCENT="1")
    run = subprocess.Popen(["bash", "bench/gpu.sh", str(outdir), "attention"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    started = time.time()
    try:  # (until the GPU tests' phase begins: the host scripts are done)
        while run.poll() is None and not (outdir / "gpu-tests.log").exists() and time.time() < started + 200:
            time.sleep(0.5)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    setup = (outdir / "setup.log").read_text()
    assert "host-time scripts (deadline in 0 s)" in setup, setup[-3000:]
    for script in ("host_overhead", "host_python"):
        assert f"bench/{script}.py: skipped, past the host scripts' deadline" in setup, setup[-3000:]


def test_gpu_sh_gives_each_parallel_test_process_its_share_of_the_cores(tmp_path):
    """bench/gpu.sh's test phase runs its pytest-xdist workers with OMP_NUM_THREADS = cores /
    workers (at least 1), and leaves it unset without workers: each worker's torch would otherwise
    start a thread per core for the tests' CPU references, cores x workers threads in all."""
    import os

    pytest.importorskip("xdist")
    cores = len(os.sched_getaffinity(0))
    for procs, expected in (("2", f"OMP_NUM_THREADS={max(1, cores // 2)})"), ("0", "OMP_NUM_THREADS=unset)")):
        outdir = tmp_path / f"out-{procs}"
        env = script_env()
        env.pop("OMP_NUM_THREADS", None)
        env.update(GPU_DRY_RUN="1", GPU_TESTS_ONLY="1", GPU_TEST_PROCS=procs, GPU_BUDGET_S="120")
        run = subprocess.run(["bash", "bench/gpu.sh", str(outdir), "patch"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
        log = (outdir / "gpu-tests.log").read_text()
        header = next(line for line in log.splitlines() if line.startswith("== "))
        assert header.endswith(expected), (header, run.stdout[-2000:], run.stderr[-2000:])


def test_gpu_sh_without_tests_goes_straight_to_the_benchmarks(tmp_path):
    """GPU_TESTS=0 (a benchmark call after a tests-only one): bench/gpu.sh runs no GPU test phase
    (no gpu-tests.log) and starts the timed pass; GPU_TESTS_ONLY=1 still wins over it."""
    env = script_env()
    env.update(GPU_DRY_RUN="1", GPU_TESTS="0", GPU_TEST_PROCS="0", GPU_WARM_PROCS="0", GPU_BUDGET_S="120",
               GPU_BENCH_SELECT="cpu and step and fastprobe")
    outdir = tmp_path / "bench-only"
    run = subprocess.run(["bash", "bench/gpu.sh", str(outdir), "concepts"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert not (outdir / "gpu-tests.log").exists(), run.stdout[-2000:]
    assert "pytest bench/test_concepts_bench.py" in (outdir / "bench.log").read_text(), run.stdout[-2000:]
    env.update(GPU_TESTS_ONLY="1")
    outdir = tmp_path / "tests-only"
    run = subprocess.run(["bash", "bench/gpu.sh", str(outdir), "concepts"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert "-m gpu" in (outdir / "gpu-tests.log").read_text() and not (outdir / "bench.log").exists(), \
        run.stdout[-2000:]


def test_warm_up_compiles_every_config_without_timing_it(monkeypatch):
    """bench/gpu.sh's warm-up (`-p bench._warm_up`) runs each config of an autotuned kernel once (its
    compile, or its load from the precompiled archive) and times none: its choices die with its
    processes (the timed pass tunes again), so the timing was wasted device time."""
    import functools
    import inspect

    triton = pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    if not isinstance(inspect.getattr_static(Autotuner, "do_bench", None), (property, functools.cached_property)):
        pytest.skip("this Triton's autotuner times through a module function (3.0, 3.1): left timing")
    monkeypatch.setattr(Autotuner, "do_bench", inspect.getattr_static(Autotuner, "do_bench"))  # (restored after)
    from bench import _warm_up

    _warm_up.pytest_configure(None)

    @triton.autotune(configs=[triton.Config({"BLOCK": block}) for block in (16, 32)], key=["n"])
    @triton.jit
    def kernel(x, n, BLOCK: triton.language.constexpr):
        pass

    launches = []
    monkeypatch.setattr(kernel.fn, "run", lambda *args, **flags: launches.append(flags["BLOCK"]), raising=False)
    monkeypatch.setattr(kernel, "nargs", {"x": torch.empty(4), "n": 4}, raising=False)  # (as its run() sets)
    timings = [kernel._bench(torch.empty(4), 4, config=config) for config in kernel.configs]
    assert launches == [16, 32] and timings == [[1.0, 1.0, 1.0]] * 2


def test_prebuilt_wheel_is_used_only_for_the_tree_it_was_built_from(tmp_path, monkeypatch, capsys):
    """bench/gpu.sh installs fastprobe from bench/gpu_wheels.sh's editable wheel (C++ compiled ahead,
    bench/prebuilt.py) instead of compiling it in the device lease, only where the wheel's stamp is
    this tree's: a changed C++ source or build file, or a module added, means `pip install -e .` as
    before (nothing is installed); a Python module's edit does not (the finder maps onto the sources).
    Installed, the finder's paths of the build tree are rewritten to this checkout's."""
    import json
    import shutil

    from bench import prebuilt

    if not (ROOT / "fastprobe").is_dir():
        pytest.skip("needs the tree's fastprobe/ sources (tests/sanitize.sh runs the tests beside a copy without them)")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("CMakeLists.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tree / name)
    for folder in ("csrc", "fastprobe", "kernels"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    built = prebuilt.stamp(str(tree))
    assert built == prebuilt.stamp(str(ROOT))
    (tree / "kernels" / "attention.py").write_text((tree / "kernels" / "attention.py").read_text() + "\n# edited\n")
    assert prebuilt.stamp(str(tree)) == built
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / prebuilt.STAMP_FILE).write_text(json.dumps(
        {"stamp": built, "root": "/elsewhere/tree", "python": prebuilt.python_tag(), "wheel": "fastprobe.whl"}))
    monkeypatch.setattr(prebuilt.subprocess, "run", lambda *args, **kwargs: pytest.fail(f"ran {args}"))
    for change in ("csrc/common.h", "CMakeLists.txt", "fastprobe/ops/new_module.py"):
        path = tree / change
        path.write_text((path.read_text() if path.exists() else "") + "\n// changed\n")
        assert prebuilt.stamp(str(tree)) != built, change
        assert prebuilt.install(str(wheels), str(tree)) == 1
        assert "built from other C++ sources" in capsys.readouterr().out
        if (ROOT / change).exists():
            shutil.copy(ROOT / change, path)
        else:
            path.unlink()
    assert prebuilt.stamp(str(tree)) == built
    # the finder as scikit-build-core writes it: paths of the build tree and of its parent
    finder, pth = tmp_path / "_editable_skbc_fastprobe.py", tmp_path / "_editable_skbc_fastprobe.pth"
    finder.write_text("install({'fastprobe': '/elsewhere/tree/fastprobe/__init__.py', 'fastprobe.kernels': "
                      "'/elsewhere/tree/kernels/__init__.py'}, {'fastprobe._C': 'fastprobe/_C.so'}, "
                      "{'fastprobe': ['/elsewhere/tree', '/elsewhere/tree/fastprobe', 'fastprobe']})\n")
    pth.write_text("import _editable_skbc_fastprobe\n/elsewhere/tree\n/elsewhere\n")
    assert prebuilt.relocate([str(finder), str(pth)], "/elsewhere/tree", "/run/here/repo") == 2
    assert finder.read_text() == (
        "install({'fastprobe': '/run/here/repo/fastprobe/__init__.py', 'fastprobe.kernels': "
        "'/run/here/repo/kernels/__init__.py'}, {'fastprobe._C': 'fastprobe/_C.so'}, "
        "{'fastprobe': ['/run/here/repo', '/run/here/repo/fastprobe', 'fastprobe']})\n")
    assert pth.read_text() == "import _editable_skbc_fastprobe\n/run/here/repo\n/run/here\n"


def test_report_names_the_runs_behind_its_rows(tmp_path, capsys, monkeypatch):
    """Under the table, bench/report.py lists each run that has a row in it: file, device, the copy
    bandwidth the fractions are of, versions, and the command (bench/conftest.py records pytest's,
    or bench/gpu.sh's, which it exports; a merged run names each distinct one). A run whose rows were
    all measured again later is not listed. A partial run (the declared baseline skipped) shows
    "-" for that speed-up and the peer it has as the fastest."""
    import json
    from types import SimpleNamespace

    from bench import conftest, report

    machine = {}
    monkeypatch.delenv("FASTPROBE_BENCH_COMMAND", raising=False)
    config = SimpleNamespace(invocation_params=SimpleNamespace(args=("bench/test_x_bench.py", "-k", "cuda and x")))
    conftest.pytest_benchmark_update_machine_info(config, machine)
    assert machine["command"] == "python -m pytest bench/test_x_bench.py -k 'cuda and x'"
    monkeypatch.setenv("FASTPROBE_BENCH_COMMAND", "GPU_BUDGET_S=360 bash bench/gpu.sh OUTDIR x y")
    conftest.pytest_benchmark_update_machine_info(config, machine)
    assert machine["command"] == "GPU_BUDGET_S=360 bash bench/gpu.sh OUTDIR x y"

    def document(when, command, *benches):
        info = {"gpu": "NVIDIA H200", "date": when, "copy_bandwidth_bytes_per_s": 4.27e12,
                "versions": {"torch": "2.11.0", "triton": "3.6.0", "python": "3.12.3"}}
        if command:
            info["command"] = command
        return {"machine_info": info, "datetime": when, "benchmarks": [
            {"group": group, "name": f"test[{impl}]", "stats": {"median": median},
             "extra_info": dict(impl=impl, baseline="eager", **extra)} for group, impl, median, extra in benches]}

    gpu_sh = "GPU_BUDGET_S=360 bash bench/gpu.sh OUTDIR x y"
    parts = {"old.json": document("2026-11-30", None, ("x-cuda", "fastprobe", 2.0, {})),
             "x.json": document("2026-12-02", gpu_sh, ("x-cuda", "fastprobe", 1.0, {}),
                                ("x-cuda", "compiled", 3.0, {})),
             "y.json": document("2026-12-02", gpu_sh, ("y-cuda", "fastprobe", 1.0, {})),
             "cpu.json": document("2026-12-01", None, ("z-cpu", "fastprobe", 1.0, {"speedup_vs_baseline": 2.0}))}
    for name, data in parts.items():
        (tmp_path / name).write_text(json.dumps(data))
    assert report.merge(str(tmp_path / "merged.json"), [str(tmp_path / n) for n in ("x.json", "y.json")]) == 0
    assert json.loads((tmp_path / "merged.json").read_text())["machine_info"]["commands"] == [gpu_sh]
    report.main([str(tmp_path / name) for name in ("old.json", "merged.json", "cpu.json")])
    out = capsys.readouterr().out
    table, _, runs = out.partition("\nRuns:\n")
    fastprobe_x = next(line for line in table.splitlines() if line.startswith("| x |") and "fastprobe" in line)
    assert "| - | 3.00x vs compiled |" in fastprobe_x  # no eager row in this run: no declared speed-up
    assert runs.splitlines() == [
        f"- `merged.json`: NVIDIA H200 (copy bandwidth 4.27 TB/s), 2026-12-02, torch 2.11.0, triton 3.6.0: `{gpu_sh}`",
        "- `cpu.json`: NVIDIA H200 (copy bandwidth 4.27 TB/s), 2026-12-01, torch 2.11.0, triton 3.6.0: "
        "command not recorded"]


def test_report_takes_each_comparison_whole_from_one_run(tmp_path, capsys):
    """bench/report.py: the rows of one comparison (op, device, problem) come from one run, as its
    ratios do: the run with the most peers in it, the latest of those. A later run that timed
    fastprobe alone, or with fewer peers, leaves the earlier fuller comparison in place; a later run
    with as many peers replaces the whole comparison, so no row of an earlier run sits beside it; a
    problem of another size is a comparison of its own."""
    import json

    from bench import report

    def document(when, *benches):
        return {"machine_info": {"gpu": "NVIDIA H200", "date": when}, "datetime": when, "benchmarks": [
            {"group": group, "name": f"test[{impl}]", "stats": {"median": median},
             "extra_info": {"impl": impl, "shape": {"L": size}, "dtype": "bfloat16"}} for group, impl, median, size in benches]}

    runs = {"full.json": document("2026-11-30", ("a-cuda", "fastprobe", 1.0, 8), ("a-cuda", "eager", 4.0, 8),
                                  ("a-cuda", "compiled", 2.0, 8), ("b-cuda", "fastprobe", 1.0, 8),
                                  ("b-cuda", "eager", 3.0, 8)),
            "fuller.json": document("2026-11-29", ("c-cuda", "fastprobe", 2.0, 8), ("c-cuda", "eager", 8.0, 8),
                                    ("c-cuda", "compiled", 4.0, 8), ("c-cuda", "fastprobe-x", 3.0, 8)),
            "alone.json": document("2026-12-04", ("a-cuda", "fastprobe", 0.5, 8), ("a-cuda", "fastprobe-x", 0.6, 8),
                                   ("b-cuda", "fastprobe", 2.0, 8), ("b-cuda", "eager", 5.0, 8),
                                   ("c-cuda", "fastprobe", 1.0, 8), ("c-cuda", "eager", 2.0, 8),
                                   ("a-cuda", "fastprobe", 9.0, 16))}
    for name, data in runs.items():
        (tmp_path / name).write_text(json.dumps(data))
    report.main([str(tmp_path / name) for name in runs])
    table, _, listed = capsys.readouterr().out.partition("\nRuns:\n")
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.strip().splitlines()[2:]]
    assert [(row[0], row[2], row[3], row[4], row[6], row[-1]) for row in cells] == [
        ("a", "L=8, bfloat16", "fastprobe", "1000.00", "2.00x vs compiled", "2026-11-30"),
        ("a", "L=8, bfloat16", "eager", "4000.00", "-", "2026-11-30"),
        ("a", "L=8, bfloat16", "compiled", "2000.00", "-", "2026-11-30"),
        ("b", "L=8, bfloat16", "fastprobe", "2000.00", "2.50x vs eager", "2026-12-04"),
        ("b", "L=8, bfloat16", "eager", "5000.00", "-", "2026-12-04"),
        ("c", "L=8, bfloat16", "fastprobe", "2000.00", "2.00x vs compiled", "2026-11-29"),
        ("c", "L=8, bfloat16", "eager", "8000.00", "-", "2026-11-29"),
        ("c", "L=8, bfloat16", "compiled", "4000.00", "-", "2026-11-29"),
        ("c", "L=8, bfloat16", "fastprobe-x", "3000.00", "1.33x vs compiled", "2026-11-29"),
        ("a", "L=16, bfloat16", "fastprobe", "9000.00", "-", "2026-12-04")]
    assert [line.split("`")[1] for line in listed.splitlines()] == ["full.json", "fuller.json", "alone.json"]


def test_host_overhead_decode_step_captures_each_attention_call_and_leaves_the_registry_alone():
    """bench/host_overhead.py --decode replays layer 0's attention call of a decoding step, as the
    model made it, for transformers' sdpa and fastprobe's; the registry's entries are the same after
    (it overrides them for one forward), on 4.x (models index the registry) as on 5.x (get_interface)."""
    pytest.importorskip("transformers")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from bench import host_overhead

    before = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("sdpa",)}
    calls = host_overhead.decode_step_calls()
    assert sorted(calls) == ["fastprobe", "sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before["sdpa"]
    assert ALL_ATTENTION_FUNCTIONS["fastprobe"].__name__ != "first_call"
    outputs = {name: call()[0] for name, call in calls.items()}  # [B, Lq, H, D] each
    torch.testing.assert_close(outputs["fastprobe"], outputs["sdpa"], rtol=1e-4, atol=1e-5)


def test_compile_sm90_counts_a_kernels_sass_and_reads_another_trees_kernels(tmp_path):
    """bench/compile_sm90.py concepts compiles concept_mass's forward for sm_90 without a GPU and
    prints its registers and SASS instruction count; with --tree DIR it compiles DIR/kernels/
    instead of this checkout's (here a tree whose concepts.py says where it was read from)."""
    pytest.importorskip("triton.knobs", reason="bench/compile_sm90.py needs a Triton with knobs (3.4+)")
    script = [sys.executable, str(ROOT / "bench" / "compile_sm90.py"), "concepts"]
    done = subprocess.run(script, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    registers, instructions = re.search(r"_concept_mass_kernel (\d+) registers, 0 B spilled .*SASS instructions (\d+)",
                                        line).groups()
    assert int(registers) > 0 and int(instructions) > 100
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "concepts.py").write_text("raise ImportError('concepts.py of the other tree')\n")
    done = subprocess.run(script + ["--tree", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "concepts.py of the other tree" in done.stderr


def test_compile_sm90_counts_each_loop_body_from_its_backward_branch():
    """bench/compile_sm90.py's loop_bodies: a loop is the instructions from a backward branch's
    target to the branch (cuobjdump's /*address*/ lines), in code order; a forward branch and
    the kernel's closing branch to itself are none, and a nested loop counts in its outer one."""
    pytest.importorskip("triton.knobs", reason="bench/compile_sm90.py needs a Triton with knobs (3.4+)")
    from bench import compile_sm90

    lines = ["LDC R1, c[0x0][0x28] ;", "@!P0 BRA 0x0070 ;",  # 0x00, 0x10 (forward: no loop)
             "FADD R2, R2, R3 ;", "MUFU.EX2 R4, R2 ;",  # 0x20, 0x30: outer loop from here
             "FMUL R5, R4, R4 ;", "@P1 BRA 0x0040 ;",  # 0x40, 0x50: inner loop 0x40-0x50
             "@P2 BRA 0x0020 ;", "EXIT ;", "BRA 0x0080 ;"]  # 0x60: outer loop 0x20-0x60; 0x70, 0x80
    sass = "\n".join(f"        /*{16 * at:04x}*/                   {line}  /* 0x0 */" for at, line in enumerate(lines))
    assert compile_sm90.loop_bodies(sass) == [2, 5]


def test_paired_cuda_ratio_is_the_rows_time_over_its_peers_within_each_block(monkeypatch):
    """bench/paired_cuda.py: each block times row, peer, peer, row; the ratio is the row's two
    times over the peer's two (the median of the blocks', with quartiles), so a drift within a
    block counts on both sides; no block starts past FASTPROBE_DEADLINE."""
    import itertools

    from bench import paired_cuda

    clock = itertools.count(1)  # a drifting machine: every call takes one unit longer than the last
    times = {"row": 2.0, "peer": 1.0}

    def timer(call, inputs):
        return times[call] * next(clock)

    ratio, low, high, mine, theirs, ran = paired_cuda.paired(timer, "row", "peer", (), blocks=5)
    # block k (calls t, t+1, t+2, t+3): row 2t + 2(t+3), peer (t+1) + (t+2): 2 exactly, drift or not
    assert ran == 5 and ratio == low == high == 2.0
    assert mine > theirs
    monkeypatch.setenv("FASTPROBE_DEADLINE", "0")
    assert paired_cuda.paired(timer, "row", "peer", (), blocks=5) is None


def test_paired_cpu_reports_a_single_repeat_and_refuses_none(tmp_path):
    """bench/paired_cpu.py --repeats 1 printed its table (its quartiles: statistics.quantiles needs
    two values, so it ended in a traceback after every process had run); --repeats 0 is refused
    before any process starts."""
    run = subprocess.run([sys.executable, "bench/paired_cpu.py", "--old", sys.executable, "--new", sys.executable,
                          "--repeats", "1", "--cases", "divergence_step_f32"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^divergence_step_f32 .*x", run.stdout, flags=re.M), run.stdout
    run = subprocess.run([sys.executable, "bench/paired_cpu.py", "--old", sys.executable, "--new", sys.executable,
                          "--repeats", "0"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--repeats must be 1 or more" in run.stderr, run.stderr[-3000:]


def test_gpu_sh_refuses_a_machine_without_cuda(tmp_path):
    """bench/gpu.sh (no GPU_DRY_RUN) on a machine whose torch sees no CUDA device stops at once with
    exit 1, before installing anything: it used to skip every GPU test, deselect every -k cuda row
    and end "status 0" having measured nothing. (python3 here is this interpreter, with pip refused:
    nothing gets installed whatever the script does.)"""
    import os

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is there")
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "python3").write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && {{ echo "pip: refused by the test"; exit 1; }}\n'
                                   f'exec {sys.executable} "$@"\n')
    (shims / "python3").chmod(0o755)
    env = {name: value for name, value in os.environ.items() if not name.startswith(("PYTEST_", "GPU_"))}
    env.update(PATH=f"{shims}{os.pathsep}{env.get('PATH', '')}", GPU_BUDGET_S="60")
    outdir = tmp_path / "out"
    run = subprocess.run(["bash", "bench/gpu.sh", str(outdir), "divergence"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "sees no CUDA device" in run.stderr, run.stdout[-2000:] + run.stderr[-2000:]
    setup = (outdir / "setup.log").read_text()
    assert "pip: refused" not in setup and "compiling fastprobe here" not in setup, setup[-2000:]
    assert not (outdir / "gpu-tests.log").exists() and not (outdir / "bench.log").exists()


def test_precompile_triton_counts_a_failed_case_and_refuses_an_empty_selection(tmp_path, capsys):
    """bench/precompile_triton.py: a case that fails before its first launch (nothing compiled)
    counts against the exit status (main returned 0 whatever its cases did, the failure only a
    line among the timings), and an --only that matches no case is a usage error before any work
    (it packed an archive of nothing over the one there)."""
    pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    if "do_bench" not in vars(Autotuner):  # (the script replaces it; Triton 3.2 and 3.3 set it on each autotuner)
        pytest.skip("bench/precompile_triton.py needs a Triton whose autotuner reads do_bench from its class (not 3.2, 3.3)")
    from bench import precompile_triton

    assert precompile_triton._run_cases(["no-such-family"], str(tmp_path / "work"), str(tmp_path / "used.log"), 1) == 1
    assert "FAILED before any launch" in capsys.readouterr().out
    assert precompile_triton._failed_cases(1) == 1 and precompile_triton._failed_cases(0) == 0
    with pytest.raises(SystemExit) as exit:
        precompile_triton.main(["divergence", "--only", "no such case"])
    assert exit.value.code == 2 and "no case of divergence holds --only 'no such case'" in capsys.readouterr().err
