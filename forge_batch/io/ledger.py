"""The ledger: one small Parquet file per committed part, with the id, row position and status of every
sample in it. Resume reads ledgers, not the parts (a reader's part format may not be able to say which
rows it holds), so a ledger is what makes a sample count as done; the manifest only lists them."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from forge_batch.io.schema import ledger_schema

LEDGER_DIR = "ledger"
PART_RE = re.compile(r"^part-(\d{5,})\.(.+)$")


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
        """Count ledger entries (one per sample; a row's sample 0 carries the row's status, and the row's
        kind is its first failed sample's: with n > 1 sample 0 may be fine)."""
        entries = list(entries)
        row_kind: dict[Any, str] = {}
        for e in sorted((e for e in entries if e["status"] == "error" and e.get("error_kind")),
                        key=lambda e: e["sample_index"]):
            row_kind.setdefault(e["row_index"], e["error_kind"])
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
                    self.failed_by_kind[row_kind.get(e["row_index"]) or e.get("error_kind") or "error"] += 1

    def merged(self, other: Tally) -> Tally:
        t = Tally()
        for f in self.__dataclass_fields__:
            setattr(t, f, getattr(self, f) + getattr(other, f))
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


def ledger_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def ledger_entry(part_file: str | None, name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's entry for a committed part (dropped samples are in the ledger, not in the part)."""
    return {
        "file": part_file,
        "ledger": f"{LEDGER_DIR}/{name}",
        "records": sum(1 for e in rows if e["status"] != "dropped"),
    }


def ledger_table(rows: list[dict[str, Any]], id_type: pa.DataType, part_file: str | None, fingerprint: str) -> pa.Table:
    """A part's ledger; its metadata names the part file it describes and the job that wrote it."""
    table = pa.Table.from_pylist(rows, schema=ledger_schema(id_type))
    return table.replace_schema_metadata({"part_file": part_file or "", "fingerprint": fingerprint})


def load_ledgers(
    ledgers: list[Path],
    parts_dir: Path,
    fingerprint: str,
    manifest_parts: list[dict[str, Any]],
    state: ResumeState,
    other_job: Callable[[], Exception],
) -> tuple[int, set[str]]:
    """Read every ledger into ``state`` (ids done, tallies, parts) and return the highest part index seen
    and the part files the ledgers reference.

    A ledger that cannot be read is a torn write and is removed; so is one whose part never appeared (a
    crash between the two renames of a commit). A ledger written by another job raises ``other_job()``."""
    max_index = -1
    referenced: set[str] = set()
    entries: dict[str, dict[str, Any]] = {p["file"]: p for p in manifest_parts if p.get("file")}
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
            raise other_job()
        if part_file is not None and not (parts_dir / part_file).exists():
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
        state.parts.append(entries.get(part_file or ledger.name) or ledger_entry(part_file, ledger.name, rows))
    return max_index, referenced
