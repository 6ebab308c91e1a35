"""Image trees (``folder:``, ``tinyimagenet:``, ``imagenet100:``, ``unlabelled:`` PATH) decoded once into stores.

The tree is listed by ``empssl.data.layouts``; each split is decoded once, on every core, into an on-disk store
(``empssl.data.store``) in the cache folder (default PATH/.empssl_cache), named by a fingerprint of every file's
path, size and mtime and of the storage settings, so a changed tree or setting gets a new store; a store of the
same settings for an earlier state of the tree is removed (only stores of this tree's, proven by their header).
``load_image_folder`` returns an ``ImageDataset`` whose splits are these stores; ``empssl.data.load`` reads a split
into memory where it fits.

Bounded work for any file (``decode_image``): an image is read only if it is a regular file (a FIFO named ``x.png``
is a bad image, never opened for reading), its decode reserves its memory from one budget shared by the decoding
threads, and only the region the storage keeps is resized. A folder that cannot be read stops the load (its images
are never dropped silently).

Storage: each image keeps its aspect ratio up to ``max_aspect`` (the longer side centre-cropped beyond it; 1: the
centre square), its shorter side resized to ``image_size``, in the top-left corner of a canvas whose side is the
longest kept side (``canvas_size``); the patches are cut from the image at this resolution (docs/method.md section 4).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import threading
from typing import Iterator, Optional

import numpy as np

from ..files import check_writable_folder, open_input
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


DECODE_MEMORY = 2**30  # bytes the decoding threads may hold at once (a larger image decodes alone)
MAX_SOURCE_PIXELS = 89_478_485  # PIL's own bound for a decompression bomb (it only warns below twice this)


class _MemoryBudget:
    """Bytes shared by threads: ``reserve(n)`` waits until n fit beside the others' reservations (one that exceeds
    the whole budget waits until it is alone)."""

    def __init__(self, total: int):
        self.total, self.used, self.condition = total, 0, threading.Condition()

    @contextlib.contextmanager
    def reserve(self, amount: int) -> Iterator[None]:
        with self.condition:
            self.condition.wait_for(lambda: self.used == 0 or self.used + amount <= self.total)
            self.used += amount
        try:
            yield
        finally:
            with self.condition:
                self.used -= amount
                self.condition.notify_all()


_DECODE_BUDGET = _MemoryBudget(DECODE_MEMORY)


def _decoded_bytes(image) -> int:
    """What decoding and converting ``image`` holds at its peak: the source, RGB, and for high-depth modes
    ``to_rgb8``'s float64 copy."""
    per_pixel = 16 if image.mode in ("I", "F") or image.mode.startswith("I;16") else 8
    return image.size[0] * image.size[1] * per_pixel


def decode_image(file: str, image_size: int, max_aspect: float = 1.0) -> np.ndarray:
    """One image file -> (h, w, 3) uint8 RGB: the shorter side resized to ``image_size``, the longer side kept up
    to ``max_aspect`` times that (centre-cropped beyond it; 1: the centre square, S x S).

    Bounded work for any file: only a regular file is opened (``open_input``); one of more than
    ``MAX_SOURCE_PIXELS`` is refused from its header; the decode waits for room in the threads' shared memory
    budget; a JPEG is decoded at the smallest DCT scale still at least the output's size; and only the region the
    crop keeps is resized (PIL's resize of a box: the samples of a whole resize and crop, up to rounding by 1)."""
    from PIL import Image

    with open_input(file, "image") as f, Image.open(f) as source:
        width, height = source.size
        if width * height > MAX_SOURCE_PIXELS:  # read from the header: nothing decoded yet
            raise ValueError(f"{width}x{height} pixels, more than the {MAX_SOURCE_PIXELS:,} an image may have")
        if source.format == "JPEG":
            scale = image_size / min(width, height)
            source.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        with _DECODE_BUDGET.reserve(_decoded_bytes(source)):
            return _resized(to_rgb8(source), image_size, max_aspect)


def _resized(image, image_size: int, max_aspect: float) -> np.ndarray:
    """``image`` (RGB) as ``decode_image`` stores it: the whole image resized so its shorter side is
    ``image_size``, then its centre (up to ``max_aspect``) kept, computed as a resize of that region alone."""
    from PIL import Image

    width, height = image.size
    scale = image_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    longest = canvas_size(image_size, max_aspect)
    out_w, out_h = min(new_w, longest), min(new_h, longest)
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    # the kept region's box in the source's coordinates: PIL maps output pixels into a box as a whole resize does
    step_x, step_y = width / new_w, height / new_h
    box = (left * step_x, top * step_y, (left + out_w) * step_x, (top + out_h) * step_y)
    return np.asarray(image.resize((out_w, out_h), Image.BILINEAR, box=box), dtype=np.uint8)


def _settings(listing: Listing, image_size: int, max_aspect: float, on_bad_image: str, seed: int) -> str:
    """What decides a store's images besides the files: the store version, the layout, the storage settings, and
    the seed where it splits the tree (only there: elsewhere another --data-seed stores the same images)."""
    split_by = f"|seed {seed}" if listing.seeded_split else ""
    drawn = f"|{listing.drawn}" if listing.drawn else ""  # a subset's store is not a stale state of the whole's
    return (
        f"v{STORE_VERSION}|{listing.kind}|{listing.layout}|{image_size}|{max_aspect!r}|{on_bad_image}{split_by}{drawn}"
    )


def _fingerprint(listing: Listing, settings: str) -> str:
    """Hash of every file's relative path, split, class, size and mtime, and of ``settings`` (``_settings``)."""
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
    train_size: Optional[int] = None,
    test_size: Optional[int] = None,
) -> ImageDataset:
    """The tree at ``path`` read as ``kind`` (``empssl.data.layouts``), each split decoded once into a store (built
    in parallel, resumed if interrupted, reused while the tree and settings are unchanged); the returned data set's
    images are these stores (``ImageStore``). ``image_size`` / ``max_aspect``: the storage (default: the layout's).
    ``need_labels``: refuse an unlabelled tree before anything is decoded (evaluation). ``train_size`` /
    ``test_size``: decode only that many images of the split, drawn by ``seed`` (``Listing.draw``)."""
    listing = list_images(kind, path, seed).draw({"train": train_size, "test": test_size}, seed)
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
    settings = _settings(listing, image_size, max_aspect, on_bad_image, seed)
    key = _fingerprint(listing, settings)
    source = os.path.realpath(path)  # the tree, by whichever path or link it is reached
    class_index = {name: index for index, name in enumerate(listing.classes)}
    stores = {}
    for split, entries in listing.splits.items():
        store_path = os.path.join(cache_dir, f"{key}.{split}{SUFFIX}")
        about = {
            "source": source,
            "split": split,
            "fingerprint": key,
            "settings": settings,
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
            len(entries) * image_size * image_size * 3,  # every image takes at least image_size x image_size pixels
        )
        remove_stale_stores(cache_dir, store_path, header)
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
