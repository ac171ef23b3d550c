"""Which constexpr arguments the Triton interpreter tests launch each kernel with.

    FASTPROBE_FLAGS_DIR=/tmp/flags TRITON_INTERPRET=1 python -m pytest -m interpreter -n 2 -p tests.interpreter_flags
    python -m tests.interpreter_flags /tmp/flags

As a pytest plugin it wraps the interpreter's launch and writes one JSON line per new
(kernel, constexpr arguments) combination into FASTPROBE_FLAGS_DIR (a file per process, so
xdist workers each keep theirs). Run as a module, it reports each kernel's combinations and the
values each constexpr took, and marks every boolean flag that ran one way only: a branch of the
kernel that only a GPU run checks. It exits 1 when there is such a flag other than those in
GPU_ONLY. (2026-12-04: every boolean flag ran both ways, but SFU_LOG2.)
"""

import collections
import inspect
import json
import os
import sys
from pathlib import Path

# Flags that cannot take their other value under the interpreter, and why.
GPU_ONLY = {"SFU_LOG2": "inline PTX (lg2.approx), which the interpreter does not run"}


def pytest_configure(config):
    folder = os.environ.get("FASTPROBE_FLAGS_DIR")
    if not folder or os.environ.get("TRITON_INTERPRET") != "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    Path(folder).mkdir(parents=True, exist_ok=True)
    log = open(Path(folder) / f"{os.getpid()}.jsonl", "a")
    launch, written, signatures = interpreter.InterpretedFunction.run, set(), {}

    def constexprs(fn) -> tuple:
        """(every parameter's name, the constexpr parameters), found once per kernel."""
        if fn not in signatures:
            parameters = list(inspect.signature(fn).parameters.values())
            signatures[fn] = ([parameter.name for parameter in parameters],
                              [parameter for parameter in parameters if parameter.annotation in (tl.constexpr, "tl.constexpr")])
        return signatures[fn]

    def recorded_launch(self, *args, grid, warmup, **kwargs):
        names, flagged = constexprs(self.fn)
        given = dict(zip(names, args), **kwargs)
        flags = {parameter.name: repr(given.get(parameter.name, parameter.default)) for parameter in flagged}
        line = json.dumps([f"{self.fn.__module__}.{self.fn.__name__}", flags], sort_keys=True)
        if line not in written:
            written.add(line)
            log.write(line + "\n")
            log.flush()
        return launch(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recorded_launch


def report(folder: str) -> int:
    combinations = collections.defaultdict(set)  # kernel -> {sorted (name, value) pairs}
    for path in sorted(Path(folder).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            kernel, flags = json.loads(line)
            combinations[kernel].add(tuple(sorted(flags.items())))
    if not combinations:
        print(f"no launches recorded in {folder}")
        return 1
    one_sided = []
    for kernel, seen in sorted(combinations.items()):
        print(f"{kernel}: {len(seen)} combinations")
        values = collections.defaultdict(set)
        for combination in seen:
            for name, value in combination:
                values[name].add(value)
        for name, taken in sorted(values.items()):
            mark = ""
            if len(taken) == 1 and taken <= {"True", "False"}:
                mark = f"  <- one way only{' (' + GPU_ONLY[name] + ')' if name in GPU_ONLY else ''}"
                if name not in GPU_ONLY:
                    one_sided.append(f"{kernel}.{name}")
            print(f"    {name}: {', '.join(sorted(taken))}{mark}")
    if one_sided:
        print(f"\nflags the interpreter tests ran one way only: {', '.join(one_sided)}")
    return 1 if one_sided else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.interpreter_flags FOLDER")
    sys.exit(report(sys.argv[1]))
