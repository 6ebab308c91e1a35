"""A run's files can be trusted (issue 21): one run per folder, nothing non-finite or corrupt written or used, every
input checked where it enters, every OSError one line. One test (or a few) per case of the issue's table."""

import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from tiny_run import TINY_ARGS, checkpoint_readers

from empssl import checkpoint as ckpt
from empssl import cli
from empssl.config import TrainConfig
from empssl.data.dataset import DataError
from empssl.data.folder import decode_image
from empssl.data.load import load_dataset
from empssl.data.npz import load_npz
from empssl.device import resolve_device
from empssl.files import TEMP_PREFIX
from empssl.training import run_folder as run_dir
from empssl.training import run_lock

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(out, *extra):
    return cli.main(["train", *TINY_ARGS, "--out-dir", str(out), *extra])


def _run_ids(folder):
    with open(folder / run_dir.METRICS_NAME) as f:
        return {json.loads(line)["run_id"] for line in f}


def _one_clear_line(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("empssl")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": ROOT}


def _default_sigint():
    # a shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored:
    # the child gets Ctrl-C's default, as in a terminal, wherever the tests themselves run
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ---------------------------------------------------------------------- two runs into one folder


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    with run_lock.RunLock(str(out)) as lock:  # another open file: flock conflicts as with another process
        lock.record("abc123")
        assert _train(out, "--max-steps", "2") == 1
        line = _one_clear_line(capsys.readouterr().err)
        assert "is in use by another run" in line and f"pid {os.getpid()}" in line and "run id abc123" in line
        assert sorted(os.listdir(out)) == [run_lock.LOCK_NAME]  # nothing of the refused run
    assert not out.exists()  # the lock's own folder goes with it: nothing half-made blocks a rerun


def test_a_stale_lock_file_of_a_dead_process_never_blocks(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / run_lock.LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "gone", "run_id": "dead"}))
    assert _train(out, "--max-steps", "2") == 0
    assert (out / run_dir.CHECKPOINT_NAME).exists() and not (out / run_lock.LOCK_NAME).exists()


@pytest.mark.slow  # a subprocess or a compile: over 4.5 s on 2 cores
def test_two_concurrent_processes_one_run_per_folder(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    # the first run holds the folder while its data loads until the second has tried (no race on timing)
    first_script = textwrap.dedent(f"""
        import os, sys, time
        import empssl.data.load
        from empssl import cli
        real = empssl.data.load.make_synthetic
        def waiting(*args, **kwargs):
            while not os.path.exists({str(go)!r}):
                time.sleep(0.02)
            return real(*args, **kwargs)
        empssl.data.load.make_synthetic = waiting
        sys.exit(cli.main(["train", *{TINY_ARGS!r}, "--max-steps", "4", "--out-dir", {str(out)!r}]))
    """)
    first = subprocess.Popen(
        [sys.executable, "-c", first_script], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 60
        while not (out / run_lock.LOCK_NAME).exists() and time.time() < deadline:
            time.sleep(0.02)
        second = subprocess.run(
            [sys.executable, "-m", "empssl", "train", *TINY_ARGS, "--max-steps", "4", "--out-dir", str(out)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        go.touch()
    _, first_err = first.communicate(timeout=120)
    assert first.returncode == 0, first_err
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert "is in use by another run" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
    assert len(_run_ids(out)) == 1
    steps = [json.loads(line)["step"] for line in (out / run_dir.METRICS_NAME).read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # each step once, of one run
    assert not (out / run_lock.LOCK_NAME).exists()


# ---------------------------------------------------------------------- non-finite state


def test_weights_that_overflow_under_a_huge_lr_stop_the_run_without_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(out, "--lr", "1e15", "--max-steps", "4", "--checkpoint-every", "2") == 1
    line = _one_clear_line(capsys.readouterr().err)
    assert "non-finite" in line and "running_var" in line and "no checkpoint was written" in line
    assert not (out / run_dir.CHECKPOINT_NAME).exists()
    # the folder holds only the metrics of a run without a checkpoint: a rerun needs no --overwrite
    assert _train(out, "--max-steps", "2") == 0
    assert "wrote no checkpoint" in capsys.readouterr().err and len(_run_ids(out)) == 1


def _saved_run(tmp_path, steps=2):
    out = tmp_path / "run"
    assert _train(out, "--max-steps", str(steps)) == 0
    return out, out / run_dir.CHECKPOINT_NAME


def _rewrite(path, change):
    payload = torch.load(path, weights_only=True)
    change(payload)
    payload.pop("checksums", None)
    ckpt.save_checkpoint(str(path), {k: v for k, v in payload.items() if k not in ("format", "version")})


@pytest.mark.parametrize("value", [math.inf, math.nan, 1e30])
def test_eval_export_and_resume_refuse_a_checkpoint_with_non_finite_tensors(tmp_path, capsys, value):
    out, path = _saved_run(tmp_path)
    _rewrite(path, lambda p: p["model"]["backbone.layer1.0.bn1.running_var"].__setitem__(0, value))
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", str(path), "--out", str(tmp_path / "b.pt")]) == 1
    assert "model/backbone.layer1.0.bn1.running_var" in _one_clear_line(capsys.readouterr().err)
    assert cli.main(["eval", "--checkpoint", str(path), "--device", "cpu", "--no-progress"]) == 1
    assert "non-finite" in _one_clear_line(capsys.readouterr().err)
    assert _train(out, "--resume", str(path)) == 1
    assert "state/model/backbone.layer1.0.bn1.running_var" in _one_clear_line(capsys.readouterr().err)


# ---------------------------------------------------------------------- corrupt checkpoints


def _flip_bytes_of_the_largest_tensor(path, count=2000):
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = (
        int.from_bytes(data[info.header_offset + 26 : info.header_offset + 28], "little"),
        int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little"),
    )
    start = info.header_offset + 30 + name_len + extra_len + 16
    count = min(count, info.file_size - 16)
    data[start : start + count] = bytes(b ^ 0x5A for b in data[start : start + count])
    path.write_bytes(bytes(data))


def test_flipped_bytes_of_a_checkpoint_are_found_and_the_tensor_named(tmp_path, capsys):
    out, path = _saved_run(tmp_path)
    ckpt.load_checkpoint(str(path))  # intact: verifies
    _flip_bytes_of_the_largest_tensor(path)
    with pytest.raises(
        ckpt.CheckpointError, match=r"corrupt: tensor (model|optimizer)/\S+ does not match its checksum"
    ):
        ckpt.load_checkpoint(str(path))
    capsys.readouterr()
    for command in checkpoint_readers(path, out, tmp_path / "b.pt"):
        assert cli.main(command) == 1
        assert "does not match its checksum" in _one_clear_line(capsys.readouterr().err)


def test_an_old_checkpoint_without_checksums_loads_with_a_note(tmp_path, capsys):
    _, path = _saved_run(tmp_path)
    payload = torch.load(path, weights_only=True)
    del payload["checksums"]
    torch.save(payload, path)
    capsys.readouterr()
    loaded = ckpt.load_checkpoint(str(path))
    assert torch.equal(loaded["model"]["backbone.conv1.weight"], payload["model"]["backbone.conv1.weight"])
    assert "written before checkpoints held checksums" in capsys.readouterr().err


def test_a_checkpoint_without_its_optimiser_state_is_refused_for_resume_with_one_line(tmp_path, capsys):
    out, path = _saved_run(tmp_path)
    _rewrite(path, lambda p: p.pop("optimizer"))
    capsys.readouterr()
    assert _train(out, "--resume", str(path), "--max-steps", "4") == 1
    line = _one_clear_line(capsys.readouterr().err)
    assert "lacks the training state a resume needs (optimizer)" in line and "KeyError" not in line


# ---------------------------------------------------------------------- npz labels


def _npz(tmp_path, labels, images=None, name="d.npz"):
    images = np.zeros((len(labels), 8, 8, 3), np.uint8) if images is None else images
    path = tmp_path / name
    np.savez(path, images=images, labels=np.asarray(labels))
    return str(path)


@pytest.mark.parametrize("labels", [[0, 1, 2**40, 3], [0, -1, 2, 3], [0, 1, 2**20, 1]])
def test_npz_labels_beyond_the_bound_are_refused_before_any_class_list(tmp_path, labels):
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"d\.npz: labels holds the label -?\d+; labels must be class indices"):
        load_npz(_npz(tmp_path, labels))
    assert time.perf_counter() - start < 2


def test_npz_float_and_string_labels_are_refused_naming_the_file_and_array(tmp_path):
    with pytest.raises(
        DataError, match=r"d\.npz: labels must be integer class indices.*non-integral values such as 1\.5"
    ):
        load_npz(_npz(tmp_path, [0.0, 1.5, 2.0, 1.0]))
    with pytest.raises(DataError, match=r"d\.npz: labels must be integer class indices, got an array of <U3"):
        load_npz(_npz(tmp_path, ["cat", "dog", "cat", "dog"]))
    with pytest.raises(DataError, match="non-integral values such as nan"):
        load_npz(_npz(tmp_path, [0.0, float("nan"), 2.0, 1.0]))
    data = load_npz(_npz(tmp_path, [0.0, 1.0, 2.0, 1.0] * 3))  # integral floats are class indices
    assert data.num_classes == 3 and data.train_labels.dtype == torch.int64


# ---------------------------------------------------------------------- high-depth images


@pytest.mark.parametrize(
    "mode, dtype, scale", [("I;16", np.uint16, 65535), ("I", np.int32, 65535), ("F", np.float32, 1.0)]
)
def test_high_depth_images_are_scaled_to_8_bits_not_clipped(tmp_path, mode, dtype, scale):
    from PIL import Image

    ramp = (np.linspace(0, 0.25, 64).reshape(8, 8) * scale).astype(dtype)  # a dark image: a quarter of full range
    image = Image.fromarray(ramp)
    assert image.mode == mode
    path = tmp_path / "a.tif"
    image.save(path)
    decoded = decode_image(str(path), 8)
    expected = np.round(ramp.astype(np.float64) * 255 / scale)
    assert decoded.shape == (8, 8, 3) and decoded.max() <= 64
    assert np.abs(decoded[..., 0].astype(np.float64) - expected).max() <= 1


def test_a_folder_of_16_bit_pngs_trains_on_its_real_brightness(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for index in range(5):
            gray = rng.integers(0, 16384, (8, 8)).astype(np.uint16)  # up to a quarter of 16 bits
            Image.fromarray(gray).save(tmp_path / "data" / label / f"{index}.png")
    with Image.open(tmp_path / "data" / "a" / "0.png") as image:
        assert image.mode.startswith("I")  # 16 bits stored and read
    data = load_dataset(f"folder:{tmp_path / 'data'}", image_size=8, show_progress=False)
    images = torch.cat([data.train_images, data.test_images]).float()
    assert images.max() <= 64 and images.mean() < 40  # clipping made them ~98% white (255)


# ---------------------------------------------------------------------- options that overflow, absurd sizes


@pytest.mark.parametrize(
    "option, value",
    [
        ("--lr", "1e300"),
        ("--width", "inf"),
        ("--eps", "nan"),
        ("--inv-coef", "nan"),
        ("--tcr-coef", "-1e39"),
        ("--lr", "-inf"),
    ],
)
def test_options_that_overflow_float32_are_refused_naming_the_option(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as info:
        _train(tmp_path / "run", f"{option}={value}")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be a finite number" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "field, value", [("lr", 1e300), ("width", math.inf), ("inv_coef", math.nan), ("eps", -math.inf), ("tcr_coef", 1e39)]
)
def test_the_api_refuses_the_same_values_naming_the_option(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')} must be a finite number"):
        TrainConfig(**{field: value}).validate()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--z-dim", "100000000", "needs about"),
        ("--num-patches", "1000000000", "needs about"),
        ("--hidden-dim", "100000000", "needs about"),
        ("--width", "1e6", "cannot be built"),
    ],
)
def test_absurd_sizes_are_refused_before_allocating(tmp_path, capsys, option, value, message):
    start = time.perf_counter()
    assert _train(tmp_path / "run", option, value) == 1
    line = _one_clear_line(capsys.readouterr().err)
    assert message in line and time.perf_counter() - start < 20
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- OSErrors


class _FailingFile(io.RawIOBase):
    def __init__(self, real, error):
        self.real, self.error = real, error

    def write(self, data):
        raise OSError(self.error, os.strerror(self.error))

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize(
    "code, text",
    [
        (errno.ENOSPC, "No space left on device"),
        (errno.EROFS, "Read-only file system"),
        (errno.EACCES, "Permission denied"),
    ],
)
def test_a_failed_checkpoint_write_is_one_line_and_a_rerun_needs_no_overwrite(
    tmp_path, capsys, monkeypatch, code, text
):
    out = tmp_path / "run"
    real_fdopen = os.fdopen

    def failing_for_checkpoints(fd, *args, **kwargs):  # the run's other files (config.toml) are written as usual
        file = real_fdopen(fd, *args, **kwargs)
        return _FailingFile(file, code) if os.readlink(f"/proc/self/fd/{fd}").endswith(".pt") else file

    monkeypatch.setattr(os, "fdopen", failing_for_checkpoints)
    assert _train(out, "--max-steps", "2") == 1
    line = _one_clear_line(capsys.readouterr().err)
    assert text in line and f"cannot write {out / run_dir.CHECKPOINT_NAME}" in line
    assert not [name for name in os.listdir(out) if name.startswith(TEMP_PREFIX)]
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert _train(out, "--max-steps", "2") == 0  # metrics.jsonl without a checkpoint does not block the rerun
    assert (out / run_dir.CHECKPOINT_NAME).exists() and len(_run_ids(out)) == 1


def test_a_metrics_write_that_fails_and_a_vanished_folder_are_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"

    def no_space(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", self.path)

    monkeypatch.setattr(run_dir.MetricsLog, "write", no_space)
    assert _train(out, "--max-steps", "2") == 1
    assert "No space left on device" in _one_clear_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert cli.main(["export", "--checkpoint", str(tmp_path / "gone" / "c.pt"), "--out", str(tmp_path / "x.pt")]) == 1
    assert "not found" in _one_clear_line(capsys.readouterr().err)


# ---------------------------------------------------------------------- caches and small images


def _image_tree(root, count=6):
    from PIL import Image

    rng = np.random.default_rng(1)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(root / label / f"{index}.png")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "meta"])
def test_a_truncated_or_unreadable_cache_is_rebuilt_with_a_warning_naming_it(tmp_path, damage):
    _image_tree(tmp_path / "data")
    first = load_dataset(f"folder:{tmp_path / 'data'}", image_size=8, show_progress=False)
    cache = tmp_path / "data" / ".empssl_cache"
    target = sorted(cache.glob("*.train.empssl-store"))[0]
    content = bytearray(target.read_bytes())
    if damage == "meta":  # the header's JSON cut short
        content[30] = ord("}")
    target.write_bytes({"truncate": content[: len(content) // 2], "garbage": b"\x00" * 40, "meta": content}[damage])
    with pytest.warns(UserWarning, match=f"{target}.*rebuilding the store"):
        again = load_dataset(f"folder:{tmp_path / 'data'}", image_size=8, show_progress=False)
    assert torch.equal(again.train_images, first.train_images) and again.classes == first.classes
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: read without a word
        load_dataset(f"folder:{tmp_path / 'data'}", image_size=8, show_progress=False)


@pytest.mark.parametrize("size", [2, 6])
def test_images_smaller_than_the_recipe_are_refused_in_the_datas_terms(tmp_path, capsys, size):
    path = tmp_path / "small.npz"
    np.savez(path, images=np.zeros((40, size, size, 3), np.uint8), labels=np.arange(40) % 2)
    assert (
        cli.main(
            [
                "train",
                "--dataset",
                f"npz:{path}",
                "--batch-size",
                "8",
                "--device",
                "cpu",
                "--no-progress",
                "--out-dir",
                str(tmp_path / "run"),
            ]
        )
        == 1
    )
    line = _one_clear_line(capsys.readouterr().err)
    assert f"images are {size}x{size}; the smallest the augmentation takes is 7x7" in line
    assert "AugmentConfig" not in line


# ---------------------------------------------------------------------- the small ones


@pytest.mark.slow  # a subprocess or a compile: over 4.5 s on 2 cores
def test_sigint_while_the_data_loads_exits_130_with_one_line(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import empssl.data.load
        from empssl import cli
        real = empssl.data.load.make_synthetic
        def slow(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the data loads
            time.sleep(5)
            return real(*args, **kwargs)
        empssl.data.load.make_synthetic = slow
        sys.exit(cli.main(["train", *{TINY_ARGS!r}, "--out-dir", {str(tmp_path / "run")!r}]))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_default_sigint,
    )
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "empssl train: interrupted"
    assert not (tmp_path / "run").exists()  # the lock and its folder are gone


@pytest.mark.slow  # a subprocess or a compile: over 4.5 s on 2 cores
def test_sigint_before_the_loop_exits_130_without_a_traceback(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "empssl",
        "train",
        *TINY_ARGS,
        "--epochs",
        "250",
        "--schedule-epochs",
        "250",
        "--out-dir",
        str(out),
    ]
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint
    )
    deadline = time.time() + 60
    while not (out / run_lock.LOCK_NAME).exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err


def test_a_schedule_shorter_than_the_run_warns(tmp_path):
    with pytest.warns(
        UserWarning,
        match=r"--schedule-epochs 2 ends the cosine schedule at step 8, before this run's "
        r"4000 steps \(--epochs 1000\): the learning rate is 0 for the last 3992",
    ):
        TrainConfig(epochs=1000).warn_short_schedule(steps_per_epoch=4, total_steps=4000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainConfig().warn_short_schedule(steps_per_epoch=4, total_steps=4)  # the 1-epoch recipe: no warning
    with pytest.warns(UserWarning, match="the learning rate is 0 for the last 4"):
        assert _train(tmp_path / "run", "--epochs", "3", "--schedule-epochs", "2") == 0


def test_resuming_reports_the_steps_this_process_trained(tmp_path, capsys):
    out = tmp_path / "run"
    path = out / run_dir.CHECKPOINT_NAME
    assert _train(out, "--max-steps", "3") == 0
    assert "trained 3 steps in" in capsys.readouterr().out
    assert _train(out, "--resume", str(path)) == 0
    printed = capsys.readouterr().out
    assert "trained 1 step (step 4 of 4) in" in printed and "1 steps" not in printed
    assert _train(out, "--resume", str(path)) == 0
    printed = capsys.readouterr().out
    assert f"nothing to train: the run in {out} is already at step 4 of 4" in printed
    assert "nan" not in printed and "trained" not in printed
    # a finished run continued into another folder: nothing to train, and that folder gets the run's files
    other = tmp_path / "other"
    assert _train(other, "--resume", str(path)) == 0
    assert "nothing to train" in capsys.readouterr().out
    assert {run_dir.CHECKPOINT_NAME, run_dir.METRICS_NAME} <= set(os.listdir(other))
    assert torch.equal(
        ckpt.load_checkpoint(str(other / run_dir.CHECKPOINT_NAME))["model"]["projection.3.weight"],
        ckpt.load_checkpoint(str(path))["model"]["projection.3.weight"],
    )


def test_devices_that_do_not_exist_are_refused(monkeypatch, tmp_path, capsys):
    for device in ("cpu:1", "cpu:7"):
        with pytest.raises(ValueError, match="does not exist"):
            resolve_device(device)
    assert resolve_device("cpu:0") == torch.device("cpu:0")
    assert _train(tmp_path / "run", "--device", "cpu:1") == 1
    assert "'cpu:1' does not exist" in _one_clear_line(capsys.readouterr().err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match="this machine has 2 CUDA GPU"):
        resolve_device("cuda:2")
