"""A run never loses or mixes work: one run per folder, interrupts that keep progress, metrics true across resumes."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tiny_run import TINY, TINY_ARGS

from empssl import checkpoint as ckpt
from empssl import cli
from empssl.config import TrainConfig
from empssl.data.synthetic import make_synthetic
from empssl.files import TEMP_PREFIX
from empssl.training import loop as T
from empssl.training import step as S
from empssl.training.run_folder import CHECKPOINT_NAME, METRICS_NAME, read_step_metrics
from empssl.training.signals import StopRequest, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a long schedule, so that a signal lands mid-run
LONG = dict(epochs=250, schedule_epochs=250)
LONG_ARGS = ["--epochs", "250", "--schedule-epochs", "250"]
FINAL_STEP = 16  # interrupted runs are resumed up to here and compared with an uninterrupted run


def _files(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _metrics(folder):
    with open(folder / METRICS_NAME) as f:
        return [json.loads(line) for line in f]


def _assert_true_history(records, resumed_at):
    """Each step at most once, in order; one resume marker per resume; elapsed time never restarts."""
    steps = [r["step"] for r in records if "event" not in r]
    assert steps == sorted(set(steps)), steps
    markers = [r for r in records if r.get("event") == "resume"]
    assert [m["step"] for m in markers] == resumed_at
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert len({r["run_id"] for r in records}) == 1


def _crash_at_step(step):
    """An EMPSSLLoss that raises KeyboardInterrupt (a crash with no handler: no checkpoint) in step ``step``."""

    class Crashing(S.EMPSSLLoss):
        calls = 0

        def forward(self, z, return_parts=False):
            Crashing.calls += 1
            if Crashing.calls == step:
                raise KeyboardInterrupt("simulated crash")
            return super().forward(z, return_parts)

    return Crashing


def test_second_run_into_a_folder_is_refused_and_the_first_stays_byte_identical(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY_ARGS, "--max-steps", "2", "--out-dir", str(out)]) == 0
    first = _files(out)
    assert {CHECKPOINT_NAME, METRICS_NAME} <= set(first)
    capsys.readouterr()
    code = cli.main(["train", *TINY_ARGS, "--max-steps", "2", "--seed", "1", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "already holds another run (checkpoint.pt, metrics.jsonl)" in err
    assert f"--resume {out / CHECKPOINT_NAME}" in err and "--overwrite" in err
    assert _files(out) == first


def test_overwrite_replaces_the_old_run_only_at_the_first_checkpoint(tmp_path, monkeypatch):
    data = make_synthetic(64, 16, 8, seed=0)
    old = T.train(TrainConfig(**TINY, max_steps=2, out_dir=str(tmp_path / "run")), data)
    before = _files(tmp_path / "run")
    old_run_id = ckpt.load_checkpoint(old.checkpoint_path)["run_id"]

    # the new run crashes in step 3, before its first checkpoint: the old run is untouched
    monkeypatch.setattr(S, "EMPSSLLoss", _crash_at_step(3))
    with pytest.raises(KeyboardInterrupt, match="simulated crash"):
        T.train(TrainConfig(**TINY, seed=1, overwrite=True, out_dir=str(tmp_path / "run")), data)
    monkeypatch.undo()
    assert _files(tmp_path / "run") == before

    new = T.train(TrainConfig(**TINY, seed=1, max_steps=3, overwrite=True, out_dir=str(tmp_path / "run")), data)
    saved = ckpt.load_checkpoint(new.checkpoint_path)
    assert saved["step"] == 3 and saved["config"]["seed"] == 1 and saved["run_id"] != old_run_id
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]  # the new run's lines only, no interleaving
    _assert_true_history(records, resumed_at=[])


def test_a_run_resumed_at_its_end_into_another_runs_folder_replaces_that_run_whole(tmp_path):
    data = make_synthetic(64, 16, 8, seed=0)
    finished = T.train(TrainConfig(**TINY, max_steps=2, out_dir=str(tmp_path / "finished")), data)
    T.train(TrainConfig(**TINY, seed=1, max_steps=1, out_dir=str(tmp_path / "other")), data)
    config = TrainConfig(**TINY, max_steps=2, resume=finished.checkpoint_path, overwrite=True)
    T.train(dataclasses.replace(config, out_dir=str(tmp_path / "other")), data)  # nothing left to train
    saved = ckpt.load_checkpoint(str(tmp_path / "other" / CHECKPOINT_NAME))
    assert saved["step"] == 2 and saved["config"]["seed"] == 0  # the resumed run's checkpoint, not the old run's
    assert {r["run_id"] for r in _metrics(tmp_path / "other")} == {saved["run_id"]}


def test_resume_cuts_metrics_back_to_the_checkpoint_and_marks_it(tmp_path, monkeypatch):
    data = make_synthetic(64, 16, 8, seed=0)
    config = TrainConfig(**TINY, epochs=2, checkpoint_every=3, out_dir=str(tmp_path / "run"))
    monkeypatch.setattr(S, "EMPSSLLoss", _crash_at_step(6))  # steps 4 and 5 are logged after the checkpoint at 3
    with pytest.raises(KeyboardInterrupt):
        T.train(config, data)
    monkeypatch.undo()
    assert [r["step"] for r in _metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]
    saved = ckpt.load_checkpoint(str(tmp_path / "run" / CHECKPOINT_NAME))
    assert saved["step"] == 3

    T.train(
        TrainConfig(
            **TINY,
            epochs=2,
            checkpoint_every=3,
            out_dir=str(tmp_path / "run"),
            resume=str(tmp_path / "run" / CHECKPOINT_NAME),
        ),
        data,
    )
    records = _metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4, 5, 6, 7, 8]
    assert records[3] == {"event": "resume", "step": 3, "elapsed_s": saved["elapsed_s"], "run_id": saved["run_id"]}
    _assert_true_history(records, resumed_at=[3])
    assert records[2]["elapsed_s"] <= saved["elapsed_s"] < records[4]["elapsed_s"]  # the clock continues
    # the curves read each step once: the marker is not a step's record
    curves = read_step_metrics(str(tmp_path / "run" / METRICS_NAME))
    assert [r["step"] for r in curves] == list(range(1, 9)) and all("loss" in r for r in curves)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The parameters of an uninterrupted FINAL_STEP-step run (in this process: training is deterministic on the
    CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("whole")
        return T.train(TrainConfig(**TINY, **LONG, max_steps=FINAL_STEP, out_dir=str(out))).encoder.state_dict()
    finally:
        torch.set_num_threads(threads)


def _wait_for_step(folder, step, process, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"training exited early ({process.returncode}): {process.stderr.read()}")
        path = folder / METRICS_NAME
        if path.exists() and any(
            json.loads(line).get("step", 0) >= step for line in path.read_text().splitlines() if line.endswith("}")
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"no metrics line for step {step} within {timeout} s")


@pytest.mark.slow  # a subprocess run signalled mid-training: ~7 s each
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_keeps_progress_and_the_resumed_run_is_bitwise_equal(tmp_path, uninterrupted, signum, exit_code, capsys):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "empssl.cli",
            "train",
            *TINY_ARGS,
            *LONG_ARGS,
            "--checkpoint-every",
            "0",
            "--out-dir",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_step(out, 2, process)
        process.send_signal(signum)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == exit_code, err
    saved = ckpt.load_checkpoint(str(out / CHECKPOINT_NAME))
    stopped_at = saved["step"]
    assert 2 <= stopped_at < FINAL_STEP
    assert f"interrupted by {signum.name} after step {stopped_at}: checkpoint written to {out / CHECKPOINT_NAME}" in err
    assert _metrics(out)[-1]["step"] == stopped_at  # the checkpoint is at the last step logged
    assert not [name for name in os.listdir(out) if name.startswith(TEMP_PREFIX)]

    assert (
        cli.main(
            [
                "train",
                *TINY_ARGS,
                *LONG_ARGS,
                "--max-steps",
                str(FINAL_STEP),
                "--out-dir",
                str(out),
                "--resume",
                str(out / CHECKPOINT_NAME),
            ]
        )
        == 0
    )
    final = ckpt.load_checkpoint(str(out / CHECKPOINT_NAME))
    assert final["step"] == FINAL_STEP and uninterrupted.keys() == final["model"].keys()
    for name, value in uninterrupted.items():
        assert torch.equal(value, final["model"][name]), name
    records = _metrics(out)
    assert [r["step"] for r in records if "event" not in r] == list(range(1, FINAL_STEP + 1))
    _assert_true_history(records, resumed_at=[stopped_at])


def test_second_signal_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)  # delivered to this thread: the handler runs before the next line
        assert stop.signum == signal.SIGINT  # the first only asks the loop to stop after its step
        with pytest.raises(TrainingInterrupted, match="stopped at once by a second SIGINT") as info:
            signal.raise_signal(signal.SIGINT)
        assert info.value.exit_code == 130 and info.value.checkpoint_path is None
    assert signal.getsignal(signal.SIGINT) is before


KILL_DURING_SECOND_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys, torch
    from empssl import cli
    real_save, calls = torch.save, []

    def save_then_die(obj, f, *args, **kwargs):  # the second checkpoint write is killed half-way
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint" * 4096)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save_then_die
    sys.exit(cli.main(sys.argv[1:]))
""")


@pytest.mark.slow  # a subprocess run killed mid-write: ~6 s
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    out = tmp_path / "run"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_DURING_SECOND_CHECKPOINT,
            "train",
            *TINY_ARGS,
            *LONG_ARGS,
            "--checkpoint-every",
            "2",
            "--max-steps",
            "6",
            "--out-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    temporaries = [name for name in os.listdir(out) if name.startswith(TEMP_PREFIX)]
    assert len(temporaries) == 1 and temporaries[0].endswith(".pt")  # the kill did hit the write
    assert ckpt.load_checkpoint(str(out / CHECKPOINT_NAME))["step"] == 2  # the previous checkpoint is intact

    assert (
        cli.main(
            [
                "train",
                *TINY_ARGS,
                *LONG_ARGS,
                "--checkpoint-every",
                "2",
                "--max-steps",
                "6",
                "--out-dir",
                str(out),
                "--resume",
                str(out / CHECKPOINT_NAME),
            ]
        )
        == 0
    )
    assert not [name for name in os.listdir(out) if name.startswith(TEMP_PREFIX)]  # the stale temporary is gone
    assert ckpt.load_checkpoint(str(out / CHECKPOINT_NAME))["step"] == 6
    records = _metrics(out)
    assert [r["step"] for r in records] == [1, 2, 2, 3, 4, 5, 6]
    _assert_true_history(records, resumed_at=[2])
