"""Progress reporting: a tqdm bar on a terminal, plain lines otherwise (CI logs, ``nohup``), log records
for ``--log-format json`` (``events``), nothing with ``--quiet``.

Shows rows done / total when the input's size is known (Parquet metadata, a local JSONL file up to
``COUNT_JSONL_BYTES``), counting the rows earlier runs committed (a resumed run starts at their count and
its rate and ETA count only its own rows), the ETA, output tokens per second, running / waiting sequences
and KV-cache blocks in use, from the engine's ``stats()``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

log = logging.getLogger(__name__)

MODES = ("auto", "bar", "log", "events", "none")


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def format_eta(seconds: float | None) -> str:
    """``42s``, ``4m05s``, ``3h07m``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """``mode``: ``bar`` (tqdm), ``log`` (a line every ``log_interval`` seconds), ``events`` (the same as a
    log record with its figures as fields), ``none``; ``auto`` picks ``bar`` when the stream is a terminal,
    else ``log``. ``initial``: rows earlier runs committed (counted as done, not in this run's rate)."""

    def __init__(
        self,
        total: int | None,
        initial: int = 0,
        mode: str = "auto",
        stream: TextIO | None = None,
        log_interval: float = 10.0,
        desc: str = "forge-batch",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}; one of {', '.join(MODES)}")
        self.stream = stream or sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "log"
        self.mode = mode
        # a total below what is already done (an input shortened since) is no total at all
        self.total = total if total is not None and total >= initial else None
        self.done = initial
        self.initial = initial
        self.log_interval = log_interval
        self.desc = desc
        self.t0 = time.monotonic()
        self._last_refresh = 0.0
        self._last_log = self.t0
        self.output_tokens = 0
        self.stats: dict[str, Any] = {}
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, initial=initial, desc=desc, unit="row", file=self.stream, dynamic_ncols=True,
                smoothing=0.1,
            )

    def _elapsed(self) -> float:
        return time.monotonic() - self.t0

    def tok_per_s(self) -> float:
        dt = self._elapsed()
        return self.output_tokens / dt if dt > 0 else 0.0

    def rows_per_s(self) -> float:
        """This run's rows per second (earlier runs' rows are not this run's work)."""
        dt = self._elapsed()
        return (self.done - self.initial) / dt if dt > 0 else 0.0

    def eta_s(self) -> float | None:
        """Seconds left at this run's rate; None when the total or the rate is unknown."""
        rate = self.rows_per_s()
        if self.total is None or rate <= 0:
            return None
        return max(0, self.total - self.done) / rate

    def kv_usage(self) -> float | None:
        total = self.stats.get("kv_blocks_total")
        return (self.stats.get("kv_blocks_used") or 0) / total if total else None

    def postfix(self) -> str:
        s = self.stats
        parts = [f"{self.tok_per_s():,.0f} tok/s"]
        if s:
            parts.append(f"run {s.get('running', 0)} wait {s.get('waiting', 0)}")
            usage = self.kv_usage()
            if usage is not None:
                parts.append(f"kv {s.get('kv_blocks_used', 0)}/{s.get('kv_blocks_total')} ({100 * usage:.0f}%)")
        return ", ".join(parts)

    def line(self) -> str:
        if self.total is not None:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            head = f"{_fmt_int(self.done)}/{_fmt_int(self.total)} rows ({pct:.1f}%)"
        else:
            head = f"{_fmt_int(self.done)} rows"
        eta = f", ETA {format_eta(self.eta_s())}" if self.total is not None and self.done < self.total else ""
        return f"{self.desc}: {head}, {self.rows_per_s():,.1f} rows/s{eta}, {self.postfix()}"

    def fields(self) -> dict[str, Any]:
        """The figures of :meth:`line`, for a structured log record."""
        eta = self.eta_s()
        usage = self.kv_usage()
        return {
            "rows_done": self.done, "rows_total": self.total, "rows_from_earlier_runs": self.initial,
            "rows_per_s": round(self.rows_per_s(), 3), "eta_s": None if eta is None else round(eta, 1),
            "output_tokens_per_s": round(self.tok_per_s(), 1),
            "running": self.stats.get("running"), "waiting": self.stats.get("waiting"),
            "kv_blocks_used": self.stats.get("kv_blocks_used"), "kv_blocks_total": self.stats.get("kv_blocks_total"),
            "kv_usage_ratio": None if usage is None else round(usage, 4),
        }

    def update(self, rows: int, output_tokens: int, stats_fn: Any = None) -> None:
        """Count ``rows`` more finished rows and ``output_tokens`` more generated tokens; refresh at most a
        few times per second (``stats_fn`` is only called then, it may not be free)."""
        self.done += rows
        self.output_tokens += output_tokens
        if self.mode == "none":
            return
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(rows)
            if now - self._last_refresh >= 0.5:
                self._last_refresh = now
                if stats_fn is not None:
                    self.stats = stats_fn() or {}
                self._bar.set_postfix_str(self.postfix(), refresh=False)
        elif now - self._last_log >= self.log_interval:
            self._last_log = now
            if stats_fn is not None:
                self.stats = stats_fn() or {}
            self._emit()

    def _emit(self) -> None:
        if self.mode == "events":
            log.info(self.line(), extra={"fields": self.fields()})
        else:
            self.message(self.line())

    def message(self, text: str) -> None:
        """Print a message without breaking the bar (shown even in ``none`` mode only by callers)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode in ("log", "events"):
            self._emit()
