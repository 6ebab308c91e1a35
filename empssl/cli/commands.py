"""What each ``empssl`` command does, given its parsed options (errors propagate to ``main``, which prints them as
one line)."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Optional

from ..config import EvalConfig, TrainConfig
from ..options import from_args


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
    """Threads; under torchrun, the process group. ``args.device`` stays the user's (a run's config.toml reruns under
    torchrun): every rank resolves it to its own device (``device.resolve_device``)."""
    import torch

    from .. import distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    distributed.init_from_env(args.device, args.dist_timeout)


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


def encoder_from_args(args, config: EvalConfig):
    """(encoder on the config's device, the checkpoint's contents (empty without one), what the encoder is) for
    ``eval`` and the picture commands: the checkpoint's encoder (``args.checkpoint``), else a random one of the
    architecture given (``--random-init``)."""
    import torch

    from .. import checkpoint as ckpt
    from ..device import resolve_device
    from ..models.backbones import parse_backbone_args
    from ..models.encoder import build_encoder, check_buildable, load_encoder

    device = resolve_device(config.device)
    requested_model = {field: getattr(args, field, None) for field in ckpt.MODEL_FIELDS}
    if requested_model["backbone_args"] is not None:
        requested_model["backbone_args"] = parse_backbone_args(requested_model["backbone_args"])
    if getattr(args, "checkpoint", None):
        encoder, payload = load_encoder(args.checkpoint)
        given = {field: value for field, value in requested_model.items() if value is not None}
        if given:  # an explicit architecture must be the checkpoint's
            ckpt.check_same_model(args.checkpoint, payload["model_config"], {**payload["model_config"], **given})
        return encoder.to(device), payload, args.checkpoint
    defaults = TrainConfig()
    model_config = {
        field: value if value is not None else getattr(defaults, field) for field, value in requested_model.items()
    }
    check_buildable(model_config, device)
    torch.manual_seed(config.seed)
    return build_encoder(**model_config).to(device), {}, "random init (seed %d)" % config.seed


def run_setting(args, stored: dict, name: str):
    """A training run's setting: the command line's, else the checkpoint's training config's, else the default."""
    value = getattr(args, name, None)
    return stored.get(name, getattr(TrainConfig(), name)) if value is None else value


def data_from_args(
    args, config: EvalConfig, stored: dict, test_size: Optional[int] = None, stream: Optional[str] = None
):
    """(the data set of the command line's data options, each defaulting to the checkpoint's, ``stored``, on the
    config's device; its patch size), checked large enough for the augmentation. ``stream``: the image trees' rule
    (default: the options'; the picture commands hold their images in memory, ``off``); evaluation refuses an
    unlabelled tree before decoding it."""
    from ..augment.config import smallest_image_size
    from ..data.dataset import check_patch_size
    from ..data.load import load_dataset
    from ..device import resolve_device

    data = load_dataset(
        run_setting(args, stored, "dataset"),
        root=run_setting(args, stored, "root"),
        download=getattr(args, "download", False),
        image_size=run_setting(args, stored, "image_size"),
        cache_dir=run_setting(args, stored, "cache_dir"),
        on_bad_image=run_setting(args, stored, "on_bad_image"),
        seed=run_setting(args, stored, "data_seed"),
        train_size=run_setting(args, stored, "train_size"),
        test_size=test_size,
        device=resolve_device(config.device),
        show_progress=config.progress,
        max_aspect=run_setting(args, stored, "max_aspect"),
        stream=stream or run_setting(args, stored, "stream"),
        need_labels=stream is None,
    )
    patch_size = run_setting(args, stored, "patch_size") or data.recipe_patch_size
    check_patch_size(data, patch_size, smallest_image_size())
    return data, patch_size


def run_eval(args) -> int:
    from ..evaluation.pipeline import evaluate

    config = from_args(EvalConfig, args)
    encoder, payload, source = encoder_from_args(args, config)
    data, patch_size = data_from_args(args, config, payload.get("config", {}), test_size=config.test_size)
    results = evaluate(encoder, data, config, patch_size=patch_size)
    if not _is_main_rank():
        return 0
    results = {"encoder": source, "dataset": data.name, **results}
    rows = [
        ("encoder", source),
        (
            "data set",
            f"{data.name}: {results['num_train']} train / {results['num_test']} test, {data.num_classes} classes",
        ),
    ]
    for view in ("patches", "whole"):
        prefix = "whole_" if view == "whole" else ""
        if prefix + "linear_top1" not in results:
            continue
        name = "whole image" if view == "whole" else f"bag of {results['num_patches']} patches"
        rows += [
            (f"{name}: linear probe top-1 (final epoch)", f"{100 * results[prefix + 'linear_top1']:.2f} %"),
            (
                f"  best epoch ({results[prefix + 'linear_best_epoch']}), for reference",
                f"{100 * results[prefix + 'linear_best_epoch_top1']:.2f} %",
            ),
            (f"{name}: kNN top-1 (k={config.knn_k})", f"{100 * results[prefix + 'knn_top1']:.2f} %"),
            (f"{name}: kNN top-5 (k={config.knn_k})", f"{100 * results[prefix + 'knn_top5']:.2f} %"),
        ]
    rows.append(("time", f"{results['total_seconds']:.1f} s (features {results['feature_seconds']:.1f} s)"))
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
    from ..device import tf32_settings

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
        "{}, cuDNN {}".format(*tf32_settings())
    )
    from ..data.load import memory_rule

    print(f"data         {memory_rule('cuda' if torch.cuda.is_available() else None)}")
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
