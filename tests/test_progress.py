"""Progress stays honest: rows done / total when the total is cheap to know, counting rows earlier runs
committed, with an ETA from this run's own rate, tok/s and KV use."""

from __future__ import annotations

import gzip
import io
import logging
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runner_helpers import fake_factory, make_job, prompts, write_jsonl

from forge_batch.io.progress import Progress, format_eta
from forge_batch.job import InputSpec
from forge_batch.plugin_manager import get_plugin_manager
from forge_batch.plugins.readers import JsonlReader, ParquetReader
from forge_batch.runner import JobRunner
from forge_batch.runner import inputs as inputs_module
from forge_batch.runner.inputs import count_rows


def test_the_total_is_counted_only_when_cheap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(30)]}), tmp_path / "in.parquet")
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as f:
        f.write("".join(f'{{"prompt": "p{i}"}}\n' for i in range(7)))
    spec, jsonl, parquet = InputSpec(path="x"), JsonlReader(), ParquetReader()
    assert count_rows([(str(tmp_path / "in.parquet"), parquet)], spec) == 30
    assert count_rows([(str(tmp_path / "in.jsonl"), jsonl), (str(tmp_path / "in.jsonl.gz"), jsonl)], spec) == 19
    assert count_rows([(str(tmp_path / "in.jsonl"), jsonl)], InputSpec(path="x", limit=5)) == 5
    assert count_rows([("memory://bucket/in.jsonl", jsonl)], spec) is None  # remote: a scan is not cheap

    jsonl_bytes = (tmp_path / "in.jsonl").stat().st_size
    gz_bytes = (tmp_path / "in.jsonl.gz").stat().st_size
    monkeypatch.setattr(inputs_module, "COUNT_JSONL_BYTES", jsonl_bytes)
    assert count_rows([(str(tmp_path / "in.jsonl"), jsonl)], spec) == 12
    monkeypatch.setattr(inputs_module, "COUNT_JSONL_BYTES", jsonl_bytes - 1)
    assert count_rows([(str(tmp_path / "in.jsonl"), jsonl)], spec) is None
    # a gzipped file weighs what it inflates to (about GZIP_RATIO times its size); Parquet is never scanned
    monkeypatch.setattr(inputs_module, "COUNT_JSONL_BYTES", gz_bytes * inputs_module.GZIP_RATIO - 1)
    assert count_rows([(str(tmp_path / "in.jsonl.gz"), jsonl)], spec) is None
    monkeypatch.setattr(inputs_module, "COUNT_JSONL_BYTES", 0)
    assert count_rows([(str(tmp_path / "in.parquet"), parquet)], spec) == 30


def test_eta_and_rate_count_only_this_runs_rows() -> None:
    buf = io.StringIO()
    p = Progress(total=100, initial=40, mode="log", stream=buf, log_interval=3600, desc="job")
    p.update(10, 500, None)
    p.t0 = time.monotonic() - 10.0  # this run: 10 rows in 10 s (the 40 earlier rows are not its work)
    assert p.rows_per_s() == pytest.approx(1.0, rel=0.01)
    assert p.eta_s() == pytest.approx(50.0, rel=0.01)
    p.stats = {"running": 3, "waiting": 2, "kv_blocks_used": 30, "kv_blocks_total": 120}
    line = p.line()
    assert line.startswith("job: 50/100 rows (50.0%), 1.0 rows/s, ETA 50s, 50 tok/s") and "kv 30/120 (25%)" in line
    fields = p.fields()
    assert fields["rows_done"] == 50 and fields["rows_from_earlier_runs"] == 40 and fields["kv_usage_ratio"] == 0.25
    assert format_eta(4000) == "1h06m" and format_eta(125) == "2m05s" and format_eta(None) == "?"
    # an input now shorter than what earlier runs committed has no honest total
    assert Progress(total=10, initial=12, mode="none").total is None


def _runner(job, stream: io.StringIO, mode: str = "log") -> JobRunner:
    return JobRunner(job, engine_factory=fake_factory(), plugin_manager=get_plugin_manager([], entry_points=False),
                     progress=mode, install_signal_handlers=False, stream=stream, log_interval=0)


def test_a_resumed_run_starts_the_count_at_the_committed_rows(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(10))
    data = {"input": {"path": "in.jsonl"}, "output": {"path": "out"}}
    first = io.StringIO()
    assert _runner(make_job(tmp_path, data, ["input.limit=4"]), first).run().status == "completed"
    lines = [ln for ln in first.getvalue().splitlines() if " rows (" in ln]
    assert lines[0].startswith("out: 1/4 rows (25.0%)") and lines[-1].startswith("out: 4/4 rows (100.0%)")

    second = io.StringIO()  # log_interval=0: a line for every finished row, whatever the machine's speed
    assert _runner(make_job(tmp_path, data), second).run().status == "completed"
    text = second.getvalue()
    assert "4 rows already committed" in text
    lines = [ln for ln in text.splitlines() if " rows (" in ln]
    assert [ln.split(" rows (")[0] for ln in lines[:-1]] == [f"out: {k}/10" for k in range(5, 11)]
    assert lines[-1].startswith("out: 10/10 rows (100.0%)") and "ETA" not in lines[-1]


def test_progress_events_for_json_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}})
    stream = io.StringIO()
    runner = JobRunner(job, engine_factory=fake_factory(), plugin_manager=get_plugin_manager([], entry_points=False),
                       install_signal_handlers=False, stream=stream, log_interval=0, log_events=True)
    with caplog.at_level(logging.INFO, logger="forge_batch"):
        assert runner.run().status == "completed"
    assert stream.getvalue() == ""  # nothing printed: every message went out as a log record
    progress = [r for r in caplog.records if r.name == "forge_batch.io.progress"]
    assert [r.fields["rows_done"] for r in progress] == [1, 2, 3, 3]  # type: ignore[attr-defined]
    assert all(r.fields["rows_total"] == 3 for r in progress)  # type: ignore[attr-defined]
