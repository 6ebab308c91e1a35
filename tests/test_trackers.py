"""The tracking tools (empssl.training.trackers): TensorBoard's event files read back hold every scalar of metrics.jsonl
at its step, once, across a resume; a W&B offline run writes its history (each step once across a resume); a missing
package is one line before anything is written; under torchrun only rank 0 logs."""

import glob
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from tiny_run import TINY, TINY_ARGS

from empssl import cli
from empssl.config import TrainConfig
from empssl.data.synthetic import make_synthetic
from empssl.training import loop as T
from empssl.training.run_folder import CHECKPOINT_NAME, METRICS_NAME, read_step_metrics
from empssl.training.trackers import SCALARS, TENSORBOARD_FOLDER, WANDB_FOLDER, scalars_of

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::empssl.training.monitor.CollapseWarning"),  # the tiny runs collapse
]
MONITORED = dict(monitor_every=2, monitor_size=16, monitor_patches=2)


def _require(module, package):
    try:
        __import__(module)
    except ImportError as err:
        pytest.skip(f"optional dependency not installed: {package} ({err})")


def _expected(folder):
    """{scalar name: [(step, value)]} of a run folder's metrics.jsonl, for the scalars the trackers log."""
    expected = {}
    for record in read_step_metrics(os.path.join(folder, METRICS_NAME)):
        for key, name in SCALARS.items():
            if key in record:
                expected.setdefault(name, []).append((record["step"], record[key]))
    return expected


def _tensorboard_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(folder, TENSORBOARD_FOLDER), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _as_float32(series):
    return [(step, float(np.float32(value))) for step, value in series]  # event files hold float32


@pytest.fixture(scope="module")
def data():
    return make_synthetic(64, 32, 8, seed=0)


def test_the_trackers_take_every_scalar_of_the_metrics_log(tmp_path, data):
    config = TrainConfig(**TINY, max_steps=1, out_dir=str(tmp_path / "run"), **{**MONITORED, "monitor_every": 1})
    T.train(config, data)
    records = read_step_metrics(os.path.join(config.out_dir, METRICS_NAME))
    assert "coding_rate" in records[-1]  # a monitored step's line among them
    for record in records:
        numbers = {key for key, value in record.items() if isinstance(value, (int, float)) and key != "step"}
        assert set(scalars_of(record)) == {SCALARS[key] for key in numbers}, record


@pytest.mark.slow  # three tiny runs and tensorboard's import: about 6 s on 2 cores
def test_tensorboard_holds_every_scalar_at_its_step_once_across_a_resume(tmp_path, data):
    _require("tensorboard", "tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    out = str(tmp_path / "run")
    first = TrainConfig(**TINY, max_steps=2, tensorboard=True, out_dir=out, **MONITORED)
    T.train(first, data)
    assert _tensorboard_scalars(out) == {name: _as_float32(series) for name, series in _expected(out).items()}
    # a process killed after its checkpoint had logged steps 3-5 (other values) to TensorBoard and metrics.jsonl
    with SummaryWriter(os.path.join(out, TENSORBOARD_FOLDER)) as writer:
        for step in (3, 4, 5):
            writer.add_scalar("train/loss", 99.0, step)
    run_id = read_step_metrics(os.path.join(out, METRICS_NAME))[0]["run_id"]
    with open(os.path.join(out, METRICS_NAME), "a") as f:
        f.write(json.dumps({"step": 3, "loss": 99.0, "run_id": run_id}) + "\n")
    resumed = TrainConfig(**TINY, tensorboard=True, out_dir=out, resume=os.path.join(out, CHECKPOINT_NAME), **MONITORED)
    T.train(resumed, data)  # to step 4, the end of the epoch

    scalars, expected = _tensorboard_scalars(out), _expected(out)
    assert set(scalars) == set(expected) >= {"train/loss", "train/tcr", "train/inv", "train/lr", "monitor/knn_top1"}
    for name, series in expected.items():
        assert scalars[name] == _as_float32(series), name  # each step once, the killed process's gone
    assert [step for step, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in scalars["monitor/effective_rank"]] == [2, 4]
    # the same curve as a run never interrupted (the CPU resume is exact)
    straight = TrainConfig(**TINY, out_dir=str(tmp_path / "straight"), **MONITORED)
    T.train(straight, data)
    assert scalars["train/loss"] == _as_float32(_expected(straight.out_dir)["train/loss"])


def _wandb_records(path):
    """The records of a .wandb file (a LevelDB-style log of 32 KiB blocks after a 7-byte header), as protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, records = open(path, "rb").read(), 7, b"", []
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk, position = data[position + 7 : position + 7 + length], position + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first; middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _wandb_history(path):
    """{scalar name: [(step, value)]} of the history rows of a .wandb file."""
    history = {}
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            step = record.history.step.num
            for item in record.history.item:
                name = item.key or "/".join(item.nested_key)
                if not name.startswith("_"):
                    history.setdefault(name, []).append((step, json.loads(item.value_json)))
    return history


@pytest.mark.slow  # two runs and wandb's service process: 3.5-7 s on 2 cores
def test_a_wandb_offline_run_writes_its_history_once_per_step_across_a_resume(tmp_path, data, monkeypatch):
    _require("wandb", "wandb")
    for name, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    out = str(tmp_path / "run")
    T.train(TrainConfig(**TINY, max_steps=2, wandb="empssl-tests", out_dir=out, **MONITORED), data)
    run_id = read_step_metrics(os.path.join(out, METRICS_NAME))[0]["run_id"]
    (first,) = glob.glob(os.path.join(out, WANDB_FOLDER, f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
    assert _wandb_history(first) == _expected(out)  # every scalar at its step, the values exact
    resumed = TrainConfig(
        **TINY, wandb="empssl-tests", out_dir=out, resume=os.path.join(out, CHECKPOINT_NAME), **MONITORED
    )
    T.train(resumed, data)
    (second,) = set(glob.glob(os.path.join(out, WANDB_FOLDER, f"offline-run-*-{run_id}", "*.wandb"))) - {first}
    history, expected = _wandb_history(second), _expected(out)
    assert history == {name: [(s, v) for s, v in series if s > 2] for name, series in expected.items()}
    assert [step for step, _ in history["train/loss"]] == [3, 4]  # the steps the first part holds are not sent again


@pytest.mark.parametrize("option, package", [("--tensorboard", "tensorboard"), ("--wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_before_anything_is_written(
    tmp_path, capsys, monkeypatch, option, package
):
    monkeypatch.setitem(sys.modules, package, None)  # as where it is not installed
    out = tmp_path / "run"
    argv = [
        "train",
        *TINY_ARGS,
        "--max-steps",
        "1",
        "--out-dir",
        str(out),
        option,
        *(["p"] if package == "wandb" else []),
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"empssl train: error: {option} needs the {package} package, which is not installed: pip install {package}"
    )
    assert not out.exists()


@pytest.mark.slow  # torchrun with two ranks
def test_under_torchrun_only_rank_0_logs_and_the_monitoring_runs_on_every_rank(tmp_path):
    _require("tensorboard", "tensorboard")
    out = str(tmp_path / "run")
    args = [*TINY_ARGS, "--max-steps", "4", "--monitor-every", "2", "--monitor-size", "16", "--tensorboard"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "empssl"]
    process = subprocess.run(
        [*command, "train", *args, "--dist-timeout", "60", "--out-dir", out],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # the monitor's kNN features are gathered from every rank (extract_features' all_gather): had one rank skipped
    # the monitoring, the other would wait at it until --dist-timeout and the run would fail
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert len(os.listdir(os.path.join(out, TENSORBOARD_FOLDER))) == 1  # one writer: rank 0
    scalars, expected = _tensorboard_scalars(out), _expected(out)
    assert scalars == {name: _as_float32(series) for name, series in expected.items()}
    assert [step for step, _ in scalars["monitor/knn_top1"]] == [2, 4]
