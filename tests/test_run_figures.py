"""The run figures summary.json gains: latency quantiles from a bounded histogram, throughput over time in
bounded buckets, and the engine's own figures (peak KV use, preemptions, prefix-cache hits, inter-token
latency), checked through real runs of the tiny model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
from runner_helpers import read_output, write_jsonl

from forge_batch.cli import main
from forge_batch.contract import ErrorKind
from forge_batch.engine.histogram import LogHistogram
from forge_batch.io.output_dir import state_dir_for
from forge_batch.job import job_from_dict
from forge_batch.report import write_report
from forge_batch.runner import JobRunner
from forge_batch.runner.run_figures import ThroughputSeries


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def test_histogram_quantiles_are_within_one_percent() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-1.0, 1.5) for _ in range(20_000)]
    hist = LogHistogram()
    for v in values:
        hist.add(v)
    for q in (0.5, 0.9, 0.99):
        exact = nearest_rank(values, q)
        assert abs(hist.quantile(q) - exact) <= 0.01 * exact
    d = hist.to_dict()
    assert d["count"] == len(values) and d["max"] == pytest.approx(max(values), rel=1e-5)
    assert d["mean"] == pytest.approx(sum(values) / len(values), rel=1e-5)


def test_histogram_memory_is_bounded_and_merges() -> None:
    a, b, both = LogHistogram(), LogHistogram(), LogHistogram()
    for i in range(200_000):
        v = 10 ** ((i % 1000) / 100 - 6)  # 1 µs .. 10^4 s, many times over
        (a if i % 2 else b).add(v)
        both.add(v)
    a.add(0.0)
    both.add(0.0)
    assert len(both.buckets) <= 1 + math.ceil(math.log(1e10) / math.log(1.02))
    a.merge(b)
    assert a.buckets == both.buckets and a.count == both.count
    assert a.quantile(0.001) == 0.0  # the zero sits in the underflow bucket, reported as the minimum
    assert LogHistogram().to_dict() == {"count": 0} and LogHistogram().quantile(0.5) is None


def test_throughput_series_stays_bounded_and_keeps_every_count() -> None:
    series = ThroughputSeries(interval_s=1.0, max_points=8)
    for t in range(100):
        series.add(t + 0.5, 1, 10)
    assert len(series.rows) <= 8 and series.interval_s == 16.0
    assert sum(series.rows) == 100 and sum(series.tokens) == 1000
    d = series.to_dict(elapsed_s=100.0)
    # the last bucket (96 s .. 100 s) is divided by the 4 s the run lasted in it
    assert d["rows_per_s"][-1] == pytest.approx(series.rows[-1] / 4.0)
    assert d["rows_per_s"][0] == pytest.approx(16 / 16.0)


def _run(job):
    return JobRunner(job, progress="none", install_signal_handlers=False).run()


def _job(model: Path, tmp_path: Path, **engine) -> dict:
    return {
        "model": str(model), "input": {"path": "in.jsonl"}, "output": {"path": "out"},
        "sampling": {"temperature": 0, "max_tokens": 12, "ignore_eos": True}, "max_error_rate": 0.5,
        "engine": {"max_num_seqs": 4, "block_size": 4, "max_model_len": 128, **engine},
    }


def test_summary_figures_of_a_real_run(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a shared header (prefix-cache hits), a cache too small for four growing rows (preemptions), and a
    # prompt longer than the context (an error kind)
    rows = [{"id": f"r{i}", "prompt": "shared header " * 6 + f"item {i}"} for i in range(8)]
    rows.append({"id": "long", "prompt": "long " * 300})
    write_jsonl(tmp_path / "in.jsonl", rows)
    result = _run(job_from_dict(_job(tiny_model_dir, tmp_path, num_blocks=24), base_dir=tmp_path))
    assert result.status == "completed"
    summary = json.loads((state_dir_for(tmp_path / "out") / "summary.json").read_text())
    out = [r for r in read_output(tmp_path / "out") if r["error"] is None]
    assert len(out) == 8

    lat = summary["latency"]
    for name, column in (("ttft_s", "ttft_s"), ("latency_s", "latency_s")):
        values = [r[column] for r in out]
        assert lat[name]["count"] == 8
        for q in (50, 90, 99):
            exact = nearest_rank(values, q / 100)
            assert abs(lat[name][f"p{q}"] - exact) <= 0.01 * exact + 1e-6
        assert lat[name]["p50"] <= lat[name]["p90"] <= lat[name]["p99"] <= lat[name]["max"]
    # one inter-token gap per token after a sample's first
    assert lat["itl_s"]["count"] == sum(r["completion_tokens"] - 1 for r in out)
    assert 0 < lat["itl_s"]["p50"] <= lat["itl_s"]["p99"]

    kv = summary["kv_cache"]
    assert kv["blocks_total"] == 24 and 0 < kv["peak_blocks"] <= 24
    assert kv["peak_ratio"] == round(kv["peak_blocks"] / 24, 4)
    assert summary["preemptions"] > 0
    prefix = summary["prefix_cache"]
    assert 0 < prefix["hits"] <= prefix["queries"] and prefix["hit_rate"] == round(prefix["hits"] / prefix["queries"], 4)

    series = summary["throughput_over_time"]
    assert 1 <= len(series["rows_per_s"]) <= 120 and len(series["output_tokens_per_s"]) == len(series["rows_per_s"])
    assert sum(series["rows_per_s"]) > 0 and all(v >= 0 for v in series["output_tokens_per_s"])

    kinds = summary["error_kinds"]
    assert set(kinds) == {k.value for k in ErrorKind}
    assert kinds["prompt_too_long"] == 1 and sum(kinds.values()) == 1

    # inspect and the report show them
    assert main(["inspect", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert f"p99 {lat['ttft_s']['p99']:.4g} s (last run)" in text
    assert f"KV peak {kv['peak_blocks']}/24 blocks" in text and f"{summary['preemptions']} preemptions" in text
    page = write_report(tmp_path / "out", tmp_path / "r.html").read_text()
    section = page.split('<section id="last-run">')[1].split("</section>")[0]
    assert "inter-token latency</td><td class=\"n\">" + f"{lat['itl_s']['count']}<" in section
    assert f"<td>{summary['preemptions']}</td>" in section


def test_figures_on_resume_are_this_runs_and_counts_the_whole_jobs(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"distinct prompt number {i}"} for i in range(6)]
    rows.insert(2, {"id": "long", "prompt": "long " * 300})
    write_jsonl(tmp_path / "in.jsonl", rows)
    first = _run(job_from_dict(_job(tiny_model_dir, tmp_path), base_dir=tmp_path, overrides=["input.limit=4"]))
    assert first.summary["rows"] == 4 and first.summary["error_kinds"]["prompt_too_long"] == 1
    second = _run(job_from_dict(_job(tiny_model_dir, tmp_path), base_dir=tmp_path))
    s = second.summary
    assert s["rows"] == 7 and s["this_run"]["rows"] == 3
    assert s["error_kinds"]["prompt_too_long"] == 1  # the whole output's, from the committed ledgers
    assert s["this_run"]["error_kinds"]["prompt_too_long"] == 0
    assert s["latency"]["ttft_s"]["count"] == 3 and s["latency"]["latency_s"]["count"] == 3  # this run's rows
    this_run_tokens = s["this_run"]["completion_tokens"]
    assert s["latency"]["itl_s"]["count"] == this_run_tokens - 3


def test_throughput_series_spreads_a_rows_tokens_over_its_decode() -> None:
    series = ThroughputSeries(interval_s=1.0, max_points=8)
    series.add(5.0, 1, 0)
    series.add_span(1.0, 5.0, 100)  # first token at 1 s, finished at 5 s
    assert series.rows == [0, 0, 0, 0, 0, 1]
    assert series.tokens == pytest.approx([0, 25, 25, 25, 25, 0])
    series.add_span(2.5, 20.0, 70)  # coarsens to 4 s buckets, keeps every token
    assert series.interval_s == 4.0 and sum(series.tokens) == pytest.approx(170)
    assert series.tokens[0] == pytest.approx(75 + 70 * 1.5 / 17.5)
