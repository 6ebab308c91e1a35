"""The ``empssl`` command: ``empssl train``, ``empssl eval``, ``empssl info``, ``empssl export``.

Defaults reproduce the 1-epoch CIFAR-10 recipe: ResNet-18 (CIFAR stem), 20 patches of each
of 100 images per step, lr 0.3 with a cosine schedule over 2 epochs, stopped after 1 epoch;
evaluation by bag of features over 128 patches per image.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import List, Optional

from .data import BAD_IMAGE_POLICIES, DATASET_SPECS

ARCH_CHOICES = ("resnet18-cifar", "resnet18-imagenet")
BACKEND_CHOICES = ("auto", "cuda", "triton", "cpu", "reference")
ON_OFF = ("on", "off")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _add_data_options(parser: argparse.ArgumentParser, defaults_from_checkpoint: bool) -> None:
    later = " (default: the checkpoint's, else %s)" if defaults_from_checkpoint else " (default: %s)"
    group = parser.add_argument_group("data")
    default = (lambda value: None) if defaults_from_checkpoint else (lambda value: value)  # noqa: E731
    group.add_argument("--dataset", default=default("cifar10"), metavar="SPEC",
                       help=f"data set: {DATASET_SPECS}" + later % "cifar10")
    group.add_argument("--root", default=default("data"), help="folder holding cifar-10-batches-py/ or cifar-100-python/"
                       + later % "data")
    group.add_argument("--download", action="store_true", help="download CIFAR with torchvision (MD5-checked) if missing")
    group.add_argument("--image-size", type=_positive_int, default=None,
                       help="image size of folder: and synthetic data sets (default: 32)")
    group.add_argument("--train-size", type=_positive_int, default=None,
                       help="synthetic: number of train images (default 10000); others: use only the first N")
    group.add_argument("--cache-dir", default=None, help="where folder: data sets cache their decoded arrays "
                       "(default: PATH/.empssl_cache)")
    group.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default=default("skip"),
                       help="an image of a folder: data set that does not decode: skip it with a warning, or stop"
                       + later % "skip")
    group.add_argument("--data-seed", type=int, default=default(0),
                       help="seed of the synthetic data set and of train/test splits" + later % "0")


def _add_model_options(parser: argparse.ArgumentParser, defaults_from_checkpoint: bool) -> None:
    group = parser.add_argument_group("encoder")
    default = (lambda value: None) if defaults_from_checkpoint else (lambda value: value)  # noqa: E731
    suffix = " (default: the checkpoint's, else %s)" if defaults_from_checkpoint else " (default: %s)"
    group.add_argument("--arch", choices=ARCH_CHOICES, default=default("resnet18-cifar"),
                       help="backbone: ResNet-18 with the CIFAR stem or the ImageNet stem" + suffix % "resnet18-cifar")
    group.add_argument("--width", type=_positive_float, default=default(1.0),
                       help="channel multiplier of the backbone (1: 512 features)" + suffix % "1")
    group.add_argument("--hidden-dim", type=_positive_int, default=default(4096),
                       help="size of the pre_feature layer used for evaluation" + suffix % "4096")
    group.add_argument("--z-dim", type=_positive_int, default=default(1024), help="embedding size" + suffix % "1024")


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available; default auto)")
    group.add_argument("--seed", type=int, default=0, help="seed of initialisation, batch order and augmentation (default 0)")
    group.add_argument("--augment-backend", choices=BACKEND_CHOICES, default="auto",
                       help="augmentation backend (default auto: the fastest available)")
    group.add_argument("--bf16", choices=ON_OFF, default="on", help="bf16 autocast on CUDA (default on; ignored on CPU)")
    group.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's)")
    group.add_argument("--dist-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                       help="under torchrun: how long a rank waits for the others in a collective before it stops with an "
                            "error (a rank died or stalled); rank 0's checkpoint writes must fit in it (default 600)")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="empssl", description="EMP-SSL self-supervised learning: train, evaluate, inspect.")
    parser.add_argument("--version", action="version", version=f"empssl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,info,export,bench}")

    train = commands.add_parser("train", help="train an encoder with EMP-SSL",
                                description="Train an EMP-SSL encoder; writes checkpoint.pt and metrics.jsonl to --out-dir. "
                                "A folder that already holds another run's files is refused: continue that run with --resume "
                                "DIR/checkpoint.pt, or replace it with --overwrite. Ctrl-C (SIGINT) or SIGTERM finishes the "
                                "current step, writes a checkpoint and exits 130 / 143; a second Ctrl-C stops at once.")
    _add_data_options(train, defaults_from_checkpoint=False)
    _add_model_options(train, defaults_from_checkpoint=False)
    group = train.add_argument_group("training")
    group.add_argument("--num-patches", type=_positive_int, default=20, help="patches per image per step, n (default 20)")
    group.add_argument("--batch-size", type=_positive_int, default=100,
                       help="images per step, b, over all ranks under torchrun: must divide by their number (default 100)")
    group.add_argument("--lr", type=_positive_float, default=0.3, help="peak learning rate of LARS-SGD (default 0.3)")
    group.add_argument("--epochs", type=_positive_int, default=1, help="epochs to train (default 1)")
    group.add_argument("--schedule-epochs", type=_positive_int, default=2,
                       help="length of the cosine schedule in epochs; the 1-epoch recipe uses 2 (default 2)")
    group.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps in total")
    group.add_argument("--eps", type=_positive_float, default=0.2, help="coding-rate distortion eps (default 0.2)")
    group.add_argument("--inv-coef", type=float, default=200.0, help="weight of the invariance term (default 200)")
    group.add_argument("--tcr-coef", type=float, default=1.0, help="weight of the coding-rate term (default 1)")
    group.add_argument("--loss-backend", choices=BACKEND_CHOICES, default="auto", help="coding-rate backend (default auto)")
    group.add_argument("--channels-last", dest="channels_last", action="store_const", const=True, default=None,
                       help="channels_last memory format for patches and encoder (default: on CUDA only)")
    group.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False,
                       help="keep the default memory format on CUDA too")
    group.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    group.add_argument("--sync-bn", action="store_true",
                       help="under torchrun: BatchNorm statistics over every rank's images, so N ranks train as one "
                            "process (default: per rank, as the published DataParallel code)")
    group.add_argument("--no-cuda-graph", action="store_true",
                       help="run the step eagerly on CUDA (default: captured once as a CUDA graph and replayed)")
    group = train.add_argument_group("output")
    group.add_argument("--out-dir", default="runs/empssl",
                       help="folder for checkpoint.pt and metrics.jsonl; refused if it holds another run's files "
                       "(default runs/empssl)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace another run's files in --out-dir (once this run has written its first checkpoint)")
    group.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (default 0: at the end only)")
    group.add_argument("--resume", metavar="CHECKPOINT", default=None, help="continue exactly from this checkpoint; its run's metrics.jsonl is cut back to the checkpoint's step")
    group.add_argument("--log-every", type=_positive_int, default=10, help="steps between log lines (default 10)")
    _add_runtime_options(train)

    evaluate = commands.add_parser("eval", help="bag-of-features evaluation: linear probe and kNN",
                                   description="Evaluate an encoder by bag of features: linear probe and weighted kNN.")
    which = evaluate.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="PATH", help="checkpoint written by `empssl train`")
    which.add_argument("--random-init", action="store_true", help="an untrained encoder of the same architecture (baseline)")
    _add_data_options(evaluate, defaults_from_checkpoint=True)
    evaluate.add_argument("--test-size", type=_positive_int, default=None,
                          help="synthetic: number of test images (default 2000); others: use only the first N")
    _add_model_options(evaluate, defaults_from_checkpoint=True)
    group = evaluate.add_argument_group("evaluation")
    group.add_argument("--num-patches", type=_positive_int, default=128, help="patches per image in the bag, T (default 128)")
    group.add_argument("--linear-epochs", type=_positive_int, default=100, help="linear probe epochs (default 100)")
    group.add_argument("--linear-lr", type=_positive_float, default=0.03, help="linear probe learning rate (default 0.03)")
    group.add_argument("--knn-k", type=_positive_int, default=20, help="neighbours of the kNN (default 20)")
    group.add_argument("--knn-temperature", type=_positive_float, default=0.07, help="kNN vote temperature (default 0.07)")
    group.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    _add_runtime_options(evaluate)

    commands.add_parser("info", help="versions, devices and the backend availability table",
                        description="Print versions, devices and which backend can run each op here (and why not).")
    _add_export_parser(commands)
    _add_bench_parser(commands)
    return parser


def _add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="write the trained backbone as a state_dict for torchvision.models.resnet18",
        description="Write the backbone of a checkpoint as a state_dict that torchvision.models.resnet18() loads with "
                    "only fc.* missing (resnet18-cifar: after conv1 = Conv2d(3, 64, 3, 1, 1, bias=False) and "
                    "maxpool = Identity(); see the README). Width 1 encoders only.")
    export.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint written by `empssl train`")
    export.add_argument("--out", required=True, metavar="FILE", help="file to write (written atomically)")
    export.add_argument("--with-head", action="store_true",
                        help="also write pre_feature.* (Linear, BatchNorm1d, ReLU): the features evaluation uses")
    export.add_argument("--format", choices=("pt", "safetensors"), default=None,
                        help="torch.save state_dict or safetensors (needs the safetensors package) "
                             "(default: safetensors for a .safetensors --out, else pt)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def _add_bench_parser(commands) -> None:
    from .bench import BENCHMARKS

    bench = commands.add_parser("bench", help="time the kernels and the training step on this machine",
                                description="Benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items())
                                + ". `empssl bench NAME --help` lists each one's options.", add_help=False)
    bench.add_argument("benchmark_args", nargs=argparse.REMAINDER, help="NAME [options]")


def _run_export(args) -> int:
    from .export import export_checkpoint

    state = export_checkpoint(args.checkpoint, args.out, with_head=args.with_head, format=args.format,
                              overwrite=args.overwrite)
    print(f"wrote {len(state)} tensors ({sum(t.numel() for t in state.values()):,} values) to {args.out}")
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
    from .train import TrainConfig, train

    config = TrainConfig(
        dataset=args.dataset, root=args.root, download=args.download, image_size=args.image_size,
        train_size=args.train_size, cache_dir=args.cache_dir, on_bad_image=args.on_bad_image, data_seed=args.data_seed,
        arch=args.arch, width=args.width, hidden_dim=args.hidden_dim, z_dim=args.z_dim,
        num_patches=args.num_patches, batch_size=args.batch_size, lr=args.lr, epochs=args.epochs,
        schedule_epochs=args.schedule_epochs, eps=args.eps, inv_coef=args.inv_coef, tcr_coef=args.tcr_coef,
        seed=args.seed, device=args.device, out_dir=args.out_dir, overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume, loss_backend=args.loss_backend, augment_backend=args.augment_backend,
        channels_last=args.channels_last, compile=args.compile, cuda_graph=not args.no_cuda_graph,
        bf16=args.bf16 == "on", max_steps=args.max_steps, sync_bn=args.sync_bn,
        log_every=args.log_every, progress=not args.no_progress,
    )
    result = train(config)
    if not _is_main_rank():
        return 0
    metrics = result.last_metrics
    print(f"trained {result.steps} steps in {result.seconds:.1f} s; final loss {metrics.get('loss', float('nan')):.4f} "
          f"(tcr {metrics.get('tcr', float('nan')):.4f}, inv {metrics.get('inv', float('nan')):.4f}); "
          f"checkpoint {result.checkpoint_path}")
    return 0


def _run_eval(args) -> int:
    import torch

    from . import checkpoint as ckpt
    from .data import load_dataset
    from .evaluate import evaluate
    from .models import build_encoder
    from .train import TrainConfig, resolve_device

    device = resolve_device(args.device)
    defaults = TrainConfig()
    stored = {}
    requested_model = {field: getattr(args, field) for field in ckpt.MODEL_FIELDS}
    if args.checkpoint:
        encoder, payload = ckpt.load_encoder(args.checkpoint)
        stored = payload.get("config", {})
        given = {field: value for field, value in requested_model.items() if value is not None}
        if given:  # an explicit architecture must be the checkpoint's
            ckpt.check_same_model(args.checkpoint, payload["model_config"], {**payload["model_config"], **given})
        source = args.checkpoint
    else:
        model_config = {field: value if value is not None else getattr(defaults, field)
                        for field, value in requested_model.items()}
        torch.manual_seed(args.seed)
        encoder = build_encoder(**model_config)
        source = "random init (seed %d)" % args.seed

    def pick(name):  # command line, else the checkpoint's training config, else the default
        value = getattr(args, name)
        if value is None:
            value = stored.get(name, getattr(defaults, name))
        return value

    data = load_dataset(pick("dataset"), root=pick("root"), download=args.download, image_size=pick("image_size"),
                        cache_dir=pick("cache_dir"), on_bad_image=pick("on_bad_image"), seed=pick("data_seed"),
                        train_size=pick("train_size"), test_size=args.test_size, device=device,
                        show_progress=not args.no_progress)
    results = evaluate(encoder.to(device), data, num_patches=args.num_patches, augment_backend=args.augment_backend,
                       device=device, seed=args.seed, bf16=args.bf16 == "on", linear_epochs=args.linear_epochs,
                       linear_lr=args.linear_lr, knn_k=args.knn_k, knn_temperature=args.knn_temperature,
                       progress=not args.no_progress)
    if not _is_main_rank():
        return 0
    results = {"encoder": source, "dataset": data.name, **results}
    rows = [
        ("encoder", source),
        ("data set", f"{data.name}: {results['num_train']} train / {results['num_test']} test, {data.num_classes} classes"),
        ("patches per image", str(results["num_patches"])),
        ("linear probe top-1 (final epoch)", f"{100 * results['linear_top1']:.2f} %"),
        (f"  best epoch ({results['linear_best_epoch']}), for reference", f"{100 * results['linear_best_epoch_top1']:.2f} %"),
        (f"kNN top-1 (k={args.knn_k})", f"{100 * results['knn_top1']:.2f} %"),
        (f"kNN top-5 (k={args.knn_k})", f"{100 * results['knn_top5']:.2f} %"),
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

    from . import __version__, backends
    from . import augment, loss  # noqa: F401  importing registers the ops

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
    print(f"extension    {backends.extension_reason() or 'empssl._C loaded'}")
    print(f"cpu          {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            print(f"cuda:{index}       {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}")
    else:
        print("cuda         no CUDA GPU visible")
    print()
    rows = backends.availability_table()
    header = ("op", "device", "backend", "available")
    table = [(op, device, name, "yes" if why is None else f"no: {why}") for op, device, name, why in rows]
    widths = [max(len(str(row[i])) for row in table + [header]) for i in range(3)]
    print("  ".join(f"{h:<{w}}" for h, w in zip(header[:3], widths)) + "  " + header[3])
    for row in table:
        print("  ".join(f"{value:<{w}}" for value, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # each benchmark parses its own options
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .backends import BackendUnavailableError
    from .checkpoint import CheckpointError
    from .data import DataError
    from .distributed import DistributedError, destroy
    from .train import NonFiniteLossError, TrainingInterrupted

    try:
        if args.command not in ("info", "export"):
            _setup_runtime(args)
        code = {"train": _run_train, "eval": _run_eval, "info": _run_info, "export": _run_export}[args.command](args)
        destroy()  # only after success: after a failed collective, NCCL's teardown can wait for the dead rank
        return code
    except (DataError, CheckpointError, NonFiniteLossError, BackendUnavailableError, DistributedError, ValueError,
            TypeError) as err:
        print(f"{_prog(args)}: error: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(f"{_prog(args)}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{_prog(args)}: interrupted", file=sys.stderr)
        return 130


def _prog(args) -> str:
    """``empssl train``, with the rank under torchrun (every rank prints its own errors)."""
    from . import distributed

    where = f" (rank {distributed.rank()} of {distributed.world_size()})" if distributed.world_size() > 1 else ""
    return f"empssl {args.command}{where}"


if __name__ == "__main__":
    sys.exit(main())
