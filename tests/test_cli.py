"""The `empssl` command: train -> eval round trip, info, argument and input errors."""
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
    code = cli.main(["train", *TINY_DATA, *TINY_MODEL, "--num-patches", "2", "--batch-size", "16", "--device", "cpu",
                     "--out-dir", str(out), "--log-every", "2"])
    assert code == 0
    assert "trained 4 steps" in capsys.readouterr().out
    assert (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists()

    evaluation = ["--num-patches", "2", "--linear-epochs", "2", "--test-size", "32", "--json", "--device", "cpu"]
    # data and architecture default to the checkpoint's
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--threads", "1", "--no-progress", *evaluation]) == 0
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
    assert cli.main(["train", *TINY_DATA, *TINY_MODEL, "--num-patches", "2", "--batch-size", "32", "--max-steps", "1",
                     "--device", "cpu", "--out-dir", str(out)]) == 0
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


@pytest.mark.parametrize("argv, message", [
    (["train", "--arch", "resnet50"], "invalid choice: 'resnet50'"),
    (["train", "--loss-backend", "fast"], "invalid choice: 'fast'"),
    (["train", "--batch-size", "0"], "must be a positive integer"),
    (["eval"], "one of the arguments --checkpoint --random-init is required"),
    (["eval", "--random-init", "--bf16", "maybe"], "invalid choice: 'maybe'"),
    (["train", "--on-bad-image", "ignore"], "invalid choice: 'ignore'"),
    (["fly"], "invalid choice: 'fly'"),
])
def test_bad_option_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: empssl" in err and message in err


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
