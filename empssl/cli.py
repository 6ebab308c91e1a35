"""The ``empssl`` command: ``empssl train``, ``empssl eval``, ``empssl plot``, ``empssl info``, ``empssl export``.

The options of train and eval are generated from the fields of ``TrainConfig`` and ``EvalConfig``
(empssl.config), where their defaults and help live: the 1-epoch CIFAR-10 recipe (ResNet-18 with
the CIFAR stem, 20 patches of each of 100 images per step, lr 0.3 with a cosine schedule over 2
epochs, stopped after 1 epoch) and evaluation by bag of features over 128 patches per image.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import List, Optional

from .checks import positive_float, positive_int
from .config import EvalConfig, TrainConfig, add_options, from_args


def _add_process_options(parser: argparse.ArgumentParser, groups) -> None:
    """Settings of this process, not of the run (so not in the configs): --threads and --dist-timeout."""
    from .distributed import DEFAULT_TIMEOUT_S

    groups["runtime"].add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)"
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
    from . import __version__

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
        help="write the trained backbone as a state_dict for torchvision.models.resnet18",
        description="Write the backbone of a checkpoint as a state_dict that torchvision.models.resnet18() loads with "
        "only fc.* missing (resnet18-cifar: after conv1 = Conv2d(3, 64, 3, 1, 1, bias=False) and "
        "maxpool = Identity(); see docs/training.md section 7). Width 1 encoders only.",
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


def _add_reproduce_parser(commands) -> None:
    from .reproduce.sweep import EXPERIMENTS

    reproduce = commands.add_parser(
        "reproduce",
        help="the paper's experiments as resumable sweeps, with a report",
        description="Experiments: "
        + "; ".join(f"{k}: {v}" for k, v in EXPERIMENTS.items())
        + ". `empssl reproduce --help` lists the options.",
        add_help=False,
    )
    reproduce.add_argument("reproduce_args", nargs=argparse.REMAINDER, help="EXPERIMENT [options]")


def _add_bench_parser(commands) -> None:
    from .bench import BENCHMARKS

    bench = commands.add_parser(
        "bench",
        help="time the kernels and the training step on this machine",
        description="Benchmarks: "
        + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
        + ". `empssl bench NAME --help` lists each one's options.",
        add_help=False,
    )
    bench.add_argument("benchmark_args", nargs=argparse.REMAINDER, help="NAME [options]")


def _run_export(args) -> int:
    from .models.export import export_checkpoint

    state = export_checkpoint(
        args.checkpoint, args.out, with_head=args.with_head, format=args.format, overwrite=args.overwrite
    )
    print(f"wrote {len(state)} tensors ({sum(t.numel() for t in state.values()):,} values) to {args.out}")
    return 0


def _run_plot(args) -> int:
    from .training.curves import write_training_curves
    from .training.run_folder import CURVES_NAME, METRICS_NAME, read_step_metrics

    metrics = os.path.join(args.run_dir, METRICS_NAME) if os.path.isdir(args.run_dir) else args.run_dir
    if not os.path.isfile(metrics):
        raise ValueError(f"{metrics} does not exist: RUN_DIR must be a folder written by `empssl train`")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("empssl plot needs matplotlib: pip install matplotlib") from None
    records = read_step_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no step record to plot")
    written = write_training_curves(
        records, args.out or os.path.join(os.path.dirname(os.path.abspath(metrics)), CURVES_NAME)
    )
    print(f"wrote {written}: {len(records)} records, steps {records[0]['step']} to {records[-1]['step']}")
    return 0


def _setup_runtime(args) -> None:
    """Threads; under torchrun, the process group (``args.device`` becomes this rank's device)."""
    import torch

    from . import distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = distributed.init_from_env(args.device, args.dist_timeout)


def _is_main_rank() -> bool:
    """Rank 0 (or the only process) prints the results; the other ranks hold the same ones."""
    from . import distributed

    return distributed.rank() == 0


def _run_train(args) -> int:
    from .training.loop import train

    config = from_args(TrainConfig, args)
    result = train(config)
    if not _is_main_rank():
        return 0
    print(describe_training(result))
    return 0


def describe_training(result) -> str:
    """The line ``empssl train`` ends with: the steps this process trained (after a resume: which of the run's)."""
    metrics, trained = result.last_metrics, result.steps_this_run
    if trained == 0:
        return (
            f"nothing to train: the run in {os.path.dirname(result.checkpoint_path) or '.'} is already at step "
            f"{result.steps} of {result.total_steps}; checkpoint {result.checkpoint_path}"
        )
    span = f"step {result.steps}" if trained == 1 else f"steps {result.first_step + 1}-{result.steps}"
    where = f" ({span} of {result.total_steps})" if result.first_step else ""
    return (
        f"trained {trained} step{'s' if trained != 1 else ''}{where} in {result.seconds:.1f} s; final loss "
        f"{metrics.get('loss', float('nan')):.4f} (tcr {metrics.get('tcr', float('nan')):.4f}, inv "
        f"{metrics.get('inv', float('nan')):.4f}); checkpoint {result.checkpoint_path}"
    )


def _run_eval(args) -> int:
    import torch

    from . import checkpoint as ckpt
    from .data.load import load_dataset
    from .device import resolve_device
    from .evaluation.pipeline import evaluate
    from .models.encoder import build_encoder, load_encoder

    config = from_args(EvalConfig, args)
    device = resolve_device(config.device)
    defaults = TrainConfig()
    stored = {}
    requested_model = {field: getattr(args, field) for field in ckpt.MODEL_FIELDS}
    if args.checkpoint:
        encoder, payload = load_encoder(args.checkpoint)
        stored = payload.get("config", {})
        given = {field: value for field, value in requested_model.items() if value is not None}
        if given:  # an explicit architecture must be the checkpoint's
            ckpt.check_same_model(args.checkpoint, payload["model_config"], {**payload["model_config"], **given})
        source = args.checkpoint
    else:
        model_config = {
            field: value if value is not None else getattr(defaults, field) for field, value in requested_model.items()
        }
        torch.manual_seed(config.seed)
        encoder = build_encoder(**model_config)
        source = "random init (seed %d)" % config.seed

    def pick(name):  # command line, else the checkpoint's training config, else the default
        value = getattr(args, name)
        if value is None:
            value = stored.get(name, getattr(defaults, name))
        return value

    data = load_dataset(
        pick("dataset"),
        root=pick("root"),
        download=args.download,
        image_size=pick("image_size"),
        cache_dir=pick("cache_dir"),
        on_bad_image=pick("on_bad_image"),
        seed=pick("data_seed"),
        train_size=pick("train_size"),
        test_size=config.test_size,
        device=device,
        show_progress=config.progress,
    )
    from .augment.config import smallest_image_size
    from .data.dataset import check_image_size

    check_image_size(data, smallest_image_size())
    results = evaluate(encoder.to(device), data, config)
    if not _is_main_rank():
        return 0
    results = {"encoder": source, "dataset": data.name, **results}
    rows = [
        ("encoder", source),
        (
            "data set",
            f"{data.name}: {results['num_train']} train / {results['num_test']} test, {data.num_classes} classes",
        ),
        ("patches per image", str(results["num_patches"])),
        ("linear probe top-1 (final epoch)", f"{100 * results['linear_top1']:.2f} %"),
        (
            f"  best epoch ({results['linear_best_epoch']}), for reference",
            f"{100 * results['linear_best_epoch_top1']:.2f} %",
        ),
        (f"kNN top-1 (k={config.knn_k})", f"{100 * results['knn_top1']:.2f} %"),
        (f"kNN top-5 (k={config.knn_k})", f"{100 * results['knn_top5']:.2f} %"),
        ("time", f"{results['total_seconds']:.1f} s (features {results['feature_seconds']:.1f} s)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    if args.json:
        print(json.dumps(results))
    return 0


def _run_info(args) -> int:
    import torch

    from . import (
        __version__,
        backends,
        ops,  # noqa: F401  importing registers the ops
    )

    def version(module_name):
        try:
            return __import__(module_name).__version__
        except Exception as err:  # missing or broken optional package: say so
            return f"not available ({type(err).__name__})"

    print(f"empssl       {__version__}")
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"triton       {version('triton')}")
    print(f"torchvision  {version('torchvision')}")
    print(f"built        {backends.build_summary()}")
    print(f"extension    {backends.extension_reason() or 'empssl._C loaded'}")
    print(f"cpu          {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(
                f"cuda:{index}       {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
            )
    else:
        print("cuda         no CUDA GPU visible")
    print(
        f"float32      training sets TF32 {'on' if TrainConfig.tf32 else 'off'} for float32 matmuls and cuDNN "
        f"convolutions (--tf32 turns it on); torch's settings in this process: matmul "
        f"{torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}"
    )
    print()
    rows = backends.availability_table()
    header = ("op", "device", "backend", "available")
    table = [(op, device, name, "yes" if why is None else f"no: {why}") for op, device, name, why in rows]
    widths = [max(len(str(row[i])) for row in table + [header]) for i in range(3)]
    print("  ".join(f"{h:<{w}}" for h, w in zip(header[:3], widths)) + "  " + header[3])
    for row in table:
        print("  ".join(f"{value:<{w}}" for value, w in zip(row[:3], widths)) + "  " + row[3])
    print()
    ops_listed = list(dict.fromkeys(op for op, *_ in rows))
    described = [(op, name) for op in ops_listed for name in backends.BACKENDS if backends.supports(op, name) != "-"]
    width = max(len(f"{op} {name}") for op, name in described)
    print(f"{'op backend':<{width}}  supports")
    for op, name in described:
        print(f"{op + ' ' + name:<{width}}  {backends.supports(op, name)}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports, data loading) or outside a command's own handling
        name = next((word for word in argv if not word.startswith("-")), "")
        print(f"empssl{' ' + name if name else ''}: interrupted", file=sys.stderr)
        return 130


def _main(argv: List[str]) -> int:
    if argv[:1] == ["bench"]:  # each benchmark parses its own options
        from .bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["reproduce"]:  # a sweep of train and eval commands, with options of its own
        from .reproduce.sweep import main as reproduce_main

        return reproduce_main(argv[1:], run_command=main)
    parser = build_parser()
    args = parser.parse_args(argv)
    from .backends import BackendUnavailableError
    from .checkpoint import CheckpointError
    from .data.dataset import DataError
    from .distributed import DistributedError, destroy
    from .training.loop import NonFiniteLossError
    from .training.signals import TrainingInterrupted

    try:
        if args.command not in ("info", "export", "plot"):
            _setup_runtime(args)
        code = {"train": _run_train, "eval": _run_eval, "plot": _run_plot, "info": _run_info, "export": _run_export}[
            args.command
        ](args)
        destroy()  # only after success: after a failed collective, NCCL's teardown can wait for the dead rank
        return code
    except (
        DataError,
        CheckpointError,
        NonFiniteLossError,
        BackendUnavailableError,
        DistributedError,
        ValueError,
        TypeError,
    ) as err:
        print(f"{_prog(args)}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a permission, a read-only folder, a path that vanished: one line
        print(f"{_prog(args)}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(f"{_prog(args)}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{_prog(args)}: interrupted", file=sys.stderr)
        return 130


def describe_os_error(err: OSError) -> str:
    """``reason: path`` of an OSError (its errno's text when it has no message of its own)."""
    import errno as errnos

    reason = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    hint = {
        errnos.ENOSPC: "free some space or pass another --out-dir",
        errnos.EROFS: "the file system is read-only",
        errnos.EACCES: "check the permissions",
        errnos.EPERM: "check the permissions",
        errnos.ENOENT: "did the path vanish?",
    }.get(err.errno)
    where = f" ({err.filename})" if err.filename and str(err.filename) not in reason else ""
    return f"{reason}{where}" + (f"; {hint}" if hint else "")


def _prog(args) -> str:
    """``empssl train``, with the rank under torchrun (every rank prints its own errors)."""
    from . import distributed

    where = f" (rank {distributed.rank()} of {distributed.world_size()})" if distributed.world_size() > 1 else ""
    return f"empssl {args.command}{where}"


if __name__ == "__main__":
    sys.exit(main())
