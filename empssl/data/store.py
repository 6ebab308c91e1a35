"""The on-disk image store: one split of a tree decoded once into a uint8 file that a step reads a batch at a time.

Layout of a store file (little-endian; every section starts on a 4096-byte boundary, so the file maps as arrays):

    magic (16 bytes) | header length (uint64) | header (JSON: format, count N, canvas C, the sections' offsets,
    and what the images are: source folder, split, fingerprint, classes, storage settings)
    labels  int64 (N,)        class index, -1 for unlabelled images
    sizes   int32 (N, 2)      each image's (height, width), at most (C, C)
    sums    int64 (N,)        each image's sum in its canvas (``canvas_sum``: what ``dataset.fingerprint`` takes)
    status  uint8 (N,)        0 not decoded yet, 1 decoded, 2 did not decode (skipped)
    slots   N x C*C*3 bytes   image k packed as (h, w, 3) at the start of slot k; the rest of the slot is a hole

A store is built under ``NAME.partial`` and renamed to ``NAME`` once complete (``empssl.data.build``).
``ImageStore.open`` checks the header, the file's size and
every status, size and label before anything is read; ``read`` fills a batch of images with ``pread`` (no mapping:
the pages a step reads stay in the page cache, outside this process's resident memory).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Optional

import numpy as np
import torch

from .dataset import DataError

MAGIC = b"EMPSSL-STORE\x00v1\n"
FORMAT = 1
SUFFIX = ".empssl-store"
PARTIAL = ".partial"
_ALIGN = 4096
PENDING, DECODED, SKIPPED = 0, 1, 2


class StoreError(DataError):
    """A store file is truncated, corrupt or not a store; the message names it."""


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def _layout(count: int, canvas: int, header_bytes: int) -> Dict[str, int]:
    """The sections' offsets and the file's size for ``count`` images on a ``canvas`` x ``canvas`` canvas."""
    labels_at = _aligned(len(MAGIC) + 8 + header_bytes)
    sizes_at = _aligned(labels_at + 8 * count)
    sums_at = _aligned(sizes_at + 8 * count)
    status_at = _aligned(sums_at + 8 * count)
    slots_at = _aligned(status_at + count)
    return {
        "labels_at": labels_at,
        "sizes_at": sizes_at,
        "sums_at": sums_at,
        "status_at": status_at,
        "slots_at": slots_at,
        "file_size": slots_at + count * canvas * canvas * 3,
    }


def pread_into(fd: int, buffer, offset: int, path: str) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise StoreError(f"the store {path} ended at byte {offset + done}: it is truncated")
        done += got


def pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def read_header(path: str, fd: Optional[int] = None) -> Dict:
    """The header of a store file; StoreError if it is not one (wrong magic, unreadable JSON)."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY)
    try:
        start = os.pread(fd, len(MAGIC) + 8, 0)
        if len(start) < len(MAGIC) + 8 or start[: len(MAGIC)] != MAGIC:
            raise StoreError(f"{path} is not an empssl store (its first bytes are not the store's magic)")
        (length,) = struct.unpack("<Q", start[len(MAGIC) :])
        if length > 1 << 30:
            raise StoreError(f"the store {path} is corrupt (a header of {length} bytes)")
        text = os.pread(fd, length, len(MAGIC) + 8)
        try:
            header = json.loads(text.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise StoreError(f"the store {path} is truncated or corrupt (its header: {err})") from None
        if not isinstance(header, dict):
            raise StoreError(
                f"the store {path} is corrupt (its header is a JSON {type(header).__name__}, not an object)"
            )
        if header.get("format") != FORMAT:
            raise StoreError(f"{path} is a store of another format ({header.get('format')!r}, expected {FORMAT})")
        return header
    finally:
        if own:
            os.close(fd)


def _check_header(path: str, header: Dict, file_size: int) -> None:
    try:
        count, canvas = int(header["count"]), int(header["canvas"])
        expected = _layout(count, canvas, int(header["header_bytes"]))
        if count < 0 or canvas < 1 or any(int(header[key]) != value for key, value in expected.items()):
            raise ValueError("its offsets do not follow from its count and canvas")
    except (KeyError, TypeError, ValueError, OverflowError) as err:  # int(1e400): OverflowError
        raise StoreError(f"the store {path} is corrupt (its header: {err})") from None
    if file_size != expected["file_size"]:
        raise StoreError(
            f"the store {path} is truncated or corrupt: {file_size:,} bytes where its header says "
            f"{expected['file_size']:,}"
        )


class ImageStore:
    """The decoded images of one split, on disk: ``len`` images of ``canvas`` x ``canvas`` (``shape`` and ``dtype``
    as the in-memory tensor's), their ``labels`` and ``sizes`` in memory, the pixels read by ``read``. Images that
    did not decode are left out (image k is the k-th decoded one). ``store[:n]`` is the first n images."""

    dtype = torch.uint8
    ndim = 4
    device = torch.device("cpu")

    def __init__(
        self,
        path: str,
        header: Dict,
        slots: np.ndarray,
        labels: np.ndarray,
        sizes: np.ndarray,
        sums: np.ndarray,
        file: Optional["_OpenFile"] = None,
    ):
        self.path, self.header = path, header
        self.slots, self._labels, self._sizes, self.sums = slots, labels, sizes, sums
        self.canvas = int(header["canvas"])
        self.slot_bytes = self.canvas * self.canvas * 3
        self._file = file  # shared with the stores cut from this one: they read the file this one checked

    @classmethod
    def open(cls, path: str, expect: Optional[Dict] = None) -> "ImageStore":
        """The complete store at ``path``, checked: StoreError if it is truncated, corrupt, unfinished, or (with
        ``expect``) its header differs from ``expect`` in any of those keys."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise StoreError(f"cannot open the store {path}: {err.strerror or err}") from None
        try:
            header = read_header(path, fd)
            _check_header(path, header, os.fstat(fd).st_size)
            for key, value in (expect or {}).items():
                if header.get(key) != value:
                    raise StoreError(f"the store {path} holds other images ({key} {header.get(key)!r}, not {value!r})")
            count, canvas = int(header["count"]), int(header["canvas"])
            labels, sizes, status = np.empty(count, np.int64), np.empty((count, 2), np.int32), np.empty(count, np.uint8)
            sums = np.empty(count, np.int64)
            for array, key in ((labels, "labels_at"), (sizes, "sizes_at"), (sums, "sums_at"), (status, "status_at")):
                pread_into(fd, array, int(header[key]), path)
        except BaseException:
            os.close(fd)
            raise
        file = _OpenFile(path, fd)  # kept open: the images stay readable if the file is later removed or replaced
        num_classes = len(header.get("classes") or [])
        problems = {
            "unfinished images": np.isin(status, (DECODED, SKIPPED), invert=True),
            "sizes outside the canvas": (status == DECODED) & ((sizes < 1) | (sizes > canvas)).any(axis=1),
            # unlabelled images (no classes) carry -1
            "labels outside the classes": (labels < 0) | (labels >= num_classes) if num_classes else labels != -1,
        }
        for what, bad in problems.items():
            if bad.any():
                raise StoreError(f"the store {path} is corrupt: {int(bad.sum())} {what}")
        slots = np.flatnonzero(status == DECODED)
        return cls(path, header, slots, labels[slots], sizes[slots].astype(np.int64), sums[slots], file)

    # -- what it holds -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.slots)

    @property
    def shape(self):
        return torch.Size((len(self.slots), self.canvas, self.canvas, 3))

    @property
    def nbytes(self) -> int:
        return len(self.slots) * self.slot_bytes

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self._labels.copy())

    @property
    def sizes(self) -> Optional[torch.Tensor]:
        """(N, 2) int64 (height, width) of each image, or None where every image fills the canvas."""
        if (self._sizes == self.canvas).all():
            return None
        return torch.from_numpy(self._sizes.copy())

    def __getitem__(self, index) -> "ImageStore":
        if not isinstance(index, slice) or index.step not in (None, 1) or index.start not in (None, 0):
            raise TypeError("an ImageStore takes only [:n] (its first n images); read() gives pixels")
        stop = len(self.slots) if index.stop is None else index.stop
        return ImageStore(
            self.path,
            self.header,
            self.slots[:stop],
            self._labels[:stop],
            self._sizes[:stop],
            self.sums[:stop],
            self._file,
        )

    def select(self, index) -> "ImageStore":
        """The images ``index`` (int64, indices into this store) as a store of their own: nothing is read."""
        index = np.asarray(index, dtype=np.int64)
        return ImageStore(
            self.path,
            self.header,
            self.slots[index],
            self._labels[index],
            self._sizes[index],
            self.sums[index],
            self._file,
        )

    def __repr__(self) -> str:
        return f"ImageStore({self.path!r}: {len(self)} images on a {self.canvas}x{self.canvas} canvas)"

    # -- reading ----------------------------------------------------------------------------------------------------
    def _descriptor(self) -> int:
        if self._file is None:  # closed, or unpickled in another process: the file at the path again
            try:
                self._file = _OpenFile(self.path, os.open(self.path, os.O_RDONLY))
            except OSError as err:
                raise StoreError(f"cannot open the store {self.path}: {err.strerror or err}") from None
        return self._file.fd

    def close(self) -> None:
        """Let go of the file (closed once no store cut from it holds it either)."""
        self._file = None

    def __getstate__(self):
        return {**self.__dict__, "_file": None}  # a descriptor means nothing in another process

    def read(self, ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Images ``ids`` (indices into this store) into ``out`` (uint8 (len(ids), C, C, 3), C-contiguous): each at
        the top left of its canvas, the rest of the canvas 0."""
        fd, canvas = self._descriptor(), self.canvas
        slots_at = int(self.header["slots_at"])
        for row, index in enumerate(np.asarray(ids, dtype=np.int64)):
            slot = int(self.slots[index])
            height, width = (int(v) for v in self._sizes[index])
            offset = slots_at + slot * self.slot_bytes
            image = out[row]
            if width == canvas:  # whole rows: straight into the canvas
                pread_into(fd, image[:height], offset, self.path)
            else:
                packed = np.empty((height, width, 3), np.uint8)
                pread_into(fd, packed, offset, self.path)
                image[:height, :width] = packed
                image[:height, width:] = 0
            image[height:] = 0
        return out

    def load(self, show_progress: bool = False, description: str = "") -> torch.Tensor:
        """Every image of the store in memory: a uint8 tensor (N, C, C, 3)."""
        from tqdm import tqdm

        images = np.empty(tuple(self.shape), np.uint8)
        chunk = max(1, (64 << 20) // self.slot_bytes)
        for start in tqdm(
            range(0, len(self), chunk), desc=description or "load", unit="chunk", disable=not show_progress, leave=False
        ):
            ids = np.arange(start, min(start + chunk, len(self)))
            self.read(ids, images[start : start + len(ids)])
        return torch.from_numpy(images)


class _OpenFile:
    """A store's open file descriptor, closed when the last store holding it is gone."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self._close = os.close  # held: at interpreter exit the module's globals may be gone before this object

    def __del__(self):
        self._close(self.fd)


def store_header(count: int, canvas: int, **about) -> Dict:
    """The header of a store of ``count`` images on a ``canvas`` square, with ``about`` (source, split,
    fingerprint, classes, storage settings) recorded beside the layout."""
    header = json.loads(json.dumps({"format": FORMAT, "count": count, "canvas": canvas, **about}))  # as read back
    header["header_bytes"] = 0
    for _ in range(3):  # the offsets depend on the header's length, which depends on the offsets' digits
        header.update(_layout(count, canvas, len(json.dumps(header, sort_keys=True).encode())))
        header["header_bytes"] = len(json.dumps(header, sort_keys=True).encode())
    header.update(_layout(count, canvas, header["header_bytes"]))
    assert header["header_bytes"] == len(json.dumps(header, sort_keys=True).encode())
    return header


def encode_header(header: Dict) -> bytes:
    """The first bytes of a store file: the magic, the header's length and the header (``store_header``)."""
    text = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<Q", len(text)) + text


def canvas_sum(image: np.ndarray, canvas: int) -> int:
    """One image's sum as ``dataset.fingerprint`` takes it of the image in the top-left corner of its canvas (the
    rest 0): the canvas's bytes as int64 words summed modulo 2^64 where they divide into words, else its bytes
    summed."""
    if (canvas * canvas * 3) % 8:
        return int(image.sum(dtype=np.int64))
    held = np.zeros((canvas, canvas, 3), np.uint8)
    held[: image.shape[0], : image.shape[1]] = image
    return int(held.reshape(-1).view(np.int64).sum())
