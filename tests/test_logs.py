"""Logs an operator can read: ``--log-level`` / ``FORGE_BATCH_LOG_LEVEL``, ``--log-format json`` (one JSON object
a line), and model loading and kernel compilation announced with how long they took."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from runner_helpers import prompts, write_job_file, write_jsonl

from forge_batch.cli import main
from forge_batch.logs import LOG_LEVEL_ENV


@pytest.fixture
def tiny_job(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("FORGE_BATCH_ENGINE_FACTORY", raising=False)
    monkeypatch.delenv(LOG_LEVEL_ENV, raising=False)
    write_jsonl(tmp_path / "in.jsonl", prompts(5))
    return write_job_file(tmp_path / "job.yaml", {
        "model": str(tiny_model_dir), "input": {"path": "in.jsonl"}, "output": {"path": "out"},
        "sampling": {"temperature": 0, "max_tokens": 4},
    })


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_logs_are_one_object_a_line_with_the_load_and_the_run(tiny_job: Path, capsys: pytest.CaptureFixture) -> None:
    before = list(logging.getLogger("forge_batch").handlers)
    assert main(["--log-format", "json", "run", str(tiny_job), "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # the summary is a log event too: nothing else for a log parser to trip on
    events = _json_lines(captured.err)  # every line parses
    assert all(set(e) >= {"time", "level", "event", "fields"} and isinstance(e["fields"], dict) for e in events)
    loading = next(e for e in events if e["event"].startswith("loading model"))
    loaded = next(e for e in events if e["event"].startswith("loaded model"))
    assert loading["fields"]["format"] == loaded["fields"]["format"] == "safetensors"
    assert loaded["fields"]["params"] > 0 and loaded["fields"]["seconds"] >= 0
    assert " params, " in loaded["event"] and loaded["event"].endswith(" s")
    assert events.index(loading) < events.index(loaded)
    prepared = next(e for e in events if e["event"].startswith("prepared the CPU weights in "))
    assert events.index(loaded) < events.index(prepared) and prepared["fields"]["seconds"] >= 0
    progress = [e for e in events if e["logger"] == "forge_batch.io.progress"]
    assert progress and progress[-1]["fields"]["rows_done"] == progress[-1]["fields"]["rows_total"] == 5
    end = events[-1]
    assert end["event"].startswith("run completed") and end["fields"]["summary"]["rows_ok"] == 5
    # the command put the process's logging back as it found it
    assert logging.getLogger("forge_batch").handlers == before


def test_json_logs_with_a_progress_bar_asked_for_are_still_only_json(tiny_job: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--log-format", "json", "run", str(tiny_job), "--overwrite", "--progress", "bar"]) == 0
    captured = capsys.readouterr()
    events = _json_lines(captured.err)  # every line parses: no bar lines among them
    assert any(e["logger"] == "forge_batch.io.progress" for e in events) and captured.out == ""


def test_json_logs_give_each_job_problem_its_key_path(tiny_job: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_job.write_text(tiny_job.read_text().replace("max_tokens: 4", "max_tokens: 0").replace("in.jsonl", "nope.jsonl"))
    for command in ("validate", "run"):
        assert main(["--log-format", "json", command, str(tiny_job)]) == 2
        events = _json_lines(capsys.readouterr().err)
        problems = {e["fields"]["path"]: e["fields"]["message"] for e in events if "path" in e["fields"]}
        assert set(problems) == {"sampling.max_tokens", "input.path"}, events
        assert "nope.jsonl" in problems["input.path"]


def test_the_level_filters_from_the_option_or_the_environment(tiny_job: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["--log-level", "warning", "run", str(tiny_job), "--progress", "none", "--overwrite"]) == 0
    assert "loading model" not in capsys.readouterr().err
    assert main(["run", str(tiny_job), "--quiet", "--overwrite"]) == 0  # quiet: warnings and errors only
    assert capsys.readouterr().err == ""
    monkeypatch.setenv(LOG_LEVEL_ENV, "WARNING")
    assert main(["run", str(tiny_job), "--progress", "none", "--overwrite"]) == 0
    assert "loading model" not in capsys.readouterr().err
    # the option wins over the environment, and is taken after the command too
    assert main(["run", str(tiny_job), "--progress", "none", "--overwrite", "--log-level", "debug"]) == 0
    err = capsys.readouterr().err
    assert "INFO    loading model" in err and "INFO    loaded model" in err
    monkeypatch.setenv(LOG_LEVEL_ENV, "chatty")
    with pytest.raises(SystemExit) as e:
        main(["run", str(tiny_job)])
    assert e.value.code == 2 and f"{LOG_LEVEL_ENV}: unknown log level 'chatty'" in capsys.readouterr().err


def test_kernel_compilation_is_announced_with_its_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    from forge_batch.kernels.cpu import build

    if not build.available():
        pytest.skip("no C compiler: the CPU kernels are not built here")
    built = Path(build.lib()._name)
    compiled: list[Path] = []

    def fake_compile(cc: str, flags: list[str], per_file: dict, out: Path) -> None:
        # the real library, already built this session: the test is about what is said, not the compiler
        shutil.copy(built, out)
        compiled.append(out)

    monkeypatch.setenv("FORGE_BATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_compile", fake_compile)
    (tmp_path / "cache" / "kernels").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="forge_batch.kernels"):
        build._build()
        assert compiled
        build._build()  # the library is cached now: nothing compiled, nothing said
    messages = [r.getMessage() for r in caplog.records if r.name == "forge_batch.kernels.cpu.build"]
    assert len(messages) == 2 and messages[0].startswith("compiling CPU kernels (")
    assert messages[1].startswith("compiled CPU kernels in ") and messages[1].endswith(" s")
    assert len(compiled) == 1
