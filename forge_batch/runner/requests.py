"""Rows -> engine requests: the row's id (resume, duplicates), its sampling options (the job's, the row's
overrides and constraint, its own seed), the prepare hooks that build the prompt, and its token ids.

A row that cannot run becomes a request that already carries its error (and kind), so that it flows
through the engine's stream like any other and is written in its place: never skipped, never fatal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from forge_batch.contract import DropResult, ErrorKind, RawRow, RowError, RunContext, SkipRow
from forge_batch.engine.prompts import PromptError, prompt_token_ids
from forge_batch.engine.request import GenerationRequest
from forge_batch.engine.sampling_params import (
    SamplingParams,
    constraint_of,
    constraint_options,
    constraints_given,
    one_constraint_problem,
)
from forge_batch.io.ledger import ResumeState
from forge_batch.job import InputSpec, JobSpec
from forge_batch.plugin_manager import PluginHookError, call_impl, iter_impls
from forge_batch.runner.signals import RunFlags

# The sampling options a row's null clears (docs/jobs.md); any other null is "not set", the job's value.
_NULLABLE_OPTIONS = frozenset({"logprobs", "prompt_logprobs"})


def row_seed(job_seed: int, key: str) -> int:
    """The seed of one row: a stable 63-bit hash of the job seed and the row's id (``key``).

    Stable across processes and Python versions (no ``hash()``), and independent of the order rows reach
    the engine, so a resumed or re-ordered run samples exactly the same tokens for a row."""
    digest = hashlib.blake2b(f"{job_seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def has_chat_template(tokenizer: Any) -> bool:
    """Whether plain prompts should go through the tokenizer's chat template (``apply_chat_template: null``)."""
    if tokenizer is None:
        return False
    ct = getattr(tokenizer, "chat_template", None)
    if ct is not None:
        return bool(ct)
    if not hasattr(tokenizer, "apply_chat_template"):
        return False
    try:
        return isinstance(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True), str)
    except Exception:  # a tokenizer whose template cannot render a plain chat has none worth using
        return False


class _RowFailed(Exception):
    """A row that cannot run: its message, error kind and how many samples it would have had."""

    def __init__(self, message: str, kind: str, n: int | None = None) -> None:
        super().__init__(message)
        self.message, self.kind, self.n = message, str(kind), n


def _sample_count(n: Any) -> int:
    return max(1, n if isinstance(n, int) else 1)


@dataclass
class AdmittedRow:
    """A row admitted to run: its position, its id as stored (None when it has none) and its data; a row
    that cannot run carries ``failure`` (message, error kind), found while reading or checking its id."""

    row_index: int
    id_value: Any
    data: dict[str, Any] | None
    failure: tuple[str, str] | None = None


def sampling_with_override(base: dict[str, Any], value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the job's sampling options with a row's overrides, the overrides): ``value`` is the row's
    ``sampling_field`` (a mapping, or its JSON text); its own constraint replaces the job's, as a constraint
    column's does. Raises ValueError (or TypeError) naming what is wrong; SamplingParams checks the values."""
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping, got {type(value).__name__}")
    unknown = sorted(set(value) - set(base))
    if unknown:
        raise ValueError(f"unknown sampling option(s) {unknown}")
    # null is "not set" (a Parquet struct column gives every key a row leaves out as null), except where it
    # clears the job's option
    override = {k: v for k, v in value.items() if v is not None or k in _NULLABLE_OPTIONS}
    problem = one_constraint_problem(constraints_given(override))  # the row's own, not with the job's
    if problem is not None:
        raise ValueError(problem)
    kw = dict(base)
    own = constraint_of(override)
    if own is not None:
        kw.update(constraint_options(*own))
        override = {k: v for k, v in override.items() if k not in (own[0], "constraint")}
    kw.update(override)
    return kw, override


class RequestBuilder:
    """Builds the lazy stream of requests the engine pulls from (see the module docstring).

    ``id_type`` is the id column's Arrow type; ``resume`` what earlier runs committed (skipped here);
    ``flags.stop_admitting`` ends the stream and ``flags.in_flight`` counts what it handed out."""

    def __init__(self, job: JobSpec, spec: InputSpec, id_type: pa.DataType, resume: ResumeState,
                 context: RunContext, flags: RunFlags, output_columns: set[str] | None = None) -> None:
        self.job = job
        # the output's columns (None: any); a row may ask for logprobs only where they have a column
        self.output_columns = output_columns
        self.spec = spec
        self.id_type = id_type
        self.resume = resume
        self.context = context
        self.pm = context.plugin_manager
        self.flags = flags
        self.base_sampling = job.sampling_dict()
        self.seen: dict[Any, int] = {}  # id -> first row index (-1: committed by an earlier run)

    def requests(self, batches: Iterator[list[RawRow]]) -> Iterator[GenerationRequest]:
        for row in self.admitted(batches):
            self.flags.in_flight += 1
            yield self.build(row)

    def admitted(self, batches: Iterator[list[RawRow]]) -> Iterator[AdmittedRow]:
        """The rows to run, in input order: what earlier runs committed is left out, ``input.limit`` and
        ``flags.stop_admitting`` end the stream. This part needs the whole input's ids (resume, duplicates),
        so an executor that runs rows elsewhere calls it where the input is read and :meth:`build` there."""
        limit = self.spec.limit
        for row_index, raw in enumerate(row for batch in batches for row in batch):
            if self.flags.stop_admitting or (limit is not None and row_index >= limit):
                return
            try:
                row = self.admit(row_index, raw)
            except Exception as e:  # never let one row break the stream
                row = AdmittedRow(row_index, None, raw.data, (f"internal error preparing row: {type(e).__name__}: {e}",
                                                              ErrorKind.INTERNAL_ERROR))
            if row is not None:
                yield row

    def make_request(self, row_index: int, raw: RawRow) -> GenerationRequest | None:
        """The request for one row; None when an earlier run committed it."""
        row = self.admit(row_index, raw)
        return self.build(row) if row is not None else None

    def admit(self, row_index: int, raw: RawRow) -> AdmittedRow | None:
        """The row's id, checked against earlier runs (None: committed by one) and the ids seen before it;
        an unreadable row, a missing or bad id and a duplicate carry their failure."""
        data = raw.data
        id_value, id_problem = self._row_id(row_index, data)
        try:
            if not self._admit(row_index, id_value):
                return None
        except _RowFailed as e:
            return AdmittedRow(row_index, id_value, data, (e.message, e.kind))
        if raw.error is not None or data is None:
            return AdmittedRow(row_index, id_value, data, (raw.error or "unreadable row", raw.error_kind or ErrorKind.MALFORMED_JSON))
        if id_problem is not None:
            return AdmittedRow(row_index, None, data, id_problem)
        return AdmittedRow(row_index, id_value, data)

    def build(self, row: AdmittedRow) -> GenerationRequest:
        """The engine request of an admitted row: its sampling options and seed, the prepare hooks, its
        token ids; a row that cannot run gets a request carrying its error."""
        try:
            if row.failure is not None:
                raise _RowFailed(*row.failure)
            assert row.data is not None  # a row without data carries its failure
            params = self._params(row.row_index, row.id_value, row.data)
            request = self._prepared(row.row_index, row.id_value, row.data, params)
            self._tokenize_into(request)
        except _RowFailed as e:
            return self.error_request(row.row_index, row.id_value, row.data, e.message, e.kind, e.n)
        except Exception as e:  # never let one row break the stream
            return self.error_request(row.row_index, row.id_value, row.data,
                                      f"internal error preparing row: {type(e).__name__}: {e}", ErrorKind.INTERNAL_ERROR)
        return request

    def error_request(self, row_index: int, id_value: Any, data: dict[str, Any] | None, message: str, kind: str,
                      n: int | None = None) -> GenerationRequest:
        """A request the engine does not run: it comes back at once as this row's failure."""
        n = n or self.job.sampling.n
        meta = self._meta(row_index, id_value, data, n)
        meta["error_kind"] = str(kind)
        return GenerationRequest(
            request_id=f"r{row_index}", params=SamplingParams(n=n, max_tokens=1), error=message, metadata={"_forge": meta}
        )

    # ---- identity ---------------------------------------------------------------------------------------
    def _row_id(self, row_index: int, data: dict[str, Any] | None) -> tuple[Any, tuple[str, str] | None]:
        """(the row's id as stored, or None; the problem with it, or None)."""
        field = self.spec.id_field
        if field is None:
            return row_index, None
        if data is None:
            return None, None
        value = data.get(field)
        if value is None:
            return None, (f"missing id: field {field!r} is {'null' if field in data else 'missing'}", ErrorKind.MISSING_ID)
        try:
            return self._normalize_id(value), None
        except RowError as e:
            return None, (str(e), e.kind)

    def _normalize_id(self, value: Any) -> Any:
        """The id as stored in the id column (int for an int64 column, text otherwise); raises RowError."""
        if pa.types.is_integer(self.id_type):
            if isinstance(value, bool) or not isinstance(value, int):
                raise RowError(f"id {value!r} is not an integer like the other ids of this input", ErrorKind.BAD_ID)
            if not -(2**63) <= value < 2**63:  # it could not be written, so resume would never see it done
                raise RowError(f"id {value} does not fit the int64 id column; give such ids as text", ErrorKind.BAD_ID)
            return value
        if isinstance(value, bool) or not isinstance(value, (str, int)):  # 3.5 and "3.5" must not collide
            raise RowError(f"id must be text or an integer, got {type(value).__name__}", ErrorKind.BAD_ID)
        return value if isinstance(value, str) else str(value)

    def _admit(self, row_index: int, id_value: Any) -> bool:
        """False for a row an earlier run committed; raises _RowFailed for a duplicate id."""
        done = self.resume
        if id_value is None:
            return row_index not in done.done_positions
        if id_value in self.seen:
            if row_index in done.done_positions:
                return False
            first = self.seen[id_value]
            where = f"row {first}" if first >= 0 else "an earlier run"
            raise _RowFailed(f"duplicate id {id_value!r} (first seen at {where})", ErrorKind.DUPLICATE_ID)
        if id_value in done.done_ids:
            self.seen[id_value] = -1
            return False
        self.seen[id_value] = row_index
        return True

    # ---- sampling ---------------------------------------------------------------------------------------
    def _params(self, row_index: int, id_value: Any, data: dict[str, Any]) -> SamplingParams:
        """The job's sampling options, the row's overrides and constraint, and the row's seed."""
        spec = self.spec
        kw = dict(self.base_sampling)
        n = kw["n"]
        try:
            own_seed = False
            if spec.sampling_field is not None and data.get(spec.sampling_field) is not None:
                kw, override = sampling_with_override(kw, data[spec.sampling_field])
                n = int(kw.get("n") or 1)
                own_seed = override.get("seed") is not None
                for key in ("logprobs", "prompt_logprobs"):
                    if kw.get(key) is not None and self.output_columns is not None and key not in self.output_columns:
                        raise ValueError(f"{key} for one row needs sampling.{key} set in the job (the output has "
                                         f"a {key} column only then)")
            if not own_seed:
                key = f"id:{id_value}" if spec.id_field is not None else f"row:{row_index}"
                kw["seed"] = row_seed(self.job.sampling.seed, key)
        except (TypeError, ValueError) as e:
            raise _RowFailed(f"bad sampling override in {spec.sampling_field!r}: {e}", ErrorKind.BAD_SAMPLING,
                             _sample_count(n)) from None
        try:
            kw.update(self._row_constraint(data))
        except (TypeError, ValueError) as e:
            raise _RowFailed(str(e), ErrorKind.CONSTRAINT_ERROR, _sample_count(n)) from None
        try:
            return SamplingParams(**kw)
        except (TypeError, ValueError) as e:
            raise _RowFailed(f"bad sampling options: {e}", ErrorKind.BAD_SAMPLING, _sample_count(n)) from None

    def _row_constraint(self, data: dict[str, Any]) -> dict[str, Any]:
        """The row's own constraint from ``constraint.<kind>_field`` (a column), replacing the job-wide one;
        no options when the job has no such column or the row's cell is empty."""
        field = self.job.constraint.row_field() if self.job.constraint is not None else None
        if field is None:
            return {}
        kind, column = field
        value = data.get(column)
        if value is None or value == "" or (isinstance(value, float) and value != value):  # empty: job-wide or none
            return {}
        if kind in ("json_schema", "choice") and isinstance(value, str):  # JSON text in a string column
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"column {column!r} holds no valid {kind} (not JSON: {e})") from e
        if kind == "choice" and not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            raise ValueError(f"column {column!r} holds no valid choice: a list of at least one string, got {value!r}")
        return constraint_options(kind, value)

    # ---- prompt -----------------------------------------------------------------------------------------
    def _meta(self, row_index: int, id_value: Any, data: dict[str, Any] | None, n: int) -> dict[str, Any]:
        """What the result needs of its row, carried through the engine in the request's metadata."""
        keep = {name: data.get(name) for name in self.job.output.keep_fields} if data is not None else {}
        return {"row_index": row_index, "id": id_value, "keep": keep, "row": data or {}, "n": n}

    def _prepared(self, row_index: int, id_value: Any, data: dict[str, Any], params: SamplingParams) -> GenerationRequest:
        """The request after the prepare hooks (the built-in one builds the prompt) and logits processors."""
        meta = self._meta(row_index, id_value, data, params.n)
        if params.constraint_spec is not None:
            meta["constraint"] = params.constraint_spec
        request = GenerationRequest(request_id=f"r{row_index}", params=params, metadata={"_forge": meta})
        hook_args = {"row": data, "context": self.context}
        plugin, hook = None, "prepare_request"  # who runs now, for a DropResult's message
        try:
            for impl in iter_impls(self.pm, "prepare_request"):
                plugin = impl.plugin_name
                result = call_impl(impl, "prepare_request", {"request": request, **hook_args})
                if result is not None and not isinstance(result, GenerationRequest):
                    raise _RowFailed(f"plugin {plugin!r}: prepare_request returned a {type(result).__name__}; modify "
                                     "the request in place (request.prompt = ...) or return a GenerationRequest",
                                     ErrorKind.PLUGIN_ERROR, params.n)
                if result is not None:
                    request = result
            for impl in iter_impls(self.pm, "logits_processors"):
                plugin, hook = impl.plugin_name, "logits_processors"
                procs = call_impl(impl, "logits_processors", {"request": request, **hook_args})
                if procs:
                    request.params.logits_processors.extend(procs)
        except SkipRow as e:
            raise _RowFailed(f"skipped: {e}", ErrorKind.SKIPPED, params.n) from None
        except DropResult as e:  # process_result's: before generation there is no result to leave out
            raise _RowFailed(f"plugin {plugin!r} raised DropResult in {hook} ({e}): raise SkipRow to leave a "
                             "row out before generation (DropResult is for process_result)", ErrorKind.PLUGIN_ERROR,
                             params.n) from None
        except RowError as e:
            raise _RowFailed(str(e), e.kind, params.n) from None
        except PluginHookError as e:
            raise _RowFailed(str(e), ErrorKind.PLUGIN_ERROR, params.n) from None
        request.metadata.setdefault("_forge", meta)
        return request

    def _tokenize_into(self, request: GenerationRequest) -> None:
        """Set the request's token ids, checked against the context, so a row that cannot fit fails here
        with its own message instead of inside the engine."""
        n = request.params.n
        try:
            ids, text = self._tokenize(request)
        except RowError as e:
            raise _RowFailed(str(e), e.kind, n) from None
        except Exception as e:
            raise _RowFailed(f"cannot tokenize the prompt: {type(e).__name__}: {e}", ErrorKind.TOKENIZE_ERROR, n) from None
        if ids is not None:
            if not ids:
                raise _RowFailed("empty prompt: it has no tokens", ErrorKind.EMPTY_PROMPT, n)
            limit = self.context.max_model_len
            if limit is not None and len(ids) >= limit:
                raise _RowFailed(
                    f"prompt too long: {len(ids)} tokens, the model's context (max_model_len) is {limit}, leaving no "
                    "room to generate", ErrorKind.PROMPT_TOO_LONG, n,
                )
            request.prompt_token_ids = ids
        if self.job.output.include_prompt:
            request.metadata["_forge"]["prompt_text"] = text

    def _tokenize(self, request: GenerationRequest) -> tuple[list[int] | None, str | None]:
        """(token ids, prompt text); ids None when the engine has no tokenizer (it gets the prompt as is)."""
        tok = self.context.tokenizer
        prompt = request.prompt
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids), prompt if isinstance(prompt, str) else None
        if tok is None:
            return None, prompt if isinstance(prompt, str) else json.dumps(prompt)
        if isinstance(prompt, str) and not prompt.strip():
            raise RowError("empty prompt", ErrorKind.EMPTY_PROMPT)
        try:
            return prompt_token_ids(prompt, tok)
        except PromptError as e:
            raise RowError(str(e), e.kind) from None
