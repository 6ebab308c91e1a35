#!/usr/bin/env bash
# The prepared device check for a lent GPU machine (no network; Python 3.12, torch, triton, pytest preinstalled
# there), in two calls (docs/benchmarks.md section 5). Each installs the package for the card's architecture with its
# CUDA part insisted on (EMPSSL_BUILD_CUDA=1), checks the imports and names the backends the epoch will time, then:
#   call 1 (the default, at most 7 min with the install): the epoch rows (eager and captured step, the published
#          path under torch's TF32 defaults and the speed-up, the evaluation), each written the moment it is
#          measured; the gpu tests that give the verdict on what those rows time (training, capture, evaluation,
#          NCCL; the CUDA loss at the recipe's shapes and its auto choice; the CUDA augmentation; the optimiser; the
#          other CUDA shapes; the opchecks; other backbones' captured step: tests/gpu_order.py); the kernel
#          benchmarks.
#   call 2 (5 min, only on the machine call 1 left warm, whose build it reuses: a fresh one is refused, as a start
#          and an install do not fit the lease's time left): the compiled step variants' rows, the compiled-step
#          test (a cold Inductor compile: a step of its own), then the composite loss and the Triton sweeps. Call
#          give_back right after it.
#
#   bash bench/gpu_check.sh OUT                    # call 1
#   bash bench/gpu_check.sh OUT call2              # call 2
#   bash bench/gpu_check.sh OUT tests bench_tcr    # only these steps (env, install, imports and summary always run)
#   bash bench/gpu_check.sh --rehearse OUT         # on a machine without a GPU: both calls, every part that needs none
#   bash bench/gpu_check.sh --plan                 # both calls' plans, nothing run
#
# Every step runs under `timeout -k`, its kill grace inside its limit; each call's limits, install included, add up
# to at most its budget, and both calls with the machine's start, the transfers, the wait between the calls and a
# margin to at most the lease (checked, and the plans printed with each call's timeout_s, before anything runs). Each
# step appends to OUT as it goes, and summary.txt is rewritten after every step and every 15 s while one runs
# (bench/gpu_summary.py: test counts from the test lines themselves), so a step or a whole run that is killed keeps
# everything finished before it, its summary included.
# OUT holds at most 8 files: gpu_check.log (everything printed), env.txt, steps.csv, results.csv (every benchmark
# row), tests.txt (the gpu tests' outcome, one line each), summary.txt and results.png.
# --rehearse runs the same install command, the imports, collects each test step's gpu tests in the GPU run's order
# (an import or collection error fails it) and with torch pretending an sm_90 device (no gpu test may hide), runs the
# sweeps' command over 2 pytest-xdist workers (every test skips without a GPU), compiles
# every Triton configuration ahead of time for sm_90 under the installed triton, runs each benchmark at a toy size
# on the CPU with the same output options, and checks the file count and both calls' limits; its time limits are
# the GPU ones times REHEARSE_SLOWDOWN (default 4: a 2-core CPU builds and compiles that much slower than the
# 16-core GPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."

rehearse=0
plan_only=0
if [ "${1:-}" = "--rehearse" ]; then rehearse=1; shift; fi
if [ "${1:-}" = "--plan" ]; then plan_only=1; set -- "${TMPDIR:-/tmp}" "${@:2}"; fi
out=${1:?usage: bash bench/gpu_check.sh [--rehearse] OUT [call1|call2|STEP ...] | bash bench/gpu_check.sh --plan}
shift
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)

# step -> GPU time limit in seconds; the order is the order they run in (by value: key figures first)
STEP_NAMES=(env install reuse imports bench_epoch tests bench_tcr bench_augment bench_step bench_data bench_compiled
            tests_compiled sweeps summary)
CALL1=(env install imports bench_epoch tests bench_tcr bench_augment summary)
CALL2=(env reuse imports bench_compiled tests_compiled sweeps summary)
# bench_step and bench_data are in no call: bench_epoch's "share" rows hold the step's phases, and the store's read
# rate into the GPU (bench data: pinned buffers, a side stream) matters once a set outgrows memory; name them to run
# them (each fits in place of another step)
# (the small steps start Python and import torch at least once: 10 s of work and GRACE)
declare -A LIMIT=([env]=15 [install]=90 [reuse]=15 [imports]=20 [bench_epoch]=85 [tests]=150 [bench_tcr]=25
                  [bench_augment]=20 [bench_step]=20 [bench_data]=40 [bench_compiled]=80 [tests_compiled]=120
                  [sweeps]=35 [summary]=15)
# each test step's per-test limit (pytest-timeout), inside its step's limit: a hung test fails and the next runs
declare -A TEST_LIMIT=([tests]=60 [tests_compiled]=110 [sweeps]=30)
GRACE=5  # seconds between timeout's TERM and its KILL, inside each step's limit
# a call's budget: call 1 at most 7 min with the install; call 2 what the lease leaves on the warm machine
declare -A BUDGET=([call1]=420 [call2]=300)
# the lease (device time, docs/benchmarks.md section 5): a machine start, each call's transfers, the wait between
# the calls (the machine stays warm 30 s: call 2 must come inside it) and a margin (a slower start, the shell
# between steps); give_back right after call 2, or its 30 s idle counts too
LEASE=900 START=90 TRANSFER=15 GAP=30 MARGIN=30
MAX_FILES=8

selected=("$@")
if [ ${#selected[@]} -eq 0 ]; then selected=(call1); fi
call=custom
if [ "${selected[*]}" = call1 ]; then call=call1; selected=("${CALL1[@]}"); fi
if [ "${selected[*]}" = call2 ]; then call=call2; selected=("${CALL2[@]}"); fi
if [ "$rehearse" = 1 ] && [ "$call" = call1 ] && [ $# -eq 0 ]; then  # the rehearsal: both calls' steps, in order
  call=both
  selected=()
  for name in "${STEP_NAMES[@]}"; do case $name in bench_step|bench_data) ;; *) selected+=("$name") ;; esac; done
fi
for name in "${selected[@]}"; do
  [ -n "${LIMIT[$name]:-}" ] || {
    echo "gpu_check: unknown step '$name' (calls: call1, call2; steps: ${STEP_NAMES[*]})"; exit 2; }
done
wanted() {  # env, imports and summary always run: cheap, and every later step needs them; so does the install,
  local name=$1 s  # which skips itself on a warm machine, except in call 2, whose reuse step insists on the warm build
  case $name in env|imports|summary) return 0 ;; install) [ "$call" != call2 ] && return 0 ;; esac
  for s in "${selected[@]}"; do [ "$s" = "$name" ] && return 0; done
  return 1
}
plan_of() {  # plan_of NAME STEP...: "NAME: a 10 s, b 90 s = 100 s of BUDGET"; fails when over the budget
  local title=$1 budget=$2 total=0 parts=() name
  shift 2
  for name in "$@"; do total=$(( total + LIMIT[$name] )); parts+=("$name ${LIMIT[$name]} s"); done
  echo "$title (GPU limits, in order): $(IFS=,; echo "${parts[*]}" | sed 's/,/, /g') = ${total} s of ${budget}"
  [ "$total" -le "$budget" ]
}
plans_ok=1
plan1=$(plan_of "call 1" "${BUDGET[call1]}" "${CALL1[@]}") || plans_ok=0
plan2=$(plan_of "call 2" "${BUDGET[call2]}" "${CALL2[@]}") || plans_ok=0
# the run tool's timeout_s for each call: its budget and a few seconds for the script around the steps
calls="run call 1 with timeout_s=$(( BUDGET[call1] + 10 )), call 2 with timeout_s=$(( BUDGET[call2] + 10 ))"
calls+=" (per-test limits: tests ${TEST_LIMIT[tests]} s, tests_compiled ${TEST_LIMIT[tests_compiled]} s,"
calls+=" sweeps ${TEST_LIMIT[sweeps]} s)"
used=$(( START + TRANSFER + BUDGET[call1] + GAP + BUDGET[call2] + TRANSFER + MARGIN ))
lease="lease (device time): start $START + call 1 ${BUDGET[call1]} + wait $GAP + call 2 ${BUDGET[call2]} (the warm"
lease+=" machine) + transfers 2 x $TRANSFER + margin $MARGIN = $used s of $LEASE; give_back right after call 2"
[ "$used" -le "$LEASE" ] || plans_ok=0
this_plan=""
if [ "$call" = custom ]; then
  custom=()
  for name in "${STEP_NAMES[@]}"; do wanted "$name" && custom+=("$name"); done
  this_plan=$(plan_of "this run" "${BUDGET[call1]}" "${custom[@]}") || plans_ok=0
fi
if [ "$plans_ok" = 0 ] || [ "$plan_only" = 1 ]; then
  printf '%s\n' "$plan1" "$plan2" "$lease" "$calls" ${this_plan:+"$this_plan"}
  [ "$plans_ok" = 1 ] && exit 0
  echo "gpu_check: a plan's limits add up to more than its budget, or both calls to more than the lease"
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
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # an H100's and H200's, as the GPU branch would probe it
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
  # a step is one of the functions below, run by a child bash: timeout signals its whole process group, and KILLs
  # it GRACE seconds later, still inside the step's limit
  timeout -k "$GRACE" $(( limit - GRACE )) bash -c '"$@"' "$name" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  local took=$(( SECONDS - t0 ))
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && say "=== $name: killed at its ${limit} s limit (TERM $GRACE s before)"
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
    timeout 5 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo "nvidia-smi failed"
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
    free, total = torch.cuda.mem_get_info()
    print(f"gpu: {torch.cuda.get_device_name()} (sm_{major}{minor}), {torch.cuda.device_count()} device(s), "
          f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
else:
    print("gpu: none visible")
PY
}

built_here() {  # this tree's extension is built for this Python, with its CUDA part, newer than its sources (warm)
  "$py" - <<'PY' 2>/dev/null
import os, sys
import empssl, empssl._C
here = os.path.abspath("empssl")
library = os.path.abspath(empssl._C.__file__)
sources = [os.path.join(d, f) for d, _, files in os.walk("csrc") for f in files] + ["setup.py"]
ours = os.path.dirname(library) == here and os.path.dirname(os.path.abspath(empssl.__file__)) == here
fresh = all(os.path.getmtime(source) <= os.path.getmtime(library) for source in sources)
sys.exit(0 if ours and fresh and empssl._C.with_cuda else 1)
PY
}

install_package() {
  if built_here; then
    echo "install: skipped: this tree's extension is built, with its CUDA part, and newer than csrc/ (a warm machine)"
    return 0
  fi
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # one architecture only, this card's: half the nvcc time
    TORCH_CUDA_ARCH_LIST=$(timeout 30 "$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
    export TORCH_CUDA_ARCH_LIST
  fi
  # the CUDA part insisted on: a missed nvcc fails here instead of timing Triton in its place
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS EMPSSL_BUILD_CUDA=1"
  EMPSSL_BUILD_CUDA=1 "$py" -m pip install --no-build-isolation --no-deps -e .
}

reuse_build() {  # call 2: the warm machine's build, or nothing: a fresh machine's start and install do not fit
  if built_here; then
    echo "reuse: this tree's extension is built, with its CUDA part, and newer than csrc/ (the machine call 1 left)"
    return 0
  fi
  echo "gpu_check: call 2 runs on the machine call 1 left warm (within 30 s), whose build it reuses; this one is"
  echo "fresh, and a start and an install do not fit what the lease has left: give it back (or run chosen steps:"
  echo "bash bench/gpu_check.sh OUT STEP..., which install)"
  return 1
}

check_imports() {
  "$py" - <<'PY' || return 1
import os, sys
import torch
import empssl, empssl._C, empssl.kernels.tcr, empssl.kernels.augment, empssl.bench.tcr, empssl.bench.augment, empssl.bench.step, empssl.bench.epoch
from empssl.bench.epoch import step_backends
from empssl.config import TrainConfig
print(f"empssl {empssl.__version__} from {empssl.__file__}; extension CUDA part: {empssl._C.with_cuda}")
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
chosen = step_backends(TrainConfig(), device)
print(f"the epoch will time, on {device.type}: " + ", ".join(f"{op} backend {name}" for op, name in chosen.items())
      + " (auto's choice for the recipe's inputs)")
if os.environ.get("GPU_CHECK_REHEARSE") != "1" and set(chosen.values()) != {"cuda"}:
    sys.exit("gpu_check: the epoch would not time the CUDA kernels: the CUDA part is missing or refused (see above)")
PY
  "$py" -m empssl info
}

pytest_per_test_limit() {  # a per-test limit where pytest-timeout is installed (it is on the GPU machine)
  if "$py" -c "import pytest_timeout" 2>/dev/null; then echo "--timeout=$1"; fi
}

# run_tests STEP SECONDS: the gpu tests of that step's groups, in their order (tests/gpu_order.py), each under a
# limit of SECONDS, one line each in tests.txt
run_tests() {
  local which=$1 extra workers=""
  extra=$(pytest_per_test_limit "$2")
  [ -n "$extra" ] || echo "note: pytest-timeout not installed: no per-test limit (the step limit still holds)"
  # the sweeps compile a Triton kernel per configuration: spread over workers where pytest-xdist is installed (it is
  # on the GPU machine and in CI's rehearsal)
  if [ "$which" = sweeps ]; then
    if "$py" -c "import xdist" 2>/dev/null; then workers="-n $([ "$rehearse" = 1 ] && echo 2 || echo 4)"
    else echo "note: pytest-xdist not installed: the sweeps run serially"; fi
  fi
  export EMPSSL_GPU_TESTS=$which PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
  if [ "$rehearse" = 1 ]; then
    # what the GPU run would hit before its first test: an import or collection error fails here too
    local collected rc
    # shellcheck disable=SC2086
    collected=$("$py" -m pytest -q -m gpu --collect-only -p no:cacheprovider -p gpu_order $workers $extra tests 2>&1)
    rc=$?
    echo "$collected" >> "$out/tests.txt"
    [ "$rc" = 0 ] || { echo "$collected" | tail -n 40; return 1; }
    echo "$collected" | grep "^gpu test groups in order"
    echo "$collected" | tail -n 1
    echo "first gpu tests of $which in the GPU run's order:"
    echo "$collected" | grep -m 4 "::"
    if [ -n "$workers" ]; then  # the GPU run's command itself, over workers: here every gpu test skips (no GPU)
      echo "the sweeps' command over pytest-xdist workers ($workers), every test skipping without a GPU:"
      # shellcheck disable=SC2086
      "$py" -m pytest -v -m gpu -p no:cacheprovider -p gpu_order -rfE $workers $extra tests >> "$out/tests.txt" 2>&1
      rc=$?
      "$py" bench/gpu_summary.py "$out" --tests-only
      [ "$rc" = 0 ] || return 1
    fi
    [ "$which" = tests ] || return 0
    echo "every module holding gpu tests collects them on an sm_90 device with TRITON_INTERPRET=0, in the planned order:"
    "$py" -m pytest -q -p no:cacheprovider tests/test_gpu_collection.py 2>&1 | tail -n 1
    [ "${PIPESTATUS[0]}" = 0 ] || return 1
    echo "ahead-of-time compile of every Triton configuration for sm_90:"
    EMPSSL_AOT_TARGETS=90 "$py" -m pytest -q -p no:cacheprovider -s tests/test_triton_aot.py 2>&1 | grep -v "^\s*$"
    return "${PIPESTATUS[0]}"
  fi
  # one line per test in tests.txt, so a run killed at the step limit still shows what finished
  # shellcheck disable=SC2086
  "$py" -m pytest -v -m gpu -p no:cacheprovider -p gpu_order -rfE --durations=15 $workers $extra tests >> "$out/tests.txt" 2>&1
  local rc=$?
  grep -E "^gpu test groups|^(FAILED|ERROR)|(passed|failed|error).* in [0-9.]+s" "$out/tests.txt" | tail -n 40
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
  "$py" bench/gpu_summary.py "$out" "$@"
}

export py out rehearse GRACE
export -f env_report env_facts built_here install_package reuse_build check_imports pytest_per_test_limit run_tests \
  bench summary
[ "$rehearse" = 1 ] && export GPU_CHECK_REHEARSE=1

say "gpu_check: $( [ "$rehearse" = 1 ] && echo rehearsal || echo GPU run ) of ${call} in $(pwd), OUT=$out, steps: ${selected[*]}"
say "$plan1"
say "$plan2"
say "$lease"
[ -z "$this_plan" ] || say "$this_plan"
[ "$slowdown" = 1 ] || say "rehearsal: each limit x ${slowdown} here (REHEARSE_SLOWDOWN)"
# summary.txt stays current while a step runs, so a kill of the whole run (an outer timeout) keeps it
( while sleep 15 && kill -0 $$ 2>/dev/null; do summary >/dev/null 2>&1; done ) &
refresher=$!
trap 'kill $refresher 2>/dev/null' EXIT
after() { summary >/dev/null 2>&1; }  # after every step: its rows and its lines of the summary
step env env_report; after
wanted install && { step install install_package; after; }
if wanted reuse; then
  step reuse reuse_build
  reused=$?
  after
  [ "$reused" = 0 ] || { say "gpu_check: call 2 stopped: no warm build to reuse"; exit 2; }  # nothing else fits
fi
step imports check_imports; after
wanted bench_epoch && { step bench_epoch bench epoch; after; }
wanted tests && { step tests run_tests tests "${TEST_LIMIT[tests]}"; after; }
wanted bench_tcr && { step bench_tcr bench tcr; after; }
wanted bench_augment && { step bench_augment bench augment; after; }
wanted bench_step && { step bench_step bench step; after; }
wanted bench_data && { step bench_data bench data --quick; after; }
# call 2: a cold Inductor compile of forward and backward is the slowest part (the second variant's hits the first's
# caches); compiled-captured first, the likely faster one; fewer timed steps
wanted bench_compiled && { step bench_compiled bench epoch --variants compiled-captured,compiled --parts steps --steps 50; after; }
wanted tests_compiled && { step tests_compiled run_tests tests_compiled "${TEST_LIMIT[tests_compiled]}"; after; }
wanted sweeps && { step sweeps run_tests sweeps "${TEST_LIMIT[sweeps]}"; after; }
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
