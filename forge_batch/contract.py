"""The types a plugin sees, and nothing else: rows, the run context, reader and writer protocols, row errors
and the error kinds. This module imports nothing of forge-batch, so a plugin, ``hookspecs`` and the runner
all depend on it and never on each other's implementation.

Job options are ``forge_batch.job.JobSpec`` / ``InputSpec`` at run time; here they are the aliases
``JobSpec`` / ``InputSpec`` of ``Any``: importing the classes would make the contract depend on the job
loader.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    import pyarrow as pa

JobSpec: TypeAlias = Any  # forge_batch.job.JobSpec: the whole job, validated
InputSpec: TypeAlias = Any  # forge_batch.job.InputSpec: the job's effective ``input`` block


class ErrorKind(str, enum.Enum):
    """Why a row failed: the ``error_kind`` column. docs/jobs.md lists every member (a test checks it).

    A plugin may also use its own kind through :class:`RowError`."""

    MALFORMED_JSON = "malformed_json"  # an input line that is not JSON
    BAD_REQUEST = "bad_request"  # an OpenAI batch line the tool cannot run
    MISSING_ID = "missing_id"
    BAD_ID = "bad_id"
    DUPLICATE_ID = "duplicate_id"
    MISSING_PROMPT = "missing_prompt"
    EMPTY_PROMPT = "empty_prompt"
    BAD_PROMPT = "bad_prompt"  # a prompt that is not text
    BAD_MESSAGES = "bad_messages"  # a chat that is not a list of {role, content}
    TEMPLATE_ERROR = "template_error"
    BAD_SAMPLING = "bad_sampling"  # per-row sampling overrides that do not validate
    PROMPT_TOO_LONG = "prompt_too_long"
    TOKENIZE_ERROR = "tokenize_error"
    CONSTRAINT_ERROR = "constraint_error"  # a per-row schema/regex that does not compile
    PLUGIN_ERROR = "plugin_error"  # a row-level hook raised
    ENGINE_ERROR = "engine_error"
    INVALID_OUTPUT = "invalid_output"  # a constrained output that does not conform (e.g. cut by max_tokens)
    TYPE_MISMATCH = "type_mismatch"  # a kept field whose type differs from the column's
    SKIPPED = "skipped"  # left out on purpose by a plugin (SkipRow); not a failure
    ROW_ERROR = "row_error"  # RowError's default
    INTERNAL_ERROR = "internal_error"

    def __str__(self) -> str:
        return self.value


class SkipRow(Exception):
    """Raise from ``prepare_request`` to leave a row out on purpose.

    The row is still written (``finish_reason`` ``"skipped"``, ``error_kind`` ``"skipped"``, the reason in
    ``error``) so nothing disappears silently; skipped rows do not count towards ``max_error_rate``.
    """


class RowError(Exception):
    """Raise from a row-level hook to fail the row with a given ``error_kind`` and message, when the problem
    is the row's (a missing field, a bad value), not the plugin's. Any other exception is reported as
    ``plugin_error`` naming the plugin."""

    def __init__(self, message: str, kind: str = ErrorKind.ROW_ERROR.value) -> None:
        super().__init__(message)
        self.kind = str(kind)


class DropResult(Exception):
    """Raise from ``process_result`` to leave a sample out of the output (a filter).

    Dropped samples are recorded in the run state, so a resumed run does not generate them again, and
    counted in the summary.
    """


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

    Subclasses set ``extensions`` (for ``format: auto``) and may set ``field_defaults``: input options the
    format implies when the job leaves them unset (the OpenAI batch reader sets ``id_field: custom_id``).
    ``spec`` below is the job's effective ``input`` block.
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


@dataclass
class RunContext:
    """What hooks get besides the row: the job, the effective input options, the engine's tokenizer.

    ``state`` is free for plugins to keep per-run data in (counters for ``job_end``, caches)."""

    job: JobSpec
    input: InputSpec
    plugin_manager: Any
    output_dir: Path
    engine: Any = None
    tokenizer: Any = None
    max_model_len: int | None = None
    chat: bool = False
    template: Any = None
    resumed_rows: int = 0
    state: dict[str, Any] = field(default_factory=dict)
