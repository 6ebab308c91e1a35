"""``empssl reproduce EXPERIMENT``: the paper's experiments as resumable sweeps, with a report beside the
published numbers (empssl.reproduce.published).

An experiment is a list of tasks over cells. A cell is a folder under ``--out-dir``: a normal run folder
(``empssl train`` writes checkpoint.pt and metrics.jsonl there) with the ``empssl eval --json`` result
beside it (eval.json, eval.txt), so any cell can be inspected, resumed or re-evaluated by hand with the
commands in its commands.txt. The sweep's own files: sweep.json (the experiment and every option that
decides a cell's result: a restart with other values is refused, so no two settings mix in one folder),
sweep.log (one JSON line per task started and finished), report.md, report.json and the plots.

Started again with the same command, a sweep skips finished tasks (train.json / eval.json mark them)
and resumes an unfinished training from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shlex
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from ..files import check_writable_folder
from ..training.run_folder import CHECKPOINT_NAME, LOCK_NAME, METRICS_NAME, RunLock
from .published import Recipe

EXPERIMENTS = {
    "one-epoch": "one epoch at 20 patches, with a 1-epoch schedule and optimised for 1 epoch (a 2-epoch schedule)",
    "convergence": "one run of E epochs (default 10), the checkpoint of every epoch evaluated",
    "patches": "patches per image n in 20, 50, 100, 200: accuracy and time against n",
    "transfer": "trained on each data set, linearly evaluated on each (CIFAR-10 <-> CIFAR-100)",
}
SWEEP_FILE, LOG_FILE, TRAIN_DONE, EVAL_DONE = "sweep.json", "sweep.log", "train.json", "eval.json"


class SweepError(ValueError):
    """The sweep cannot start or go on; the message says why and what to do."""


@dataclasses.dataclass
class Task:
    """One step of a sweep: ``train`` a cell up to ``recipe.epochs``, ``snapshot`` its checkpoint into
    ``cell`` (a convergence epoch), or ``eval`` the checkpoint of ``source`` on ``dataset`` into ``cell``."""

    kind: str
    cell: str
    dataset: str
    recipe: Recipe
    source: str = ""
    trained_on: str = ""

    @property
    def name(self) -> str:
        return f"{self.kind} {self.cell}"


def _train_cell(dataset: str, recipe: Recipe, cell: str) -> Task:
    return Task("train", cell, dataset, recipe)


def _eval_cell(source: Task, dataset: str, cell: Optional[str] = None) -> Task:
    return Task("eval", cell or source.cell, dataset, source.recipe, source=source.cell, trained_on=source.dataset)


def plan(experiment: str, datasets: List[str], epochs: int, patches: List[int]) -> List[Task]:
    """The tasks of an experiment, in the order they run."""
    tasks: List[Task] = []
    if experiment == "one-epoch":
        for dataset in datasets:
            for label, schedule in (("schedule-1", 1), ("optimised", 2)):
                train = _train_cell(dataset, Recipe(1, schedule, 20), f"{dataset}-{label}")
                tasks += [train, _eval_cell(train, dataset)]
    elif experiment == "convergence":
        for dataset in datasets:
            run = f"{dataset}-run"
            for epoch in range(1, epochs + 1):
                recipe = Recipe(epoch, epochs, patches[0])
                tasks.append(_train_cell(dataset, recipe, run))
                snapshot = Task(
                    "snapshot", f"{dataset}-epoch-{epoch:03d}", dataset, recipe, source=run, trained_on=dataset
                )
                tasks += [snapshot, _eval_cell(snapshot, dataset)]
    elif experiment == "patches":
        for dataset in datasets:
            for n in patches:
                train = _train_cell(dataset, Recipe(epochs, epochs, n), f"{dataset}-patches-{n:03d}")
                tasks += [train, _eval_cell(train, dataset)]
    elif experiment == "transfer":
        schedule = 2 if epochs == 1 else epochs  # one epoch: the authors' 1-epoch recipe (a 2-epoch schedule)
        trains = [
            _train_cell(dataset, Recipe(epochs, schedule, patches[0]), f"{dataset}-train") for dataset in datasets
        ]
        tasks += trains
        for train in trains:
            tasks += [_eval_cell(train, target, f"{train.dataset}-to-{target}") for target in datasets]
    else:
        raise SweepError(f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")
    return tasks


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # absent, or cut by a kill: the task is not done


def _write_json(path: str, value: Any) -> None:
    from ..files import write_atomically

    write_atomically(path, lambda f: f.write((json.dumps(value, indent=1, sort_keys=True) + "\n").encode()))


class Sweep:
    """The tasks of one experiment in one folder: what is done, running the rest, and the log."""

    def __init__(self, args: argparse.Namespace, run_command: Callable[[List[str]], int]):
        self.args, self.run_command = args, run_command
        self.out_dir = os.path.abspath(args.out_dir)
        self.tasks = plan(args.experiment, args.dataset, args.epochs, args.patches)
        self.train_args, self.eval_args = shlex.split(args.train_args), shlex.split(args.eval_args)
        self.times: Dict[str, List[float]] = {"train": [], "eval": []}  # seconds per unit of work, by kind

    # -- identity: a restart must be the same sweep -------------------------------------------------------
    def identity(self) -> Dict[str, Any]:
        a = self.args
        return {
            "experiment": a.experiment,
            "datasets": a.dataset,
            "epochs": a.epochs,
            "patches": a.patches,
            "root": a.root,
            "device": a.device,
            "train_args": self.train_args,
            "eval_args": self.eval_args,
        }

    def check_folder(self) -> None:
        """SweepError unless the folder is new, empty, or holds this very sweep."""
        path = os.path.join(self.out_dir, SWEEP_FILE)
        stored = _read_json(path) if os.path.exists(path) else None
        if os.path.exists(path) and stored is None:
            raise SweepError(
                f"{path} is unreadable; it is this folder's record of its sweep: remove the folder or pass "
                f"another --out-dir"
            )
        mine = self.identity()
        if stored is not None:
            changed = [
                f"{key}: {stored.get(key)!r} -> {value!r}" for key, value in mine.items() if stored.get(key) != value
            ]
            if changed:
                raise SweepError(
                    f"--out-dir {self.out_dir} holds another sweep ({'; '.join(changed)}); its cells would "
                    f"mix with this one's. Rerun its own command to continue it, or pass another --out-dir"
                )
        elif os.path.isdir(self.out_dir) and set(os.listdir(self.out_dir)) - {LOCK_NAME}:
            raise SweepError(f"--out-dir {self.out_dir} is not empty and holds no sweep; pass an empty or new folder")

    def record(self) -> None:
        """sweep.json: from now on the folder is this sweep's."""
        os.makedirs(self.out_dir, exist_ok=True)
        _write_json(os.path.join(self.out_dir, SWEEP_FILE), self.identity())

    def log(self, event: str, task: Task, **extra) -> None:
        with open(os.path.join(self.out_dir, LOG_FILE), "a") as f:
            f.write(json.dumps({"event": event, "task": task.name, "time": time.time(), **extra}) + "\n")

    # -- what is done --------------------------------------------------------------------------------------
    def cell_dir(self, cell: str) -> str:
        return os.path.join(self.out_dir, cell)

    def done(self, task: Task) -> bool:
        folder = self.cell_dir(task.cell)
        if task.kind == "train":
            record = _read_json(os.path.join(folder, TRAIN_DONE))
            return record is not None and record.get("epochs", 0) >= task.recipe.epochs
        if task.kind == "snapshot":
            return os.path.exists(os.path.join(folder, CHECKPOINT_NAME))
        return _read_json(os.path.join(folder, EVAL_DONE)) is not None

    # -- running ---------------------------------------------------------------------------------------------
    def train_command(self, task: Task) -> List[str]:
        folder = self.cell_dir(task.cell)
        command = [
            "train",
            "--dataset",
            task.dataset,
            "--root",
            self.args.root,
            "--device",
            self.args.device,
            "--num-patches",
            str(task.recipe.num_patches),
            "--epochs",
            str(task.recipe.epochs),
            "--schedule-epochs",
            str(task.recipe.schedule_epochs),
            "--out-dir",
            folder,
            *self.train_args,
        ]
        if self.args.no_progress:
            command.append("--no-progress")
        checkpoint = os.path.join(folder, CHECKPOINT_NAME)
        if os.path.exists(checkpoint):  # a stage of convergence, or a cell a kill interrupted: continue it
            command += ["--resume", checkpoint]
        elif os.path.exists(os.path.join(folder, METRICS_NAME)):
            command.append("--overwrite")  # killed before its first checkpoint: nothing to continue
        return command

    def eval_command(self, task: Task) -> List[str]:
        checkpoint = os.path.join(self.cell_dir(task.source), CHECKPOINT_NAME)
        command = [
            "eval",
            "--checkpoint",
            checkpoint,
            "--dataset",
            task.dataset,
            "--root",
            self.args.root,
            "--device",
            self.args.device,
            "--json",
            *self.eval_args,
        ]
        if self.args.no_progress:
            command.append("--no-progress")
        return command

    def run(self, task: Task) -> None:
        folder = self.cell_dir(task.cell)
        os.makedirs(folder, exist_ok=True)
        start = time.perf_counter()
        if task.kind == "snapshot":
            from ..files import write_atomically

            source = os.path.join(self.cell_dir(task.source), CHECKPOINT_NAME)
            # the run's time so far goes with its checkpoint: the report's time for this epoch
            _write_json(
                os.path.join(folder, TRAIN_DONE),
                {"epochs": task.recipe.epochs, "seconds": _run_seconds(self.cell_dir(task.source))},
            )
            with open(source, "rb") as src:
                write_atomically(os.path.join(folder, CHECKPOINT_NAME), lambda f: shutil.copyfileobj(src, f))
            return
        command = self.train_command(task) if task.kind == "train" else self.eval_command(task)
        with open(os.path.join(folder, "commands.txt"), "a") as f:
            f.write("empssl " + shlex.join(command) + "\n")
        if task.kind == "train":
            code = self.run_command(command)
            self._check_exit(task, code)
            _write_json(
                os.path.join(folder, TRAIN_DONE), {"epochs": task.recipe.epochs, "seconds": _run_seconds(folder)}
            )
        else:
            captured = io.StringIO()
            with contextlib.redirect_stdout(captured):
                code = self.run_command(command)
            printed = captured.getvalue()
            print(printed, end="")
            self._check_exit(task, code)
            results = json.loads(printed.strip().splitlines()[-1])
            with open(os.path.join(folder, "eval.txt"), "w") as f:
                f.write(printed)
            _write_json(
                os.path.join(folder, EVAL_DONE),
                {
                    **results,
                    "seconds": time.perf_counter() - start,
                    "trained_on": task.trained_on,
                    "evaluated_on": task.dataset,
                },
            )

    def _check_exit(self, task: Task, code: int) -> None:
        if code != 0:
            raise SweepStopped(
                code,
                f"{task.name}: empssl {task.kind} exited with {code} (its message is above); "
                f"run the same `empssl reproduce` command again to continue from there",
            )

    def work(self, task: Task) -> float:
        """A task's size, for the time left: patches trained or evaluated."""
        if task.kind == "train":
            return task.recipe.num_patches * task.recipe.epochs
        return 1.0 if task.kind == "eval" else 0.0


class SweepStopped(RuntimeError):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _run_seconds(folder: str) -> float:
    from ..training.run_folder import read_step_metrics

    records = read_step_metrics(os.path.join(folder, METRICS_NAME))
    return float(records[-1].get("elapsed_s", 0.0)) if records else 0.0


def check_memory(sweep: Sweep) -> None:
    """Refuse, before any cell runs, a training cell whose step cannot fit on the device (the trainer's own check,
    empssl.training.memory.check_step_fits, on each cell's configuration)."""
    from ..config import TrainConfig, add_options, from_args
    from ..device import resolve_device
    from ..training.memory import check_step_fits

    parser = argparse.ArgumentParser(add_help=False)  # the train options of --train-args, as `empssl train` reads them
    groups: Dict[str, Any] = {}
    for group in ("data", "encoder", "training", "output", "runtime"):
        add_options(parser, TrainConfig, group, groups=groups)
    known, _ = parser.parse_known_args(sweep.train_args)  # process options (--threads) are not the config's
    config = from_args(TrainConfig, known)
    device = resolve_device(sweep.args.device)
    for task in sweep.tasks:
        if task.kind == "train":
            try:
                check_step_fits(
                    dataclasses.replace(config, num_patches=task.recipe.num_patches), device, config.image_size or 32
                )
            except ValueError as err:
                raise SweepError(f"cell {task.cell} cannot fit: {err}") from None


def _eta(sweep: Sweep, remaining: List[Task], rates: Dict[str, float]) -> str:
    if any(task.kind in ("train", "eval") and task.kind not in rates for task in remaining):
        return "time left: known after the first cell of each kind"
    seconds = sum(sweep.work(task) * rates.get(task.kind, 0.0) for task in remaining)
    return f"about {seconds / 60:.0f} min left" if seconds >= 90 else f"about {seconds:.0f} s left"


def run_sweep(args: argparse.Namespace, run_command: Callable[[List[str]], int]) -> int:
    sweep = Sweep(args, run_command)
    check_writable_folder(sweep.out_dir, "--out-dir")
    with RunLock(sweep.out_dir):  # one sweep per folder, as one run per run folder
        sweep.check_folder()
        check_memory(sweep)  # before the folder is claimed: a refused sweep leaves nothing behind
        sweep.record()
        return _run_tasks(sweep, args)


def _run_tasks(sweep: Sweep, args: argparse.Namespace) -> int:
    from .report import write_report

    start = time.perf_counter()
    rates: Dict[str, float] = {}
    todo = [task for task in sweep.tasks if not sweep.done(task)]
    finished = len(sweep.tasks) - len(todo)
    for index, task in enumerate(todo):
        print(
            f"empssl reproduce {args.experiment}: task {finished + index + 1}/{len(sweep.tasks)} ({task.name}), "
            f"{finished + index} done, {_eta(sweep, todo[index:], rates)}",
            file=sys.stderr,
            flush=True,
        )
        sweep.log("start", task)
        began = time.perf_counter()
        sweep.run(task)
        took = time.perf_counter() - began
        if sweep.work(task):
            rates[task.kind] = took / sweep.work(task)  # the last cell's pace: cells of a sweep grow or shrink in order
        sweep.log("done", task, seconds=took)
    report = write_report(sweep)
    print(report)
    print(
        f"empssl reproduce {args.experiment}: {len(sweep.tasks)} tasks done ({len(todo)} in this run, "
        f"{time.perf_counter() - start:.0f} s); report in {os.path.join(sweep.out_dir, 'report.md')}",
        file=sys.stderr,
    )
    return 0


def _patch_list(text: str) -> List[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated patch counts like 20,50,100, got {text!r}"
        ) from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(
            f"patch counts must be >= 2 (the invariance term compares patches), got {text!r}"
        )
    return values


def build_parser() -> argparse.ArgumentParser:
    from ..checks import positive_int

    parser = argparse.ArgumentParser(
        prog="empssl reproduce",
        description="The paper's experiments as resumable sweeps of normal run folders, with "
        "report.md beside the published numbers. Rerun the same command to continue a stopped sweep.",
        epilog="experiments: " + "; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items()),
    )
    parser.add_argument("experiment", choices=list(EXPERIMENTS))
    parser.add_argument(
        "--dataset",
        action="append",
        default=None,
        metavar="SPEC",
        help="a data set as `empssl train` takes it; repeat for several (default: cifar10 and cifar100)",
    )
    parser.add_argument("--root", default="data", help="folder holding the CIFAR data sets (default data)")
    parser.add_argument("--out-dir", default=None, help="the sweep's folder (default runs/reproduce-EXPERIMENT)")
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="epochs of each run (default: 10 for convergence and patches, 1 for transfer)",
    )
    parser.add_argument(
        "--patches",
        type=_patch_list,
        default=None,
        help="patches per image, comma-separated (default: 20,50,100,200 for patches, else 20)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument(
        "--train-args",
        default="",
        metavar="ARGS",
        help='more `empssl train` options for every cell, quoted (e.g. "--batch-size 50")',
    )
    parser.add_argument(
        "--eval-args",
        default="",
        metavar="ARGS",
        help='more `empssl eval` options for every evaluation, quoted (e.g. "--num-patches 64")',
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars inside the cells")
    return parser


def main(argv: List[str], run_command: Callable[[List[str]], int]) -> int:
    """``empssl reproduce ARGV``; ``run_command`` runs one ``empssl`` command line in this process (empssl.cli.main,
    handed in by it: this module does not import the command line that dispatches to it)."""
    args = build_parser().parse_args(argv)
    args.dataset = args.dataset or ["cifar10", "cifar100"]
    if args.experiment == "transfer" and len(set(args.dataset)) < 2:
        print("empssl reproduce: error: transfer needs two data sets (--dataset A --dataset B)", file=sys.stderr)
        return 2
    args.epochs = args.epochs or (10 if args.experiment in ("convergence", "patches") else 1)
    args.patches = args.patches or ([20, 50, 100, 200] if args.experiment == "patches" else [20])
    args.out_dir = args.out_dir or os.path.join("runs", f"reproduce-{args.experiment}")
    try:
        return run_sweep(args, run_command)
    except SweepStopped as err:
        print(f"empssl reproduce: {err}", file=sys.stderr)
        return err.code
    except (SweepError, ValueError, OSError) as err:
        print(f"empssl reproduce: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("empssl reproduce: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
