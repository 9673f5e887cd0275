"""Built-in plugin: Prometheus metrics of a run, for the job key ``metrics`` (docs/jobs.md, "Metrics").

``metrics: {textfile: /var/lib/node_exporter/textfile/nightly.prom}`` writes node_exporter textfile-collector
metrics during the run (at most every ``interval_s``, from ``process_result``) and at its end, each time
atomically (a temp file in the same folder, then a rename: node_exporter never reads half a file).
``metrics: {pushgateway: http://host:9091, job: nightly}`` pushes the same metrics every ``interval_s`` (from a
background thread, so a slow gateway never slows generation) and at the end.

Metrics (all labelled ``batch_job``, the job's name, so several jobs can share a textfile folder):

* ``forge_batch_rows_total{status}``: rows of this run by ``ok`` / ``failed`` (and, at the end, ``skipped`` /
  ``dropped``). During the run counted from the rows that reached this plugin; at the end the run's exact
  tally from the summary.
* ``forge_batch_row_errors_total{error_kind}``: failed rows by kind.
* ``forge_batch_generated_tokens_total``: completion tokens of this run.
* ``forge_batch_ttft_seconds``: histogram of time to first token (rows without an error).
* ``forge_batch_kv_cache_usage_ratio``: KV-cache blocks in use / total, from the engine's ``stats()`` (absent
  when the engine does not report them).
* ``forge_batch_run_success``: 1 when the run completed, 0 when it failed or was interrupted (end only).
* ``forge_batch_last_success_timestamp_seconds``: when a run last completed. A failed run keeps the value an
  earlier run wrote: read back from the textfile, and left alone on the Pushgateway (a failed run's final
  push replaces only the metrics it sends, a completed run's replaces the whole group).

A run that fails before it starts generating (invalid job, engine that cannot load) writes nothing: alert on
the age of ``forge_batch_last_success_timestamp_seconds``.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from forge_batch.hookspecs import hookimpl

STATE_KEY = "forge_batch.metrics"
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
LAST_SUCCESS = "forge_batch_last_success_timestamp_seconds"
MIN_PUSH_INTERVAL_S = 0.5
# A gateway that takes connections and never answers costs the run at most these at its end (the final push
# waits for a push under way, then makes its own).
PUSH_TIMEOUT_S = 3.0
FINAL_PUSH_TIMEOUT_S = 5.0


log = logging.getLogger(__name__)


def _warn(text: str) -> None:
    # a log record, not a print: with --log-format json it must stay one JSON object a line
    log.warning("metrics: %s", text)


def previous_last_success(textfile: str | os.PathLike[str], batch_job: str) -> float | None:
    """``forge_batch_last_success_timestamp_seconds`` for ``batch_job`` in an existing textfile, if any."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = Path(textfile).read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        for family in text_string_to_metric_families(text):
            if family.name == LAST_SUCCESS:
                for sample in family.samples:
                    if sample.labels.get("batch_job") == batch_job:
                        return float(sample.value)
    except ValueError:  # a file someone else wrote, or torn by hand: start without it
        return None
    return None


class RunMetrics:
    """The run's numbers, exposed as a prometheus_client collector in a registry of its own."""

    def __init__(self, batch_job: str, last_success: float | None = None) -> None:
        from prometheus_client import CollectorRegistry

        self.batch_job = batch_job
        self.lock = threading.Lock()
        self.rows: Counter[str] = Counter({"ok": 0, "failed": 0})
        self.errors: Counter[str] = Counter()
        self.tokens = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)  # per bucket (not cumulative), +Inf last
        self.ttft_sum = 0.0
        self.kv_usage: float | None = None
        self.success: int | None = None
        self.last_success = last_success
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    # -- updates (under the lock: the push thread reads concurrently)
    def observe(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.tokens += int(record.get("completion_tokens") or 0)
            if (record.get("sample_index") or 0) != 0:
                return
            if record.get("error"):
                if record.get("error_kind") != "skipped":  # skipped rows are counted from the summary at the end
                    self.rows["failed"] += 1
                    self.errors[str(record.get("error_kind") or "error")] += 1
                return
            self.rows["ok"] += 1
            ttft = record.get("ttft_s")
            if isinstance(ttft, (int, float)) and ttft >= 0:
                self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, ttft)] += 1
                self.ttft_sum += float(ttft)

    def sample_engine(self, engine: Any) -> None:
        stats_fn = getattr(engine, "stats", None)
        if stats_fn is None:
            return
        try:
            stats = stats_fn() or {}
        except Exception:
            return
        used, total = stats.get("kv_blocks_used"), stats.get("kv_blocks_total")
        if isinstance(used, (int, float)) and isinstance(total, (int, float)) and total > 0:
            with self.lock:
                self.kv_usage = float(used) / float(total)

    def finish(self, summary: dict[str, Any]) -> None:
        """The exact numbers of the run from its summary, and whether it succeeded."""
        this_run = summary.get("this_run") or {}
        with self.lock:
            for status in ("ok", "failed", "skipped", "dropped"):
                value = this_run.get(f"rows_{status}")
                if isinstance(value, int):
                    self.rows[status] = value
            kinds = this_run.get("failed_by_kind")
            if isinstance(kinds, dict):
                self.errors = Counter({str(k): int(v) for k, v in kinds.items()})
            if isinstance(this_run.get("completion_tokens"), int):
                self.tokens = this_run["completion_tokens"]
            self.success = 1 if summary.get("status") == "completed" else 0
            if self.success:
                self.last_success = time.time()

    # -- the prometheus_client collector protocol
    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        job = self.batch_job
        with self.lock:
            rows = CounterMetricFamily("forge_batch_rows", "Rows of this run by status.", labels=["batch_job", "status"])
            for status, value in sorted(self.rows.items()):
                rows.add_metric([job, status], value)
            yield rows
            errors = CounterMetricFamily(
                "forge_batch_row_errors", "Failed rows of this run by error kind.", labels=["batch_job", "error_kind"]
            )
            for kind, value in sorted(self.errors.items()):
                errors.add_metric([job, kind], value)
            yield errors
            tokens = CounterMetricFamily("forge_batch_generated_tokens", "Completion tokens generated by this run.", labels=["batch_job"])
            tokens.add_metric([job], self.tokens)
            yield tokens
            cumulative, buckets = 0, []
            for bound, count in zip((*map(str, TTFT_BUCKETS), "+Inf"), self.ttft_counts):
                cumulative += count
                buckets.append((bound, cumulative))
            ttft = HistogramMetricFamily("forge_batch_ttft_seconds", "Time to first token of the run's rows.", labels=["batch_job"])
            ttft.add_metric([job], buckets, self.ttft_sum)
            yield ttft
            gauges: list[tuple[str, str, float | None]] = [
                ("forge_batch_kv_cache_usage_ratio", "KV-cache blocks in use / total (last sample).", self.kv_usage),
                ("forge_batch_run_success", "1 if the run completed, 0 if it failed or was interrupted.",
                 None if self.success is None else float(self.success)),
                (LAST_SUCCESS, "Unix time when a run of this job last completed.", self.last_success),
            ]
            for name, doc, value in gauges:
                if value is not None:
                    gauge = GaugeMetricFamily(name, doc, labels=["batch_job"])
                    gauge.add_metric([job], value)
                    yield gauge


class MetricsExporter:
    """Writes / pushes one run's :class:`RunMetrics` where the job's ``metrics`` block says."""

    def __init__(self, spec: Any, batch_job: str, engine: Any = None) -> None:
        self.spec = spec
        self.engine = engine
        last = previous_last_success(spec.textfile, batch_job) if spec.textfile else None
        self.metrics = RunMetrics(batch_job, last_success=last)
        self.interval = float(spec.interval_s)
        self._last_write = 0.0
        self._warned: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """First write (which also checks that the textfile's folder is writable: a wrong path fails the job
        before anything is generated) and the push thread."""
        self.metrics.sample_engine(self.engine)
        if self.spec.textfile:
            self.write_textfile()
        if self.spec.pushgateway:
            self._thread = threading.Thread(target=self._push_loop, name="forge-batch-metrics-push", daemon=True)
            self._thread.start()

    def observe(self, record: dict[str, Any]) -> None:
        self._quietly(lambda: self.metrics.observe(record), "counting a result")
        now = time.monotonic()
        if now - self._last_write >= self.interval:
            self._last_write = now
            self.metrics.sample_engine(self.engine)
            if self.spec.textfile:
                self._quietly(self.write_textfile, "writing the textfile")

    def finish(self, summary: dict[str, Any]) -> None:
        """The final numbers: textfile, then push. Raises if the final push fails (reported as a warning)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.metrics.sample_engine(self.engine)
        self.metrics.finish(summary)
        if self.spec.textfile:
            self.write_textfile()
        if self.spec.pushgateway:
            # a completed run replaces the job's whole group; a failed one only the metrics it has
            try:
                self.push(replace_group=bool(self.metrics.success))
            except Exception as e:
                reason = getattr(e, "reason", None) or e  # a URLError's reason says more than its repr
                raise RuntimeError(f"the final push to the Pushgateway at {self.spec.pushgateway} failed ({reason}); "
                                   "the run's figures are in summary.json") from None

    def write_textfile(self) -> None:
        from prometheus_client import write_to_textfile

        write_to_textfile(str(self.spec.textfile), self.metrics.registry)

    def push(self, replace_group: bool, timeout: float = FINAL_PUSH_TIMEOUT_S) -> None:
        from prometheus_client import push_to_gateway, pushadd_to_gateway

        send = push_to_gateway if replace_group else pushadd_to_gateway
        send(self.spec.pushgateway, job=self.spec.job, registry=self.metrics.registry, timeout=timeout)

    def _push_loop(self) -> None:
        while not self._stop.wait(max(self.interval, MIN_PUSH_INTERVAL_S)):
            self._quietly(lambda: self.push(replace_group=False, timeout=PUSH_TIMEOUT_S),
                          f"pushing to {self.spec.pushgateway}")

    def _quietly(self, action: Callable[[], None], what: str) -> None:
        """Metrics during the run must never fail a row or stop the job: warn once per kind of failure."""
        try:
            action()
        except Exception as e:
            key = f"{what}: {type(e).__name__}"
            if key not in self._warned:
                self._warned.add(key)
                _warn(f"{what} failed ({type(e).__name__}: {e}); retrying quietly")


@hookimpl
def job_start(job: Any, context: Any) -> None:
    spec = getattr(job, "metrics", None)
    if spec is None:
        return
    exporter = MetricsExporter(spec, job.display_name(), engine=context.engine)
    exporter.start()
    context.state[STATE_KEY] = exporter


@hookimpl
def result_recorded(record: dict[str, Any], context: Any) -> None:
    # the record as written (after validation and the job's own plugins), where it is written: under Ray
    # on the driver, whose context holds the exporter
    exporter = context.state.get(STATE_KEY)
    if exporter is not None:
        exporter.observe(record)


@hookimpl
def job_end(job: Any, context: Any, summary: dict[str, Any]) -> None:
    exporter = context.state.pop(STATE_KEY, None)
    if exporter is not None:
        exporter.finish(summary)
