"""Outputs written by versions that kept the run's state inside the output directory (``_forge_batch/``):
their state is moved next to the directory on the next run, so that they resume and readers stop tripping
on it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from forge_batch.io.safe_fs import (
    O_CLOEXEC,
    O_NOFOLLOW,
    OutputDirError,
    ensure_dir,
    fsync_dir,
    refuse_symlink,
    try_flock,
)
from forge_batch.io.state_lock import LOCK

LEGACY_STATE_DIR = "_forge_batch"


def migrate_legacy_state(output: Path, state_dir: Path, ledger_dir: Path) -> None:
    """Move ``output/_forge_batch/`` into ``state_dir`` (its ledgers into ``ledger_dir``). Runs under the
    new lock; refuses while an older version's run holds the old lock."""
    legacy = output / LEGACY_STATE_DIR
    if not os.path.lexists(legacy):
        return
    refuse_symlink(legacy)
    if not legacy.is_dir():
        return
    old_lock = legacy / LOCK
    fd: int | None = None
    if os.path.lexists(old_lock):
        refuse_symlink(old_lock)
        fd = os.open(old_lock, os.O_RDWR | O_NOFOLLOW | O_CLOEXEC)
    try:
        if fd is not None and not try_flock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise OutputDirError(f"another run (pid {holder or '?'}, an older forge-batch) is writing to {output}")
        for entry in sorted(legacy.iterdir()):
            if entry.name == LOCK:
                continue
            refuse_symlink(entry)
            if entry.name == ledger_dir.name and entry.is_dir():
                ensure_dir(ledger_dir)
                for f in sorted(entry.iterdir()):
                    refuse_symlink(f)
                    os.replace(f, ledger_dir / f.name)
                os.rmdir(entry)
            else:
                os.replace(entry, state_dir / entry.name)
        fsync_dir(state_dir)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old_lock)
        os.rmdir(legacy)
        fsync_dir(output)
    finally:
        if fd is not None:
            os.close(fd)
