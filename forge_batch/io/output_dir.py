"""The output directory: atomic part files, the ledger that makes resume exact, the manifest, the lock.

Layout for ``output.path: out/run1``::

    out/run1/part-00000.parquet               committed parts: the only files in the directory, so that
    out/run1/part-00001.parquet               every reader (DuckDB, Polars, pandas, pyarrow, HF datasets)
                                              reads exactly the result rows, during a run as after it
    out/.run1.forge_batch/manifest.json       job, fingerprint, schema and the list of committed parts
    out/.run1.forge_batch/summary.json        the run summary
    out/.run1.forge_batch/ledger/part-00000.parquet   ids / row positions / status of every sample of that part
    out/.run1.forge_batch/lock                held (flock) while a run writes here
    out/.run1.forge_batch/.part-00002.parquet.tmp     a part being written

The state lives next to the output directory, not inside it, because no hiding works for every reader:
Polars reads a directory recursively, hidden entries included, and refuses one holding any non-empty file
without the ``.parquet`` extension; DuckDB's ``**/*.parquet`` and HF datasets read ``_``-prefixed folders.
It sits next to the directory's real path (its symlinks resolved), so a part written in the state folder is
renamed into place on the same file system. A state folder left by an older version inside the directory
(``out/run1/_forge_batch/``) is moved out on the next run, so old outputs resume.

A single-file output (``output.path: results.jsonl`` with ``format: openai-batch``) keeps its parts in
``.results.jsonl.forge_batch/parts/`` while it runs and is written, in input order, when every row is done.

Committing a part: write the part to a temp file in the state folder, write its ledger (temp + rename),
then rename the part into place (the commit point), then update the manifest. A crash at any moment leaves
either a committed part with its ledger, or nothing visible: resume deletes temp files and ledgers whose part
never appeared, and skips every id in the remaining ledgers. Parts are never rewritten, so a directory that
was readable stays readable.

Nothing inside the output directory or the state folder is followed through a symlink (the output directory
itself may be one): a linked state folder, ledger folder, lock, manifest, ledger or part is refused, and temp
files are created fresh (``O_CREAT | O_EXCL | O_NOFOLLOW``) after removing whatever sits at their name, so a
planted link can neither redirect a write outside the directory nor clobber the file it points at.

The pieces: ``safe_fs`` (link-safe file primitives, the errors), ``state_lock`` (the lock), ``legacy_state``
(moving an old state folder), ``ledger`` (writing and reading ledgers, the resume state), ``job_identity``
(whether committed rows may be resumed), ``part_commit`` (the commit's file steps). :class:`OutputDir`
puts them together for one run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from forge_batch.io import job_identity
from forge_batch.io.ledger import (
    LEDGER_DIR,
    PART_RE,
    ResumeState,
    Tally,
    ledger_entry,
    ledger_name,
    ledger_table,
    load_ledgers,
)
from forge_batch.io.legacy_state import LEGACY_STATE_DIR, migrate_legacy_state
from forge_batch.io.part_commit import commit_files
from forge_batch.io.safe_fs import (
    CommitError,
    OutputDirError,
    atomic_write_bytes,
    atomic_write_json,
    create_fresh,
    describe_os_error,
    ensure_dir,
    fsync_dir,
    fsync_file,
    refuse_symlink,
    unlink_quietly,
    utc_now,
)
from forge_batch.io.schema import schema_from_str, schema_to_str
from forge_batch.io.state_lock import acquire_lock, release_lock

__all__ = [
    "LEDGER_DIR", "MANIFEST", "PART_RE", "SUMMARY", "CommitError", "OutputDir", "OutputDirError", "ResumeState",
    "Tally", "atomic_write_bytes", "atomic_write_json", "describe_os_error", "find_state_dir", "fsync_file",
    "parts_dir_for", "state_dir_for",
]

# The state folder of ``out/run1`` is ``out/.run1.forge_batch`` (see state_dir_for).
STATE_SUFFIX = ".forge_batch"
PARTS_DIR = "parts"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
MANIFEST_VERSION = 1


def state_dir_for(output: str | os.PathLike[str]) -> Path:
    """The state folder of an output (directory or single file): ``.<name>.forge_batch`` next to its real
    path (an output that is a symlink keeps its state beside its target), so that it is on the same file
    system as what is renamed out of it."""
    real = Path(os.path.realpath(output))
    if not real.name:
        raise OutputDirError(f"{output} has no parent folder to keep the run's state in; use a folder below it")
    return real.parent / f".{real.name}{STATE_SUFFIX}"


def find_state_dir(output: str | os.PathLike[str]) -> Path:
    """The state folder of an existing output, for reading (inspect, report): the sibling folder, or the
    folder an older version kept inside the directory when only that one exists."""
    state = state_dir_for(output)
    legacy = Path(output) / LEGACY_STATE_DIR
    if not state.is_dir() and legacy.is_dir() and not legacy.is_symlink():
        return legacy
    return state


def parts_dir_for(output: str | os.PathLike[str]) -> Path:
    """Where the committed parts of an output are: the output directory itself, or the state folder's
    ``parts/`` for a single-file output."""
    out = Path(output)
    if out.is_dir():
        return out
    single = state_dir_for(out) / PARTS_DIR
    return single if single.is_dir() else out


class OutputDir:
    """One run's handle on its output directory (see the module docstring for the layout).

    ``single_file``: ``path`` is one file written when the run is done (:meth:`finalize`); the parts are
    kept in the state folder meanwhile."""

    def __init__(self, path: str | os.PathLike[str], extension: str, *, single_file: bool = False) -> None:
        self.path = Path(path)
        self.extension = extension if extension.startswith(".") or not extension else f".{extension}"
        self.single_file = single_file
        self._locate_state()
        self._lock_fd: int | None = None
        self.fingerprint = ""
        self.manifest: dict[str, Any] = {}
        self.holds_rows = False  # whether earlier runs committed anything here (set by open)

    def _locate_state(self) -> None:
        self.state_dir = state_dir_for(self.path)
        self.ledger_dir = self.state_dir / LEDGER_DIR
        self.parts_dir = self.state_dir / PARTS_DIR if self.single_file else self.path

    # ---- opening ------------------------------------------------------------------------------------
    def part_name(self, index: int) -> str:
        return f"part-{index:05d}{self.extension}"

    def open(self, fingerprint: str, job_json: dict[str, Any], output_format: str, overwrite: bool = False) -> ResumeState:
        """Lock the directory, clean up after a crash and load what earlier runs committed.

        Raises OutputDirError when another run holds the lock, when the committed parts were written by a
        job whose output-affecting options differ (mixing them would be silently wrong), when something inside
        the directory is a symlink, or when the directory cannot be written (read-only, no permission)."""
        self.fingerprint = fingerprint
        try:
            if self.single_file:
                if self.path.is_dir():
                    raise OutputDirError(f"{self.path} is a directory; a single-file output needs a file name there")
                self.path.parent.mkdir(parents=True, exist_ok=True)
            else:
                self.path.mkdir(parents=True, exist_ok=True)
            self._locate_state()  # the directory exists now: its real path is known
            if self.single_file and self.path.exists() and not self.state_dir.exists() and not overwrite:
                raise OutputDirError(
                    f"{self.path} exists and no run of this tool wrote it (there is no state folder {self.state_dir} "
                    "beside it): use a new output path, or --overwrite to replace it"
                )
            ensure_dir(self.state_dir)
            self._lock_fd = acquire_lock(self.state_dir, self.path)
            try:
                if not self.single_file:
                    migrate_legacy_state(self.path, self.state_dir, self.ledger_dir)
                else:
                    ensure_dir(self.parts_dir)
                self._check_same_file_system()
                return self._open_locked(fingerprint, job_json, output_format, overwrite)
            except BaseException:
                self.close()
                raise
        except OSError as e:
            where = f" ({e.filename})" if e.filename and str(e.filename) != str(self.path) else ""
            what = "the output file" if self.single_file else "to the output directory"
            raise OutputDirError(f"cannot write {what} {self.path}: {describe_os_error(e)}{where}") from e

    def _check_same_file_system(self) -> None:
        # A part is written in the state folder and renamed into the output directory: on two file systems
        # (the output directory is a mount point) that rename is a copy, not atomic.
        if os.stat(self.parts_dir).st_dev != os.stat(self.state_dir).st_dev:
            raise OutputDirError(
                f"{self.path} is on another file system than its state folder {self.state_dir} (a mount point?): "
                "parts could not be committed atomically; use a folder inside it as output.path"
            )

    def _open_locked(self, fingerprint: str, job_json: dict[str, Any], output_format: str, overwrite: bool) -> ResumeState:
        refuse_symlink(self.ledger_dir)  # before --overwrite empties it
        manifest_path = self.state_dir / MANIFEST
        refuse_symlink(manifest_path)
        if overwrite:
            self._remove_outputs()
        ensure_dir(self.ledger_dir)
        state = ResumeState()
        state.cleaned = self._cleanup_temps()
        if manifest_path.exists():
            try:
                self.manifest = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise OutputDirError(f"{manifest_path} is unreadable ({e}); rerun with --overwrite to start over") from e
        visible = {p.name for p in self.parts_dir.iterdir() if PART_RE.match(p.name)}
        if self._state_outlived_its_parts(visible):
            # The directory was emptied or deleted and made again: its state describes rows that are gone.
            self._remove_outputs()
            ensure_dir(self.ledger_dir)
        ledgers = sorted(self.ledger_dir.glob("part-*.parquet"))
        for p in [*ledgers, *(self.parts_dir / name for name in sorted(visible))]:
            refuse_symlink(p)
        self.holds_rows = bool(ledgers or visible)
        if self.holds_rows and self.manifest:
            job_identity.refuse_other_job(self.path, self.manifest, fingerprint, job_json, output_format)
        if visible and not ledgers:
            raise OutputDirError(
                f"{self.path} holds part files but no ledger in {self.ledger_dir}: cannot tell what was committed "
                "(if the directory was moved or copied, move its state folder along); "
                "use a new output.path, or --overwrite to discard them"
            )
        if self.manifest.get("schema"):
            state.schema = schema_from_str(self.manifest["schema"])
        max_index, referenced = load_ledgers(
            ledgers, self.parts_dir, fingerprint, self.manifest.get("parts", []), state,
            lambda: job_identity.other_job_error(self.path, self.manifest, job_json),
        )
        for name in visible:
            m = PART_RE.match(name)
            if m:
                max_index = max(max_index, int(m.group(1)))
            if name not in referenced:
                raise OutputDirError(
                    f"{self.parts_dir / name} has no ledger in {self.ledger_dir}: cannot tell what it holds; "
                    "use a new output.path, or --overwrite to discard the old output"
                )
        state.next_part = max_index + 1
        self.manifest.update(
            {
                "format_version": MANIFEST_VERSION,
                "fingerprint": fingerprint,
                "job": job_json,
                "output_format": output_format,
                "parts": state.parts,
            }
        )
        return state

    def _state_outlived_its_parts(self, visible: set[str]) -> bool:
        """The manifest lists committed part files and none of them is there any more."""
        if self.single_file or visible:
            return False
        listed = [p.get("file") for p in self.manifest.get("parts") or [] if p.get("file")]
        return bool(listed) and not any((self.parts_dir / name).exists() for name in listed)

    def check_identity(self, kind: str, current: dict[str, Any], *, compare: Iterable[str], force: bool = False) -> None:
        """Refuse to resume when the input or the engine changed since the committed rows were written
        (see :func:`forge_batch.io.job_identity.check_identity`)."""
        job_identity.check_identity(self.path, self.manifest, self.holds_rows, kind, current, compare=compare, force=force)

    def close(self) -> None:
        if self._lock_fd is not None:
            release_lock(self._lock_fd)
            self._lock_fd = None

    def _cleanup_temps(self) -> list[str]:
        removed = []
        # the output directory too: older versions wrote their temp parts there
        dirs = [self.state_dir, self.ledger_dir, self.parts_dir] + ([] if self.single_file else [self.path])
        for d in dict.fromkeys(dirs):
            if not d.exists():
                continue
            for p in d.iterdir():
                # a link at a temp name is removed too (the link, not its target): it is nobody's data
                if p.name.startswith(".") and p.name.endswith(".tmp") and (p.is_symlink() or p.is_file()):
                    p.unlink()
                    removed.append(str(p))
        return removed

    def _remove_outputs(self) -> None:
        """--overwrite: remove what runs wrote (parts, temps, state), nothing else in the folder."""
        for p in self.parts_dir.iterdir():
            if PART_RE.match(p.name) or (p.name.startswith(".part-") and p.name.endswith(".tmp")):
                p.unlink()
        if self.single_file and (self.path.is_file() or self.path.is_symlink()):
            self.path.unlink()
        for name in (MANIFEST, SUMMARY):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / name).unlink()
        shutil.rmtree(self.ledger_dir, ignore_errors=True)
        self.manifest = {}

    # ---- writing -------------------------------------------------------------------------------------
    def set_schema(self, schema: pa.Schema) -> None:
        self.manifest["schema"] = schema_to_str(schema)

    def commit_part(
        self,
        index: int,
        write: Callable[[str], object] | None,
        ledger_rows: list[dict[str, Any]],
        id_type: pa.DataType,
        stats: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Commit one part atomically (see :mod:`forge_batch.io.part_commit`), then list it in the manifest.

        ``write(tmp_path)`` writes the part file (None when the part holds no records, e.g. only dropped
        samples: then only the ledger is committed)."""
        part_file = self.part_name(index) if write is not None else None
        name = ledger_name(index)
        commit_files(
            output=self.path, state_dir=self.state_dir, ledger_dir=self.ledger_dir, parts_dir=self.parts_dir,
            part_file=part_file, ledger_name=name, write=write,
            ledger=ledger_table(ledger_rows, id_type, part_file, self.fingerprint),
        )
        entry = {**ledger_entry(part_file, name, ledger_rows), "committed_at": utc_now()}
        if stats:
            entry.update(stats)
        self.manifest.setdefault("parts", []).append(entry)
        try:
            self.write_manifest()
        except OSError as e:
            # the part and its ledger are in place (resume reads ledgers, not the manifest): it is committed
            raise CommitError(
                f"committed {part_file or name} but cannot update {self.state_dir / MANIFEST}: {describe_os_error(e)}",
                errno_=e.errno, committed=True,
            ) from e
        return entry

    def write_manifest(self) -> None:
        from forge_batch.io.meta import tool_version

        self.manifest["tool_version"] = tool_version()
        self.manifest["updated_at"] = utc_now()
        atomic_write_json(self.state_dir / MANIFEST, self.manifest)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.state_dir / SUMMARY
        atomic_write_json(path, summary)
        return path

    def part_files(self) -> list[Path]:
        return sorted(p for p in self.parts_dir.iterdir() if PART_RE.match(p.name))

    def finalize(self) -> int:
        """Write a single-file output: the lines of every committed part in input order, atomically (temp
        in the state folder, then rename over ``path``). Returns the number of lines."""
        from forge_batch.io.single_file import merge_in_input_order, request_positions

        runs = []
        for ledger in sorted(self.ledger_dir.glob("part-*.parquet")):
            refuse_symlink(ledger)
            lt = pq.read_table(ledger)
            part_file = (lt.schema.metadata or {}).get(b"part_file", b"").decode()
            if part_file:
                refuse_symlink(self.parts_dir / part_file)
                runs.append((self.parts_dir / part_file, request_positions(lt)))
        tmp = self.state_dir / f".{self.path.name}.tmp"
        # the output itself may be a symlink, as an output directory may: the file replaces its target,
        # which is next to the state folder (one file system, so the rename is atomic)
        final = Path(os.path.realpath(self.path))
        try:
            with os.fdopen(create_fresh(tmp), "wb") as f:
                lines = merge_in_input_order(runs, f, self.state_dir, create_fresh)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            unlink_quietly(tmp)
            raise
        fsync_dir(final.parent)
        return lines
