"""Where a training step's images come from: a tensor held in memory, or the on-disk store read ahead.

Both sources answer one question, ``images(position, image_ids)``: the uint8 images (b, H, W, 3), on the training
device, of this rank's slice ``image_ids`` of the global batch at ``position`` in the epoch's permutation (which
``set_order`` hands them at the start of each epoch, and on a resume mid-epoch). The permutation is global: every
rank holds the same one and takes its own slice.

- ``InMemoryBatches``: an index of the tensor on the device (nothing read ahead; no host involved).
- ``StoreBatches``: a side thread reads the next steps' images with ``pread`` into pinned host buffers (plain ones
  on the CPU) and, on a GPU, copies them to the device on a side stream; the step waits only on that copy's event.
  Each rank reads only its slice; the host copy of the permutation is taken once per epoch. The images are the
  store's bytes, so a run from the store reaches what a run in memory reaches (bitwise on the CPU).
"""

from __future__ import annotations

import queue
import threading
from typing import Optional

import numpy as np
import torch

from .dataset import DataError
from .store import ImageStore

PREFETCH = 3  # steps read ahead


class InMemoryBatches:
    """The training images as one tensor on the training device."""

    def __init__(self, images: torch.Tensor):
        self.tensor = images
        self.num_images, self.canvas = int(images.shape[0]), (int(images.shape[1]), int(images.shape[2]))

    def set_order(self, permutation: torch.Tensor, position: int) -> None:
        pass

    def images(self, position: int, image_ids: torch.Tensor) -> torch.Tensor:
        return self.tensor[image_ids]

    def close(self) -> None:
        pass


class StoreBatches:
    """The training images read from ``store`` a step at a time, ``PREFETCH`` steps ahead, on a side thread.

    ``batch_size``: the global batch; ``local_batch`` images at ``rank * local_batch`` of each are this rank's.
    """

    def __init__(self, store: ImageStore, device: torch.device, batch_size: int, local_batch: int, rank: int):
        self.store, self.device = store, device
        self.batch_size, self.local_batch, self.rank = batch_size, local_batch, rank
        self.num_images, self.canvas = len(store), (store.canvas, store.canvas)
        self.cuda = device.type == "cuda"
        shape = (local_batch, store.canvas, store.canvas, 3)
        # a buffer is rewritten only after the step that used it is done: the queue, the step's and the reader's
        self.buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(PREFETCH + 2)]
        self.copied = [None] * len(self.buffers)  # on a GPU: the event after the copy out of each buffer
        self.side_stream = torch.cuda.Stream(device) if self.cuda else None
        self.thread: Optional[threading.Thread] = None
        self.stop = threading.Event()
        self.ready: "queue.Queue" = queue.Queue(maxsize=PREFETCH)

    def set_order(self, permutation: torch.Tensor, position: int) -> None:
        """Read this epoch's steps from ``position`` on (the permutation's host copy: one transfer per epoch)."""
        self.close()
        order = permutation.cpu().numpy()
        steps = len(order) // self.batch_size
        self.stop = threading.Event()
        self.ready = queue.Queue(maxsize=PREFETCH)
        self.thread = threading.Thread(
            target=self._read_ahead, args=(order, position, steps, self.stop, self.ready), daemon=True
        )
        self.thread.start()

    def _read_ahead(self, order: np.ndarray, position: int, steps: int, stop: threading.Event, ready) -> None:
        try:
            for step in range(position, steps):
                slot = step % len(self.buffers)
                first = step * self.batch_size + self.rank * self.local_batch
                ids = order[first : first + self.local_batch]
                if self.copied[slot] is not None:
                    self.copied[slot].synchronize()  # the device has its copy of what the buffer held
                self.store.read(ids, self.buffers[slot].numpy())
                images, event = self.buffers[slot], None
                if self.cuda:
                    with torch.cuda.stream(self.side_stream):
                        images = self.buffers[slot].to(self.device, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(self.side_stream)
                    self.copied[slot] = event
                if not _put(ready, (step, images, event), stop):
                    return
        except BaseException as err:  # the step that needs the images raises it
            _put(ready, (None, err, None), stop)

    def images(self, position: int, image_ids: torch.Tensor) -> torch.Tensor:
        while True:
            try:
                step, images, event = self.ready.get(timeout=1.0)
                break
            except queue.Empty:
                if self.thread is None or not self.thread.is_alive():
                    raise RuntimeError(
                        f"no images for step {position}: the store's reader has stopped (set_order was not called "
                        f"for this epoch)"
                    ) from None
        if step is None:
            raise DataError(f"reading the training images from {self.store.path} failed: {images}") from images
        if step != position:
            raise RuntimeError(f"the store's reader is at step {step}, the loop at {position}: set_order was skipped")
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            images.record_stream(current)  # made on the side stream, used on this one
        return images

    def close(self) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.thread = None


def _put(ready: "queue.Queue", item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first (the reader stops between steps, never mid-read)."""
    while not stop.is_set():
        try:
            ready.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def take_images(images, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The images ``index`` (int64) of a tensor or a store, on ``device``."""
    if isinstance(images, ImageStore):
        ids = index.cpu().numpy()
        return torch.from_numpy(images.read(ids, np.empty((len(ids), *images.shape[1:]), np.uint8))).to(device)
    return images.index_select(0, index.to(images.device)).to(device)


def subset_of(images, index: torch.Tensor, device: torch.device):
    """The images ``index`` of a tensor (on ``device``) or of a store (a store of them: read when used, so a subset
    kept for a whole run holds no memory)."""
    if isinstance(images, ImageStore):
        return images.select(index.cpu().numpy())
    return take_images(images, index, device)


def batch_source(images, device: torch.device, batch_size: int, local_batch: int, rank: int):
    """The source of a run's training images: ``InMemoryBatches`` for a tensor, ``StoreBatches`` for a store."""
    if isinstance(images, ImageStore):
        return StoreBatches(images, device, batch_size, local_batch, rank)
    return InMemoryBatches(images.to(device))
