#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (no network; torch/triton preinstalled there):
# builds the package in place, runs the tests marked `gpu` and every benchmark at sizes that fit,
# writes CSV/JSON under OUT_DIR and prints a summary table last. Budget: under 8 minutes.
#
#   bash bench/gpu_check.sh OUT_DIR              # on the GPU machine
#   bash bench/gpu_check.sh --cpu-only OUT_DIR   # CI: quick CPU benchmarks only (no build, no GPU tests)
set -uo pipefail
cd "$(dirname "$0")/.."
cpu_only=0
if [ "${1:-}" = "--cpu-only" ]; then cpu_only=1; shift; fi
out=${1:?usage: bench/gpu_check.sh [--cpu-only] OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
command -v "$py" >/dev/null || py=python
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, keep its log, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 )) s"
  [ "$rc" = 0 ] || status=1
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$out/steps.txt"
}

if [ "$cpu_only" = 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
  # one architecture only: this card's (saves half the nvcc time)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
  export MAX_JOBS=${MAX_JOBS:-16}
  export TRITON_INTERPRET=0  # compiled Triton kernels on the GPU, never the interpreter
  step build 300 "$py" setup.py build_ext --inplace
  step gpu_tests 180 "$py" -m pytest -q -m gpu -x -p no:cacheprovider tests
  step bench_tcr 120 "$py" bench/tcr.py --out "$out"
  step bench_augment 150 "$py" bench/augment.py --out "$out"
  [ -f bench/train_step.py ] && step bench_train_step 90 "$py" bench/train_step.py --out "$out"
else
  step bench_tcr 300 "$py" bench/tcr.py --quick --out "$out"
  step bench_augment 300 "$py" bench/augment.py --quick --out "$out"
fi

echo
echo "================ summary (${out}) ================"
"$py" - "$out" <<'PY'
import csv, glob, os, sys
out = sys.argv[1]
for path in sorted(glob.glob(os.path.join(out, "*.csv"))):
    with open(path) as f:
        rows = list(csv.reader(f))
    if not rows:
        continue
    print(f"--- {os.path.basename(path)}")
    widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
PY
cat "$out/steps.txt" 2>/dev/null | awk '{printf "step %-18s exit %s  %4s s\n", $1, $2, $3}'
exit $status
