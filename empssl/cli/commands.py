"""What each ``empssl`` command does, given its parsed options (errors propagate to ``main``, which prints them as
one line)."""

from __future__ import annotations

import json
import os
import platform
import sys

from ..config import EvalConfig, TrainConfig, from_args


def run_export(args) -> int:
    from ..models.export import export_checkpoint_and_code

    state, code = export_checkpoint_and_code(
        args.checkpoint, args.out, with_head=args.with_head, format=args.format, overwrite=args.overwrite
    )
    print(f"wrote {len(state)} tensors ({sum(t.numel() for t in state.values()):,} values) to {args.out}; load with:")
    print(code)
    return 0


def run_plot(args) -> int:
    from ..files import check_regular_file, remove_stale_temporaries
    from ..training.curves import write_training_curves
    from ..training.run_folder import CURVES_NAME, METRICS_NAME, read_step_metrics

    metrics = os.path.join(args.run_dir, METRICS_NAME) if os.path.isdir(args.run_dir) else args.run_dir
    if not os.path.exists(metrics):
        raise ValueError(f"{metrics} does not exist: RUN_DIR must be a folder written by `empssl train`")
    check_regular_file(metrics, "metrics log")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(metrics)), CURVES_NAME)
    check_png_out(out, metrics)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("empssl plot needs matplotlib: pip install matplotlib") from None
    records = read_step_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no step record to plot")
    remove_stale_temporaries(os.path.dirname(os.path.abspath(out)), target=out)
    written = write_training_curves(records, out)
    print(f"wrote {written}: {len(records)} records, steps {records[0]['step']} to {records[-1]['step']}")
    return 0


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_out(out: str, metrics: str) -> None:
    """ValueError unless ``out`` may receive a PNG: never the metrics log it is drawn from, nor an existing file that
    is not a PNG (a checkpoint, a log: a PNG would replace it), nor a folder."""
    from ..files import open_input, same_file

    if os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; pass the PNG file to write")
    if same_file(out, metrics):
        raise ValueError(f"--out {out} is the metrics log it would be drawn from; pass another --out")
    if os.path.exists(out):
        is_png = False
        if os.path.isfile(out):  # never opened otherwise: a FIFO would block
            with open_input(out, "--out") as f:
                is_png = f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
        if not is_png:
            raise ValueError(
                f"--out {out} exists and is not a PNG (a checkpoint? a log?): drawing the curves would replace it; "
                f"pass another --out"
            )


def setup_runtime(args) -> None:
    """Threads; under torchrun, the process group (``args.device`` becomes this rank's device)."""
    import torch

    from .. import distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = distributed.init_from_env(args.device, args.dist_timeout)


def _is_main_rank() -> bool:
    """Rank 0 (or the only process) prints the results; the other ranks hold the same ones."""
    from .. import distributed

    return distributed.rank() == 0


def run_train(args) -> int:
    from ..training.loop import train

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


def run_eval(args) -> int:
    import torch

    from .. import checkpoint as ckpt
    from ..data.load import load_dataset
    from ..device import resolve_device
    from ..evaluation.pipeline import evaluate
    from ..models.backbones import parse_backbone_args
    from ..models.encoder import build_encoder, check_buildable, load_encoder

    config = from_args(EvalConfig, args)
    device = resolve_device(config.device)
    defaults = TrainConfig()
    stored = {}
    requested_model = {field: getattr(args, field) for field in ckpt.MODEL_FIELDS}
    if requested_model["backbone_args"] is not None:
        requested_model["backbone_args"] = parse_backbone_args(requested_model["backbone_args"])
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
        check_buildable(model_config, device)
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
    from ..augment.config import smallest_image_size
    from ..data.dataset import check_image_size

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


def run_info(args) -> int:
    import torch

    from .. import (
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
