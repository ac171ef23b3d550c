"""Markdown results table from pytest-benchmark JSON files (bench/results/*.json). The rows of one
comparison (same op, device and problem) all come from one run, since its ratios hold only within a
run: the run that measured the most peers (implementations that are not fastprobe's) in it, the
latest of those. A later run that timed fresh rows with fewer peers (some skipped, or cut by a
deadline) does not hide an earlier fuller comparison; a peer is never shown beside rows of another run.
Files that are empty or not pytest-benchmark JSON (a run killed before writing) are skipped, with
a line on stderr. A fastprobe row's speed-up is given against its suite's declared baseline and
against the fastest peer (an implementation that is not fastprobe's) of its group in the same run;
the device is the group's ("-cpu" or "-cuda"), so a run on a CUDA machine labels its CPU rows CPU.
Where the run also timed the row in alternation with those two peers (bench/_memory.py's
paired_speedup, CPU runs since 2026-12-04), the "paired" column gives the median of the blocks'
ratios with its quartiles: on a machine whose speed drifts, the better figure of the two.
Under the table, each run whose rows it shows: its file, device (and the copy bandwidth the
fractions are of), date, versions and command (bench/conftest.py records bench/gpu.sh's command
line where gpu.sh ran the suite, else pytest's; a merged JSON keeps each distinct one).

    python bench/report.py bench/results/*.json
    python -m bench.report --merge OUT.json PART.json...   # (bench/gpu.sh: one JSON of its per-family runs)
"""

import json
import os
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
    return f"{ms:.2f}" if ms >= 1 else f"{ms:#.3g}"  # (#: trailing zeros kept, 0.500)


def _is_fastprobe(bench):
    return bench["extra_info"].get("impl", "").startswith("fastprobe")


def fastest_peers(data):
    """group -> the fastest benchmark in it that is not fastprobe's (a peer), from one document
    (one run: a group never spans two runs)."""
    fastest = {}
    for bench in data["benchmarks"]:
        if _is_fastprobe(bench):
            continue
        best = fastest.get(bench["group"])
        if best is None or bench["stats"]["median"] < best["stats"]["median"]:
            fastest[bench["group"]] = bench
    return fastest


def _paired(info, names):
    """The row's paired speed-ups against the peers `names` (its baseline, its fastest peer), or "-"."""
    paired = info.get("paired") or {}
    found = [f"{paired[name]['speedup']:.2f}x ({paired[name]['low']:.2f}-{paired[name]['high']:.2f}) vs {name}"
             for name in dict.fromkeys(names) if name in paired]
    return "; ".join(found) or "-"


def rows(data):
    """The table rows of one pytest-benchmark JSON document."""
    machine = data["machine_info"]
    cpu = f"CPU, {machine.get('cpu_threads')} threads"
    peers = fastest_peers(data)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        shape = ", ".join(f"{k}={v}" for k, v in info.get("shape", {}).items())
        speedup = info.get("speedup_vs_baseline")
        bandwidth = info.get("fraction_of_copy_bandwidth")
        # every suite names its groups "<op>-<device>", and op names hold hyphens of their own
        # (sink_attention_head-mask_L4096, sink_attention_bfloat16-decode): cut the last one only.
        # The device is the group's, not the machine's: a run on a CUDA machine has CPU rows too
        op, device = bench["group"].rsplit("-", 1) if "-" in bench["group"] else (bench["group"], "")
        # the project's ratio: against the strongest (fastest) peer measured in the same run
        peer = peers.get(bench["group"]) if _is_fastprobe(bench) else None
        peer_speedup = "-" if peer is None else \
            f"{peer['stats']['median'] / bench['stats']['median']:.2f}x vs {peer['extra_info']['impl']}"
        paired = _paired(info, [info.get("baseline")] + ([] if peer is None else [peer["extra_info"]["impl"]]))
        yield (
            op,
            cpu if device == "cpu" else machine.get("gpu") or device,
            f"{shape}, {info.get('dtype', '').replace('torch.', '')}",
            info.get("impl", bench["name"]),
            _milliseconds(bench["stats"]["median"]),
            f"{speedup:.2f}x vs {info['baseline']}" if speedup is not None else "-",
            peer_speedup,
            paired,
            _size(info.get("peak_extra_bytes")),
            f"{bandwidth:.0%}" if bandwidth is not None else "-",
            machine.get("date", "")[:10],
        )


def load(path):
    """The pytest-benchmark document in `path`, or None (and a line on stderr) if it has none."""
    try:  # a run cut before pytest-benchmark wrote its JSON leaves it empty: the other files still count
        with open(path) as handle:
            data = json.load(handle)
        if not isinstance(data, dict) or not {"machine_info", "benchmarks"} <= data.keys():
            raise ValueError("not a pytest-benchmark JSON document")
    except (OSError, ValueError) as error:  # (json's JSONDecodeError and UnicodeDecodeError are ValueErrors)
        print(f"report.py: skipped {path}: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    return data


def merge(out, paths):
    """One document of the runs in `paths` (bench/gpu.sh runs each family in a process of its own):
    the first run's machine_info, commit_info and datetime, every run's benchmarks in order. Each
    benchmark's speed-ups were computed inside its own run (a group never spans two families)."""
    merged, runs, commands = None, 0, []
    for data in filter(None, map(load, paths)):
        runs += 1
        commands += [command for command in _commands(data["machine_info"]) if command not in commands]
        if merged is None:
            merged = data
        else:
            merged["benchmarks"].extend(data["benchmarks"])
    if merged is None:
        print("report.py: nothing to merge", file=sys.stderr)
        return 1
    merged["machine_info"]["commands"] = commands
    with open(out, "w") as handle:
        json.dump(merged, handle, indent=4)
    print(f"report.py: {len(merged['benchmarks'])} benchmarks of {runs} runs into {out}", file=sys.stderr)
    return 0


def _commands(machine):
    """The commands of a run as recorded (a merged run's: each distinct one of its parts)."""
    return machine.get("commands") or ([machine["command"]] if machine.get("command") else [])


def run_line(path, data):
    """A run's provenance under the table: file, device, date, versions, command(s)."""
    machine = data["machine_info"]
    device = machine.get("gpu") or f"CPU, {machine.get('cpu_threads')} threads"
    if machine.get("copy_bandwidth_bytes_per_s"):  # what "of copy bandwidth" is a fraction of
        device += f" (copy bandwidth {machine['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s)"
    versions = ", ".join(f"{name} {version}" for name, version in machine.get("versions", {}).items()
                         if name in ("torch", "triton", "transformers") and version)
    commands = "; ".join(f"`{command}`" for command in _commands(machine)) or "command not recorded"
    return f"- `{os.path.basename(path)}`: {device}, {machine.get('date', '')[:10]}, {versions}: {commands}"


def main(paths):
    header = ("op", "device", "problem", "implementation", "median ms", "speed-up", "vs fastest peer",
              "paired (quartiles)", "peak extra memory", "of copy bandwidth", "date")
    chosen = {}  # (op, device, problem) -> ((a fastprobe row?, peers), run's time, run's index, its rows)
    order = []  # comparisons in order of first appearance
    runs = []
    for path in paths:
        data = load(path)
        if data is None:
            continue
        runs.append(run_line(path, data))
        comparisons = {}
        for row in rows(data):
            comparisons.setdefault(row[:3], []).append(row)
        for key, group in comparisons.items():
            # (a later run whose fastprobe row failed does not replace a whole comparison)
            ours = sum(row[3].startswith("fastprobe") for row in group)
            candidate = ((ours > 0, len(group) - ours), data.get("datetime", ""), len(runs) - 1, group)
            if key not in chosen:
                order.append(key)
            if key not in chosen or candidate[:3] >= chosen[key][:3]:
                chosen[key] = candidate
    if not runs:  # (every file skipped, or none given: a bare header said nothing of why)
        sys.exit(f"report.py: no pytest-benchmark results in {' '.join(paths) or 'no file'}; "
                 "usage: python bench/report.py RESULTS.json... (e.g. bench/results/*.json)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for key in order:
        for row in chosen[key][3]:
            print("| " + " | ".join(row) + " |")
    shown = sorted({chosen[key][2] for key in order})  # the runs with a row in the table
    if shown:
        print("\nRuns:")
        for index in shown:
            print(runs[index])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:
        sys.exit(merge(sys.argv[2], sys.argv[3:]))
    main(sys.argv[1:])
