"""pytest plugin used by bench/gpu.sh (`-p bench._deadline`): once the wall-clock time in
FASTPROBE_DEADLINE (seconds since the epoch) has passed, every remaining test is skipped, so
a run that the device lease cuts short still ends normally and writes what it measured."""

import os
import time

import pytest


def pytest_runtest_setup(item):
    deadline = float(os.environ.get("FASTPROBE_DEADLINE", "inf"))
    if time.time() > deadline:
        pytest.skip("out of the run's time budget (FASTPROBE_DEADLINE)")
