"""Committing one part's files: the part to a temp in the state folder, its ledger (temp + rename), then
the part renamed into place, which is the commit point. A crash at any moment leaves either a committed
part with its ledger, or nothing visible (resume removes a ledger whose part never appeared)."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from forge_batch.io.safe_fs import (
    CommitError,
    OutputDirError,
    create_fresh,
    describe_os_error,
    fsync_dir,
    fsync_file,
    unlink_quietly,
)


def commit_files(
    *,
    output: Path,
    state_dir: Path,
    ledger_dir: Path,
    parts_dir: Path,
    part_file: str | None,
    ledger_name: str,
    ledger: pa.Table,
    write: Callable[[str], object] | None,
) -> None:
    """Write and commit one part and its ledger. ``write(tmp_path)`` writes the part file; with
    ``write=None`` (a part of dropped samples only) only the ledger is committed. Raises CommitError,
    with nothing left behind, when the file system refuses."""
    tmp_part = state_dir / f".{part_file}.tmp" if part_file else None
    tmp_ledger = ledger_dir / f".{ledger_name}.tmp"
    try:
        if tmp_part is not None and write is not None:
            # The writer opens the path itself: hand it a fresh file of ours, and check it is still one
            # before it becomes the part (a link swapped in meanwhile must not be renamed into place).
            os.close(create_fresh(tmp_part))
            write(str(tmp_part))
            if not stat.S_ISREG(os.lstat(tmp_part).st_mode):
                raise OutputDirError(f"{tmp_part} was replaced by a link or a special file while being written")
            fsync_file(tmp_part)
        with os.fdopen(create_fresh(tmp_ledger), "wb") as f:
            pq.write_table(ledger, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_ledger, ledger_dir / ledger_name)
        fsync_dir(ledger_dir)
        if tmp_part is not None and part_file is not None:
            os.replace(tmp_part, parts_dir / part_file)  # the commit point
            fsync_dir(parts_dir)
    except OSError as e:
        unlink_quietly(tmp_part)
        unlink_quietly(tmp_ledger)
        raise CommitError(
            f"cannot commit {part_file or ledger_name} to {output}: {describe_os_error(e)}", errno_=e.errno
        ) from e
