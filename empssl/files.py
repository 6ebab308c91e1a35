"""Files the package writes: atomically (a temporary file in the same folder, then ``os.replace``, so a kill
leaves the old file or the new one, never half of one), into folders checked writable before any work starts, and
the temporaries a kill left behind removed by the next run in the folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Callable, Optional

TEMP_PREFIX = ".tmp-"  # temporary files of an atomic write; a kill can leave one, the next run removes it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _WriteRecorder:
    """A binary file that remembers the OSError of a failed write: torch.save's zip writer turns it into a
    RuntimeError ("file write failed"), and the caller should see the system's reason instead."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self.file, name)


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` to a temporary file next to ``path``, then ``os.replace`` it into place.

    OSError(errno, reason, path) if the folder or the file cannot be written (no space, permission, read-only, the
    folder vanished): the temporary file is removed and ``path`` keeps its old content."""
    folder = os.path.dirname(os.path.abspath(path))
    temp = None
    try:
        os.makedirs(folder, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1])
        with os.fdopen(handle, "wb") as raw:
            f = _WriteRecorder(raw)
            try:
                write(f)
            except RuntimeError as err:
                if f.error is None:
                    raise
                raise f.error from err
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets a plain open()'s mode
        os.replace(temp, path)
    except OSError as err:
        _remove_quietly(temp)
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}", path) from err
    except BaseException:
        _remove_quietly(temp)
        raise


def _remove_quietly(path: Optional[str]) -> None:
    if path is not None:
        try:
            os.remove(path)
        except OSError:
            pass


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
        raise ValueError(
            f"{option} {path} is not writable: cannot create files in {existing} "
            f"({err.strerror or err}); pass a folder you can write to"
        ) from err


def remove_stale_temporaries(folder: str) -> None:
    """Temporary files of a checkpoint or metrics write that a kill interrupted (the next run in the folder removes
    them)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
