"""A run's folder (``--out-dir``): which run owns it, its metrics log, and the checks made before a run writes in it.

A run owns its ``out_dir``: a folder that holds another run's checkpoint or metrics is refused
unless ``overwrite`` (then the old files are replaced once the new run writes its first
checkpoint). On resume ``metrics.jsonl`` is cut back to the checkpoint's step and gets one resume
marker, so each step appears at most once, in order. A kill can leave temporary files of an atomic
write behind: the next run in the folder removes them.

One run at a time: ``RunLock`` holds an exclusive ``flock`` on ``.lock`` in the folder for the whole run, taken
before the folder's files are judged, so a second run into the folder is refused with the holder's pid, host,
run id and start time (the lock file's text, for the message only). The kernel drops the lock when its process
dies, so a lock file left by a killed run never blocks. A folder holding only ``metrics.jsonl`` (its run stopped
before its first checkpoint: a full disk, a crash, a non-finite loss) holds nothing to resume: a new run replaces
it, with a note, once it writes its first checkpoint (no ``--overwrite`` needed).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

from . import checkpoint as ckpt

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = ".lock"
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME)  # the files that make a folder a run's
# fields that change the training trajectory: a resume with other values is not a continuation
_TRAJECTORY_FIELDS = ("dataset", "num_patches", "batch_size", "lr", "schedule_epochs", "eps", "inv_coef", "tcr_coef",
                      "seed", "data_seed", "image_size", "train_size", "sync_bn")
# settings that decide which images a run trains on
_DATA_FIELDS = ("dataset", "root", "train_size", "image_size", "data_seed")


def check_run_folder(config) -> Tuple[Optional[Dict[str, Any]], bool, bool]:
    """The checks of ``config.resume`` and ``config.out_dir`` before anything is written (``config``: a TrainConfig).

    Returns (the checkpoint to resume, or None; whether it is the folder's own checkpoint, so the run continues
    the run that owns the folder; whether the folder holds a run's files). ValueError/CheckpointError otherwise.
    """
    resumed = ckpt.load_checkpoint(config.resume) if config.resume else None
    if resumed is not None:
        ckpt.check_train_state(config.resume, resumed)
        ckpt.check_finite(config.resume, {"model": resumed["model"], "optimizer": resumed["optimizer"]}, what="state")
        check_resume_config(config.resume, resumed.get("config", {}), config)
    own_checkpoint = os.path.join(config.out_dir, CHECKPOINT_NAME)
    same_run = resumed is not None and os.path.realpath(config.resume) == os.path.realpath(own_checkpoint)
    return resumed, same_run, check_out_dir(config, same_run)


def resumed_metrics(resume_path: str, run_id: Optional[str], step: int, elapsed_s: float) -> List[Dict[str, Any]]:
    """The resumed run's metrics cut back to the checkpoint's step (steps logged after it are logged again),
    then one resume marker."""
    history = read_metrics_until(os.path.join(os.path.dirname(resume_path), METRICS_NAME), run_id, step)
    return history + [{"event": "resume", "step": step, "elapsed_s": elapsed_s, "run_id": run_id}]


def check_writable_folder(path: str, option: str) -> None:
    """ValueError unless ``path`` is a folder this process can write in, or one it can create.

    Probes by creating and removing a temporary file in the nearest existing folder (access bits
    say nothing for root or read-only mounts): nothing is left behind.
    """
    target = os.path.abspath(path)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == target else f"lies under {existing}, which is a file"
        raise ValueError(f"{option} {path} {where}, not a folder; pass a folder")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".tmp-probe-")
        os.close(handle)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{option} {path} is not writable: cannot create files in {existing} "
                         f"({err.strerror or err}); pass a folder you can write to") from err


def check_resume_config(path: str, stored: Dict[str, Any], config) -> None:
    """CheckpointError unless ``config`` (a TrainConfig) builds the stored model; a warning for changed trajectory settings."""
    ckpt.check_same_model(path, {f: stored.get(f) for f in ckpt.MODEL_FIELDS}, config.model_config())
    changed = [f"{f}: {stored.get(f)!r} -> {getattr(config, f)!r}" for f in _TRAJECTORY_FIELDS
               if f in stored and stored[f] != getattr(config, f)]
    if changed:
        warnings.warn(f"resuming {path} with changed settings ({'; '.join(changed)}): the run will not match an "
                      f"uninterrupted one")


def check_resume_data(path: str, resumed: Dict[str, Any], config, data) -> None:
    """ValueError unless ``data`` (the ImageDataset loaded for ``config``) has the size the checkpoint was trained on
    (its stored permutation indexes it)."""
    stored = resumed.get("dataset", {})
    num_train, image_size = int(data.train_images.shape[0]), data.image_size[0]
    if stored.get("num_train", num_train) == num_train and stored.get("image_size", image_size) == image_size:
        return
    stored_config = resumed.get("config", {})
    changed = [f"--{f.replace('_', '-')} {stored_config.get(f)!r} -> {getattr(config, f)!r}" for f in _DATA_FIELDS
               if f in stored_config and stored_config[f] != getattr(config, f)]
    why = "changed settings: " + "; ".join(changed) if changed else "the data set itself changed"
    raise ValueError(f"cannot resume {path}: it was trained on {stored.get('num_train')} images of "
                     f"{stored.get('image_size')}x{stored.get('image_size')} ({stored.get('name')}), this run has "
                     f"{num_train} of {image_size}x{image_size} ({data.name}); {why}. Resume with the checkpoint's data "
                     f"settings, or start a new run in another --out-dir")


def check_out_dir(config, same_run: bool) -> bool:
    """Refuse an out_dir that holds another run's files (unless overwrite); True when it holds such files."""
    check_writable_folder(config.out_dir, "--out-dir")
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(config.out_dir, name))]
    if present == [METRICS_NAME] and not same_run:
        print(f"empssl: note: --out-dir {config.out_dir} holds only the {METRICS_NAME} of a run that wrote no "
              f"checkpoint (nothing to resume); this run replaces it once it writes its first checkpoint",
              file=sys.stderr, flush=True)
        return True
    if present and not same_run and not config.overwrite:
        own_checkpoint = os.path.join(config.out_dir, CHECKPOINT_NAME)
        raise ValueError(f"--out-dir {config.out_dir} already holds another run ({', '.join(present)}); continue it with "
                         f"--resume {own_checkpoint}, replace it with --overwrite (its files go once this run writes "
                         f"its first checkpoint), or pass another --out-dir")
    return bool(present)


def remove_stale_temporaries(folder: str) -> None:
    """Temporary files of a checkpoint or metrics write that a kill interrupted (the next run in the folder removes them)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(ckpt.TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def read_metrics_until(path: str, run_id: Optional[str], step: int) -> List[Dict[str, Any]]:
    """The lines of ``path`` that this run wrote up to ``step`` (a kill may have left a partial last line: skipped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("run_id") == run_id and record.get("step", 0) <= step:
                records.append(record)
    return records


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock."""


class RunLock:
    """An exclusive ``flock`` on ``folder/.lock``, held from ``acquire`` to ``release`` (a context manager).

    The file's text (pid, host, run id, start time) only names the holder in the refusal; the lock itself is the
    kernel's and goes with its process. ``release`` removes the file; ``acquire`` checks that the file it locked is
    still the one at the path (a release between its open and its flock removed it), else it tries again.
    Creating the folder is the only thing written before the run's inputs are checked; an empty folder this lock
    created is removed again on release.
    """

    def __init__(self, folder: str):
        self.folder, self.path = folder, os.path.join(folder, LOCK_NAME)
        self.fd: Optional[int] = None
        self.created_folder = False
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")

    def acquire(self) -> "RunLock":
        self.created_folder = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderBusy(f"--out-dir {self.folder} is in use by another run ({self.holder()}); wait for it "
                                    f"to finish, or pass another --out-dir") from None
            try:
                same_file = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same_file = False
            if same_file:
                self.fd = fd
                self.record(None)
                return self
            os.close(fd)

    def holder(self) -> str:
        try:
            with open(self.path) as f:
                info = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "its lock file names no holder"
        return (f"pid {info.get('pid')} on {info.get('host')}, run id {info.get('run_id') or 'not yet known'}, "
                f"started {info.get('started')}")

    def record(self, run_id: Optional[str]) -> None:
        """Write the holder's description into the lock file (for a refused second run's message)."""
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "started": self.started})
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (text + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)  # while still locked: a waiting process sees the path gone and tries again
        os.close(self.fd)
        self.fd = None
        if self.created_folder:
            with contextlib.suppress(OSError):
                os.rmdir(self.folder)  # only if empty: the run failed before writing anything

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class MetricsLog:
    """metrics.jsonl of one run. Until the run owns its folder (``owned``), lines wait in memory: under --overwrite the
    old run's file stays until this run's first checkpoint, then ``take_over`` replaces it atomically."""

    def __init__(self, path: str, records: List[Dict[str, Any]], owned: bool):
        self.path, self.pending, self.owned = path, list(records), owned and not records
        if owned and records:
            self.take_over()

    def write(self, record: Dict[str, Any]) -> None:
        if not self.owned:
            self.pending.append(record)
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def take_over(self) -> None:
        """Replace the file with the pending lines (atomically: a kill leaves the old file or the new one)."""
        ckpt.write_atomically(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.pending).encode()))
        self.pending, self.owned = [], True


__all__ = ["CHECKPOINT_NAME", "METRICS_NAME", "LOCK_NAME", "RunLock", "RunFolderBusy", "RUN_FILES", "check_run_folder", "resumed_metrics", "check_writable_folder",
           "check_resume_config", "check_resume_data", "check_out_dir", "remove_stale_temporaries", "read_metrics_until",
           "MetricsLog"]
