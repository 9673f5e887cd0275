"""The runner's parts on their own, without a model or an engine: input planning, rows -> requests,
results -> records, the outcome, and the rules shared with the job file and the engine."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pytest
from fakes import FakeTokenizer
from runner_helpers import make_job, prompts, write_job_file, write_jsonl

from forge_batch.contract import ErrorKind, RawRow, Reader, RunContext
from forge_batch.engine.outputs import CompletionOutput, EngineErrorKind, RequestOutput
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.io.output_dir import CommitError, ResumeState, Tally
from forge_batch.io.schema import output_schema
from forge_batch.job import ConstraintSpec, JobError, SamplingSpec
from forge_batch.plugin_manager import get_plugin_manager
from forge_batch.runner import JobRunner, row_seed
from forge_batch.runner.inputs import reader_for_file
from forge_batch.runner.records import RecordBuilder
from forge_batch.runner.requests import RequestBuilder
from forge_batch.runner.signals import RunFlags
from forge_batch.runner.summary import RunEnd, decide_outcome


class _SniffingReader(Reader):
    extensions = (".txt",)

    def sniff(self, path: str) -> bool:
        return Path(path).read_text().startswith("MAGIC")


def test_reader_for_file_takes_the_named_format_then_content_then_extension(tmp_path: Path) -> None:
    readers = {"plain": Reader(), "magic": _SniffingReader()}
    plain = tmp_path / "a.jsonl"
    plain.write_text("{}")
    magic = tmp_path / "b.jsonl"
    magic.write_text("MAGIC")
    by_ext = tmp_path / "c.txt"
    by_ext.write_text("x")
    assert reader_for_file(str(plain), readers, "plain") == "plain"
    assert reader_for_file(str(magic), readers) == "magic"  # content wins over the extension
    assert reader_for_file(str(by_ext), readers) == "magic"
    assert reader_for_file(str(plain), readers) is None


def _builder(tmp_path: Path, data: dict, resume: ResumeState | None = None) -> RequestBuilder:
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}, **data})
    pm = get_plugin_manager([], entry_points=False)
    context = RunContext(job=job, input=job.input, plugin_manager=pm, output_dir=tmp_path / "out",
                         tokenizer=FakeTokenizer(), max_model_len=64)
    return RequestBuilder(job, job.input, pa.string(), resume or ResumeState(), context, RunFlags())


def _rows(*rows: dict) -> list[list[RawRow]]:
    return [[RawRow(r) for r in rows]]


def test_requests_skip_committed_rows_fail_duplicates_and_seed_by_id(tmp_path: Path) -> None:
    builder = _builder(tmp_path, {"sampling": {"seed": 7}}, ResumeState(done_ids={"done"}))
    rows = _rows({"id": "a", "prompt": "hi"}, {"id": "done", "prompt": "x"}, {"id": "a", "prompt": "again"},
                 {"id": "b", "prompt": "x" * 100})
    reqs = list(builder.requests(iter(rows)))
    assert [r.request_id for r in reqs] == ["r0", "r2", "r3"]  # r1 was committed by an earlier run
    ok, dup, long = reqs
    assert ok.error is None and ok.params.seed == row_seed(7, "id:a")
    assert ok.prompt_token_ids == FakeTokenizer().encode(ok.prompt)
    assert dup.metadata["_forge"]["error_kind"] == "duplicate_id" and "row 0" in dup.error
    assert long.metadata["_forge"]["error_kind"] == "prompt_too_long"
    assert builder.flags.in_flight == 3


def test_a_row_constraint_replaces_the_job_one_and_a_bad_override_fails_the_row(tmp_path: Path) -> None:
    builder = _builder(tmp_path, {"constraint": {"regex_field": "pattern", "choice": ["a", "b"]},
                                  "input": {"path": "in.jsonl", "sampling_field": "s"}})
    rows = _rows({"id": "x", "prompt": "p", "pattern": "[0-9]+"}, {"id": "y", "prompt": "p"},
                 {"id": "z", "prompt": "p", "s": {"temperature": -1}})
    own, job_wide, bad = builder.requests(iter(rows))
    assert own.params.constraint_spec == ("regex", "[0-9]+") and own.params.choice is None
    assert job_wide.params.constraint_spec == ("choice", ["a", "b"])
    assert bad.metadata["_forge"]["error_kind"] == "bad_sampling"


def _output(meta: dict, **kw) -> RequestOutput:
    return RequestOutput(request_id="r0", index=0, prompt=None, prompt_token_ids=[1, 2],
                         metadata={"_forge": {"row_index": 0, "id": "a", "n": 1, **meta}}, **kw)


def test_records_take_the_error_kind_from_the_engine_not_from_its_message(tmp_path: Path) -> None:
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}})
    pm = get_plugin_manager([], entry_points=False)
    ctx = RunContext(job=job, input=job.input, plugin_manager=pm, output_dir=tmp_path)
    builder = RecordBuilder(job, "id", set(output_schema("id", pa.string(), [], False).names), ctx)
    cut = CompletionOutput(0, "{", [5], "length", error="incomplete: max_tokens reached", valid=False,
                           error_kind=EngineErrorKind.INVALID_OUTPUT.value)
    assert builder.group_for(_output({}, samples=[cut])).records[0]["error_kind"] == "invalid_output"
    # a message that reads like another kind, from an engine that names none: engine_error, not a guess
    unnamed = _output({}, error="prompt too long for the context", samples=[])
    group = builder.group_for(unnamed)
    assert group.row_status == "failed" and group.records[0]["error_kind"] == "engine_error"
    # a row that failed before the engine keeps the kind it was given
    early = _output({"error_kind": "bad_id"}, error="id is odd")
    assert builder.group_for(early).row_kind == "bad_id"


def test_every_engine_error_kind_is_a_row_error_kind() -> None:
    assert {k.value for k in EngineErrorKind} <= {k.value for k in ErrorKind}


def test_outcome_order_commit_error_then_signal_then_error_then_budget() -> None:
    tally = Tally()
    full = CommitError("disk full", errno_=errno.ENOSPC)
    outcome = decide_outcome(RunEnd(3, commit_error=full, signal_name="SIGINT"), 0, 10, 0.1, tally)
    assert outcome.status == "failed" and "free some space" in outcome.message
    outcome = decide_outcome(RunEnd(3, signal_name="SIGTERM", error_message="boom"), 9, 10, 0.1, tally)
    assert (outcome.status, outcome.exit_code) == ("interrupted", 143)
    outcome = decide_outcome(RunEnd(3, error_message="run stopped by an error: boom"), 9, 10, 0.1, tally)
    assert (outcome.status, outcome.exit_code) == ("failed", 1) and "boom" in outcome.message
    outcome = decide_outcome(RunEnd(3), 2, 10, 0.1, tally)
    assert outcome.status == "failed" and "max_error_rate" in outcome.message
    assert decide_outcome(RunEnd(3), 1, 10, 0.1, tally).status == "completed"


def test_one_constraint_rule_for_requests_jobs_and_rows() -> None:
    messages = []
    for make in (lambda: SamplingParams(json_schema={}, regex="a"), lambda: SamplingSpec(json_schema={}, regex="a"),
                 lambda: ConstraintSpec(json_schema={}, regex="a")):
        with pytest.raises(ValueError) as e:
            make()
        messages.append(str(e.value))
    assert all("mutually exclusive: give at most one, got json_schema, regex" in m for m in messages)
    with pytest.raises(ValueError, match="got regex, lark"):
        SamplingParams(regex="a", constraint={"lark": "start: 'a'"})


def test_run_checks_the_job_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from forge_batch import cli
    from forge_batch.runner import checks

    calls = []
    real = checks.check_job_with_plugins
    monkeypatch.setattr(checks, "check_job_with_plugins", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    job = write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": "out"}})
    assert cli.main(["run", str(job), "--quiet"]) == 0
    assert len(calls) == 1


def test_a_bare_job_is_checked_by_the_runner(tmp_path: Path) -> None:
    job = make_job(tmp_path, {"input": {"path": "missing.jsonl"}, "output": {"path": "out"}})
    with pytest.raises(JobError, match="no input file matches"):
        JobRunner(job, engine_factory=lambda *a, **k: None, progress="none", install_signal_handlers=False).run()
