"""What readers and writers look like. Built-in ones live in ``forge_batch.plugins`` and are registered
through the ``register_readers`` / ``register_writers`` hooks, exactly like a third party's."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from forge_batch.job import InputSpec, JobSpec


@dataclass
class RawRow:
    """One input row as a reader saw it.

    ``data`` is the row's columns, or None when the row could not be parsed at all. ``error`` (with
    ``error_kind``) marks a row the reader already knows is bad; it is written with that error instead of
    being generated, never dropped. ``location`` (``file:line``) goes into error messages.
    """

    data: dict[str, Any] | None
    error: str | None = None
    error_kind: str | None = None
    location: str = ""


class Reader:
    """Streams one input file as batches of rows, lazily, so memory stays bounded.

    Subclasses set ``extensions`` (for ``format: auto``) and may set ``field_defaults``: InputSpec options
    the format implies when the job leaves them unset (the OpenAI batch reader sets ``id_field:
    custom_id``).
    """

    name: str = ""
    extensions: tuple[str, ...] = ()
    field_defaults: dict[str, Any] = {}  # read-only; subclasses replace it

    def sniff(self, path: str) -> bool:
        """True when this reader recognises ``path`` by content (checked before extensions for auto)."""
        return False

    def read(self, path: str, spec: InputSpec) -> Iterator[list[RawRow]]:
        """Yield batches of about ``spec.batch_size`` rows, in file order."""
        raise NotImplementedError

    def count(self, path: str, spec: InputSpec) -> int | None:
        """Number of rows if cheap to know (for the progress bar), else None."""
        return None

    def schema(self, path: str) -> pa.Schema | None:
        """Arrow types of the input columns if the format has them (Parquet), so kept fields keep their
        types; None to infer from the first rows."""
        return None


@dataclass
class WriteContext:
    """What a writer knows besides the table: the job, the file metadata to embed, the part's index."""

    job: JobSpec
    metadata: dict[str, str] = field(default_factory=dict)
    part_index: int = 0
    id_column: str = "id"


class Writer:
    """Writes one complete part file from an Arrow table that has the run's fixed schema.

    The runner calls :meth:`write_part` with a hidden temporary path and renames the file into place once
    it returns, so a writer needs no atomicity of its own; it should flush and close the file before
    returning. ``extension`` names the part files (``part-00000.parquet``).
    """

    name: str = ""
    extension: str = ""

    def write_part(self, table: pa.Table, path: str, context: WriteContext) -> None:
        raise NotImplementedError
