"""Built-in readers: JSONL, Parquet and OpenAI batch files, registered through ``register_readers`` like any
plugin's. Each streams its file in batches; a line that is not valid JSON becomes a row with an error
(``malformed_json``), never an exception and never a silent skip."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from forge_batch.hookspecs import hookimpl
from forge_batch.io.base import RawRow, Reader
from forge_batch.io.openai_batch import OpenAIRequestError, parse_request
from forge_batch.io.remote import open_binary
from forge_batch.job import InputSpec


def _open(path: str) -> IO[bytes]:
    raw = open_binary(path)  # a local path or a URL (s3://, hf://, ...)
    if not path.endswith(".gz"):
        return raw
    gz = gzip.GzipFile(fileobj=raw, mode="rb")
    gz.myfileobj = raw  # type: ignore[attr-defined]  # what GzipFile closes with itself
    return gz


def _parse_line(line: bytes, location: str) -> tuple[Any, str | None]:
    try:
        return json.loads(line), None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        snippet = line[:60].decode("utf-8", "replace").strip()
        return None, f"malformed JSON at {location}: {e} (line starts {snippet!r})"


class JsonlReader(Reader):
    """One JSON object per line; blank lines are ignored (they are not rows)."""

    name = "jsonl"
    extensions = (".jsonl", ".jsonl.gz", ".ndjson", ".json")

    def read(self, path: str, spec: InputSpec) -> Iterator[list[RawRow]]:
        batch: list[RawRow] = []
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                location = f"{path}:{lineno}"
                obj, err = _parse_line(line, location)
                if err is not None:
                    batch.append(RawRow(None, err, "malformed_json", location))
                elif not isinstance(obj, dict):
                    batch.append(
                        RawRow(None, f"line {location} is JSON but not an object ({type(obj).__name__})", "malformed_json", location)
                    )
                else:
                    batch.append(RawRow(obj, location=location))
                if len(batch) >= spec.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def count(self, path: str, spec: InputSpec) -> int | None:
        n = 0
        with _open(path) as f:
            for line in f:
                if line.strip():
                    n += 1
        return n


class OpenAIBatchReader(JsonlReader):
    """OpenAI Batch API request lines (``custom_id``, ``url``, ``body``). Found by content for ``format:
    auto``; rows carry ``messages`` or ``prompt`` and the body's sampling fields as per-row overrides."""

    name = "openai-batch"
    extensions = ()
    field_defaults = {"id_field": "custom_id", "sampling_field": "sampling"}

    def sniff(self, path: str) -> bool:
        if not path.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return False
        try:
            with _open(path) as f:
                for line in f:
                    if line.strip():
                        obj = json.loads(line)
                        return isinstance(obj, dict) and "custom_id" in obj and "body" in obj
        except Exception:
            return False
        return False

    def read(self, path: str, spec: InputSpec) -> Iterator[list[RawRow]]:
        for batch in super().read(path, spec):
            out = []
            for raw in batch:
                if raw.data is None:
                    out.append(raw)
                    continue
                try:
                    out.append(RawRow(parse_request(raw.data), location=raw.location))
                except OpenAIRequestError as e:
                    data = {"custom_id": raw.data.get("custom_id")} if isinstance(raw.data, dict) else None
                    out.append(RawRow(data, f"{e} ({raw.location})", "bad_request", raw.location))
                except (TypeError, ValueError) as e:
                    data = {"custom_id": raw.data.get("custom_id")}
                    out.append(RawRow(data, f"bad request body ({raw.location}): {e}", "bad_request", raw.location))
            yield out


class ParquetReader(Reader):
    """Parquet files, read one record batch at a time."""

    name = "parquet"
    extensions = (".parquet", ".pq")

    def read(self, path: str, spec: InputSpec) -> Iterator[list[RawRow]]:
        with open_binary(path) as f:
            pf = pq.ParquetFile(f)
            offset = 0
            for rb in pf.iter_batches(batch_size=spec.batch_size):
                rows = rb.to_pylist()
                yield [RawRow(r, location=f"{path}#{offset + i}") for i, r in enumerate(rows)]
                offset += len(rows)

    def count(self, path: str, spec: InputSpec) -> int | None:
        with open_binary(path) as f:
            return pq.ParquetFile(f).metadata.num_rows

    def schema(self, path: str) -> pa.Schema | None:
        with open_binary(path) as f:
            return pq.read_schema(f)


@hookimpl
def register_readers() -> dict[str, Reader]:
    return {"jsonl": JsonlReader(), "parquet": ParquetReader(), "openai-batch": OpenAIBatchReader()}


@hookimpl(tryfirst=True)
def process_result(record: dict[str, Any], row: dict[str, Any]) -> None:
    """Remember which OpenAI endpoint a batch line asked for, so the openai-batch writer answers in kind."""
    if row.get("_forge_chat") is False and row.get("url"):
        record["openai_url"] = row["url"]
