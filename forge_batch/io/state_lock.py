"""The lock a run holds on its output's state folder while it writes there (flock on ``lock``, which
holds the writer's pid so that a second run can say who is in the way)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from forge_batch.io.safe_fs import O_CLOEXEC, O_NOFOLLOW, OutputDirError, refuse_symlink, try_flock

LOCK = "lock"


def acquire_lock(state_dir: Path, output: Path) -> int:
    """Lock ``state_dir`` for this process and return the lock's file descriptor (keep it open: closing
    it releases the lock). Raises OutputDirError when another run holds it or the lock file is unsafe."""
    lock_path = state_dir / LOCK
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o644)
    except OSError:
        refuse_symlink(lock_path)  # O_NOFOLLOW's error (ELOOP) says nothing a user can act on
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        # truncating a hard link (or a device) would damage a file outside the output directory
        os.close(fd)
        raise OutputDirError(f"{lock_path} is not a plain file of its own (a hard link or a device); remove it")
    if not try_flock(fd):
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise OutputDirError(f"another run (pid {holder or '?'}) is writing to {output}")
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
