#!/usr/bin/env bash
# Makes, on a machine with package access, what bench/gpu.sh installs on the GPU machine (which has
# no package index and whose Python is 3.12), into .whl/ (git-ignored; name `.whl` in the device
# call's carry):
#   .whl/*.whl: liger-kernel, the peer of bench/test_bridge_bench.py (installed to a private site folder);
#   .whl/fastprobe/: fastprobe's editable wheel with its C++ extension compiled here, and the stamp of
#     the sources it was built from (bench/prebuilt.py). gpu.sh installs it instead of compiling
#     (`pip install -e .`), and compiles as before when the C++ sources, build files or package
#     modules changed since, or the wheel does not install or import there: rerun this after any
#     such change, right before the device call. The build runs under a Python 3.12 (PYTHON312, or
#     python3.12, or pyenv's 3.12) in a venv of its own, /tmp/fastprobe-wheel-build (scikit-build-core,
#     pybind11, cmake, ninja from the index, once).
#
#   bash bench/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "liger-kernel==0.8.5"

python312=
for candidate in "${PYTHON312:-}" python3.12 /root/.pyenv/versions/3.12*/bin/python; do
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    python312=$candidate
    break
  fi
done
[ -n "$python312" ] || { echo "no Python 3.12 found (set PYTHON312): .whl/fastprobe not built" >&2; exit 1; }
venv=/tmp/fastprobe-wheel-build
# (scikit-build-core >= 1.0, as pyproject.toml's build-system.requires: wheel.force-include)
if ! "$venv/bin/python" -c 'import scikit_build_core, pybind11, cmake, ninja
assert int(scikit_build_core.__version__.split(".")[0]) >= 1' 2>/dev/null; then
  "$python312" -m venv "$venv"
  "$venv/bin/pip" install -q "scikit-build-core>=1.0" "pybind11>=2.12" cmake ninja
fi
PATH=$venv/bin:$PATH "$venv/bin/python" -m bench.prebuilt build .whl/fastprobe
