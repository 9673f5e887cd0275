"""The output table's one fixed schema, and turning result records into Arrow tables that follow it.

Every part of a run has exactly the same column names and types (an ``error`` column that is all null is
still a string column), so pyarrow.dataset, pandas, polars and DuckDB read the directory as one table. The
types of the id and kept columns come from the input's schema (Parquet) or the first rows (JSONL), and are
stored in the run's manifest so that a resumed run writes the same types.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

# name -> type of the columns every output has, in order around the id and kept fields.
HEAD_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("row_index", pa.int64()),
    ("sample_index", pa.int64()),
)
TAIL_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("valid", pa.bool_()),  # constrained outputs: passed the independent check; null when unconstrained
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("error", pa.string()),
    ("error_kind", pa.string()),
    ("ttft_s", pa.float64()),
    ("latency_s", pa.float64()),
    ("finished_at", pa.timestamp("us", tz="UTC")),
    ("extra", pa.string()),
)
PROMPT_COLUMN = ("prompt", pa.string())

# Logprobs, when the job asks for them (sampling.logprobs / prompt_logprobs, or an OpenAI batch input whose
# lines may): one entry per position, the chosen token with its rank and the top k, most likely first.
TOKEN_LOGPROB_TYPE = pa.struct([("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())])
POSITION_LOGPROBS_TYPE = pa.struct([
    ("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32()), ("rank", pa.int32()),
    ("top", pa.list_(TOKEN_LOGPROB_TYPE)),
])
LOGPROBS_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("logprobs", pa.list_(POSITION_LOGPROBS_TYPE)),
    ("cumulative_logprob", pa.float64()),
)
# The first prompt token has no context: its entry is null, as in vLLM.
PROMPT_LOGPROBS_COLUMN = ("prompt_logprobs", pa.list_(POSITION_LOGPROBS_TYPE))


def id_column_name(id_field: str | None) -> str:
    """The output column holding the row id: the input's id field, or ``id`` (the row position) without one."""
    return id_field or "id"


def normalize_id_type(t: pa.DataType | None) -> pa.DataType:
    """Ids are int64 when the input's are integers that fit it, else strings (anything else, a uint64 hash id
    included, is written as its text)."""
    if t is not None and pa.types.is_integer(t) and not pa.types.is_uint64(t):
        return pa.int64()
    return pa.string()


# Field metadata of a kept column whose type the first rows did not tell (all null, or values of several
# types): it is a string column, and a value that is not a string is written as its JSON text.
KEEP_AS_TEXT = {b"forge_batch.keep": b"as_text"}


def keep_field(name: str, t: pa.DataType | None) -> pa.Field:
    """A kept column: typed as the input's, or text (:data:`KEEP_AS_TEXT`) when no type is known."""
    if t is None or pa.types.is_null(t):
        return pa.field(name, pa.string(), metadata=KEEP_AS_TEXT)
    return pa.field(name, normalize_keep_type(t))


def normalize_keep_type(t: pa.DataType | None) -> pa.DataType:
    """A kept column's type: as in the input, with null (all-missing) widened to string and dictionary /
    large variants simplified so that every part agrees."""
    if t is None or pa.types.is_null(t):
        return pa.string()
    if pa.types.is_dictionary(t):
        return normalize_keep_type(t.value_type)
    if pa.types.is_large_string(t):
        return pa.string()
    if pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    return t


def infer_type(values: Iterable[Any]) -> pa.DataType | None:
    """The Arrow type of Python values (None if they are all null or do not agree on one type)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    try:
        t = pa.array(vals).type
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        return pa.string() if all(isinstance(v, str) for v in vals) else None
    # only empty lists, or a struct key always null: the values do not tell that part's type, and a
    # null-typed part would refuse every later value (text keeps them all)
    return None if _holds_null_type(t) else t


def _holds_null_type(t: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _holds_null_type(t.value_type)
    if pa.types.is_struct(t):
        return any(_holds_null_type(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return _holds_null_type(t.key_type) or _holds_null_type(t.item_type)
    return False


def output_schema(
    id_field: str | None,
    id_type: pa.DataType,
    keep: Sequence[tuple[str, pa.DataType]],
    include_prompt: bool,
    metadata: Mapping[str, str] | None = None,
    *,
    logprobs: bool = False,
    prompt_logprobs: bool = False,
) -> pa.Schema:
    """Build the output schema: id, row_index, sample_index, kept fields, [prompt], results, timing, extra,
    [logprobs, cumulative_logprob], [prompt_logprobs]."""
    id_name = id_column_name(id_field)
    fields = [pa.field(id_name, id_type)]
    fields += [pa.field(n, t) for n, t in HEAD_COLUMNS]
    fields += [keep_field(n, t) for n, t in keep if n != id_name]
    if include_prompt:
        fields.append(pa.field(*PROMPT_COLUMN))
    fields += [pa.field(n, t) for n, t in TAIL_COLUMNS]
    if logprobs:
        fields += [pa.field(n, t) for n, t in LOGPROBS_COLUMNS]
    if prompt_logprobs:
        fields.append(pa.field(*PROMPT_LOGPROBS_COLUMN))
    return pa.schema(fields, metadata=dict(metadata or {}))


def schema_to_str(schema: pa.Schema) -> str:
    """Serialize a schema (without metadata) for the manifest."""
    return base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode()


def schema_from_str(text: str) -> pa.Schema:
    import pyarrow.ipc

    return pyarrow.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _fits(value: Any, t: pa.DataType) -> bool:
    try:
        return _written_as_given(value, pa.array([value], type=t).to_pylist()[0])
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return False


def _written_as_given(value: Any, back: Any) -> bool:
    """Whether Arrow wrote ``value`` as given (``back``: what the column reads back). pyarrow cuts a float
    to fit an integer column and drops the struct keys the type lacks, without a word; a wider type (an
    int in a float column, a struct key the value lacks, read back null) is fine."""
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN
        return isinstance(back, float) and back != back
    if isinstance(value, dict):
        if isinstance(back, list):  # a map column reads back as (key, value) pairs
            back = dict(back)
        return isinstance(back, dict) and set(value) <= set(back) and all(
            _written_as_given(v, back[k]) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return isinstance(back, (list, tuple)) and len(value) == len(back) and all(map(_written_as_given, value, back))
    try:
        return bool(value == back)  # an aware datetime is not equal to the naive one it became
    except Exception:  # noqa: BLE001 - values that cannot be compared were not written as given
        return False


# The columns a run writes itself, always of their own type; the others (the id, kept fields) hold the input's values.
_RUN_COLUMNS = frozenset(n for n, _ in (*HEAD_COLUMNS, *TAIL_COLUMNS, *LOGPROBS_COLUMNS, PROMPT_LOGPROBS_COLUMN))


def _written_as_given_all(table: pa.Table, rows: list[dict[str, Any]]) -> bool:
    """Whether every id and kept value of ``rows`` reads back from ``table`` as it was given."""
    for name in table.column_names:
        if name in _RUN_COLUMNS:
            continue
        for value, back in zip((r[name] for r in rows), table.column(name).to_pylist()):
            if not _written_as_given(value, back):
                return False
    return True


def records_to_table(records: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Arrow table of ``records`` with exactly ``schema``.

    A kept field of no known type (:data:`KEEP_AS_TEXT`) that is not a string is written as its JSON text. A
    value that does not fit its column's type (a kept field that is a string in one row and a number in
    the first rows) is set to null and the record gets an ``error`` saying so (``error_kind``
    ``type_mismatch``), so one odd row never breaks a part. Records are modified in place in that case.
    """
    names = schema.names
    for f in schema:
        if f.metadata == KEEP_AS_TEXT:
            for r in records:
                if r.get(f.name) is not None and not isinstance(r[f.name], str):
                    r[f.name] = json.dumps(r[f.name], ensure_ascii=False, default=str)
    rows = [{n: r.get(n) for n in names} for r in records]
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
        if _written_as_given_all(table, rows):
            return table
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        pass
    for r in records:
        bad = [f.name for f in schema if r.get(f.name) is not None and not _fits(r.get(f.name), f.type)]
        for name in bad:
            value = r[name]
            r[name] = None
            note = f"column {name!r}: value {json.dumps(value, default=str)[:80]} does not fit type {schema.field(name).type}"
            if name in ("error", "error_kind"):
                continue
            if r.get("error"):
                r["error"] = f"{r['error']}; {note}"
            else:
                r["error"] = note
                r["error_kind"] = "type_mismatch"
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in records], schema=schema)


def ledger_schema(id_type: pa.DataType, id_name: str = "id") -> pa.Schema:
    """Schema of the per-part ledger files in ``ledger/`` of the state folder: one entry per sample, dropped ones
    included (``status`` ok | error | skipped | dropped), the source of truth for resume."""
    return pa.schema(
        [
            pa.field("id", id_type),
            pa.field("row_index", pa.int64()),
            pa.field("sample_index", pa.int64()),
            pa.field("status", pa.string()),
            pa.field("error_kind", pa.string()),
            pa.field("row_status", pa.string()),
            pa.field("prompt_tokens", pa.int64()),
            pa.field("completion_tokens", pa.int64()),
        ]
    )
