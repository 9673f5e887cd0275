"""Jobs on the real engine: a tiny random-weight model (fast, no download) and, marked slow, the default
model. The runner's text must be exactly what the engine generates for the same prompt; a killed
`forge-batch run` subprocess resumes to exactly-once ids and identical greedy texts."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import requires_default_model
from runner_helpers import REPO, cli, cli_env, popen, prompts, read_output, write_job_file, write_jsonl

from forge_batch.io.output_dir import state_dir_for
from forge_batch.job import job_from_dict, load_job
from forge_batch.runner import JobRunner


def run_real(job, **kw):
    return JobRunner(job, progress="none", install_signal_handlers=False, **kw).run()


def test_jsonl_job_matches_engine_greedy(tiny_model_dir: Path, tmp_path: Path) -> None:
    from forge_batch import LLM, SamplingParams

    rows = prompts(10)
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = job_from_dict(
        {"model": str(tiny_model_dir), "input": {"path": "in.jsonl"}, "output": {"path": "out", "keep_fields": ["topic"]},
         "sampling": {"temperature": 0, "max_tokens": 8}, "engine": {"max_num_seqs": 4}},
        base_dir=tmp_path,
    )
    result = run_real(job)
    assert result.status == "completed" and result.summary["rows_ok"] == 10
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    llm = LLM(str(tiny_model_dir), max_num_seqs=4)
    chats = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    expected = llm.generate(chats, SamplingParams(temperature=0, max_tokens=8))
    for r, e in zip(rows, expected):
        assert out[r["id"]]["text"] == e.text
        assert out[r["id"]]["completion_tokens"] == len(e.token_ids)
        assert out[r["id"]]["prompt_tokens"] == len(e.prompt_token_ids)
        assert out[r["id"]]["finish_reason"] == e.finish_reason


def test_parquet_template_n_samples_seeded_and_too_long(tiny_model_dir: Path, tmp_path: Path) -> None:
    table = pa.table({"uid": list(range(8)), "title": [f"Title number {i}" for i in range(7)] + ["long " * 80]})
    pq.write_table(table, tmp_path / "in.parquet")
    data = {
        "model": str(tiny_model_dir),
        "input": {"path": "in.parquet", "id_field": "uid", "template": "Summarise: {{ title }}"},
        "output": {"path": "out", "keep_fields": ["title"], "rows_per_file": 5},
        "sampling": {"n": 2, "temperature": 0.8, "seed": 11, "max_tokens": 6},
        "engine": {"max_model_len": 64},
        "max_error_rate": 0.2,
    }
    result = run_real(job_from_dict(data, base_dir=tmp_path))
    assert result.status == "completed"
    rows = read_output(tmp_path / "out")
    assert Counter(r["uid"] for r in rows) == {i: 2 for i in range(8)}
    too_long = [r for r in rows if r["uid"] == 7]
    assert all(r["error_kind"] == "prompt_too_long" and "64" in r["error"] for r in too_long)
    good = [r for r in rows if r["uid"] != 7]
    assert all(r["error"] is None and r["text"] is not None for r in good)
    assert any(a["text"] != b["text"] for a, b in zip(good[::2], good[1::2]))  # the two samples differ
    # seeded: a second run elsewhere (other batch sizes) writes the same texts
    data["output"] = {"path": "again", "keep_fields": ["title"]}
    data["engine"] = {"max_model_len": 64, "max_num_seqs": 2}
    run_real(job_from_dict(data, base_dir=tmp_path))
    again = read_output(tmp_path / "again")
    assert [(r["uid"], r["sample_index"], r["text"]) for r in rows] == [(r["uid"], r["sample_index"], r["text"]) for r in again]


def test_openai_batch_round_trip(tiny_model_dir: Path, tmp_path: Path) -> None:
    reqs = [
        {"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                                        {"role": "user", "content": f"Question {i}?"}],
                  "max_tokens": 5, "temperature": 0}}
        for i in range(6)
    ]
    reqs[2]["body"]["n"] = 2
    reqs[2]["body"]["temperature"] = 0.7
    write_jsonl(tmp_path / "batch.jsonl", reqs)
    job = write_job_file(tmp_path / "job.yaml", {
        "model": str(tiny_model_dir), "input": {"path": "batch.jsonl", "format": "openai-batch"},
        "output": {"path": "out", "format": "openai-batch"},
    })
    result = cli(["run", str(job), "--quiet"], env=cli_env(fake=False))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(x) for p in sorted((tmp_path / "out").glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(r["custom_id"] for r in reqs)
    for x in lines:
        assert set(x) == {"id", "custom_id", "response", "error"} and x["error"] is None
        assert x["response"]["status_code"] == 200
        body = x["response"]["body"]
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 5 * len(body["choices"])
        assert all(c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str) for c in body["choices"])
    assert len(next(x for x in lines if x["custom_id"] == "request-2")["response"]["body"]["choices"]) == 2


def test_kill_9_then_resume_identical_greedy_texts(tiny_model_dir: Path, tmp_path: Path) -> None:
    n = 48
    write_jsonl(tmp_path / "in.jsonl", prompts(n))
    spec = {
        "model": str(tiny_model_dir), "input": {"path": "in.jsonl"},
        "output": {"path": "out", "rows_per_file": 4, "flush_seconds": 0.3},
        "sampling": {"temperature": 0, "max_tokens": 8, "ignore_eos": True},
        "engine": {"max_num_seqs": 4},
    }
    path = write_job_file(tmp_path / "job.yaml", spec)
    proc = popen(["run", str(path), "--quiet"], cli_env(fake=False))
    out = tmp_path / "out"
    deadline = time.monotonic() + 240
    while len(list(out.glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    committed = read_output(out)
    assert 0 < len(committed) < n
    resumed = run_real(load_job(path))
    assert resumed.exit_code == 0 and resumed.summary["resumed_rows"] == len(committed)
    rows = read_output(out)
    assert sorted(r["id"] for r in rows) == [f"r{i:04d}" for i in range(n)]
    ref_spec = {**spec, "output": {"path": "ref"}}
    run_real(load_job(write_job_file(tmp_path / "ref.yaml", ref_spec)))
    assert {r["id"]: r["text"] for r in rows} == {r["id"]: r["text"] for r in read_output(tmp_path / "ref")}


@pytest.mark.slow
@requires_default_model
def test_quickstart_on_default_model(tmp_path: Path) -> None:
    out = tmp_path / "quickstart"
    result = cli(["run", str(REPO / "jobs" / "quickstart.yaml"), "--set", f"output.path={out}", "--set", "sampling.max_tokens=16"],
                 env=cli_env(fake=False), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "8 ok" in result.stdout
    rows = read_output(out)
    assert len(rows) == 8 and all(r["text"].strip() and r["error"] is None for r in rows)
    paris = next(r for r in rows if r["id"] == "q1")["text"]
    assert "Paris" in paris
    inspect = cli(["inspect", str(out)], env=cli_env(fake=False))
    assert inspect.returncode == 0 and "8 ok" in inspect.stdout


@pytest.mark.slow
@requires_default_model
def test_nightly_parquet_job_on_default_model_resumes(tmp_path: Path) -> None:
    out = tmp_path / "nightly"
    args = ["run", str(REPO / "jobs" / "nightly_dataset.yaml"), "--quiet", "--set", f"output.path={out}",
            "--set", "sampling.max_tokens=12", "--set", "sampling.n=2"]
    first = cli([*args, "--limit", "3"], env=cli_env(fake=False), timeout=600)
    assert first.returncode == 0, first.stderr
    second = cli(args, env=cli_env(fake=False), timeout=600)
    assert second.returncode == 0, second.stderr
    rows = read_output(out)
    assert Counter(r["article_id"] for r in rows) == {f"a-00{i}": 2 for i in range(1, 7)}
    assert all(r["error"] is None and r["text"] for r in rows)
    summary = json.loads((state_dir_for(out) / "summary.json").read_text())
    assert summary["resumed_rows"] == 3 and summary["rows_ok"] == 6


@pytest.mark.slow
@requires_default_model
def test_kill_9_on_default_model_resumes_identically(tmp_path: Path) -> None:
    rows_in = [{"id": f"q{i}", "prompt": f"Write one sentence about the number {i}."} for i in range(6)]
    write_jsonl(tmp_path / "in.jsonl", rows_in)
    spec = {"input": {"path": "in.jsonl"}, "output": {"path": "out", "rows_per_file": 2, "flush_seconds": 0.5},
            "sampling": {"temperature": 0, "max_tokens": 12}, "engine": {"max_num_seqs": 2}}
    path = write_job_file(tmp_path / "job.yaml", spec)
    proc = popen(["run", str(path), "--quiet"], cli_env(fake=False))
    out = tmp_path / "out"
    deadline = time.monotonic() + 400
    while len(list(out.glob("part-*.parquet"))) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    run_real(load_job(path))
    rows = read_output(out)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in rows_in)
    run_real(load_job(write_job_file(tmp_path / "ref.yaml", {**spec, "output": {"path": "ref"}})))
    assert {r["id"]: r["text"] for r in rows} == {r["id"]: r["text"] for r in read_output(tmp_path / "ref")}


def test_constrained_job_outputs_conform(tiny_model_dir: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(6))
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    base = {"model": str(tiny_model_dir), "input": {"path": "in.jsonl"}, "max_error_rate": 1.0}
    run_real(job_from_dict({**base, "output": {"path": "choice"}, "sampling": {"choice": ["yes", "no"], "max_tokens": 8}},
                           base_dir=tmp_path))
    assert {r["text"] for r in read_output(tmp_path / "choice")} <= {"yes", "no"}
    run_real(job_from_dict({**base, "output": {"path": "json"}, "sampling": {"json_schema": schema, "max_tokens": 24}},
                           base_dir=tmp_path))
    import jsonschema

    for r in read_output(tmp_path / "json"):
        if r["error"] is None:
            assert r["valid"] is True
            jsonschema.validate(json.loads(r["text"]), schema)
        else:  # cut off by max_tokens before the JSON closed: flagged, never written as fine
            assert r["valid"] is False
            assert r["error_kind"] == "invalid_output" and r["finish_reason"] == "length"


def test_a_plugin_logits_processor_that_raises_fails_only_its_row(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A job plugin whose logits processor raises for one row: that row is written with a plugin_error naming
    the exception, the job completes, the other rows are exactly what a run without the plugin writes, and a
    rerun does not generate the failed row again."""
    (tmp_path / "failing_proc.py").write_text(
        "from forge_batch.hookspecs import hookimpl\n\n"
        "def explode(tokens, logits):\n"
        "    if len(tokens) == 2:\n"
        "        raise RuntimeError('processor exploded')\n"
        "    return logits\n\n"
        "@hookimpl\n"
        "def logits_processors(row):\n"
        "    return [explode] if row['id'] == 'r0003' else None\n"
    )
    write_jsonl(tmp_path / "in.jsonl", prompts(6))
    base = {"model": str(tiny_model_dir), "input": {"path": "in.jsonl"}, "max_error_rate": 0.5,
            "sampling": {"temperature": 0, "max_tokens": 6, "ignore_eos": True}, "engine": {"max_num_seqs": 4}}
    job = job_from_dict({**base, "output": {"path": "out"}, "plugins": ["./failing_proc.py"]}, base_dir=tmp_path)
    result = run_real(job)
    assert result.status == "completed", result.message
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    failed = out.pop("r0003")
    assert failed["error_kind"] == "plugin_error" and "RuntimeError: processor exploded" in failed["error"]
    assert failed["text"] is None and failed["finish_reason"] == "error"
    run_real(job_from_dict({**base, "output": {"path": "plain"}}, base_dir=tmp_path))
    plain = {r["id"]: r for r in read_output(tmp_path / "plain")}
    assert {k: (r["text"], r["completion_tokens"]) for k, r in out.items()} == {
        k: (plain[k]["text"], plain[k]["completion_tokens"]) for k in out
    }
    again = run_real(job)
    assert again.status == "completed" and again.summary["this_run"]["rows"] == 0
    assert sorted(r["id"] for r in read_output(tmp_path / "out")) == [f"r{i:04d}" for i in range(6)]


def test_token_ids_outside_the_vocabulary_fail_their_rows_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A row's logit_bias naming an id past the vocabulary (a GPT id on a smaller model), and a plugin that sets
    out-of-vocabulary prompt_token_ids for one row: each such row is an error row of its kind, the job
    completes with the others generated, and a rerun has nothing left to do."""
    (tmp_path / "ids_plugin.py").write_text(
        "from forge_batch.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def prepare_request(request, row, context):\n"
        "    if row['id'] == 'r0002':\n"
        "        request.prompt_token_ids = [1, 99999]\n"
    )
    rows = prompts(5)
    rows[3]["s"] = {"logit_bias": {"50256": -100}}
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = job_from_dict(
        {"model": str(tiny_model_dir), "input": {"path": "in.jsonl", "sampling_field": "s"}, "output": {"path": "out"},
         "sampling": {"temperature": 0, "max_tokens": 4}, "plugins": ["./ids_plugin.py"], "max_error_rate": 0.5},
        base_dir=tmp_path,
    )
    result = run_real(job)
    assert result.status == "completed", result.message
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert out["r0002"]["error_kind"] == "bad_prompt" and "99999" in out["r0002"]["error"]
    assert out["r0003"]["error_kind"] == "bad_sampling" and "50256" in out["r0003"]["error"]
    assert all(out[k]["error"] is None and out[k]["text"] is not None for k in ("r0000", "r0001", "r0004"))
    assert run_real(job).summary["this_run"]["rows"] == 0


def test_structured_output_cut_short_is_invalid_output_on_the_real_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A json_schema job whose max_tokens cannot hold the smallest conforming object: the engine finishes
    every sample at max_tokens with its error, and each row says invalid_output (as docs/jobs.md promises),
    not engine_error."""
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    write_jsonl(tmp_path / "in.jsonl", prompts(4))
    job = job_from_dict(
        {"model": str(tiny_model_dir), "input": {"path": "in.jsonl"}, "output": {"path": "out"}, "max_error_rate": 1.0,
         "sampling": {"json_schema": schema, "max_tokens": 2, "temperature": 0}},
        base_dir=tmp_path,
    )
    result = run_real(job)
    rows = read_output(tmp_path / "out")
    assert len(rows) == 4
    assert {(r["error_kind"], r["finish_reason"], r["valid"]) for r in rows} == {("invalid_output", "length", False)}
    assert all("max_tokens" in r["error"] for r in rows)
    assert all(isinstance(r["text"], str) and r["text"].startswith("{") for r in rows)  # what it wrote is kept
    assert result.summary["failed_by_kind"] == {"invalid_output": 4}
