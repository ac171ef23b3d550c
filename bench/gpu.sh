#!/usr/bin/env bash
# Runs on a CUDA machine that already has torch and triton: installs fastprobe
# (no build isolation, no downloads), runs the GPU tests and the benchmarks, and
# writes logs and pytest-benchmark JSON to OUTDIR (default bench/results). FAMILY
# (divergence, concepts, bridge, attention, dual_attention, patch, guidance) limits the run to
# that family's tests and suite, so a short device lease can be spent on one family at a time.
#
#   bash bench/gpu.sh [OUTDIR] [FAMILY]
set -uo pipefail
cd "$(dirname "$0")/.."
outdir=${1:-bench/results}
family=${2:-}
mkdir -p "$outdir"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-build-isolation --no-deps --no-index -e . >"$outdir/install.log" 2>&1 \
  || { tail -30 "$outdir/install.log"; exit 1; }
python3 -m fastprobe.cli info | tee "$outdir/info.log"
status=0
case "$family" in
  "") tests=tests ;;
  patch) tests="tests/test_integration.py tests/test_sinks.py" ;;
  *) tests=tests/test_$family.py ;;
esac
# Tests launch each kernel with its first pruned config (FASTPROBE_AUTOTUNE=0): tuning
# every shape and dtype would take longer than the tests; the benchmarks tune.
FASTPROBE_AUTOTUNE=0 timeout 300 python3 -m pytest $tests -m gpu -q -p no:cacheprovider \
  2>&1 | tee "$outdir/gpu-tests.log"
code=${PIPESTATUS[0]}
[ "$code" -eq 0 ] || [ "$code" -eq 5 ] || status=1  # 5: the family has no GPU-only tests
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
timeout 420 python3 -m pytest "bench${family:+/test_${family}_bench.py}" -k cuda -q -p no:cacheprovider \
  --benchmark-json="$outdir/$device${family:+-$family}.json" \
  --benchmark-columns=median,min,max,rounds 2>&1 | tee "$outdir/bench.log" || status=1
python3 bench/report.py "$outdir/$device${family:+-$family}.json" | tee "$outdir/table.md"
exit $status
