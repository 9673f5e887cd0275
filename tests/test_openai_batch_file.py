"""OpenAI batch files as vLLM users bring them: chat content given as parts, a line that is not a POST, and
`-o results.jsonl` written as one file in input order once every request is done (parts wait in the state
folder meanwhile), also through the `forge-batch run-batch` one-liner. On the fake engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from runner_helpers import make_job, prompts, read_output, run, write_jsonl

from forge_batch.cli import main
from forge_batch.io.openai_batch import OpenAIRequestError, parse_request
from forge_batch.io.output_dir import state_dir_for


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")


def chat(custom_id: str, content: Any, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0, **body}}


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_non_post_lines_are_refused_one_by_one() -> None:
    with pytest.raises(OpenAIRequestError, match="method 'GET' is not supported"):
        parse_request({**chat("a", "hi"), "method": "GET"})
    assert parse_request({**chat("a", "hi"), "method": "post"})["messages"] == [{"role": "user", "content": "hi"}]


def test_content_parts_are_the_same_prompt_as_the_joined_text(tmp_path: Path) -> None:
    reqs = [
        chat("parts", [{"type": "text", "text": "Describe a cat."}, {"type": "text", "text": "Briefly."}]),
        chat("string", "Describe a cat.\nBriefly."),
        chat("image", [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x"}}]),
        {**chat("get", "hi"), "method": "GET"},
        chat("after", "still runs"),
    ]
    write_jsonl(tmp_path / "batch.jsonl", reqs)
    job = make_job(tmp_path, {"input": {"path": "batch.jsonl"}, "output": {"path": "results.jsonl", "format": "openai-batch"},
                              "max_error_rate": 1.0})
    assert run(job).status == "completed"
    by_id = {x["custom_id"]: x for x in read_lines(tmp_path / "results.jsonl")}
    parts, string = by_id["parts"]["response"]["body"], by_id["string"]["response"]["body"]
    assert by_id["parts"]["response"]["status_code"] == 200
    assert parts["usage"]["prompt_tokens"] == string["usage"]["prompt_tokens"] > 0
    assert parts["choices"][0]["message"]["content"] == string["choices"][0]["message"]["content"]
    assert by_id["image"]["error"]["code"] == "bad_messages" and "image_url" in by_id["image"]["error"]["message"]
    assert by_id["get"]["error"]["code"] == "bad_request" and "GET" in by_id["get"]["error"]["message"]
    assert by_id["after"]["response"]["status_code"] == 200


def test_content_parts_in_a_plain_jobs_messages_field(tmp_path: Path) -> None:
    rows = [{"id": "p", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]},
            {"id": "s", "messages": [{"role": "user", "content": "Hi\nthere"}]}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    assert run(make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"},
                                   "sampling": {"temperature": 0}})).status == "completed"
    got = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert got["p"]["error"] is None and got["p"]["prompt_tokens"] == got["s"]["prompt_tokens"]
    assert got["p"]["text"] == got["s"]["text"]


def test_results_jsonl_is_one_file_in_input_order_written_when_every_row_is_done(tmp_path: Path) -> None:
    """The fake engine finishes rows out of order and parts hold 3 requests: the file is still in input
    order. A run stopped part-way (limit) leaves no file, only parts in the state folder; the resume writes it."""
    n = 20
    reqs = [chat(f"req-{i:02d}", f"Question {i} " + "x" * (i * 7 % 23), max_tokens=2 + i % 5) for i in range(n)]
    write_jsonl(tmp_path / "batch.jsonl", reqs)
    data = {"input": {"path": "batch.jsonl", "limit": 8},
            "output": {"path": "results.jsonl", "format": "openai-batch", "rows_per_file": 3}}
    first = run(make_job(tmp_path, data))
    assert first.status == "completed"  # the limit's rows are done: the file holds them
    assert [x["custom_id"] for x in read_lines(tmp_path / "results.jsonl")] == [f"req-{i:02d}" for i in range(8)]
    state = state_dir_for(tmp_path / "results.jsonl")
    assert len(list((state / "parts").glob("part-*.jsonl"))) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["batch.jsonl", "results.jsonl"]

    data["input"].pop("limit")
    result = run(make_job(tmp_path, data))
    assert result.status == "completed" and result.summary["resumed_rows"] == 8
    lines = read_lines(tmp_path / "results.jsonl")
    assert [x["custom_id"] for x in lines] == [f"req-{i:02d}" for i in range(n)]
    assert all(x["response"]["status_code"] == 200 for x in lines)
    # the parts really were written in finish order: the merge did the ordering
    part_order = [json.loads(line)["custom_id"] for p in sorted((state / "parts").glob("part-*.jsonl"))
                  for line in p.read_text().splitlines()]
    assert sorted(part_order) == [x["custom_id"] for x in lines] != part_order


def test_an_interrupted_single_file_run_writes_no_file_until_resumed(tmp_path: Path) -> None:
    from forge_batch.hookspecs import hookimpl

    reqs = [chat(f"req-{i:02d}", f"Question {i}") for i in range(12)]
    write_jsonl(tmp_path / "batch.jsonl", reqs)
    data = {"input": {"path": "batch.jsonl"}, "output": {"path": "results.jsonl", "format": "openai-batch", "rows_per_file": 2}}

    class StopAfterFour:
        seen = 0

        @hookimpl
        def process_result(self, record: dict[str, Any]) -> None:
            StopAfterFour.seen += 1
            if StopAfterFour.seen == 4:
                raise KeyboardInterrupt

    result = run(make_job(tmp_path, data), plugins=[("stop", StopAfterFour())])
    assert result.status == "interrupted" and "results.jsonl is written once every row is done" in result.message
    assert not (tmp_path / "results.jsonl").exists()
    result = run(make_job(tmp_path, data))
    assert result.status == "completed" and result.summary["resumed_rows"] >= 2
    assert [x["custom_id"] for x in read_lines(tmp_path / "results.jsonl")] == [f"req-{i:02d}" for i in range(12)]


def test_run_batch_one_liner(fake_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    reqs = [chat(f"r{i}", f"Say {i}", max_tokens=3) for i in range(5)] + [{**chat("bad", "x"), "url": "/v1/embeddings"}]
    write_jsonl(tmp_path / "in.jsonl", reqs)
    code = main(["run-batch", "-i", "in.jsonl", "-o", "out.jsonl", "--model", "fake", "--quiet",
                 "--set", "sampling.seed=7"])
    assert code == 0, capsys.readouterr().err  # a failed line is a result line, not a failed run
    lines = read_lines(tmp_path / "out.jsonl")
    assert [x["custom_id"] for x in lines] == ["r0", "r1", "r2", "r3", "r4", "bad"]
    assert lines[-1]["response"]["status_code"] == 400 and lines[-1]["error"]["code"] == "bad_request"
    assert all(x["response"]["body"]["usage"]["completion_tokens"] <= 3 for x in lines[:5])
    manifest = json.loads((state_dir_for(tmp_path / "out.jsonl") / "manifest.json").read_text())
    assert manifest["job"]["sampling"]["seed"] == 7 and manifest["job"]["input"]["format"] == "openai-batch"
    # a rerun resumes (nothing to do) and writes the same file again
    before = (tmp_path / "out.jsonl").read_text()
    assert main(["run-batch", "-i", "in.jsonl", "-o", "out.jsonl", "--model", "fake", "--quiet", "--set", "sampling.seed=7"]) == 0
    assert (tmp_path / "out.jsonl").read_text() == before


def test_run_batch_failed_lines_fail_the_run_only_when_asked(fake_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """As with vLLM, a failed request is a result line; --set max_error_rate turns failures into exit 1. A
    file with no runnable request at its start is not a batch file: refused before any work."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", [chat("ok", "hi"), {**chat("get", "x"), "method": "GET"}, {"custom_id": "nobody"}])
    assert main(["run-batch", "-i", "in.jsonl", "-o", "out.jsonl", "--model", "fake", "--quiet"]) == 0
    assert [x["error"] and x["error"]["code"] for x in read_lines(tmp_path / "out.jsonl")] == [None, "bad_request", "bad_request"]
    assert main(["run-batch", "-i", "in.jsonl", "-o", "out2.jsonl", "--model", "fake", "--quiet",
                 "--set", "max_error_rate=0.5"]) == 1
    assert len(read_lines(tmp_path / "out2.jsonl")) == 3  # every row is done: the file is written all the same
    capsys.readouterr()
    write_jsonl(tmp_path / "rows.jsonl", prompts(3))  # rows of a plain job, not batch requests
    assert main(["run-batch", "-i", "rows.jsonl", "-o", "out3.jsonl", "--model", "fake", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "input.path: no readable row at the start of" in err and "no body object" in err
    assert not (tmp_path / "out3.jsonl").exists() and not (tmp_path / ".out3.jsonl.forge_batch").exists()


def test_a_results_file_never_replaces_the_input_or_a_file_this_tool_did_not_write(
        fake_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", [chat("a", "hi", max_tokens=2)])
    before = (tmp_path / "in.jsonl").read_text()
    # the input as its own output: refused before any work, by validate's check
    assert main(["run-batch", "-i", "in.jsonl", "-o", "in.jsonl", "--model", "fake", "--quiet"]) == 2
    assert "is this job's input file: the results would replace it" in capsys.readouterr().err
    assert (tmp_path / "in.jsonl").read_text() == before and not (tmp_path / ".in.jsonl.forge_batch").exists()
    # a file that no run wrote: kept unless --overwrite
    (tmp_path / "notes.jsonl").write_text("my notes\n")
    assert main(["run-batch", "-i", "in.jsonl", "-o", "notes.jsonl", "--model", "fake", "--quiet"]) == 2
    assert "no run of this tool wrote it" in capsys.readouterr().err
    assert (tmp_path / "notes.jsonl").read_text() == "my notes\n"
    assert main(["run-batch", "-i", "in.jsonl", "-o", "notes.jsonl", "--model", "fake", "--quiet", "--overwrite"]) == 0
    assert [x["custom_id"] for x in read_lines(tmp_path / "notes.jsonl")] == ["a"]
    # a file this tool wrote is its own: a rerun resumes into it
    assert main(["run-batch", "-i", "in.jsonl", "-o", "notes.jsonl", "--model", "fake", "--quiet"]) == 0


def test_a_second_signal_while_the_results_file_is_written_leaves_it_to_the_rerun(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row committed, the results file being written: a first SIGTERM is noted, a second stops the
    writing (no file), and the summary says the rows are committed and the rerun writes the file."""
    import os
    import signal

    from runner_helpers import fake_factory

    from forge_batch.io.output_dir import OutputDir
    from forge_batch.plugin_manager import get_plugin_manager
    from forge_batch.runner import JobRunner

    write_jsonl(tmp_path / "batch.jsonl", [chat(f"r{i}", "hi") for i in range(6)])
    data = {"input": {"path": "batch.jsonl"}, "output": {"path": "results.jsonl", "format": "openai-batch"}}
    real_finalize = OutputDir.finalize

    def stopped_twice(self: OutputDir) -> None:
        for _ in range(2):
            os.kill(os.getpid(), signal.SIGTERM)
        real_finalize(self)

    monkeypatch.setattr(OutputDir, "finalize", stopped_twice)
    result = JobRunner(make_job(tmp_path, data), engine_factory=fake_factory(), plugin_manager=get_plugin_manager(
        entry_points=False), progress="none", install_signal_handlers=True).run()
    assert result.status == "interrupted" and result.exit_code == 143
    assert "every row it handled is committed" in result.message and "rerun the same command to write it" in result.message
    assert not (tmp_path / "results.jsonl").exists()
    monkeypatch.setattr(OutputDir, "finalize", real_finalize)
    assert run(make_job(tmp_path, data)).status == "completed"
    assert [x["custom_id"] for x in read_lines(tmp_path / "results.jsonl")] == [f"r{i}" for i in range(6)]


def test_merge_in_rounds_when_there_are_more_parts_than_open_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import os
    import random

    from forge_batch.io import single_file

    monkeypatch.setattr(single_file, "FAN_IN", 3)
    rng = random.Random(5)
    positions = list(range(40))
    rng.shuffle(positions)
    runs = []
    for k in range(0, 40, 4):  # ten parts, each sorted within, interleaved across
        keys = sorted(positions[k:k + 4])
        path = tmp_path / f"part-{k}.jsonl"
        path.write_text("".join(f'{{"pos": {p}}}\n' for p in keys))
        runs.append((path, keys))
    out = io.BytesIO()

    def create(path: Path) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    assert single_file.merge_in_input_order(runs, out, tmp_path, create) == 40
    assert [json.loads(line)["pos"] for line in out.getvalue().splitlines()] == list(range(40))
    assert not list(tmp_path.glob(".merge-*"))  # round files removed
    (tmp_path / "part-0.jsonl").write_text('{"pos": 0}\n')  # a part shorter than its ledger says
    with pytest.raises(ValueError, match="lines, its ledger"):
        single_file.merge_in_input_order(runs, io.BytesIO(), tmp_path, create)


def test_a_results_file_that_is_a_symlink_is_replaced_at_its_target(tmp_path: Path) -> None:
    """As an output directory may be a symlink (onto a bigger disk), so may the output file: the results
    replace its target (atomically: a new file renamed over it), the state sits beside the target."""
    import os

    write_jsonl(tmp_path / "batch.jsonl", [chat("a", "hi")])
    disk = tmp_path / "big-disk"
    disk.mkdir()
    os.symlink(disk / "results.jsonl", tmp_path / "results.jsonl")  # its target is made by the run
    data = {"input": {"path": "batch.jsonl"}, "output": {"path": "results.jsonl", "format": "openai-batch"}}
    assert run(make_job(tmp_path, data)).status == "completed"
    assert (tmp_path / "results.jsonl").is_symlink()
    assert [x["custom_id"] for x in read_lines(disk / "results.jsonl")] == ["a"]
    assert sorted(os.listdir(disk)) == [".results.jsonl.forge_batch", "results.jsonl"]
    # a later run with more requests replaces the file it wrote, through the symlink
    write_jsonl(tmp_path / "batch.jsonl", [chat("a", "hi"), chat("b", "ho")])
    assert run(make_job(tmp_path, {**data, "input": {"path": "batch.jsonl"}}), overwrite=True).status == "completed"
    assert (tmp_path / "results.jsonl").is_symlink()
    assert [x["custom_id"] for x in read_lines(disk / "results.jsonl")] == ["a", "b"]
