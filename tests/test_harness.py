"""The test harness itself: tests/_worker_guard.py, run on a small pytest session in a subprocess.

A real lost CUDA context needs a GPU, so the session's one failing test raises the error text a
lost context gives; each test logs its process id, which shows which worker ran what.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ._worker_guard import is_sticky

ROOT = Path(__file__).resolve().parents[1]

SESSION = """
import os

import pytest


def log(name):
    with open(os.path.join(os.path.dirname(__file__), "pids.txt"), "a") as file:
        file.write(f"{name} {os.getpid()}\\n")


@pytest.mark.parametrize("n", range(6))
def test_before(n):
    log(f"before{n}")


def test_boom():
    log("boom")
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.gpu
@pytest.mark.parametrize("n", range(6))
def test_after(n):
    log(f"after{n}")
"""


def run_session(tmp_path, *args):
    """Runs SESSION with the guard (and no other plugin) loaded; returns its stdout, its stderr and
    [(test, pid)] in the order the tests ran."""
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    (tmp_path / "test_session.py").write_text(SESSION)
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # a quicker start; xdist comes with -p
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "tests._worker_guard",
               "-rfEs", *args]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1, done.stdout + done.stderr  # tests failed: no internal error
    ran = [line.split() for line in (tmp_path / "pids.txt").read_text().splitlines()]
    return done.stdout, done.stderr, ran


@pytest.mark.parametrize("workers", ["1", "2"])
def test_lost_cuda_context_replaces_the_xdist_worker(tmp_path, workers):
    pytest.importorskip("xdist")
    out, err, ran = run_session(tmp_path, "-p", "xdist.plugin", "-n", workers)
    # test_boom fails with its own traceback, and it is the one blamed for the crash, not a test
    # that was queued after it (a second FAILED line, for the crash, is xdist's)
    assert set(re.findall(r"^FAILED (\S+)", out, re.MULTILINE)) == {"test_session.py::test_boom"}, out
    assert "RuntimeError: CUDA error: an illegal memory access" in out, out
    assert "crashed while running 'test_session.py::test_boom'" in out, out
    assert re.search(r"\b[12] failed, 12 passed in ", out.splitlines()[-1]), out
    assert "test_session.py::test_boom lost the CUDA context" in err, err
    assert "replacing crashed worker" in out, out
    assert sorted(name for name, _ in ran) == sorted(
        ["boom"] + [f"before{n}" for n in range(6)] + [f"after{n}" for n in range(6)]), ran
    # the worker that ran test_boom ran nothing after it
    boom = [name for name, _ in ran].index("boom")
    assert ran[boom][1] not in {pid for _, pid in ran[boom + 1:]}, ran
    if workers == "1":  # so the tests after it ran on a second, fresh worker
        assert len({pid for name, pid in ran if name != "boom"}) == 2, ran


def test_lost_cuda_context_skips_later_gpu_tests_in_one_process(tmp_path):
    out, _, ran = run_session(tmp_path)
    assert re.search(r"\b1 failed, 6 passed, 6 skipped in ", out.splitlines()[-1]), out
    assert "the CUDA context of this process was lost in test_session.py::test_boom" in out, out
    assert [name for name, _ in ran] == [f"before{n}" for n in range(6)] + ["boom"], ran


class AcceleratorError(RuntimeError):  # the name torch >= 2.8 gives its CUDA errors
    pass


@pytest.mark.parametrize("error, sticky", [
    (AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
    (AcceleratorError("CUDA error: unknown error"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: unspecified launch failure"), True),
    (RuntimeError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUDA error: misaligned address"), True),
    (RuntimeError("CUDA error: an illegal instruction was encountered"), True),
    (AcceleratorError("CUDA error: out of memory"), False),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (ValueError("logits must be 2-D"), False),
    (AssertionError("Tensor-likes are not close!"), False),
])
def test_is_sticky(error, sticky):
    assert is_sticky(error) is sticky
    try:  # and when a test re-raised it as something else
        raise AssertionError("kernel failed") from error
    except AssertionError as wrapped:
        assert is_sticky(wrapped) is sticky


def test_interpreter_flags_report_marks_flags_that_ran_one_way(tmp_path, capsys):
    """tests/interpreter_flags.py's report: a boolean constexpr seen with one value only is marked
    and fails the report (exit status 1), unless the flag is one the interpreter cannot run the
    other way (GPU_ONLY); flags seen both ways, over processes' files, pass."""
    from . import interpreter_flags

    def launches(name, *flag_sets):
        (tmp_path / name).write_text("".join(f'["k.kernel", {flags}]\n' for flags in flag_sets))

    launches("1.jsonl", '{"CAUSAL": "True", "SFU_LOG2": "False", "BLOCK": "16"}')
    launches("2.jsonl", '{"CAUSAL": "False", "SFU_LOG2": "False", "BLOCK": "32"}')
    assert interpreter_flags.report(str(tmp_path)) == 0
    assert "k.kernel: 2 combinations" in capsys.readouterr().out
    launches("3.jsonl", '{"CAUSAL": "True", "SFU_LOG2": "False", "BLOCK": "16", "ENTROPY": "True"}')
    assert interpreter_flags.report(str(tmp_path)) == 1
    printed = capsys.readouterr().out
    assert "ENTROPY: True  <- one way only" in printed and "ran one way only: k.kernel.ENTROPY" in printed
    assert "SFU_LOG2: False  <- one way only (inline PTX" in printed
    assert interpreter_flags.report(str(tmp_path / "none")) == 1


def test_the_interpreter_run_refuses_a_triton_that_cannot_read_numpy_2():
    """Triton 3.0's and 3.1's interpreter with numpy 2 failed every interpreter test deep inside the
    interpreter: conftest refuses that pair at start-up, naming both versions and the way out."""
    from .conftest import interpreter_numpy_problem

    problem = interpreter_numpy_problem("3.0.0", "2.4.6")
    assert "Triton 3.0.0" in problem and "numpy 2.4.6" in problem and "numpy<2" in problem
    assert interpreter_numpy_problem("3.1.0", "2.3.5")
    assert interpreter_numpy_problem("3.0.0", "1.26.4") is None
    assert interpreter_numpy_problem("3.9.0", "2.4.6") is None
    assert interpreter_numpy_problem("3.2.0+git1a2b", "2.0.0") is None
    for pinned in ("3.2.0", "3.5.0", "3.6.0"):  # (3.2.0: torch 2.6.0's pin, 3.6.0: 2.10.0's and 2.11.0's)
        assert "numpy<2.4" in interpreter_numpy_problem(pinned, "2.4.6")
        assert interpreter_numpy_problem(pinned, "2.3.5") is None
    assert interpreter_numpy_problem("3.7.1", "2.4.6") is None
