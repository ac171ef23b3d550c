"""pytest plugin (registered by tests/conftest.py; `-p tests._worker_guard` elsewhere): a test that
loses the process's CUDA context takes down only itself.

Some CUDA errors are sticky: after an illegal memory access, a device-side assert, ... every later
CUDA call in the process fails, so each later test there errors at setup (the autouse seed fixture
touches CUDA) and one bug hides the rest of the run. Once a test raises such an error:

* in a pytest-xdist worker, the worker exits right after that test's protocol: its reports (with the
  real traceback) have gone to the controller, but xdist has not yet been told the test is complete
  (remote.py sends runtest_protocol_complete only after pytest_runtest_protocol returns), so the test
  is still the first of the worker's pending items, which is the one xdist blames for the crash
  (LoadScheduling.remove_node). xdist then starts a fresh worker (--max-worker-restart, 4 per worker
  by default) and reschedules the tests that were queued on the lost one;
* in a single process, every later CUDA test (marked gpu) is skipped with a reason naming the test.

CUDA reports errors asynchronously: the kernel at fault may have been launched by an earlier test
on the same worker (CUDA_LAUNCH_BLOCKING=1 pins it to its launch).
"""

import os
import sys

import pytest

STICKY = ("illegal memory access", "unspecified launch failure", "device-side assert",
          "misaligned address", "illegal instruction")

lost_by = None  # node id of the test that lost this process's CUDA context, once one has


def is_sticky(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) says the CUDA context is lost."""
    while error is not None:
        message = str(error)
        if "out of memory" not in message and (
            type(error).__name__ == "AcceleratorError" or any(text in message for text in STICKY)
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    global lost_by
    if lost_by is None and call.excinfo is not None and is_sticky(call.excinfo.value):
        lost_by = item.nodeid


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if lost_by is not None and "gpu" in item.keywords:
        pytest.skip(f"the CUDA context of this process was lost in {lost_by}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    yield
    if lost_by is not None and hasattr(item.config, "workerinput"):  # an xdist worker
        worker = item.config.workerinput["workerid"]
        print(f"\n[{worker}] {lost_by} lost the CUDA context: this worker exits, so that pytest-xdist "
              "reports the crash in that test and runs the remaining tests on a fresh worker",
              file=sys.__stderr__, flush=True)
        os._exit(3)
