#!/usr/bin/env bash
# Runs on a CUDA machine that already has torch and triton: installs fastprobe
# (no build isolation, no downloads), runs the GPU tests and the benchmarks, and
# writes logs and pytest-benchmark JSON to OUTDIR (default bench/results).
#
#   bash bench/gpu.sh [OUTDIR]
set -uo pipefail
cd "$(dirname "$0")/.."
outdir=${1:-bench/results}
mkdir -p "$outdir"
export PYTHONUNBUFFERED=1
python3 -m pip install --no-build-isolation --no-deps --no-index -e . >"$outdir/install.log" 2>&1 \
  || { tail -30 "$outdir/install.log"; exit 1; }
python3 -m fastprobe.cli info | tee "$outdir/info.log"
status=0
# Tests launch each kernel with its first pruned config (FASTPROBE_AUTOTUNE=0): tuning
# every shape and dtype would take longer than the tests; the benchmarks tune.
FASTPROBE_AUTOTUNE=0 timeout 300 python3 -m pytest tests -m gpu -q -p no:cacheprovider -x \
  2>&1 | tee "$outdir/gpu-tests.log" || status=1
device=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
timeout 420 python3 -m pytest bench -k cuda -q -p no:cacheprovider --benchmark-json="$outdir/$device.json" \
  --benchmark-columns=median,min,max,rounds 2>&1 | tee "$outdir/bench.log" || status=1
python3 bench/report.py "$outdir/$device.json" | tee "$outdir/table.md"
exit $status
