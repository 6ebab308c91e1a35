"""The parsers of ``empssl``: the options of train and eval come from the fields of ``TrainConfig`` and
``EvalConfig`` (``empssl.config``); the process's own settings (threads, the distributed timeout) are added here."""

from __future__ import annotations

import argparse

from ..checks import positive_float, thread_count
from ..config import EvalConfig, TrainConfig, add_options


def _add_process_options(parser: argparse.ArgumentParser, groups) -> None:
    """Settings of this process, not of the run (so not in the configs): --threads and --dist-timeout."""
    from ..distributed import DEFAULT_TIMEOUT_S

    groups["runtime"].add_argument(
        "--threads", type=thread_count, default=None, help="CPU threads for torch, at most the cores (default: torch's)"
    )
    groups["runtime"].add_argument(
        "--dist-timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="under torchrun: how long a rank waits for the others in a collective before "
        "it stops with an error (a rank died or stalled); rank 0's checkpoint writes "
        f"must fit in it (default {DEFAULT_TIMEOUT_S:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="empssl", description="EMP-SSL self-supervised learning: train, evaluate, inspect."
    )
    parser.add_argument("--version", action="version", version=f"empssl {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{train,eval,plot,reproduce,info,export,bench}"
    )

    train = commands.add_parser(
        "train",
        help="train an encoder with EMP-SSL",
        description="Train an EMP-SSL encoder; writes checkpoint.pt and metrics.jsonl to --out-dir. "
        "A folder that already holds another run's files is refused: continue that run with --resume "
        "DIR/checkpoint.pt, or replace it with --overwrite. Ctrl-C (SIGINT) or SIGTERM finishes the "
        "current step, writes a checkpoint and exits 130 / 143; a second Ctrl-C stops at once.",
    )
    groups = {}
    for group in ("data", "encoder", "training", "output", "runtime"):
        add_options(train, TrainConfig, group, groups=groups)
    _add_process_options(train, groups)

    evaluate = commands.add_parser(
        "eval",
        help="bag-of-features evaluation: linear probe and kNN",
        description="Evaluate an encoder by bag of features: linear probe and weighted kNN.",
    )
    which = evaluate.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="PATH", help="checkpoint written by `empssl train`")
    which.add_argument(
        "--random-init", action="store_true", help="an untrained encoder of the same architecture (baseline)"
    )
    groups = {}
    for group in ("data", "encoder"):  # the training run's: defaults come from the checkpoint
        add_options(evaluate, TrainConfig, group, from_checkpoint=True, groups=groups)
    for group in ("data", "evaluation", "runtime"):
        add_options(evaluate, EvalConfig, group, groups=groups)
    groups["evaluation"].add_argument(
        "--json", action="store_true", help="print the results as one JSON object on the last line"
    )
    _add_process_options(evaluate, groups)

    plot = commands.add_parser(
        "plot",
        help="draw a run's training curves from its metrics.jsonl",
        description="Draw the loss, its two parts and the learning rate against step from the "
        "metrics.jsonl of a run folder (what `empssl train` writes at its end, "
        "redrawn at any time, also while the run goes on). Needs matplotlib.",
    )
    plot.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `empssl train`, or its metrics.jsonl")
    plot.add_argument("--out", metavar="FILE", help="PNG to write (default: RUN_DIR/curves.png)")
    commands.add_parser(
        "info",
        help="versions, devices and the backend availability table",
        description="Print versions, devices and which backend can run each op here (and why not).",
    )
    _add_export_parser(commands)
    _add_reproduce_parser(commands)
    _add_bench_parser(commands)
    return parser


def _add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export",
        help="write the trained backbone as a state_dict for the library it came from (torchvision, timm)",
        description="Write the backbone of a checkpoint as a state_dict that its library's model loads strictly, and "
        "print the Python that builds that model: the built-in ResNet-18 (width 1 only) and torchvision:NAME into "
        "torchvision's model with its classifier an Identity (resnet18-cifar and --stem cifar: after conv1 = "
        "Conv2d(3, C, 3, 1, 1, bias=False) and maxpool = Identity()), timm:NAME into timm.create_model(NAME, "
        "num_classes=0); see docs/training.md section 7.",
    )
    export.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint written by `empssl train`")
    export.add_argument("--out", required=True, metavar="FILE", help="file to write (written atomically)")
    export.add_argument(
        "--with-head",
        action="store_true",
        help="also write pre_feature.* (Linear, BatchNorm1d, ReLU): the features evaluation uses",
    )
    export.add_argument(
        "--format",
        choices=("pt", "safetensors"),
        default=None,
        help="torch.save state_dict or safetensors (needs the safetensors package) "
        "(default: safetensors for a .safetensors --out, else pt)",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _add_passthrough_parser(
    commands, name: str, help: str, title: str, table, tail: str, remainder: str, metavar: str
) -> None:
    """A command that parses its own options (``reproduce``, ``bench``), described by its table of choices."""
    parser = commands.add_parser(
        name,
        help=help,
        description=f"{title}: " + "; ".join(f"{key}: {value}" for key, value in table.items()) + tail,
        add_help=False,
    )
    parser.add_argument(remainder, nargs=argparse.REMAINDER, help=metavar)


def _add_reproduce_parser(commands) -> None:
    from ..reproduce.sweep import EXPERIMENTS

    _add_passthrough_parser(
        commands,
        "reproduce",
        "the paper's experiments as resumable sweeps, with a report",
        "Experiments",
        EXPERIMENTS,
        ". `empssl reproduce --help` lists the options.",
        "reproduce_args",
        "EXPERIMENT [options]",
    )


def _add_bench_parser(commands) -> None:
    from ..bench import BENCHMARKS

    _add_passthrough_parser(
        commands,
        "bench",
        "time the kernels and the training step on this machine",
        "Benchmarks",
        BENCHMARKS,
        ". `empssl bench NAME --help` lists each one's options.",
        "benchmark_args",
        "NAME [options]",
    )
