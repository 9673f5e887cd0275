"""Engine results -> output records: one record per sample, with the row's id, kept fields and timings,
the error kind taken from where the failure was named (the row's own check, or the engine's
``error_kind``), then the result hooks (validate, score, drop) one sample at a time."""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from typing import Any

from forge_batch.contract import DropResult, ErrorKind, RowError, RunContext, SkipRow
from forge_batch.engine.outputs import RequestOutput
from forge_batch.plugin_manager import PluginHookError, call_impl, iter_impls


@dataclass
class Group:
    """All samples of one finished request, waiting to be committed."""

    records: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    row_status: str  # ok, failed, skipped or dropped
    row_kind: str | None


def _engine_kind(kind: Any) -> str:
    """An engine's error kind as a row error kind; an engine that names none (an older or out-of-process
    one) gets engine_error, never a guess from its message."""
    return ErrorKind(kind).value if kind in ErrorKind._value2member_map_ else ErrorKind.ENGINE_ERROR.value


# The record keys the runner counts, commits and resumes by (with the id column): a process_result hook's change
# to them, or their removal, is undone.
RUNNER_COLUMNS = ("row_index", "sample_index", "prompt_tokens", "completion_tokens", "finish_reason", "ttft_s",
                  "latency_s", "finished_at")


class ResultObservers:
    """Calls the ``result_recorded`` hooks for each record handed to the output. A hook that raises is
    reported once (per plugin) through ``warn`` and never fails a row or the run."""

    def __init__(self, pm: Any, context: RunContext, warn: Any) -> None:
        self.impls = list(iter_impls(pm, "result_recorded"))
        self.context = context
        self.warn = warn
        self._warned: set[str] = set()

    def __call__(self, group: Group) -> None:
        for impl in self.impls:
            for rec in group.records:
                try:  # a copy: observation only, whatever the hook does to it
                    call_impl(impl, "result_recorded", {"record": dict(rec), "context": self.context})
                except Exception as e:  # observation never fails a row
                    if impl.plugin_name not in self._warned:
                        self._warned.add(impl.plugin_name)
                        self.warn(f"forge-batch: warning: {e}")


class RecordBuilder:
    """Turns each finished request into a :class:`Group` of records with the run's output columns."""

    def __init__(self, job: Any, id_column: str, column_names: set[str], context: RunContext) -> None:
        self.job = job
        self.id_column = id_column
        self.column_names = column_names
        self.context = context
        self.pm = context.plugin_manager

    def group_for(self, out: RequestOutput) -> Group:
        meta = (out.metadata or {}).get("_forge") or {}
        records = self._records(out, meta, self._base(out, meta))
        if "logprobs" in self.column_names or "prompt_logprobs" in self.column_names:
            self._add_logprobs(records, out)
        kept, dropped = self._process_results(records, out, meta.get("row") or {})
        if not kept and dropped:
            status, kind = "dropped", None
        elif any(r.get("error_kind") == ErrorKind.SKIPPED for r in kept):
            status, kind = "skipped", None
        else:
            failed = [r for r in kept if r.get("error")]
            status, kind = ("failed", failed[0].get("error_kind") or "error") if failed else ("ok", None)
        return Group(kept, dropped, status, kind)

    def _base(self, out: RequestOutput, meta: dict[str, Any]) -> dict[str, Any]:
        """The columns every sample of the row shares."""
        metrics = out.metrics or {}
        arrival = metrics.get("arrival_time")
        first = metrics.get("first_token_time")
        done = metrics.get("finished_time")
        base = {
            self.id_column: meta.get("id"),
            "row_index": meta.get("row_index"),
            **(meta.get("keep") or {}),
            "prompt_tokens": len(out.prompt_token_ids or []),
            "ttft_s": (first - arrival) if first is not None and arrival is not None else None,
            "latency_s": (done - arrival) if done is not None and arrival is not None else None,
            "finished_at": _dt.datetime.now(_dt.timezone.utc),
        }
        if self.job.output.include_prompt:
            base["prompt"] = meta.get("prompt_text")
        return base

    @staticmethod
    def _records(out: RequestOutput, meta: dict[str, Any], base: dict[str, Any]) -> list[dict[str, Any]]:
        samples = list(out.samples or [])
        row_kind = meta.get("error_kind")  # the row failed before the engine (its kind named then)
        if out.error is None and row_kind is None and not samples:
            out.error = "the engine returned no samples"
        if out.error is not None or row_kind is not None:
            message = out.error or "failed"
            kind = row_kind or _engine_kind(getattr(out, "error_kind", None))
            reason = "skipped" if kind == ErrorKind.SKIPPED else "error"
            return [  # nothing was generated: no timings (null, not 0.0, so that no average counts them)
                {**base, "sample_index": i, "text": None, "finish_reason": reason, "completion_tokens": 0,
                 "error": message, "error_kind": kind, "ttft_s": None, "latency_s": None}
                for i in range(meta.get("n") or max(1, len(samples)))
            ]
        records = []
        for s in samples:
            err = s.error if s.finish_reason == "error" or s.error else None
            if s.finish_reason == "error" and not err:
                err = "generation failed"
            kind = _engine_kind(getattr(s, "error_kind", None)) if err else None
            # an output that does not conform keeps its text: what the model wrote is what a user inspects
            text = s.text if err is None or kind == ErrorKind.INVALID_OUTPUT else None
            records.append(
                {**base, "sample_index": s.index, "text": text, "finish_reason": s.finish_reason,
                 "valid": getattr(s, "valid", None), "completion_tokens": len(s.token_ids or []), "error": err,
                 "error_kind": kind}
            )
        return records

    def _add_logprobs(self, records: list[dict[str, Any]], out: RequestOutput) -> None:
        """The logprob columns of each sample's record (null where the row did not ask or failed)."""
        by_index = {s.index: s for s in out.samples or []}
        prompt = None
        if "prompt_logprobs" in self.column_names and getattr(out, "prompt_position_logprobs", None) is not None:
            prompt = [None, *position_records(out.prompt_position_logprobs, out.prompt_logprobs[1:])]
        for rec in records:
            sample = by_index.get(rec.get("sample_index"))
            if "prompt_logprobs" in self.column_names:
                rec["prompt_logprobs"] = prompt
            if "logprobs" not in self.column_names or sample is None or rec.get("error"):
                continue
            if getattr(sample, "position_logprobs", None) is not None:
                rec["logprobs"] = position_records(sample.position_logprobs, sample.logprobs)
                rec["cumulative_logprob"] = sample.cumulative_logprob

    def _process_results(self, records: list[dict[str, Any]], out: RequestOutput,
                         row: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The result hooks, one sample at a time: (kept records, dropped records)."""
        kept: list[dict[str, Any]] = []
        dropped: list[dict[str, Any]] = []
        for rec in records:
            if rec.get("error_kind") == ErrorKind.SKIPPED:
                kept.append(rec)
                continue
            own = {k: rec.get(k) for k in (self.id_column, *RUNNER_COLUMNS)}
            try:
                for impl in iter_impls(self.pm, "process_result"):
                    result = call_impl(impl, "process_result", {"record": rec, "output": out, "row": row, "context": self.context})
                    if isinstance(result, dict):
                        rec = result
            except DropResult:
                dropped.append({**rec, **own})
                continue
            except SkipRow as e:  # left out on purpose, as from prepare_request: written as skipped
                own["finish_reason"] = "skipped"
                rec = {**rec, "text": None, "error": str(e) or "skipped", "error_kind": ErrorKind.SKIPPED.value}
            except (PluginHookError, RowError) as e:
                if rec.get("error"):
                    rec["error"] = f"{rec['error']}; also {e}"
                else:
                    kind = e.kind if isinstance(e, RowError) else ErrorKind.PLUGIN_ERROR.value
                    rec["error"], rec["error_kind"], rec["text"] = str(e), kind, None
            rec.update(own)  # the runner's own columns: what it counts and resumes by, whatever a hook did to them
            if rec.get("error") and not rec.get("error_kind"):
                rec["error_kind"] = ErrorKind.ROW_ERROR.value  # a hook failed the sample without a kind
            kept.append(self._fold_extra(rec))
        return kept, dropped

    def _fold_extra(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Keys a plugin added that are not output columns go to the ``extra`` JSON column."""
        extra = rec.get("extra")
        extra = dict(extra) if isinstance(extra, dict) else (json.loads(extra) if isinstance(extra, str) and extra else {})
        for k in [k for k in rec if k not in self.column_names]:
            extra[k] = rec.pop(k)
        rec["extra"] = json.dumps(extra, ensure_ascii=False, default=str, sort_keys=True) if extra else None
        return rec


def position_records(positions: list[Any], dicts: list[dict[int, Any]]) -> list[dict[str, Any]]:
    """Engine logprobs (PositionLogprobs, with vLLM's dicts for the tokens' text) as the output's
    ``logprobs`` / ``prompt_logprobs`` entries (forge_batch.io.schema.POSITION_LOGPROBS_TYPE)."""
    def text(named: dict[int, Any], tok: int) -> str | None:
        entry = named.get(tok)
        return None if entry is None else entry.decoded_token

    return [
        {"token_id": pos.token_id, "token": text(named, pos.token_id), "logprob": pos.logprob, "rank": pos.rank,
         "top": [{"token_id": t, "token": text(named, t), "logprob": lp} for t, lp in zip(pos.top_ids, pos.top_logprobs)]}
        for pos, named in zip(positions, dicts)
    ]


def ledger_rows(group: Group, id_column: str) -> list[dict[str, Any]]:
    """The run-state entries of one row's samples (what resume and the summary count)."""
    rows = []
    entries = [(r, "error" if r.get("error") else "ok") for r in group.records] + [(r, "dropped") for r in group.dropped]
    for rec, status in entries:
        if rec.get("error_kind") == ErrorKind.SKIPPED:
            status = "skipped"
        rows.append(
            {
                "id": rec.get(id_column),
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
