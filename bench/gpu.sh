#!/usr/bin/env bash
# Runs on a CUDA machine that already has torch and triton, in one call that fits a short device
# lease: installs fastprobe (no build isolation, no downloads; wheels carried in .whl/, such as
# liger-kernel from bench/gpu_wheels.sh, go to a private site folder), runs the GPU tests, then
# the benchmarks, and writes logs, the tests' JUnit XML, one pytest-benchmark JSON and its table
# to OUTDIR (default bench/results; 8 files at most, what a device call brings back: setup.log,
# gpu-tests.log / .xml, warm-up.log, bench.log, the JSON, table.md, triton-compiles.log). FAMILY...
# (divergence, concepts, bridge, attention, dual_attention, patch, guidance, methods) limits the
# run to those families, benchmarked in the order given; the default is all of them, the
# attention families first.
#
#   GPU_BUDGET_S=540 bash bench/gpu.sh [OUTDIR] [FAMILY...]
#
# GPU_TESTS_ONLY=1: the GPU tests alone, with the whole budget (no benchmarks).
#
# With the attention family, setup.log also gets bench/host_overhead.py's table (host vs GPU
# time of a few attention calls, at most a minute).
# Kernels compiled ahead: `python bench/precompile_triton.py` (Python 3.12 + triton 3.6.0, see its
# docstring) here, right before the device call, then carry .triton-cache as well (with .whl).
# This script unpacks it into TRITON_CACHE_DIR; setup.log says whether its keys match this
# machine's and, at the end, how many kernels compiled here anyway (and which).
# Time: everything ends within GPU_BUDGET_S seconds (default 540), but for the table, the Triton report
# and a hung phase's 10 s SIGKILL grace (~25 s, an estimate: bench/NOTES.md). The phases share what is left:
#   1. the GPU tests (at most 35%), in parallel processes (pytest-xdist, where installed), whose
#      kernels run their first pruned config (FASTPROBE_AUTOTUNE=0);
#   2. a warm-up pass (at most 40% of the rest): every fastprobe and compiled peer benchmark runs
#      once, in parallel processes, so that Triton's and inductor's compilations (on the CPU)
#      land in their on-disk caches and the timed pass, which autotunes, mostly loads them;
#   3. the timed benchmarks, one pytest process per family, in turn (then, for divergence,
#      bench/sweep_divergence.py): a sticky CUDA error (an illegal memory access fails every later
#      CUDA call of its process) costs its own family's rows, not the later families'. Each writes
#      its JSON under /tmp; report.py --merge makes them the one JSON that comes back.
# A phase that reaches its deadline skips its remaining tests (bench/_deadline.py) and still
# writes its results; the skips are listed at the end of its log. A test that runs on past the
# deadline is interrupted (SIGINT) a minute after it, or at the end of the budget if that is
# sooner, and pytest still writes the JSON and XML of what finished (SIGTERM would lose them).
# A phase that starts with no time left is skipped, with a line in its log.
# The bench scripts run as modules (python3 -m bench.X) from the repository root, as pytest imports
# them: a script's sys.path[0] is bench/ itself, where `import bench.*` finds nothing.
set -uo pipefail
cd "$(dirname "$0")/.."
outdir=${1:-bench/results}
shift $(($# > 0 ? 1 : 0))
families=("$@")
all_families=(attention dual_attention patch bridge divergence concepts guidance methods)
[ ${#families[@]} -gt 0 ] || families=("${all_families[@]}")
budget=${GPU_BUDGET_S:-540}
end=$(($(date +%s) + budget))
sweep=0 # the divergence kernel's config sweep at the end (bench/NOTES.md)
[[ " ${families[*]} " == *" divergence "* ]] && sweep=1
reserve=$((20 + 40 * sweep)) # seconds kept for the table at the end (and the sweep)
mkdir -p "$outdir"
export PYTHONUNBUFFERED=1
setup_log=$outdir/setup.log

tests=() benches=()
for family in "${families[@]}"; do
  case $family in
    patch) tests+=("tests/test_devices.py") ;; # patched models, guidance and the methods on CUDA
    methods) ;; # their CUDA tests are in tests/test_devices.py (the patch family)
    divergence | concepts | bridge | attention | dual_attention | guidance) tests+=("tests/test_$family.py") ;;
    *) echo "unknown family '$family'" >&2; exit 2 ;;
  esac
  benches+=("bench/test_${family}_bench.py")
done

if compgen -G ".whl/*.whl" >/dev/null; then
  site=/tmp/fastprobe-site
  python3 -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    >>"$setup_log" 2>&1 && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install --no-build-isolation --no-deps --no-index -e . >>"$setup_log" 2>&1 \
  || { tail -30 "$setup_log"; exit 1; }
if [ -f .triton-cache/kernels.tar.xz ]; then # kernels compiled ahead (bench/precompile_triton.py)
  export TRITON_CACHE_DIR=/tmp/fastprobe-triton-cache FASTPROBE_TRITON_LOG=/tmp/fastprobe-triton-compiles.log
  export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:+$PYTEST_ADDOPTS }-p bench.precompile_triton" # logs each compile
  rm -f "$FASTPROBE_TRITON_LOG"
  python3 -m bench.precompile_triton --install "$TRITON_CACHE_DIR" 2>&1 | tee -a "$setup_log"
fi
python3 -m fastprobe.cli info 2>&1 | tee -a "$setup_log"
if [[ " ${families[*]} " == *" attention "* ]]; then # host and GPU shares of a few attention calls
  timeout 60 python3 -m bench.host_overhead >>"$setup_log" 2>&1 || echo "host_overhead.py: exit $?" >>"$setup_log"
  # the same Python path with Triton's run stubbed, as on the project's CPU machine (how fast this host runs it)
  timeout 60 python3 -m bench.host_python >>"$setup_log" 2>&1 || echo "host_python.py: exit $?" >>"$setup_log"
fi

parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n "${GPU_TEST_PROCS:-$(nproc)}") # compiles are CPU-bound

# run_phase PERCENT LOG PYTEST-ARGS...: pytest with FASTPROBE_DEADLINE at PERCENT of the time
# left (before the reserve), appending to LOG; returns pytest's exit status, or 5 (pytest's "no
# tests ran") when no time is left to start it.
run_phase() {
  local percent=$1 log=$2 now deadline limit
  shift 2
  now=$(date +%s)
  deadline=$((now + (end - reserve - now) * percent / 100))
  if [ "$deadline" -le "$now" ]; then # (`timeout 0` would mean no limit, a negative one fails: rc 125)
    echo "== $(date -u +%T) skipped, no time left ($((end - now)) s of the budget): pytest $*" | tee -a "$log"
    return 5
  fi
  # the hard stop: a minute after the deadline for a test that began before it (a compile), but
  # never past the budget's end (the bench phase's deadline is the end less the reserve)
  limit=$((deadline - now + 60))
  [ "$limit" -le $((end - now)) ] || limit=$((end - now))
  [ "$limit" -ge 1 ] || limit=1
  echo "== $(date -u +%T) pytest $* (deadline in $((deadline - now)) s, stopped in $limit s)" | tee -a "$log"
  # SIGINT: pytest stops as on ^C and still writes its --junitxml and --benchmark-json (SIGTERM
  # kills it with neither written); SIGKILL 10 s later if it hangs (in a CUDA call, say)
  FASTPROBE_DEADLINE=$deadline timeout -s INT -k 10 "$limit" \
    python3 -m pytest -q -p no:cacheprovider -p bench._deadline "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

status=0
tests_only=${GPU_TESTS_ONLY:-0}
rm -f "$outdir/gpu-tests.log" "$outdir/warm-up.log" "$outdir/bench.log" # (run_phase appends)
if [ ${#tests[@]} -gt 0 ]; then
  FASTPROBE_AUTOTUNE=0 run_phase $((tests_only == 1 ? 100 : 35)) "$outdir/gpu-tests.log" "${tests[@]}" -m gpu "${parallel[@]}" \
    --junitxml="$outdir/gpu-tests.xml" # which tests passed, failed or were skipped by the deadline
  code=$?
  [ "$code" -eq 0 ] || [ "$code" -eq 5 ] || status=1 # 5: no GPU-only tests in these families
fi

if [ "$tests_only" -ne 1 ]; then
  if [ ${#parallel[@]} -gt 0 ]; then
    run_phase 40 "$outdir/warm-up.log" "${benches[@]}" -k "cuda and (fastprobe or flex or compile or liger)" \
      --benchmark-disable -n "${GPU_WARM_PROCS:-4}" >/dev/null
    tail -5 "$outdir/warm-up.log"
  fi
  device=$(python3 -c "from bench.conftest import device_slug; print(device_slug())")
  label=$(IFS=-; echo "${families[*]}")
  [ "${families[*]}" == "${all_families[*]}" ] && label=all
  json=$outdir/$device-$label.json
  parts_dir=/tmp/fastprobe-bench-parts # (not in OUTDIR: a call brings back 8 files, gpu.sh writes 8)
  rm -rf "$parts_dir" && mkdir -p "$parts_dir"
  parts=()
  for family in "${families[@]}"; do # each family in its own process, all sharing one deadline
    run_phase 100 "$outdir/bench.log" "bench/test_${family}_bench.py" -k cuda \
      --benchmark-json="$parts_dir/$family.json" --benchmark-columns=median,min,max,rounds
    code=$?
    [ "$code" -eq 0 ] || [ "$code" -eq 5 ] || status=1 # 5: nothing ran (no time left)
    [ -e "$parts_dir/$family.json" ] && parts+=("$parts_dir/$family.json")
  done
  # in the families' order (report.py skips, with a line on stderr, a part left empty or unreadable)
  [ ${#parts[@]} -gt 0 ] && python3 -m bench.report --merge "$json" "${parts[@]}" 2>&1 | tee -a "$outdir/bench.log"
  [ -s "$json" ] && python3 -m bench.report "$json" | tee "$outdir/table.md"
  # the sweeps (bench/NOTES.md), with what time is left, into bench.log (a call brings back 8 files)
  if [ "$sweep" -eq 1 ] && [ $((end - $(date +%s))) -gt 30 ]; then
    timeout $((end - $(date +%s) - 5)) python3 -m bench.sweep_divergence 2>&1 | tee -a "$outdir/bench.log"
  fi
  if [[ " ${families[*]} " == *" attention "* ]] && [ $((end - $(date +%s))) -gt 60 ]; then
    timeout $((end - $(date +%s) - 5)) python3 -m bench.sweep_attention_stats 2>&1 | tee -a "$outdir/bench.log"
  fi
fi
[ -n "${FASTPROBE_TRITON_LOG:-}" ] \
  && python3 -m bench.precompile_triton --report "$TRITON_CACHE_DIR" "$FASTPROBE_TRITON_LOG" 2>&1 | tee -a "$setup_log" \
  && cp "$FASTPROBE_TRITON_LOG" "$outdir/triton-compiles.log" # which kernels compiled here, and when
echo "== $(date -u +%T) done with $((end - $(date +%s))) s of the budget left; status $status"
exit $status
