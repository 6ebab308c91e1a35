"""``load_dataset``: a data set by its spec, as an ``ImageDataset`` (docs/method.md sections 1 and 6).

Every data set becomes ``ImageDataset``: train and test images as uint8 (N, H, W, 3) with int64 labels. In memory
(the default where a set fits) the images are tensors moved to the training device once, and a batch is an index
slice of them: no DataLoader, no per-sample Python in a step. A decoded image tree that does not fit stays in its
on-disk store (``empssl.data.store``), from which each step reads its own images (``empssl.data.batches``).

Specs understood by ``load_dataset``:

- ``cifar10``, ``cifar100``: torchvision's download format under ``root``
  (cifar-10-batches-py/, cifar-100-python/); ``download=True`` fetches the archive
  with torchvision (MD5-checked).
- ``folder:PATH``: an image tree whose layout is found from what it holds (ImageNet style train/ and val/,
  Tiny ImageNet, one <class>/ tree split deterministically, or a flat folder of unlabelled images);
  ``tinyimagenet:PATH``, ``imagenet100:PATH`` (CMC's 100 classes of an ImageNet-1k tree), ``unlabelled:PATH``
  (every image below PATH, no labels): ``empssl.data.layouts``. Decoded once into stores (``empssl.data.folder``).
- ``npz:PATH``: arrays ``images`` (N, H, W, 3) uint8 and ``labels`` (N,), optionally
  ``test_images`` / ``test_labels``.
- ``synthetic``: procedural shapes and textures in 10 classes, generated from a seed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..device import host_memory_available
from .cifar import download_cifar, load_cifar
from .dataset import MAX_DEFAULT_PATCH, DataError, ImageDataset
from .folder import load_image_folder
from .layouts import KINDS, layout_defaults
from .npz import load_npz
from .synthetic import make_synthetic

BAD_IMAGE_POLICIES = ("skip", "error")
TREE_SPECS = ", ".join(f"{kind}:PATH" for kind in KINDS)
STREAM_CHOICES = ("auto", "on", "off")
DATASET_SPECS = (
    "cifar10, cifar100, synthetic, folder:PATH, tinyimagenet:PATH, imagenet100:PATH, unlabelled:PATH or npz:PATH"
)
# a split is held in memory when it takes at most this share of the memory this process may use (and, on a GPU, of
# the GPU's free memory): the rest is for the model, the step and everything else the process holds
MEMORY_SHARE = 0.5


def _gib(nbytes: float) -> str:
    """A size in the unit a reader takes in at a glance."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def fits_in_memory(nbytes: int, device=None, kept: int = 0) -> Tuple[bool, str]:
    """(whether ``nbytes`` of images are held in memory under the rule, why): at most ``MEMORY_SHARE`` of the host
    memory this process may use (a cgroup's limit included) and, on a CUDA device, of its free memory less the
    ``kept`` bytes of splits already chosen for it (loaded on the host, not yet on the device)."""
    available, bound = host_memory_available()
    if available is not None and nbytes > MEMORY_SHARE * available:
        return False, f"more than half of the {_gib(available)} this process may use ({bound})"
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free = max(0, free - kept)
        if nbytes > MEMORY_SHARE * free:
            left = f" beside the {_gib(kept)} of the split before it" if kept else ""
            return False, f"more than half of the {_gib(free)} free on {device}{left}"
    where = f"{_gib(available)} this process may use ({bound})" if available is not None else "unknown host memory"
    return True, f"at most half of the {where}"


def memory_rule(device=None) -> str:
    """The in-memory-or-store rule in words, with this machine's numbers (``empssl info`` prints it)."""
    available, bound = host_memory_available()
    here = f"here {_gib(available)}: {bound}" if available is not None else "unknown here"
    gpu = "and, training on a GPU, at most half of its free memory"
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        gpu += f" ({_gib(free)} on {device} now)"
    return (
        f"a split of a decoded image tree is held in memory when it takes at most half of the memory this "
        f"process may use ({here}) {gpu}; otherwise each step reads its images from the on-disk store "
        f"(--stream on|off decides instead)"
    )


def recipe_patch_size(spec: str, image_size: Optional[int] = None) -> int:
    """The patch size of a data set's recipe from its spec alone (before it is loaded): the layout's for
    ``tinyimagenet:``, ``imagenet100:`` and a ``folder:`` tree in the Tiny ImageNet layout (at most the stored
    size), else the image size (default 32) up to ``MAX_DEFAULT_PATCH``."""
    kind, _, path = spec.partition(":")
    defaults = layout_defaults(kind, path) if kind in KINDS and path else None
    if defaults is not None and defaults.patch_size:
        return min(defaults.patch_size, image_size or defaults.image_size)
    return min(image_size or 32, MAX_DEFAULT_PATCH)


def _hold(data: ImageDataset, stream: str, device, need_test: bool, show_progress: bool) -> ImageDataset:
    """Each split of a stored data set in memory or left in its store, by ``stream`` and the rule."""
    replace, notes, kept = {}, [], 0
    for split in ("train", "test") if need_test else ("train",):
        store = getattr(data, f"{split}_images")
        if isinstance(store, torch.Tensor) or len(store) == 0:
            continue
        if stream == "auto":
            in_memory, why = fits_in_memory(store.nbytes, device, kept)
        else:
            in_memory, why = stream == "off", f"--stream {stream}"
        if in_memory:
            replace[f"{split}_images"] = store.load(show_progress, f"load {split} split")
            kept += store.nbytes
        where = "in memory" if in_memory else f"streamed from the store {store.path}"
        notes.append(
            f"{split}: {len(store):,} images of {store.canvas}x{store.canvas} ({_gib(store.nbytes)}) {where}: {why}"
        )
    if not notes:
        return data
    import dataclasses

    return dataclasses.replace(data, **replace, note="; ".join(notes))


def load_dataset(
    spec: str,
    root: str = "data",
    download: bool = False,
    image_size: Optional[int] = None,
    cache_dir: Optional[str] = None,
    on_bad_image: str = "skip",
    seed: int = 0,
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
    device=None,
    show_progress: bool = True,
    max_aspect: Optional[float] = None,
    stream: str = "auto",
    need_test: bool = True,
    need_labels: bool = False,
) -> ImageDataset:
    """Load a data set by spec (see the module docstring) and move its in-memory tensors to ``device`` once.

    ``train_size`` / ``test_size``: the number of images of the synthetic set, the first images of CIFAR and npz (in
    their files' order), or images of an image tree drawn by ``seed`` from the whole split (the tree's listing is
    sorted by class: its first images would be its first classes). ``image_size``: the stored size (shorter side) of
    image trees and the size of ``synthetic``; ``max_aspect``: the longest aspect ratio an image tree's images keep
    whole. ``stream``: ``auto`` holds each split of an image tree in memory where it fits (``fits_in_memory``) and
    in its on-disk store otherwise; ``on`` / ``off`` force either. ``need_test=False`` (training) leaves the test
    split in its store; ``need_labels`` (evaluation) refuses an unlabelled tree before decoding it.
    """
    if not isinstance(spec, str):
        raise TypeError(f"dataset spec must be a string, got {type(spec).__name__}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    if stream not in STREAM_CHOICES:
        raise ValueError(f"stream must be one of {STREAM_CHOICES}, got {stream!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    kind, _, path = spec.partition(":")
    if kind in KINDS and path:
        data = load_image_folder(
            path, image_size, cache_dir, on_bad_image, seed, show_progress, kind, max_aspect, need_labels, train_size,
            test_size,
        )  # fmt: skip
        data = _hold(data, stream, device, need_test, show_progress)
        return data.to(device) if device is not None else data
    if stream == "on":
        raise DataError(
            f"--stream on reads images from the store of a decoded image tree ({TREE_SPECS}); {spec} is read into "
            f"memory: drop --stream on"
        )
    if max_aspect is not None:
        raise ValueError(f"max_aspect applies to image trees ({TREE_SPECS}), not {spec}")
    if kind in ("cifar10", "cifar100") and not path:
        if image_size not in (None, 32):
            raise ValueError(f"{kind} images are 32x32; image_size={image_size} applies to image trees and synthetic")
        if download:
            download_cifar(kind, root)
        data = load_cifar(kind, root).subset(train_size, test_size)
    elif kind == "synthetic" and not path:
        data = make_synthetic(train_size or 10000, test_size or 2000, image_size or 32, seed)
    elif kind == "npz" and path:
        data = load_npz(path, seed).subset(train_size, test_size)
        stored = data.image_size
        if image_size is not None and stored != (image_size, image_size):
            raise ValueError(
                f"npz file {path} holds {stored[0]}x{stored[1]} images, but image_size={image_size} was "
                f"asked for; npz images keep their stored size: drop --image-size or pass {stored[0]}"
            )
    else:
        raise ValueError(f"unknown dataset spec {spec!r}; expected one of {DATASET_SPECS}")
    return data.to(device) if device is not None else data
