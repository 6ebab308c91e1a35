"""``folder:PATH`` data sets: an ImageFolder tree decoded once (threads, PIL) into uint8 arrays, cached on disk.

PATH/train/<class>/* with PATH/val or PATH/test/<class>/*, or one PATH/<class>/* tree split deterministically.

Bounded work for any file: an image is read only if it is a regular file (a FIFO named ``x.png`` is a bad image,
never opened for reading), its decode reserves its memory from one budget shared by the decoding threads, and an
image of an extreme aspect ratio is resized only in the part the centre crop keeps. A class folder that cannot be
read stops the load (its class is never dropped silently). The cache folder may hold the user's own files: the
cache removes only the caches it wrote, proven by their names and by the marker in their ``.meta.json``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import threading
import warnings
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..device import check_fits
from ..files import check_writable_folder, open_input, remove_stale_temporaries, write_atomically
from .dataset import DataError, ImageDataset, deterministic_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _unreadable_folder(err: OSError):
    raise DataError(
        f"cannot read the class folder {err.filename} ({err.strerror or err}): its images would be left out; "
        f"fix its permissions, or move it out of the data set"
    ) from err


def _list_class_tree(folder: str) -> List[Tuple[str, str]]:
    """(relative path, class name) of every image file under folder/<class>/, sorted. DataError for a folder that
    cannot be read."""
    entries = []
    try:
        with os.scandir(folder) as listing:
            class_names = sorted(d.name for d in listing if d.is_dir() and not d.name.startswith("."))
    except OSError as err:
        _unreadable_folder(err)
    for class_name in class_names:
        for dirpath, dirnames, filenames in os.walk(os.path.join(folder, class_name), onerror=_unreadable_folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    entries.append((os.path.join(dirpath, filename), class_name))
    return entries


def _find_splits(path: str, seed: int):
    """{split: [(file, class)]} of an ImageFolder tree, with or without its own test split."""
    if not os.path.isdir(path):
        raise DataError(f"image folder {path} not found")
    train_dir = os.path.join(path, "train")
    if os.path.isdir(train_dir):
        test_dir = next((os.path.join(path, d) for d in ("val", "test") if os.path.isdir(os.path.join(path, d))), None)
        if test_dir is None:
            raise DataError(f"image folder {path} has train/ but neither val/ nor test/")
        splits = {"train": _list_class_tree(train_dir), "test": _list_class_tree(test_dir)}
        for split, folder in (("train", train_dir), ("test", test_dir)):
            if not splits[split]:
                raise DataError(f"image folder {folder} holds no images (expected {folder}/<class>/*.png|jpg)")
    else:
        entries = _list_class_tree(path)
        if not entries:
            raise DataError(
                f"image folder {path} holds no images (expected {path}/train/<class>/*, "
                f"{path}/val/<class>/* or {path}/<class>/*.png|jpg)"
            )
        train_idx, test_idx = deterministic_split(len(entries), seed=seed)
        splits = {"train": [entries[i] for i in train_idx], "test": [entries[i] for i in test_idx]}
    classes = sorted({c for entries in splits.values() for _, c in entries})
    return splits, classes


def _fingerprint(path: str, splits, image_size: int, on_bad_image: str, seed: int) -> str:
    """Hash of every file's relative path, size and mtime, plus the decoding settings."""
    digest = hashlib.sha256(f"v1|{image_size}|{on_bad_image}|{seed}".encode())
    for split in ("train", "test"):
        for file, class_name in splits[split]:
            stat = os.stat(file)
            digest.update(
                f"{split}|{os.path.relpath(file, path)}|{class_name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode()
            )
    return digest.hexdigest()[:20]


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
_RESIZED_PIXELS = 4  # times image_size**2: beyond it only the part the centre crop keeps is resized


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


def decode_image(file: str, image_size: int) -> np.ndarray:
    """One image file -> (S, S, 3) uint8: RGB, shorter side resized to S, centre crop. Only a regular file is opened;
    one of more than ``MAX_SOURCE_PIXELS`` is refused from its header; its decode waits for room in the threads'
    shared memory budget; an image so elongated that its resized copy would exceed ``_RESIZED_PIXELS`` times S*S has
    only the centre region resized (PIL's resize of a box: the same samples, up to rounding by 1 in 255)."""
    from PIL import Image

    with open_input(file, "image") as f, Image.open(f) as source:
        if source.size[0] * source.size[1] > MAX_SOURCE_PIXELS:  # read from the header: nothing decoded yet
            raise ValueError(
                f"{source.size[0]}x{source.size[1]} pixels, more than the {MAX_SOURCE_PIXELS:,} an image may have"
            )
        with _DECODE_BUDGET.reserve(_decoded_bytes(source)):
            return _resized(to_rgb8(source), image_size)


def _resized(image, image_size: int) -> np.ndarray:
    """``image`` (RGB), its shorter side resized to ``image_size``, centre-cropped to a square (``decode_image``)."""
    from PIL import Image

    width, height = image.size
    scale = image_size / min(width, height)
    new_w, new_h = max(image_size, round(width * scale)), max(image_size, round(height * scale))
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    if new_w * new_h > _RESIZED_PIXELS * image_size * image_size:
        # the crop's box in the source's coordinates: PIL maps output pixels into a box exactly as a whole resize
        step_x, step_y = width / new_w, height / new_h
        box = (left * step_x, top * step_y, (left + image_size) * step_x, (top + image_size) * step_y)
        image = image.resize((image_size, image_size), Image.BILINEAR, box=box)
        return np.asarray(image, dtype=np.uint8)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    image = image.crop((left, top, left + image_size, top + image_size))
    return np.asarray(image, dtype=np.uint8)


CACHE_MARKER = "empssl folder cache"  # in every .meta.json this loader writes: the proof that a cache is its own
_CACHE_FILE = re.compile(r"(?P<key>[0-9a-f]{20})\.(?:(?:train|test)-(?:images|labels)\.npy|meta\.json)")


def _load_npy(file: str) -> np.ndarray:
    with open_input(file, "cache file") as f:
        return np.load(f, allow_pickle=False)


def _read_meta(file: str) -> dict:
    with open_input(file, "cache file") as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or not isinstance(meta.get("classes"), list):
        raise ValueError(f"{file} is not a cache's metadata")
    return meta


def _readable(file: str) -> bool:
    """Whether a cache file loads whole (the one a failed load names)."""
    try:
        _load_npy(file) if file.endswith(".npy") else _read_meta(file)
        return True
    except (OSError, ValueError, KeyError, EOFError):
        return False


def _remove_stale_caches(cache_dir: str, key: str, source: str) -> None:
    """Caches of earlier states of the tree at ``source``: only files named as this loader names them, of a cache
    whose .meta.json carries ``CACHE_MARKER`` and this tree's path (a cache folder may hold the user's own .npy
    files, or another tree's cache)."""
    names = os.listdir(cache_dir)
    for name in names:
        match = _CACHE_FILE.fullmatch(name)
        if match is None or match["key"] == key or not name.endswith(".meta.json"):
            continue
        try:
            meta = _read_meta(os.path.join(cache_dir, name))
        except (OSError, ValueError):
            continue
        if meta.get("format") != CACHE_MARKER or meta.get("source") != source:
            continue
        own = [other for other in names if (m := _CACHE_FILE.fullmatch(other)) and m["key"] == match["key"]]
        for other in sorted(own, key=lambda n: n.endswith(".meta.json")):  # the marker last
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(cache_dir, other))


def _check_cache(arrays, image_size: int, num_classes: int) -> None:
    """ValueError unless the cached arrays have the shapes and types this loader writes."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        if (
            images.dtype != np.uint8
            or images.shape[1:] != (image_size, image_size, 3)
            or labels.dtype != np.int64
            or labels.shape != images.shape[:1]
            or (labels.size and not 0 <= labels.min() <= labels.max() < num_classes)
        ):
            raise ValueError(f"the cached {split} arrays have unexpected shapes or values")


def _decode_or_error(args):
    file, image_size = args
    try:
        return decode_image(file, image_size), None
    except Exception as err:  # PIL raises several types for a broken file: report them all the same way
        return None, f"{type(err).__name__}: {err}"


def _decode_split(entries, classes, image_size, on_bad_image, description, show_progress):
    from tqdm import tqdm

    class_index = {c: i for i, c in enumerate(classes)}
    images, labels, skipped = [], [], []
    workers = min(32, (os.cpu_count() or 1) + 4)
    # threads: PIL releases the GIL while decoding and resizing, and nothing needs pickling
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_decode_or_error, [(file, image_size) for file, _ in entries])
        for (file, class_name), (image, error) in tqdm(
            zip(entries, results), total=len(entries), desc=description, unit="img", disable=not show_progress
        ):
            if image is None:
                if on_bad_image == "error":
                    raise DataError(
                        f"cannot decode image {file}: {error} (pass --on-bad-image skip to skip such files)"
                    )
                skipped.append(file)
                warnings.warn(f"skipping image {file} that does not decode: {error}")
                continue
            images.append(image)
            labels.append(class_index[class_name])
    if not images:
        raise DataError(f"no image of the {description} decoded")
    return np.stack(images), np.asarray(labels, dtype=np.int64), skipped


def load_image_folder(
    path: str,
    image_size: int = 32,
    cache_dir: Optional[str] = None,
    on_bad_image: str = "skip",
    seed: int = 0,
    show_progress: bool = True,
) -> ImageDataset:
    """An ImageFolder tree decoded once (in parallel) into uint8 arrays, cached as .npy and reused.

    The cache key is a fingerprint of every file's relative path, size and mtime, so the cache is
    rebuilt when the tree changes (and the caches of its earlier states removed: ``_remove_stale_caches``). Cache
    files are written atomically (temp file + os.replace); the metadata file is written last and marks a complete
    cache.
    """
    splits, classes = _find_splits(path, seed)
    cache_dir = cache_dir or os.path.join(path, ".empssl_cache")
    key = _fingerprint(path, splits, image_size, on_bad_image, seed)
    files = {
        name: os.path.join(cache_dir, f"{key}.{name}.npy")
        for name in ("train-images", "train-labels", "test-images", "test-labels")
    }
    meta_path = os.path.join(cache_dir, f"{key}.meta.json")
    cached = os.path.exists(meta_path) and all(os.path.exists(f) for f in files.values())
    if not cached:  # before decoding: an unusable cache folder fails at once, not after the work
        check_writable_folder(cache_dir, "--cache-dir")
    if cached:
        try:
            arrays = {name: _load_npy(file) for name, file in files.items()}
            cached_classes = _read_meta(meta_path)["classes"]
            _check_cache(arrays, image_size, len(cached_classes))
            classes = cached_classes
        except (OSError, ValueError, KeyError, EOFError) as err:  # truncated, unreadable or foreign: decode again
            broken = next((file for file in [*files.values(), meta_path] if not _readable(file)), meta_path)
            warnings.warn(
                f"the cache file {broken} is truncated or unreadable ({type(err).__name__}: {err}); "
                f"rebuilding the cache of {path}"
            )
            cached = False
            check_writable_folder(cache_dir, "--cache-dir")
    if not cached:
        count = len(splits["train"]) + len(splits["test"])
        check_fits(  # the decoded arrays, and np.stack's copy of a split
            2 * count * image_size * image_size * 3,
            torch.device("cpu"),
            f"decoding {count} images of {path} at {image_size}x{image_size}",
            "pass a smaller --image-size",
        )
        arrays, skipped = {}, []
        for split in ("train", "test"):
            images, labels, bad = _decode_split(
                splits[split], classes, image_size, on_bad_image, f"{split} split of {path}", show_progress
            )
            arrays[f"{split}-images"], arrays[f"{split}-labels"] = images, labels
            skipped += bad
        os.makedirs(cache_dir, exist_ok=True)
        _remove_stale_caches(cache_dir, key, os.path.abspath(path))
        remove_stale_temporaries(cache_dir)  # of a killed cache write (only this package's, whose writer is gone)
        for name, file in files.items():
            write_atomically(file, lambda f, array=arrays[name]: np.save(f, array))
        meta = {
            "format": CACHE_MARKER,
            "classes": classes,
            "image_size": image_size,
            "skipped": skipped,
            "source": os.path.abspath(path),
        }
        write_atomically(meta_path, lambda f: f.write(json.dumps(meta).encode()))
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    return ImageDataset(
        f"folder:{path}",
        tensors["train-images"],
        tensors["train-labels"],
        tensors["test-images"],
        tensors["test-labels"],
        classes=classes,
    )
