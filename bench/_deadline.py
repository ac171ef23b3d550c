"""The phase deadlines of bench/gpu.sh: FASTPROBE_DEADLINE, seconds since the epoch.

As a pytest plugin (`-p bench._deadline`): once the deadline has passed, every remaining test is
skipped, so a run that the device lease cuts short still ends normally and writes what it
measured. The host-time scripts (bench/host_overhead.py, host_python.py) stop between their
cases once past_deadline() (`python3 -m bench.X` imports this module as bench._deadline)."""

import os
import time

import pytest


def past_deadline() -> bool:
    """Whether FASTPROBE_DEADLINE has passed (never, when it is unset)."""
    return time.time() > float(os.environ.get("FASTPROBE_DEADLINE", "inf"))


def pytest_runtest_setup(item):
    if past_deadline():
        pytest.skip("out of the run's time budget (FASTPROBE_DEADLINE)")
