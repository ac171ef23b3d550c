"""Markdown results table from pytest-benchmark JSON files (bench/results/*.json). A row measured
again (same op, device, problem and implementation) in a later run replaces the earlier one.

    python bench/report.py bench/results/*.json
"""

import json
import sys


def _size(num_bytes):
    if num_bytes is None:
        return "-"
    if num_bytes < 2**20:
        return f"{num_bytes / 2**10:,.0f} KiB"
    return f"{num_bytes / 2**20:,.1f} MiB"


def _milliseconds(seconds):
    """Two decimals, or three significant digits below 1 ms (one-token calls)."""
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3g}"


def rows(data):
    """The table rows of one pytest-benchmark JSON document."""
    machine = data["machine_info"]
    device = machine.get("gpu") or f"CPU, {machine.get('cpu_threads')} threads"
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        shape = ", ".join(f"{k}={v}" for k, v in info.get("shape", {}).items())
        speedup = info.get("speedup_vs_baseline")
        bandwidth = info.get("fraction_of_copy_bandwidth")
        yield (
            bench["group"].split("-")[0],
            device,
            f"{shape}, {info.get('dtype', '').replace('torch.', '')}",
            info.get("impl", bench["name"]),
            _milliseconds(bench["stats"]["median"]),
            f"{speedup:.2f}x vs {info['baseline']}" if speedup is not None else "-",
            _size(info.get("peak_extra_bytes")),
            f"{bandwidth:.0%}" if bandwidth is not None else "-",
            machine.get("date", "")[:10],
        )


def main(paths):
    header = ("op", "device", "problem", "implementation", "median ms", "speed-up", "peak extra memory",
              "of copy bandwidth", "date")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    latest = {}  # (op, device, problem, implementation) -> (run's time, order of first appearance, row)
    for path in paths:
        with open(path) as handle:
            data = json.load(handle)
        when = data.get("datetime", "")
        for row in rows(data):
            key = row[:4]
            first = latest[key][1] if key in latest else len(latest)
            if key not in latest or when >= latest[key][0]:
                latest[key] = (when, first, row)
    for _, _, row in sorted(latest.values(), key=lambda entry: entry[1]):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
