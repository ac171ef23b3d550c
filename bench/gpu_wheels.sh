#!/usr/bin/env bash
# Fetches, on a machine with package access, the wheels that bench/gpu.sh installs on the GPU
# machine (which has no package index): liger-kernel, the peer of bench/test_bridge_bench.py.
# They go to .whl/ (git-ignored); name `.whl` in the device call's carry.
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "liger-kernel==0.8.5"
