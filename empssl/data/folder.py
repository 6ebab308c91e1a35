"""Image trees (``folder:``, ``tinyimagenet:``, ``imagenet100:``, ``unlabelled:`` PATH) decoded once into stores.

The tree is listed by ``empssl.data.layouts``; each split is decoded once, on every core, into an on-disk store
(``empssl.data.store``) in the cache folder (default PATH/.empssl_cache), named by a fingerprint of every file's
path, size and mtime and of the storage settings, so a changed tree or setting gets a new store and the stale one is
removed (only stores of this tree's, proven by their header). ``load_image_folder`` returns an ``ImageDataset``
whose splits are these stores; ``empssl.data.load`` reads a split into memory where it fits.

Storage: each image keeps its aspect ratio up to ``max_aspect`` (the longer side centre-cropped beyond it; 1: the
centre square), its shorter side resized to ``image_size``, in the top-left corner of a canvas whose side is the
longest kept side (``canvas_size``); the patches are cut from the image at this resolution (docs/method.md section 4).
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Optional

import numpy as np

from ..files import check_writable_folder
from .build import build_store, remove_stale_stores
from .dataset import DataError, ImageDataset
from .layouts import Listing, list_images
from .store import SUFFIX, ImageStore, StoreError, store_header

STORE_VERSION = 2  # of what a store holds: changing the decoding changes it, so old stores are not reused
MAX_ASPECT_LIMIT = 4.0


def canvas_size(image_size: int, max_aspect: float) -> int:
    """The side of the square canvas that holds an image of shorter side ``image_size`` kept up to ``max_aspect``."""
    return int(math.floor(image_size * max_aspect + 1e-9))


def to_rgb8(image):
    """An RGB image of 8 bits per channel. High-depth modes (I;16*, I, F) are scaled to 8 bits, never clipped: PIL's
    own convert("RGB") clips them at 255, so a 16-bit photo would come out nearly white. 16-bit data (I;16*, and I
    whose values fit 16 bits) is divided by 257; F in [0, 1] is multiplied by 255; wider ranges are scaled from 0 to
    their bit depth's maximum (negative values: from their minimum)."""
    from PIL import Image

    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    values = np.asarray(image, dtype=np.float64)
    low = min(0.0, float(values.min())) if values.size else 0.0
    high = float(values.max()) - low if values.size else 0.0
    if image.mode == "F" and low == 0 and high <= 1.0:
        full = 1.0
    elif image.mode.startswith("I;16") or high <= 65535:
        full = 65535.0
    else:
        full = float(2 ** int(np.ceil(np.log2(high + 1))) - 1)
    gray = np.clip(np.round((values - low) * (255.0 / full)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def decode_image(file: str, image_size: int, max_aspect: float = 1.0) -> np.ndarray:
    """One image file -> (h, w, 3) uint8 RGB: the shorter side resized to ``image_size``, the longer side kept up
    to ``max_aspect`` times that (centre-cropped beyond it). The crop is taken before the resize (PIL's ``box``), so
    the work is bounded by the output, and a JPEG is decoded at the smallest DCT scale that is still at least the
    output's size."""
    from PIL import Image

    with Image.open(file) as image:
        width, height = image.size
        if image.format == "JPEG":
            scale = image_size / min(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        image = to_rgb8(image)
        width, height = image.size
        scale = image_size / min(width, height)
        longest = canvas_size(image_size, max_aspect)
        out_w = min(max(image_size, round(width * scale)), longest) if width >= height else image_size
        out_h = min(max(image_size, round(height * scale)), longest) if height > width else image_size
        box_w, box_h = min(width, out_w / scale), min(height, out_h / scale)
        left, top = (width - box_w) / 2, (height - box_h) / 2
        image = image.resize((out_w, out_h), Image.BILINEAR, box=(left, top, left + box_w, top + box_h))
        return np.asarray(image, dtype=np.uint8)


def _fingerprint(listing: Listing, image_size: int, max_aspect: float, on_bad_image: str, seed: int) -> str:
    """Hash of every file's relative path, class, size and mtime, plus the layout and the storage settings."""
    settings = f"v{STORE_VERSION}|{listing.kind}|{listing.layout}|{image_size}|{max_aspect!r}|{on_bad_image}|{seed}"
    digest = hashlib.sha256(settings.encode())
    for split, entries in listing.splits.items():
        for file, class_name in entries:
            try:
                stat = os.stat(file)
            except OSError as err:
                raise DataError(f"cannot read {file}: {err.strerror or err}") from None
            relative = os.path.relpath(file, listing.path)
            digest.update(f"{split}|{relative}|{class_name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def check_storage(image_size: int, max_aspect: float) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 1 <= image_size <= 8192:
        raise ValueError(f"image_size must be an integer from 1 to 8192, got {image_size!r}")
    if not (isinstance(max_aspect, (int, float)) and 1.0 <= max_aspect <= MAX_ASPECT_LIMIT):
        raise ValueError(f"max_aspect must be a number from 1 to {MAX_ASPECT_LIMIT:g}, got {max_aspect!r}")


def load_image_folder(
    path: str,
    image_size: Optional[int] = None,
    cache_dir: Optional[str] = None,
    on_bad_image: str = "skip",
    seed: int = 0,
    show_progress: bool = True,
    kind: str = "folder",
    max_aspect: Optional[float] = None,
    need_labels: bool = False,
) -> ImageDataset:
    """The tree at ``path`` read as ``kind`` (``empssl.data.layouts``), each split decoded once into a store (built
    in parallel, resumed if interrupted, reused while the tree and settings are unchanged); the returned data set's
    images are these stores (``ImageStore``). ``image_size`` / ``max_aspect``: the storage (default: the layout's).
    ``need_labels``: refuse an unlabelled tree before anything is decoded (evaluation)."""
    listing = list_images(kind, path, seed)
    if need_labels and not listing.labelled:
        raise DataError(
            f"{kind}:{path} has no labels ({listing.layout}): evaluation trains a linear probe and a kNN on "
            f"labelled features; evaluate on a labelled data set (--dataset folder:PATH with class folders, "
            f"tinyimagenet:PATH, imagenet100:PATH, cifar10, ...)"
        )
    image_size = image_size or listing.defaults.image_size
    max_aspect = float(max_aspect if max_aspect is not None else listing.defaults.max_aspect)
    check_storage(image_size, max_aspect)
    canvas = canvas_size(image_size, max_aspect)
    cache_dir = cache_dir or os.path.join(path, ".empssl_cache")
    key = _fingerprint(listing, image_size, max_aspect, on_bad_image, seed)
    source = os.path.abspath(path)
    class_index = {name: index for index, name in enumerate(listing.classes)}
    stores = {}
    for split, entries in listing.splits.items():
        store_path = os.path.join(cache_dir, f"{key}.{split}{SUFFIX}")
        about = {
            "source": source,
            "split": split,
            "fingerprint": key,
            "layout": listing.layout,
            "classes": listing.classes,
            "image_size": image_size,
            "max_aspect": max_aspect,
        }
        header = store_header(len(entries), canvas, **about)
        if os.path.exists(store_path):
            try:
                stores[split] = ImageStore.open(store_path, expect=about)
                continue
            except StoreError as err:  # truncated, damaged or foreign: decode again (it is ours by its name)
                import warnings

                warnings.warn(f"{err}; rebuilding the store of the {split} split of {path}")
        check_writable_folder(cache_dir, "--cache-dir")  # before decoding: an unusable folder fails at once
        os.makedirs(cache_dir, exist_ok=True)
        if os.path.exists(store_path):
            os.unlink(store_path)  # the damaged store of this very fingerprint and split, checked above
        labels = np.array([class_index.get(name, -1) if name is not None else -1 for _, name in entries], np.int64)
        build_store(
            store_path,
            [file for file, _ in entries],
            labels,
            header,
            lambda file: decode_image(file, image_size, max_aspect),
            on_bad_image,
            show_progress,
            f"{split} split of {path}",
        )
        remove_stale_stores(cache_dir, store_path, source, split)
        stores[split] = ImageStore.open(store_path, expect=about)
    train = stores["train"]
    test = stores["test"] if "test" in stores else train[:0]  # unlabelled: no test split
    # the layout's patch, never larger than the stored size by default (a smaller storage asks for smaller patches)
    patch_size = min(listing.defaults.patch_size, image_size) if listing.defaults.patch_size else None
    return ImageDataset(
        f"{kind}:{path}",
        train,
        train.labels,
        test,
        test.labels,
        classes=list(listing.classes),
        train_sizes=train.sizes,
        test_sizes=test.sizes,
        patch_size=patch_size,
        layout=listing.layout,
    )
