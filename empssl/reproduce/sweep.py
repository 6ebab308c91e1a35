"""``empssl reproduce EXPERIMENT``: the paper's experiments as resumable sweeps, with a report beside the
published numbers (empssl.reproduce.published).

An experiment is a list of tasks over cells. A cell is a folder under ``--out-dir``: a normal run folder
(``empssl train`` writes checkpoint.pt and metrics.jsonl there) with the ``empssl eval --json`` result
beside it (eval.json, eval.txt), so any cell can be inspected, resumed or re-evaluated by hand with the
commands in its commands.txt. The sweep's own files: sweep.json (the experiment and every option that
decides a cell's result: a restart with other values is refused, so no two settings mix in one folder),
sweep.log (one JSON line per task started and finished), report.md, report.json and the plots.

Every cell's command is parsed and checked by the real ``empssl train`` / ``empssl eval`` parsers before any cell
runs, and ``--train-args`` / ``--eval-args`` may not change the options that define a cell (its data set, patches,
epochs, folders). Started again with the same command, a sweep skips finished tasks (train.json / eval.json mark
them) and resumes an unfinished training from its last checkpoint. ``--train-args`` or ``--eval-args`` corrected
after a failure continue the sweep as long as no cell of their kind has started with the old ones.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..files import append_text, open_input, remove_stale_temporaries, write_atomically
from ..training.run_folder import CHECKPOINT_NAME, METRICS_NAME
from ..training.run_lock import LOCK_NAME
from .published import Recipe, dataset_arguments

EXPERIMENTS = {
    "one-epoch": "one epoch at 20 patches, with a 1-epoch schedule and optimised for 1 epoch (a 2-epoch schedule)",
    "convergence": "one run of E epochs (default 10), the checkpoint of every epoch evaluated",
    "patches": "patches per image n in 20, 50, 100, 200: accuracy and time against n",
    "transfer": "trained on each data set, linearly evaluated on each (CIFAR-10 <-> CIFAR-100)",
}
SWEEP_FILE, LOG_FILE, TRAIN_DONE, EVAL_DONE = "sweep.json", "sweep.log", "train.json", "eval.json"
# the parsed options that define a cell: --train-args / --eval-args may not change them
CELL_OPTIONS = {
    "train": (
        "dataset",
        "root",
        "device",
        "num_patches",
        "epochs",
        "schedule_epochs",
        "out_dir",
        "resume",
        "overwrite",
    ),
    "eval": ("checkpoint", "random_init", "dataset", "root", "device", "json"),
}
# options of the sweep's identity that may change while no cell of their kind has started
CORRECTABLE = {"train_args": "train", "eval_args": "eval"}


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


def cell_prefix(dataset: str) -> str:
    """A folder name for a data set's cells: the spec (``cifar10``), or its kind and its path's last part."""
    kind, _, path = dataset.partition(":")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{kind}-{os.path.basename(os.path.normpath(path))}" if path else kind)


def plan(experiment: str, datasets: List[str], epochs: int, patches: List[int]) -> List[Task]:
    """The tasks of an experiment, in the order they run."""
    prefixes = [cell_prefix(dataset) for dataset in datasets]
    if len(set(prefixes)) < len(prefixes):
        raise SweepError(
            f"the data sets {', '.join(datasets)} would share cell folders ({', '.join(prefixes)}): give them folders "
            f"of different names"
        )
    name = dict(zip(datasets, prefixes))
    tasks: List[Task] = []
    if experiment == "one-epoch":
        for dataset in datasets:
            for label, schedule in (("schedule-1", 1), ("optimised", 2)):
                train = _train_cell(dataset, Recipe(1, schedule, 20), f"{name[dataset]}-{label}")
                tasks += [train, _eval_cell(train, dataset)]
    elif experiment == "convergence":
        for dataset in datasets:
            run = f"{name[dataset]}-run"
            for epoch in range(1, epochs + 1):
                recipe = Recipe(epoch, epochs, patches[0])
                tasks.append(_train_cell(dataset, recipe, run))
                snapshot = Task(
                    "snapshot", f"{name[dataset]}-epoch-{epoch:03d}", dataset, recipe, source=run, trained_on=dataset
                )
                tasks += [snapshot, _eval_cell(snapshot, dataset)]
    elif experiment == "patches":
        for dataset in datasets:
            for n in patches:
                train = _train_cell(dataset, Recipe(epochs, epochs, n), f"{name[dataset]}-patches-{n:03d}")
                tasks += [train, _eval_cell(train, dataset)]
    elif experiment == "transfer":
        schedule = 2 if epochs == 1 else epochs  # one epoch: the authors' 1-epoch recipe (a 2-epoch schedule)
        trains = [
            _train_cell(dataset, Recipe(epochs, schedule, patches[0]), f"{name[dataset]}-train") for dataset in datasets
        ]
        tasks += trains
        for train in trains:
            tasks += [_eval_cell(train, target, f"{name[train.dataset]}-to-{name[target]}") for target in datasets]
    else:
        raise SweepError(f"unknown experiment {experiment!r}; choose from {', '.join(EXPERIMENTS)}")
    return tasks


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open_input(path, "the sweep's file") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None  # absent, cut by a kill, or not a regular file: the task is not done
    return value if isinstance(value, dict) else None


def _write_json(path: str, value: Any) -> None:
    write_atomically(path, lambda f: f.write((json.dumps(value, indent=1, sort_keys=True) + "\n").encode()))


class Sweep:
    """The tasks of one experiment in one folder: what is done, running the rest, and the log."""

    def __init__(
        self,
        args: argparse.Namespace,
        run_command: Callable[[List[str]], int],
        parse_command: Optional[Callable[[List[str]], Dict[str, Any]]] = None,
    ):
        self.args, self.run_command, self.parse_command = args, run_command, parse_command
        self.out_dir = os.path.abspath(args.out_dir)
        self.tasks = plan(args.experiment, args.dataset, args.epochs, args.patches)
        self.train_args, self.eval_args = shlex.split(args.train_args), shlex.split(args.eval_args)
        self.times: Dict[str, List[float]] = {"train": [], "eval": []}  # seconds per unit of work, by kind
        self.max_steps: Optional[int] = None  # --train-args' --max-steps (read by check_commands): cells cut short

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
            changed = {key for key, value in mine.items() if stored.get(key) != value}
            fixed = [key for key in changed if key not in CORRECTABLE or self.started(CORRECTABLE[key])]
            if fixed:
                shown = "; ".join(f"{key}: {stored.get(key)!r} -> {mine[key]!r}" for key in sorted(fixed))
                raise SweepError(
                    f"--out-dir {self.out_dir} holds another sweep ({shown}); its cells would "
                    f"mix with this one's. Rerun its own command to continue it, or pass another --out-dir"
                )
            for key in sorted(changed):
                print(
                    f"empssl reproduce: note: continuing the sweep in {self.out_dir} with the corrected "
                    f"--{key.replace('_', '-')} (no {CORRECTABLE[key]} cell ran with the old ones)",
                    file=sys.stderr,
                )
        elif os.path.isdir(self.out_dir) and set(os.listdir(self.out_dir)) - {LOCK_NAME}:
            raise SweepError(f"--out-dir {self.out_dir} is not empty and holds no sweep; pass an empty or new folder")

    def started(self, kind: str) -> bool:
        """Whether a cell of ``kind`` (train: trainings and their snapshots; eval) has started or finished."""
        marks = {"train": (CHECKPOINT_NAME, METRICS_NAME, TRAIN_DONE), "eval": (EVAL_DONE, "eval.txt")}[kind]
        kinds = ("train", "snapshot") if kind == "train" else ("eval",)
        return any(
            os.path.exists(os.path.join(self.cell_dir(task.cell), mark))
            for task in self.tasks
            if task.kind in kinds
            for mark in marks
        )

    def check_commands(self) -> None:
        """SweepError, before any cell runs, unless every cell's command parses with the real parsers (its values
        checked as the command checks them) and --train-args / --eval-args leave the options of the cell as given."""
        if self.parse_command is None:
            return
        for task in self.tasks:
            if task.kind == "snapshot":
                continue
            extra = self.train_args if task.kind == "train" else self.eval_args
            option = f"--{task.kind}-args {shlex.join(extra)!r}"
            command = self.train_command if task.kind == "train" else self.eval_command
            try:
                parsed = self.parse_command(command(task))
            except ValueError as err:
                raise SweepError(f"{option}: {err}") from None
            if task.kind == "train":
                self.max_steps = parsed.get("max_steps")
            elif parsed.get("views") == "whole":  # the report's column is the bag of patches' linear probe
                raise SweepError(f"{option}: --views whole leaves out the bag of patches the report shows; use both")
            base = self.parse_command(command(task, extra=False))
            overridden = ["--" + n.replace("_", "-") for n in CELL_OPTIONS[task.kind] if parsed.get(n) != base.get(n)]
            if overridden:
                raise SweepError(
                    f"{option} changes {', '.join(overridden)}, which the sweep sets for each cell; leave "
                    f"{'it' if len(overridden) == 1 else 'them'} out (the sweep's own options choose them)"
                )

    def record(self) -> None:
        """sweep.json: from now on the folder is this sweep's (a killed write's temporaries removed)."""
        os.makedirs(self.out_dir, exist_ok=True)
        remove_stale_temporaries(self.out_dir)
        _write_json(os.path.join(self.out_dir, SWEEP_FILE), self.identity())

    def log(self, event: str, task: Task, **extra) -> None:
        line = json.dumps({"event": event, "task": task.name, "time": time.time(), **extra}) + "\n"
        append_text(os.path.join(self.out_dir, LOG_FILE), line, "the sweep's log")

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
    def train_command(self, task: Task, extra: bool = True) -> List[str]:
        """The cell's ``empssl train`` command (``extra``: with --train-args)."""
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
            *dataset_arguments(task.dataset, self.train_args if extra else []),
            *(self.train_args if extra else []),
        ]
        if self.args.no_progress:
            command.append("--no-progress")
        checkpoint = os.path.join(folder, CHECKPOINT_NAME)
        if os.path.exists(checkpoint):  # a stage of convergence, or a cell a kill interrupted: continue it
            command += ["--resume", checkpoint]
        elif os.path.exists(os.path.join(folder, METRICS_NAME)):
            command.append("--overwrite")  # killed before its first checkpoint: nothing to continue
        return command

    def eval_command(self, task: Task, extra: bool = True) -> List[str]:
        """The cell's ``empssl eval`` command (``extra``: with --eval-args)."""
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
            *(self.eval_args if extra else []),
        ]
        if self.args.no_progress:
            command.append("--no-progress")
        return command

    def run(self, task: Task) -> None:
        folder = self.cell_dir(task.cell)
        os.makedirs(folder, exist_ok=True)
        remove_stale_temporaries(folder)  # of a killed write of this cell's files
        start = time.perf_counter()
        if task.kind == "snapshot":
            source = os.path.join(self.cell_dir(task.source), CHECKPOINT_NAME)
            # the run's time so far goes with its checkpoint: the report's time for this epoch
            _write_json(
                os.path.join(folder, TRAIN_DONE),
                {"epochs": task.recipe.epochs, "seconds": _run_seconds(self.cell_dir(task.source))},
            )
            with open_input(source, "checkpoint") as src:
                write_atomically(os.path.join(folder, CHECKPOINT_NAME), lambda f: shutil.copyfileobj(src, f))
            return
        command = self.train_command(task) if task.kind == "train" else self.eval_command(task)
        append_text(os.path.join(folder, "commands.txt"), "empssl " + shlex.join(command) + "\n", "the cell's commands")
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
            write_atomically(os.path.join(folder, "eval.txt"), lambda f: f.write(printed.encode()))
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
    """Say, before any cell runs, which training cells fit on the device (the estimate of each patch count's step
    beside the memory available), and refuse the sweep naming every cell that does not, with the largest patch
    count that fits: the trainer's own check (check_step_fits) on each cell's command as `empssl train` parses it
    (``sweep.parse_command``, a --config inside --train-args included; without it, nothing to check)."""
    from ..config import TrainConfig
    from ..data.load import recipe_patch_size
    from ..device import resolve_device
    from ..options import from_args
    from ..training.memory import available_memory, check_step_fits, estimate_step_memory, gib

    if sweep.parse_command is None:
        return
    device = resolve_device(sweep.args.device)
    # one estimate per kind of cell: its patch count, its patch size and the rest of its configuration
    kinds: Dict[Tuple[int, int, str], Tuple[TrainConfig, List[str]]] = {}  # a configuration and its cells
    for task in sweep.tasks:
        if task.kind == "train":
            cell = from_args(TrainConfig, argparse.Namespace(**sweep.parse_command(sweep.train_command(task))))
            patch_size = cell.patch_size or recipe_patch_size(task.dataset, cell.image_size)
            shape = repr((cell.model_config(), cell.batch_size, cell.bf16))
            kinds.setdefault((cell.num_patches, patch_size, shape), (cell, []))[1].append(task.cell)
    refused: Dict[Tuple[int, int, str], str] = {}
    lines = []
    for kind in sorted(kinds):
        (num_patches, patch_size, _), cell = kind, kinds[kind][0]
        try:
            check_step_fits(cell, device, patch_size)
        except ValueError as err:
            refused[kind] = str(err)
        try:
            need = gib(
                estimate_step_memory(
                    **cell.model_config(),
                    image_size=patch_size,
                    batch_size=cell.batch_size,
                    num_patches=num_patches,
                    bf16=cell.bf16 and device.type == "cuda",
                ).total
            )
        except (RuntimeError, OverflowError, ValueError):
            need = "more than any device"
        of = f" of {patch_size}x{patch_size}" if len({size for _, size, _ in kinds}) > 1 else ""
        lines.append(f"{num_patches} patches{of}: {need}, {'does not fit' if kind in refused else 'fits'}")
    available = available_memory(device)
    if lines:
        where = f"{device} ({gib(available)} available)" if available is not None else f"{device}"
        print(f"empssl reproduce: a training step on {where}: " + "; ".join(lines), file=sys.stderr, flush=True)
    if refused:
        cells = [cell for kind in sorted(refused) for cell in kinds[kind][1]]
        first = refused[min(refused)]
        raise SweepError(
            f"cell {cells[0]} cannot fit: {first}"
            + (f" (the cells that cannot fit: {', '.join(cells)})" if len(cells) > 1 else "")
        )
