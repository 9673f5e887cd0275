"""Built-in plugin: one line per run start and end in ``runs.jsonl`` in the output's state folder, so that the resume history
of an output (which run wrote which parts, how it ended) is exact rather than guessed from time gaps.

A start line records how many part files were already visible: the parts from there up to the next run's
start belong to this run, even when it was killed before it could write its end line. A run that starts
with nothing committed (a new output, or ``--overwrite``) starts the file afresh. ``forge-batch report``
reads it (``forge_batch.io.output_stats``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from forge_batch.hookspecs import hookimpl
from forge_batch.io.output_dir import PART_RE, parts_dir_for, state_dir_for
from forge_batch.io.output_stats import RUN_LOG
from forge_batch.io.safe_fs import fsync_file


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def _visible_parts(output_dir: Path) -> int:
    parts = parts_dir_for(output_dir)
    return sum(1 for p in parts.iterdir() if PART_RE.match(p.name)) if parts.is_dir() else 0


def _append(path: Path, entry: dict[str, Any], fresh: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w" if fresh else "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
        f.flush()
    fsync_file(path)


@hookimpl
def job_start(job: Any, context: Any) -> None:
    out = Path(context.output_dir)
    entry = {
        "event": "start",
        "at": _now(),
        "pid": os.getpid(),
        "resumed_rows": context.resumed_rows,
        "parts_at_start": _visible_parts(out),
        "engine": getattr(context.engine, "engine_info", None),
    }
    _append(state_dir_for(out) / RUN_LOG, entry, fresh=not context.resumed_rows)


@hookimpl
def job_end(job: Any, context: Any, summary: dict[str, Any]) -> None:
    out = Path(context.output_dir)
    this_run = summary.get("this_run") or {}
    entry = {
        "event": "end",
        "at": _now(),
        "pid": os.getpid(),
        "status": summary.get("status"),
        "rows": this_run.get("rows"),
        "rows_failed": this_run.get("rows_failed"),
        "parts_at_end": _visible_parts(out),
    }
    _append(state_dir_for(out) / RUN_LOG, entry)
