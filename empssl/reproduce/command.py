"""``empssl reproduce EXPERIMENT [options]``: its parser, and the run of a sweep's tasks in order, each a normal
``empssl train`` or ``empssl eval`` command (``empssl.reproduce.sweep`` plans them and keeps their state)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

from ..checks import positive_int
from ..files import check_output_folder
from ..training.run_lock import RunLock
from .sweep import EXPERIMENTS, Sweep, SweepError, SweepStopped, Task, check_memory


def _eta(sweep: Sweep, remaining: List[Task], rates: Dict[str, float]) -> str:
    if any(task.kind in ("train", "eval") and task.kind not in rates for task in remaining):
        return "time left: known after the first cell of each kind"
    seconds = sum(sweep.work(task) * rates.get(task.kind, 0.0) for task in remaining)
    return f"about {seconds / 60:.0f} min left" if seconds >= 90 else f"about {seconds:.0f} s left"


def run_sweep(
    args: argparse.Namespace,
    run_command: Callable[[List[str]], int],
    parse_command: Optional[Callable[[List[str]], Dict[str, Any]]] = None,
) -> int:
    sweep = Sweep(args, run_command, parse_command)
    check_output_folder(sweep.out_dir, "--out-dir")
    sweep.check_commands()  # every cell's command, before anything is written
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


def ignored_options(args: argparse.Namespace) -> Optional[str]:
    """Why the options given do not fit the experiment (one it would ignore, a patch count given twice), or None:
    a sweep never runs other cells than the command line says."""
    if args.patches is not None and len(set(args.patches)) < len(args.patches):
        return f"--patches {','.join(map(str, args.patches))} repeats a patch count; give each once"
    if args.experiment == "one-epoch":
        recipe = {"epochs": 1, "patches": [20]}
        given = [option for option, value in recipe.items() if getattr(args, option) not in (None, value)]
        if given:
            return (
                f"one-epoch runs the paper's 1-epoch recipes at 20 patches: it takes no "
                f"{' or '.join('--' + option for option in given)} (the patches experiment varies them)"
            )
    elif args.experiment in ("convergence", "transfer") and args.patches is not None and len(args.patches) > 1:
        return f"{args.experiment} trains at one patch count: give --patches one number, not {len(args.patches)}"
    return None


def build_parser() -> argparse.ArgumentParser:

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
        help="a data set as `empssl train` takes it: cifar10, cifar100, tinyimagenet:PATH, imagenet100:PATH (the "
        "paper's four, each reported beside its published number), or any other; repeat for several (default: "
        "cifar10 and cifar100)",
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


def main(
    argv: List[str],
    run_command: Callable[[List[str]], int],
    parse_command: Optional[Callable[[List[str]], Dict[str, Any]]] = None,
) -> int:
    """``empssl reproduce ARGV``; ``run_command`` runs one ``empssl`` command line in this process, ``parse_command``
    parses and checks one (ValueError with the parser's message), returning its options (both empssl.cli's, handed
    in by it: this module does not import the command line that dispatches to it)."""
    args = build_parser().parse_args(argv)
    args.dataset = args.dataset or ["cifar10", "cifar100"]
    if args.experiment == "transfer" and len(set(args.dataset)) < 2:
        print("empssl reproduce: error: transfer needs two data sets (--dataset A --dataset B)", file=sys.stderr)
        return 2
    ignored = ignored_options(args)
    if ignored:
        print(f"empssl reproduce: error: {ignored}", file=sys.stderr)
        return 2
    args.epochs = args.epochs or (10 if args.experiment in ("convergence", "patches") else 1)
    args.patches = args.patches or ([20, 50, 100, 200] if args.experiment == "patches" else [20])
    args.out_dir = args.out_dir or os.path.join("runs", f"reproduce-{args.experiment}")
    try:
        return run_sweep(args, run_command, parse_command)
    except SweepStopped as err:
        print(f"empssl reproduce: {err}", file=sys.stderr)
        return err.code
    except (SweepError, ValueError, OSError) as err:
        print(f"empssl reproduce: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("empssl reproduce: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
