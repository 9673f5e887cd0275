"""`forge-batch validate` catches, before any model load, everything `run` refuses; `run` refuses the same
jobs with the same message before loading the model or creating the output directory.

Through the command line in-process (cli.main). A job that got past the checks would load the tiny model,
so `load_model_files` is replaced by one that fails the test."""

from __future__ import annotations

from pathlib import Path

import pytest
from runner_helpers import prompts, write_job_file, write_jsonl

from forge_batch.cli import main


@pytest.fixture(autouse=True)
def real_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default engine factory (the one that loads `model`) and every installed plugin."""
    monkeypatch.delenv("FORGE_BATCH_ENGINE_FACTORY", raising=False)
    monkeypatch.delenv("FORGE_BATCH_LOAD_PLUGINS", raising=False)


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    from forge_batch.models import registry

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the job was refused")

    monkeypatch.setattr(registry, "load_model_files", refuse)


def job_file(tmp_path: Path, model: str | Path, **extra: object) -> Path:
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    spec = {"model": str(model), "input": {"path": "in.jsonl"}, "output": {"path": "out"},
            "sampling": {"max_tokens": 4}, **extra}
    return write_job_file(tmp_path / "job.yaml", spec)


def validate(job: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(["validate", str(job)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_refused(job: Path, capsys: pytest.CaptureFixture, key: str, *fragments: str) -> None:
    """validate and run both exit 2 naming ``key`` with every fragment; run leaves no output directory."""
    for command in (["validate", str(job)], ["run", str(job), "--progress", "none"]):
        code = main(command)
        err = capsys.readouterr().err
        assert code == 2, (command, err)
        assert f"- {key}:" in err, (command, err)
        for fragment in fragments:
            assert fragment in err, (command, fragment, err)
        assert "Traceback" not in err
    assert not (job.parent / "out").exists()


# -- the job file itself --------------------------------------------------------------------------------


def test_binary_job_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = tmp_path / "job.yaml"
    job.write_bytes(bytes(range(256)) * 4)
    for command in (["validate", str(job)], ["run", str(job)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "not a text file" in err and str(job) in err


def test_duplicate_keys_are_errors_naming_key_and_lines(
    tmp_path: Path, tiny_model_dir: Path, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {tiny_model_dir}\n"
        "input: {path: in.jsonl}\n"
        "sampling:\n"
        "  temperature: 0\n"
        "output: {path: out}\n"
        "sampling:\n"
        "  max_tokens: 4\n"
        "engine:\n"
        "  dtype: float32\n"
        "  dtype: bfloat16\n"
    )
    assert_refused(job, capsys, "sampling", "duplicate key", "line 3", "line 6")
    assert main(["validate", str(job)]) == 2
    assert "- engine.dtype: duplicate key" in capsys.readouterr().err


def test_yaml_merge_keys_may_override(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """`<<: *base` then an explicit key is YAML's way to override, not a duplicate."""
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    job = tmp_path / "job.yaml"
    job.write_text(
        f"model: {tiny_model_dir}\ninput: {{path: in.jsonl}}\noutput: {{path: out}}\n"
        "sampling:\n  <<: {temperature: 0.5, max_tokens: 4}\n  temperature: 0\n"
    )
    assert validate(job, capsys)[0] == 0
    from forge_batch.job import load_job

    assert load_job(job).sampling.temperature == 0
