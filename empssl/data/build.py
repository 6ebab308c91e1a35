"""Decoding one split of an image tree into a store (``empssl.data.store``): in parallel, resumable, atomic.

``build_store`` decodes on every core (threads: PIL releases the GIL while it decodes and resizes) with a progress
bar, in a bounded window so decoded images wait in memory only briefly; the main thread writes each image's pixels,
then its size, then its status byte, into ``NAME.partial``, so a build killed at any point resumes where it
stopped. When every image is written the file is fsynced and renamed to ``NAME``: a store at its final name is
complete. An ``flock`` on the partial file keeps two processes (a node's torchrun ranks) from building one store
twice: the second waits and then uses the first's; the disk-space check and the removal of a damaged store happen
under that lock too. ``remove_stale_stores`` removes only stores this tree's split wrote with the same storage
settings for an earlier state of the tree, proven by their name and their header: a store of other settings may be
another run's, in use. A store being read stays readable when removed (``ImageStore`` holds its file open).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import shutil
import stat
import sys
import warnings
from typing import Callable, Dict, List

import numpy as np

from .dataset import DataError
from .store import (
    DECODED,
    PARTIAL,
    PENDING,
    SKIPPED,
    SUFFIX,
    ImageStore,
    StoreError,
    canvas_sum,
    encode_header,
    pread_into,
    pwrite_all,
    read_header,
)


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
    os.ftruncate(fd, 0)
    pwrite_all(fd, encode_header(header), 0)
    pwrite_all(fd, np.ascontiguousarray(labels, dtype=np.int64), header["labels_at"])
    os.ftruncate(fd, header["file_size"])  # the slots stay holes until written: the file takes what it holds


def build_store(
    path: str,
    files: List[str],
    labels: np.ndarray,
    header: Dict,
    decode: Callable[[str], np.ndarray],
    on_bad_image: str = "skip",
    show_progress: bool = True,
    description: str = "decode",
    least_bytes: int = 0,
) -> List[str]:
    """Decode ``files`` (labels ``labels``) into the store ``path`` (header from ``store_header``), resuming a
    partial build of the same header; returns the files that did not decode (skipped, each with a warning; with
    ``on_bad_image="error"`` the first stops the build with DataError and the partial file is removed). A store
    at ``path`` that does not open with this header is damaged and replaced. DataError if the disk lacks
    ``least_bytes`` (beside what the partial file already holds)."""
    from tqdm import tqdm

    partial = path + PARTIAL
    try:  # never through a link: a link named like the partial store is not a file this build may write
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise StoreError(f"cannot write {partial}: {err.strerror or err}") from None
    owned = False  # whether the partial file is this build's: locked, and its header ours
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreError(
                f"{partial} is not a regular file; it is left alone: remove it or pass another --cache-dir"
            )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"empssl: waiting for another process building {path}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.exists(path):
            try:
                ImageStore.open(path, expect=header)  # another process finished it while this one waited
                if not os.fstat(fd).st_size:
                    _unlink_if_same(partial, fd)  # the empty file this call's open created after that rename
                return []
            except StoreError:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # damaged (its name is this header's fingerprint and split): rebuilt below
        folder = os.path.dirname(path) or "."
        free = shutil.disk_usage(folder).free + os.fstat(fd).st_blocks * 512  # the partial file's space is reused
        if least_bytes > free:
            if not os.fstat(fd).st_size:
                _unlink_if_same(partial, fd)
            raise DataError(
                f"the store of the {description} needs at least {least_bytes / 2**30:.1f} GiB, but {folder} has "
                f"{free / 2**30:.1f} GiB free; pass --cache-dir on a larger disk, or a smaller --image-size"
            )
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
            pread_into(fd, status, header["status_at"], partial)
            if np.isin(status, (PENDING, DECODED, SKIPPED), invert=True).any():
                resumed, status[:] = False, PENDING
        if not resumed:
            _new_partial(fd, header, labels)
        owned = True
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
                            pwrite_all(fd, np.array([SKIPPED], np.uint8), header["status_at"] + index)
                        else:
                            # pixels and size first, the status byte last: a kill between them redoes the image
                            pwrite_all(fd, np.ascontiguousarray(image), header["slots_at"] + index * slot_bytes)
                            size = np.array(image.shape[:2], np.int32)
                            pwrite_all(fd, size, header["sizes_at"] + 8 * index)
                            total = np.array([canvas_sum(image, canvas)], np.int64)
                            pwrite_all(fd, total, header["sums_at"] + 8 * index)
                            pwrite_all(fd, np.array([DECODED], np.uint8), header["status_at"] + index)
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
        if owned:
            _unlink_if_same(partial, fd)  # this call holds its lock and wrote or checked its header
        raise
    finally:
        os.close(fd)


def _unlink_if_same(path: str, fd: int) -> None:
    """Remove ``path`` if it still is the file open as ``fd`` (never a file another process put there since)."""
    try:
        if os.path.samestat(os.stat(path, follow_symlinks=False), os.fstat(fd)):
            os.unlink(path)
    except OSError:
        pass


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


def remove_stale_stores(folder: str, keep: str, header: Dict) -> List[str]:
    """Remove the stores (complete or partial) in ``folder`` that this tree's split wrote for an earlier state of the
    tree: only files named ``*.empssl-store[.partial]`` whose header is a store's and names the same source, split
    and storage settings as ``header`` (the one of ``keep``) but another fingerprint; never ``keep``, never one
    another process is building. Returns the removed paths."""
    same = {key: header[key] for key in ("source", "split", "settings")}
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
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            found = read_header(path, fd)
            if (
                any(found.get(key) != value for key, value in same.items())
                or found.get("fingerprint") == header["fingerprint"]
            ):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a partial store being built is somebody's
            os.unlink(path)
            removed.append(path)
        except (StoreError, OSError):
            continue
        finally:
            os.close(fd)
    return removed
