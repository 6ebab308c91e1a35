"""The `empssl` command: train -> eval round trip, info, argument and input errors."""

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

from empssl import cli

TINY_DATA = ["--dataset", "synthetic", "--image-size", "8", "--train-size", "64", "--threads", "1", "--no-progress"]
TINY_MODEL = ["--width", "0.125", "--hidden-dim", "32", "--z-dim", "16"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_train_then_eval_checkpoint_and_random_init(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            *TINY_DATA,
            *TINY_MODEL,
            "--num-patches",
            "2",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--out-dir",
            str(out),
            "--log-every",
            "2",
        ]
    )
    assert code == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists()

    evaluation = ["--num-patches", "2", "--linear-epochs", "2", "--test-size", "32", "--json", "--device", "cpu"]
    # data and architecture default to the checkpoint's
    assert (
        cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--threads", "1", "--no-progress", *evaluation])
        == 0
    )
    printed = capsys.readouterr().out
    trained = _last_json(printed)
    assert "linear probe top-1 (final epoch)" in printed and "best epoch" in printed
    assert trained["num_train"] == 64 and trained["num_test"] == 32 and trained["feature_dim"] == 32
    for key in ("linear_top1", "knn_top1", "knn_top5", "linear_best_epoch_top1"):
        assert 0.0 <= trained[key] <= 1.0

    assert cli.main(["eval", "--random-init", *TINY_DATA, *TINY_MODEL, *evaluation]) == 0
    baseline = _last_json(capsys.readouterr().out)
    assert baseline["encoder"].startswith("random init") and baseline["feature_dim"] == 32


def test_eval_refuses_another_architecture(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                *TINY_DATA,
                *TINY_MODEL,
                "--num-patches",
                "2",
                "--batch-size",
                "32",
                "--max-steps",
                "1",
                "--device",
                "cpu",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--width", "0.25", "--no-progress"])
    assert code == 1
    assert "holds a resnet18-cifar width 0.125" in capsys.readouterr().err


def test_input_errors_exit_non_zero_with_a_message(tmp_path, capsys):
    code = cli.main(["train", *TINY_DATA, *TINY_MODEL, "--batch-size", "65", "--out-dir", str(tmp_path / "r")])
    assert code == 1 and "batch_size 65 is larger than the training set (64 images)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    code = cli.main(["train", "--dataset", f"folder:{tmp_path / 'missing'}", "--out-dir", str(tmp_path / "r")])
    assert code == 1 and "not found" in capsys.readouterr().err
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    code = cli.main(["eval", "--checkpoint", str(tmp_path / "broken.pt")])
    assert code == 1 and "truncated or corrupt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--arch", "resnet50"], "unknown --arch 'resnet50' (did you mean torchvision:resnet50?)"),
        (["train", "--loss-backend", "fast"], "invalid choice: 'fast'"),
        (["train", "--batch-size", "0"], "must be a positive integer"),
        (["eval"], "one of the arguments --checkpoint --random-init is required"),
        (["eval", "--random-init", "--bf16", "maybe"], "invalid choice: 'maybe'"),
        (["train", "--on-bad-image", "ignore"], "invalid choice: 'ignore'"),
        (["fly"], "invalid choice: 'fly'"),
    ],
)
def test_bad_option_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: empssl" in err and message in err


@pytest.mark.slow  # a subprocess that loads the extension and Triton: ~8 s
def test_info_as_a_program():
    env = dict(os.environ, TRITON_INTERPRET="1")
    info = subprocess.run([sys.executable, "-m", "empssl.cli", "info"], capture_output=True, text=True, env=env)
    assert info.returncode == 0, info.stderr
    assert f"torch        {torch.__version__}" in info.stdout and "torchvision" in info.stdout
    rows = [line.split() for line in info.stdout.splitlines()]
    backend_rows = [row for row in rows if len(row) >= 4 and row[0] in ("tcr", "augment")]
    assert {row[0] for row in backend_rows} == {"tcr", "augment"}
    assert ["tcr", "cpu", "reference", "yes"] in [row[:4] for row in backend_rows]
    if not torch.cuda.is_available():
        assert all(row[3] == "no:" for row in backend_rows if row[1] == "cuda" and row[2] == "cuda")
    (rule,) = [line for line in info.stdout.splitlines() if line.startswith("data ")]
    from empssl.device import host_memory_available

    assert "held in memory when it takes at most half of the memory this process may use" in rule
    assert host_memory_available()[1] in rule and "on-disk store" in rule


def _snapshot(folder):
    """Every path under folder with its bytes (None for folders): what a failed command must leave unchanged."""
    return {str(path): None if path.is_dir() else path.read_bytes() for path in sorted(folder.rglob("*"))}


def _bad_input_cases(tmp_path):
    """(argv, message) of inputs that must fail with a clear error; the files they need are made in tmp_path."""
    import numpy as np

    rng = np.random.default_rng()
    images = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "short.npz", images=images, labels=rng.integers(0, 3, 30))
    np.savez(tmp_path / "long.npz", images=images, labels=rng.integers(0, 3, 50))
    np.savez(tmp_path / "good.npz", images=images, labels=rng.integers(0, 3, 40))
    (tmp_path / "a_file").write_text("keep me")
    from PIL import Image

    for name, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), colour).save(tmp_path / "tree" / name / f"{i}.png")
    out = ["--out-dir", str(tmp_path / "out")]
    tree = [
        "--dataset",
        f"folder:{tmp_path / 'tree'}",
        "--image-size",
        "8",
        "--batch-size",
        "2",
        *TINY_MODEL,
        "--no-progress",
        *out,
    ]
    return {
        "npz labels shorter": (
            ["train", "--dataset", f"npz:{tmp_path / 'short.npz'}", *out],
            "40 images but labels of shape (30,)",
        ),
        "npz labels longer": (
            ["train", "--dataset", f"npz:{tmp_path / 'long.npz'}", *out],
            "40 images but labels of shape (50,)",
        ),
        "npz image size differs": (
            ["train", "--dataset", f"npz:{tmp_path / 'good.npz'}", "--image-size", "16", *out],
            "holds 8x8 images, but image_size=16",
        ),
        "npz missing, with image size": (
            ["train", "--dataset", f"npz:{tmp_path / 'gone.npz'}", "--image-size", "8", *out],
            "gone.npz not found",
        ),
        "out-dir is a file": (
            ["train", *TINY_DATA, "--out-dir", str(tmp_path / "a_file")],
            "a_file is a file, not a folder",
        ),
        "out-dir under a file": (
            ["train", *TINY_DATA, "--out-dir", str(tmp_path / "a_file" / "run")],
            "which is a file",
        ),
        "out-dir not writable": (
            ["train", *TINY_DATA, "--out-dir", "/proc/empssl-run"],
            "--out-dir /proc/empssl-run is not writable",
        ),
        "cache-dir is a file": (
            ["train", *tree, "--cache-dir", str(tmp_path / "a_file")],
            "a_file is a file, not a folder",
        ),
        "cache-dir not writable": (
            ["train", *tree, "--cache-dir", "/proc/empssl-cache"],
            "--cache-dir /proc/empssl-cache is not writable",
        ),
        "unknown device": (["train", *TINY_DATA, "--device", "tpu", *out], "unknown device 'tpu'; expected cpu, cuda"),
        "unsupported device": (["train", *TINY_DATA, "--device", "meta", *out], "device 'meta' is not supported"),
        "eval on an unknown device": (["eval", "--random-init", *TINY_DATA, "--device", "tpu"], "unknown device 'tpu'"),
        "backend that cannot run": (
            [
                "train",
                *TINY_DATA,
                *TINY_MODEL,
                "--device",
                "cpu",
                "--batch-size",
                "16",
                "--num-patches",
                "2",
                "--augment-backend",
                "cuda",
                *out,
            ],
            "backend 'cuda' is not available",
        ),
    }


BAD_INPUTS = [
    "npz labels shorter",
    "npz labels longer",
    "npz image size differs",
    "npz missing, with image size",
    "out-dir is a file",
    "out-dir under a file",
    "out-dir not writable",
    "cache-dir is a file",
    "cache-dir not writable",
    "unknown device",
    "unsupported device",
    "eval on an unknown device",
    "backend that cannot run",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_a_clear_error_that_leaves_no_file(tmp_path, case, capsys):
    cases = _bad_input_cases(tmp_path)
    assert sorted(cases) == sorted(BAD_INPUTS)  # every case is run
    argv, message = cases[case]
    before = _snapshot(tmp_path)
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1 and f"empssl {argv[0]}: error: " in err and message in err, err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before  # no out-dir, no cache, no probe file; a_file untouched


def test_resume_with_changed_data_size_names_the_setting(tmp_path, capsys):
    out = tmp_path / "run"
    base = [
        "train",
        *TINY_DATA,
        *TINY_MODEL,
        "--num-patches",
        "2",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
    ]
    assert cli.main([*base, "--max-steps", "1"]) == 0
    before = _snapshot(tmp_path)
    capsys.readouterr()
    changed = [*base, "--resume", str(out / "checkpoint.pt")]
    changed[changed.index("--train-size") + 1] = "48"
    with pytest.warns(UserWarning, match="changed settings"):  # then refused: the data no longer fits the checkpoint
        assert cli.main(changed) == 1
    err = capsys.readouterr().err
    assert "cannot resume" in err and "trained on 64 images of 8x8" in err and "this run has 48" in err
    assert "--train-size 64 -> 48" in err
    assert _snapshot(tmp_path) == before


@pytest.mark.slow  # a subprocess or a compile: over 4.5 s on 2 cores
def test_version():
    from empssl import __version__

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    as_module = subprocess.run([sys.executable, "-m", "empssl.cli", "--version"], capture_output=True, text=True)
    assert as_module.returncode == 0 and as_module.stdout.strip() == f"empssl {__version__}"


def test_under_torchrun_the_run_keeps_the_users_device_and_each_rank_resolves_it_to_its_own(monkeypatch):
    """A rank's device is never written into the run's settings (its config.toml would say cuda:0, which torchrun
    refuses): the process group is set up with the user's --device, and ``cuda`` / ``auto`` resolve to the rank's
    current GPU in a process group (CUDA mocked here: torchrun's CUDA run is test_train_distributed's gpu test)."""
    from empssl import distributed
    from empssl.cli.commands import setup_runtime
    from empssl.device import resolve_device

    monkeypatch.setattr(distributed, "init_from_env", lambda device, timeout: "cuda:1")  # as rank 1 of a node
    args = argparse.Namespace(device="cuda", threads=None, dist_timeout=60.0)
    setup_runtime(args)
    assert args.device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # the set-up's torch.cuda.set_device(LOCAL_RANK)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 1)
