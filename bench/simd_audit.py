"""Which functions of the C++ extension do float arithmetic outside its multi-versioned code.

The kernels' hot functions carry FASTPROBE_SIMD_CLONES (csrc/common.h): GCC compiles them once
per target (x86-64-v4, v3, default) and picks one at load time. A helper they call that is not
inlined into them is compiled once, for the default target only: 4-wide SSE2 without FMA or F16C,
whatever the machine. That happened three times (concept_mass's forward_row and backward_row,
the attention item driver; bench/NOTES.md), each found by perf. This lists the suspects without a
profile: functions with float instructions, no ymm / zmm register, that are neither a target clone
nor its resolver, by count of float instructions. Setup code (an entry point checking its
arguments) shows up with a few; a loop over a vocabulary or a key block shows up with dozens.

    python bench/simd_audit.py [--build DIR] [--at-least N]

builds the extension unstripped (Release, into DIR, default /tmp/fastprobe-simd-audit; needs
cmake, ninja, pybind11 and objdump) and prints the table.
"""

import argparse
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
# float arithmetic, conversions and compares on xmm registers (scalar or packed)
FLOAT_OP = re.compile(r"\b(v?(add|sub|mul|div|max|min|sqrt|fmadd\w*|fmsub\w*|cmp\w*)(ss|ps|sd|pd)|v?cvt\w+)\b")


def build(directory: str) -> str:
    """The extension built unstripped into `directory`; its path."""
    import pybind11

    os.makedirs(directory, exist_ok=True)
    subprocess.run(["cmake", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DCMAKE_STRIP=/bin/true",
                    f"-Dpybind11_DIR={pybind11.get_cmake_dir()}", ROOT], cwd=directory, check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["ninja"], cwd=directory, check=True, stdout=subprocess.DEVNULL)
    return glob.glob(os.path.join(directory, "_C*.so"))[0]


def suspects(library: str, at_least: int) -> list:
    """(float instructions, name) of the functions outside the clones, most first."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", library], check=True,
                             capture_output=True, text=True).stdout
    counts, name = {}, None
    for line in listing.splitlines():
        header = FUNCTION.match(line)
        if header:
            name = header.group(1)
            counts[name] = [0, False]  # float instructions, any ymm / zmm
        elif name is not None and "\t" in line:
            counts[name][1] |= "ymm" in line or "zmm" in line
            counts[name][0] += FLOAT_OP.search(line) is not None
    found = [(floats, name) for name, (floats, wide) in counts.items()
             if "fastprobe" in name and not wide and floats >= at_least
             and not re.search(r"\[clone \.(default|arch_\w+|avx\w*|resolver)\]", name)]
    return sorted(found, reverse=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default="/tmp/fastprobe-simd-audit")
    parser.add_argument("--at-least", type=int, default=4, help="list functions with at least this many")
    args = parser.parse_args()
    found = suspects(build(args.build), args.at_least)
    print(f"{'float ops':>9}  function outside the multi-versioned code")
    for floats, name in found:
        print(f"{floats:>9}  {name[:160]}")
    if not found:
        print("        -  none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
