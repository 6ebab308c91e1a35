"""The on-disk image store: one split of a tree decoded once into a uint8 file that a step reads a batch at a time.

Layout of a store file (little-endian; every section starts on a 4096-byte boundary, so the file maps as arrays):

    magic (16 bytes) | header length (uint64) | header (JSON: format, count N, canvas C, the sections' offsets,
    and what the images are: source folder, split, fingerprint, classes, storage settings)
    labels  int64 (N,)        class index, -1 for unlabelled images
    sizes   int32 (N, 2)      each image's (height, width), at most (C, C)
    status  uint8 (N,)        0 not decoded yet, 1 decoded, 2 did not decode (skipped)
    slots   N x C*C*3 bytes   image k packed as (h, w, 3) at the start of slot k; the rest of the slot is a hole

A store is built under ``NAME.partial`` (``build_store``: decoding on every core, a progress bar, each image
written with its status byte after its pixels, so a killed build resumes where it stopped), then fsynced and
renamed to ``NAME``: a store at its final name is complete. An ``flock`` on the partial file keeps two processes (a
node's torchrun ranks) from building one store twice. ``ImageStore.open`` checks the header, the file's size and
every status, size and label before anything is read; ``read`` fills a batch of images with ``pread`` (no mapping:
the pages a step reads stay in the page cache, outside this process's resident memory).
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import json
import os
import struct
import warnings
from typing import Callable, Dict, List, Optional

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
    status_at = _aligned(sizes_at + 8 * count)
    slots_at = _aligned(status_at + count)
    return {
        "labels_at": labels_at,
        "sizes_at": sizes_at,
        "status_at": status_at,
        "slots_at": slots_at,
        "file_size": slots_at + count * canvas * canvas * 3,
    }


def _pread(fd: int, buffer, offset: int, path: str) -> None:
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise StoreError(f"the store {path} ended at byte {offset + done}: it is truncated")
        done += got


def _pwrite(fd: int, data, offset: int) -> None:
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
        if not isinstance(header, dict) or header.get("format") != FORMAT:
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
    except (KeyError, TypeError, ValueError) as err:
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

    def __init__(self, path: str, header: Dict, slots: np.ndarray, labels: np.ndarray, sizes: np.ndarray):
        self.path, self.header = path, header
        self.slots, self._labels, self._sizes = slots, labels, sizes
        self.canvas = int(header["canvas"])
        self.slot_bytes = self.canvas * self.canvas * 3
        self._fd: Optional[int] = None

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
            for array, key in ((labels, "labels_at"), (sizes, "sizes_at"), (status, "status_at")):
                _pread(fd, array, int(header[key]), path)
        finally:
            os.close(fd)
        num_classes = len(header.get("classes") or [])
        problems = {
            "unfinished images": np.isin(status, (DECODED, SKIPPED), invert=True),
            "sizes outside the canvas": (status == DECODED) & ((sizes < 1) | (sizes > canvas)).any(axis=1),
            "labels outside the classes": (labels < (0 if num_classes else -1)) | (labels >= max(num_classes, 0)),
        }
        if not num_classes:
            problems["labels outside the classes"] = labels != -1
        for what, bad in problems.items():
            if bad.any():
                raise StoreError(f"the store {path} is corrupt: {int(bad.sum())} {what}")
        slots = np.flatnonzero(status == DECODED)
        return cls(path, header, slots, labels[slots], sizes[slots].astype(np.int64))

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
        return ImageStore(self.path, self.header, self.slots[:stop], self._labels[:stop], self._sizes[:stop])

    def __repr__(self) -> str:
        return f"ImageStore({self.path!r}: {len(self)} images on a {self.canvas}x{self.canvas} canvas)"

    # -- reading ----------------------------------------------------------------------------------------------------
    def _descriptor(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as err:
                raise StoreError(f"cannot open the store {self.path}: {err.strerror or err}") from None
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        self.close()

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
                _pread(fd, image[:height], offset, self.path)
            else:
                packed = np.empty((height, width, 3), np.uint8)
                _pread(fd, packed, offset, self.path)
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


# ---------------------------------------------------------------------------------------------------------------------
# Building


def _decode_or_error(decode: Callable[[str], np.ndarray], file: str):
    try:
        return decode(file), None
    except Exception as err:  # PIL raises several types for a broken file: report them all the same way
        return None, f"{type(err).__name__}: {err}"


def decode_workers() -> int:
    """Decoding threads: one per core this process may run on (PIL releases the GIL while it decodes and resizes)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _new_partial(fd: int, header: Dict, labels: np.ndarray) -> None:
    text = json.dumps(header, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    _pwrite(fd, MAGIC + struct.pack("<Q", len(text)) + text, 0)
    _pwrite(fd, np.ascontiguousarray(labels, dtype=np.int64), header["labels_at"])
    os.ftruncate(fd, header["file_size"])  # the slots stay holes until written: the file takes what it holds


def store_header(count: int, canvas: int, **about) -> Dict:
    """The header of a store of ``count`` images on a ``canvas`` square, with ``about`` (source, split,
    fingerprint, classes, storage settings) recorded beside the layout."""
    header = {"format": FORMAT, "count": count, "canvas": canvas, **about}
    header["header_bytes"] = 0
    for _ in range(3):  # the offsets depend on the header's length, which depends on the offsets' digits
        header.update(_layout(count, canvas, len(json.dumps(header, sort_keys=True).encode())))
        header["header_bytes"] = len(json.dumps(header, sort_keys=True).encode())
    header.update(_layout(count, canvas, header["header_bytes"]))
    assert header["header_bytes"] == len(json.dumps(header, sort_keys=True).encode())
    return header


def build_store(
    path: str,
    files: List[str],
    labels: np.ndarray,
    header: Dict,
    decode: Callable[[str], np.ndarray],
    on_bad_image: str = "skip",
    show_progress: bool = True,
    description: str = "decode",
) -> List[str]:
    """Decode ``files`` (labels ``labels``) into the store ``path`` (header from ``store_header``), resuming a
    partial build of the same header; returns the files that did not decode (skipped, each with a warning; with
    ``on_bad_image="error"`` the first stops the build with DataError and the partial file is removed)."""
    from tqdm import tqdm

    partial = path + PARTIAL
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"empssl: waiting for another process building {path}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.exists(path):  # that process finished it
            return []
        resumed = False
        if os.fstat(fd).st_size:
            try:
                resumed = read_header(partial, fd) == header and os.fstat(fd).st_size == header["file_size"]
            except StoreError:
                raise StoreError(
                    f"{partial} is not a partial store of empssl's; it is left alone: remove it or pass another "
                    f"--cache-dir"
                ) from None
        status = np.zeros(len(files), np.uint8)
        if resumed:
            _pread(fd, status, header["status_at"], partial)
            if np.isin(status, (PENDING, DECODED, SKIPPED), invert=True).any():
                resumed, status[:] = False, PENDING
        if not resumed:
            _new_partial(fd, header, labels)
        skipped = [files[k] for k in np.flatnonzero(status == SKIPPED)]
        pending = [int(k) for k in np.flatnonzero(status == PENDING)]
        canvas = header["canvas"]
        slot_bytes = canvas * canvas * 3
        bar = tqdm(
            total=len(files),
            initial=len(files) - len(pending),
            desc=description + (" (resumed)" if resumed and len(pending) < len(files) else ""),
            unit="img",
            disable=not show_progress,
            dynamic_ncols=True,
        )
        workers = decode_workers()
        with bar, concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            queue = iter(pending)
            running = {}

            def submit(count: int) -> None:
                for index in queue:
                    running[pool.submit(_decode_or_error, decode, files[index])] = index
                    count -= 1
                    if count == 0:
                        return

            submit(4 * workers)  # a bounded window: decoded images wait in memory only briefly
            try:
                while running:
                    done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in done:
                        index = running.pop(future)
                        image, error = future.result()
                        if image is None or image.ndim != 3 or image.shape[2] != 3 or max(image.shape[:2]) > canvas:
                            error = error or f"decoded to {getattr(image, 'shape', None)}, not within the canvas"
                            if on_bad_image == "error":
                                raise DataError(
                                    f"cannot decode image {files[index]}: {error} (pass --on-bad-image skip to skip "
                                    f"such files)"
                                )
                            warnings.warn(f"skipping image {files[index]} that does not decode: {error}")
                            skipped.append(files[index])
                            _pwrite(fd, np.array([SKIPPED], np.uint8), header["status_at"] + index)
                        else:
                            # pixels and size first, the status byte last: a kill between them redoes the image
                            _pwrite(fd, np.ascontiguousarray(image), header["slots_at"] + index * slot_bytes)
                            size = np.array(image.shape[:2], np.int32)
                            _pwrite(fd, size, header["sizes_at"] + 8 * index)
                            _pwrite(fd, np.array([DECODED], np.uint8), header["status_at"] + index)
                        bar.update(1)
                    submit(len(done))
            except BaseException:
                for future in running:
                    future.cancel()
                raise
        if len(skipped) == len(files):
            raise DataError(f"no image of the {description} decoded")
        os.fsync(fd)
        os.replace(partial, path)  # the final name marks a complete store
        _fsync_folder(os.path.dirname(path) or ".")
        return skipped
    except DataError:
        if os.path.exists(partial):  # ours: we hold its lock and wrote its header
            os.unlink(partial)
        raise
    finally:
        os.close(fd)


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_stores(folder: str, keep: str, source: str, split: str) -> List[str]:
    """Remove the stores (complete or partial) in ``folder`` that this tree's split wrote for an earlier state of the
    tree: only files named ``*.empssl-store[.partial]`` whose header is a store's and names the same ``source`` and
    ``split``, never ``keep``, never one another process is building. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        if path == keep or not (name.endswith(SUFFIX) or name.endswith(SUFFIX + PARTIAL)) or os.path.islink(path):
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            import stat

            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            header = read_header(path, fd)
            if header.get("source") != source or header.get("split") != split:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a partial store being built is somebody's
            os.unlink(path)
            removed.append(path)
        except (StoreError, OSError):
            continue
        finally:
            os.close(fd)
    return removed
