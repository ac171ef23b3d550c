#!/usr/bin/env bash
# Runs on a CUDA machine that already has torch and triton, in one call that fits a short device
# lease: installs fastprobe (no build isolation, no downloads: the editable wheel with the C++
# compiled ahead, .whl/fastprobe from bench/gpu_wheels.sh, where it matches this tree, else `pip
# install -e .` compiles it here; wheels carried in .whl/, such as liger-kernel from
# bench/gpu_wheels.sh, go to a private site folder), runs the GPU tests, then
# the benchmarks, and writes logs, the tests' JUnit XML, one pytest-benchmark JSON and its table
# to OUTDIR (default bench/results; 8 files at most, what a device call brings back: setup.log,
# gpu-tests.log / .xml, warm-up.log, bench.log, the JSON, table.md, triton-compiles.log). FAMILY...
# (divergence, concepts, bridge, attention, dual_attention, patch, guidance, methods) limits the
# run to those families, benchmarked in the order given; the default is all of them, the
# attention families first.
#
#   GPU_BUDGET_S=540 bash bench/gpu.sh [OUTDIR] [FAMILY...]
#
# GPU_TESTS_ONLY=1: the GPU tests alone, with the whole budget (no benchmarks). GPU_TESTS=0: no
# GPU tests (the benchmarks alone, for a second call after a tests-only one).
# GPU_DRY_RUN=1: a rehearsal of this script on any machine (tests/test_bench_suites.py runs one on
# the CPU): nothing is installed (the checkout's own build runs) and no Triton archive unpacked;
# with GPU_BENCH_SELECT="cpu and ..." it times CPU rows. GPU_BENCH_SELECT: the pytest -k of the
# timed pass (default "cuda"; the warm-up takes its compiled rows). GPU_FAMILY_MIN_S: seconds the
# timed pass keeps for each family still to come (default 30), so that a long first family (the
# attention suite's ~60 rows) cannot leave the last ones no time. GPU_WARM_PROCS=0: no warm-up.
#
# With the attention family, setup.log also gets bench/host_overhead.py's table (host vs GPU
# time of a few attention calls) and bench/host_python.py's, within GPU_HOST_PERCENT (default 15)
# of the budget.
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
#      land in their on-disk caches and the timed pass, which autotunes, mostly loads them; its
#      autotuners compile (or load, from the archive) and run each config once, untimed
#      (bench/_warm_up.py: their choices die with the warm-up's processes);
#   3. the timed benchmarks, one pytest process per family, in turn (then, for divergence,
#      bench/sweep_divergence.py): a sticky CUDA error (an illegal memory access fails every later
#      CUDA call of its process) costs its own family's rows, not the later families'. Each family
#      ends by a deadline that leaves GPU_FAMILY_MIN_S for each family after it, and writes its JSON
#      under /tmp; after each family report.py --merge rewrites the one JSON that comes back, and
#      its table, so that a call killed later (its timeout_s) still returns the families done.
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
dry_run=${GPU_DRY_RUN:-0}
select=${GPU_BENCH_SELECT:-cuda}
family_min=${GPU_FAMILY_MIN_S:-30}
all_families=(attention dual_attention patch bridge divergence concepts guidance methods)
[ ${#families[@]} -gt 0 ] || families=("${all_families[@]}")
budget=${GPU_BUDGET_S:-540}
end=$(($(date +%s) + budget))
sweep=0 # the divergence kernel's config sweep at the end (bench/NOTES.md)
[[ " ${families[*]} " == *" divergence "* ]] && sweep=1
reserve=$((20 + 40 * sweep)) # seconds kept for the table at the end (and the sweep)
# how this run was started, for the JSON (bench/conftest.py) and so for report.py's list of runs
knobs=$(env | grep -E '^GPU_(DRY_RUN|BENCH_SELECT|FAMILY_MIN_S|WARM_PROCS|TEST_PROCS|TESTS_ONLY|TESTS|HOST_PERCENT)=' | sort \
  | sed -E "s/=(.*)/='\1'/" | tr '\n' ' ')
export FASTPROBE_BENCH_COMMAND="GPU_BUDGET_S=$budget ${knobs}bash bench/gpu.sh OUTDIR ${families[*]}"
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
# without a CUDA device every GPU test skips and every -k cuda row is deselected, and the run would
# end "status 0" having measured nothing: refuse it before installing anything (GPU_DRY_RUN=1
# rehearses the script on the CPU)
if [ "$dry_run" -ne 1 ] && ! python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >>"$setup_log" 2>&1; then
  echo "bench/gpu.sh: torch sees no CUDA device here (GPU_DRY_RUN=1 rehearses this script on the CPU)" \
    | tee -a "$setup_log" >&2
  exit 1
fi

if [ "$dry_run" -eq 1 ]; then
  echo "GPU_DRY_RUN=1: nothing installed, no kernel archive unpacked" | tee -a "$setup_log"
elif compgen -G ".whl/*.whl" >/dev/null; then
  site=/tmp/fastprobe-site
  python3 -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    >>"$setup_log" 2>&1 && export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
# fastprobe: the editable wheel whose C++ bench/gpu_wheels.sh compiled ahead (.whl/fastprobe, where it
# was built from this tree's C++ and for this Python: bench/prebuilt.py), else compiled here as before
if [ "$dry_run" -ne 1 ]; then
  start=$(date +%s)
  python3 -m bench.prebuilt install .whl/fastprobe >>"$setup_log" 2>&1 \
    || { echo "== compiling fastprobe here (pip install -e .)" >>"$setup_log"
         python3 -m pip install --no-build-isolation --no-deps --no-index -e . >>"$setup_log" 2>&1; } \
    || { tail -30 "$setup_log"; exit 1; }
  echo "== fastprobe installed in $(($(date +%s) - start)) s" >>"$setup_log"
fi
if [ "$dry_run" -ne 1 ] && [ -f .triton-cache/kernels.tar.xz ]; then # kernels compiled ahead (bench/precompile_triton.py)
  export TRITON_CACHE_DIR=/tmp/fastprobe-triton-cache FASTPROBE_TRITON_LOG=/tmp/fastprobe-triton-compiles.log
  export PYTEST_ADDOPTS="${PYTEST_ADDOPTS:+$PYTEST_ADDOPTS }-p bench.precompile_triton" # logs each compile
  rm -f "$FASTPROBE_TRITON_LOG"
  python3 -m bench.precompile_triton --install "$TRITON_CACHE_DIR" 2>&1 | tee -a "$setup_log"
fi
python3 -m fastprobe.cli info 2>&1 | tee -a "$setup_log"
if [[ " ${families[*]} " == *" attention "* ]]; then
  # host and GPU shares of a few attention calls (host_overhead), and the same Python path with
  # Triton's run stubbed, as on the project's CPU machine (host_python: how fast this host runs it).
  # One deadline for both, GPU_HOST_PERCENT (default 15) of the time left before the reserve: they
  # stop between cases once it has passed (bench/_deadline.py); one still running 10 s after it
  # is interrupted (what it printed stays in setup.log), and one that would start later is skipped.
  now=$(date +%s)
  host_deadline=$((now + (end - reserve - now) * ${GPU_HOST_PERCENT:-15} / 100))
  echo "== $(date -u +%T) host-time scripts (deadline in $((host_deadline - now)) s)" >>"$setup_log"
  for script in host_overhead host_python; do
    limit=$((host_deadline + 10 - $(date +%s)))
    if [ "$limit" -le 10 ]; then
      echo "bench/$script.py: skipped, past the host scripts' deadline" >>"$setup_log"
      continue
    fi
    FASTPROBE_DEADLINE=$host_deadline timeout -s INT -k 5 "$limit" python3 -m "bench.$script" >>"$setup_log" 2>&1 \
      || echo "bench/$script.py: exit $?" >>"$setup_log"
  done
fi

parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n "${GPU_TEST_PROCS:-$(nproc)}") # compiles are CPU-bound

# with_threads PROCS COMMAND...: COMMAND with OMP_NUM_THREADS (torch's intra-op threads) set to
# the cores each of PROCS parallel pytest processes gets, at least 1 (unchanged without xdist or
# with PROCS 0). The tests' float64 references run on the CPU, and 16 workers of 16 threads each
# leave every small op waiting at OpenMP barriers for a core: on the H200 of 2026-12-04 each
# attention test that ran took 13-21 s (96 of 345 in the phase's 101 s); here, 8 workers running
# test_attention's C++ reference cases on 2 cores took 68.5 s, and 30.0 s with one thread each.
with_threads() {
  local procs=$1
  shift
  if [ ${#parallel[@]} -gt 0 ] && [ "$procs" -gt 0 ] 2>/dev/null; then
    OMP_NUM_THREADS=$(($(nproc) / procs > 0 ? $(nproc) / procs : 1)) "$@"
  else
    "$@"
  fi
}

# run_phase PERCENT HOLD LOG PYTEST-ARGS...: pytest with FASTPROBE_DEADLINE at PERCENT of the
# time left before the reserve and HOLD more seconds (kept for later phases), appending to LOG;
# returns pytest's exit status, or 5 (pytest's "no tests ran") when no time is left to start it.
run_phase() {
  local percent=$1 hold=$2 log=$3 now deadline limit
  shift 3
  now=$(date +%s)
  deadline=$((now + (end - reserve - hold - now) * percent / 100))
  if [ "$deadline" -le "$now" ]; then # (`timeout 0` would mean no limit, a negative one fails: rc 125)
    echo "== $(date -u +%T) skipped, no time left ($((end - now)) s of the budget): pytest $*" | tee -a "$log"
    return 5
  fi
  # the hard stop: a minute after the deadline for a test that began before it (a compile), but
  # never past the budget's end (the bench phase's deadline is the end less the reserve)
  limit=$((deadline - now + 60))
  [ "$limit" -le $((end - now)) ] || limit=$((end - now))
  [ "$limit" -ge 1 ] || limit=1
  echo "== $(date -u +%T) pytest $* (deadline in $((deadline - now)) s, stopped in $limit s;" \
    "OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset})" | tee -a "$log"
  # SIGINT: pytest stops as on ^C and still writes its --junitxml and --benchmark-json (SIGTERM
  # kills it with neither written); SIGKILL 10 s later if it hangs (in a CUDA call, say)
  FASTPROBE_DEADLINE=$deadline timeout -s INT -k 10 "$limit" \
    python3 -m pytest -q -p no:cacheprovider -p bench._deadline "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

status=0
# an extra step's exit code ($1, of the step named $2): 0, or 124 when its time box ran out (the
# sweeps and the pairs stop at the budget's end), is fine; anything else (a crash, a sticky CUDA
# error) is said in bench.log and fails the run, as a failed test or benchmark does
step_done() {
  [ "$1" -eq 0 ] || [ "$1" -eq 124 ] && return 0
  echo "bench/gpu.sh: $2 exited $1" | tee -a "$outdir/bench.log" >&2
  status=1
}
tests_only=${GPU_TESTS_ONLY:-0}
rm -f "$outdir/gpu-tests.log" "$outdir/warm-up.log" "$outdir/bench.log" # (run_phase appends)
[ "${GPU_TESTS:-1}" -eq 0 ] && [ "$tests_only" -ne 1 ] && tests=() # (GPU_TESTS=0: benchmarks only)
if [ ${#tests[@]} -gt 0 ]; then
  FASTPROBE_AUTOTUNE=0 with_threads "${GPU_TEST_PROCS:-$(nproc)}" \
    run_phase $((tests_only == 1 ? 100 : 35)) 0 "$outdir/gpu-tests.log" "${tests[@]}" -m gpu "${parallel[@]}" \
    --junitxml="$outdir/gpu-tests.xml" # which tests passed, failed or were skipped by the deadline
  code=$?
  [ "$code" -eq 0 ] || [ "$code" -eq 5 ] || status=1 # 5: no GPU-only tests in these families
fi

if [ "$tests_only" -ne 1 ]; then
  if [ ${#parallel[@]} -gt 0 ] && [ "${GPU_WARM_PROCS:-4}" -gt 0 ]; then
    with_threads "${GPU_WARM_PROCS:-4}" run_phase 40 0 "$outdir/warm-up.log" "${benches[@]}" -p bench._warm_up \
      -k "($select) and (fastprobe or flex or compile or liger)" --benchmark-disable -n "${GPU_WARM_PROCS:-4}" >/dev/null
    code=$?
    [ "$code" -eq 5 ] || step_done "$code" "the warm-up (warm-up.log)" # 5: nothing to warm
    tail -5 "$outdir/warm-up.log"
  fi
  device=$(python3 -c "from bench.conftest import device_slug; print(device_slug())")
  label=$(IFS=-; echo "${families[*]}")
  [ "${families[*]}" == "${all_families[*]}" ] && label=all
  json=$outdir/$device-$label.json
  parts_dir=/tmp/fastprobe-bench-parts # (not in OUTDIR: a call brings back 8 files, gpu.sh writes 8)
  rm -rf "$parts_dir" && mkdir -p "$parts_dir"
  rm -f "$json" "$outdir/table.md" # (an earlier run's, in OUTDIR, would pass for this one's)
  parts=()
  left=${#families[@]}
  for family in "${families[@]}"; do # each family in its own process
    left=$((left - 1))
    # held for the families after this one: GPU_FAMILY_MIN_S each, but never more than their even
    # share of what is left (a short budget is then split evenly, not spent on the last family)
    hold=$((left * family_min)) fair=$(((end - reserve - $(date +%s)) * left / (left + 1)))
    [ "$hold" -le "$fair" ] || hold=$((fair > 0 ? fair : 0))
    run_phase 100 "$hold" "$outdir/bench.log" "bench/test_${family}_bench.py" -k "$select" \
      --benchmark-json="$parts_dir/$family.json" --benchmark-columns=median,min,max,rounds
    code=$?
    [ "$code" -eq 0 ] || [ "$code" -eq 5 ] || status=1 # 5: nothing ran (no time left)
    [ -s "$parts_dir/$family.json" ] || continue
    parts+=("$parts_dir/$family.json")
    # the families so far, in their order, into OUTDIR now (report.py skips, with a line on
    # stderr, a part left empty or unreadable)
    python3 -m bench.report --merge "$json" "${parts[@]}" 2>&1 | tee -a "$outdir/bench.log"
    step_done "${PIPESTATUS[0]}" "report.py --merge"
    [ -s "$json" ] && python3 -m bench.report "$json" >"$outdir/table.md"
  done
  [ -s "$outdir/table.md" ] && cat "$outdir/table.md"
  # the sweeps (bench/NOTES.md), with what time is left, into bench.log (a call brings back 8 files)
  [ "$dry_run" -eq 1 ] && sweep=0 # (they need CUDA)
  if [ "$sweep" -eq 1 ] && [ $((end - $(date +%s))) -gt 30 ]; then
    timeout $((end - $(date +%s) - 5)) python3 -m bench.sweep_divergence 2>&1 | tee -a "$outdir/bench.log"
    step_done "${PIPESTATUS[0]}" "bench.sweep_divergence"
  fi
  if [ "$dry_run" -ne 1 ] && [[ " ${families[*]} " == *" attention "* ]] && [ $((end - $(date +%s))) -gt 60 ]; then
    timeout $((end - $(date +%s) - 5)) python3 -m bench.sweep_attention_stats 2>&1 | tee -a "$outdir/bench.log"
    step_done "${PIPESTATUS[0]}" "bench.sweep_attention_stats"
  fi
  # the goals' ratios timed in pairs (bench/paired_cuda.py), with the budget's last seconds
  if [ "$dry_run" -ne 1 ] && [[ " ${families[*]} " =~ \ (dual_attention|patch)\  ]] && [ $((end - $(date +%s))) -gt 40 ]; then
    FASTPROBE_DEADLINE=$((end - 15)) timeout -s INT -k 5 $((end - $(date +%s) - 5)) python3 -m bench.paired_cuda 60 2>&1 \
      | tee -a "$outdir/bench.log"
    step_done "${PIPESTATUS[0]}" "bench.paired_cuda"
  fi
fi
[ -n "${FASTPROBE_TRITON_LOG:-}" ] \
  && python3 -m bench.precompile_triton --report "$TRITON_CACHE_DIR" "$FASTPROBE_TRITON_LOG" 2>&1 | tee -a "$setup_log" \
  && cp "$FASTPROBE_TRITON_LOG" "$outdir/triton-compiles.log" # which kernels compiled here, and when
echo "== $(date -u +%T) done with $((end - $(date +%s))) s of the budget left; status $status"
exit $status
