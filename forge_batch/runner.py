"""The job runner: reader -> prepare hooks -> engine -> result hooks -> writer, resumable and bounded.

Rows are read lazily in batches and turned into requests one at a time as the engine asks for them
(``generate_stream`` keeps at most ``engine.max_in_flight`` unfinished), results are written as they finish,
and a part file is committed every ``output.rows_per_file`` rows or ``output.flush_seconds`` seconds. So a
job over millions of rows runs in bounded memory and an interruption costs at most one part's work.

Nothing lost, nothing twice:

* every committed sample is in the run's ledger (``ledger/`` in the output's state folder); a rerun skips committed ids and
  only generates the rest;
* every row's seed derives from the job seed and the row id (:func:`row_seed`), so a resumed run writes
  what an uninterrupted one would;
* a bad row (malformed JSON, missing or empty prompt, duplicate id, prompt longer than the context, template
  error, a plugin that raised) is written with an ``error`` naming the problem, never skipped, never fatal;
  ``max_error_rate`` turns a flood of them into a failed run.

Ctrl-C / SIGTERM stop admitting rows and let in-flight ones finish (a second signal, or ``grace_seconds``
later, drops them), commit what is done and exit non-zero saying how to resume.

The engine is injected: ``engine_factory(job, samplers=..., constraints=...)`` returns an object with
``generate_stream``, ``stats``, ``tokenizer`` and ``max_model_len`` (:class:`forge_batch.LLM` by default).
``FORGE_BATCH_ENGINE_FACTORY=module:function`` swaps it from the environment; the test-suite uses that to run
``forge-batch`` subprocesses on a fake engine, and it is the door for an out-of-process engine.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import importlib
import inspect
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pyarrow as pa

from forge_batch.contract import (
    DropResult,
    RawRow,
    Reader,
    RowError,
    RunContext,
    SkipRow,
    WriteContext,
    Writer,
)
from forge_batch.io.meta import file_metadata, tool_version
from forge_batch.io.output_dir import SUMMARY, CommitError, OutputDir, ResumeState, Tally, describe_os_error
from forge_batch.io.progress import Progress
from forge_batch.io.remote import file_size, open_binary
from forge_batch.io.schema import (
    id_column_name,
    infer_type,
    normalize_id_type,
    output_schema,
    records_to_table,
)
from forge_batch.job import (
    InputSpec,
    JobError,
    JobSpec,
    Problem,
    check_job,
    compile_template,
    effective_input,
    input_files,
    reader_for_file,
)
from forge_batch.models.registry import content_digest
from forge_batch.plugin_manager import (
    PluginHookError,
    call_impl,
    collect_registry,
    get_plugin_manager,
    iter_impls,
)

ENGINE_FACTORY_ENV = "FORGE_BATCH_ENGINE_FACTORY"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

# Rows that failed only after this many failures may abort a run early (see JobRunner._check_error_rate).
EARLY_ABORT_MIN_FAILURES = 100


# What an engine must keep for a resumed run to write what the interrupted one would have: each of these
# can change a row's tokens (the model's content, not its name; the resolved dtype, not "auto").
ENGINE_IDENTITY = ("model_digest", "device", "dtype", "quantization", "max_model_len", "kernel_path")


def input_identity(files: list[str]) -> dict[str, Any]:
    """The input's identity for resume: its files' names and sizes (to describe) and content digest (to
    compare: the same rows moved to another path still resume, other rows under the same name do not)."""
    return {
        "files": [os.path.basename(f) for f in files],
        "bytes": sum(file_size(f) for f in files),
        "digest": content_digest(files, open_file=open_binary, size_of=file_size),
    }


def row_seed(job_seed: int, key: str) -> int:
    """The seed of one row: a stable 63-bit hash of the job seed and the row's id (``key``).

    Stable across processes and Python versions (no ``hash()``), and independent of the order rows reach
    the engine, so a resumed or re-ordered run samples exactly the same tokens for a row."""
    digest = hashlib.blake2b(f"{job_seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def default_engine_factory(job: JobSpec, *, samplers: dict[str, Any], constraints: dict[str, Any]) -> Any:
    """Build :class:`forge_batch.LLM` from the job's ``model`` and ``engine`` options.

    Options the engine does not take (an older or different engine) are dropped rather than crashing."""
    from forge_batch.engine.llm import LLM

    kwargs: dict[str, Any] = job.engine.llm_kwargs()
    kwargs["seed"] = job.sampling.seed
    kwargs["samplers"] = samplers
    if constraints:
        kwargs["constraints"] = constraints
    params = inspect.signature(LLM).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return LLM(job.model_ref(), **kwargs)


def load_engine_factory(spec: str) -> Callable[..., Any]:
    """``"package.module:function"`` -> the function."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{ENGINE_FACTORY_ENV} must look like package.module:function, got {spec!r}")
    return getattr(importlib.import_module(module), attr)




@dataclass
class RunResult:
    """The outcome of a run: ``status`` is ``completed``, ``failed`` or ``interrupted``."""

    status: str
    exit_code: int
    message: str
    summary: dict[str, Any]
    output_dir: Path
    summary_path: Path | None = None


class RunInterrupted(Exception):
    """Ctrl-C / SIGTERM arrived before generation started (reading the input, loading the model): nothing was
    committed by this run. ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Abort(BaseException):
    """Raised by the signal handler to leave the engine loop now (dropping in-flight rows)."""


class _StartInterrupted(BaseException):
    """Raised by the signal handler before generation starts (a BaseException, so that an engine loader's
    ``except Exception`` cannot swallow it)."""

    def __init__(self, signal_name: str, phase: str) -> None:
        super().__init__(signal_name, phase)
        self.signal_name = signal_name
        self.phase = phase


@dataclass
class _Group:
    """All samples of one finished request, waiting to be committed."""

    records: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    row_status: str
    row_kind: str | None


def _has_chat_template(tokenizer: Any) -> bool:
    if tokenizer is None:
        return False
    ct = getattr(tokenizer, "chat_template", None)
    if ct is not None:
        return bool(ct)
    if not hasattr(tokenizer, "apply_chat_template"):
        return False
    try:
        return isinstance(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True), str)
    except Exception:
        return False


def _classify_engine_error(message: str) -> str:
    m = message.lower()
    if m.startswith("logits processor"):  # a plugin's processor raised for this row (the engine's wording)
        return "plugin_error"
    if "too long" in m or "context" in m or "max_model_len" in m:
        return "prompt_too_long"
    if "empty" in m:
        return "empty_prompt"
    if m.startswith("constraint"):
        return "constraint_error"
    return "engine_error"


class JobRunner:
    """Runs one job. ``run()`` returns a :class:`RunResult`; it raises only for problems before the first
    row (invalid job, unusable output directory, engine that cannot load).

    ``progress``: ``auto`` (bar on a terminal, log lines otherwise), ``bar``, ``log`` or ``none``.
    ``overwrite`` discards committed parts instead of resuming. ``grace_seconds`` bounds how long in-flight
    rows may finish after the first Ctrl-C / SIGTERM."""

    def __init__(
        self,
        job: JobSpec,
        *,
        engine_factory: Callable[..., Any] | None = None,
        plugin_manager: Any = None,
        progress: str = "auto",
        quiet: bool = False,
        overwrite: bool = False,
        force_resume: bool = False,
        grace_seconds: float = 30.0,
        install_signal_handlers: bool = True,
        stream: TextIO | None = None,
        log_interval: float = 10.0,
    ) -> None:
        self.job = job
        if engine_factory is None:
            env_spec = os.environ.get(ENGINE_FACTORY_ENV)
            engine_factory = load_engine_factory(env_spec) if env_spec else default_engine_factory
        self.engine_factory = engine_factory
        self.pm = plugin_manager
        self.progress_mode = "none" if quiet else progress
        self.quiet = quiet
        self.overwrite = overwrite
        self.force_resume = force_resume
        self.grace_seconds = grace_seconds
        self.install_signal_handlers = install_signal_handlers
        self.stream = stream or sys.stderr
        self.log_interval = log_interval

        # What the run is doing before generation starts (None once it has): a signal then stops it at once.
        self._starting: str | None = "preparing the run"
        self._stop_admitting = False
        self._signal_name: str | None = None
        self._signals = 0
        self._critical = 0
        self._drop_now = False
        self._abort_reason: str | None = None
        self._buffer: list[_Group] = []
        self._buffer_records = 0
        self._last_commit = time.monotonic()
        self._seen: dict[Any, int] = {}
        self._pending = Tally()
        self._run_tally = Tally()
        self._finished_rows = 0
        self._in_flight = 0

    # ---- messages -------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.quiet:
            return
        if getattr(self, "progress", None) is not None and self.progress.mode == "bar":
            self.progress.message(text)
        else:
            print(text, file=self.stream, flush=True)

    # ---- setup ----------------------------------------------------------------------------------------
    def _plan_inputs(self, readers: dict[str, Reader]) -> list[tuple[str, Reader]]:
        files = input_files(self.job.input.path)
        plan = []
        for f in files:
            fmt = reader_for_file(f, readers, self.job.input.format)  # the one validate read the first rows with
            if fmt is None:
                raise JobError([Problem("input.format", f"cannot tell the format of {f}; set input.format")])
            plan.append((f, readers[fmt]))
        return plan

    def _effective_input(self, reader: Reader | None) -> InputSpec:
        return effective_input(self.job.input, reader)

    def _batches(self, plan: list[tuple[str, Reader]], spec: InputSpec) -> Iterator[list[RawRow]]:
        for path, reader in plan:
            yield from reader.read(path, spec)

    def _total_rows(self, plan: list[tuple[str, Reader]], spec: InputSpec) -> int | None:
        total = 0
        for path, reader in plan:
            try:
                n = reader.count(path, spec)
            except Exception:
                n = None
            if n is None:
                return None
            total += n
        if spec.limit is not None:
            total = min(total, spec.limit)
        return total

    def _build_schema(self, first: list[RawRow], plan: list[tuple[str, Reader]], spec: InputSpec) -> pa.Schema:
        in_schema = plan[0][1].schema(plan[0][0]) if plan else None
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
        for name in self.job.output.keep_fields:
            if in_schema is not None and name in in_schema.names:
                keep.append((name, in_schema.field(name).type))
            else:
                keep.append((name, infer_type(r.get(name) for r in rows)))
        return output_schema(spec.id_field, id_type, keep, self.job.output.include_prompt)

    # ---- rows -> requests -----------------------------------------------------------------------------
    def _normalize_id(self, value: Any) -> Any:
        """The id as stored in the id column (int for an int64 column, text otherwise); raises RowError."""
        if pa.types.is_integer(self.id_type):
            if isinstance(value, bool) or not isinstance(value, int):
                raise RowError(f"id {value!r} is not an integer like the other ids of this input", "bad_id")
            return value
        if isinstance(value, (dict, list)):
            raise RowError(f"id must be text or a number, got {type(value).__name__}", "bad_id")
        return value if isinstance(value, str) else str(value)

    def _requests(self, batches: Iterator[list[RawRow]]) -> Iterator[Any]:
        """The lazy stream of requests the engine pulls from (bad rows become failed requests)."""
        row_index = -1
        limit = self.spec.limit
        for batch in batches:
            for raw in batch:
                if self._stop_admitting:
                    return
                row_index += 1
                if limit is not None and row_index >= limit:
                    return
                try:
                    req = self._make_request(row_index, raw)
                except Exception as e:  # never let one row break the stream
                    req = self._error_request(row_index, None, raw.data, f"internal error preparing row: {type(e).__name__}: {e}", "internal_error")
                if req is not None:
                    self._in_flight += 1
                    yield req

    def _meta(self, row_index: int, id_value: Any, data: dict[str, Any] | None, n: int) -> dict[str, Any]:
        keep = {}
        if data is not None:
            for name in self.job.output.keep_fields:
                keep[name] = data.get(name)
        return {"row_index": row_index, "id": id_value, "keep": keep, "row": data or {}, "n": n}

    def _error_request(self, row_index: int, id_value: Any, data: dict[str, Any] | None, message: str, kind: str, n: int | None = None) -> Any:
        from forge_batch.engine.request import GenerationRequest
        from forge_batch.engine.sampling_params import SamplingParams

        n = n or self.job.sampling.n
        meta = self._meta(row_index, id_value, data, n)
        meta["error_kind"] = kind
        return GenerationRequest(
            request_id=f"r{row_index}", params=SamplingParams(n=n, max_tokens=1), error=message, metadata={"_forge": meta}
        )

    def _make_request(self, row_index: int, raw: RawRow) -> Any:
        from forge_batch.engine.request import GenerationRequest
        from forge_batch.engine.sampling_params import SamplingParams

        spec = self.spec
        data = raw.data
        # -- identity, resume and duplicates
        id_value: Any = None
        id_problem: tuple[str, str] | None = None
        if spec.id_field is None:
            id_value = row_index
        elif data is not None:
            value = data.get(spec.id_field)
            if value is None:
                id_problem = (f"missing id: field {spec.id_field!r} is {'null' if spec.id_field in data else 'missing'}", "missing_id")
            else:
                try:
                    id_value = self._normalize_id(value)
                except RowError as e:
                    id_problem = (str(e), e.kind)
        if id_value is None:
            if row_index in self.resume.done_positions:
                return None
        elif id_value in self._seen:
            if row_index in self.resume.done_positions:
                return None
            first = self._seen[id_value]
            where = f"row {first}" if first >= 0 else "an earlier run"
            return self._error_request(row_index, id_value, data, f"duplicate id {id_value!r} (first seen at {where})", "duplicate_id")
        elif id_value in self.resume.done_ids:
            self._seen[id_value] = -1
            return None
        else:
            self._seen[id_value] = row_index
        if raw.error is not None or data is None:
            return self._error_request(row_index, id_value, data, raw.error or "unreadable row", raw.error_kind or "malformed_json")
        if id_problem is not None:
            return self._error_request(row_index, None, data, id_problem[0], id_problem[1])

        # -- sampling: job options, the row's overrides, the row's seed
        params_kw = dict(self._base_sampling)
        n = params_kw["n"]
        try:
            if spec.sampling_field is not None and data.get(spec.sampling_field) is not None:
                override = data[spec.sampling_field]
                if isinstance(override, str):
                    override = json.loads(override)
                if not isinstance(override, dict):
                    raise ValueError(f"must be a mapping, got {type(override).__name__}")
                unknown = sorted(set(override) - set(params_kw))
                if unknown:
                    raise ValueError(f"unknown sampling option(s) {unknown}")
                params_kw.update(override)
                n = int(params_kw.get("n") or 1)
                own_seed = override.get("seed") is not None
            else:
                own_seed = False
            if not own_seed:
                key = f"id:{id_value}" if spec.id_field is not None else f"row:{row_index}"
                params_kw["seed"] = row_seed(self.job.sampling.seed, key)
        except (TypeError, ValueError) as e:
            return self._error_request(row_index, id_value, data, f"bad sampling override in {spec.sampling_field!r}: {e}", "bad_sampling", n=max(1, n if isinstance(n, int) else 1))
        try:
            self._row_constraint(params_kw, data)
        except (TypeError, ValueError) as e:
            return self._error_request(row_index, id_value, data, str(e), "constraint_error", n=max(1, n if isinstance(n, int) else 1))
        try:
            params = SamplingParams(**params_kw)
        except (TypeError, ValueError) as e:
            return self._error_request(row_index, id_value, data, f"bad sampling options: {e}", "bad_sampling", n=max(1, n if isinstance(n, int) else 1))
        n = params.n
        meta = self._meta(row_index, id_value, data, n)
        constraint = getattr(params, "constraint_spec", None)
        if constraint is not None:
            meta["constraint"] = constraint
        request = GenerationRequest(request_id=f"r{row_index}", params=params, metadata={"_forge": meta})

        # -- plugins: prepare (built-in prompt building first), then logits processors
        ctx = self.context
        try:
            for impl in iter_impls(self.pm, "prepare_request"):
                result = call_impl(impl, "prepare_request", {"request": request, "row": data, "context": ctx})
                if result is not None:
                    request = result
            for impl in iter_impls(self.pm, "logits_processors"):
                procs = call_impl(impl, "logits_processors", {"request": request, "row": data, "context": ctx})
                if procs:
                    request.params.logits_processors.extend(procs)
        except SkipRow as e:
            return self._error_request(row_index, id_value, data, f"skipped: {e}", "skipped", n=n)
        except RowError as e:
            return self._error_request(row_index, id_value, data, str(e), e.kind, n=n)
        except PluginHookError as e:
            return self._error_request(row_index, id_value, data, str(e), "plugin_error", n=n)
        if "_forge" not in request.metadata:
            request.metadata["_forge"] = meta

        # -- tokens: render the chat template, tokenize, check the context length
        try:
            ids, text = self._tokenize(request)
        except RowError as e:
            return self._error_request(row_index, id_value, data, str(e), e.kind, n=n)
        except Exception as e:
            return self._error_request(row_index, id_value, data, f"cannot tokenize the prompt: {type(e).__name__}: {e}", "tokenize_error", n=n)
        if ids is not None:
            if not ids:
                return self._error_request(row_index, id_value, data, "empty prompt: it has no tokens", "empty_prompt", n=n)
            limit = self.context.max_model_len
            if limit is not None and len(ids) >= limit:
                return self._error_request(
                    row_index,
                    id_value,
                    data,
                    f"prompt too long: {len(ids)} tokens, the model's context (max_model_len) is {limit}, leaving no room to generate",
                    "prompt_too_long",
                    n=n,
                )
            request.prompt_token_ids = ids
        if self.job.output.include_prompt:
            meta["prompt_text"] = text
        return request

    def _tokenize(self, request: Any) -> tuple[list[int] | None, str | None]:
        tok = self.context.tokenizer
        prompt = request.prompt
        if request.prompt_token_ids is not None:
            text = prompt if isinstance(prompt, str) else None
            return list(request.prompt_token_ids), text
        if tok is None:
            return None, prompt if isinstance(prompt, str) else json.dumps(prompt)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise RowError("empty prompt", "empty_prompt")
            return list(tok.encode(prompt, add_special_tokens=True)), prompt
        if isinstance(prompt, list):
            text = tok.apply_chat_template(prompt, add_generation_prompt=True)
            return list(tok.encode(text, add_special_tokens=False)), text
        raise RowError(f"the prompt must be text or chat messages, got {type(prompt).__name__}", "bad_prompt")

    # ---- results -> records -----------------------------------------------------------------------------
    def _row_constraint(self, params_kw: dict[str, Any], data: dict[str, Any]) -> None:
        """Apply the row's own constraint from ``constraint.<kind>_field`` (a column), if it has one."""
        field = self.job.constraint.row_field() if self.job.constraint is not None else None
        if field is None:
            return
        kind, column = field
        value = data.get(column)
        if value is None or (isinstance(value, float) and value != value):  # null / NaN: job-wide or none
            return
        if kind in ("json_schema", "choice") and isinstance(value, str):  # JSON text in a string column
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"column {column!r} holds no valid {kind} (not JSON: {e})") from e
        for k in ("json_schema", "regex", "choice", "constraint"):
            params_kw[k] = None
        if kind in ("json_schema", "regex", "choice"):
            params_kw[kind] = value
        else:
            params_kw["constraint"] = {kind: value}

    def _group_for(self, out: Any) -> _Group:
        meta = (out.metadata or {}).get("_forge") or {}
        row = meta.get("row") or {}
        row_index = meta.get("row_index")
        id_value = meta.get("id")
        kind0 = meta.get("error_kind")
        metrics = out.metrics or {}
        arrival = metrics.get("arrival_time")
        first = metrics.get("first_token_time")
        done = metrics.get("finished_time")
        ttft = (first - arrival) if first is not None and arrival is not None else None
        latency = (done - arrival) if done is not None and arrival is not None else None
        now = _dt.datetime.now(_dt.timezone.utc)
        prompt_tokens = len(out.prompt_token_ids or [])
        base = {
            self.id_column: id_value,
            "row_index": row_index,
            **(meta.get("keep") or {}),
            "prompt_tokens": prompt_tokens,
            "ttft_s": ttft,
            "latency_s": latency,
            "finished_at": now,
        }
        if self.job.output.include_prompt:
            base["prompt"] = meta.get("prompt_text")
        records: list[dict[str, Any]] = []
        samples = list(out.samples or [])
        n = meta.get("n") or max(1, len(samples))
        if out.error is None and kind0 is None and not samples:
            out.error = "the engine returned no samples"
        if out.error is not None or kind0 is not None:
            message = out.error or "failed"
            kind = kind0 or _classify_engine_error(message)
            for i in range(n):
                records.append(
                    {**base, "sample_index": i, "text": None, "finish_reason": "skipped" if kind == "skipped" else "error",
                     "completion_tokens": 0, "error": message, "error_kind": kind}
                )
        else:
            for s in samples:
                err = s.error if s.finish_reason == "error" or s.error else None
                if s.finish_reason == "error" and not err:
                    err = "generation failed"
                records.append(
                    {**base, "sample_index": s.index, "text": None if err else s.text, "finish_reason": s.finish_reason,
                     "valid": getattr(s, "valid", None), "completion_tokens": len(s.token_ids or []), "error": err,
                     "error_kind": _classify_engine_error(err) if err else None}
                )
        # result hooks: validate / score / drop, one sample at a time
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for rec in records:
            if rec.get("error_kind") == "skipped":
                kept.append(rec)
                continue
            try:
                for impl in iter_impls(self.pm, "process_result"):
                    result = call_impl(impl, "process_result", {"record": rec, "output": out, "row": row, "context": self.context})
                    if isinstance(result, dict):
                        rec = result
            except DropResult:
                dropped.append(rec)
                continue
            except (PluginHookError, RowError) as e:
                kind = e.kind if isinstance(e, RowError) else "plugin_error"
                if rec.get("error"):
                    rec["error"] = f"{rec['error']}; also {e}"
                else:
                    rec["error"], rec["error_kind"], rec["text"] = str(e), kind, None
            if rec.get("error") and not rec.get("error_kind"):
                rec["error_kind"] = "invalid_output"
            kept.append(self._fold_extra(rec))
        if not kept and dropped:
            status, kind = "dropped", None
        elif any(r.get("error_kind") == "skipped" for r in kept):
            status, kind = "skipped", None
        else:
            failed = [r for r in kept if r.get("error")]
            status, kind = ("failed", failed[0].get("error_kind") or "error") if failed else ("ok", None)
        return _Group(kept, dropped, status, kind)

    def _fold_extra(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Keys a plugin added that are not output columns go to the ``extra`` JSON column."""
        extra = rec.get("extra")
        extra = dict(extra) if isinstance(extra, dict) else (json.loads(extra) if isinstance(extra, str) and extra else {})
        for k in [k for k in rec if k not in self.column_names]:
            extra[k] = rec.pop(k)
        rec["extra"] = json.dumps(extra, ensure_ascii=False, default=str, sort_keys=True) if extra else None
        return rec

    def _ledger_rows(self, group: _Group) -> list[dict[str, Any]]:
        rows = []
        for rec, status in [(r, "error" if r.get("error") else "ok") for r in group.records] + [(r, "dropped") for r in group.dropped]:
            if rec.get("error_kind") == "skipped":
                status = "skipped"
            rows.append(
                {
                    "id": rec.get(self.id_column),
                    "row_index": rec["row_index"],
                    "sample_index": rec.get("sample_index") or 0,
                    "status": status,
                    "error_kind": rec.get("error_kind"),
                    "row_status": group.row_status,
                    "prompt_tokens": rec.get("prompt_tokens") or 0,
                    "completion_tokens": rec.get("completion_tokens") or 0,
                }
            )
        # the row's sample 0 must exist in the ledger (it carries the row's status)
        if rows and not any(r["sample_index"] == 0 for r in rows):
            rows[0]["sample_index"] = 0
        return rows

    # ---- committing -------------------------------------------------------------------------------------
    def _commit(self) -> None:
        if not self._buffer:
            return
        self._critical += 1
        try:
            groups, self._buffer = self._buffer, []
            self._buffer_records = 0
            records = [r for g in groups for r in g.records]
            table = records_to_table(records, self.schema) if records else None
            if table is not None and any(r.get("error_kind") == "type_mismatch" for r in records):
                for g in groups:  # a coerced value may have failed a row
                    if g.row_status == "ok" and any(r.get("error") for r in g.records):
                        g.row_status, g.row_kind = "failed", "type_mismatch"
            ledger = [e for g in groups for e in self._ledger_rows(g)]
            index = self._next_part
            self._next_part += 1
            ctx = WriteContext(job=self.job, metadata=self.file_meta, part_index=index, id_column=self.id_column)
            write = (lambda path: self.writer.write_part(table, path, ctx)) if table is not None else None
            tally = Tally()
            tally.add_ledger(ledger)
            try:
                self.out.commit_part(index, write, ledger, self.id_type, stats={"rows": tally.rows, "rows_failed": tally.rows_failed})
            except CommitError as e:
                self._pending = Tally()  # these rows are not committed: a resume generates them again
                if e.committed:
                    self._run_tally = self._run_tally.merged(tally)
                raise
            self._run_tally = self._run_tally.merged(tally)
            self._pending = Tally()
            self._last_commit = time.monotonic()
        finally:
            self._critical -= 1

    def _should_commit(self) -> bool:
        if not self._buffer:
            return False
        if self._buffer_records >= self.job.output.rows_per_file:
            return True
        return time.monotonic() - self._last_commit >= self.job.output.flush_seconds

    # ---- error budget -----------------------------------------------------------------------------------
    def _failed_rows(self) -> tuple[int, int]:
        t = self.resume.tally
        failed = t.rows_failed + self._run_tally.rows_failed + self._pending.rows_failed
        rows = t.rows + self._run_tally.rows + self._pending.rows
        return failed, rows - (t.rows_skipped + self._run_tally.rows_skipped + self._pending.rows_skipped)

    def _check_error_rate(self) -> None:
        """Stop early once the run can no longer pass: more rows failed than the budget allows even if every
        remaining row succeeds (only when the input size is known and after a minimum number of failures, so
        a small job always runs to the end and reports all its bad rows)."""
        if self._stop_admitting or self.total is None:
            return
        failed, _ = self._failed_rows()
        if failed >= EARLY_ABORT_MIN_FAILURES and failed > self.job.max_error_rate * self.total:
            self._abort_reason = "error_rate"
            self._stop_admitting = True
            self._say(
                f"forge-batch: {failed} rows failed, more than max_error_rate {self.job.max_error_rate:g} of {self.total} rows; "
                "stopping (in-flight rows finish and are committed)"
            )

    # ---- signals ----------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._starting is not None and signum in (signal.SIGINT, signal.SIGTERM):
            raise _StartInterrupted(signal.Signals(signum).name, self._starting)
        name = signal.Signals(signum).name if signum != getattr(signal, "SIGALRM", -1) else "grace timeout"
        self._signals += 1
        if self._signals == 1 and signum != getattr(signal, "SIGALRM", -1):
            self._signal_name = name
            self._stop_admitting = True
            self._say(
                f"forge-batch: {name}: admitting no new rows; finishing {self._in_flight} in-flight rows "
                f"(up to {self.grace_seconds:g}s; signal again to stop now)"
            )
            if hasattr(signal, "SIGALRM") and self.grace_seconds > 0:
                signal.setitimer(signal.ITIMER_REAL, self.grace_seconds)
            return
        self._signal_name = self._signal_name or name
        self._stop_admitting = True
        self._drop_now = True
        if self._critical == 0:
            raise _Abort()

    def _install_signals(self) -> dict[int, Any]:
        import threading

        old: dict[int, Any] = {}
        if not self.install_signal_handlers or threading.current_thread() is not threading.main_thread():
            return old
        for sig in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGALRM", None)):
            if sig is None:
                continue
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    def _restore_signals(self, old: dict[int, Any]) -> None:
        if hasattr(signal, "SIGALRM") and old:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in old.items():
            signal.signal(sig, handler)

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Run the job to completion, failure or interruption (see the module docstring).

        Raises :class:`RunInterrupted` for Ctrl-C / SIGTERM before generation started."""
        self._old_handlers = self._install_signals()
        try:
            return self._run()
        except _StartInterrupted as e:
            code = EXIT_TERMINATED if e.signal_name == "SIGTERM" else EXIT_INTERRUPTED
            raise RunInterrupted(
                f"interrupted by {e.signal_name} while {e.phase}; nothing was committed this run; "
                "rerun the same command to resume", code,
            ) from None
        finally:
            self._restore_signals(self._old_handlers)  # again after generation's: a no-op then

    def _run(self) -> RunResult:
        t_start = time.monotonic()
        started_at = _dt.datetime.now(_dt.timezone.utc)
        job = self.job
        if self.pm is None:
            self.pm = get_plugin_manager(job.plugins, search_paths=job.plugin_search_paths())
        problems = check_job(job, self.pm, check_model=self.engine_factory is default_engine_factory)
        if problems:
            raise JobError(problems)
        readers = collect_registry(self.pm, "register_readers")
        writers = collect_registry(self.pm, "register_writers")
        self.writer: Writer = writers[job.output.format]
        plan = self._plan_inputs(readers)
        self.spec = self._effective_input(plan[0][1] if plan else None)
        self.id_column = id_column_name(self.spec.id_field)

        self.out = OutputDir(job.output.path, self.writer.extension, single_file=job.output.single_file())
        job_json = job.model_dump(mode="json")
        self.resume: ResumeState = self.out.open(job.fingerprint(), job_json, job.output.format, overwrite=self.overwrite)
        try:
            self.out.check_identity("input", input_identity([f for f, _ in plan]), compare=("digest",), force=self.force_resume)
            return self._run_locked(t_start, started_at, plan, readers)
        finally:
            self.out.close()

    def _run_locked(self, t_start: float, started_at: _dt.datetime, plan: list[tuple[str, Reader]], readers: dict[str, Reader]) -> RunResult:
        job = self.job
        self.total = self._total_rows(plan, self.spec)
        batches = self._batches(plan, self.spec)
        first = next(batches, [])
        if self.resume.schema is not None:
            schema = self.resume.schema
        else:
            schema = self._build_schema(first, plan, self.spec)
        self.schema = schema
        self.column_names = set(self.schema.names)
        self.id_type = self.schema.field(self.id_column).type
        self.out.set_schema(schema)
        self._next_part = self.resume.next_part
        self._base_sampling = job.sampling_dict()
        resumed_rows = self.resume.tally.rows
        # from here on the engine is being built (the samplers and constraints are the engine's too)
        self._starting = "loading the model"
        if resumed_rows:
            self._say(f"forge-batch: resuming {job.output.path}: {resumed_rows} rows already committed, skipping them")

        samplers = collect_registry(self.pm, "register_samplers")
        constraints = collect_registry(self.pm, "register_constraints")
        t_load = time.monotonic()
        engine = self.engine_factory(job, samplers=samplers, constraints=constraints)
        self._starting = "starting generation"
        load_s = time.monotonic() - t_load
        engine_info = getattr(engine, "engine_info", None)
        if engine_info is not None:
            self.out.check_identity("engine", engine_info, compare=ENGINE_IDENTITY, force=self.force_resume)
        self.file_meta = file_metadata(job, engine_info)
        self.schema = schema.with_metadata({k.encode(): v.encode() for k, v in self.file_meta.items()})
        job_constraint = job.job_constraint()
        compile_constraint = getattr(engine, "compile_constraint", None)
        if job_constraint is not None and compile_constraint is not None:
            # A job-wide constraint that cannot compile would fail every row: fail the job before generating.
            try:
                compile_constraint(*job_constraint)
            except Exception as e:
                where = "constraint" if job.constraint is not None else f"sampling.{job_constraint[0]}"
                raise JobError([Problem(where, f"cannot compile the {job_constraint[0]} constraint: {e}")]) from e
        tokenizer = getattr(engine, "tokenizer", None)
        chat = job.input.apply_chat_template if job.input.apply_chat_template is not None else _has_chat_template(tokenizer)
        self.context = RunContext(
            job=job,
            input=self.spec,
            plugin_manager=self.pm,
            output_dir=Path(job.output.path),
            engine=engine,
            tokenizer=tokenizer,
            max_model_len=getattr(engine, "max_model_len", None),
            chat=bool(chat),
            template=compile_template(self.spec.template) if self.spec.template is not None else None,
            resumed_rows=resumed_rows,
        )
        for impl in iter_impls(self.pm, "job_start"):
            call_impl(impl, "job_start", {"job": job, "context": self.context})

        self.progress = Progress(
            self.total, initial=resumed_rows, mode=self.progress_mode, stream=self.stream, log_interval=self.log_interval,
            desc=job.display_name(),
        )
        max_in_flight = job.engine.max_in_flight or (2 * job.engine.max_num_seqs if job.engine.max_num_seqs else None)
        status, error_message = "completed", None
        commit_error: CommitError | None = None
        t_gen = time.monotonic()
        stream = None
        # From here a first signal lets in-flight rows finish (see _on_signal); run() installed the handlers.
        self._starting = None
        try:
            stream = engine.generate_stream(self._requests(_chain([first], batches)), max_in_flight=max_in_flight)
            for out in stream:
                group = self._group_for(out)
                self._critical += 1
                self._buffer.append(group)
                self._buffer_records += len(group.records)
                self._in_flight -= 1
                self._finished_rows += 1
                self._pending.add_ledger(self._ledger_rows(group))
                self._critical -= 1
                self.progress.update(1, sum(r.get("completion_tokens") or 0 for r in group.records), getattr(engine, "stats", None))
                if self._should_commit():
                    self._commit()
                self._check_error_rate()
                if self._drop_now:
                    raise _Abort()
        except (_Abort, KeyboardInterrupt):
            self._drop_now = True
            self._stop_admitting = True
            self._signal_name = self._signal_name or "SIGINT"
        except CommitError as e:
            commit_error = e
        except Exception as e:  # the engine or a reader broke: keep what is done, say how to resume
            status = "failed"
            error_message = f"run stopped by an error: {type(e).__name__}: {e}"
        finally:
            if stream is not None and hasattr(stream, "close"):
                try:
                    stream.close()
                except BaseException:  # noqa: BLE001 - closing a broken generator must not mask the result
                    pass
            self._critical += 1
            try:
                self._commit()
            except CommitError as e:
                commit_error = commit_error or e
            finally:
                self._critical -= 1
                self._restore_signals(self._old_handlers)
                self.progress.close()
        gen_s = time.monotonic() - t_gen

        # -- outcome
        failed, counted = self._failed_rows()
        total_tally = self.resume.tally.merged(self._run_tally)
        resume_hint = "rerun the same command to resume (committed rows are skipped)"
        if commit_error is not None:  # before a signal: the rows it held are lost until a resume
            status = "failed"
            if commit_error.errno in (errno.ENOSPC, errno.EDQUOT):
                resume_hint = f"free some space, then {resume_hint}"
            message = f"{commit_error}; committed {self._run_tally.rows} rows this run (earlier parts are intact); {resume_hint}"
            exit_code = EXIT_FAILED
        elif self._signal_name is not None:
            status = "interrupted"
            dropped = "dropped in-flight rows" if self._drop_now else "finished in-flight rows"
            message = f"interrupted by {self._signal_name or 'a signal'}: {dropped}, committed {self._run_tally.rows} rows this run; {resume_hint}"
            exit_code = EXIT_TERMINATED if self._signal_name == "SIGTERM" else EXIT_INTERRUPTED
        elif status == "failed":
            message = f"{error_message}; committed {self._run_tally.rows} rows this run; {resume_hint}"
            exit_code = EXIT_FAILED
        elif counted and failed / counted > job.max_error_rate:
            status = "failed"
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(total_tally.failed_by_kind.items()))
            stopped = " (stopped early)" if self._abort_reason == "error_rate" else ""
            message = (
                f"{failed} of {counted} rows failed ({100 * failed / counted:.1f}%), more than max_error_rate "
                f"{job.max_error_rate:g}{stopped}: {kinds}. The error column of each row says what is wrong; fix the input "
                f"(and rerun with --overwrite) or raise max_error_rate (--set max_error_rate=...)"
            )
            exit_code = EXIT_FAILED
        else:
            message = f"completed: {total_tally.rows} rows"
            exit_code = EXIT_OK
        if self.out.single_file:
            every_row_done = commit_error is None and self._signal_name is None and error_message is None and self._abort_reason is None
            status, exit_code, message = self._write_single_file(every_row_done, status, exit_code, message)

        wall = time.monotonic() - t_start
        run_t = self._run_tally
        summary: dict[str, Any] = {
            "status": status,
            "message": message,
            "job": job.display_name(),
            "model": job.model,
            "engine": engine_info,
            "output": str(job.output.path),
            "output_format": job.output.format,
            "tool_version": tool_version(),
            **total_tally.to_dict(),
            "input_rows": self.total,
            "error_rate": (failed / counted) if counted else 0.0,
            "max_error_rate": job.max_error_rate,
            "resumed_rows": resumed_rows,
            "parts": len(self.out.part_files()),
            "this_run": {
                **run_t.to_dict(),
                "wall_time_s": round(wall, 3),
                "engine_load_s": round(load_s, 3),
                "generation_s": round(gen_s, 3),
                "rows_per_s": round(run_t.rows / gen_s, 3) if gen_s > 0 else 0.0,
                "output_tokens_per_s": round(run_t.completion_tokens / gen_s, 3) if gen_s > 0 else 0.0,
            },
            "wall_time_s": round(wall, 3),
            "throughput": {
                "rows_per_s": round(run_t.rows / gen_s, 3) if gen_s > 0 else 0.0,
                "output_tokens_per_s": round(run_t.completion_tokens / gen_s, 3) if gen_s > 0 else 0.0,
            },
            "started_at": started_at.isoformat(timespec="seconds"),
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for impl in iter_impls(self.pm, "job_end"):
            try:
                call_impl(impl, "job_end", {"job": job, "context": self.context, "summary": summary})
            except PluginHookError as e:
                self._say(f"forge-batch: warning: {e}")
        summary_path: Path | None
        try:
            summary_path = self.out.write_summary(summary)
        except OSError as e:  # e.g. the disk filled up with the last part: the parts are fine, say so
            summary_path = None
            note = f"could not write {self.out.state_dir / SUMMARY}: {describe_os_error(e)}"
            if status == "completed":
                status, exit_code = "failed", EXIT_FAILED
                message = f"{message} and committed, but {note}; free some space and rerun the same command to write it"
            else:
                message = f"{message}; also {note}"
            summary.update(status=status, message=message)
        return RunResult(status, exit_code, message, summary, Path(job.output.path), summary_path)


    def _write_single_file(self, every_row_done: bool, status: str, exit_code: int, message: str) -> tuple[str, int, str]:
        """A single-file output (``results.jsonl``) is written when every row is committed; until then its
        parts wait in the state folder. Returns the run's (status, exit code, message), amended."""
        path = self.job.output.path
        if not every_row_done:
            return status, exit_code, f"{message}; {path} is written once every row is done"
        try:
            self.out.finalize()
        except (OSError, ValueError) as e:
            reason = describe_os_error(e) if isinstance(e, OSError) else str(e)
            return "failed", EXIT_FAILED, f"{message}, but {path} could not be written: {reason}; rerun the same command to write it"
        return status, exit_code, message


def _chain(first: list[list[RawRow]], rest: Iterator[list[RawRow]]) -> Iterator[list[RawRow]]:
    yield from first
    yield from rest


def format_summary(summary: dict[str, Any]) -> str:
    """The human summary printed at the end of a run (and by ``forge-batch inspect``)."""
    kinds = summary.get("failed_by_kind") or {}
    kind_text = f" ({', '.join(f'{k} {v}' for k, v in kinds.items())})" if kinds else ""
    lines = [
        f"forge-batch: {summary.get('status', '?')} - {summary.get('output')}",
        f"  rows:       {summary.get('rows_ok', 0):,} ok, {summary.get('rows_failed', 0):,} failed{kind_text}, "
        f"{summary.get('rows_skipped', 0):,} skipped, {summary.get('rows_dropped', 0):,} dropped"
        + (f"  [{summary['resumed_rows']:,} from earlier runs]" if summary.get("resumed_rows") else ""),
        f"  tokens:     {summary.get('prompt_tokens', 0):,} prompt, {summary.get('completion_tokens', 0):,} completion",
    ]
    tp = summary.get("throughput") or {}
    if tp:
        lines.append(
            f"  throughput: {tp.get('rows_per_s', 0):,.2f} rows/s, {tp.get('output_tokens_per_s', 0):,.1f} output tok/s; "
            f"wall time {summary.get('wall_time_s', 0):,.1f} s"
        )
    if summary.get("status") != "completed" and summary.get("message"):
        lines.append(f"  {summary['message']}")
    return "\n".join(lines)

