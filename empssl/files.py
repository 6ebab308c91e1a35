"""Files the package reads and writes, opened so that nothing of the user's is touched and nothing hangs.

Writes are atomic (a temporary file in the same folder, then ``os.replace``, so a kill leaves the old file or the
new one, never half of one), into folders checked writable before any work starts. A temporary is named
``.tmp-empssl-<file>-<random>`` and its writer holds an ``flock`` on it until it is in place: the next run or sweep
into the folder removes the ones a kill left behind, the next export or plot those of its own file
(``remove_stale_temporaries``: the lock tells a dead writer's from a live one's), and nothing else. The files a
program owns in its folders (a run's lock and metrics log) are opened without following symbolic links, so a link
planted in a run folder never makes a write land in somebody else's file. Inputs (a checkpoint, an npz file, an
image, a metrics log) must be regular files: a FIFO or a device is refused from its ``stat`` without being opened
for reading, so it never blocks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import tempfile
from typing import BinaryIO, Callable, Optional, Tuple

TEMP_PREFIX = ".tmp-empssl-"  # temporary files of an atomic write; a kill can leave one (remove_stale_temporaries)
_TEMP_NAME = re.compile(r"\.tmp-empssl-(?P<target>.+)-[a-z0-9_]{8}(\.[^/]*)?")  # 8 random characters
_TARGET_CHARS = 100  # of the target's name in a temporary's name (file names are at most 255 bytes)


class NotARegularFile(ValueError):
    """An input is a folder, a FIFO, a device or a socket: refused before it is opened for reading."""


class LinkRefused(ValueError):
    """A file a program owns in its folder is a symbolic link: writing through it would change another file."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular_file(path: str, what: str) -> os.stat_result:
    """The ``stat`` of ``path`` (links followed); FileNotFoundError if it is missing, NotARegularFile naming ``what``
    unless it is a regular file. Nothing is opened: a FIFO or a device is refused without blocking."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotARegularFile(f"{what} {path} is {_kind(info.st_mode)}, not a regular file; pass a file")
    return info


def open_input(path: str, what: str) -> BinaryIO:
    """``path`` opened for reading in binary mode, only if it is a regular file (``check_regular_file``; checked again
    on the open file, which is opened non-blocking so that a FIFO swapped in between cannot block either)."""
    check_regular_file(path, what)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{what} {path} is {_kind(mode)}, not a regular file; pass a file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def refuse_link(path: str, what: str) -> None:
    """LinkRefused if ``path`` is a symbolic link (a file a program writes in its own folder must be its own)."""
    if os.path.islink(path):
        raise LinkRefused(
            f"{what} {path} is a symbolic link (to {os.readlink(path)}); empssl never writes through a link in its "
            f"folders, so that no other file is changed: remove the link, or pass another folder"
        )


def open_owned(path: str, flags: int, what: str) -> int:
    """A file descriptor of ``path`` (created 0644 with O_CREAT in ``flags``) opened without following a link;
    LinkRefused for a symbolic link or a file with other names (a hard link), NotARegularFile for anything but a
    regular file."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666 & ~0o022)
    except OSError as err:
        if err.errno == errno.ELOOP:
            refuse_link(path, what)
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFile(f"{what} {path} is {_kind(info.st_mode)}, not a regular file; remove it")
        if info.st_nlink > 1:  # another name of the same file: writing here would change it there
            raise LinkRefused(
                f"{what} {path} is a hard link ({info.st_nlink} names of one file); empssl never writes into a file "
                f"that has other names, so that no other file is changed: remove it, or pass another folder"
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    except BaseException:
        os.close(fd)
        raise


def append_text(path: str, text: str, what: str = "the file") -> None:
    """Append ``text`` to ``path`` (created if missing), never through a link or into a special file."""
    fd = open_owned(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, what)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def _create_temporary(path: str) -> Tuple[int, str]:
    """(descriptor, name) of a new temporary file beside ``path``, created as a plain open() creates a file: 0666 less
    the umask, applied by the kernel (reading the umask means setting it, which races other threads' new files)."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix, suffix = f"{TEMP_PREFIX}{name[:_TARGET_CHARS]}-", os.path.splitext(name)[1]
    for _ in range(100):  # 8 random characters: a name taken 100 times over means a folder gone wrong
        temp = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{suffix}")
        with contextlib.suppress(FileExistsError):
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), temp
    raise FileExistsError(errno.EEXIST, "no unused temporary name", folder)


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


class StagedWrite:
    """A file written in full to a locked temporary beside ``path`` and synced, not yet in place: ``commit`` moves
    it there (``os.replace``: no space needed, so it does not fail for a full disk), ``discard`` removes it. Staging
    several files first and committing them together keeps a set of files consistent when a write fails.

    OSError(errno, reason, path) if the folder or the file cannot be written (no space, permission, read-only, the
    folder vanished): the temporary file is removed and ``path`` keeps its old content."""

    def __init__(self, path: str, write: Callable[[BinaryIO], None]):
        self.path = path
        self.temp: Optional[str] = None
        self.file: Optional[BinaryIO] = None
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, exist_ok=True)
            handle, self.temp = _create_temporary(path)
            try:
                self.file = os.fdopen(handle, "wb")  # from here on discard() closes it
            except BaseException:
                os.close(handle)
                raise
            fcntl.flock(handle, fcntl.LOCK_EX)  # held until committed: a live write is never cleaned up
            f = _WriteRecorder(self.file)
            try:
                write(f)
            except RuntimeError as err:
                if f.error is None:
                    raise
                raise f.error from err
            f.flush()
            os.fsync(handle)
        except OSError as err:
            self.discard()
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}", path) from err
        except BaseException:
            self.discard()
            raise

    def commit(self) -> None:
        try:
            os.replace(self.temp, self.path)
        except OSError as err:
            self.discard()
            raise OSError(err.errno, f"cannot write {self.path}: {err.strerror or err}", self.path) from err
        self.temp = None
        self._close()

    def discard(self) -> None:
        if self.temp is not None:
            with contextlib.suppress(OSError):
                os.remove(self.temp)
            self.temp = None
        self._close()

    def _close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` to a temporary file next to ``path``, then ``os.replace`` it into place (``StagedWrite``)."""
    StagedWrite(path, write).commit()


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


def shared_folder_reason(path: str) -> Optional[str]:
    """Why ``path`` is a folder that holds far more than one program's output (``/``, the home folder, a
    repository's root), or None."""
    real = os.path.realpath(path)
    if real == os.path.realpath(os.sep):
        return "the root folder"
    if real == os.path.realpath(os.path.expanduser("~")):
        return "your home folder"
    if os.path.exists(os.path.join(real, ".git")):
        return "the root of a repository (it holds .git)"
    return None


def check_output_folder(path: str, option: str, overwrite: bool = False) -> None:
    """``check_writable_folder``, and ValueError for a shared folder (``shared_folder_reason``) unless ``overwrite``
    says explicitly that it is meant."""
    reason = shared_folder_reason(path) if os.path.isdir(path) else None
    if reason is not None and not overwrite:
        raise ValueError(
            f"{option} {path} is {reason}: a run writes its files there, beside everything else it holds; pass a "
            f"folder of its own (e.g. {os.path.join(path, 'runs', 'NAME')}), or add --overwrite if you mean it"
        )
    check_writable_folder(path, option)


def same_file(a: str, b: str) -> bool:
    """Whether the paths name one file (links and hard links resolved); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def remove_stale_temporaries(folder: str, target: Optional[str] = None) -> None:
    """The temporaries of atomic writes into ``folder`` that a kill interrupted (of writes to ``target`` only, when
    given): a file with this module's temporary name, not a link, whose writer holds no lock on it any more."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        match = _TEMP_NAME.fullmatch(name)
        if match is None or (target is not None and match["target"] != os.path.basename(target)[:_TARGET_CHARS]):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # a link, or gone already
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
            os.remove(path)
        except OSError:
            continue
        finally:
            os.close(fd)


def describe_os_error(err: OSError) -> str:
    """``reason: path`` of an OSError (its errno's text when it has no message of its own)."""
    reason = err.strerror or (os.strerror(err.errno) if err.errno else str(err))
    hint = {
        errno.ENOSPC: "free some space or pass another --out-dir",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "check the permissions",
        errno.EPERM: "check the permissions",
        errno.ENOENT: "did the path vanish?",
    }.get(err.errno)
    where = f" ({err.filename})" if err.filename and str(err.filename) not in reason else ""
    return f"{reason}{where}" + (f"; {hint}" if hint else "")
