"""Data sets as uint8 tensors (docs/method.md sections 1 and 6).

Every data set becomes ``ImageDataset``: train and test images as uint8 tensors of shape
(N, H, W, 3) with int64 labels, moved to the training device once. The trainer and the
evaluation take batches as index slices of these tensors: no DataLoader, no per-sample
Python in a step.

Specs understood by ``load_dataset``:

- ``cifar10``, ``cifar100``: torchvision's download format under ``root``
  (cifar-10-batches-py/, cifar-100-python/); ``download=True`` fetches the archive
  with torchvision (MD5-checked).
- ``folder:PATH``: an ImageFolder tree (PATH/train/<class>/*, PATH/val or PATH/test/<class>/*,
  or one PATH/<class>/* tree split deterministically), decoded once into a cached uint8 array
  (empssl.image_folder).
- ``npz:PATH``: arrays ``images`` (N, H, W, 3) uint8 and ``labels`` (N,), optionally
  ``test_images`` / ``test_labels``.
- ``synthetic``: procedural shapes and textures in 10 classes, generated from a seed.
"""
from __future__ import annotations

import math
import os
import urllib.error
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .image_dataset import DataError, ImageDataset, check_batch_size, check_labels, deterministic_split
from .image_folder import load_image_folder

BAD_IMAGE_POLICIES = ("skip", "error")
DATASET_SPECS = "cifar10, cifar100, synthetic, folder:PATH or npz:PATH"



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
) -> ImageDataset:
    """Load a data set by spec (see the module docstring) and move it to ``device`` once.

    ``train_size`` / ``test_size``: the number of images of the synthetic set, or the first
    images of any other set. ``image_size``: output size of ``folder:`` and ``synthetic``.
    """
    if not isinstance(spec, str):
        raise TypeError(f"dataset spec must be a string, got {type(spec).__name__}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    kind, _, path = spec.partition(":")
    if kind in ("cifar10", "cifar100") and not path:
        if image_size not in (None, 32):
            raise ValueError(f"{kind} images are 32x32; image_size={image_size} applies to folder: and synthetic only")
        if download:
            download_cifar(kind, root)
        data = load_cifar(kind, root).subset(train_size, test_size)
    elif kind == "synthetic" and not path:
        data = make_synthetic(train_size or 10000, test_size or 2000, image_size or 32, seed)
    elif kind == "folder" and path:
        data = load_image_folder(path, image_size or 32, cache_dir, on_bad_image, seed, show_progress)
        data = data.subset(train_size, test_size)
    elif kind == "npz" and path:
        data = load_npz(path, seed).subset(train_size, test_size)
        stored = data.image_size
        if image_size is not None and stored != (image_size, image_size):
            raise ValueError(f"npz file {path} holds {stored[0]}x{stored[1]} images, but image_size={image_size} was "
                             f"asked for; npz images keep their stored size: drop --image-size or pass {stored[0]}")
    else:
        raise ValueError(f"unknown dataset spec {spec!r}; expected one of {DATASET_SPECS}")
    return data.to(device) if device is not None else data


# ----------------------------------------------------------------------------- CIFAR

_CIFAR_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _torchvision_cifar_class(kind):
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if kind == "cifar10" else CIFAR100


def _cifar_files(source):
    """(file name, MD5) of every file torchvision's CIFAR class reads: the batches, then the class names."""
    return [tuple(entry) for entry in source.train_list + source.test_list] + [(source.meta["filename"], source.meta["md5"])]


def download_cifar(kind: str, root: str) -> None:
    """Fetch and extract the CIFAR archive with torchvision (MD5-checked) unless its files are already there."""
    source = _torchvision_cifar_class(kind)
    folder = os.path.join(root, source.base_folder)
    if all(os.path.exists(os.path.join(folder, name)) for name, _md5 in _cifar_files(source)):
        return
    from torchvision.datasets.utils import download_and_extract_archive

    title = _CIFAR_TITLES[kind]
    try:
        download_and_extract_archive(source.url, root, filename=source.filename, md5=source.tgz_md5)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        raise DataError(
            f"could not download {title} from {source.url}: {err}. The network looks unreachable from this "
            f"machine; download {source.filename} elsewhere, extract it under {os.path.abspath(root)} "
            f"(giving {source.base_folder}/) and run again without --download"
        ) from err
    except RuntimeError as err:  # torchvision: "File not found or corrupted." after an MD5 mismatch
        raise DataError(f"the downloaded {title} archive failed its MD5 check ({err}); delete "
                        f"{os.path.join(root, source.filename)} and retry") from err


def load_cifar(kind: str, root: str) -> ImageDataset:
    """CIFAR-10 / CIFAR-100 under ``root`` in torchvision's download format, read by torchvision."""
    from torchvision.datasets.utils import check_integrity

    source, title = _torchvision_cifar_class(kind), _CIFAR_TITLES[kind]
    folder = os.path.join(root, source.base_folder)
    if not os.path.isdir(folder):
        raise DataError(f"{title} not found: no folder {folder}; pass --root to the folder that holds "
                        f"{source.base_folder}/ or --download to fetch it")
    # torchvision checks the same MD5s but only says "not found or corrupted": name the file
    for name, md5 in _cifar_files(source):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DataError(f"CIFAR file {path} not found; run with --download to fetch {title} again")
        if not check_integrity(path, md5):
            raise DataError(f"CIFAR file {path} is corrupt (its MD5 is not torchvision's {md5}); delete it and "
                            f"run with --download")
    splits = {}
    for split in ("train", "test"):
        dataset = source(root, train=split == "train", download=False)
        splits[split] = (torch.from_numpy(np.ascontiguousarray(dataset.data, dtype=np.uint8)),
                         torch.as_tensor(dataset.targets, dtype=torch.int64))
    return ImageDataset(kind, *splits["train"], *splits["test"], classes=[str(name) for name in dataset.classes])


# ----------------------------------------------------------------------------- npz


def load_npz(path: str, seed: int = 0) -> ImageDataset:
    """Arrays ``images`` / ``labels`` (and optional ``test_images`` / ``test_labels``) from one .npz file."""
    if not os.path.exists(path):
        raise DataError(f"npz file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            content = {key: arrays[key] for key in arrays.files}
    except Exception as err:
        raise DataError(f"npz file {path} is corrupt or not an .npz archive ({type(err).__name__}: {err})") from err
    for key in ("images", "labels"):
        if key not in content:
            raise DataError(f"npz file {path} has no array {key!r} (found: {sorted(content)})")
    if ("test_images" in content) != ("test_labels" in content):
        raise DataError(f"npz file {path} must hold both test_images and test_labels, or neither")
    for key in ("images", "test_images"):
        if key in content and (content[key].dtype != np.uint8 or content[key].ndim != 4 or content[key].shape[-1] != 3):
            raise DataError(f"npz file {path}: {key} must be uint8 of shape (N, H, W, 3), got "
                            f"{content[key].dtype} {content[key].shape}")
    for images_key, labels_key in (("images", "labels"), ("test_images", "test_labels")):
        if images_key in content and content[labels_key].shape != (len(content[images_key]),):
            raise DataError(f"npz file {path}: {len(content[images_key])} {images_key} but {labels_key} of shape "
                            f"{content[labels_key].shape}; expected one label per image, shape ({len(content[images_key])},)")
    num_images = sum(len(content[key]) for key in ("images", "test_images") if key in content)
    for key in ("labels", "test_labels"):  # before anything is sized by them
        if key in content:
            content[key] = check_labels(content[key], f"npz file {path}", key, num_images)
    images, labels = content["images"], content["labels"]
    if "test_images" in content:
        test_images, test_labels = content["test_images"], content["test_labels"]
    else:
        train_idx, test_idx = deterministic_split(len(images), seed=seed)
        images, labels, test_images, test_labels = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    all_labels = np.concatenate([labels, test_labels])
    num_classes = int(all_labels.max()) + 1
    name = f"npz:{path}"
    return ImageDataset(name, torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels),
                        torch.from_numpy(np.ascontiguousarray(test_images)), torch.from_numpy(test_labels),
                        classes=[str(i) for i in range(num_classes)])



# ----------------------------------------------------------------------------- synthetic

SYNTHETIC_CLASSES = ("disc", "square", "triangle", "ring", "cross", "stripes_horizontal", "stripes_vertical",
                     "checker", "dots", "gradient")


class _Geometry:
    """Per-image shape parameters (k, 1, 1) of the images of one class, and their offsets from the centre."""

    def __init__(self, cy, cx, radius, period, phase, angle, y, x):
        self.radius, self.period, self.phase, self.angle = radius, period, phase, angle
        self.dy, self.dx = y - cy, x - cx
        self.dist = torch.sqrt(self.dx * self.dx + self.dy * self.dy)

    def wave(self, t):
        return torch.sin(2 * math.pi * (t / self.period + self.phase))


def _synthetic_split(count: int, size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (count, size, size, 3) uint8 of random classes, all drawn from ``generator``."""
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    labels = torch.randint(len(SYNTHETIC_CLASSES), (count,), generator=generator)
    # pixel centres in [0, 1); per-image geometry: centre, radius, texture period and phase, angle
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    cy, cx = (0.3 + 0.4 * u(count)).view(-1, 1, 1), (0.3 + 0.4 * u(count)).view(-1, 1, 1)
    radius = (0.18 + 0.14 * u(count)).view(-1, 1, 1)
    period = (0.16 + 0.14 * u(count)).view(-1, 1, 1)
    phase = u(count).view(-1, 1, 1)
    angle = (2 * math.pi * u(count)).view(-1, 1, 1)
    # each class's mask is computed on that class's images only (a soft mask in [0, 1] for the gradient)
    shapes = {
        "disc": lambda g: g.dist < g.radius,
        "square": lambda g: torch.maximum(g.dx.abs(), g.dy.abs()) < 0.85 * g.radius,
        # upward triangle: apex at cy - r, base at cy + r
        "triangle": lambda g: (g.dy.abs() < g.radius) & (g.dx.abs() < 0.6 * (g.dy + g.radius)),
        "ring": lambda g: (g.dist < g.radius) & (g.dist > 0.55 * g.radius),
        "cross": lambda g: (((g.dx.abs() < 0.3 * g.radius) & (g.dy.abs() < g.radius))
                            | ((g.dy.abs() < 0.3 * g.radius) & (g.dx.abs() < g.radius))),
        "stripes_horizontal": lambda g: g.wave(y) + 0 * x > 0,
        "stripes_vertical": lambda g: g.wave(x) + 0 * y > 0,
        "checker": lambda g: g.wave(x) * g.wave(y) > 0,
        "dots": lambda g: ((((x / g.period + g.phase) % 1) - 0.5) ** 2 + (((y / g.period + g.phase) % 1) - 0.5) ** 2) < 0.09,
        "gradient": lambda g: (0.5 + (g.dx * torch.cos(g.angle) + g.dy * torch.sin(g.angle)) * 1.6).clamp(0, 1),
    }
    alpha = torch.zeros(count, size, size)
    for index, name in enumerate(SYNTHETIC_CLASSES):
        selected = (labels == index).nonzero().squeeze(1)
        g = _Geometry(cy[selected], cx[selected], radius[selected], period[selected], phase[selected], angle[selected], y, x)
        alpha[selected] = shapes[name](g).float()
    # colours: background anywhere, foreground shifted in every channel so the shape always shows
    background = u(count, 1, 1, 3)
    foreground = (background + 0.3 + 0.4 * u(count, 1, 1, 3)) % 1.0
    images = background + alpha.unsqueeze(-1) * (foreground - background)
    images = images + 0.06 * torch.randn(images.shape, generator=generator)  # sensor-like noise
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def make_synthetic(train_size: int = 10000, test_size: int = 2000, image_size: int = 32, seed: int = 0) -> ImageDataset:
    """Procedural labelled images: 10 classes of shapes and textures with random colours, positions, sizes.

    Deterministic from ``seed``; vectorised (10k 32x32 images in about a second on one CPU core); no files.
    """
    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = _synthetic_split(train_size, image_size, generator)
    test_images, test_labels = _synthetic_split(test_size, image_size, generator)
    return ImageDataset("synthetic", train_images, train_labels, test_images, test_labels, classes=list(SYNTHETIC_CLASSES))



# ImageDataset, DataError and the shared checks live in empssl.image_dataset, the folder loader in empssl.image_folder
__all__: Sequence[str] = ["DataError", "ImageDataset", "load_dataset", "load_cifar", "download_cifar", "load_npz",
                          "load_image_folder", "make_synthetic", "deterministic_split", "check_batch_size",
                          "SYNTHETIC_CLASSES"]
