"""``ImageDataset`` (train and test images as uint8 tensors or on-disk stores, int64 labels), its errors, and the
checks and splits every loader shares (empssl.data and empssl.data.folder make data sets of this type)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..device import check_fits

TEST_FRACTION = 0.1  # of a data set that comes without a test split
MAX_DEFAULT_PATCH = 224  # the default patch size is the stored size up to the ImageNet recipe's
# labels are class indices 0 <= label < max(number of images, MAX_CLASSES): a larger one is a broken file, not a class
# (ImageNet-21k has 21,841 classes); the check comes before a list of class names is built
MAX_CLASSES = 2**20


class DataError(ValueError):
    """A data set cannot be read; the message names the file or folder and says why."""


@dataclasses.dataclass
class ImageDataset:
    """Train and test images (N, H, W, 3) uint8 with int64 labels.

    The images of a split are a tensor (in memory, on one device) or an ``ImageStore`` (``empssl.data.store``: the
    same images on disk, read a batch at a time). ``train_sizes`` / ``test_sizes``: int64 (N, 2), each image's
    (height, width) in the top-left corner of its H x W canvas, where the images keep their own aspect ratios (None:
    every image fills the canvas). ``classes``: [] for unlabelled images (labels -1, no test split). ``patch_size``:
    the patch size of the data set's recipe (None: the image size, up to 224). ``layout``, ``note``: the layout
    found and how the images are held, for messages.
    """

    name: str
    train_images: Any
    train_labels: torch.Tensor
    test_images: Any
    test_labels: torch.Tensor
    classes: List[str]
    train_sizes: Optional[torch.Tensor] = None
    test_sizes: Optional[torch.Tensor] = None
    patch_size: Optional[int] = None
    layout: str = ""
    note: str = ""

    def __post_init__(self):
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            sizes = getattr(self, f"{split}_sizes")
            if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise DataError(
                    f"{self.name}: {split} images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
                )
            if labels.shape != (images.shape[0],):
                raise DataError(
                    f"{self.name}: {split} labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}"
                )
            if sizes is not None and tuple(sizes.shape) != (images.shape[0], 2):
                raise DataError(
                    f"{self.name}: {split} sizes must have shape ({images.shape[0]}, 2), got {tuple(sizes.shape)}"
                )
            if images.shape[0] == 0 and (split == "train" or self.labelled):
                raise DataError(f"{self.name}: the {split} split is empty")
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise DataError(
                f"{self.name}: train images {tuple(self.train_images.shape[1:])} and test images "
                f"{tuple(self.test_images.shape[1:])} differ in size"
            )
        self.train_labels = self.train_labels.long()
        self.test_labels = self.test_labels.long()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    @property
    def image_size(self) -> Tuple[int, int]:
        """(H, W) of the canvas every image is held in."""
        return int(self.train_images.shape[1]), int(self.train_images.shape[2])

    @property
    def recipe_patch_size(self) -> int:
        """The patch size of this data set's recipe: ``patch_size``, else the image size up to ``MAX_DEFAULT_PATCH``."""
        if self.patch_size is not None:
            return self.patch_size
        smallest = min(self.image_size)
        if self.train_sizes is not None:
            smallest = int(self.train_sizes.min())
        return min(smallest, MAX_DEFAULT_PATCH)

    def to(self, device) -> "ImageDataset":
        """The tensors on ``device`` (ValueError, before any copy, if they do not fit in the memory left there); a
        split held in a store stays on disk."""
        target = torch.device(device)
        tensors = [
            t
            for t in (self.train_images, self.train_labels, self.test_images, self.test_labels)
            if isinstance(t, torch.Tensor) and t.device != target
        ]
        if tensors:
            check_fits(
                sum(t.numel() * t.element_size() for t in tensors),
                target,
                f"{self.name} ({len(self.train_labels)} train and {len(self.test_labels)} test images)",
                "use fewer images (--train-size, --test-size), a smaller --image-size, or --stream on",
            )
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return dataclasses.replace(
            self,
            train_images=move(self.train_images),
            train_labels=move(self.train_labels),
            test_images=move(self.test_images),
            test_labels=move(self.test_labels),
            train_sizes=move(self.train_sizes),
            test_sizes=move(self.test_sizes),
        )

    def subset(self, train_size: Optional[int] = None, test_size: Optional[int] = None) -> "ImageDataset":
        """The first ``train_size`` / ``test_size`` images of each split (for quick runs)."""

        def first(split, size):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            sizes = getattr(self, f"{split}_sizes")
            if size is None:
                return {f"{split}_images": images, f"{split}_labels": labels, f"{split}_sizes": sizes}
            if size <= 0:
                raise ValueError(f"{split}_size must be positive, got {size}")
            return {
                f"{split}_images": images[:size],
                f"{split}_labels": labels[:size],
                f"{split}_sizes": None if sizes is None else sizes[:size],
            }

        return dataclasses.replace(self, **first("train", train_size), **first("test", test_size))

    def __repr__(self) -> str:
        h, w = self.image_size
        where = self.train_images.device if isinstance(self.train_images, torch.Tensor) else "disk (a store)"
        return (
            f"ImageDataset({self.name!r}: {len(self.train_labels)} train / {len(self.test_labels)} test images, "
            f"{h}x{w}, {self.num_classes} classes, on {where})"
        )


def check_patch_size(data: "ImageDataset", patch_size: int, smallest: int) -> None:
    """DataError in the data's terms when the patches would be smaller than the augmentation recipe takes."""
    if patch_size >= smallest:
        return
    if patch_size != data.recipe_patch_size:
        raise DataError(
            f"--patch-size {patch_size} is below the smallest patch the augmentation takes, {smallest}x{smallest} "
            f"(its blur kernel needs room)"
        )
    height, width = data.image_size
    raise DataError(
        f"{data.name}: images are {height}x{width}; the smallest the augmentation takes is "
        f"{smallest}x{smallest} (its blur kernel needs room): use larger images, a folder: data "
        f"set with --image-size {smallest} or more, or --patch-size {smallest}"
    )


def deterministic_split(
    n: int, test_fraction: float = TEST_FRACTION, seed: int = 0, classes: Optional[Sequence] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices of a seeded permutation of range(n); the test part gets at least one. With
    ``classes`` (one per index) each class is split alike and keeps at least one index in training, so the test
    part holds no class the training part lacks."""
    if n < 2:
        raise DataError(f"cannot split {n} image(s) into train and test; provide at least 2")
    rng = np.random.default_rng(seed)
    if classes is None:
        order = rng.permutation(n)
        num_test = min(n - 1, max(1, int(round(n * test_fraction))))
        return np.sort(order[num_test:]), np.sort(order[:num_test])
    names = np.asarray(classes)
    train, test = [], []
    for name in np.unique(names):
        members = rng.permutation(np.flatnonzero(names == name))
        num_test = min(len(members) - 1, int(round(len(members) * test_fraction)))
        train.append(members[num_test:])
        test.append(members[:num_test])
    if not sum(map(len, test)):  # every class too small for its share: the largest one gives one image
        largest = int(np.argmax([len(part) for part in train]))
        if len(train[largest]) < 2:
            raise DataError(
                f"cannot split {n} images of {n} classes into train and test: each class needs an image in training "
                f"and one is needed for testing; provide at least 2 images of a class"
            )
        train[largest], test[largest] = train[largest][1:], train[largest][:1]
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def check_labels(labels: np.ndarray, source: str, array: str, num_images: int) -> np.ndarray:
    """``labels`` as int64 class indices; DataError naming ``source`` and ``array`` unless they are integral numbers
    with 0 <= label < max(num_images, MAX_CLASSES)."""
    if labels.dtype.kind in "iu":
        values = labels
    elif labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            bad = labels[~(np.isfinite(labels) & (labels == np.round(labels)))].ravel()[:3]
            raise DataError(
                f"{source}: {array} must be integer class indices, but it holds non-integral values "
                f"such as {', '.join(repr(float(v)) for v in bad)}"
            )
        values = labels
    elif labels.dtype.kind == "b":
        values = labels.astype(np.int64)
    else:
        raise DataError(
            f"{source}: {array} must be integer class indices, got an array of {labels.dtype} "
            f"(e.g. {labels.ravel()[:1].tolist()}); map class names to 0, 1, ... first"
        )
    bound = max(num_images, MAX_CLASSES)
    if values.size and (values.min() < 0 or values.max() >= bound):
        worst = int(values.min() if values.min() < 0 else values.max())
        raise DataError(
            f"{source}: {array} holds the label {worst!r}; labels must be class indices with 0 <= label < "
            f"{bound:,} (the larger of the number of images and {MAX_CLASSES:,})"
        )
    return values.astype(np.int64)


FINGERPRINT_SAMPLE_BYTES = 2**24  # of whole images hashed by ``fingerprint`` (16 MiB: tens of milliseconds)
_FINGERPRINT_CHUNK = 4096  # images summed at once (bounded memory for the int64 sums)


def fingerprint(images) -> str:
    """A cheap identity of a set of uint8 images (N, H, W, 3), on any device: SHA-256 of their shape, of every image's
    sum of its bytes (as 64-bit words where they divide evenly; one pass over the data), and of the bytes of whole
    images at evenly spaced indices, first and last included (up to ``FINGERPRINT_SAMPLE_BYTES``). Other images of
    the same count and size give another one. CIFAR-10's 50,000 training images: about 0.05 s on a 2-core CPU.
    ``images`` may be an ``ImageStore``: its sums were taken when it was built and its sampled images are read from
    it, so the same images give the same value held in memory or on disk, without a pass over the store."""
    count = int(images.shape[0])
    digest = hashlib.sha256(f"{tuple(images.shape)}|{images.dtype}".encode())
    per_image = max(1, math.prod(images.shape[1:]) if count else 0)
    in_memory = isinstance(images, torch.Tensor)
    if not in_memory:
        digest.update(np.ascontiguousarray(images.sums, dtype=np.int64).tobytes())
    for start in range(0, count if in_memory else 0, _FINGERPRINT_CHUNK):
        rows = images[start : start + _FINGERPRINT_CHUNK].contiguous().reshape(-1, per_image)
        if per_image % 8 == 0:  # the bytes as 64-bit words, summed modulo 2^64: exact on any device, 100x faster
            sums = rows.view(torch.int64).sum(1)
        else:
            sums = rows.sum(1, dtype=torch.int64)
        digest.update(sums.cpu().numpy().tobytes())
    samples = max(2, min(count, FINGERPRINT_SAMPLE_BYTES // per_image))
    index = torch.linspace(0, count - 1, samples, dtype=torch.float64).round().long().unique()
    if in_memory:
        digest.update(images.index_select(0, index.to(images.device)).contiguous().cpu().numpy().tobytes())
    else:  # read a few images at a time: the same bytes in the same order, little memory held
        chunk = max(1, 2**20 // per_image)
        buffer = np.empty((chunk, *images.shape[1:]), np.uint8)
        for start in range(0, len(index), chunk):
            ids = index[start : start + chunk].numpy()
            digest.update(memoryview(images.read(ids, buffer[: len(ids)])).cast("B"))
    return digest.hexdigest()[:32]


def check_batch_size(batch_size: int, num_images: int, what: str = "training set") -> None:
    """Raise if ``batch_size`` is not a positive integer no larger than the data set."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > num_images:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {what} ({num_images} images); "
            f"pass a smaller --batch-size or use more images"
        )
