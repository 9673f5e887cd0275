"""The `metrics` job key: node_exporter textfile metrics during and at the end of a run, Pushgateway pushes,
success / failure, and the key's validation. On FakeLLM (fast, deterministic)."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from runner_helpers import make_job, prompts, read_output, run, write_jsonl

from forge_batch.hookspecs import hookimpl
from forge_batch.job import JobError

BAD_ROWS = [{"id": "bad1", "prompt": ""}, "not json"]


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition as {(name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted({"batch_job": "nightly", **labels}.items()))))


def metrics_job(tmp_path: Path, rows: list[Any], metrics: dict[str, Any], **extra: Any):
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = {"name": "nightly", "input": {"path": "in.jsonl"}, "output": {"path": "out", "rows_per_file": 5},
            "max_error_rate": 0.5, "metrics": metrics, **extra}
    return make_job(tmp_path, data)


def test_textfile_has_the_run_numbers(tmp_path: Path) -> None:
    prom = tmp_path / "textfile" / "nightly.prom"
    prom.parent.mkdir()
    job = metrics_job(tmp_path, prompts(20) + BAD_ROWS, {"textfile": str(prom)}, sampling={"n": 2, "max_tokens": 6})
    before = time.time()
    result = run(job)
    assert result.status == "completed"
    assert sorted(p.name for p in prom.parent.iterdir()) == ["nightly.prom"]  # no temp file left behind
    samples = parse(prom.read_text())
    this_run = result.summary["this_run"]
    assert value(samples, "forge_batch_rows_total", status="ok") == this_run["rows_ok"] == 20
    assert value(samples, "forge_batch_rows_total", status="failed") == this_run["rows_failed"] == 2
    assert value(samples, "forge_batch_row_errors_total", error_kind="empty_prompt") == 1
    assert value(samples, "forge_batch_row_errors_total", error_kind="malformed_json") == 1
    assert value(samples, "forge_batch_generated_tokens_total") == this_run["completion_tokens"] > 0
    rows = [r for r in read_output(tmp_path / "out") if r["sample_index"] == 0 and r["error"] is None]
    assert value(samples, "forge_batch_ttft_seconds_count") == len(rows) == 20
    assert value(samples, "forge_batch_ttft_seconds_sum") == pytest.approx(sum(r["ttft_s"] for r in rows))
    assert value(samples, "forge_batch_ttft_seconds_bucket", le="+Inf") == 20
    assert value(samples, "forge_batch_ttft_seconds_bucket", le="0.05") == sum(r["ttft_s"] <= 0.05 for r in rows)
    kv = value(samples, "forge_batch_kv_cache_usage_ratio")
    assert kv is not None and 0 <= kv <= 1
    assert value(samples, "forge_batch_run_success") == 1
    assert before <= value(samples, "forge_batch_last_success_timestamp_seconds") <= time.time()


def test_textfile_is_written_during_the_run(tmp_path: Path) -> None:
    prom = tmp_path / "nightly.prom"
    seen: list[dict] = []

    class ReadMidway:
        records = 0

        @hookimpl
        def process_result(self, record: dict[str, Any]) -> None:
            self.records += 1
            if self.records == 12:
                seen.append(parse(prom.read_text()))

    job = metrics_job(tmp_path, prompts(30), {"textfile": str(prom), "interval_s": 0})
    assert run(job, plugins=[("midway", ReadMidway())]).status == "completed"
    midway = seen[0]
    assert value(midway, "forge_batch_rows_total", status="ok") == 11  # every row before this one
    assert value(midway, "forge_batch_run_success") is None  # only known at the end
    assert value(parse(prom.read_text()), "forge_batch_rows_total", status="ok") == 30


def test_a_failed_run_sets_run_success_0_and_keeps_the_last_success(tmp_path: Path) -> None:
    prom = tmp_path / "nightly.prom"
    assert run(metrics_job(tmp_path / "a", prompts(5), {"textfile": str(prom)})).status == "completed"
    last_success = value(parse(prom.read_text()), "forge_batch_last_success_timestamp_seconds")
    assert last_success is not None

    bad = metrics_job(tmp_path / "b", prompts(3) + BAD_ROWS * 3, {"textfile": str(prom)}, max_error_rate=0.0)
    result = run(bad)
    assert result.status == "failed"
    samples = parse(prom.read_text())
    assert value(samples, "forge_batch_run_success") == 0
    assert value(samples, "forge_batch_last_success_timestamp_seconds") == last_success
    assert value(samples, "forge_batch_rows_total", status="failed") == 6


def test_a_textfile_in_a_missing_folder_fails_the_job_before_generating(tmp_path: Path) -> None:
    job = metrics_job(tmp_path, prompts(3), {"textfile": str(tmp_path / "nope" / "x.prom")})
    with pytest.raises(Exception, match="metrics.textfile.*not a folder"):
        run(job)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


class _Gateway:
    """A local HTTP server that records what a Pushgateway would receive."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.append((self.command, self.path, body.decode()))
                self.send_response(200)
                self.end_headers()

            do_PUT = do_POST = _record

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def gateway():
    g = _Gateway()
    yield g
    g.close()


def test_pushes_during_the_run_and_at_the_end(tmp_path: Path, gateway: _Gateway) -> None:
    job = metrics_job(tmp_path, prompts(24), {"pushgateway": gateway.url, "job": "gen", "interval_s": 0.2},
                      engine={"max_num_seqs": 2})
    # Two rows at a time, 1-3 steps each, 0.1 s a step: the sleeps alone last about 2.4 s, several push
    # intervals (at least 0.5 s) however fast the machine is.
    result = run(job, step_delay=0.1)
    assert result.status == "completed"
    methods = [m for m, _, _ in gateway.received]
    assert methods[-1] == "PUT" and "POST" in methods[:-1], methods  # periodic pushes add, the final one replaces
    assert all(path == "/metrics/job/gen" for _, path, _ in gateway.received)
    final = parse(gateway.received[-1][2])
    assert value(final, "forge_batch_rows_total", status="ok") == 24
    assert value(final, "forge_batch_run_success") == 1
    assert value(final, "forge_batch_last_success_timestamp_seconds") is not None
    during = parse(gateway.received[0][2])
    assert value(during, "forge_batch_run_success") is None


def test_a_failed_run_pushes_without_replacing_the_last_success(tmp_path: Path, gateway: _Gateway) -> None:
    job = metrics_job(tmp_path, BAD_ROWS * 3, {"pushgateway": gateway.url, "interval_s": 60}, max_error_rate=0.0)
    assert run(job).status == "failed"
    method, path, body = gateway.received[-1]
    assert method == "POST" and path == "/metrics/job/forge_batch"
    final = parse(body)
    assert value(final, "forge_batch_run_success") == 0
    assert value(final, "forge_batch_last_success_timestamp_seconds") is None  # the gateway keeps its value


def test_an_unreachable_gateway_warns_and_the_run_completes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = metrics_job(tmp_path, prompts(40), {"pushgateway": f"http://127.0.0.1:{port}", "interval_s": 0.1})
    from runner_helpers import fake_factory

    from forge_batch.plugin_manager import get_plugin_manager
    from forge_batch.runner import JobRunner

    runner = JobRunner(job, engine_factory=fake_factory(step_delay=0.05), plugin_manager=get_plugin_manager(entry_points=False),
                       progress="none", install_signal_handlers=False)
    result = runner.run()
    assert result.status == "completed" and len(read_output(tmp_path / "out")) == 40
    err = capsys.readouterr().err
    warnings = [r.getMessage() for r in caplog.records if r.name == "forge_batch.plugins.metrics"]
    assert len(warnings) == 1 and warnings[0].startswith("metrics: pushing to")  # warned once, not per push
    # the final push failure is reported, saying where and why
    assert "raised in job_end" in err and f"the final push to the Pushgateway at http://127.0.0.1:{port} failed" in err
    assert "Connection refused" in err and "summary.json" in err


@pytest.mark.parametrize(
    ("metrics", "where", "message"),
    [
        ({"pushgateway": "ftp://gw:9091"}, "metrics.pushgateway", "http:// or https:// URL"),
        ({"pushgateway": "gateway:9091"}, "metrics.pushgateway", "http:// or https:// URL"),
        ({"textfile": "metrics.txt"}, "metrics.textfile", "must end with .prom"),
        ({"job": "x"}, "metrics", "textfile and/or pushgateway"),
        ({"textfile": "a.prom", "interval_s": -1}, "metrics.interval_s", "greater than or equal to 0"),
        ({"textfile": "a.prom", "port": 1}, "metrics.port", "unknown key"),
    ],
)
def test_metrics_key_is_validated(tmp_path: Path, metrics: dict, where: str, message: str) -> None:
    with pytest.raises(JobError) as e:
        make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}, "metrics": metrics})
    assert any(p.path == where and message in p.message for p in e.value.problems), e.value.problems


def test_a_relative_textfile_is_relative_to_the_job_file(tmp_path: Path) -> None:
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"},
                              "metrics": {"textfile": "prom/nightly.prom", "pushgateway": "https://gw.example:9091"}})
    assert job.metrics.textfile == str(tmp_path / "prom" / "nightly.prom")
    assert job.metrics.job == "forge_batch" and job.metrics.interval_s == 15


def test_docs_list_every_metric_and_only_those(tmp_path: Path) -> None:
    import re

    prom = tmp_path / "nightly.prom"
    assert run(metrics_job(tmp_path, prompts(3) + BAD_ROWS, {"textfile": str(prom)})).status == "completed"
    families = text_string_to_metric_families(prom.read_text())
    written = {f.name + "_total" if f.type == "counter" else f.name for f in families}
    section = (Path(__file__).resolve().parents[1] / "docs" / "jobs.md").read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)(?:\{\w+\})?` \|", section, flags=re.M))
    assert documented == written
