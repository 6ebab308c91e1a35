"""A run's folder (``--out-dir``) and its owner, ``RunFolder``: the lock, the checkpoint, the metrics log and the
curves, the rule of which run owns the folder, and the checks made before a run writes in it.

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
import time
import warnings
from typing import Any, Dict, Iterator, List, Optional

from .. import checkpoint as ckpt
from ..files import check_writable_folder, remove_stale_temporaries, write_atomically
from .curves import write_training_curves

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
LOCK_NAME = ".lock"
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME)  # the files that make a folder a run's
# fields that change the training trajectory: a resume with other values is not a continuation
_TRAJECTORY_FIELDS = (
    "dataset",
    "num_patches",
    "batch_size",
    "lr",
    "schedule_epochs",
    "eps",
    "inv_coef",
    "tcr_coef",
    "seed",
    "data_seed",
    "image_size",
    "train_size",
    "sync_bn",
)
# settings that decide which images a run trains on
_DATA_FIELDS = ("dataset", "root", "train_size", "image_size", "data_seed")


class RunFolder:
    """The folder of one training run, held by the process that writes the run's files (rank 0).

    ``open`` checks the folder (writable; under ``RunLock`` for the whole run, taken before its files are judged),
    loads and checks the checkpoint to resume, and decides whether the folder holds another run. Nothing is written
    until ``start``, called once every input of the run is checked: it removes a killed write's temporaries and
    opens the metrics log. The take-over rule (``--overwrite``, or a folder holding only metrics): the old run's
    files stay until this run writes its first checkpoint (``write_checkpoint``), or until ``finish`` when it writes
    none.
    """

    def __init__(self, path: str):
        self.path = path
        self.checkpoint_path = os.path.join(path, CHECKPOINT_NAME)
        self.metrics_path = os.path.join(path, METRICS_NAME)
        self.curves_path = os.path.join(path, CURVES_NAME)
        self.lock = RunLock(path)
        self.resumed: Optional[Dict[str, Any]] = None  # the checkpoint a resume continues
        self.same_run = False  # the resumed checkpoint is this folder's own: the run continues the folder's run
        self.holds_other_run = False  # the folder holds another run's files, replaced on take-over
        self.metrics: Optional[MetricsLog] = None

    def open(self, config) -> "RunFolder":
        """Check ``config.out_dir`` and ``config.resume`` (``config``: a TrainConfig) before anything is written;
        ValueError/CheckpointError naming what is wrong. Takes the lock: ``close`` releases it."""
        check_writable_folder(self.path, "--out-dir")
        self.lock.acquire()
        try:
            if config.resume:
                self.resumed = ckpt.load_checkpoint(config.resume)
                ckpt.check_train_state(config.resume, self.resumed)
                ckpt.check_finite(
                    config.resume,
                    {"model": self.resumed["model"], "optimizer": self.resumed["optimizer"]},
                    what="state",
                )
                check_resume_config(config.resume, self.resumed["model_config"], self.resumed.get("config", {}), config)
                self.same_run = os.path.realpath(config.resume) == os.path.realpath(self.checkpoint_path)
            self.holds_other_run = self._check_other_run(config.overwrite)
        except BaseException:
            self.lock.release()
            raise
        return self

    def _check_other_run(self, overwrite: bool) -> bool:
        """Refuse a folder that holds another run's files (unless ``overwrite``); True when it holds such files."""
        present = [name for name in RUN_FILES if os.path.exists(os.path.join(self.path, name))]
        if present == [METRICS_NAME] and not self.same_run:
            print(
                f"empssl: note: --out-dir {self.path} holds only the {METRICS_NAME} of a run that wrote no "
                f"checkpoint (nothing to resume); this run replaces it once it writes its first checkpoint",
                file=sys.stderr,
                flush=True,
            )
            return True
        if present and not self.same_run and not overwrite:
            raise ValueError(
                f"--out-dir {self.path} already holds another run ({', '.join(present)}); continue it "
                f"with --resume {self.checkpoint_path}, replace it with --overwrite (its files go once "
                f"this run writes its first checkpoint), or pass another --out-dir"
            )
        return bool(present)

    def start(self, run_id: Optional[str], resume_path: Optional[str], step: int, elapsed_s: float) -> None:
        """Every input is checked: from here on the folder is this run's. The metrics log starts from the resumed
        run's lines up to ``step`` (then one resume marker), or empty."""
        self.lock.record(run_id)
        remove_stale_temporaries(self.path)
        history: List[Dict[str, Any]] = []
        if resume_path is not None:
            history = read_metrics(
                os.path.join(os.path.dirname(resume_path), METRICS_NAME), run_id=run_id, until_step=step
            )
            history.append({"event": "resume", "step": step, "elapsed_s": elapsed_s, "run_id": run_id})
        self.metrics = MetricsLog(self.metrics_path, history, owned=not self.holds_other_run or self.same_run)

    def write_checkpoint(self, payload: Dict[str, Any]) -> None:
        """The checkpoint, atomically; under take-over the old run's metrics go only now that its checkpoint is
        replaced."""
        ckpt.save_checkpoint(self.checkpoint_path, payload)
        if not self.metrics.owned:
            self.metrics.take_over()

    def finish(self) -> None:
        """After the last step: the metrics log is this run's even when nothing was trained (resumed at the end), and
        curves.png is drawn from it (where matplotlib is installed)."""
        if not self.metrics.owned:
            self.metrics.take_over()
        write_training_curves(read_step_metrics(self.metrics_path), self.curves_path)

    def close(self) -> None:
        self.lock.release()


def read_metrics(
    path: str,
    run_id: Optional[str] = None,
    until_step: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl in file order, resume markers included; with ``run_id`` only that run's, with
    ``until_step`` only those up to that step. A line a kill cut short is skipped."""
    return [
        record
        for record in _records(path)
        if (run_id is None or record.get("run_id") == run_id)
        and (until_step is None or record.get("step", 0) <= until_step)
    ]


def read_step_metrics(path: str) -> List[Dict[str, Any]]:
    """One record per step in step order, resume markers left out; the last record of a step wins (a resumed run logs
    again the steps after its checkpoint)."""
    by_step = {
        record["step"]: record
        for record in _records(path)
        if isinstance(record.get("step"), int) and "event" not in record
    }
    return [by_step[step] for step in sorted(by_step)]


def _records(path: str) -> Iterator[Dict[str, Any]]:
    """The JSON objects of ``path``, one per line (none when it does not exist)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line a kill cut short
                continue
            if isinstance(record, dict):
                yield record


def check_resume_config(path: str, model_config: Dict[str, Any], stored: Dict[str, Any], config) -> None:
    """CheckpointError unless ``config`` (a TrainConfig) builds the checkpoint's model (``model_config``); a warning
    for changed trajectory settings (``stored``: the checkpoint's training config)."""
    ckpt.check_same_model(path, model_config, config.model_config())
    changed = [
        f"{f}: {stored.get(f)!r} -> {getattr(config, f)!r}"
        for f in _TRAJECTORY_FIELDS
        if f in stored and stored[f] != getattr(config, f)
    ]
    if changed:
        warnings.warn(
            f"resuming {path} with changed settings ({'; '.join(changed)}): the run will not match an uninterrupted one"
        )


def check_resume_data(path: str, resumed: Dict[str, Any], config, data) -> None:
    """ValueError unless ``data`` (the ImageDataset loaded for ``config``) has the size the checkpoint was trained on
    (its stored permutation indexes it)."""
    stored = resumed.get("dataset", {})
    num_train, image_size = int(data.train_images.shape[0]), data.image_size[0]
    if stored.get("num_train", num_train) == num_train and stored.get("image_size", image_size) == image_size:
        return
    stored_config = resumed.get("config", {})
    changed = [
        f"--{f.replace('_', '-')} {stored_config.get(f)!r} -> {getattr(config, f)!r}"
        for f in _DATA_FIELDS
        if f in stored_config and stored_config[f] != getattr(config, f)
    ]
    why = "changed settings: " + "; ".join(changed) if changed else "the data set itself changed"
    raise ValueError(
        f"cannot resume {path}: it was trained on {stored.get('num_train')} images of "
        f"{stored.get('image_size')}x{stored.get('image_size')} ({stored.get('name')}), this run has "
        f"{num_train} of {image_size}x{image_size} ({data.name}); {why}. Resume with the checkpoint's data "
        f"settings, or start a new run in another --out-dir"
    )


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
                raise RunFolderBusy(
                    f"--out-dir {self.folder} is in use by another run ({self.holder()}); wait for it "
                    f"to finish, or pass another --out-dir"
                ) from None
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
        return (
            f"pid {info.get('pid')} on {info.get('host')}, run id {info.get('run_id') or 'not yet known'}, "
            f"started {info.get('started')}"
        )

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
        write_atomically(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.pending).encode()))
        self.pending, self.owned = [], True
