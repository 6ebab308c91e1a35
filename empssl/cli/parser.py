"""The parsers of ``empssl``: the options of train and eval come from the fields of ``TrainConfig`` and
``EvalConfig`` (``empssl.config``); the process's own settings (threads, the distributed timeout) are added here."""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

from ..checks import positive_float, positive_int, thread_count
from ..config import EvalConfig, TrainConfig
from ..evaluation.features import SPLIT_KEYS as SPLITS
from ..options import add_options

# the config fields each command takes as options: (config class, option groups), in the order of --help; eval takes
# the training run's data and encoder settings (their defaults: the checkpoint's) before its own
COMMAND_OPTIONS = {
    "train": ((TrainConfig, ("data", "encoder", "training", "output", "runtime")),),
    "eval": ((TrainConfig, ("data", "encoder")), (EvalConfig, ("data", "evaluation", "runtime"))),
}


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


def _add_config_option(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"read options from a TOML file (YAML where PyYAML is installed) with the names of `empssl {command}`'s "
        f"options ({'batch_size = 100' if command == 'train' else 'num_patches = 64'}), at its top level or in tables "
        "named after the option groups; options given beside it win ("
        + (
            "a run folder's config.toml is such a file"
            if command == "train"
            else "a run folder's config.toml is train's: eval takes the run's settings from --checkpoint"
        )
        + "; docs/training.md section 10)",
    )


def build_parser(config_defaults: Optional[Dict[str, Dict[str, Any]]] = None) -> argparse.ArgumentParser:
    """The ``empssl`` parser; ``config_defaults``: by command, option values (a ``--config`` file's) that replace
    the options' defaults."""
    from .. import __version__

    config_defaults = config_defaults or {}

    parser = argparse.ArgumentParser(
        prog="empssl", description="EMP-SSL self-supervised learning: train, evaluate, inspect."
    )
    parser.add_argument("--version", action="version", version=f"empssl {__version__}")
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{train,eval,plot,embed,neighbours,map,preview,reproduce,info,export,bench}",
    )

    train = commands.add_parser(
        "train",
        help="train an encoder with EMP-SSL",
        description="Train an EMP-SSL encoder; writes checkpoint.pt and metrics.jsonl to --out-dir. "
        "A folder that already holds another run's files is refused: continue that run with --resume "
        "DIR/checkpoint.pt, or replace it with --overwrite. Ctrl-C (SIGINT) or SIGTERM finishes the "
        "current step, writes a checkpoint and exits 130 / 143; a second Ctrl-C stops at once.",
    )
    _add_config_option(train, "train")
    groups = {}
    for config_class, names in COMMAND_OPTIONS["train"]:
        for group in names:
            add_options(train, config_class, group, groups=groups, defaults=config_defaults.get("train"))
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
    _add_config_option(evaluate, "eval")
    groups = {}
    for config_class, names in COMMAND_OPTIONS["eval"]:
        for group in names:
            add_options(
                evaluate,
                config_class,
                group,
                from_checkpoint=config_class is TrainConfig,
                groups=groups,
                defaults=config_defaults.get("eval"),
            )
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
    _add_picture_parsers(commands)
    _add_reproduce_parser(commands)
    _add_bench_parser(commands)
    return parser


# the picture commands (empssl.viz, docs/training.md section 11): (name, help, what --out is)
PICTURE_COMMANDS = {
    "embed": (
        "write the embeddings of images to a file",
        ".npy (with a .json of the images beside it) or .safetensors",
    ),
    "neighbours": ("draw query images and their nearest neighbours by embedding", "PNG, with a .csv beside it"),
    "map": ("draw a 2-D map (t-SNE or UMAP) of the embeddings, coloured by label", "PNG, with a .csv beside it"),
    "preview": ("draw the augmented patches the trainer cuts from a few images", "PNG, with a .csv beside it"),
}


def _add_picture_parsers(commands) -> None:
    from ..viz.maps import MAP_METHODS

    for name, (help_text, out) in PICTURE_COMMANDS.items():
        parser = commands.add_parser(
            name,
            help=help_text,
            description=f"{help_text[0].upper()}{help_text[1:]}. Images come from a split of the data set (the "
            "checkpoint's unless --dataset is given) or from any folder of image files (--images); embeddings are "
            "the bag of features `empssl eval` uses. See docs/training.md section 11.",
        )
        if name == "preview":
            parser.add_argument(
                "--checkpoint", metavar="PATH", help="take the data settings from this run's checkpoint (optional)"
            )
        else:
            which = parser.add_mutually_exclusive_group(required=True)
            which.add_argument("--checkpoint", metavar="PATH", help="checkpoint written by `empssl train`")
            which.add_argument("--random-init", action="store_true", help="an untrained encoder (the baseline)")
        parser.add_argument("--out", required=True, metavar="FILE", help=f"file to write: {out} (written atomically)")
        groups = {}
        for group in ("data",) if name == "preview" else ("data", "encoder"):
            add_options(parser, TrainConfig, group, from_checkpoint=True, groups=groups)
        for group in ("data", "runtime"):
            add_options(parser, EvalConfig, group, groups=groups)
        data = groups["data"]
        data.add_argument(
            "--images", metavar="DIR", help="any folder of image files (any depth; class subfolders give labels)"
        )
        data.add_argument(
            "--split",
            choices=tuple(SPLITS),
            default="train" if name == "preview" else "test",
            help="the data set's split to draw from"
            + ("" if name != "neighbours" else " (the queries; their neighbours come from the train split)")
            + f" (default {'train' if name == 'preview' else 'test'})",
        )
        default_max = {"neighbours": 10000, "map": 2000}.get(name)
        if name != "preview":
            data.add_argument(
                "--max-images",
                type=positive_int,
                default=default_max,
                metavar="N",
                help="use the first N images"
                + (" of the bank" if name == "neighbours" else "")
                + (f" (default {default_max})" if default_max else " (default: all)"),
            )
        picture = parser.add_argument_group(name)
        picture.add_argument(
            "--num-patches",
            type=positive_int,
            default=8 if name == "preview" else 16,
            metavar="T",
            help=("patches per image" if name == "preview" else "patches per image in the bag of features")
            + f" (default {8 if name == 'preview' else 16})",
        )
        if name == "neighbours":
            picture.add_argument("--queries", type=positive_int, default=8, help="query images (default 8)")
            picture.add_argument("--k", type=positive_int, default=8, help="neighbours of each query (default 8)")
        elif name == "map":
            picture.add_argument(
                "--method",
                choices=MAP_METHODS,
                default="auto",
                help="t-SNE (scikit-learn) or UMAP (umap-learn); auto: UMAP where installed (default auto)",
            )
        elif name == "preview":
            picture.add_argument("--num-images", type=positive_int, default=6, help="images shown (default 6)")
            picture.add_argument(
                "--step", type=int, default=0, help="the training step whose random numbers cut the patches (default 0)"
            )
            # the patches training step S cut: with the run's seed, unless --seed is given
            seed = next(action for action in parser._actions if action.dest == "seed")
            seed.default, seed.help = (
                None,
                "seed of the patches' random numbers (default: the checkpoint's run's, else 0)",
            )
        _add_process_options(parser, groups)


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
