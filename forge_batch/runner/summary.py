"""How a run ended (status, exit code, the message that says what to do next) and its summary: the dict
``summary.json`` holds and ``job_end`` hooks see, and the lines printed at the end of a run."""

from __future__ import annotations

import datetime as _dt
import errno
from dataclasses import dataclass
from typing import Any

from forge_batch.io.ledger import Tally
from forge_batch.io.meta import tool_version
from forge_batch.io.safe_fs import CommitError
from forge_batch.runner.run_figures import error_kind_counts

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

RESUME_HINT = "rerun the same command to resume (committed rows are skipped)"


def signal_exit_code(signal_name: str | None) -> int:
    return EXIT_TERMINATED if signal_name == "SIGTERM" else EXIT_INTERRUPTED


@dataclass
class Outcome:
    """``status`` is ``completed``, ``failed`` or ``interrupted``."""

    status: str
    exit_code: int
    message: str


@dataclass
class RunEnd:
    """What the generation loop ended with, as the outcome needs it."""

    committed_rows: int  # by this run
    commit_error: CommitError | None = None
    error_message: str | None = None  # the engine or a reader broke
    signal_name: str | None = None
    dropped_in_flight: bool = False
    stopped_early: bool = False  # the error budget stopped admitting rows


def decide_outcome(end: RunEnd, failed: int, counted: int, max_error_rate: float, tally: Tally) -> Outcome:
    """The run's outcome, in order of what matters most: a failed commit (its rows are lost until a
    resume), a signal, a broken engine or reader, too many failed rows; else completed."""
    hint = RESUME_HINT
    if end.commit_error is not None:
        if end.commit_error.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = f"free some space, then {hint}"
        message = f"{end.commit_error}; committed {end.committed_rows} rows this run (earlier parts are intact); {hint}"
        return Outcome("failed", EXIT_FAILED, message)
    if end.signal_name is not None:
        dropped = "dropped in-flight rows" if end.dropped_in_flight else "finished in-flight rows"
        message = f"interrupted by {end.signal_name}: {dropped}, committed {end.committed_rows} rows this run; {hint}"
        return Outcome("interrupted", signal_exit_code(end.signal_name), message)
    if end.error_message is not None:
        return Outcome("failed", EXIT_FAILED, f"{end.error_message}; committed {end.committed_rows} rows this run; {hint}")
    if counted and failed / counted > max_error_rate:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(tally.failed_by_kind.items()))
        stopped = " (stopped early)" if end.stopped_early else ""
        message = (
            f"{failed} of {counted} rows failed ({100 * failed / counted:.1f}%), more than max_error_rate "
            f"{max_error_rate:g}{stopped}: {kinds}. The error column of each row says what is wrong; fix the input "
            f"(and rerun with --overwrite) or raise max_error_rate (--set max_error_rate=...)"
        )
        return Outcome("failed", EXIT_FAILED, message)
    return Outcome("completed", EXIT_OK, f"completed: {tally.rows} rows")


@dataclass
class Timings:
    """Monotonic seconds of the run's phases, and when it started (wall clock)."""

    started_at: _dt.datetime
    wall_s: float
    load_s: float
    generation_s: float


def _per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 3) if seconds > 0 else 0.0


def build_summary(job: Any, outcome: Outcome, *, engine_info: dict[str, Any] | None, total: Tally, this_run: Tally,
                  input_rows: int | None, failed: int, counted: int, resumed_rows: int, parts: int,
                  timings: Timings, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary of a run: what ``summary.json`` holds and ``job_end`` hooks see.

    Counts (``rows``, tokens, ``failed_by_kind``, ``error_kinds``) are the whole output's, earlier runs
    included; ``this_run`` holds this run's. ``figures`` (from ``RunFigures.summary``: latency quantiles,
    throughput over time, KV cache, preemptions, prefix cache) are this run's, like ``throughput``: timings
    and engine state are not kept across runs."""
    gen_s = timings.generation_s
    throughput = {
        "rows_per_s": _per_second(this_run.rows, gen_s),
        "output_tokens_per_s": _per_second(this_run.completion_tokens, gen_s),
    }
    return {
        "status": outcome.status,
        "message": outcome.message,
        "job": job.display_name(),
        "model": job.model,
        "engine": engine_info,
        "output": str(job.output.path),
        "output_format": job.output.format,
        "tool_version": tool_version(),
        **total.to_dict(),
        "error_kinds": error_kind_counts(total.failed_by_kind, total.rows_skipped),
        "input_rows": input_rows,
        "error_rate": (failed / counted) if counted else 0.0,
        "max_error_rate": job.max_error_rate,
        "resumed_rows": resumed_rows,
        "parts": parts,
        "this_run": {
            **this_run.to_dict(),
            "error_kinds": error_kind_counts(this_run.failed_by_kind, this_run.rows_skipped),
            "wall_time_s": round(timings.wall_s, 3),
            "engine_load_s": round(timings.load_s, 3),
            "generation_s": round(gen_s, 3),
            **throughput,
        },
        "wall_time_s": round(timings.wall_s, 3),
        "throughput": dict(throughput),
        **(figures or {}),
        "started_at": timings.started_at.isoformat(timespec="seconds"),
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


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
