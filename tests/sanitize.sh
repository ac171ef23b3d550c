#!/usr/bin/env bash
# Runs the test suite against a C++ extension built with AddressSanitizer and
# UndefinedBehaviorSanitizer (GCC or Clang): any read or write outside a buffer, or undefined
# behaviour, in csrc/ stops the run with a report. The kernels' scratch (uninitialised or zeroed
# in release builds) is filled with NaN here (FASTPROBE_POISON_SCRATCH): a scratch value read
# before it is written then fails the comparison with the reference.
#
#   bash tests/sanitize.sh [PYTEST ARGS...]      (default: the whole suite)
#   FASTPROBE_FUZZ=20 bash tests/sanitize.sh tests/test_fuzz.py    (a longer random search)
#
# The multi-versioned C++ code runs only the version this CPU picks (csrc/common.h). The others
# can be built alone and tested the same way, with SANITIZE_EXTRA_FLAGS added to the compiler's:
#   "-DFASTPROBE_NO_CLONES -DFASTPROBE_NO_F16C"           the baseline x86-64 (SSE2) version and
#                                                         the portable float16 conversions
#   "-DFASTPROBE_NO_CLONES -march=x86-64-v3"              the AVX2 version
#
# The sanitized build goes to a private folder ($SANITIZE_DIR, default /tmp/fastprobe-sanitize);
# an installed fastprobe (editable or not) is left alone and shadowed only inside the run.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${SANITIZE_DIR:-/tmp/fastprobe-sanitize}
rm -rf "$work"
mkdir -p "$work/src" "$work/run"
cp -r "$root"/{pyproject.toml,CMakeLists.txt,README.md,csrc,kernels,fastprobe} "$work/src/"
# the tree but the package (imported from the sanitized build), for the tests that read its files
cp -r "$root"/{tests,bench,pyproject.toml,README.md,CMakeLists.txt,csrc,kernels} "$work/run/"

flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -DFASTPROBE_POISON_SCRATCH ${SANITIZE_EXTRA_FLAGS:-}"
echo "building the sanitized extension into $work/site ..."
python -m pip install -q --no-deps --no-build-isolation --target "$work/site" "$work/src" \
  -Ccmake.build-type=RelWithDebInfo "-Ccmake.define.CMAKE_CXX_FLAGS=$flags" \
  "-Ccmake.define.CMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined"

# (grep reads all of ldd's output: with -q it could stop early, ldd would die of SIGPIPE, and pipefail fail the check)
ldd "$work"/site/fastprobe/_C*.so | grep asan >/dev/null || { echo "the extension is not instrumented" >&2; exit 1; }

# An editable install puts a finder for `fastprobe` ahead of sys.path; this sitecustomize (on
# PYTHONPATH, so also in spawned workers) drops it, so `fastprobe` is the sanitized copy.
cat > "$work/site/sitecustomize.py" <<'EOF'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
EOF

compiler=$(python - <<'EOF'
import sysconfig
print((sysconfig.get_config_var("CXX") or "c++").split()[0])
EOF
)
runtime() { "$compiler" -print-file-name="$1" 2>/dev/null || gcc -print-file-name="$1"; }
preload="$(runtime libasan.so):$(runtime libubsan.so)"
cd "$work/run"
PYTHONPATH="$work/site" python -c "import fastprobe; assert fastprobe.__file__.startswith('$work/site'), fastprobe.__file__"
LD_PRELOAD="$preload" PYTHONPATH="$work/site" ASAN_OPTIONS=detect_leaks=0 \
  python -c "from fastprobe import _C; print('C++ code:', _C.simd_clone(), '| F16C:', _C.has_f16c())"
echo "running pytest against $work/site (LD_PRELOAD=$preload)"
# detect_leaks=0: CPython and torch keep allocations alive at exit by design
LD_PRELOAD="$preload" PYTHONPATH="$work/site" \
  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  python -m pytest -p no:cacheprovider -q "${@:-tests}"
