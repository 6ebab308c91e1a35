"""The report of an ``empssl reproduce`` sweep: report.md (measured beside published, time, hardware and
versions), report.json (the same rows, for tools and tests) and the plots (accuracy per epoch; accuracy and
time per patch count), all built from the cells' own eval.json and train.json."""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from typing import Any, Dict, List, Optional

from . import published

REPORT_MD, REPORT_JSON, EPOCHS_PNG, PATCHES_PNG = "report.md", "report.json", "accuracy_per_epoch.png", "patches.png"


def _read(path: str) -> Dict[str, Any]:
    from ..files import open_input

    with open_input(path, "the sweep's file") as f:
        return json.load(f)


def rows(sweep) -> List[Dict[str, Any]]:
    """One row per evaluation of the sweep, from the files its cells hold."""
    table = []
    for task in sweep.tasks:
        if task.kind != "eval":
            continue
        result = _read(os.path.join(sweep.cell_dir(task.cell), "eval.json"))
        trained = _read(os.path.join(sweep.cell_dir(task.source), "train.json"))
        # a cell cut short by --max-steps did not train the recipe: no published number beside it
        full = task.dataset == task.trained_on and sweep.max_steps is None
        paper, source = published.linear_probe(task.dataset, task.recipe) if full else (None, "")
        table.append(
            {
                "cell": task.cell,
                "trained_on": task.trained_on,
                "evaluated_on": task.dataset,
                "epochs": task.recipe.epochs,
                "schedule_epochs": task.recipe.schedule_epochs,
                "num_patches": task.recipe.num_patches,
                "max_steps": sweep.max_steps,
                "linear_top1": result["linear_top1"],
                "knn_top1": result["knn_top1"],
                "published": paper,
                "published_source": source,
                "difference": None if paper is None else result["linear_top1"] - paper,
                "train_seconds": trained.get("seconds", 0.0),
                "eval_seconds": result.get("seconds", 0.0),
            }
        )
    return table


def _hardware(device: str) -> str:
    import torch

    from ..device import resolve_device

    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return f"{torch.cuda.get_device_name(resolved)} (CUDA {torch.version.cuda})"
    processor = " ".join(part for part in (platform.machine(), platform.processor()) if part)
    return f"CPU {processor}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _versions() -> str:
    import torch

    from .. import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return (
        f"empssl {__version__}, torch {torch.__version__}, triton {triton_version}, Python {platform.python_version()}"
    )


def _percent(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def markdown(sweep, table: List[Dict[str, Any]]) -> str:
    lines = [
        f"# empssl reproduce {sweep.args.experiment}",
        "",
        f"- run: {time.strftime('%Y-%m-%d %H:%M')}, in `{sweep.out_dir}`",
        f"- hardware: {_hardware(sweep.args.device)}",
        f"- versions: {_versions()}",
        f"- published: {published.SOURCE}; empty where the paper has no number for the cell",
        f"- options: train {' '.join(sweep.train_args) or '(defaults)'}; "
        f"eval {' '.join(sweep.eval_args) or '(defaults)'}",
        "",
        "| cell | trained on | evaluated on | epochs (schedule) | patches | linear top-1 % | published % | "
        "difference (points) | kNN top-1 % | train time | eval time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        cut = "" if row["max_steps"] is None else f", at most {row['max_steps']} steps"
        lines.append(
            f"| {row['cell']} | {row['trained_on']} | {row['evaluated_on']} | {row['epochs']} "
            f"({row['schedule_epochs']}){cut} | {row['num_patches']} | {_percent(row['linear_top1'])} | "
            f"{_percent(row['published'])} | {_percent(row['difference'], signed=True)} | "
            f"{_percent(row['knn_top1'])} | {_duration(row['train_seconds'])} | {_duration(row['eval_seconds'])} |"
        )
    return "\n".join(lines) + "\n"


def epochs_figure(table: List[Dict[str, Any]]):
    """Linear-probe and kNN accuracy against epoch, one line each per data set; published points as markers."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for dataset in dict.fromkeys(row["trained_on"] for row in table):
        mine = [row for row in table if row["trained_on"] == dataset]
        epochs = [row["epochs"] for row in mine]
        ax.plot(epochs, [100 * row["linear_top1"] for row in mine], marker="o", label=f"{dataset} linear probe")
        ax.plot(epochs, [100 * row["knn_top1"] for row in mine], marker=".", linestyle="--", label=f"{dataset} kNN")
        paper = [(row["epochs"], 100 * row["published"]) for row in mine if row["published"] is not None]
        if paper:
            ax.plot(*zip(*paper), marker="*", markersize=12, linestyle="none", label=f"{dataset} published")
    ax.set_xticks(sorted({row["epochs"] for row in table}))
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return figure


def patches_figure(table: List[Dict[str, Any]]):
    """Accuracy (left) and training time (right) against the patch count, one line per data set."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy, seconds = figure.subplots(1, 2)
    for dataset in dict.fromkeys(row["trained_on"] for row in table):
        mine = [row for row in table if row["trained_on"] == dataset]
        patches = [row["num_patches"] for row in mine]
        accuracy.plot(patches, [100 * row["linear_top1"] for row in mine], marker="o", label=f"{dataset} linear probe")
        seconds.plot(patches, [row["train_seconds"] for row in mine], marker="o", label=dataset)
    counts = sorted({row["num_patches"] for row in table})
    accuracy.set(xlabel="patches per image", ylabel="top-1 accuracy (%)", title="accuracy", xticks=counts)
    seconds.set(xticks=counts)
    seconds.set(xlabel="patches per image", ylabel="training time (s)", title="time")
    for ax in (accuracy, seconds):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return figure


def write_report(sweep) -> str:
    """Write report.md, report.json and the experiment's plot into the sweep's folder; returns the markdown."""
    from ..files import write_atomically

    table = rows(sweep)
    text = markdown(sweep, table)
    plot = None
    try:
        import matplotlib  # noqa: F401

        if sweep.args.experiment == "convergence":
            plot = (EPOCHS_PNG, epochs_figure(table))
        elif sweep.args.experiment == "patches":
            plot = (PATCHES_PNG, patches_figure(table))
    except ImportError:
        text += "\n(no plot: matplotlib is not installed)\n"
    if plot is not None:
        name, figure = plot
        try:
            write_atomically(os.path.join(sweep.out_dir, name), lambda f: figure.savefig(f, format="png", dpi=100))
            text += f"\n![{sweep.args.experiment}]({name})\n"
        except Exception as err:  # an optional output: the report's table still lands
            warnings.warn(f"{os.path.join(sweep.out_dir, name)} was not written ({type(err).__name__}: {err})")
            text += f"\n(no plot: {name} could not be written)\n"
    write_atomically(os.path.join(sweep.out_dir, REPORT_MD), lambda f: f.write(text.encode()))
    write_atomically(
        os.path.join(sweep.out_dir, REPORT_JSON),
        lambda f: f.write(json.dumps({"experiment": sweep.args.experiment, "rows": table}, indent=1).encode()),
    )
    return text
