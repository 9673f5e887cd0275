"""File-system primitives for the output directory that never follow a planted symlink: fresh temp files,
atomic small writes, fsync, a non-blocking flock, and the errors a run reports about its output.

A temp file is created ``O_CREAT | O_EXCL | O_NOFOLLOW`` after removing whatever sits at its name, so a
link planted in the directory can neither redirect a write outside it nor clobber the file it points at.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

# Where the platform lacks a flag, 0 leaves it out (O_EXCL alone already refuses an existing link).
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class OutputDirError(RuntimeError):
    """The output directory cannot be used for this run (another job's output, locked, a symlink, read-only)."""


class CommitError(RuntimeError):
    """A part could not be committed (disk full, I/O error). Parts committed before it are intact.

    ``committed`` is True when the failure came after the commit point (the part and its ledger are in
    place and resume counts them; only the manifest update failed)."""

    def __init__(self, message: str, *, errno_: int | None = None, committed: bool = False) -> None:
        super().__init__(message)
        self.errno = errno_
        self.committed = committed


_OS_ERRORS = {
    errno.ENOSPC: "no space left on device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "input/output error",
}


def describe_os_error(e: OSError) -> str:
    """A short lower-case reason for a file-system error (no ``[Errno N]``)."""
    return _OS_ERRORS.get(e.errno or -1) or (e.strerror or str(e)).lower()


def symlink_error(path: Path) -> OutputDirError:
    return OutputDirError(f"{path} is a symlink; refusing to follow it (remove it, or use another output.path)")


def refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise symlink_error(path)


def ensure_dir(path: Path) -> None:
    """Create one directory level unless a real directory is there; refuse a symlink or a file."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise symlink_error(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OutputDirError(f"{path} is not a directory")


def create_fresh(path: Path) -> int:
    """Open a new, empty file at ``path`` for writing, never through a symlink.

    Whatever sits at the name (a stale temp, a planted link) is unlinked first, which never touches a link's
    target; a link planted between the unlink and the open makes the open fail instead of being followed."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise OutputDirError(f"{path} is a directory where a temp file goes; remove it")
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)


def unlink_quietly(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """Flush a file's data, or make renames in a directory durable (no-op where it cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# The same system call serves both; the two names say at the call site what is being made durable.
fsync_dir = fsync_file = fsync_path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a small file atomically: hidden temp file in the same folder, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(create_fresh(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    except BaseException:
        unlink_quietly(tmp)  # a half-written temp holds the disk space a full disk needs back
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def try_flock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: best effort
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
