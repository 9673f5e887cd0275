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
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shutil
import stat
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from forge_batch.io.schema import ledger_schema, schema_from_str, schema_to_str

# The state folder of ``out/run1`` is ``out/.run1.forge_batch`` (see state_dir_for).
STATE_SUFFIX = ".forge_batch"
# Where versions before the sibling folder kept it: inside the output directory.
LEGACY_STATE_DIR = "_forge_batch"
PARTS_DIR = "parts"
LOCK = "lock"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
LEDGER_DIR = "ledger"
PART_RE = re.compile(r"^part-(\d{5,})\.(.+)$")
MANIFEST_VERSION = 1


# Where the platform lacks a flag, 0 leaves it out (O_EXCL alone already refuses an existing link).
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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


def _symlink_error(path: Path) -> OutputDirError:
    return OutputDirError(f"{path} is a symlink; refusing to follow it (remove it, or use another output.path)")


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise _symlink_error(path)


def _ensure_dir(path: Path) -> None:
    """Create one directory level unless a real directory is there; refuse a symlink or a file."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise _symlink_error(path)
    if not stat.S_ISDIR(st.st_mode):
        raise OutputDirError(f"{path} is not a directory")


def _create_fresh(path: Path) -> int:
    """Open a new, empty file at ``path`` for writing, never through a symlink.

    Whatever sits at the name (a stale temp, a planted link) is unlinked first, which never touches a link's
    target; a link planted between the unlink and the open makes the open fail instead of being followed."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            raise OutputDirError(f"{path} is a directory where a temp file goes; remove it")
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o644)


def _unlink_quietly(path: Path | None) -> None:
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
        with os.fdopen(_create_fresh(tmp), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # replaces a link at ``path`` itself, never its target
    except BaseException:
        _unlink_quietly(tmp)  # a half-written temp holds the disk space a full disk needs back
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Tally:
    """Counts over committed samples (from ledgers) or over this run's samples."""

    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    rows_dropped: int = 0
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    samples: int = 0
    samples_ok: int = 0
    samples_failed: int = 0
    samples_dropped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add_ledger(self, entries: Iterable[dict[str, Any]]) -> None:
        """Count ledger entries (one per sample; a row's sample 0 carries the row's status)."""
        for e in entries:
            status = e["status"]
            if status != "dropped":
                self.samples += 1
            if status == "ok":
                self.samples_ok += 1
            elif status == "error":
                self.samples_failed += 1
            elif status == "dropped":
                self.samples_dropped += 1
            self.completion_tokens += e.get("completion_tokens") or 0
            if e["sample_index"] == 0:
                self.prompt_tokens += e.get("prompt_tokens") or 0
                self.rows += 1
                rs = e.get("row_status") or "ok"
                if rs == "ok":
                    self.rows_ok += 1
                elif rs == "skipped":
                    self.rows_skipped += 1
                elif rs == "dropped":
                    self.rows_dropped += 1
                else:
                    self.rows_failed += 1
                    self.failed_by_kind[e.get("error_kind") or "error"] += 1

    def merged(self, other: Tally) -> Tally:
        t = Tally()
        for f in self.__dataclass_fields__:
            a, b = getattr(self, f), getattr(other, f)
            setattr(t, f, a + b if not isinstance(a, Counter) else a + b)
        return t

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "rows_ok": self.rows_ok,
            "rows_failed": self.rows_failed,
            "rows_skipped": self.rows_skipped,
            "rows_dropped": self.rows_dropped,
            "failed_by_kind": dict(sorted(self.failed_by_kind.items())),
            "samples": self.samples,
            "samples_ok": self.samples_ok,
            "samples_failed": self.samples_failed,
            "samples_dropped": self.samples_dropped,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }


@dataclass
class ResumeState:
    """What earlier runs committed to this directory."""

    schema: pa.Schema | None = None
    id_type: pa.DataType | None = None
    done_ids: set[Any] = field(default_factory=set)
    done_positions: set[int] = field(default_factory=set)
    tally: Tally = field(default_factory=Tally)
    parts: list[dict[str, Any]] = field(default_factory=list)
    next_part: int = 0
    cleaned: list[str] = field(default_factory=list)

    @property
    def resumed(self) -> bool:
        return bool(self.parts)


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
            _ensure_dir(self.state_dir)
            self._lock()
            try:
                self._migrate_legacy_state()
                if self.single_file:
                    _ensure_dir(self.parts_dir)
                self._check_same_file_system()
                return self._open_locked(fingerprint, job_json, output_format, overwrite)
            except BaseException:
                self.close()
                raise
        except OSError as e:
            where = f" ({e.filename})" if e.filename and str(e.filename) != str(self.path) else ""
            raise OutputDirError(f"cannot write to the output directory {self.path}: {describe_os_error(e)}{where}") from e

    def _check_same_file_system(self) -> None:
        # A part is written in the state folder and renamed into the output directory: on two file systems
        # (the output directory is a mount point) that rename is a copy, not atomic.
        if os.stat(self.parts_dir).st_dev != os.stat(self.state_dir).st_dev:
            raise OutputDirError(
                f"{self.path} is on another file system than its state folder {self.state_dir} (a mount point?): "
                "parts could not be committed atomically; use a folder inside it as output.path"
            )

    def _migrate_legacy_state(self) -> None:
        """Move the state an older version kept inside the output directory (``_forge_batch/``) next to it,
        so that its output resumes and readers stop tripping on it. Runs under the new lock; refuses while an
        older version's run holds the old lock."""
        if self.single_file:
            return
        legacy = self.path / LEGACY_STATE_DIR
        if not os.path.lexists(legacy):
            return
        _refuse_symlink(legacy)
        if not legacy.is_dir():
            return
        old_lock = legacy / LOCK
        fd: int | None = None
        if os.path.lexists(old_lock):
            _refuse_symlink(old_lock)
            fd = os.open(old_lock, os.O_RDWR | _O_NOFOLLOW | _O_CLOEXEC)
        try:
            if fd is not None and not _try_flock(fd):
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                raise OutputDirError(f"another run (pid {holder or '?'}, an older forge-batch) is writing to {self.path}")
            for entry in sorted(legacy.iterdir()):
                if entry.name == LOCK:
                    continue
                _refuse_symlink(entry)
                if entry.name == LEDGER_DIR and entry.is_dir():
                    _ensure_dir(self.ledger_dir)
                    for f in sorted(entry.iterdir()):
                        _refuse_symlink(f)
                        os.replace(f, self.ledger_dir / f.name)
                    os.rmdir(entry)
                else:
                    os.replace(entry, self.state_dir / entry.name)
            fsync_dir(self.state_dir)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old_lock)
            os.rmdir(legacy)
            fsync_dir(self.path)
        finally:
            if fd is not None:
                os.close(fd)

    def _open_locked(self, fingerprint: str, job_json: dict[str, Any], output_format: str, overwrite: bool) -> ResumeState:
        _refuse_symlink(self.ledger_dir)  # before --overwrite empties it
        manifest_path = self.state_dir / MANIFEST
        _refuse_symlink(manifest_path)
        if overwrite:
            self._remove_outputs()
        _ensure_dir(self.ledger_dir)
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
            _ensure_dir(self.ledger_dir)
        ledgers = sorted(self.ledger_dir.glob("part-*.parquet"))
        for p in [*ledgers, *(self.parts_dir / name for name in sorted(visible))]:
            _refuse_symlink(p)
        self.holds_rows = bool(ledgers or visible)
        if self.holds_rows and self.manifest:
            old_fp = self.manifest.get("fingerprint")
            if old_fp and old_fp != fingerprint:
                raise OutputDirError(
                    f"{self.path} holds parts of a job with different options ({_diff_jobs(self.manifest.get('job', {}), job_json)}); "
                    "use a new output.path, or --overwrite to discard them"
                )
            if self.manifest.get("output_format", output_format) != output_format:
                raise OutputDirError(
                    f"{self.path} holds {self.manifest.get('output_format')} parts, this job writes {output_format}; "
                    "use a new output.path, or --overwrite to discard them"
                )
        if visible and not ledgers:
            raise OutputDirError(
                f"{self.path} holds part files but no ledger in {self.ledger_dir}: cannot tell what was committed "
                "(if the directory was moved or copied, move its state folder along); "
                "use a new output.path, or --overwrite to discard them"
            )
        if self.manifest.get("schema"):
            state.schema = schema_from_str(self.manifest["schema"])
        max_index = -1
        referenced: set[str] = set()
        entries: dict[str, dict[str, Any]] = {p["file"]: p for p in self.manifest.get("parts", []) if p.get("file")}
        for ledger in ledgers:
            m = PART_RE.match(ledger.name)
            index = int(m.group(1)) if m else -1
            try:
                lt = pq.read_table(ledger)
            except Exception:
                # An unreadable ledger can only be a torn write (ledgers are renamed into place complete).
                ledger.unlink()
                continue
            meta = lt.schema.metadata or {}
            part_file = meta.get(b"part_file", b"").decode() or None
            old_fp = meta.get(b"fingerprint", b"").decode()
            if old_fp and old_fp != fingerprint:
                raise OutputDirError(
                    f"{self.path} holds parts of a job with different options "
                    f"({_diff_jobs(self.manifest.get('job', {}), job_json)}); "
                    "use a new output.path, or --overwrite to discard them"
                )
            if part_file is not None and not (self.parts_dir / part_file).exists():
                # Crash between the ledger rename and the part rename: the part never became visible.
                ledger.unlink()
                state.cleaned.append(str(ledger))
                continue
            max_index = max(max_index, index)
            if part_file:
                referenced.add(part_file)
            if state.id_type is None:
                state.id_type = lt.schema.field("id").type
            rows = lt.to_pylist()
            state.tally.add_ledger(rows)
            for e in rows:
                if e["id"] is None or e["error_kind"] == "duplicate_id":
                    state.done_positions.add(e["row_index"])
                else:
                    state.done_ids.add(e["id"])
            entry = entries.get(part_file or ledger.name) or {
                "file": part_file,
                "ledger": f"{LEDGER_DIR}/{ledger.name}",
                "records": sum(1 for e in rows if e["status"] != "dropped"),
            }
            state.parts.append(entry)
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
        """Refuse to resume when what decides a row's tokens changed since the committed rows were written.

        ``kind`` is ``"input"`` (the input files' content) or ``"engine"`` (model digest, dtype, device,
        kernel path, ...); the keys in ``compare`` must be equal, the others only describe. With ``force``
        (``--force-resume``) the change is accepted and recorded. Either way ``current`` is what the
        manifest records from now on."""
        old = self.manifest.get(kind)
        if self.holds_rows and isinstance(old, dict):
            diffs = [f"{k}: {old.get(k)!r} -> {current.get(k)!r}" for k in compare if old.get(k) != current.get(k)]
            if diffs and not force:
                described = [k for k in current if k not in compare and old.get(k) != current.get(k)]
                diffs += [f"{k}: {old.get(k)!r} -> {current.get(k)!r}" for k in described]
                raise OutputDirError(
                    f"{self.path} holds rows generated with a different {kind} ({'; '.join(diffs)}); resuming would "
                    "mix the two in one output. Use a new output.path, --overwrite to discard them, or "
                    "--force-resume to resume anyway"
                )
            if diffs:
                self.manifest.setdefault("forced_resumes", []).append({"at": _now(), "kind": kind, "changes": diffs})
        self.manifest[kind] = current

    def _lock(self) -> None:
        lock_path = self.state_dir / LOCK
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o644)
        except OSError:
            _refuse_symlink(lock_path)  # O_NOFOLLOW's error (ELOOP) says nothing a user can act on
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            # truncating a hard link (or a device) would damage a file outside the output directory
            os.close(fd)
            raise OutputDirError(f"{lock_path} is not a plain file of its own (a hard link or a device); remove it")
        if not _try_flock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise OutputDirError(f"another run (pid {holder or '?'}) is writing to {self.path}")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
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
        write: Any,
        ledger_rows: list[dict[str, Any]],
        id_type: pa.DataType,
        stats: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Commit one part atomically.

        ``write(tmp_path)`` writes the part file (None when the part holds no records, e.g. only dropped
        samples: then only the ledger is committed). Order: part to a temp in the state folder, ledger
        (temp + rename), part rename into the output directory (the commit point), manifest."""
        part_file = self.part_name(index) if write is not None else None
        tmp_part = self.state_dir / f".{part_file}.tmp" if part_file else None
        ledger_name = f"part-{index:05d}.parquet"
        tmp_ledger = self.ledger_dir / f".{ledger_name}.tmp"
        try:
            if tmp_part is not None:
                # The writer opens the path itself: hand it a fresh file of ours, and check it is still one
                # before it becomes the part (a link swapped in meanwhile must not be renamed into place).
                os.close(_create_fresh(tmp_part))
                write(str(tmp_part))
                if not stat.S_ISREG(os.lstat(tmp_part).st_mode):
                    raise OutputDirError(f"{tmp_part} was replaced by a link or a special file while being written")
                fsync_file(tmp_part)
            table = pa.Table.from_pylist(ledger_rows, schema=ledger_schema(id_type))
            table = table.replace_schema_metadata({"part_file": part_file or "", "fingerprint": self.fingerprint})
            with os.fdopen(_create_fresh(tmp_ledger), "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_ledger, self.ledger_dir / ledger_name)
            fsync_dir(self.ledger_dir)
            if tmp_part is not None and part_file is not None:
                os.replace(tmp_part, self.parts_dir / part_file)  # the commit point
                fsync_dir(self.parts_dir)
        except OSError as e:
            _unlink_quietly(tmp_part)
            _unlink_quietly(tmp_ledger)
            raise CommitError(
                f"cannot commit {part_file or ledger_name} to {self.path}: {describe_os_error(e)}", errno_=e.errno
            ) from e
        entry = {
            "file": part_file,
            "ledger": f"{LEDGER_DIR}/{ledger_name}",
            "records": sum(1 for e in ledger_rows if e["status"] != "dropped"),
            "committed_at": _now(),
        }
        if stats:
            entry.update(stats)
        self.manifest.setdefault("parts", []).append(entry)
        try:
            self.write_manifest()
        except OSError as e:
            # the part and its ledger are in place (resume reads ledgers, not the manifest): it is committed
            raise CommitError(
                f"committed {part_file or ledger_name} but cannot update {self.state_dir / MANIFEST}: {describe_os_error(e)}",
                errno_=e.errno, committed=True,
            ) from e
        return entry

    def write_manifest(self) -> None:
        from forge_batch.io.meta import tool_version

        self.manifest["tool_version"] = tool_version()
        self.manifest["updated_at"] = _now()
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
            _refuse_symlink(ledger)
            lt = pq.read_table(ledger)
            part_file = (lt.schema.metadata or {}).get(b"part_file", b"").decode()
            if part_file:
                _refuse_symlink(self.parts_dir / part_file)
                runs.append((self.parts_dir / part_file, request_positions(lt)))
        tmp = self.state_dir / f".{self.path.name}.tmp"
        # the output itself may be a symlink, as an output directory may: the file replaces its target,
        # which is next to the state folder (one file system, so the rename is atomic)
        final = Path(os.path.realpath(self.path))
        try:
            with os.fdopen(_create_fresh(tmp), "wb") as f:
                lines = merge_in_input_order(runs, f, self.state_dir, _create_fresh)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        fsync_dir(final.parent)
        return lines


def _try_flock(fd: int) -> bool:
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


def _diff_jobs(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """Name the first few options that differ between two job dicts."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")

    for section in ("model", "input", "output", "sampling"):
        walk(old.get(section), new.get(section), section)
    diffs = [d for d in diffs if not d.startswith(("input.path", "input.batch_size", "input.limit", "output.path", "output.rows_per_file", "output.flush_seconds", "output.compression"))]
    return "; ".join(diffs[:5]) or "options changed"
