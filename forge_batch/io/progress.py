"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise (CI logs, ``nohup``), nothing
with ``--quiet``.

Shows rows done / total (when the input's size is known), output tokens per second, running / waiting
sequences and KV-cache blocks in use, from the engine's ``stats()``.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


class Progress:
    """``mode``: ``bar`` (tqdm), ``log`` (a line every ``log_interval`` seconds), ``none``; ``auto`` picks
    ``bar`` when the stream is a terminal, else ``log``."""

    def __init__(
        self,
        total: int | None,
        initial: int = 0,
        mode: str = "auto",
        stream: TextIO | None = None,
        log_interval: float = 10.0,
        desc: str = "forge-batch",
    ) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "log"
        self.mode = mode
        self.total = total
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
                total=total, initial=initial, desc=desc, unit="row", file=self.stream, dynamic_ncols=True, smoothing=0.1
            )

    def tok_per_s(self) -> float:
        dt = time.monotonic() - self.t0
        return self.output_tokens / dt if dt > 0 else 0.0

    def postfix(self) -> str:
        s = self.stats
        parts = [f"{self.tok_per_s():,.0f} tok/s"]
        if s:
            parts.append(f"run {s.get('running', 0)} wait {s.get('waiting', 0)}")
            if s.get("kv_blocks_total"):
                parts.append(f"kv {s.get('kv_blocks_used', 0)}/{s.get('kv_blocks_total')}")
        return ", ".join(parts)

    def line(self) -> str:
        if self.total:
            pct = 100.0 * self.done / self.total if self.total else 0.0
            head = f"{_fmt_int(self.done)}/{_fmt_int(self.total)} rows ({pct:.1f}%)"
        else:
            head = f"{_fmt_int(self.done)} rows"
        elapsed = time.monotonic() - self.t0
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        return f"{self.desc}: {head}, {rate:,.1f} rows/s, {self.postfix()}"

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
        elif self.mode == "log" and now - self._last_log >= self.log_interval:
            self._last_log = now
            if stats_fn is not None:
                self.stats = stats_fn() or {}
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
        elif self.mode == "log":
            self.message(self.line())
