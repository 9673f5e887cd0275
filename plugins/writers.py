"""Built-in writers: Parquet (the default), JSONL and OpenAI batch output, registered through
``register_writers`` like any plugin's. The runner hands each a complete Arrow table with the run's fixed
schema and a hidden temporary path; it renames the file into place afterwards."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from forge_batch.hookspecs import hookimpl
from forge_batch.io.base import WriteContext, Writer
from forge_batch.io.openai_batch import response_line
from forge_batch.models.registry import split_repo_id


def _json_default(value: Any) -> Any:
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    for r in rows:
        extra = r.get("extra")
        r["extra_obj"] = json.loads(extra) if extra else {}
    return rows


class ParquetWriter(Writer):
    """One Parquet file per part; the job spec and tool version are in the file's key/value metadata."""

    name = "parquet"
    extension = ".parquet"

    def write_part(self, table: pa.Table, path: str, context: WriteContext) -> None:
        meta = dict(table.schema.metadata or {})
        meta.update({k.encode(): v.encode() for k, v in context.metadata.items()})
        table = table.replace_schema_metadata(meta)
        pq.write_table(table, path, compression=context.job.output.compression or "none")


class JsonlWriter(Writer):
    """One JSON object per output row, with the same columns as the Parquet output (``extra`` as an object)."""

    name = "jsonl"
    extension = ".jsonl"

    def write_part(self, table: pa.Table, path: str, context: WriteContext) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for r in _rows(table):
                r["extra"] = r.pop("extra_obj") or None
                f.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")


class OpenAIBatchWriter(Writer):
    """Batch API output lines (``id``, ``custom_id``, ``response``, ``error``): one line per request, with
    all ``n`` samples as ``choices``, in input order within the part (a single-file output merges parts on
    that order). The runner never splits a request's samples across parts."""

    name = "openai-batch"
    extension = ".jsonl"

    def write_part(self, table: pa.Table, path: str, context: WriteContext) -> None:
        # a repo id is the model's name as vLLM reports it; a path, its file or folder name
        model = context.job.model if split_repo_id(context.job.model) else Path(context.job.model).name.removesuffix(".gguf")
        with open(path, "w", encoding="utf-8") as f:
            group: list[dict[str, Any]] = []
            for r in sorted(_rows(table), key=lambda r: (r["row_index"], r.get("sample_index") or 0)):
                if group and r["row_index"] != group[0]["row_index"]:
                    f.write(json.dumps(response_line(group, context.id_column, model), ensure_ascii=False) + "\n")
                    group = []
                group.append(r)
            if group:
                f.write(json.dumps(response_line(group, context.id_column, model), ensure_ascii=False) + "\n")


@hookimpl
def register_writers() -> dict[str, Writer]:
    return {"parquet": ParquetWriter(), "jsonl": JsonlWriter(), "openai-batch": OpenAIBatchWriter()}
