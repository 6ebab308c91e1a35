"""What the picture commands do (``embed``, ``neighbours``, ``map``, ``preview``), given their parsed options: read
the encoder and the images, check that no output replaces an input, draw with ``empssl.viz``, write atomically."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

from ..config import EvalConfig
from ..options import from_args
from .commands import data_from_args, encoder_from_args, run_setting


def _inputs(args, stored: dict) -> List[Optional[str]]:
    """The files and folders the command reads: an output must be none of them."""
    spec = run_setting(args, stored, "dataset")
    kind, _, path = spec.partition(":")
    return [
        getattr(args, "checkpoint", None),
        getattr(args, "images", None),
        path if kind in ("npz", "folder") else None,
    ]


def folder_storage(args, payload: dict) -> Tuple[int, float, Optional[int]]:
    """(shorter side, longest aspect ratio kept, patch size; None: the recipe for the images) at which an --images
    folder is decoded and cut: the command line's, else the checkpoint's run's (its settings, else its data set's
    defaults), so the encoder sees patches as it saw them in training."""
    from ..data.layouts import KINDS, LAYOUT_DEFAULTS, StorageDefaults

    stored, trained = payload.get("config", {}), payload.get("dataset", {})
    kind, _, path = run_setting(args, stored, "dataset").partition(":")
    tree = LAYOUT_DEFAULTS.get(kind, StorageDefaults()) if kind in KINDS and path else None
    # an image tree's stored canvas is not its shorter side (its images keep up to max_aspect); other sets are square
    size = run_setting(args, stored, "image_size") or (tree.image_size if tree else trained.get("image_size")) or 32
    aspect = run_setting(args, stored, "max_aspect") or (tree.max_aspect if tree else 1.0)
    patch_size = run_setting(args, stored, "patch_size") or trained.get("patch_size")
    return int(size), float(aspect), patch_size


def _images(args, config: EvalConfig, payload: dict, split: str, limit: Optional[int]):
    """The ImageSet the command draws from: the --images folder (stored and cut as ``folder_storage`` says), else
    the data set's split; the first ``limit``."""
    import torch

    from ..device import resolve_device
    from ..viz.common import folder_images, split_images

    stored = payload.get("config", {})
    if args.images:
        size, aspect, patch_size = folder_storage(args, payload)
        images = folder_images(args.images, size, resolve_device(config.device), config.progress, aspect, patch_size)
    else:
        images = split_images(*data_from_args(args, config, stored, config.test_size, stream="off"), split)
    if limit is not None and limit < len(images):
        images = images.subset(torch.arange(limit))
    return images


def _pick(count: int, total: int, seed: int):
    """``count`` sorted indices of ``total``, drawn with a generator of their own from ``seed``."""
    import torch

    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def _prepare(args, suffixes, with_encoder: bool = True):
    """(config, encoder or None, checkpoint contents, what the encoder is, the output files) with every output
    checked against the command's inputs before any work."""
    from ..viz.common import beside, check_outputs

    config = from_args(EvalConfig, args)
    outputs = [args.out, beside(args.out, ".json" if args.out.lower().endswith(".npy") else ".csv")]
    if args.out.lower().endswith(".safetensors"):
        outputs = [args.out]
    check_outputs(outputs, [getattr(args, "checkpoint", None), args.images], suffixes)
    encoder, payload, source = None, {}, None
    if with_encoder:
        encoder, payload, source = encoder_from_args(args, config)
    elif args.checkpoint:
        from ..checkpoint import load_checkpoint

        payload = load_checkpoint(args.checkpoint)
    check_outputs(outputs, _inputs(args, payload.get("config", {})), suffixes)
    return config, encoder, payload, source, outputs


def _where(args, payload: dict) -> str:
    return args.images or f"{run_setting(args, payload.get('config', {}), 'dataset')} {args.split}"


def run_embed(args) -> int:
    from ..viz.common import embed
    from ..viz.embed import EMBEDDING_SUFFIXES, embedding_description, write_embeddings

    if args.out.lower().endswith(".safetensors"):
        from ..training.trackers import optional_package

        optional_package("safetensors", "an --out ending in .safetensors", "safetensors")
    config, encoder, payload, source, _ = _prepare(args, EMBEDDING_SUFFIXES)
    images = _images(args, config, payload, args.split, args.max_images)
    embeddings = embed(encoder, images, config)
    about = {"encoder": source, "source": _where(args, payload), "num_patches": config.num_patches}
    about.update(seed=config.seed, feature="pre_feature, the mean over each image's patches (as empssl eval)")
    written = write_embeddings(args.out, embeddings, embedding_description(images, about))
    extra = "" if written == args.out else f", the images and labels to {written}"
    print(f"wrote {embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} to {args.out}{extra}")
    return 0


def run_neighbours(args) -> int:
    import torch

    from ..viz.common import embed, split_images, write_csv, write_png
    from ..viz.neighbours import NEIGHBOUR_COLUMNS, nearest_neighbours, neighbour_grid

    config, encoder, payload, source, outputs = _prepare(args, (".png",))
    if args.images or args.split == "train":  # queries from the bank itself: a query is not its own neighbour
        bank = _images(args, config, payload, "train", args.max_images)
        chosen = _pick(args.queries, len(bank), config.seed)
        queries = bank.subset(chosen)
        bank_embeddings = embed(encoder, bank, config, "bank")
        exclude = chosen.to(bank_embeddings.device)
        query_embeddings = bank_embeddings.index_select(0, exclude)
    else:
        data, patch_size = data_from_args(args, config, payload.get("config", {}), config.test_size, stream="off")
        bank = split_images(data, patch_size, "train")
        if args.max_images is not None and args.max_images < len(bank):
            bank = bank.subset(torch.arange(args.max_images))
        pool = split_images(data, patch_size, args.split)
        queries = pool.subset(_pick(args.queries, len(pool), config.seed))
        bank_embeddings, exclude = embed(encoder, bank, config, "bank"), None
        query_embeddings = embed(encoder, queries, config, "queries")
    indices, similarities = nearest_neighbours(query_embeddings, bank_embeddings, args.k, exclude)
    picture, _, rows = neighbour_grid(queries, bank, indices, similarities)
    write_png(args.out, picture)
    write_csv(outputs[1], NEIGHBOUR_COLUMNS, rows)
    print(
        f"wrote {args.out}: {len(queries)} queries and their {indices.shape[1]} nearest of {len(bank)} images "
        f"({source}); the similarities in {outputs[1]}"
    )
    return 0


def run_map(args) -> int:
    from ..files import write_atomically
    from ..viz.common import check_outputs, embed, write_csv
    from ..viz.maps import map_figure, resolve_method, two_d_map

    check_outputs([args.out], [args.checkpoint, args.images], (".png",))  # a bad --out first, then what is missing
    method = resolve_method(args.method)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("empssl map needs matplotlib: pip install matplotlib") from None
    config, encoder, payload, source, outputs = _prepare(args, (".png",))
    images = _images(args, config, payload, args.split, args.max_images)
    coordinates = two_d_map(embed(encoder, images, config).cpu().numpy(), method, config.seed)
    labels = None if images.labels is None else images.labels.cpu().numpy()
    title = f"{'UMAP' if method == 'umap' else 't-SNE'} of {len(images)} images of {_where(args, payload)}\n{source}"
    figure = map_figure(coordinates, labels, images.classes, title)
    write_atomically(args.out, lambda f: figure.savefig(f, format="png"))
    names = images.label_names()
    rows = [[i, images.names[i], names[i] or "", *coordinates[i].tolist()] for i in range(len(images))]
    write_csv(outputs[1], ("index", "name", "label", "x", "y"), rows)
    print(f"wrote {args.out}: a {method} map of {len(images)} images; the coordinates in {outputs[1]}")
    return 0


def run_preview(args) -> int:
    import torch

    from ..augment.config import augment_config_for
    from ..viz.common import write_csv, write_png
    from ..viz.preview import PREVIEW_COLUMNS, augmentation_preview

    config, _, payload, _, outputs = _prepare(args, (".png",), with_encoder=False)
    if config.seed is None:  # the seed the checkpoint's run trained with
        config = dataclasses.replace(config, seed=int(payload.get("config", {}).get("seed", EvalConfig.seed)))
    images = _images(args, config, payload, args.split, None)
    chosen = images.subset(_pick(args.num_images, len(images), config.seed))
    device = chosen.images.device
    out_dtype = torch.bfloat16 if config.bf16 and device.type == "cuda" else torch.float32  # the trainer's patches
    picture, _, rows, backend, _ = augmentation_preview(
        chosen,
        augment_config_for(chosen.patch_size or int(chosen.images.shape[1])),
        config.augment_backend,
        args.num_patches,
        config.seed,
        args.step,
        out_dtype,
    )
    write_png(args.out, picture)
    write_csv(outputs[1], PREVIEW_COLUMNS, rows)
    print(
        f"wrote {args.out}: {len(chosen)} images and {args.num_patches} patches of each, cut by the {backend} "
        f"backend on {device} (seed {config.seed}, step {args.step}); the patches' parameters in {outputs[1]}"
    )
    return 0
