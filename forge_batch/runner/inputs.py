"""Reading a job's input: which reader takes each file, the effective input options, the rows in batches,
how many there are, the input's identity for resume, and the output schema the first rows imply."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from forge_batch.contract import RawRow, Reader
from forge_batch.io.remote import file_size, is_url, open_binary
from forge_batch.io.schema import infer_type, normalize_id_type, output_schema
from forge_batch.job import InputSpec, JobError, JobSpec, Problem, input_files
from forge_batch.models.registry import content_digest

# A line-based input (JSONL) is counted, a scan before the first row, only for local files up to this many
# bytes (a gzipped file's bytes count 8 times: what it inflates to); Parquet says its row count.
COUNT_JSONL_BYTES = 256 << 20
GZIP_RATIO = 8

# Rows that type the output's id and kept columns (validate reads as many).
TYPED_ROWS = 1000


def _raising(error: Exception) -> Iterator[list[RawRow]]:
    raise error
    yield []  # a generator: it raises when first read


class InputFileError(ValueError):
    """An input file its reader cannot read (a truncated Parquet file, say): the message names the file."""

    def __init__(self, path: str, error: Exception) -> None:
        super().__init__(f"cannot read input file {path}: {type(error).__name__}: {error}")
        self.path = path


def count_rows(files: list[tuple[str, Reader]], spec: InputSpec) -> int | None:
    """The input's rows (``limit`` applied) when that is cheap, else None: Parquet's metadata, or local
    line-based files up to COUNT_JSONL_BYTES; a reader whose ``count`` says None counts nothing. A file that
    cannot be read raises :class:`InputFileError`."""
    scan_bytes = 0
    for path, reader in files:
        with _naming(path):
            line_based = reader.schema(path) is None
        if line_based:  # counting reads the whole file
            if is_url(path):
                return None
            scan_bytes += os.path.getsize(path) * (GZIP_RATIO if path.endswith(".gz") else 1)
    if scan_bytes > COUNT_JSONL_BYTES:
        return None
    total = 0
    for path, reader in files:
        with _naming(path):
            n = reader.count(path, spec)
        if n is None:
            return None
        total += n
    return total if spec.limit is None else min(total, spec.limit)


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    try:
        yield
    except InputFileError:
        raise
    except Exception as e:  # a reader's own error, whatever its type: say which file
        raise InputFileError(path, e) from e


def reader_for_file(path: str, readers: Mapping[str, Reader], fmt: str = "auto") -> str | None:
    """The format name that reads ``path``: ``fmt`` itself (None if no reader has that name) unless it is ``auto``; then the first reader that
    recognises the content (``sniff``), else the first whose extensions match; None when none does."""
    if fmt != "auto":
        return fmt if fmt in readers else None
    name = next((n for n, r in readers.items() if hasattr(r, "sniff") and r.sniff(path)), None)
    if name is not None:
        return name
    lower = path.lower()
    return next((n for n, r in readers.items() for ext in getattr(r, "extensions", ()) if lower.endswith(ext)), None)


def input_identity(files: list[str]) -> dict[str, Any]:
    """The input's identity for resume: its files' names and sizes (to describe) and content digest (to
    compare: the same rows moved to another path still resume, other rows under the same name do not)."""
    return {
        "files": [os.path.basename(f) for f in files],
        "bytes": sum(file_size(f) for f in files),
        "digest": content_digest(files, open_file=open_binary, size_of=file_size),
    }


def effective_input(spec: InputSpec, reader: Reader | None) -> InputSpec:
    """The job's input options with what the format implies where the job left them unset (the OpenAI batch
    reader's ``id_field: custom_id``)."""
    defaults = getattr(reader, "field_defaults", None) or {}
    update = {k: v for k, v in defaults.items() if k not in spec.model_fields_set}
    return spec.model_copy(update=update) if update else spec


@dataclass
class InputPlan:
    """The input files, each with its reader, and the effective input options."""

    files: list[tuple[str, Reader]]
    spec: InputSpec

    @classmethod
    def for_job(cls, job: JobSpec, readers: Mapping[str, Reader]) -> InputPlan:
        files = []
        for path in input_files(job.input.path):
            fmt = reader_for_file(path, readers, job.input.format)
            if fmt is None:
                raise JobError([Problem("input.format", f"cannot tell the format of {path}; set input.format")])
            files.append((path, readers[fmt]))
        return cls(files, effective_input(job.input, files[0][1] if files else None))

    def batches(self) -> Iterator[list[RawRow]]:
        """Every row, lazily, in batches of about ``input.batch_size``, file after file."""
        for path, reader in self.files:
            with _naming(path):
                yield from reader.read(path, self.spec)

    def total_rows(self) -> int | None:
        """How many rows the run will see (``limit`` applied), or None when that is not cheap to tell
        (see :func:`count_rows`)."""
        try:
            return count_rows(self.files, self.spec)
        except Exception:  # a count is for the progress bar and the error budget only: never fail the run for it
            return None

    def identity(self) -> dict[str, Any]:
        return input_identity([path for path, _ in self.files])

    def first_batches(self, batches: Iterator[list[RawRow]]) -> tuple[list[list[RawRow]], Iterator[list[RawRow]]]:
        """(the batches holding the input's first TYPED_ROWS rows, or all of it; the batches after them): the
        first type the output's id and kept columns, whatever input.batch_size is. A file that cannot be read
        on the way stops them there; its error comes when the rest is read, as it would have."""
        first: list[list[RawRow]] = []
        seen = 0
        try:
            while seen < TYPED_ROWS:
                batch = next(batches, None)
                if batch is None:
                    break
                first.append(batch)
                seen += len(batch)
        except Exception as e:  # noqa: BLE001 - raised again where the rows after these are read
            return first, _raising(e)
        return first, batches

    def output_schema(self, job: JobSpec, first: list[RawRow]) -> pa.Schema:
        """The output's columns: the id typed as the input's (Parquet) or as the first rows' ids, kept fields
        likewise, then the columns every run writes."""
        spec = self.spec
        in_schema = self.files[0][1].schema(self.files[0][0]) if self.files else None
        rows = [r.data for r in first if r.data is not None]
        if spec.id_field is None:
            id_type = pa.int64()
        elif in_schema is not None and spec.id_field in in_schema.names:
            id_type = normalize_id_type(in_schema.field(spec.id_field).type)
        else:
            ids = [r.get(spec.id_field) for r in rows if r.get(spec.id_field) is not None]
            first_id = ids[0] if ids else None
            is_int = isinstance(first_id, int) and not isinstance(first_id, bool)
            id_type = pa.int64() if is_int else pa.string()
        keep = []
        for name in job.output.keep_fields:
            if in_schema is not None and name in in_schema.names:
                keep.append((name, in_schema.field(name).type))
            else:
                keep.append((name, infer_type(r.get(name) for r in rows)))
        # OpenAI batch lines may each ask for logprobs, so that input always has the columns
        openai = any(reader.name == "openai-batch" for _, reader in self.files)
        return output_schema(spec.id_field, id_type, keep, job.output.include_prompt,
                             logprobs=openai or job.sampling.logprobs is not None,
                             prompt_logprobs=openai or job.sampling.prompt_logprobs is not None)
