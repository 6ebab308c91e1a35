"""One run per folder: ``RunLock``, an exclusive ``flock`` on ``.lock`` in a run folder (or a sweep's), held for the
whole run and taken before the folder's files are judged, so a second run into the folder is refused with the
holder's pid, host, run id and start time (the lock file's text, for the message only). The kernel drops the lock
when its process dies, so a lock file left by a killed run never blocks. The lock file is opened without following
a link (empssl/files.py)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

from ..files import open_owned

LOCK_NAME = ".lock"


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
            fd = open_owned(self.path, os.O_RDWR | os.O_CREAT, "the lock file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = self._holder(fd)
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderBusy(
                    f"--out-dir {self.folder} is in use by another run ({holder}); wait for it "
                    f"to finish, or pass another --out-dir"
                ) from None
            if self._is_at_path(fd):
                self.fd = fd
                self.record(None)
                return self
            os.close(fd)

    def _is_at_path(self, fd: int) -> bool:
        """Whether ``fd`` is still the file at the lock's path (not removed or replaced since it was opened)."""
        try:
            return os.path.samestat(os.fstat(fd), os.lstat(self.path))
        except FileNotFoundError:
            return False

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict) or not info:
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
        if self._is_at_path(self.fd):  # only this lock's own file: never what replaced it at the path
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
