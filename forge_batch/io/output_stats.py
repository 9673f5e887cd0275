"""What a run's output directory holds, aggregated for ``forge-batch report``: counts, distributions,
throughput over time, error examples, the job, the engine and the resume history.

Works on every built-in output format (Parquet, JSONL, OpenAI batch), on a run still in progress (committed
parts, no summary yet) and on outputs of millions of rows in bounded memory: each part is scanned in Arrow
record batches with only the small columns projected (never ``text`` or ``prompt``), counts are merged per
batch with pyarrow.compute, and only a few numeric columns are kept, as numpy arrays (about 35 bytes per
row), for percentiles and histograms. No row ever becomes a Python object except the few error examples.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from forge_batch.io.base import DamagedOutputError
from forge_batch.io.meta import META_ENGINE, META_JOB
from forge_batch.io.output_dir import MANIFEST, PART_RE, SUMMARY, find_state_dir, parts_dir_for
from forge_batch.io.schema import TAIL_COLUMNS, id_column_name, schema_from_str

RUN_LOG = "runs.jsonl"  # written by the built-in run_history plugin (forge_batch.plugins.run_history)

BATCH_ROWS = 65_536
EXAMPLES_PER_KIND = 3
# Parts further apart than this (no row finished in between) are taken to be different runs.
RUN_GAP_S = 120.0
THROUGHPUT_BINS = 60

# The columns the report reads (besides the id); everything else (text, prompt, kept fields) is never read.
STAT_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("row_index", pa.int64()),
    ("sample_index", pa.int64()),
    *(column for column in TAIL_COLUMNS if column[0] not in ("text", "extra")),
)


@dataclass
class Distribution:
    """One numeric column's distribution; ``values`` stay in memory for the histogram."""

    values: np.ndarray
    count: int
    mean: float
    minimum: float
    maximum: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: np.ndarray) -> Distribution | None:
        values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if not len(values):
            return None
        p50, p90, p99 = (float(v) for v in np.percentile(values, [50, 90, 99]))
        return cls(values, len(values), float(values.mean()), float(values.min()), float(values.max()), p50, p90, p99)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("count", "mean", "minimum", "maximum", "p50", "p90", "p99")}


@dataclass
class PartInfo:
    """One committed part file."""

    file: str
    records: int = 0
    rows: int = 0
    failed_records: int = 0
    first_finished: float | None = None  # epoch seconds
    last_finished: float | None = None
    committed_at: str | None = None
    engine: str | None = None  # the part's ``forge_batch.engine`` metadata (Parquet), JSON text
    record_offset: int = 0  # where its records start in the time arrays


@dataclass
class RunInfo:
    """Consecutive parts written by one run of the job (see :func:`_split_runs` for how runs are told apart)."""

    number: int
    parts: list[PartInfo]
    started_by: str  # how the run was told apart: "runs.jsonl", or a guess ("engine changed", "a gap", ...)
    started_at: str | None = None  # from runs.jsonl
    ended: str | None = None  # its end line's status; None: no end line (killed, or still running)
    resumed_rows: int | None = None

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def records(self) -> int:
        return sum(p.records for p in self.parts)

    @property
    def failed_records(self) -> int:
        return sum(p.failed_records for p in self.parts)

    @property
    def first_finished(self) -> float | None:
        values = [p.first_finished for p in self.parts if p.first_finished is not None]
        return min(values) if values else None

    @property
    def last_finished(self) -> float | None:
        values = [p.last_finished for p in self.parts if p.last_finished is not None]
        return max(values) if values else None


@dataclass
class Throughput:
    """Rows/s and output tokens/s over one run, in bins of ``bin_s`` seconds from the run's first row."""

    run: int
    start: float  # epoch seconds of the first bin's start
    bin_s: float
    rows_per_s: np.ndarray
    tokens_per_s: np.ndarray
    source: str  # "finished_at" (per-row finish times) or "committed_at" (the parts' commit times)


@dataclass
class OutputStats:
    """Everything ``forge-batch report`` shows about one output directory."""

    path: Path
    output_format: str
    manifest: dict[str, Any]
    summary: dict[str, Any] | None
    status: str
    job: dict[str, Any] | None
    engine: dict[str, Any] | None
    id_column: str
    parts: list[PartInfo] = field(default_factory=list)
    runs: list[RunInfo] = field(default_factory=list)
    records: int = 0
    rows: int = 0
    failed_records: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    valid: Counter[str] = field(default_factory=Counter)  # "true" / "false" / "null"
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    samples_per_row: Counter[int] = field(default_factory=Counter)
    ttft_s: Distribution | None = None
    latency_s: Distribution | None = None
    prompt_len: Distribution | None = None
    completion_len: Distribution | None = None
    throughput: list[Throughput] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def forced_resumes(self) -> list[dict[str, Any]]:
        return list(self.manifest.get("forced_resumes") or [])

    def to_dict(self) -> dict[str, Any]:
        """The numbers (not the arrays) as plain JSON-able data."""

        def dist(d: Distribution | None) -> dict[str, Any] | None:
            return d.to_dict() if d is not None else None

        return {
            "path": str(self.path),
            "output_format": self.output_format,
            "status": self.status,
            "records": self.records,
            "rows": self.rows,
            "failed_records": self.failed_records,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reasons": dict(self.finish_reasons),
            "error_kinds": dict(self.error_kinds),
            "error_examples": self.error_examples,
            "valid": dict(self.valid),
            "per_sample": self.per_sample,
            "samples_per_row": {int(k): v for k, v in self.samples_per_row.items()},
            "ttft_s": dist(self.ttft_s),
            "latency_s": dist(self.latency_s),
            "prompt_tokens_per_row": dist(self.prompt_len),
            "completion_tokens_per_sample": dist(self.completion_len),
            "parts": len(self.parts),
            "runs": [
                {"run": r.number, "parts": len(r.parts), "rows": r.rows, "records": r.records, "started_by": r.started_by}
                for r in self.runs
            ],
            "engine": self.engine,
            "notes": self.notes,
        }


def as_numpy(array: pa.Array | pa.ChunkedArray, dtype: Any, fill: Any = 0) -> np.ndarray:
    """A numeric, boolean or timestamp (as microseconds) Arrow array as numpy ``dtype``, nulls as ``fill``."""
    if pa.types.is_timestamp(array.type):
        array = array.cast(pa.int64())
    if np.dtype(dtype).kind == "f":
        array = array.cast(pa.float64())
    elif pa.types.is_boolean(array.type):
        fill = bool(fill)
    return pc.fill_null(array, fill).to_numpy(zero_copy_only=False).astype(dtype, copy=False)


# ---- reading the parts -----------------------------------------------------------------------------------


def read_state_json(path: Path) -> dict[str, Any] | None:
    """A state file's JSON (None when it is not there); a file that is there but not JSON is damaged, and
    said so, as inspect says it."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedOutputError(f"{path} is truncated or corrupt (not valid JSON: {e})") from e
    return data if isinstance(data, dict) else None


def part_files(out: Path) -> list[Path]:
    """Committed parts, in part order (hidden temp files of a part being written are not parts)."""
    return sorted((p for p in out.iterdir() if PART_RE.match(p.name) and p.is_file()), key=lambda p: p.name)


def _sniff_format(parts: list[Path]) -> str:
    if not parts:
        return "unknown"
    if parts[0].name.endswith(".parquet"):
        return "parquet"
    with open(parts[0], encoding="utf-8") as f:
        line = f.readline()
    try:
        first = json.loads(line)
    except json.JSONDecodeError:
        return "jsonl"
    return "openai-batch" if isinstance(first, dict) and "custom_id" in first and "response" in first else "jsonl"


def _first_id_type(path: Path, id_column: str) -> pa.DataType:
    with open(path, encoding="utf-8") as f:
        line = f.readline()
    try:
        value = json.loads(line).get(id_column)
    except (json.JSONDecodeError, AttributeError):
        value = None
    return pa.int64() if isinstance(value, int) and not isinstance(value, bool) else pa.string()


def _iter_json_batches(path: Path, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Stream a JSON-lines file as record batches of ``schema`` (other keys are skipped unparsed into
    columns); one block of the file is in memory at a time."""
    import pyarrow.json as pj

    parse = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    read = pj.ReadOptions(block_size=1 << 22)
    if hasattr(pj, "open_json"):
        with pj.open_json(str(path), read_options=read, parse_options=parse) as reader:
            yield from reader
    else:  # older pyarrow: one part at a time (a part is bounded by output.rows_per_file)
        yield from pj.read_json(str(path), read_options=read, parse_options=parse).to_batches(BATCH_ROWS)


_OPENAI_ERROR = pa.struct([("code", pa.string()), ("message", pa.string())])
_OPENAI_SCHEMA = pa.schema(
    [
        ("custom_id", pa.string()),
        (
            "response",
            pa.struct(
                [
                    ("status_code", pa.int64()),
                    (
                        "body",
                        pa.struct(
                            [
                                ("created", pa.int64()),
                                (
                                    "choices",
                                    pa.list_(
                                        pa.struct(
                                            [("index", pa.int64()), ("finish_reason", pa.string()), ("error", _OPENAI_ERROR)]
                                        )
                                    ),
                                ),
                                ("usage", pa.struct([("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64())])),
                            ]
                        ),
                    ),
                ]
            ),
        ),
        ("error", _OPENAI_ERROR),
    ]
)


def _openai_records(batch: pa.RecordBatch, line_offset: int) -> pa.RecordBatch:
    """OpenAI batch result lines -> one record per choice (a failed request: one error record), in the
    Parquet output's column names. The format carries no per-row timings or ``valid``, only the request's
    ``created`` second and its total usage (so with n > 1 a sample's own completion tokens are unknown: the
    total goes on sample 0)."""
    response = batch.column("response")
    body = pc.struct_field(response, "body")
    choices = pc.struct_field(body, "choices")
    usage = pc.struct_field(body, "usage")
    line_error = batch.column("error")
    lengths = as_numpy(pc.list_value_length(choices), np.int64)
    flat = pc.list_flatten(choices)
    parent = as_numpy(pc.list_parent_indices(choices), np.int64)
    bare = np.flatnonzero(lengths == 0)  # failed requests: no choices
    line_of = np.concatenate([parent, bare])  # the line of each record
    take = pa.array(line_of, pa.int64())

    def per_line(column: pa.Array) -> pa.Array:
        return pc.take(column, take)

    sample_index = np.concatenate([as_numpy(pc.struct_field(flat, "index"), np.int64), np.zeros(len(bare), np.int64)])
    choice_err = pc.struct_field(flat, "error")
    line_code = per_line(pc.struct_field(line_error, "code"))
    line_msg = per_line(pc.struct_field(line_error, "message"))
    error = pc.coalesce(pa.concat_arrays([pc.struct_field(choice_err, "message"), pa.nulls(len(bare), pa.string())]), line_msg)
    kind = pc.coalesce(pa.concat_arrays([pc.struct_field(choice_err, "code"), pa.nulls(len(bare), pa.string())]), line_code)
    bare_code = pc.take(pc.struct_field(line_error, "code"), pa.array(bare, pa.int64()))
    bare_reason = pc.fill_null(pc.if_else(pc.equal(bare_code, "skipped"), "skipped", "error"), "error")
    finish = pa.concat_arrays([pc.struct_field(flat, "finish_reason"), bare_reason.cast(pa.string())])
    n_of = lengths[line_of]
    total_completion = as_numpy(per_line(pc.struct_field(usage, "completion_tokens")), np.float64, np.nan)
    completion = np.where((n_of <= 1) | (sample_index == 0), total_completion, np.nan)
    completion = pa.array(completion, pa.float64(), from_pandas=True).cast(pa.int64())
    created = per_line(pc.struct_field(body, "created"))
    finished = pc.multiply(created.cast(pa.int64()), 1_000_000).cast(pa.timestamp("us", tz="UTC"))
    return pa.RecordBatch.from_pydict(
        {
            "custom_id": per_line(batch.column("custom_id")),
            "row_index": pa.array(line_of + line_offset, pa.int64()),
            "sample_index": pa.array(sample_index, pa.int64()),
            "finish_reason": finish,
            "prompt_tokens": per_line(pc.struct_field(usage, "prompt_tokens")),
            "completion_tokens": completion,
            "error": error,
            "error_kind": kind,
            "finished_at": finished,
        }
    )


class _PartScanner:
    """Yields one part's records as Arrow record batches with the report's columns (missing ones absent)."""

    def __init__(self, output_format: str, id_column: str, schema: pa.Schema | None) -> None:
        self.output_format = output_format
        self.id_column = id_column
        self.schema = schema
        self._lines = 0

    def columns(self, available: pa.Schema) -> list[str]:
        wanted = [self.id_column] + [n for n, _ in STAT_COLUMNS]
        return [c for c in wanted if c in available.names]

    def scan(self, path: Path) -> Iterator[pa.RecordBatch]:
        if path.name.endswith(".parquet"):
            pf = pq.ParquetFile(path)
            yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=self.columns(pf.schema_arrow))
        elif self.output_format == "openai-batch":
            for batch in _iter_json_batches(path, _OPENAI_SCHEMA):
                offset = self._lines
                self._lines += batch.num_rows
                yield _openai_records(batch, offset)
        else:
            if self.schema is not None:
                fields = [self.schema.field(c) for c in self.columns(self.schema)]
            else:
                fields = [pa.field(self.id_column, _first_id_type(path, self.id_column))]
                fields += [pa.field(n, t) for n, t in STAT_COLUMNS]
            yield from _iter_json_batches(path, pa.schema(fields))

    def engine_of(self, path: Path) -> str | None:
        if not path.name.endswith(".parquet"):
            return None
        meta = pq.read_schema(path).metadata or {}
        value = meta.get(META_ENGINE.encode())
        return value.decode() if value else None

    def job_of(self, path: Path) -> dict[str, Any] | None:
        if not path.name.endswith(".parquet"):
            return None
        meta = pq.read_schema(path).metadata or {}
        value = meta.get(META_JOB.encode())
        return json.loads(value) if value else None


# ---- aggregating -----------------------------------------------------------------------------------------


def _numpy(batch: pa.RecordBatch, name: str, dtype: Any, fill: Any) -> np.ndarray | None:
    return as_numpy(batch.column(name), dtype, fill) if name in batch.schema.names else None


def _add_counts(counter: Counter[str], array: pa.Array) -> None:
    for item in pc.value_counts(array).to_pylist():
        value = item["values"]
        counter["null" if value is None else str(value)] += int(item["counts"])


class _Aggregator:
    def __init__(self, id_column: str) -> None:
        self.id_column = id_column
        self.finish = Counter[str]()
        self.kinds = Counter[str]()
        self.valid = Counter[str]()
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.records = 0
        self.rows = 0
        self.failed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        # per sample index
        self.s_records = np.zeros(0, np.int64)
        self.s_errors = np.zeros(0, np.int64)
        self.s_tokens = np.zeros(0, np.int64)
        self.s_known_tokens = np.zeros(0, np.int64)  # of the samples that did not fail: the mean's numerator
        self.s_known = np.zeros(0, np.int64)  # samples without error whose completion tokens are known
        self.s_length = np.zeros(0, np.int64)
        self.s_valid = np.zeros(0, np.int64)
        self.s_invalid = np.zeros(0, np.int64)
        self.per_row_count = np.zeros(0, np.int32)  # samples written per row_index
        # kept arrays (numbers only)
        self.ttft: list[np.ndarray] = []
        self.latency: list[np.ndarray] = []
        self.prompt_len: list[np.ndarray] = []
        self.completion_len: list[np.ndarray] = []
        self.times: list[np.ndarray] = []  # finished_at of every record, microseconds (-1: unknown)
        self.is_row: list[np.ndarray] = []
        self.time_tokens: list[np.ndarray] = []
        self.n_time_records = 0

    @staticmethod
    def _grow(a: np.ndarray, size: int) -> np.ndarray:
        if len(a) >= size:
            return a
        return np.concatenate([a, np.zeros(size - len(a), a.dtype)])

    def add(self, batch: pa.RecordBatch, part: PartInfo) -> None:
        n = batch.num_rows
        if n == 0:
            return
        names = batch.schema.names
        sample = _numpy(batch, "sample_index", np.int64, 0)
        sample = sample if sample is not None else np.zeros(n, np.int64)
        first = sample == 0
        has_error = (
            as_numpy(pc.is_valid(batch.column("error")), bool) if "error" in names else np.zeros(n, bool)
        )
        n_rows = int(first.sum())
        # a skipped sample carries its reason in error but is no failure (as the run counts it)
        skipped = (as_numpy(pc.fill_null(pc.equal(batch.column("error_kind"), "skipped"), False), bool)
                   if "error_kind" in names else np.zeros(n, bool))
        n_failed = int((has_error & ~skipped).sum())
        self.records += n
        self.rows += n_rows
        self.failed += n_failed
        part.records += n
        part.rows += n_rows
        part.failed_records += n_failed
        completion = _numpy(batch, "completion_tokens", np.float64, np.nan)
        completion = completion if completion is not None else np.full(n, np.nan)
        self._add_totals(batch, first, has_error, completion)
        self._add_per_sample(batch, sample, has_error, completion)
        self._add_per_row(batch)
        if n_failed and "error" in names:
            self._add_error_examples(batch, has_error)
        self._add_finish_times(batch, part, first, completion)

    def _add_totals(self, batch: pa.RecordBatch, first: np.ndarray, has_error: np.ndarray, completion: np.ndarray) -> None:
        """Finish reasons, validity, token totals and the kept per-row timings and lengths."""
        names = batch.schema.names
        if "finish_reason" in names:
            _add_counts(self.finish, batch.column("finish_reason"))
        if "valid" in names:
            _add_counts(self.valid, batch.column("valid"))
        prompt = _numpy(batch, "prompt_tokens", np.float64, np.nan)
        if prompt is not None:
            self.prompt_tokens += int(np.nansum(prompt[first]))
            self.prompt_len.append(prompt[first & ~has_error & ~np.isnan(prompt)].astype(np.int32))
        self.completion_tokens += int(np.nansum(completion))
        self.completion_len.append(completion[~np.isnan(completion) & ~has_error].astype(np.int32))
        for name, store in (("ttft_s", self.ttft), ("latency_s", self.latency)):
            values = _numpy(batch, name, np.float64, np.nan)
            if values is not None:
                keep = first & ~has_error & ~np.isnan(values)  # one per row (samples share the row's timing)
                store.append(values[keep].astype(np.float32))  # 7 digits are plenty for percentiles

    def _add_per_sample(self, batch: pa.RecordBatch, sample: np.ndarray, has_error: np.ndarray, completion: np.ndarray) -> None:
        """Counts per sample index (records, errors, tokens, length finishes, validity)."""
        names = batch.schema.names
        size = int(sample.max()) + 1
        for attr in ("s_records", "s_errors", "s_tokens", "s_known_tokens", "s_known", "s_length", "s_valid", "s_invalid"):
            setattr(self, attr, self._grow(getattr(self, attr), size))
        self.s_records += np.bincount(sample, minlength=len(self.s_records))
        self.s_errors += np.bincount(sample, weights=has_error, minlength=len(self.s_records)).astype(np.int64)
        self.s_tokens += np.bincount(sample, weights=np.nan_to_num(completion), minlength=len(self.s_records)).astype(np.int64)
        known = ~np.isnan(completion) & ~has_error
        self.s_known += np.bincount(sample, weights=known, minlength=len(self.s_records)).astype(np.int64)
        self.s_known_tokens += np.bincount(sample, weights=np.where(known, np.nan_to_num(completion), 0),
                                           minlength=len(self.s_records)).astype(np.int64)
        if "finish_reason" in names:
            length = as_numpy(pc.equal(batch.column("finish_reason"), "length"), bool)
            self.s_length += np.bincount(sample, weights=length, minlength=len(self.s_records)).astype(np.int64)
        if "valid" in names:
            valid = batch.column("valid")
            is_true = as_numpy(valid, bool)
            is_false = as_numpy(pc.invert(valid), bool)
            self.s_valid += np.bincount(sample, weights=is_true, minlength=len(self.s_records)).astype(np.int64)
            self.s_invalid += np.bincount(sample, weights=is_false, minlength=len(self.s_records)).astype(np.int64)

    def _add_per_row(self, batch: pa.RecordBatch) -> None:
        """How many samples each row position has written (duplicates show up as more than n)."""
        row_index = _numpy(batch, "row_index", np.int64, -1)
        if row_index is not None:
            ok = row_index >= 0
            if ok.any():
                self.per_row_count = self._grow(self.per_row_count, int(row_index[ok].max()) + 1)
                self.per_row_count += np.bincount(row_index[ok], minlength=len(self.per_row_count)).astype(np.int32)

    def _add_error_examples(self, batch: pa.RecordBatch, has_error: np.ndarray) -> None:
        """Errors by kind, with a few examples each."""
        names = batch.schema.names
        failed = batch.filter(pa.array(has_error))
        kinds = failed.column("error_kind") if "error_kind" in names else pa.nulls(failed.num_rows, pa.string())
        kinds = pc.fill_null(kinds, "error")
        _add_counts(self.kinds, kinds)
        for kind in pc.unique(kinds).to_pylist():
            have = self.examples.setdefault(kind, [])
            if len(have) >= EXAMPLES_PER_KIND:
                continue
            # a few candidates only (samples of one row usually share the error): one example per row
            idx = np.flatnonzero(as_numpy(pc.equal(kinds, kind), bool))[: 8 * EXAMPLES_PER_KIND]
            cols = [c for c in (self.id_column, "row_index", "sample_index", "error") if c in failed.schema.names]
            seen = {e.get("row_index") for e in have}
            for row in failed.select(cols).take(pa.array(idx, pa.int64())).to_pylist():
                if len(have) >= EXAMPLES_PER_KIND or ("row_index" in row and row["row_index"] in seen):
                    continue
                seen.add(row.get("row_index"))
                have.append({"id": row.get(self.id_column), **{c: row[c] for c in cols if c != self.id_column}})

    def _add_finish_times(self, batch: pa.RecordBatch, part: PartInfo, first: np.ndarray, completion: np.ndarray) -> None:
        """Finish times, for throughput over time and for telling runs apart."""
        times = _numpy(batch, "finished_at", np.int64, -1)
        if times is not None:
            known = times >= 0
            if known.any():
                t = times[known] / 1e6
                part.first_finished = min(part.first_finished or np.inf, float(t.min()))
                part.last_finished = max(part.last_finished or -np.inf, float(t.max()))
            self.times.append(times)
            self.is_row.append(first)
            self.time_tokens.append(np.nan_to_num(completion).astype(np.int32))
            self.n_time_records += batch.num_rows

    def per_sample(self) -> list[dict[str, Any]]:
        out = []
        for i in range(len(self.s_records)):
            records = int(self.s_records[i])
            if not records:
                continue
            known = int(self.s_known[i])
            constrained = int(self.s_valid[i] + self.s_invalid[i])
            out.append(
                {
                    "sample_index": i,
                    "records": records,
                    "errors": int(self.s_errors[i]),
                    "completion_tokens": int(self.s_tokens[i]),
                    "mean_completion_tokens": (int(self.s_known_tokens[i]) / known) if known else None,
                    "length_finishes": int(self.s_length[i]),
                    "valid_rate": (int(self.s_valid[i]) / constrained) if constrained else None,
                }
            )
        return out


def _cat(chunks: list[np.ndarray], dtype: Any) -> np.ndarray:
    """Concatenate and empty ``chunks`` (so that the pieces and the whole are not both kept)."""
    whole = np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype)
    chunks.clear()
    return whole


def _parse_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.timestamp()


def read_run_log(path: Path) -> list[dict[str, Any]]:
    """The lines of ``runs.jsonl`` in the state folder (written by the built-in ``run_history`` plugin); a torn
    last line is skipped."""
    entries = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _runs_from_log(parts: list[PartInfo], log: list[dict[str, Any]]) -> list[RunInfo] | None:
    """Runs from the run log: each start line says how many parts earlier runs left; None when the log does
    not fit the parts (written by another tool, or parts removed by hand)."""
    starts = [e for e in log if e.get("event") == "start"]
    if not starts or starts[0].get("parts_at_start") != 0:
        return None
    runs: list[RunInfo] = []
    for k, start in enumerate(starts):
        lo = int(start.get("parts_at_start") or 0)
        hi = int(starts[k + 1].get("parts_at_start") or 0) if k + 1 < len(starts) else len(parts)
        if hi < lo or hi > len(parts):
            return None
        later = starts[k + 1].get("at") if k + 1 < len(starts) else None
        end = next((e for e in log if e.get("event") == "end" and e.get("pid") == start.get("pid")
                    and str(e.get("at")) >= str(start.get("at")) and (later is None or str(e.get("at")) <= str(later))), None)
        runs.append(
            RunInfo(k + 1, parts[lo:hi], "runs.jsonl", started_at=start.get("at"),
                    ended=(end or {}).get("status"), resumed_rows=start.get("resumed_rows"))
        )
    return runs


def _split_runs(parts: list[PartInfo], manifest: dict[str, Any], summary: dict[str, Any] | None) -> list[RunInfo]:
    """Without a run log, guess runs from consecutive parts. A part starts a new run when the manifest or summary says a run
    started between it and the part before (``summary.started_at`` of the last run, the time of each
    ``--force-resume``), when its engine metadata differs from the part before's, or when no row finished
    for more than :data:`RUN_GAP_S` seconds before it (a resumed run first loads its engine). A run that
    resumed within that gap with the same engine is not told apart."""
    starts: list[tuple[float, str]] = []
    if summary is not None and _parse_time(summary.get("started_at")) is not None:
        starts.append((_parse_time(summary.get("started_at")) or 0.0, "summary.started_at"))
    for forced in manifest.get("forced_resumes") or []:
        at = _parse_time(forced.get("at"))
        if at is not None:
            starts.append((at, f"--force-resume ({forced.get('kind')} changed)"))
    runs: list[RunInfo] = []
    prev: PartInfo | None = None
    for part in parts:
        reason = None
        if prev is None:
            reason = "first part"
        else:
            prev_end = prev.last_finished if prev.last_finished is not None else _parse_time(prev.committed_at)
            begin = part.first_finished if part.first_finished is not None else _parse_time(part.committed_at)
            if part.engine is not None and prev.engine is not None and part.engine != prev.engine:
                reason = "engine changed"
            elif prev_end is not None and begin is not None:
                marks = [why for at, why in starts if prev_end < at <= begin + 1.0]  # started_at is in whole seconds
                if marks:
                    reason = marks[0]
                elif begin - prev_end > RUN_GAP_S:
                    reason = f"no row finished for {begin - prev_end:,.0f} s"
        if reason is not None:
            runs.append(RunInfo(len(runs) + 1, [], reason))
        runs[-1].parts.append(part)
        prev = part
    return runs


def _throughput(run: RunInfo, times: np.ndarray, is_row: np.ndarray, tokens: np.ndarray, end: int) -> Throughput | None:
    lo = run.parts[0].record_offset
    t = times[lo:end]
    known = t >= 0
    if known.sum() < 2:
        return None
    t, rows, tok = t[known] / 1e6, is_row[lo:end][known], tokens[lo:end][known]
    t0, t1 = float(t.min()), float(t.max())
    span = t1 - t0
    if span <= 0:
        return None
    bins = int(max(1, min(THROUGHPUT_BINS, rows.sum() // 10)))
    edges = np.linspace(t0, t1, bins + 1)
    width = span / bins
    row_hist, _ = np.histogram(t, bins=edges, weights=rows.astype(np.float64))
    tok_hist, _ = np.histogram(t, bins=edges, weights=tok.astype(np.float64))
    return Throughput(run.number, t0, width, row_hist / width, tok_hist / width, "finished_at")


def _throughput_from_commits(run: RunInfo) -> Throughput | None:
    """Without per-row finish times: rows per second between consecutive part commits (whole seconds)."""
    stamps = [(_parse_time(p.committed_at), p) for p in run.parts]
    stamps = [(t, p) for t, p in stamps if t is not None]
    if len(stamps) < 2:
        return None
    t0 = stamps[0][0] or 0.0
    rates_rows, rates_tok = [], []
    for (ta, _), (tb, p) in zip(stamps, stamps[1:]):
        dt = max((tb or 0.0) - (ta or 0.0), 1.0)
        rates_rows.append(p.rows / dt)
        rates_tok.append(np.nan)
    width = ((stamps[-1][0] or 0.0) - t0) / max(1, len(rates_rows))
    return Throughput(run.number, t0, max(width, 1.0), np.array(rates_rows), np.array(rates_tok), "committed_at")


# The output formats whose parts this module reads (the built-in writers').
READABLE_FORMATS = ("parquet", "jsonl", "openai-batch")


class UnreadableFormatError(ValueError):
    """An output written by a plugin's writer, in a format this module cannot read."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except (pa.ArrowException, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedOutputError(f"{path} is corrupt or truncated, not readable ({e})") from e


def locate_output(path: str | Path) -> tuple[Path, Path]:
    """(the output, its state folder). FileNotFoundError when ``path`` holds no output of this tool: no state
    folder beside it and no part files in it (any other folder, or the folder above several outputs)."""
    out = Path(path)
    state = find_state_dir(out)
    if state.is_dir() or (out.is_dir() and any(PART_RE.match(p.name) for p in out.iterdir())):
        return out, state
    if out.exists():
        raise FileNotFoundError(f"no forge-batch output at {out}: no part files in it and no state folder "
                                f"{state.name} beside it")
    raise FileNotFoundError(f"no output directory at {out}")


def collect_output_stats(path: str | Path) -> OutputStats:
    """Scan an output directory (see the module docstring); raises FileNotFoundError if it is not one, and
    DamagedOutputError naming the first part that cannot be read."""
    out, state = locate_output(path)
    manifest = read_state_json(state / MANIFEST) or {}
    summary = read_state_json(state / SUMMARY)
    parts = part_files(parts_dir_for(out))
    output_format = manifest.get("output_format") or _sniff_format(parts)
    if parts and output_format not in READABLE_FORMATS:  # a plugin's writer: its parts are in a format only it knows
        raise UnreadableFormatError(f"{out} holds {output_format} parts (a plugin's writer): report reads "
                                    f"{', '.join(READABLE_FORMATS)} outputs (forge-batch inspect summarises any)")
    job = manifest.get("job")
    schema = schema_from_str(manifest["schema"]) if manifest.get("schema") else None
    if output_format == "openai-batch":
        id_column = "custom_id"
    elif schema is not None:
        id_column = schema.names[0]
    elif isinstance(job, dict):
        id_column = id_column_name((job.get("input") or {}).get("id_field"))
    else:
        id_column = "id"
    scanner = _PartScanner(output_format, id_column, schema)
    if job is None and parts:
        with _reading(parts[0]):
            job = scanner.job_of(parts[0])

    committed = {p.get("file"): p for p in manifest.get("parts") or [] if p.get("file")}
    agg = _Aggregator(id_column)
    infos: list[PartInfo] = []
    for p in parts:
        entry = committed.get(p.name) or {}
        with _reading(p):
            info = PartInfo(p.name, committed_at=entry.get("committed_at"), engine=scanner.engine_of(p),
                            record_offset=agg.n_time_records)
            for batch in scanner.scan(p):
                agg.add(batch, info)
        infos.append(info)

    status, notes = run_status(summary, manifest, infos)
    engine = manifest.get("engine") or (summary or {}).get("engine")
    if engine is None and infos and infos[-1].engine:
        engine = json.loads(infos[-1].engine)
    if output_format == "openai-batch":
        notes.append("OpenAI batch output carries no per-row TTFT, latency or `valid`; times are the requests' `created` second")
    stats = OutputStats(
        path=out, output_format=output_format, manifest=manifest, summary=summary, status=status, job=job, engine=engine,
        id_column=id_column, parts=infos, notes=notes,
    )
    stats.records, stats.rows, stats.failed_records = agg.records, agg.rows, agg.failed
    stats.prompt_tokens, stats.completion_tokens = agg.prompt_tokens, agg.completion_tokens
    stats.finish_reasons, stats.error_kinds, stats.valid = agg.finish, agg.kinds, agg.valid
    stats.error_examples = agg.examples
    stats.per_sample = agg.per_sample()
    counts = agg.per_row_count[agg.per_row_count > 0]
    stats.samples_per_row = Counter({int(k): int(v) for k, v in zip(*np.unique(counts, return_counts=True))})
    stats.ttft_s = Distribution.of(_cat(agg.ttft, np.float32))
    stats.latency_s = Distribution.of(_cat(agg.latency, np.float32))
    stats.prompt_len = Distribution.of(_cat(agg.prompt_len, np.int32))
    stats.completion_len = Distribution.of(_cat(agg.completion_len, np.int32))

    stats.runs = _runs_from_log(infos, read_run_log(state / RUN_LOG)) or _split_runs(infos, manifest, summary)
    times, is_row, tokens = _cat(agg.times, np.int64), _cat(agg.is_row, bool), _cat(agg.time_tokens, np.int32)
    for k, run in enumerate(stats.runs):
        if not run.parts:
            continue
        later = [r.parts[0].record_offset for r in stats.runs[k + 1:] if r.parts]
        end = later[0] if later else agg.n_time_records
        series = _throughput(run, times, is_row, tokens, end) or _throughput_from_commits(run)
        if series is not None:
            stats.throughput.append(series)
    return stats


def run_status(summary: dict[str, Any] | None, manifest: dict[str, Any], parts: list[PartInfo]) -> tuple[str, list[str]]:
    """The run's status, saying so when the summary is missing or older than the parts (a run in progress,
    or one that was killed before it could write its summary)."""
    if summary is None:
        if parts or manifest:
            return "in progress (or killed): no summary.json yet", []
        return "empty: nothing committed yet", []
    done = _parse_time(summary.get("finished_at"))
    newest = max((t for t in (_parse_time(p.committed_at) for p in parts) if t is not None), default=None)
    updated = _parse_time(manifest.get("updated_at"))
    later = max((t for t in (newest, updated) if t is not None), default=None)
    if done is not None and later is not None and later > done + 1.0:
        return (
            "in progress (or killed): parts were committed after summary.json",
            [f"summary.json ({summary.get('status')}) is from an earlier run; counts below are from the parts"],
        )
    return str(summary.get("status") or "unknown"), []
