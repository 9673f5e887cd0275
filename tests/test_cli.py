"""The command line: run / validate / inspect / plugins, --set, --quiet, exit codes, plain log lines when
stderr is not a terminal. In-process through cli.main (fast) except where a real process matters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from runner_helpers import cli, prompts, read_output, write_job_file, write_jsonl

from forge_batch.cli import main


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")


def make_job(tmp_path: Path, n: int = 6, **extra) -> Path:
    write_jsonl(tmp_path / "in.jsonl", prompts(n))
    return write_job_file(tmp_path / "job.yaml", {
        "model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": "out", "keep_fields": ["topic"]}, **extra,
    })


def test_run_prints_summary_and_writes_output(fake_engine, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = make_job(tmp_path)
    assert main(["run", str(job), "--progress", "none"]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "6 ok" in out and "summary.json" in out
    assert len(read_output(tmp_path / "out")) == 6


def test_an_in_process_run_leaves_the_callers_signal_handlers_as_they_were(fake_engine, tmp_path: Path) -> None:
    """Only the process's own command (the console script) ignores SIGTERM while it winds down; a caller's
    process (a test, a notebook) keeps its handler."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert main(["run", str(make_job(tmp_path)), "--progress", "none", "--quiet"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_set_overrides_and_quiet(fake_engine, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = make_job(tmp_path)
    code = main(["run", str(job), "--quiet", "--set", "sampling.n=2", "--set", "output.path=other", "--limit", "3"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    rows = read_output(tmp_path / "other")
    assert len(rows) == 6 and {r["sample_index"] for r in rows} == {0, 1}


def test_run_invalid_job_exits_2_with_every_problem(fake_engine, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = write_job_file(tmp_path / "job.yaml", {"input": {"path": "missing.jsonl", "prompt_feild": "x"}, "outptu": {}})
    assert main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert "input.prompt_feild" in err and "outptu" in err and "output" in err
    assert not (tmp_path / "out").exists()


def test_run_with_too_many_bad_rows_exits_1(fake_engine, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(3) + ["{nope"] * 3)
    job = write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": "out"}})
    assert main(["run", str(job), "--progress", "none"]) == 1
    assert "max_error_rate" in capsys.readouterr().err


def test_validate_ok_and_broken(fake_engine, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = make_job(tmp_path)
    assert main(["validate", str(job)]) == 0
    assert "OK" in capsys.readouterr().out
    broken = write_job_file(tmp_path / "broken.yaml", {
        "input": {"path": "nowhere/*.jsonl", "template": "{% if %}"},
        "output": {"path": "out", "format": "excel", "rows_per_file": 0},
        "sampling": {"temperature": -2},
        "max_error_rate": "lots",
    })
    assert main(["validate", str(broken)]) == 2
    err = capsys.readouterr().err
    for path in ("output.rows_per_file", "sampling.temperature", "max_error_rate"):
        assert f"- {path}:" in err
    # schema problems stop before file checks; fix them and the rest is reported, all at once
    broken2 = write_job_file(tmp_path / "broken2.yaml", {
        "input": {"path": "nowhere/*.jsonl", "template": "{% if %}"}, "output": {"path": "out", "format": "excel"},
    })
    assert main(["validate", str(broken2)]) == 2
    err = capsys.readouterr().err
    for path in ("input.path", "input.template", "output.format"):
        assert f"- {path}:" in err
    assert not (tmp_path / "out").exists()


def test_inspect(fake_engine, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(5) + ["{bad"])
    job = write_job_file(tmp_path / "job.yaml", {
        "model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": "out"}, "max_error_rate": 0.5,
    })
    assert main(["run", str(job), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "completed" in out and "5 ok" in out and "malformed_json 1" in out
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 6 and info["rows_failed"] == 1 and info["failed_by_kind"] == {"malformed_json": 1}
    assert main(["inspect", str(tmp_path / "nope")]) == 2


def test_plugins_command(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "forge_batch.plugins.readers  [builtin]" in out and "register_readers" in out
    pfile = tmp_path / "mine.py"
    pfile.write_text("from forge_batch.hookspecs import hookimpl\n\n@hookimpl\ndef job_end(summary):\n    pass\n")
    job = write_job_file(tmp_path / "job.yaml", {"input": {"path": "x"}, "output": {"path": "o"}, "plugins": ["./mine.py"]})
    assert main(["plugins", "--job", str(job), "--json"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    assert infos["mine"]["source"] == "job" and infos["mine"]["hooks"] == ["job_end"]


def test_plain_log_lines_when_stderr_is_not_a_terminal(
    fake_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FAKE_STEP_DELAY", "0.002")
    job = make_job(tmp_path, n=30)
    assert main(["run", str(job), "--log-interval", "0"]) == 0
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if "rows" in x]
    assert lines and "\r" not in captured.err
    assert "30/30 rows" in lines[-1] and "tok/s" in lines[-1] and "kv" in captured.err
    assert "30 ok" in captured.out


def test_cli_entry_point_runs_as_a_module(tmp_path: Path) -> None:
    result = cli(["validate", str(make_job(tmp_path))])
    assert result.returncode == 0 and "OK" in result.stdout


def test_job_plugin_module_next_to_the_job_file(fake_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`plugins: [name]` finds name.py beside the job even when neither it nor the cwd is on sys.path."""
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir("/")
    (tmp_path / "fb_beside_job_plugin.py").write_text(
        "from forge_batch.hookspecs import hookimpl\n\n@hookimpl\ndef process_result(record):\n    record['tag'] = 'seen'\n"
    )
    job = make_job(tmp_path, n=3, plugins=["fb_beside_job_plugin"])
    assert main(["run", str(job), "--quiet"]) == 0
    assert all(json.loads(r["extra"]) == {"tag": "seen"} for r in read_output(tmp_path / "out"))
    sys.modules.pop("fb_beside_job_plugin", None)


def test_inspect_non_parquet_output_uses_the_ledger(fake_engine, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = make_job(tmp_path, n=4, output={"path": "out", "format": "jsonl"})
    assert main(["run", str(job), "--quiet"]) == 0
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 4 and info["rows_ok"] == 4 and info["status"] == "completed"
    assert main(["inspect", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "4 ok" in text and "None" not in text  # the ledger has no finish reasons: none printed


def test_engine_failure_mid_run_commits_and_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fakes import FakeLLM
    from runner_helpers import make_job as job_spec
    from runner_helpers import run

    original = FakeLLM.generate_stream

    def broken(self, requests, sampling_params=None, *, max_in_flight=None):
        for i, out in enumerate(original(self, requests, max_in_flight=max_in_flight)):
            if i == 5:
                raise RuntimeError("device lost")
            yield out

    monkeypatch.setattr(FakeLLM, "generate_stream", broken)
    write_jsonl(tmp_path / "in.jsonl", prompts(12))
    job = job_spec(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out", "rows_per_file": 2}})
    result = run(job)
    assert result.status == "failed" and result.exit_code == 1
    assert "device lost" in result.message and "resume" in result.message
    assert len(read_output(tmp_path / "out")) == 5
    monkeypatch.setattr(FakeLLM, "generate_stream", original)
    assert run(job).summary["rows"] == 12 and len(read_output(tmp_path / "out")) == 12


def test_version(capsys: pytest.CaptureFixture) -> None:
    import forge_batch

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"forge-batch {forge_batch.__version__}"


def test_prompt_tokens_repeat_on_every_sample_and_count_once_per_row(fake_engine, tmp_path: Path) -> None:
    """What docs/jobs.md says about `prompt_tokens` under n > 1."""
    write_jsonl(tmp_path / "in.jsonl", prompts(4))
    job = write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": "out"},
                                                 "sampling": {"n": 3, "max_tokens": 5}})
    assert main(["run", str(job), "--quiet"]) == 0
    rows = read_output(tmp_path / "out")
    assert len(rows) == 12
    per_row = {}
    for r in rows:
        per_row.setdefault(r["id"], set()).add(r["prompt_tokens"])
    assert all(len(v) == 1 for v in per_row.values())  # the same number on each of a row's samples
    summary = json.loads((tmp_path / ".out.forge_batch" / "summary.json").read_text())
    assert summary["prompt_tokens"] == sum(r["prompt_tokens"] for r in rows if r["sample_index"] == 0)
    assert summary["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
