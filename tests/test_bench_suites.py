"""The benchmark suites stay runnable (they run only on demand and on the rare GPU machine, where a
broken suite would cost device time): every suite collects, and the method-layer suite's
implementations compute the same figures on a small case."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


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
