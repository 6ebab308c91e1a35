"""``load_dataset``: a data set by its spec, as an ``ImageDataset`` (docs/method.md sections 1 and 6).

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
  (``empssl.data.folder``).
- ``npz:PATH``: arrays ``images`` (N, H, W, 3) uint8 and ``labels`` (N,), optionally
  ``test_images`` / ``test_labels``.
- ``synthetic``: procedural shapes and textures in 10 classes, generated from a seed.
"""

from __future__ import annotations

from typing import Optional

from .cifar import download_cifar, load_cifar
from .dataset import ImageDataset
from .folder import load_image_folder
from .npz import load_npz
from .synthetic import make_synthetic

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
            raise ValueError(
                f"npz file {path} holds {stored[0]}x{stored[1]} images, but image_size={image_size} was "
                f"asked for; npz images keep their stored size: drop --image-size or pass {stored[0]}"
            )
    else:
        raise ValueError(f"unknown dataset spec {spec!r}; expected one of {DATASET_SPECS}")
    return data.to(device) if device is not None else data
