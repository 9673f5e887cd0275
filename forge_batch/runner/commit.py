"""Committing results: finished rows are buffered and written as one part file (plus its ledger entries)
every ``output.rows_per_file`` records or ``output.flush_seconds`` seconds, and the error budget
(``max_error_rate``) is kept over committed, pending and earlier runs' rows."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from forge_batch.contract import WriteContext, Writer
from forge_batch.io.ledger import ResumeState, Tally
from forge_batch.io.output_dir import OutputDir
from forge_batch.io.safe_fs import CommitError
from forge_batch.io.schema import records_to_table
from forge_batch.runner.records import Group, ledger_rows
from forge_batch.runner.signals import RunFlags

# Rows that failed only after this many failures may abort a run early (see Committer.check_error_rate).
EARLY_ABORT_MIN_FAILURES = 100


class Committer:
    """The buffer of finished rows, the part commits and the run's tallies.

    ``schema`` carries the file metadata every part embeds; ``flags.critical`` is raised while the buffer
    or a part is being changed, so a signal cannot abort half-way."""

    def __init__(self, job: Any, out: OutputDir, writer: Writer, resume: ResumeState, schema: pa.Schema,
                 file_meta: dict[str, str], id_column: str, flags: RunFlags, say: Callable[[str], None]) -> None:
        self.job = job
        self.out = out
        self.writer = writer
        self.resume = resume
        self.schema = schema
        self.file_meta = file_meta
        self.id_column = id_column
        self.id_type = schema.field(id_column).type
        self.flags = flags
        self.say = say
        self.next_part = resume.next_part
        self.buffer: list[Group] = []
        self.buffer_records = 0
        self.last_commit = time.monotonic()
        self.pending = Tally()  # buffered, not yet committed
        self.run_tally = Tally()  # committed by this run

    def add(self, group: Group) -> None:
        self.flags.critical += 1
        try:
            self.buffer.append(group)
            self.buffer_records += len(group.records)
            self.pending.add_ledger(ledger_rows(group, self.id_column))
        finally:
            self.flags.critical -= 1

    def should_commit(self, more_coming: bool = False) -> bool:
        """A full part, or flush_seconds since the last commit; ``more_coming``: results of the same engine step
        are still to come (at once), so a timed commit waits for them instead of leaving them for the next step."""
        if not self.buffer:
            return False
        if self.buffer_records >= self.job.output.rows_per_file:
            return True
        return not more_coming and time.monotonic() - self.last_commit >= self.job.output.flush_seconds

    def commit(self, part_index: int | None = None) -> None:
        """Write the buffer as the next part, or as part ``part_index`` (an executor that names parts after
        its shards); raises CommitError (the rows it held are then not committed)."""
        if not self.buffer:
            return
        self.flags.critical += 1
        try:
            groups, self.buffer = self.buffer, []
            self.buffer_records = 0
            records = [r for g in groups for r in g.records]
            table = records_to_table(records, self.schema) if records else None
            if table is not None and any(r.get("error_kind") == "type_mismatch" for r in records):
                for g in groups:  # a coerced value may have failed a row
                    if g.row_status == "ok" and any(r.get("error") for r in g.records):
                        g.row_status, g.row_kind = "failed", "type_mismatch"
            ledger = [e for g in groups for e in ledger_rows(g, self.id_column)]
            self._commit_part(table, ledger, part_index)
        finally:
            self.flags.critical -= 1

    def _commit_part(self, table: pa.Table | None, ledger: list[dict[str, Any]], part_index: int | None = None) -> None:
        index = self.next_part if part_index is None else part_index
        self.next_part = max(self.next_part, index) + 1
        ctx = WriteContext(job=self.job, metadata=self.file_meta, part_index=index, id_column=self.id_column)
        write = (lambda path: self.writer.write_part(table, path, ctx)) if table is not None else None
        tally = Tally()
        tally.add_ledger(ledger)
        try:
            self.out.commit_part(index, write, ledger, self.id_type, stats={"rows": tally.rows, "rows_failed": tally.rows_failed})
        except CommitError as e:
            self.pending = Tally()  # these rows are not committed: a resume generates them again
            if e.committed:
                self.run_tally = self.run_tally.merged(tally)
            raise
        self.run_tally = self.run_tally.merged(tally)
        self.pending = Tally()
        self.last_commit = time.monotonic()

    def failed_rows(self) -> tuple[int, int]:
        """(failed rows, rows that count towards the error rate: all but skipped), earlier runs included."""
        tallies = (self.resume.tally, self.run_tally, self.pending)
        failed = sum(t.rows_failed for t in tallies)
        return failed, sum(t.rows for t in tallies) - sum(t.rows_skipped for t in tallies)

    def check_error_rate(self, total: int | None) -> None:
        """Stop admitting once the run can no longer pass: more rows failed than the budget allows even if
        every remaining row succeeds (only when the input size is known and after a minimum number of
        failures, so a small job always runs to the end and reports all its bad rows)."""
        if self.flags.stop_admitting or total is None:
            return
        failed, _ = self.failed_rows()
        rate = self.job.max_error_rate
        if failed >= EARLY_ABORT_MIN_FAILURES and failed > rate * total:
            self.flags.abort_reason = "error_rate"
            self.flags.stop_admitting = True
            self.say(
                f"forge-batch: {failed} rows failed, more than max_error_rate {rate:g} of {total} rows; "
                "stopping (in-flight rows finish and are committed)"
            )
