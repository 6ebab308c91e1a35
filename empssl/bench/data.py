"""Image data: building a store (decoding on every core) and reading a step's images from it, against the need.

For each case a tree of JPEG photos is made (or --folder is read), decoded into a store (rate: images/s, decoding
and writing), then an epoch of random batches is read from it through the training's batch source (a side thread
reading ahead; with the store's pages in the page cache, then evicted from it with posix_fadvise: the first epoch
of a set larger than memory). The need is the images/s a step takes at the recipe's rate: the CIFAR-10 target (an
epoch of 50,000 images in 8 s) for 32-pixel images, --steps-per-s (default 2, an assumption until a GPU measures
the ImageNet recipe's step) for the ImageNet-100 storage (448 pixels, whole up to 4:3).

  empssl bench data                   # 2,000 photos of 500x375 for the ImageNet case, 20,000 of 32x32
  empssl bench data --quick           # CPU-sized: 400 and 4,000
  empssl bench data --folder PATH     # your own tree too (stored as folder:PATH with --image-size/--max-aspect)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np
import torch

from ..data.batches import StoreBatches
from ..data.build import decode_workers
from ..data.load import load_dataset
from . import common

CIFAR_TARGET_IMAGES_PER_S = 50_000 / 8  # README: a CIFAR-10 epoch in at most 8 s


def _photo_tree(root: str, count: int, size, seed: int = 0) -> None:
    """``count`` JPEG photos of ``size`` (width, height): smooth colour fields with noise, in 10 class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        phase = rng.uniform(0, 6.28, 3)
        field = np.stack([np.sin(x / (7 + 5 * k) + y / (11 + 3 * k) + phase[k]) for k in range(3)], -1)
        pixels = np.clip(127 + 90 * field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        folder = os.path.join(root, "train", f"c{index % 10}")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(pixels).save(os.path.join(folder, f"{index}.jpg"), quality=90)
    for k in range(10):  # the smallest val split the layout takes
        os.makedirs(os.path.join(root, "val", f"c{k}"), exist_ok=True)
        shutil.copy(os.path.join(root, "train", f"c{k}", f"{k}.jpg"), os.path.join(root, "val", f"c{k}", "0.jpg"))


def _evict(path: str) -> None:
    """Drop a file's pages from the page cache (clean pages only: the store is fsynced when built)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_epoch(store, device, batch_size: int, steps: int) -> float:
    """Seconds to read ``steps`` random batches through the training's batch source (read ahead on a thread)."""
    source = StoreBatches(store, device, batch_size, batch_size, 0)
    try:  # the read-ahead thread is stopped however the epoch ends
        permutation = torch.randperm(len(store), generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        source.set_order(permutation, 0)
        for position in range(steps):
            images = source.images(position, permutation[position * batch_size : (position + 1) * batch_size])
        common.synchronize(device)
        seconds = time.perf_counter() - start
        del images  # held until the device finished with the last batch
        return seconds
    finally:
        source.close()


def image_bytes(store) -> float:
    """The mean bytes a read takes from ``store`` per image: its stored pixels, not its canvas's (a 448x597 image
    on a 597x597 canvas reads 3/4 of its slot)."""
    sizes = store.sizes
    if sizes is None:
        return float(store.slot_bytes)
    return float((sizes[:, 0] * sizes[:, 1]).double().mean()) * 3


def _case(results, name, spec, image_size, max_aspect, cache, batch_size, need, need_note, device) -> None:
    start = time.perf_counter()
    with results.row(name, "build"):
        data = load_dataset(
            spec, image_size=image_size, max_aspect=max_aspect, cache_dir=cache, stream="on", need_test=False
        )
        seconds = time.perf_counter() - start
        store = data.train_images
        count = len(store) + len(data.test_labels)
        size = f"{store.canvas}x{store.canvas} canvas"
        results.add(name, f"build ({decode_workers()} threads)", seconds / count, count / seconds, "images/s",
                    note=f"{count} images decoded and written, {size}")  # fmt: skip
    steps = len(store) // batch_size
    if steps == 0:
        results.note(f"{name}: fewer than {batch_size} images: no read rows")
        return
    mib = image_bytes(store) / 2**20
    for label, evict in (("read, in page cache", False), ("read, evicted from cache", True)):
        with results.row(name, label):
            if evict:
                _evict(store.path)
            seconds = _read_epoch(store, device, batch_size, steps)
            rate = steps * batch_size / seconds
            results.add(name, label, seconds / steps, rate, "images/s", limit_fraction=rate / need,
                        limit=f"need {need:,.0f} images/s", note=f"batch {batch_size}, {rate * mib:,.0f} MiB/s; "
                        f"need: {need_note}")  # fmt: skip


def main(argv=None) -> int:
    parser = common.make_parser("data", __doc__)
    parser.add_argument("--folder", default=None, help="also time your own image tree (folder:PATH)")
    parser.add_argument("--image-size", type=int, default=448, help="the stored size of --folder (default 448)")
    parser.add_argument("--max-aspect", type=float, default=4 / 3, help="of --folder (default 4/3)")
    parser.add_argument("--steps-per-s", type=float, default=2.0, help="the ImageNet recipe's step rate assumed")
    parser.add_argument("--keep", action="store_true", help="keep the made trees and stores (under --out)")
    args = parser.parse_args(argv)
    results = common.open_results("data", args)
    device = torch.device(args.device)
    photos, small = (40, 200) if args.tiny else (400, 4000) if args.quick else (2000, 20000)
    work = tempfile.mkdtemp(prefix="empssl-bench-data-", dir=args.out if args.keep else None)
    try:
        imagenet_need = 100 * args.steps_per_s
        assumed = f"{args.steps_per_s:g} steps/s of 100 images (assumed: awaits a GPU)"
        cases = [
            ("32x32 (CIFAR size)", (32, 32), small, 32, 1.0, CIFAR_TARGET_IMAGES_PER_S, "the CIFAR-10 target, 8 s"),
            ("500x375 -> 448, 4:3", (500, 375), photos, 448, 4 / 3, imagenet_need, assumed),
        ]
        for name, size, count, image_size, aspect, need, note in cases:
            tree = os.path.join(work, name.split()[0])
            started = time.perf_counter()
            _photo_tree(tree, count, size)
            results.note(f"{name}: made {count} JPEGs in {time.perf_counter() - started:.1f} s")
            _case(results, name, f"folder:{tree}", image_size, aspect, os.path.join(tree, "cache"), 100, need, note,
                  device)  # fmt: skip
        if args.folder:
            name = f"folder {os.path.basename(os.path.normpath(args.folder))}"
            _case(results, name, f"folder:{args.folder}", args.image_size, args.max_aspect, None, 100, imagenet_need,
                  assumed, device)  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return common.finish(results, args)


if __name__ == "__main__":
    raise SystemExit(main())
