"""`forge-batch report`: one self-contained HTML page per run, for every output format, on a run still in
progress, across resumes, and on a million rows in bounded memory; opened in headless Chromium when the
machine has it."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fakes import FakeLLM
from runner_helpers import REPO, make_job, prompts, read_output, run, write_jsonl

from forge_batch.cli import main
from forge_batch.hookspecs import hookimpl
from forge_batch.io.output_dir import state_dir_for
from forge_batch.io.output_stats import collect_output_stats
from forge_batch.io.schema import output_schema
from forge_batch.plugin_manager import get_plugin_manager
from forge_batch.report import SECTIONS, default_report_path, write_report
from forge_batch.runner import JobRunner

FORMATS = ("parquet", "jsonl", "openai-batch")
BAD_ROWS = [{"id": "bad1", "prompt": ""}, "not json", {"id": "r0001", "prompt": "again"}]


class _MarkValid:
    """Sets ``valid`` as a constraint checker would: every third row's samples are invalid."""

    @hookimpl
    def process_result(self, record: dict[str, Any]) -> None:
        if record.get("error") is None:
            record["valid"] = record["row_index"] % 3 != 0


def _run_job(tmp_path: Path, fmt: str, rows: list[Any], **extra: Any):
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = {
        "input": {"path": "in.jsonl"},
        "output": {"path": "out", "format": fmt, "rows_per_file": 8},
        "sampling": {"n": 2, "max_tokens": 5},
        "max_error_rate": 0.5,
        **extra,
    }
    return run(make_job(tmp_path, data), plugins=[("mark_valid", _MarkValid())])


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', page)]


def assert_self_contained(page: str) -> None:
    """No script, no external style sheet, nothing fetched over the network."""
    assert "<script" not in page.lower()
    assert "<link" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, flags=re.I)
    assert not re.search(r"url\(\s*['\"]?https?:", page, flags=re.I)
    for svg in _images(page):
        assert b"<svg" in svg
        assert not re.search(rb"""(xlink:)?href\s*=\s*["']https?:""", svg)


@pytest.mark.parametrize("fmt", FORMATS)
def test_report_of_each_output_format(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture) -> None:
    result = _run_job(tmp_path, fmt, prompts(30) + BAD_ROWS)
    assert result.status == "completed", result.message
    summary = result.summary

    assert main(["report", str(tmp_path / "out")]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == default_report_path(tmp_path / "out") and path.is_file()
    page = path.read_text()
    assert_self_contained(page)
    for sid, title in SECTIONS:
        assert f'<section id="{sid}"><h2>{title}</h2>' in page
    # throughput, lengths, finish reasons, errors, samples; and where the format has them, timings and validity
    assert len(_images(page)) == (5 if fmt == "openai-batch" else 7)

    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0  # every format names its model
    assert json.loads(capsys.readouterr().out)["model"] == summary["model"]
    stats = collect_output_stats(tmp_path / "out")
    assert stats.output_format == fmt and stats.status == "completed"
    assert stats.rows == summary["rows"] == 33
    assert stats.prompt_tokens == summary["prompt_tokens"]
    assert stats.completion_tokens == summary["completion_tokens"]
    # every failed row fails all its samples; the OpenAI format writes a failed request as one line
    per_failed_row = 1 if fmt == "openai-batch" else 2
    assert stats.samples_per_row == ({2: 30, 1: 3} if fmt == "openai-batch" else {2: 33})
    assert dict(stats.error_kinds) == {k: per_failed_row * v for k, v in summary["failed_by_kind"].items()}
    assert stats.finish_reasons["error"] == 3 * per_failed_row
    assert stats.finish_reasons["stop"] + stats.finish_reasons["length"] == 60
    assert [e["id"] for e in stats.error_examples["empty_prompt"]] == ["bad1"]
    assert "bad1" in page and "duplicate id &#x27;r0001&#x27;" in page
    assert len(stats.runs) == 1 and stats.runs[0].rows == 33
    assert len(stats.throughput) == 1 and stats.throughput[0].rows_per_s.sum() > 0
    if fmt == "openai-batch":  # no timings, no valid column in that format
        assert stats.ttft_s is None and not stats.valid
    else:
        rows = [json.loads(line) for p in sorted((tmp_path / "out").glob("part-*")) for line in p.read_text().splitlines()] \
            if fmt == "jsonl" else read_output(tmp_path / "out")
        ttft = sorted(r["ttft_s"] for r in rows if r["sample_index"] == 0 and r["error"] is None)
        assert stats.ttft_s is not None and stats.ttft_s.count == 30
        assert stats.ttft_s.p50 == pytest.approx(float(np.percentile(ttft, 50)))
        assert stats.valid == Counter({"True": sum(r["valid"] is True for r in rows), "False": sum(r["valid"] is False for r in rows),
                                       "null": 6})
        assert stats.per_sample[1]["valid_rate"] == pytest.approx(20 / 30)
        assert "valid rate of constrained samples" in page


def test_a_samples_mean_length_leaves_out_the_samples_that_failed(tmp_path: Path) -> None:
    """An invalid_output sample keeps the tokens the model wrote; the per-sample mean, like the completion
    length table, is over the samples that did not fail."""
    import pyarrow.parquet as pq

    from forge_batch.io.schema import output_schema, records_to_table

    schema = output_schema("id", pa.int64(), [], include_prompt=False)
    recs = [{"id": i, "row_index": i, "sample_index": 0, "text": "t", "finish_reason": "stop", "completion_tokens": tokens,
             "prompt_tokens": 3, "error": error, "error_kind": error and "invalid_output"}
            for i, (tokens, error) in enumerate([(10, None), (20, None), (90, "cut off")])]
    (tmp_path / "out").mkdir()
    pq.write_table(records_to_table(recs, schema), tmp_path / "out" / "part-00000.parquet")
    sample = collect_output_stats(tmp_path / "out").per_sample[0]
    assert sample["completion_tokens"] == 120 and sample["mean_completion_tokens"] == 15


def test_report_while_the_run_is_in_progress(tmp_path: Path) -> None:
    """A report taken from inside the run (parts committed, lock held, no summary yet) says so and counts
    the committed parts only."""
    seen: dict[str, Any] = {}

    class ReportMidway:
        records = 0

        @hookimpl
        def process_result(self, record: dict[str, Any]) -> None:
            self.records += 1
            if self.records == 30 and not seen:
                seen["stats"] = collect_output_stats(tmp_path / "out")
                seen["page"] = write_report(tmp_path / "out", tmp_path / "midway.html").read_text()

    write_jsonl(tmp_path / "in.jsonl", prompts(40))
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out", "rows_per_file": 5}})
    assert run(job, plugins=[("midway", ReportMidway())]).status == "completed"
    stats = seen["stats"]
    assert stats.status.startswith("in progress") and stats.summary is None
    assert 0 < stats.rows < 40 and stats.rows % 5 == 0  # whole parts only
    assert "in progress" in seen["page"]
    assert collect_output_stats(tmp_path / "out").rows == 40


def test_report_ignores_a_part_being_written(tmp_path: Path) -> None:
    assert _run_job(tmp_path, "parquet", prompts(10)).status == "completed"
    (tmp_path / "out" / ".part-00099.parquet.tmp").write_bytes(b"half a parquet file")
    (state_dir_for(tmp_path / "out") / "summary.json").unlink()
    stats = collect_output_stats(tmp_path / "out")
    assert stats.rows == 10 and stats.status.startswith("in progress")


class _EngineWithInfo(FakeLLM):
    def __init__(self, dtype: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.engine_info = {"model_digest": "blake2b:feed", "device": "cpu", "dtype": dtype, "quantization": None,
                            "max_model_len": 512, "kernel_path": "cpu-c"}


def _run_with_engine(tmp_path: Path, dtype: str, limit: int | None, force: bool = False):
    job = make_job(tmp_path, {"input": {"path": "in.jsonl", "limit": limit}, "output": {"path": "out", "rows_per_file": 4}})
    runner = JobRunner(
        job, engine_factory=lambda job, **kw: _EngineWithInfo(dtype), plugin_manager=get_plugin_manager(entry_points=False),
        progress="none", install_signal_handlers=False, force_resume=force,
    )
    return runner.run()


def test_resume_history_and_engine(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(20))
    assert _run_with_engine(tmp_path, "float32", limit=6).status == "completed"
    assert _run_with_engine(tmp_path, "float32", limit=13).status == "completed"  # a plain resume
    assert _run_with_engine(tmp_path, "bfloat16", limit=None, force=True).status == "completed"

    stats = collect_output_stats(tmp_path / "out")
    assert [r.rows for r in stats.runs] == [6, 7, 7]
    assert [len(r.parts) for r in stats.runs] == [2, 2, 2]
    assert [r.resumed_rows for r in stats.runs] == [0, 6, 13]
    assert all(r.started_by == "runs.jsonl" and r.ended == "completed" for r in stats.runs)
    assert stats.engine is not None and stats.engine["dtype"] == "bfloat16"
    assert len(stats.forced_resumes) == 1
    page = write_report(tmp_path / "out").read_text()
    assert "blake2b:feed" in page and "cpu-c" in page
    assert "The parts were written by different engines" in page and "Forced resumes" in page
    assert "dtype: &#x27;float32&#x27; -&gt; &#x27;bfloat16&#x27;" in page

    # a run killed before its end line: its parts are still its own
    log = state_dir_for(tmp_path / "out") / "runs.jsonl"
    lines = log.read_text().splitlines()
    ends = [i for i, line in enumerate(lines) if '"event": "end"' in line]
    log.write_text("\n".join(line for i, line in enumerate(lines) if i != ends[1]) + "\n")
    stats = collect_output_stats(tmp_path / "out")
    assert [r.rows for r in stats.runs] == [6, 7, 7] and [r.ended for r in stats.runs] == ["completed", None, "completed"]
    assert "no end line: killed, or still running" in write_report(tmp_path / "out").read_text()

    # without the log, runs are guessed: the engine change shows (where a run starts to the second is a
    # guess from timestamps, so only the change and the total are asserted)
    log.unlink()
    stats = collect_output_stats(tmp_path / "out")
    assert sum(r.rows for r in stats.runs) == 20
    assert any(r.started_by == "engine changed" for r in stats.runs)


def test_a_fresh_start_restarts_the_run_log(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(8))
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out", "rows_per_file": 4}})
    assert run(job).status == "completed"
    assert run(job, overwrite=True).status == "completed"
    log = [json.loads(line) for line in (state_dir_for(tmp_path / "out") / "runs.jsonl").read_text().splitlines()]
    assert [e["event"] for e in log] == ["start", "end"] and log[0]["parts_at_start"] == 0 and log[1]["parts_at_end"] == 2
    assert [r.rows for r in collect_output_stats(tmp_path / "out").runs] == [8]


def test_report_of_a_missing_directory_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no output directory" in capsys.readouterr().err


def test_report_and_inspect_of_a_folder_that_is_no_output_say_so_and_write_nothing(tmp_path: Path,
                                                                                  capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for command in ("report", "inspect"):
        assert main([command, str(folder)]) == 2
        assert f"no forge-batch output at {folder}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no state folder made beside it


def test_a_report_page_is_not_written_among_the_parts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _run_job(tmp_path, "parquet", prompts(4)).status == "completed"
    assert main(["report", str(tmp_path / "out"), "--html", str(tmp_path / "out" / "report.html")]) == 2
    assert "readers of the folder would take it for data" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.html").exists()
    assert main(["report", str(tmp_path / "out"), "--html", str(tmp_path / "out" / "_report.html")]) == 0


@pytest.mark.parametrize("damaged, says", [("part", "is corrupt or truncated"), ("summary", "is truncated or corrupt")])
def test_report_of_a_damaged_output_names_the_file_as_inspect_does(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    damaged: str, says: str) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(4))
    run(make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out", "rows_per_file": 2}}))
    if damaged == "part":
        path = sorted((tmp_path / "out").glob("part-*.parquet"))[-1]
    else:
        path = state_dir_for(tmp_path / "out") / "summary.json"
    path.write_bytes(path.read_bytes()[:40])  # truncated
    for command in ("report", "inspect"):
        assert main([command, str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert f"{path} {says}" in err and "Traceback" not in err, err


def test_inspect_says_a_run_goes_on_when_parts_were_committed_after_the_summary(tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture) -> None:
    import datetime as dt

    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    run(make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}}))
    manifest = state_dir_for(tmp_path / "out") / "manifest.json"
    data = json.loads(manifest.read_text())
    data["updated_at"] = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=5)).isoformat()  # a resume commits
    manifest.write_text(json.dumps(data))
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["status"].startswith("in progress") and "from an earlier run" in info["message"]
    (state_dir_for(tmp_path / "out") / "summary.json").unlink()  # a first run still going (or killed)
    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "in progress (or killed): no summary.json yet" in capsys.readouterr().out


def test_report_of_a_plugin_writers_output_says_what_it_reads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import types

    from forge_batch.plugins.writers import JsonlWriter

    class CsvWriter(JsonlWriter):
        name, extension = "csv", ".csv"

        def write_part(self, table, path, context):
            Path(path).write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in zip(table["id"].to_pylist(),
                                                                                      table["text"].to_pylist())))

    @hookimpl
    def register_writers():
        return {"csv": CsvWriter()}

    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    run(make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out", "format": "csv"}}),
        plugins=[("csvw", types.SimpleNamespace(register_writers=register_writers))])
    assert main(["report", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds csv parts (a plugin's writer): report reads parquet, jsonl, openai-batch outputs" in err, err
    assert "corrupt" not in err


def _write_million_rows(out: Path, rows: int = 1_000_000, chunk: int = 100_000) -> None:
    """One part of ``rows`` rows shaped like a real output, with 400-character texts: loading the text
    column alone would take 400 MB."""
    out.mkdir(parents=True)
    schema = output_schema("id", pa.string(), [], include_prompt=False)
    rng = np.random.default_rng(0)
    text = pa.array(["x" * 400] * chunk)
    with pq.ParquetWriter(out / "part-00000.parquet", schema, compression="zstd") as writer:
        for start in range(0, rows, chunk):
            idx = pa.array(np.arange(start, start + chunk))
            failed = pc.equal(pc.bit_wise_and(idx, 127), 0)
            columns = {
                "id": pc.binary_join_element_wise("r", idx.cast(pa.string()), ""),
                "row_index": idx,
                "sample_index": pa.array(np.zeros(chunk, np.int64)),
                "text": text,
                "finish_reason": pc.if_else(failed, "error", "stop"),
                "valid": pa.nulls(chunk, pa.bool_()),
                "prompt_tokens": pa.array(rng.integers(5, 500, chunk)),
                "completion_tokens": pa.array(rng.integers(1, 256, chunk)),
                "error": pc.if_else(failed, "engine exploded", pa.scalar(None, pa.string())),
                "error_kind": pc.if_else(failed, "engine_error", pa.scalar(None, pa.string())),
                "ttft_s": pa.array(rng.gamma(2.0, 0.2, chunk)),
                "latency_s": pa.array(rng.gamma(4.0, 1.0, chunk)),
                "finished_at": pa.array(((1.76e9 + np.arange(start, start + chunk) * 0.01) * 1e6).astype(np.int64)).cast(
                    pa.timestamp("us", tz="UTC")
                ),
                "extra": pa.nulls(chunk, pa.string()),
            }
            writer.write_table(pa.table(columns, schema=schema))


MEASURE = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np, pyarrow as pa
    import matplotlib.figure  # noqa: F401  (the baseline includes the libraries the report uses)
    from forge_batch.report import write_report
    pa.array(np.arange(3))  # pyarrow loads its pandas shim on first conversion where pandas is installed

    def status_mb(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = status_mb("VmRSS")
    t = time.perf_counter()
    path = write_report(sys.argv[1])
    seconds = time.perf_counter() - t
    peak = status_mb("VmHWM")
    print(json.dumps({"base_mb": base, "peak_mb": peak, "growth_mb": peak - base, "seconds": seconds, "path": str(path)}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures peak RSS through Linux /proc")
def test_a_million_rows_in_bounded_memory(tmp_path: Path) -> None:
    out = tmp_path / "big"
    _write_million_rows(out)
    r = subprocess.run([sys.executable, "-c", MEASURE, str(out)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr
    measured = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"report of 1M rows: peak RSS growth {measured['growth_mb']:.0f} MB over {measured['base_mb']:.0f} MB, {measured['seconds']:.1f} s")
    assert measured["growth_mb"] < 300, measured
    assert measured["seconds"] < 120, measured
    stats = collect_output_stats(out)
    assert stats.rows == 1_000_000 and stats.error_kinds == Counter({"engine_error": -(-1_000_000 // 128)})
    assert stats.throughput[0].rows_per_s.mean() == pytest.approx(100, rel=0.05)  # one row per 10 ms
    assert_self_contained(Path(measured["path"]).read_text())


# ---- headless Chromium ------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def open_in_chromium(page: Path, tmp_path: Path) -> tuple[np.ndarray, list[str]]:
    """Screenshot ``page`` (1200x3000) in headless Chromium; returns the pixels and the console lines."""
    shot = tmp_path / f"{page.stem}.png"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
        f"--screenshot={shot}", "--window-size=1200,3000", page.resolve().as_uri(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert shot.is_file(), r.stderr[-2000:]
    import matplotlib.image

    pixels = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(np.uint8)
    console = [line for line in r.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    return pixels, console


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_report_opens_in_chromium_with_its_charts(tmp_path: Path) -> None:
    assert _run_job(tmp_path, "parquet", prompts(40) + BAD_ROWS).status == "completed"
    pixels, console = open_in_chromium(write_report(tmp_path / "out"), tmp_path)
    assert console == []
    colors = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colors) > 200  # text, tables and anti-aliased charts; a blank page has one or two
    blue = np.all(np.abs(pixels.astype(int) - [0x1F, 0x77, 0xB4]) <= 8, axis=-1)  # the charts' first colour
    assert blue.sum() > 5000


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_the_chromium_check_sees_console_errors(tmp_path: Path) -> None:
    """The check above can fail: a page with a script error is caught."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>x</p><script>undefinedFunction()</script></body></html>")
    _, console = open_in_chromium(page, tmp_path)
    assert any("Uncaught" in line for line in console), console
