"""`torchrun -m empssl train` on 2 gloo processes equals one process; a 2-rank checkpoint resumes on 1 process;
a batch that does not split, or an input error on one rank, stops every rank before training; a rank that dies
or stalls stops the run with a clear message and leaves the last checkpoint intact.

Exact equality is checked in float64 (the launched script below turns the encoder to float64): in float32, 4 steps
of this tiny ResNet at lr 0.3 amplify rounding so much that one process on 1 thread and on 2 threads already
differs by ~3e-4 (relative norm of the parameters), as 2 ranks do against one process; the float32 run through
`-m empssl` itself is checked on its logged losses (1e-5) and its files.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_run import TINY_ARGS

from empssl import checkpoint as ckpt
from empssl import cli
from empssl.config import TrainConfig
from empssl.files import TEMP_PREFIX
from empssl.models.encoder import build_encoder
from empssl.training.run_folder import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME

WORLD = 2
STEPS = 4
RUN = [*TINY_ARGS, "--sync-bn", "--dist-timeout", "60"]

pytestmark = pytest.mark.slow  # every test starts torchrun with two ranks: 7-20 s each


# The entry point the launcher runs: `empssl` itself, with two switches for these tests only (environment):
# EMPSSL_TEST_FLOAT64 trains a float64 encoder (the patches are the same floats), EMPSSL_TEST_FAIL=kill|stall
# makes rank 1 die (SIGKILL) or hang at the start of step EMPSSL_TEST_FAIL_STEP.
LAUNCHED = """
import os, signal, sys, time
from empssl import cli
from empssl.training import loop as T

if os.environ.get("EMPSSL_TEST_FLOAT64"):
    build = T.build_train_state

    def build_float64(*args, **kwargs):
        state = build(*args, **kwargs)
        state.encoder.double()
        state.encoder.register_forward_pre_hook(lambda encoder, args: (args[0].double(),))  # float64 z
        return state

    T.build_train_state = build_float64
if os.environ.get("EMPSSL_TEST_FAIL") and os.environ["RANK"] == "1":
    step, original = int(os.environ["EMPSSL_TEST_FAIL_STEP"]), T.train_step

    def failing_step(state, images, image_ids):
        if int(state.step) + 1 == step:
            if os.environ["EMPSSL_TEST_FAIL"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's SIGTERM ends the hang
            time.sleep(600)
        return original(state, images, image_ids)

    T.train_step = failing_step
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    path = tmp_path_factory.mktemp("launcher") / "launched_empssl.py"
    path.write_text(LAUNCHED)
    return str(path)


def _environment(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _torchrun_command(args, script=None, ranks=WORLD):
    target = [script] if script else ["-m", "empssl"]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        *target,
        *args,
    ]


def _torchrun(args, script=None, timeout=240, ranks=WORLD, **env):
    """`torchrun --nproc-per-node RANKS` of ``-m empssl`` (or ``script``) with ``args``; the finished process."""
    return subprocess.run(
        _torchrun_command(args, script, ranks), capture_output=True, text=True, timeout=timeout, env=_environment(**env)
    )


def _train_in_this_process(args):
    """`empssl train ARGS` in the test's process (no launcher: one process, no process group)."""
    threads = torch.get_num_threads()
    try:
        assert cli.main(["train", *args]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads 1 set it for this process


def _one_process(args, script, **env):
    return subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, timeout=240, env=_environment(**env)
    )


def _check_ok(process):
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]


def _model(out_dir):
    return ckpt.load_checkpoint(os.path.join(out_dir, CHECKPOINT_NAME))["model"]


def _records(out_dir):
    with open(os.path.join(out_dir, METRICS_NAME)) as f:
        return [json.loads(line) for line in f]


def _losses(out_dir):
    """(steps, losses) of the logged lines (not the resume markers)."""
    records = [record for record in _records(out_dir) if "loss" in record]
    return [record["step"] for record in records], torch.tensor(
        [record["loss"] for record in records], dtype=torch.float64
    )


def _max_relative_difference(model, expected):
    """max over tensors of max|a - b| / max|b| (tensors that are all zero are compared absolutely)."""
    worst = 0.0
    for name, value in expected.items():
        if value.is_floating_point():
            scale = max(value.abs().max().item(), 1e-30)
            worst = max(worst, (model[name].double() - value.double()).abs().max().item() / scale)
    return worst


def _assert_same_model(model, expected, rtol):
    assert model.keys() == expected.keys()
    for name, value in expected.items():
        assert model[name].dtype == value.dtype, name
        if value.is_floating_point():
            # relative to the tensor's scale: a BatchNorm bias starts at 0, and a bias right before a BatchNorm
            # has a true gradient of 0 (its update is rounding): elementwise rtol would ask for digits not there
            tolerance = rtol * max(value.abs().max().item(), 1e-12)
            assert (model[name] - value).abs().max().item() <= tolerance, name
        else:
            assert torch.equal(model[name], value), name  # num_batches_tracked


@pytest.fixture(scope="module")
def float64_runs(tmp_path_factory, launched):
    """4 steps of float64 training on 2 ranks and on one process: (2-rank dir, 1-process dir, 2-rank seconds)."""
    root = tmp_path_factory.mktemp("float64")
    two, one = str(root / "two"), str(root / "one")
    args = [*RUN, "--max-steps", str(STEPS), "--checkpoint-every", "2"]
    started = time.perf_counter()
    _check_ok(_torchrun(["train", *args, "--out-dir", two], launched, EMPSSL_TEST_FLOAT64="1"))
    seconds = time.perf_counter() - started
    _check_ok(_one_process(["train", *args, "--out-dir", one], launched, EMPSSL_TEST_FLOAT64="1"))
    return two, one, seconds


def test_two_ranks_train_as_one_process(float64_runs):
    two, one, seconds = float64_runs
    print(
        f"\n2-rank float64 run (torchrun, {STEPS} steps): {seconds:.1f} s; max relative difference of the "
        f"parameters and BatchNorm buffers to one process: {_max_relative_difference(_model(two), _model(one)):.1e}"
    )
    _assert_same_model(_model(two), _model(one), rtol=1e-9)
    assert _model(two)["backbone.conv1.weight"].dtype == torch.float64
    # the steps moved the weights far beyond that tolerance
    torch.manual_seed(0)
    initial = build_encoder(width=0.125, hidden_dim=32, z_dim=16).state_dict()["backbone.conv1.weight"]
    assert (_model(one)["backbone.conv1.weight"] - initial.double()).abs().max() > 1e-3
    # every rank computed the global batch's loss; rank 0 alone logged it, each step once
    steps, losses = _losses(two)
    assert steps == list(range(1, STEPS + 1)) and _losses(one)[0] == steps
    torch.testing.assert_close(losses, _losses(one)[1], rtol=1e-6, atol=0)  # logged as float32 sums
    assert sorted(set(os.listdir(two)) - {"curves.png"}) == [CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME]
    assert ckpt.load_checkpoint(os.path.join(two, CHECKPOINT_NAME))["world_size"] == WORLD


def test_a_two_rank_checkpoint_resumes_on_one_process(tmp_path, float64_runs, launched):
    two, _, _ = float64_runs
    half = str(tmp_path / "half")
    args = [*RUN, "--checkpoint-every", "2"]
    _check_ok(_torchrun(["train", *args, "--max-steps", "2", "--out-dir", half], launched, EMPSSL_TEST_FLOAT64="1"))
    assert ckpt.load_checkpoint(os.path.join(half, CHECKPOINT_NAME))["step"] == 2
    resume = ["--resume", os.path.join(half, CHECKPOINT_NAME)]
    _check_ok(
        _one_process(
            ["train", *args, "--max-steps", str(STEPS), "--out-dir", half, *resume], launched, EMPSSL_TEST_FLOAT64="1"
        )
    )
    _assert_same_model(_model(half), _model(two), rtol=1e-9)
    # the 2-rank run's lines, the resume marker, the 1-process run's lines
    assert [(record["step"], record.get("event")) for record in _records(half)] == [
        (1, None),
        (2, None),
        (2, "resume"),
        (3, None),
        (4, None),
    ]
    torch.testing.assert_close(_losses(half)[1], _losses(two)[1], rtol=1e-6, atol=0)


def test_torchrun_empssl_float32_logs_the_losses_of_one_process(tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    args = [*RUN, "--max-steps", str(STEPS)]
    _check_ok(_torchrun(["train", *args, "--out-dir", two]))
    _train_in_this_process([*args, "--out-dir", one])
    steps, losses = _losses(two)
    assert steps == list(range(1, STEPS + 1))
    torch.testing.assert_close(losses, _losses(one)[1], rtol=1e-5, atol=0)
    print(
        f"\nfloat32, {STEPS} steps: max relative difference of the parameters to one process "
        f"{_max_relative_difference(_model(two), _model(one)):.1e} (rounding, amplified by the steps)"
    )
    assert sorted(set(os.listdir(two)) - {"curves.png"}) == [CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME]


def test_a_batch_that_does_not_split_over_the_ranks_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    process = _torchrun(["train", *RUN, "--batch-size", "15", "--out-dir", str(out)])
    assert process.returncode != 0
    assert "--batch-size 15 is the global batch and must divide by the world size 2" in process.stderr
    assert not out.exists()


def test_an_input_error_on_rank_0_alone_stops_every_rank_at_once(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # another run's checkpoint: rank 0 (the one that writes) refuses the folder (a metrics.jsonl alone would be taken
    # over: its run wrote no checkpoint)
    (out / CHECKPOINT_NAME).write_bytes(b"another run's checkpoint")
    started = time.perf_counter()
    process = _torchrun(["train", *RUN, "--out-dir", str(out)])  # --dist-timeout 60
    assert process.returncode != 0
    assert "(rank 0 of 2): error: --out-dir" in process.stderr and "already holds another run" in process.stderr
    # rank 1 did not wait for a collective until the timeout: it learnt rank 0's error
    assert "(rank 1 of 2): error: rank 0 stopped: ValueError: --out-dir" in process.stderr
    assert time.perf_counter() - started < 60
    assert os.listdir(out) == [CHECKPOINT_NAME] and (out / CHECKPOINT_NAME).read_bytes() == b"another run's checkpoint"


@pytest.mark.parametrize("failure", ["kill", "stall"])
def test_a_rank_that_dies_or_stalls_stops_the_run_and_the_checkpoint_stays(tmp_path, launched, failure):
    out = str(tmp_path / "run")
    # a stalled rank is noticed at the timeout; a killed one at once (its connections close)
    timeout = "5" if failure == "stall" else "60"
    started = time.perf_counter()
    process = _torchrun(
        ["train", *RUN, "--dist-timeout", timeout, "--checkpoint-every", "2", "--max-steps", "8", "--out-dir", out],
        launched,
        EMPSSL_TEST_FAIL=failure,
        EMPSSL_TEST_FAIL_STEP="3",
    )
    seconds = time.perf_counter() - started
    assert process.returncode != 0
    checkpoint = os.path.join(out, CHECKPOINT_NAME)
    assert (
        "rank 0: a collective with the other ranks failed during step 3 (another rank died, or did not answer "
        "within the distributed timeout)"
    ) in process.stderr, process.stderr[-3000:]
    assert f"the last good checkpoint {checkpoint} (step 2) is intact" in process.stderr
    saved = ckpt.load_checkpoint(checkpoint)
    assert saved["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not [name for name in os.listdir(out) if name.startswith(TEMP_PREFIX)]
    assert _losses(out)[0] == [1, 2]
    print(f"\nrank 1 {failure}: the run stopped after {seconds:.1f} s")


def test_ctrl_c_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        _torchrun_command(["train", *RUN, "--epochs", "1000", "--out-dir", str(out)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
    )
    metrics, deadline = out / METRICS_NAME, time.monotonic() + 180
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # training, a few steps in
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends torchrun, which passes it on to every rank
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    # the signal reached the ranks at different moments; they agreed on one step to stop after
    stopped = re.findall(r"\(rank (\d) of 2\): interrupted by SIGINT after step (\d+)", stderr)
    assert sorted(rank for rank, _ in stopped) == ["0", "1"] and len({step for _, step in stopped}) == 1, stderr[-3000:]
    step = int(stopped[0][1])
    assert ckpt.load_checkpoint(str(out / CHECKPOINT_NAME))["step"] == step
    assert _losses(str(out))[0] == list(range(1, step + 1))


# prints the process group the CLI joined (nothing without torchrun), then runs `empssl` with deterministic cuDNN
BACKEND_PROBE = """
import sys
import torch
import torch.distributed as dist
from empssl import cli, distributed

torch.backends.cudnn.deterministic = True

join = distributed.init_from_env

def join_and_report(*args):
    device = join(*args)
    if dist.is_initialized():
        print(f"process group: {dist.get_backend()}, world {dist.get_world_size()}, {device}", flush=True)
    return device

distributed.init_from_env = join_and_report
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.gpu
def test_torchrun_on_one_gpu_joins_nccl_and_trains_as_one_process(tmp_path):
    """World size 1 with NCCL (the captured step stays on for one rank) logs the losses of a plain process, bit for
    bit: both processes run the same kernels in the same order. cuDNN is deterministic in both (the trainer then
    leaves cudnn.benchmark off, so its heuristics, not each process's timings, pick the same algorithms), TF32 is
    off in both (the trainer sets it from TrainConfig.tf32), empssl's kernels use no atomics, and NCCL's collectives
    over one rank copy."""
    script = tmp_path / "backend_probe.py"
    script.write_text(BACKEND_PROBE)
    args = [value if value != "cpu" else "cuda" for value in RUN] + ["--max-steps", str(STEPS), "--bf16", "off"]
    launched, plain = str(tmp_path / "torchrun"), str(tmp_path / "plain")
    process = _torchrun(["train", *args, "--out-dir", launched], str(script), ranks=1)
    _check_ok(process)
    assert "process group: nccl, world 1, cuda:0" in process.stdout
    # the run's config.toml keeps the user's --device: torchrun takes it again (it refuses cuda:N)
    assert '\ndevice = "cuda"\n' in open(os.path.join(launched, CONFIG_NAME)).read()
    torch.backends.cudnn.deterministic = True  # as the launched process (conftest restores it after the test)
    _train_in_this_process([*args, "--out-dir", plain])  # no second CUDA start-up (the device check's step is short)
    steps, losses = _losses(launched)
    assert steps == list(range(1, STEPS + 1))
    assert TrainConfig().tf32 is False and "--tf32" not in args
    assert losses.tolist() == _losses(plain)[1].tolist()
