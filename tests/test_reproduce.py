"""`empssl reproduce`: every experiment end to end at toy size, its report checked against the cells' own
results; a killed sweep continues and finishes every task once; options that would mix cells are refused;
a cell that cannot fit is refused before anything runs."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from empssl import cli
from empssl.reproduce import published, report
from empssl.reproduce import sweep as reproduce
from empssl.reproduce.published import Recipe

TRAIN = "--image-size 16 --train-size 48 --batch-size 16 --width 0.125 --hidden-dim 32 --z-dim 16 --threads 1"
EVAL = "--test-size 32 --num-patches 2 --linear-epochs 2 --threads 1"


def _reproduce(args):
    return cli.main(["reproduce", *args])


def _args(experiment, out_dir, *extra, datasets=("synthetic",)):
    return [
        experiment,
        *[word for d in datasets for word in ("--dataset", d)],
        "--device",
        "cpu",
        "--out-dir",
        str(out_dir),
        "--train-args",
        TRAIN,
        "--eval-args",
        EVAL,
        "--no-progress",
        *extra,
    ]


def _table(markdown):
    """The report's table as dicts of its cells' text."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def _check_report_against_cells(out_dir, expected_cells):
    rows = json.loads((out_dir / "report.json").read_text())["rows"]
    table = _table((out_dir / "report.md").read_text())
    assert [row["cell"] for row in rows] == [row["cell"] for row in table] == expected_cells
    for row, shown in zip(rows, table):
        own = json.loads((out_dir / row["cell"] / "eval.json").read_text())  # the cell's own `eval --json`
        assert row["linear_top1"] == own["linear_top1"] and row["knn_top1"] == own["knn_top1"]
        assert shown["linear top-1 %"] == f"{100 * own['linear_top1']:.1f}"
        assert shown["kNN top-1 %"] == f"{100 * own['knn_top1']:.1f}"
        assert shown["published %"] == "" and row["published"] is None  # synthetic data: the paper has no number
    return rows


def _lines(figure):
    return [
        [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())]
        for ax in figure.get_axes()
        for line in ax.get_lines()
    ]


def test_one_epoch_runs_both_recipes_as_normal_run_folders(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert _reproduce(_args("one-epoch", out)) == 0
    rows = _check_report_against_cells(out, ["synthetic-schedule-1", "synthetic-optimised"])
    assert [(row["epochs"], row["schedule_epochs"], row["num_patches"]) for row in rows] == [(1, 1, 20), (1, 2, 20)]
    for cell in ("synthetic-schedule-1", "synthetic-optimised"):  # what `empssl train` and `empssl eval` write
        assert {"checkpoint.pt", "metrics.jsonl", "eval.json", "commands.txt"} <= set(os.listdir(out / cell))
    printed = capsys.readouterr().out
    assert "| synthetic-optimised | synthetic | synthetic | 1 (2) | 20 |" in printed  # the table, printed at the end


def test_convergence_evaluates_the_checkpoint_of_every_epoch(tmp_path):
    pytest.importorskip("matplotlib", reason="optional dependency not installed: matplotlib")
    out = tmp_path / "sweep"
    assert _reproduce(_args("convergence", out, "--epochs", "3", "--patches", "2")) == 0
    rows = _check_report_against_cells(out, [f"synthetic-epoch-{e:03d}" for e in (1, 2, 3)])
    import torch

    for epoch, row in enumerate(rows, start=1):  # each snapshot is the run's checkpoint after that epoch
        payload = torch.load(out / row["cell"] / "checkpoint.pt", weights_only=False, map_location="cpu")
        assert int(payload["step"]) == epoch * 3 and row["schedule_epochs"] == 3  # 48 images / 16 per step
    figure = report.epochs_figure(rows)
    linear, knn = _lines(figure)[:2]
    assert linear == [(e, 100 * r["linear_top1"]) for e, r in zip((1, 2, 3), rows)]
    assert knn == [(e, 100 * r["knn_top1"]) for e, r in zip((1, 2, 3), rows)]
    assert (out / report.EPOCHS_PNG).exists() and f"]({report.EPOCHS_PNG})" in (out / "report.md").read_text()


def test_patches_reports_accuracy_and_time_per_patch_count(tmp_path):
    pytest.importorskip("matplotlib", reason="optional dependency not installed: matplotlib")
    from PIL import Image

    out = tmp_path / "sweep"
    assert _reproduce(_args("patches", out, "--epochs", "1", "--patches", "2,4")) == 0
    rows = _check_report_against_cells(out, ["synthetic-patches-002", "synthetic-patches-004"])
    for row in rows:  # the time is the run's own clock, from its metrics.jsonl
        last = [json.loads(line) for line in (out / row["cell"] / "metrics.jsonl").read_text().splitlines()][-1]
        assert row["train_seconds"] == last["elapsed_s"] > 0
    accuracy, seconds = _lines(report.patches_figure(rows))
    assert accuracy == [(r["num_patches"], 100 * r["linear_top1"]) for r in rows]
    assert seconds == [(r["num_patches"], r["train_seconds"]) for r in rows]
    with Image.open(out / report.PATCHES_PNG) as image:
        assert image.size == (1000, 450)


def test_transfer_evaluates_each_encoder_on_each_data_set(tmp_path):
    rng = np.random.default_rng(0)
    other = tmp_path / "other.npz"
    np.savez(
        other,
        images=rng.integers(0, 256, (48, 16, 16, 3), dtype=np.uint8),
        labels=rng.integers(0, 5, 48),
        test_images=rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8),
        test_labels=rng.integers(0, 5, 32),
    )
    out = tmp_path / "sweep"
    datasets = ("synthetic", f"npz:{other}")
    assert _reproduce(_args("transfer", out, datasets=datasets)) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [(r["trained_on"], r["evaluated_on"]) for r in rows] == [(a, b) for a in datasets for b in datasets]
    for row in rows:
        own = json.loads((out / row["cell"] / "eval.json").read_text())
        assert own["dataset"].startswith(row["evaluated_on"].split(":")[0]) and row["linear_top1"] == own["linear_top1"]
        assert own["num_classes"] == (5 if row["evaluated_on"].startswith("npz") else 10)


def test_the_published_numbers_sit_beside_the_cells_of_their_recipe():
    tasks = reproduce.plan("one-epoch", ["cifar10", "cifar100"], epochs=1, patches=[20])
    evals = [t for t in tasks if t.kind == "eval"]
    assert [(t.dataset, published.linear_probe(t.dataset, t.recipe)[0]) for t in evals] == [
        ("cifar10", 0.806),
        ("cifar10", 0.842),
        ("cifar100", 0.551),
        ("cifar100", 0.585),
    ]
    convergence = [t for t in reproduce.plan("convergence", ["cifar10"], 10, [20]) if t.kind == "eval"]
    assert [published.linear_probe("cifar10", t.recipe)[0] for t in convergence] == [None] * 9 + [0.907]
    patches = [t for t in reproduce.plan("patches", ["cifar10"], 10, [20, 50, 100, 200]) if t.kind == "eval"]
    assert [published.linear_probe("cifar10", t.recipe)[0] for t in patches] == [0.907, None, None, 0.915]
    assert published.linear_probe("synthetic", Recipe(1, 2, 20)) == (None, "")


def test_tiny_imagenet_and_imagenet100_sit_beside_their_published_numbers_in_cells_of_their_own(tmp_path):
    tiny, in100 = f"tinyimagenet:{tmp_path}/tiny-imagenet-200", f"imagenet100:{tmp_path}/ILSVRC/"
    tasks = reproduce.plan("one-epoch", [tiny, in100], epochs=1, patches=[20])
    evals = [t for t in tasks if t.kind == "eval"]
    assert [(t.cell, published.linear_probe(t.dataset, t.recipe)[0]) for t in evals] == [
        ("tinyimagenet-tiny-imagenet-200-schedule-1", None),
        ("tinyimagenet-tiny-imagenet-200-optimised", 0.381),
        ("imagenet100-ILSVRC-schedule-1", None),
        ("imagenet100-ILSVRC-optimised", 0.585),
    ]
    for dataset, paper in ((tiny, 0.515), (in100, 0.789)):
        convergence = [t for t in reproduce.plan("convergence", [dataset], 10, [200]) if t.kind == "eval"]
        assert [published.linear_probe(dataset, t.recipe)[0] for t in convergence] == [None] * 9 + [paper]
    assert published.linear_probe(f"folder:{tmp_path}/tiny-imagenet-200", Recipe(1, 2, 20)) == (None, "")
    with pytest.raises(reproduce.SweepError, match="would share cell folders"):
        reproduce.plan("one-epoch", [f"folder:{tmp_path}/a/x", f"folder:{tmp_path}/b/x"], 1, [20])


def test_imagenet100_cells_train_the_imagenet_stem_unless_told_otherwise(tmp_path):
    import argparse

    args = argparse.Namespace(
        out_dir=str(tmp_path), experiment="one-epoch", dataset=["imagenet100:/data/in", "cifar10"], epochs=1,
        patches=[20], root="data", device="cpu", train_args="", eval_args="", no_progress=True,
    )  # fmt: skip
    sweep = reproduce.Sweep(args, run_command=None)
    commands = {t.dataset: sweep.train_command(t) for t in sweep.tasks if t.kind == "train"}
    arch = lambda command: command[command.index("--arch") + 1]  # noqa: E731
    assert arch(commands["imagenet100:/data/in"]) == "resnet18-imagenet" and "--arch" not in commands["cifar10"]
    sweep = reproduce.Sweep(argparse.Namespace(**{**vars(args), "train_args": "--arch resnet18-cifar"}), None)
    command = sweep.train_command(sweep.tasks[0])
    assert command.count("--arch") == 1 and arch(command) == "resnet18-cifar"


def test_a_changed_option_is_refused_and_a_foreign_folder_too(tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"experiment": "patches", "datasets": ["synthetic"], "epochs": 2}))
    assert _reproduce(_args("patches", out, "--epochs", "1", "--patches", "2")) == 1
    err = capsys.readouterr().err
    assert "holds another sweep" in err and "epochs: 2 -> 1" in err
    assert os.listdir(out) == ["sweep.json"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert _reproduce(_args("patches", foreign, "--patches", "2")) == 1
    assert "is not empty and holds no sweep" in capsys.readouterr().err


def test_one_sweep_per_folder(tmp_path, capsys):
    from empssl.training.run_lock import RunLock

    out = tmp_path / "sweep"
    with RunLock(str(out)):  # as a sweep still running in it holds it
        assert _reproduce(_args("patches", out, "--patches", "2")) == 1
        assert "is in use by another run" in capsys.readouterr().err
        assert os.listdir(out) == [".lock"]  # nothing of the refused sweep
    assert not out.exists()


def test_a_cell_that_cannot_fit_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    from empssl.training import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 3 * 2**30)  # a 3 GiB device
    out = tmp_path / "sweep"
    args = ["patches", "--dataset", "synthetic", "--patches", "2,50", "--device", "cpu", "--out-dir", str(out)]
    assert _reproduce(args) == 1
    err = capsys.readouterr().err

    def estimate(num_patches):  # the recipe's CIFAR step (a sweep's cell), in float32 on the CPU
        return memory.estimate_step_memory(
            arch="resnet18-cifar", width=1.0, hidden_dim=4096, z_dim=1024, image_size=32, batch_size=100,
            num_patches=num_patches, bf16=False,
        )  # fmt: skip

    need = estimate(50)
    fits = need.largest_num_patches(3 * 2**30, 100)
    assert (
        "cell synthetic-patches-050 cannot fit: a training step" in err
        and f"at most {fits} patches per image fit" in err
    )
    assert 2 <= fits < 50 and not out.exists()  # nothing written, not even the sweep's record
    small = estimate(2)
    # which cells fit on the device it found, before the refusal
    assert (
        f"a training step on cpu (3.0 GiB available): 2 patches: {memory.gib(small.total)}, fits; "
        f"50 patches: {memory.gib(need.total)}, does not fit" in err
    )


def test_the_memory_estimate_scales_with_the_patches_and_halves_activations_in_bf16():
    from empssl.training.memory import estimate_step_memory

    common = dict(arch="resnet18-cifar", width=0.5, hidden_dim=256, z_dim=64, image_size=32, batch_size=10)
    small, large = (
        estimate_step_memory(num_patches=2, bf16=False, **common),
        estimate_step_memory(num_patches=4, bf16=False, **common),
    )
    assert large.per_patch == small.per_patch and large.fixed == small.fixed and large.patches == 2 * small.patches
    half = estimate_step_memory(num_patches=2, bf16=True, **common)
    assert 0.45 * small.per_patch < half.per_patch < 0.6 * small.per_patch
    # the CIFAR stem at 32x32 keeps 64-channel 32x32 maps: at least the input of each of the first layer's
    # 4 convolutions, float32, per patch
    assert small.per_patch > 4 * 32 * 32 * 32 * 4


@pytest.mark.slow
def test_a_sweep_killed_mid_cell_finishes_every_task_once(tmp_path):
    out = tmp_path / "sweep"
    train = TRAIN.replace("--train-size 48", "--train-size 160") + " --checkpoint-every 2"
    command = [
        sys.executable,
        "-m",
        "empssl",
        "reproduce",
        "patches",
        "--dataset",
        "synthetic",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
        "--epochs",
        "1",
        "--patches",
        "2,3,4",
        "--train-args",
        train,
        "--eval-args",
        EVAL,
        "--no-progress",
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second_cell = out / "synthetic-patches-003" / "metrics.jsonl"
    deadline = time.time() + 240
    while not second_cell.exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, first.stderr.read()  # killed mid-sweep, in the second cell's training
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = [json.loads(line) for line in (out / "sweep.log").read_text().splitlines()]
    done_before = {e["task"] for e in before if e["event"] == "done"}
    assert {"train synthetic-patches-002", "eval synthetic-patches-002"} <= done_before
    assert "train synthetic-patches-003" not in done_before

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    events = [json.loads(line) for line in (out / "sweep.log").read_text().splitlines()]
    after = events[len(before) :]
    done = [e["task"] for e in events if e["event"] == "done"]
    tasks = [t.name for t in reproduce.plan("patches", ["synthetic"], 1, [2, 3, 4])]
    assert sorted(done) == sorted(tasks)  # every task finished exactly once
    assert not {e["task"] for e in after} & done_before  # a finished task is never started again
    assert re.search(r"task 3/6 \(train synthetic-patches-003\), 2 done", again.stderr)
    _check_report_against_cells(out, ["synthetic-patches-002", "synthetic-patches-003", "synthetic-patches-004"])


def test_the_memory_figures_of_the_docs_are_the_estimators():
    """docs/reproduce.md's step memory per patch count, and the largest patch count an H100 (78 GiB free) and an H200
    (139 GiB free) take, are what empssl.training.memory estimates for the recipe's step."""
    from empssl.training.memory import estimate_step_memory, gib

    text = " ".join(open(os.path.join(os.path.dirname(__file__), "..", "docs", "reproduce.md")).read().split())
    stated = dict(re.findall(r"(\d+) patches ([0-9.]+ GiB)", text))
    assert set(stated) == {"20", "50", "100", "200"}
    for patches, figure in stated.items():
        need = estimate_step_memory(
            arch="resnet18-cifar",
            width=1.0,
            hidden_dim=4096,
            z_dim=1024,
            image_size=32,
            batch_size=100,
            num_patches=int(patches),
            bf16=True,
        )
        assert gib(need.total) == figure, patches
    h100, h200 = (need.largest_num_patches(free * 2**30, 100) for free in (78, 139))
    assert f"at most {h100} patches fit" in text and f"(about 139 GiB free) up to {h200}." in text
    assert h100 < 200 <= h200  # the 200-patch cell: refused on an H100, taken on an H200


def test_eval_args_without_the_reported_view_are_refused_and_cut_cells_are_not_set_beside_the_paper(tmp_path):
    import argparse

    from empssl.cli.main import parse_command

    args = argparse.Namespace(
        out_dir=str(tmp_path), experiment="one-epoch", dataset=["cifar10"], epochs=1, patches=[20], root="data",
        device="cpu", train_args="", eval_args="--views whole", no_progress=True,
    )  # fmt: skip
    with pytest.raises(
        reproduce.SweepError, match="--views whole leaves out the bag of patches the report shows; use both"
    ):
        reproduce.Sweep(args, None, parse_command).check_commands()  # before any cell: nothing written
    assert os.listdir(tmp_path) == []
    for train_args, paper in (("", 0.842), ("--max-steps 5", None)):
        args = argparse.Namespace(**{**vars(args), "train_args": train_args, "eval_args": "--views both"})
        sweep = reproduce.Sweep(args, None, parse_command)
        sweep.check_commands()
        for task in sweep.tasks:  # the files a finished cell holds
            os.makedirs(sweep.cell_dir(task.cell), exist_ok=True)
            done = {"linear_top1": 0.5, "knn_top1": 0.4} if task.kind == "eval" else {"epochs": 1, "seconds": 2.0}
            (tmp_path / task.cell / (reproduce.EVAL_DONE if task.kind == "eval" else reproduce.TRAIN_DONE)).write_text(
                json.dumps(done)
            )
        optimised = report.rows(sweep)[1]
        assert optimised["cell"] == "cifar10-optimised" and optimised["published"] == paper
        shown = _table(report.markdown(sweep, report.rows(sweep)))[1]
        assert shown["epochs (schedule)"] == ("1 (2)" if paper else "1 (2), at most 5 steps")
        assert shown["published %"] == ("84.2" if paper else "")


@pytest.mark.parametrize(
    "experiment, options, message",
    [
        ("one-epoch", ["--epochs", "5", "--patches", "50"], "it takes no --epochs or --patches"),
        ("one-epoch", ["--patches", "50"], "it takes no --patches (the patches experiment varies them)"),
        ("convergence", ["--patches", "20,50"], "convergence trains at one patch count"),
        ("transfer", ["--patches", "20,50"], "transfer trains at one patch count"),
        ("patches", ["--patches", "20,20"], "--patches 20,20 repeats a patch count"),
    ],
)
def test_options_an_experiment_would_ignore_are_refused(tmp_path, capsys, experiment, options, message):
    out = tmp_path / "sweep"
    assert _reproduce([experiment, "--dataset", "a", "--dataset", "b", "--out-dir", str(out), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("empssl reproduce: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_the_memory_check_reads_a_config_file_inside_train_args(tmp_path, capsys, monkeypatch):
    import argparse

    from empssl.cli.main import parse_command
    from empssl.training import memory

    (tmp_path / "big.toml").write_text("[training]\nbatch_size = 400\n")
    common = dict(arch="resnet18-cifar", width=1.0, hidden_dim=4096, z_dim=1024, image_size=32, num_patches=2)
    small, big = (memory.estimate_step_memory(**common, batch_size=b, bf16=False).total for b in (100, 400))
    monkeypatch.setattr(memory, "available_memory", lambda device: (small + big) // 2)  # the file's batch cannot fit
    args = argparse.Namespace(
        out_dir=str(tmp_path / "sweep"), experiment="patches", dataset=["synthetic"], epochs=1, patches=[2],
        root="data", device="cpu", train_args=f"--config {tmp_path / 'big.toml'}", eval_args="", no_progress=True,
    )  # fmt: skip
    sweep = reproduce.Sweep(args, None, parse_command)
    with pytest.raises(reproduce.SweepError, match="cell synthetic-patches-002 cannot fit"):
        reproduce.check_memory(sweep)
    assert f"2 patches: {memory.gib(big)}, does not fit" in capsys.readouterr().err
