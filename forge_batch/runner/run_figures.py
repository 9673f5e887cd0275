"""The figures of one run that ``summary.json`` gains beyond its counts: TTFT and latency quantiles, rows and
tokens per second over time, and what the engine measured (peak KV use, preemptions, prefix-cache hits,
inter-token latency). Memory stays bounded whatever the row count: latencies go into ``LogHistogram``s
(quantiles within 1%), the time series into at most ``MAX_POINTS`` buckets."""

from __future__ import annotations

import time
from typing import Any

from forge_batch.contract import ErrorKind
from forge_batch.engine.histogram import LogHistogram

MAX_POINTS = 120
FIRST_INTERVAL_S = 1.0


class ThroughputSeries:
    """Rows and output tokens per time bucket since the start of generation. When the run outlasts
    ``MAX_POINTS`` buckets, neighbouring buckets merge and the interval doubles: the series keeps its shape
    in bounded memory, at a resolution of about 1/60th to 1/120th of the run."""

    def __init__(self, interval_s: float = FIRST_INTERVAL_S, max_points: int = MAX_POINTS) -> None:
        if max_points < 2 or max_points % 2:
            raise ValueError("max_points must be an even number >= 2")
        self.interval_s = interval_s
        self.max_points = max_points
        self.rows: list[int] = []
        self.tokens: list[float] = []

    def add(self, t: float, rows: int, tokens: int) -> None:
        """Count ``rows`` finished rows and ``tokens`` output tokens at ``t`` seconds after the start."""
        index = int(max(t, 0.0) / self.interval_s)
        while index >= self.max_points:
            self._coarsen()
            index = int(max(t, 0.0) / self.interval_s)
        if index >= len(self.rows):
            grow = index + 1 - len(self.rows)
            self.rows.extend([0] * grow)
            self.tokens.extend([0] * grow)
        self.rows[index] += rows
        self.tokens[index] += tokens

    def add_span(self, start: float, end: float, tokens: int) -> None:
        """Count ``tokens`` output tokens generated evenly between ``start`` and ``end`` seconds: a row's
        tokens come out over its decode, not at the moment it finishes (a batch of rows that all finish
        together would otherwise show as a burst after a flat line)."""
        start, end = max(start, 0.0), max(end, 0.0)
        self.add(end, 0, 0)  # the buckets up to ``end`` exist and the interval is final for this span
        if end - start < 1e-9:
            self.tokens[int(end / self.interval_s)] += tokens
            return
        first, last = int(start / self.interval_s), int(end / self.interval_s)
        for i in range(first, last + 1):
            lo, hi = max(start, i * self.interval_s), min(end, (i + 1) * self.interval_s)
            if hi > lo:
                self.tokens[i] += tokens * (hi - lo) / (end - start)

    def _coarsen(self) -> None:
        def pairs(xs: list) -> list:
            return [sum(xs[i : i + 2]) for i in range(0, len(xs), 2)]

        self.rows, self.tokens = pairs(self.rows), pairs(self.tokens)
        self.interval_s *= 2

    def to_dict(self, elapsed_s: float) -> dict[str, Any]:
        """Rates per bucket; the last bucket is divided by the part of it the run lasted (``elapsed_s``)."""
        widths = [self.interval_s] * len(self.rows)
        if widths:
            last_width = elapsed_s - (len(widths) - 1) * self.interval_s
            widths[-1] = min(self.interval_s, last_width) if last_width > 0 else self.interval_s
        return {
            "interval_s": self.interval_s,
            "rows_per_s": [round(r / w, 3) for r, w in zip(self.rows, widths)],
            "output_tokens_per_s": [round(t / w, 3) for t, w in zip(self.tokens, widths)],
        }


class RunFigures:
    """Collects one run's latencies and throughput from its finished rows, as the runner sees them; built
    when generation starts (the time series counts from then)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.ttft = LogHistogram()
        self.latency = LogHistogram()
        self.series = ThroughputSeries()

    def observe(self, records: list[dict[str, Any]]) -> None:
        """One finished row's records (all its samples). A row's TTFT and latency count once, and only when
        it generated tokens (a row that failed before the engine has no meaningful timings)."""
        tokens = sum(int(r.get("completion_tokens") or 0) for r in records)
        now = time.monotonic() - self.t0
        self.series.add(now, 1, 0)
        if tokens <= 0:
            return
        first = records[0]
        ttft, latency = first.get("ttft_s"), first.get("latency_s")
        if isinstance(ttft, (int, float)) and isinstance(latency, (int, float)):
            self.series.add_span(now - latency + ttft, now, tokens)  # from its first token to now
        else:
            self.series.add(now, 0, tokens)
        if isinstance(first.get("ttft_s"), (int, float)):
            self.ttft.add(float(first["ttft_s"]))
        if isinstance(first.get("latency_s"), (int, float)):
            self.latency.add(float(first["latency_s"]))

    def summary(self, engine: Any, generation_s: float, measured: dict[str, Any] | None = None) -> dict[str, Any]:
        """The summary's ``latency``, ``throughput_over_time``, ``kv_cache``, ``preemptions`` and
        ``prefix_cache``: None where the engine does not measure it. ``measured``: the engine's figures
        (``engine_metrics()``'s keys) where ``engine`` cannot give them (replicas elsewhere)."""
        measured = measured if measured is not None else _engine_metrics(engine)
        latency = {"ttft_s": self.ttft.to_dict(), "itl_s": measured.get("itl_s") or {"count": 0},
                   "latency_s": self.latency.to_dict()}
        kv = None
        if measured.get("kv_blocks_total") and measured.get("kv_blocks_peak") is not None:
            kv = {"blocks_total": measured["kv_blocks_total"], "peak_blocks": measured.get("kv_blocks_peak"),
                  "peak_ratio": measured.get("kv_peak_ratio")}
        prefix = None
        if "prefix_cache_queries" in measured:
            prefix = {"hits": measured.get("prefix_cache_hits"), "queries": measured["prefix_cache_queries"],
                      "hit_rate": measured.get("prefix_cache_hit_rate")}
        return {
            "latency": latency,
            "throughput_over_time": self.series.to_dict(generation_s),
            "kv_cache": kv,
            "preemptions": measured.get("preemptions"),
            "prefix_cache": prefix,
        }


def replica_engine_figures(engine: Any) -> tuple[dict[str, Any], Any]:
    """What a replica sends with its results for :func:`merged_engine_metrics`: its engine's figures and its
    inter-token latencies as a mergeable ``LogHistogram`` (None for an engine without one)."""
    return _engine_metrics(engine), getattr(engine, "inter_token_latency", None)


def merged_engine_metrics(replicas: list[tuple[dict[str, Any], Any]]) -> dict[str, Any] | None:
    """Several engines' figures as one engine's (``engine_metrics()``'s keys): KV blocks and their peaks,
    preemptions and prefix-cache counts summed, the peak ratio of the fullest cache, the inter-token
    latencies merged. None without replicas."""
    if not replicas:
        return None
    figures = [m for m, _ in replicas]
    out: dict[str, Any] = {}
    if all(m.get("kv_blocks_total") and m.get("kv_blocks_peak") is not None for m in figures):
        out["kv_blocks_total"] = sum(m["kv_blocks_total"] for m in figures)
        out["kv_blocks_peak"] = sum(m["kv_blocks_peak"] for m in figures)
        out["kv_peak_ratio"] = max(m.get("kv_peak_ratio") or 0.0 for m in figures)
    if all(m.get("preemptions") is not None for m in figures):
        out["preemptions"] = sum(m["preemptions"] for m in figures)
    if all("prefix_cache_queries" in m for m in figures):
        hits = sum(m.get("prefix_cache_hits") or 0 for m in figures)
        queries = sum(m["prefix_cache_queries"] or 0 for m in figures)
        out.update(prefix_cache_hits=hits, prefix_cache_queries=queries,
                   prefix_cache_hit_rate=round(hits / queries, 4) if queries else None)
    histograms = [h for _, h in replicas]
    if all(isinstance(h, LogHistogram) for h in histograms):
        itl = LogHistogram()
        for h in histograms:
            itl.merge(h)
        out["itl_s"] = itl.to_dict()
    elif len(figures) == 1 and figures[0].get("itl_s"):
        out["itl_s"] = figures[0]["itl_s"]
    return out


def _engine_metrics(engine: Any) -> dict[str, Any]:
    """The engine's own figures (``engine_metrics()``), or what its ``stats()`` has of them: an engine from
    elsewhere (a fake, an out-of-process one) may offer either or neither."""
    for name in ("engine_metrics", "stats"):
        fn = getattr(engine, name, None)
        if fn is None:
            continue
        try:
            got = fn() or {}
        except Exception:  # figures for the summary never fail a run
            continue
        if name == "stats" and got.get("kv_blocks_total") and "kv_blocks_peak" in got:
            got = {**got, "kv_peak_ratio": round(got["kv_blocks_peak"] / got["kv_blocks_total"], 4)}
        return dict(got)
    return {}


def error_kind_counts(failed_by_kind: dict[str, int], rows_skipped: int) -> dict[str, int]:
    """Failed rows by kind with every ``ErrorKind`` present (zero when none failed so), skipped rows under
    ``skipped``, and any kind a plugin named itself after them."""
    counts = {k.value: 0 for k in ErrorKind}
    counts[ErrorKind.SKIPPED.value] = rows_skipped
    for kind, n in sorted(failed_by_kind.items()):
        counts[kind] = counts.get(kind, 0) + n
    return counts
