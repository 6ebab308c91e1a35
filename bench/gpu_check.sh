#!/usr/bin/env bash
# The one prepared device check for a lent GPU machine (no network; Python 3.12, torch, triton,
# pytest preinstalled there). It installs the package for the card's architecture, checks that
# everything imports, then runs what matters most first: the training epoch (eager, captured, the
# published path, the speed-up), the kernel benchmarks, the tests marked `gpu` (training, capture,
# evaluation and NCCL first, the kernel sweeps after), and last the compiled epoch row (a cold
# Inductor compile is the slowest and least needed figure).
#
#   bash bench/gpu_check.sh OUT                    # on the GPU machine: the default steps
#   bash bench/gpu_check.sh OUT tests bench_tcr    # only these steps (env, imports and summary always run)
#   bash bench/gpu_check.sh --rehearse OUT         # on a machine without a GPU: every part that needs none
#
# Every step runs under `timeout -k`; the limits of the selected steps, install included, add up to
# at most 420 s (checked, and printed as the plan, before anything runs). Each step appends to OUT as
# it goes, and summary.txt is rewritten after every step and every 15 s while one runs, so a step or a
# whole run that is killed keeps everything finished before it, its summary included.
# OUT holds at most 8 files: gpu_check.log (everything printed), env.txt, steps.csv, results.csv (every
# benchmark row), tests.txt (the gpu tests' outcome), summary.txt and results.png.
# --rehearse runs the same install command, the imports, collects the gpu tests in the GPU run's order
# (an import or collection error fails it) and with torch pretending an sm_90 device (no gpu test may
# hide), compiles every Triton configuration ahead of time for sm_90 under the installed triton, runs
# each benchmark at a toy size on the CPU with the same output options, and checks the file count and
# the limits; its time limits are the GPU ones times REHEARSE_SLOWDOWN (default 4: a 2-core CPU builds
# and compiles that much slower than the 16-core GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."

rehearse=0
if [ "${1:-}" = "--rehearse" ]; then rehearse=1; shift; fi
out=${1:?usage: bash bench/gpu_check.sh [--rehearse] OUT [STEP ...]}
shift
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)

# step -> GPU time limit in seconds; the order is the order they run in (by value: key figures first)
STEP_NAMES=(env install imports bench_epoch bench_tcr bench_augment tests bench_step bench_data bench_compiled summary)
# bench_step and bench_data are not default steps: bench_epoch's "share" rows hold the step's phases, and the
# store's read rate into the GPU (bench data: pinned buffers, a side stream) matters once a set outgrows memory;
# name them to run them (each fits in place of another step)
DEFAULT_OFF=(bench_step bench_data)
declare -A LIMIT=([env]=10 [install]=90 [imports]=15 [bench_epoch]=65 [bench_tcr]=30 [bench_augment]=25 [tests]=105
                  [bench_step]=20 [bench_data]=40 [bench_compiled]=70 [summary]=10)
BUDGET=420
MAX_FILES=8

selected=("$@")
if [ ${#selected[@]} -eq 0 ]; then
  for name in "${STEP_NAMES[@]}"; do [[ " ${DEFAULT_OFF[*]} " == *" $name "* ]] || selected+=("$name"); done
fi
for name in "${selected[@]}"; do
  [ -n "${LIMIT[$name]:-}" ] || { echo "gpu_check: unknown step '$name' (steps: ${STEP_NAMES[*]})"; exit 2; }
done
wanted() {  # env, imports and summary always run: they are cheap and every later step needs them
  local name=$1 s
  case $name in env|imports|summary) return 0 ;; esac
  for s in "${selected[@]}"; do [ "$s" = "$name" ] && return 0; done
  return 1
}
total=0
plan=()
for name in "${STEP_NAMES[@]}"; do
  if wanted "$name"; then total=$(( total + LIMIT[$name] )); plan+=("$name ${LIMIT[$name]} s"); fi
done
plan_line="plan (GPU limits, in order): $(IFS=,; echo "${plan[*]}" | sed 's/,/, /g') = ${total} s of ${BUDGET}"
if [ "$total" -gt "$BUDGET" ]; then
  echo "$plan_line"
  echo "gpu_check: the selected steps' limits add up to ${total} s, over the ${BUDGET} s budget"
  exit 2
fi

log="$out/gpu_check.log"
# this run's files only: a rerun into the same OUT must not mix an earlier run's rows into its own
rm -f "$out"/{env.txt,tests.txt,results.csv,summary.txt,results.png} "$out"/.summary.*.tmp
: > "$log"
echo "step,exit,seconds,limit" > "$out/steps.csv"
py=${PYTHON:-python3}
command -v "$py" >/dev/null || py=python
export PYTHONUNBUFFERED=1
slowdown=1
if [ "$rehearse" = 1 ]; then
  slowdown=${REHEARSE_SLOWDOWN:-4}
  export CUDA_VISIBLE_DEVICES=""  # nothing here may find a GPU by accident
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # the H200's, as the GPU branch would probe it
else
  export TRITON_INTERPRET=0  # compiled Triton kernels on the GPU, never the interpreter
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
say() { echo "$@" | tee -a "$log"; }

step() {  # step NAME CMD...: run under its time limit, log everything, record exit code and time
  local name=$1; shift
  local limit=$(( LIMIT[$name] * slowdown ))
  say "=== $name (limit ${limit} s)"
  local t0=$SECONDS
  # a step is one of the functions below, run by a child bash: timeout signals its whole process group
  timeout -k 5 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local took=$(( SECONDS - t0 ))
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && say "=== $name: killed at its ${limit} s limit"
  say "=== $name: exit $rc in ${took} s"
  echo "$name,$rc,$took,$limit" >> "$out/steps.csv"
  [ "$rc" = 0 ] || status=1
  return "$rc"
}

env_report() {
  env_facts 2>&1 | tee "$out/env.txt"
}

env_facts() {
  if [ "$rehearse" = 0 ]; then
    timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi failed"
  fi
  "$py" - <<'PY'
import platform, sys
import numpy, torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = "not installed"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton_version}, numpy {numpy.__version__}, {platform.machine()}")
if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"gpu: {torch.cuda.get_device_name()} (sm_{major}{minor}), {torch.cuda.device_count()} device(s)")
else:
    print("gpu: none visible")
PY
}

install_package() {
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # one architecture only, this card's: half the nvcc time
    TORCH_CUDA_ARCH_LIST=$(timeout 30 "$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
    export TORCH_CUDA_ARCH_LIST
  fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  "$py" -m pip install --no-build-isolation --no-deps -e .
}

check_imports() {
  "$py" - <<'PY' || return 1
import empssl, empssl._C, empssl.kernels.tcr, empssl.kernels.augment, empssl.bench.tcr, empssl.bench.augment, empssl.bench.step, empssl.bench.epoch
print(f"empssl {empssl.__version__} from {empssl.__file__}; extension CUDA part: {empssl._C.with_cuda}")
PY
  "$py" -m empssl info
}

pytest_timeout_args() {  # a per-test limit where pytest-timeout is installed (it is on the GPU machine)
  if "$py" -c "import pytest_timeout" 2>/dev/null; then echo "--timeout=60"; fi
}

# the gpu tests by value: training, capture, evaluation and NCCL first, then the rest, the kernel sweeps last
# (pytest runs the files in this order and collects a file named twice once)
test_files() {
  local first=(tests/test_train_step.py tests/test_train.py tests/test_evaluate.py tests/test_train_distributed.py
               tests/test_evaluate_distributed.py)
  local last=(tests/test_augment_triton.py tests/test_augment_backends.py tests/test_tcr_triton.py tests/test_tcr_backends.py)
  local f rest=()
  for f in tests/test_*.py; do
    [[ " ${first[*]} ${last[*]} " == *" $f "* ]] || rest+=("$f")
  done
  echo "${first[*]} ${rest[*]} ${last[*]}"
}

run_tests() {
  local extra files
  extra=$(pytest_timeout_args)
  files=$(test_files)
  [ -n "$extra" ] || echo "note: pytest-timeout not installed: no per-test limit (the step limit still holds)"
  if [ "$rehearse" = 1 ]; then
    # what the GPU run would hit before its first test: an import or collection error fails here too
    # shellcheck disable=SC2086
    "$py" -m pytest -q -m gpu --collect-only -p no:cacheprovider $extra $files > "$out/tests.txt" 2>&1
    local rc=$?
    tail -n 3 "$out/tests.txt"
    [ "$rc" = 0 ] || { cat "$out/tests.txt"; return 1; }
    echo "first gpu tests in the GPU run's order:"
    grep -m 3 "::" "$out/tests.txt"
    echo "every module holding gpu tests collects them on an sm_90 device with TRITON_INTERPRET=0:"
    "$py" -m pytest -q -p no:cacheprovider tests/test_gpu_collection.py 2>&1 | tail -n 1
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    echo "ahead-of-time compile of every Triton configuration for sm_90:"
    EMPSSL_AOT_TARGETS=90 "$py" -m pytest -q -p no:cacheprovider -s tests/test_triton_aot.py 2>&1 | grep -v "^\s*$"
    return "${PIPESTATUS[0]}"
  fi
  # one line per test in tests.txt, so a run killed at the step limit still shows what finished
  # shellcheck disable=SC2086
  "$py" -m pytest -v -m gpu -p no:cacheprovider -rfE --durations=15 $extra $files > "$out/tests.txt" 2>&1
  local rc=$?
  grep -E "^(FAILED|ERROR)|(passed|failed|error).* in [0-9.]+s" "$out/tests.txt" | tail -n 40
  sed -n '/slowest 15 durations/,/^$/p' "$out/tests.txt" | head -n 17
  return "$rc"
}

bench() {  # bench NAME [ARGS...]: one benchmark, its rows appended to results.csv as they are measured
  local name=$1
  shift
  if [ "$rehearse" = 1 ]; then
    "$py" -m empssl.bench "$name" --tiny --device cpu --csv "$out/results.csv" --no-plot "$@"
  else
    "$py" -m empssl.bench "$name" --device cuda --csv "$out/results.csv" --no-plot "$@"
  fi
}

summary() {  # summary [--plot]: summary.txt from what OUT holds now (cheap: rewritten after every step)
  "$py" - "$out" "$@" <<'PY'
import csv, os, re, sys
out, plot = sys.argv[1], "--plot" in sys.argv[2:]
sys.path.insert(0, os.getcwd())


def readable(ms):
    seconds = float(ms) / 1e3
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s" if seconds < 120 else f"{seconds / 60:.3g} min" if seconds < 7200 else f"{seconds / 3600:.3g} h"


lines = []
env = os.path.join(out, "env.txt")
if os.path.exists(env):
    with open(env) as f:
        lines += [line.rstrip() for line in f if line.strip()][:4]
rows = []
path = os.path.join(out, "results.csv")
if os.path.exists(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
if rows:
    lines.append(f"device: {rows[0]['device']} | {rows[0]['versions']}")
    lines.append(f"{'bench':8s} {'case':30s} {'method':34s} {'dtype':8s} {'time':>9s} {'rate':>10s} {'unit':10s} {'of limit':>8s}")
    shown = rows[:48]
    for r in shown:
        head = f"{r['bench']:8s} {r['case'][:30]:30s} {r['method'][:34]:34s} {r['dtype'][:8]:8s}"
        if r.get("error"):
            lines.append(f"{head} FAILED: {r['error'][:80]}")
            continue
        fraction = f"{float(r['limit_fraction']):.1%}" if r["limit_fraction"] else ""
        lines.append(f"{head} {readable(r['ms']):>9s} {float(r['rate']):10.3g} {r['rate_unit'][:10]:10s} {fraction:>8s}")
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more rows in results.csv")
    if plot:
        try:
            from empssl.bench.common import plot_rows
            plot_rows(rows, os.path.join(out, "results.png"), f"{rows[0]['device']} | {rows[0]['versions']}")
        except Exception as err:  # the plot is a convenience; the CSV is the record
            lines.append(f"no plot: {type(err).__name__}: {err}")
tests = os.path.join(out, "tests.txt")
if os.path.exists(tests):
    text = open(tests).read()
    counts = re.findall(r"^=*\s*(.*\b(?:passed|failed|error|errors|skipped|deselected|selected|collected)\b.*?)\s*=*$", text, re.M)
    if counts:
        lines.append("gpu tests: " + counts[-1])
    else:  # killed before pytest's last line (or still running): count the per-test lines of -v
        outcomes = re.findall(r"^tests/\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", text, re.M)
        tally = {o: outcomes.count(o) for o in sorted(set(outcomes))}
        lines.append("gpu tests (no pytest summary yet: running or stopped early): "
                     + (", ".join(f"{v} {k.lower()}" for k, v in tally.items()) or "none ran"))
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M))
                    | set(re.findall(r"^(tests/\S+) (?:FAILED|ERROR)", text, re.M)))
    lines += [f"  FAILED {name}" for name in failed[:12]] + ([f"  ... {len(failed) - 12} more"] if len(failed) > 12 else [])
with open(os.path.join(out, "steps.csv")) as f:
    steps = list(csv.DictReader(f))
lines.append("steps: " + ", ".join(f"{s['step']} {'ok' if s['exit'] == '0' else 'EXIT ' + s['exit']} {s['seconds']}s/{s['limit']}s" for s in steps))
temporary = os.path.join(out, f".summary.{os.getpid()}.tmp")  # written whole, then renamed: never half a summary
with open(temporary, "w") as f:
    f.write("\n".join(lines) + "\n")
os.replace(temporary, os.path.join(out, "summary.txt"))
if plot:
    print("\n".join(lines))
PY
}

export py out rehearse
export -f env_report env_facts install_package check_imports pytest_timeout_args test_files run_tests bench summary

say "gpu_check: $( [ "$rehearse" = 1 ] && echo rehearsal || echo GPU run ) in $(pwd), OUT=$out, steps: ${selected[*]}"
say "$plan_line"
[ "$slowdown" = 1 ] || say "rehearsal: each limit x ${slowdown} here (REHEARSE_SLOWDOWN)"
# summary.txt stays current while a step runs, so a kill of the whole run (an outer timeout) keeps it
( while sleep 15 && kill -0 $$ 2>/dev/null; do summary >/dev/null 2>&1; done ) &
refresher=$!
trap 'kill $refresher 2>/dev/null' EXIT
after() { summary >/dev/null 2>&1; }  # after every step: its rows and its lines of the summary
step env env_report; after
wanted install && { step install install_package; after; }
step imports check_imports; after
wanted bench_epoch && { step bench_epoch bench epoch --compiled skip; after; }
wanted bench_tcr && { step bench_tcr bench tcr; after; }
wanted bench_augment && { step bench_augment bench augment; after; }
wanted tests && { step tests run_tests; after; }
wanted bench_step && { step bench_step bench step; after; }
wanted bench_data && { step bench_data bench data --quick; after; }
# its own last step: a cold Inductor compile of forward and backward is the slowest part; fewer timed steps
wanted bench_compiled && { step bench_compiled bench epoch --compiled only --steps 50; after; }
kill "$refresher" 2>/dev/null
wait "$refresher" 2>/dev/null

echo
say "================ gpu_check summary ================"
step summary summary --plot
rm -f "$out"/.summary.*.tmp  # a refresh cut off by its kill
files=$(find "$out" -type f | wc -l)
if [ "$files" -gt "$MAX_FILES" ]; then
  say "gpu_check: $files files under OUT, more than the $MAX_FILES that come back from the device machine"
  status=1
fi
say "gpu_check: $( [ "$status" = 0 ] && echo "all steps passed" || echo "SOME STEPS FAILED" ) ($files files under OUT)"
exit $status
