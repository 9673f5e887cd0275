"""Job-runner mechanics on FakeLLM (deterministic, fast): output schema and metadata, parts, resume, bad
rows, error budget, per-row sampling, plugins in row-level hooks."""

from __future__ import annotations

import json
import logging
import types
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runner_helpers import make_job, prompts, read_output, run, write_jsonl

from forge_batch.hookspecs import DropResult, RowError, SkipRow, hookimpl
from forge_batch.io.output_dir import OutputDirError, state_dir_for
from forge_batch.job import JobError
from forge_batch.runner import JobRunner, row_seed


def basic_job(tmp_path: Path, rows: list, **extra):
    write_jsonl(tmp_path / "in.jsonl", rows)
    data = {"input": {"path": "in.jsonl"}, "output": {"path": "out", "keep_fields": ["topic"]}, **extra}
    return make_job(tmp_path, data)


def test_jsonl_job_writes_typed_parquet_with_metadata(tmp_path: Path) -> None:
    job = basic_job(tmp_path, prompts(25), sampling={"temperature": 0.5, "max_tokens": 6})
    result = run(job)
    assert result.status == "completed" and result.exit_code == 0
    rows = read_output(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == [f"r{i:04d}" for i in range(25)]
    assert all(r["text"] and r["error"] is None and r["finish_reason"] in ("stop", "length") for r in rows)
    assert all(r["topic"] == ["a", "b", "c"][int(r["id"][1:]) % 3] for r in rows)
    assert all(r["prompt_tokens"] > 0 and 0 < r["completion_tokens"] <= 6 for r in rows)
    part = sorted((tmp_path / "out").glob("part-*.parquet"))[0]
    schema = pq.read_schema(part)
    for name, typ in [("id", pa.string()), ("row_index", pa.int64()), ("sample_index", pa.int64()), ("topic", pa.string()),
                      ("text", pa.string()), ("finish_reason", pa.string()), ("prompt_tokens", pa.int64()),
                      ("completion_tokens", pa.int64()), ("error", pa.string()), ("error_kind", pa.string()),
                      ("ttft_s", pa.float64()), ("latency_s", pa.float64())]:
        assert schema.field(name).type == typ, name
    meta = pq.read_metadata(part).metadata
    spec = json.loads(meta[b"forge_batch.job"])
    assert spec["sampling"]["temperature"] == 0.5 and spec["output"]["keep_fields"] == ["topic"]
    assert meta[b"forge_batch.version"]
    summary = json.loads((state_dir_for(tmp_path / "out") / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rows"] == 25 and summary["rows_ok"] == 25
    assert summary["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
    assert {"wall_time_s", "throughput", "prompt_tokens", "failed_by_kind"} <= set(summary)


def test_a_kept_field_the_first_rows_do_not_type_is_written_as_text(tmp_path: Path) -> None:
    rows = prompts(10)
    values = [None, None, None, None, 7, "x", {"a": [1, "é"]}, 2.5, True, None]
    for r, v in zip(rows, values):
        r["topic"] = v
    job = basic_job(tmp_path, rows, input={"path": "in.jsonl", "batch_size": 4}, output={"path": "out", "rows_per_file": 3,
                                                                                           "keep_fields": ["topic"]})
    result = run(job)
    assert result.exit_code == 0, result.message
    got = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert [got[f"r{i:04d}"]["topic"] for i in range(10)] == [None] * 4 + ["7", "x", '{"a": [1, "é"]}', "2.5", "true", None]
    assert all(r["error"] is None for r in got.values())  # no type_mismatch: the column was never typed
    assert {pq.read_schema(p).field("topic").type for p in (tmp_path / "out").glob("part-*.parquet")} == {pa.string()}


def test_parts_share_one_schema_and_respect_rows_per_file(tmp_path: Path) -> None:
    job = basic_job(tmp_path, prompts(23), output={"path": "out", "rows_per_file": 5, "keep_fields": ["topic"]})
    run(job)
    parts = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(parts) >= 5
    schemas = {pq.read_schema(p).remove_metadata().to_string() for p in parts}
    assert len(schemas) == 1
    assert all(pq.read_metadata(p).num_rows <= 5 for p in parts)


def test_int_ids_stay_ints_and_null_id_field_uses_positions(tmp_path: Path) -> None:
    rows = [{"id": i, "prompt": f"p{i}"} for i in range(5)]
    job = basic_job(tmp_path, rows, output={"path": "out"})
    run(job)
    out = read_output(tmp_path / "out")
    assert [r["id"] for r in out] == [0, 1, 2, 3, 4]
    job = make_job(tmp_path, {"input": {"path": "in.jsonl", "id_field": None}, "output": {"path": "out2"}})
    run(job)
    assert [r["id"] for r in read_output(tmp_path / "out2")] == [0, 1, 2, 3, 4]


def test_parquet_input_with_template_n_samples_and_seed(tmp_path: Path) -> None:
    table = pa.table({"uid": list(range(12)), "title": [f"T{i}" for i in range(12)], "n_words": list(range(12))})
    pq.write_table(table, tmp_path / "in.parquet")
    data = {
        "input": {"path": "in.parquet", "id_field": "uid", "template": "Summarise {{ title }} in {{ n_words }} words"},
        "output": {"path": "out", "keep_fields": ["title", "n_words"]},
        "sampling": {"n": 3, "temperature": 0.9, "seed": 42},
    }
    run(make_job(tmp_path, data))
    rows = read_output(tmp_path / "out")
    assert len(rows) == 36
    assert Counter(r["uid"] for r in rows) == {i: 3 for i in range(12)}
    assert sorted({r["sample_index"] for r in rows}) == [0, 1, 2]
    assert pq.read_schema(sorted((tmp_path / "out").glob("part-*"))[0]).field("n_words").type == pa.int64()
    # seeded: the same job elsewhere writes the same texts; another seed writes different ones
    run(make_job(tmp_path, {**data, "output": {"path": "out2", "keep_fields": ["title"]}}))
    again = read_output(tmp_path / "out2")
    assert [r["text"] for r in rows] == [r["text"] for r in again]
    data["sampling"]["seed"] = 43
    run(make_job(tmp_path, {**data, "output": {"path": "out3"}}))
    assert [r["text"] for r in rows] != [r["text"] for r in read_output(tmp_path / "out3")]


def test_row_seed_is_stable_and_depends_on_id() -> None:
    assert row_seed(1, "id:a") == row_seed(1, "id:a") == 4636104899935096614  # pinned: changing it breaks resuming old runs
    assert row_seed(1, "id:a") != row_seed(1, "id:b") != row_seed(2, "id:b")
    assert 0 <= row_seed(123, "x") < 2**63


def test_texts_follow_ids_not_positions(tmp_path: Path) -> None:
    rows = prompts(12)
    run(basic_job(tmp_path, rows, sampling={"temperature": 1.0}))
    first = {r["id"]: r["text"] for r in read_output(tmp_path / "out")}
    write_jsonl(tmp_path / "in2.jsonl", list(reversed(rows)))
    run(make_job(tmp_path, {"input": {"path": "in2.jsonl"}, "output": {"path": "out2"}, "sampling": {"temperature": 1.0}}))
    assert {r["id"]: r["text"] for r in read_output(tmp_path / "out2")} == first


def test_resume_skips_committed_ids_and_matches_uninterrupted(tmp_path: Path) -> None:
    rows = prompts(40)
    data = {"input": {"path": "in.jsonl"}, "output": {"path": "out", "rows_per_file": 4}, "sampling": {"n": 2, "seed": 9}}
    write_jsonl(tmp_path / "in.jsonl", rows)
    first = run(make_job(tmp_path, data, overrides=["input.limit=15"]))
    assert first.summary["rows"] == 15
    holder: list = []
    second = run(make_job(tmp_path, data), holder=holder)
    assert second.summary["resumed_rows"] == 15 and second.summary["this_run"]["rows"] == 25
    assert len(holder[0].requests_seen) == 25  # committed rows never reach the engine
    run(make_job(tmp_path, {**data, "output": {"path": "ref", "rows_per_file": 100}}))
    got = {(r["id"], r["sample_index"]): r["text"] for r in read_output(tmp_path / "out")}
    ref = {(r["id"], r["sample_index"]): r["text"] for r in read_output(tmp_path / "ref")}
    assert len(read_output(tmp_path / "out")) == 80 and got == ref


def test_resume_after_lost_part_regenerates_exactly_it(tmp_path: Path) -> None:
    """Simulate a crash between the ledger and the part rename: the part never appeared."""
    job = basic_job(tmp_path, prompts(20), output={"path": "out", "rows_per_file": 5})
    run(job)
    ref = {r["id"]: r["text"] for r in read_output(tmp_path / "out")}
    last = sorted((tmp_path / "out").glob("part-*.parquet"))[-1]
    lost = {r["id"] for r in pq.read_table(last).to_pylist()}
    last.unlink()
    holder: list = []
    run(job, holder=holder)
    assert len(holder[0].requests_seen) == len(lost)
    out = read_output(tmp_path / "out")
    assert len(out) == 20 and {r["id"]: r["text"] for r in out} == ref


def test_changed_job_refuses_to_mix_then_overwrite(tmp_path: Path) -> None:
    job = basic_job(tmp_path, prompts(5))
    run(job)
    changed = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out", "keep_fields": ["topic"]}},
                       overrides=["sampling.temperature=0"])
    with pytest.raises(OutputDirError, match="sampling.temperature"):
        run(changed)
    # engine options may change between runs
    run(make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out", "keep_fields": ["topic"]}},
                 overrides=["engine.max_num_seqs=2"]))
    result = run(changed, overwrite=True)
    assert result.summary["resumed_rows"] == 0 and len(read_output(tmp_path / "out")) == 5


BAD_ROWS = [
    {"id": "ok1", "prompt": "fine"},
    "{this is not json",
    {"id": "nop", "text": "no prompt field"},
    {"id": "empty", "prompt": "   "},
    {"id": "ok1", "prompt": "duplicate id"},
    {"id": "long", "prompt": "x" * 400},
    {"prompt": "no id"},
    {"id": "badsamp", "prompt": "p", "sampling": {"temprature": 1}},
    {"id": "badmsgs", "messages": [{"content": "no role"}]},
    {"id": "ok2", "messages": [{"role": "user", "content": "chat"}]},
    {"id": 3.5, "prompt": "a float id"},
    {"id": True, "prompt": "a bool id"},
]


def test_a_prompt_with_half_a_utf16_pair_is_a_bad_prompt_saying_so(tmp_path: Path) -> None:
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "ab\\ud800c"}\n{"id": 2, "prompt": "fine"}\n')
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}, "max_error_rate": 1.0})
    assert run(job).status == "completed"
    first, second = read_output(tmp_path / "out")
    assert first["error_kind"] == "bad_prompt" and "lone surrogate '\\ud800' at character 2" in first["error"]
    assert second["error"] is None


def test_each_bad_row_kind_gets_its_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", BAD_ROWS)
    job = make_job(tmp_path, {"input": {"path": "in.jsonl", "sampling_field": "sampling"}, "output": {"path": "out"},
                              "engine": {"max_model_len": 256}, "max_error_rate": 1.0})
    result = run(job)
    assert result.status == "completed"
    rows = read_output(tmp_path / "out")
    assert len(rows) == len(BAD_ROWS)  # never skipped silently
    kinds = [r["error_kind"] for r in rows]
    assert kinds == [None, "malformed_json", "missing_prompt", "empty_prompt", "duplicate_id", "prompt_too_long",
                     "missing_id", "bad_sampling", "bad_messages", None, "bad_id", "bad_id"]
    by_kind = {r["error_kind"]: r for r in rows}
    assert "line 2" in by_kind["malformed_json"]["error"] or "in.jsonl:2" in by_kind["malformed_json"]["error"]
    assert by_kind["missing_prompt"]["error"] == ("missing prompt: field 'messages' (a chat) is missing and field "
                                                  "'prompt' is missing")
    assert "duplicate id 'ok1'" in by_kind["duplicate_id"]["error"]
    assert "max_model_len" in by_kind["prompt_too_long"]["error"]
    assert "temprature" in rows[7]["error"]
    assert "float" in rows[10]["error"] and "bool" in rows[11]["error"]
    assert all(r["text"] is None and r["finish_reason"] == "error" for r in rows if r["error"])
    assert all(r["ttft_s"] is None and r["latency_s"] is None for r in rows if r["error"])  # nothing generated
    assert result.summary["failed_by_kind"]["duplicate_id"] == 1 and result.summary["rows_failed"] == 10


def test_a_prompt_that_is_not_text_is_a_bad_prompt_row(tmp_path: Path) -> None:
    """A number (JSONL) or an int64 column (Parquet) as the prompt is an error on the row naming the type,
    never stringified into a prompt."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": "num", "prompt": 12345}, {"id": "flag", "prompt": True},
                                        {"id": "ok", "prompt": "12345"}])
    run(make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}, "max_error_rate": 1.0}))
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert out["num"]["error_kind"] == "bad_prompt" and "must be a string" in out["num"]["error"] and "int" in out["num"]["error"]
    assert out["flag"]["error_kind"] == "bad_prompt" and "bool" in out["flag"]["error"]
    assert out["ok"]["error"] is None and out["ok"]["text"]
    pq.write_table(pa.table({"uid": [1, 2], "prompt": pa.array([7, 8], pa.int64())}), tmp_path / "in.parquet")
    run(make_job(tmp_path, {"input": {"path": "in.parquet", "id_field": "uid"}, "output": {"path": "pq"},
                            "max_error_rate": 1.0}))
    rows = read_output(tmp_path / "pq")
    assert [r["error_kind"] for r in rows] == ["bad_prompt", "bad_prompt"]
    assert all("must be a string" in r["error"] and "int" in r["error"] for r in rows)


def test_an_unknown_chat_role_is_a_bad_messages_row(tmp_path: Path) -> None:
    rows = [{"id": "wiz", "messages": [{"role": "wizard", "content": "cast a spell"}]},
            {"id": "num", "messages": [{"role": 3, "content": "hi"}]},
            {"id": "ok", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    run(make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}, "max_error_rate": 1.0}))
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    for key, role in (("wiz", "'wizard'"), ("num", "3")):
        assert out[key]["error_kind"] == "bad_messages" and role in out[key]["error"]
        assert all(name in out[key]["error"] for name in ("system", "user", "assistant", "tool"))
    assert out["ok"]["error"] is None


def test_template_error_fails_only_that_row(tmp_path: Path) -> None:
    rows = [{"id": 1, "name": "Ada"}, {"id": 2}, {"id": 3, "name": "Bob"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    result = run(make_job(tmp_path, {"input": {"path": "in.jsonl", "template": "Hello {{ name }}"},
                                     "output": {"path": "out"}, "max_error_rate": 0.5}))
    out = read_output(tmp_path / "out")
    assert [r["error_kind"] for r in out] == [None, "template_error", None]
    assert "name" in out[1]["error"] and result.status == "completed"


def test_engine_reported_errors_are_rows_too(tmp_path: Path) -> None:
    rows = [{"id": 1, "prompt": "fine"}, {"id": 2, "prompt": "EXPLODE please"}]
    job = basic_job(tmp_path, rows, output={"path": "out"}, max_error_rate=1.0)
    run(job, fail_on={"EXPLODE": "engine could not run this"})
    out = read_output(tmp_path / "out")
    assert out[1]["error"] == "engine could not run this" and out[1]["error_kind"] == "engine_error"


def test_max_error_rate_fails_the_run_with_a_clear_message(tmp_path: Path) -> None:
    rows = prompts(8) + ["{bad"] * 2
    result = run(basic_job(tmp_path, rows))
    assert result.status == "failed" and result.exit_code == 1
    assert "max_error_rate" in result.message and "malformed_json 2" in result.message
    assert len(read_output(tmp_path / "out")) == 10  # the work is still written
    summary = json.loads((state_dir_for(tmp_path / "out") / "summary.json").read_text())
    assert summary["status"] == "failed"
    ok = run(basic_job(tmp_path / "b", rows, max_error_rate=0.25))
    assert ok.status == "completed"


def test_a_flood_of_bad_rows_stops_early(tmp_path: Path) -> None:
    rows = ["{bad"] * 300 + prompts(300)
    result = run(basic_job(tmp_path, rows))
    assert result.status == "failed" and "stopped early" in result.message
    assert result.summary["rows"] < 600


def test_per_row_sampling_overrides(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "prompt": "p", "sp": {"max_tokens": 1}},
        {"id": "b", "prompt": "p", "sp": json.dumps({"n": 3})},
        {"id": "c", "prompt": "p"},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    run(make_job(tmp_path, {"input": {"path": "in.jsonl", "sampling_field": "sp"}, "output": {"path": "out"},
                            "sampling": {"max_tokens": 8}}))
    out = read_output(tmp_path / "out")
    assert Counter(r["id"] for r in out) == {"a": 1, "b": 3, "c": 1}
    assert next(r for r in out if r["id"] == "a")["completion_tokens"] == 1


def test_a_null_sampling_override_is_the_jobs_value_as_a_parquet_struct_column_gives_it(tmp_path: Path) -> None:
    # a struct column: every row holds every key, null where it set none
    table = pa.Table.from_pylist([
        {"id": "a", "prompt": "p", "sp": {"max_tokens": 1, "n": None, "temperature": None}},
        {"id": "b", "prompt": "p", "sp": {"max_tokens": None, "n": 2, "temperature": None}},
        {"id": "c", "prompt": "p", "sp": {"max_tokens": None, "n": None, "temperature": 0.0}},
    ])
    pq.write_table(table, tmp_path / "in.parquet")
    result = run(make_job(tmp_path, {"input": {"path": "in.parquet", "sampling_field": "sp"}, "output": {"path": "out"},
                                     "sampling": {"max_tokens": 8, "temperature": 0.7}}))
    out = read_output(tmp_path / "out")
    assert result.exit_code == 0 and all(r["error"] is None for r in out), out
    assert Counter(r["id"] for r in out) == {"a": 1, "b": 2, "c": 1}
    assert next(r for r in out if r["id"] == "a")["completion_tokens"] == 1


def test_messages_system_prompt_and_include_prompt(tmp_path: Path) -> None:
    rows = [{"id": 1, "messages": [{"role": "user", "content": "hi"}]}, {"id": 2, "prompt": "plain"}]
    write_jsonl(tmp_path / "in.jsonl", rows)
    run(make_job(tmp_path, {"input": {"path": "in.jsonl", "system_prompt": "Be brief."},
                            "output": {"path": "out", "include_prompt": True}}))
    out = read_output(tmp_path / "out")
    assert out[0]["prompt"] == "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"
    assert out[1]["prompt"] == "<|system|>Be brief.\n<|user|>plain\n<|assistant|>"
    run(make_job(tmp_path, {"input": {"path": "in.jsonl", "apply_chat_template": False},
                            "output": {"path": "raw", "include_prompt": True}}))
    assert read_output(tmp_path / "raw")[1]["prompt"] == "plain"


def test_a_system_prompt_plain_prompts_do_not_get_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": 2, "prompt": "plain"}])
    with caplog.at_level(logging.WARNING, logger="forge_batch.runner"):
        run(make_job(tmp_path, {"input": {"path": "in.jsonl", "apply_chat_template": False, "system_prompt": "Be brief."},
                                "output": {"path": "raw", "include_prompt": True}}))
    assert read_output(tmp_path / "raw")[0]["prompt"] == "plain"
    assert any("input.system_prompt reaches only rows with a chat" in r.getMessage() for r in caplog.records)


def test_in_flight_rows_are_capped(tmp_path: Path) -> None:
    holder: list = []
    run(basic_job(tmp_path, prompts(60), engine={"max_in_flight": 5}), holder=holder)
    assert holder[0].max_seen_in_flight <= 5


def test_jsonl_and_openai_batch_output_formats(tmp_path: Path) -> None:
    run(basic_job(tmp_path, prompts(4), output={"path": "out", "format": "jsonl", "keep_fields": ["topic"]}))
    lines = [json.loads(x) for p in sorted((tmp_path / "out").glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == [f"r{i:04d}" for i in range(4)] and all(x["text"] for x in lines)
    run(basic_job(tmp_path / "oa", prompts(4), output={"path": "out", "format": "openai-batch"}, sampling={"n": 2}))
    lines = [json.loads(x) for p in sorted((tmp_path / "oa" / "out").glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"r{i:04d}" for i in range(4)]
    assert all(len(x["response"]["body"]["choices"]) == 2 for x in lines)


def test_openai_batch_round_trip(tmp_path: Path) -> None:
    reqs = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "x", "messages": [{"role": "user", "content": f"Question {i}"}], "max_tokens": 4 + i}}
        for i in range(5)
    ]
    reqs.append({"custom_id": "req-bad", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}})
    reqs.append({"custom_id": "req-c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once", "max_tokens": 3}})
    write_jsonl(tmp_path / "batch.jsonl", reqs)
    result = run(make_job(tmp_path, {"input": {"path": "batch.jsonl"}, "output": {"path": "out", "format": "openai-batch"},
                                     "max_error_rate": 0.5}))
    assert result.status == "completed"
    lines = [json.loads(x) for p in sorted((tmp_path / "out").glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    by_id = {x["custom_id"]: x for x in lines}
    assert sorted(by_id) == sorted(r["custom_id"] for r in reqs) and len(lines) == len(reqs)
    for i in range(5):
        line = by_id[f"req-{i}"]
        assert line["error"] is None and line["response"]["status_code"] == 200 and line["id"].startswith("batch_req_")
        body = line["response"]["body"]
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["completion_tokens"] <= 4 + i
    assert by_id["req-bad"]["response"]["status_code"] == 400 and by_id["req-bad"]["error"]["code"] == "bad_request"
    assert by_id["req-c"]["response"]["body"]["object"] == "text_completion"
    assert by_id["req-c"]["response"]["body"]["usage"]["completion_tokens"] <= 3


# ---- plugins in row-level hooks ---------------------------------------------------------------------------


def make_plugin(calls: dict) -> types.SimpleNamespace:
    @hookimpl
    def prepare_request(request, row):
        if row.get("skip"):
            raise SkipRow("asked to skip")
        if row.get("boom"):
            raise ValueError("prepare went wrong")
        request.prompt = [{"role": "user", "content": "rewritten " + str(row.get("prompt"))}]

    @hookimpl
    def logits_processors(request):
        calls["lp"] = calls.get("lp", 0) + 1
        return [lambda ids, logits: logits]

    @hookimpl
    def process_result(record, row):
        if row.get("drop"):
            raise DropResult("filtered")
        if row.get("crash"):
            raise RuntimeError("scorer crashed")
        record["score"] = len(record["text"] or "")

    @hookimpl
    def job_start(job, context):
        calls["start"] = context.resumed_rows

    @hookimpl
    def job_end(summary):
        calls["end"] = summary["status"]
        summary["plugin_note"] = "seen"

    return types.SimpleNamespace(
        prepare_request=prepare_request, logits_processors=logits_processors, process_result=process_result,
        job_start=job_start, job_end=job_end, __name__="myplug",
    )


def test_kept_columns_are_typed_by_the_first_rows_whatever_the_batch_size(tmp_path: Path) -> None:
    """The first 1,000 rows type the kept columns (as validate reads them), not the first batch: 20 integer
    scores then 40 fractional ones make a float column at batch_size 10 as at the default."""
    rows = [{"id": i, "prompt": "p", "score": i if i < 20 else i + 0.5, "tags": [] if i < 20 else ["a"]}
            for i in range(60)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    for name, batch_size in (("small", 10), ("default", 1000)):
        job = make_job(tmp_path, {"input": {"path": "in.jsonl", "batch_size": batch_size},
                                  "output": {"path": name, "keep_fields": ["score", "tags"]}})
        assert run(job).status == "completed"
        table = pq.read_table(tmp_path / name)
        assert table.schema.field("score").type == pa.float64() and table.schema.field("tags").type == pa.list_(pa.string())
        out = sorted(table.to_pylist(), key=lambda r: r["id"])
        assert [r["score"] for r in out] == [r["score"] for r in rows] and out[25]["tags"] == ["a"] and out[3]["tags"] == []


def test_the_input_prompt_is_kept_as_it_is_without_include_prompt(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "raw text"}])
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out", "keep_fields": ["prompt"]}})
    assert run(job).status == "completed"
    assert [r["prompt"] for r in read_output(tmp_path / "out")] == ["raw text"]
    with pytest.raises(JobError, match="clashes with the prompt column include_prompt writes"):
        make_job(tmp_path, {"input": {"path": "in.jsonl"},
                            "output": {"path": "out2", "keep_fields": ["prompt"], "include_prompt": True}})


def test_a_job_start_that_raises_still_ends_the_plugins_that_started(tmp_path: Path) -> None:
    """job_start runs last registered first: "early" starts, "raiser" raises, "late" never starts. job_end then
    reaches the plugins whose job_start returned and those without one, with the failed summary."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}])
    ended: dict[str, str] = {}

    def plugin(name: str, start: bool = True, raises: bool = False) -> types.SimpleNamespace:
        @hookimpl
        def job_start(job, context):
            if raises:
                raise RuntimeError("cannot reach the metrics server")

        @hookimpl
        def job_end(summary):
            ended[name] = summary["status"]

        return types.SimpleNamespace(**({"job_start": job_start} if start else {}), job_end=job_end, __name__=name)

    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}})
    plugins = [("late", plugin("late")), ("raiser", plugin("raiser", raises=True)), ("early", plugin("early")),
               ("notifier", plugin("notifier", start=False))]
    with pytest.raises(Exception, match="cannot reach the metrics server") as err:
        run(job, plugins=plugins)
    assert "raiser" in str(err.value)
    assert ended == {"early": "failed", "notifier": "failed"}
    assert json.loads((state_dir_for(tmp_path / "out") / "summary.json").read_text())["status"] == "failed"


def test_plugin_hooks_skip_drop_score_and_fail_rows_with_their_name(tmp_path: Path) -> None:
    rows = [
        {"id": 1, "prompt": "a"},
        {"id": 2, "prompt": "b", "skip": True},
        {"id": 3, "prompt": "c", "boom": True},
        {"id": 4, "prompt": "d", "drop": True},
        {"id": 5, "prompt": "e", "crash": True},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    calls: dict = {}
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out", "include_prompt": True},
                              "max_error_rate": 1.0})
    result = run(job, plugins=[("myplug", make_plugin(calls))])
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert sorted(out) == [1, 2, 3, 5]  # 4 was dropped on purpose
    assert out[1]["error"] is None and json.loads(out[1]["extra"]) == {"score": len(out[1]["text"])}
    assert "rewritten a" in out[1]["prompt"]
    assert out[2]["error_kind"] == "skipped" and out[2]["finish_reason"] == "skipped" and "asked to skip" in out[2]["error"]
    assert out[3]["error_kind"] == "plugin_error" and "plugin 'myplug'" in out[3]["error"] and "prepare_request" in out[3]["error"]
    assert out[5]["error_kind"] == "plugin_error" and "scorer crashed" in out[5]["error"] and "'myplug'" in out[5]["error"]
    assert calls == {"lp": 3, "start": 0, "end": "completed"}
    s = result.summary
    assert (s["rows_ok"], s["rows_failed"], s["rows_skipped"], s["rows_dropped"]) == (1, 2, 1, 1)
    assert json.loads((state_dir_for(tmp_path / "out") / "summary.json").read_text())["plugin_note"] == "seen"
    # a rerun neither regenerates the dropped row nor writes anything twice
    holder: list = []
    run(job, plugins=[("myplug", make_plugin({}))], holder=holder)
    assert holder[0].requests_seen == [] and len(read_output(tmp_path / "out")) == 4


def test_result_hooks_cannot_break_the_runners_own_columns_or_stop_the_run(tmp_path: Path) -> None:
    """process_result may replace a record without the bookkeeping keys or put a wrong type in them, and raise
    SkipRow; result_recorded may change or empty its record: none of it stops the run or changes what the runner
    counts, commits and resumes by."""
    rows = [{"id": i, "prompt": p, **extra} for i, (p, extra) in enumerate(
        [("a", {"replace": True}), ("b", {"retype": True}), ("c", {"skip": True}), ("d", {"fail": True}), ("e", {})])]
    write_jsonl(tmp_path / "in.jsonl", rows)

    @hookimpl
    def process_result(record, row):
        if row.get("replace"):
            return {"text": "replaced", "score": 1}
        if row.get("retype"):
            record["completion_tokens"], record["row_index"] = "many", None
        if row.get("skip"):
            raise SkipRow("not interesting")
        if row.get("fail"):
            record["error"] = "banned by policy"  # no kind given
        return None

    @hookimpl
    def result_recorded(record):
        record["text"] = "MUTATED"
        for key in ("row_index", "completion_tokens", "id"):
            record.pop(key)

    plugin = types.SimpleNamespace(process_result=process_result, result_recorded=result_recorded, __name__="rough")
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}, "max_error_rate": 1.0})
    result = run(job, plugins=[("rough", plugin)])
    assert result.exit_code == 0, result.message
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert [out[i]["row_index"] for i in range(5)] == list(range(5)) and all(r["text"] != "MUTATED" for r in out.values())
    assert out[0]["text"] == "replaced" and json.loads(out[0]["extra"]) == {"score": 1} and out[0]["completion_tokens"] > 0
    assert isinstance(out[1]["completion_tokens"], int) and out[1]["error"] is None
    assert (out[2]["finish_reason"], out[2]["error_kind"], out[2]["error"]) == ("skipped", "skipped", "not interesting")
    assert (out[3]["error_kind"], out[3]["error"]) == ("row_error", "banned by policy")
    s = result.summary
    assert (s["rows_ok"], s["rows_failed"], s["rows_skipped"]) == (3, 1, 1)
    assert s["completion_tokens"] == sum(r["completion_tokens"] for r in out.values())


def test_prepare_request_misuse_fails_the_row_naming_the_plugin(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x", "drop": True}, {"id": "b", "prompt": "y"}])

    @hookimpl
    def prepare_request(request, row):
        if row.get("drop"):
            raise DropResult("not wanted")
        return "a prompt string"  # the request is wanted, not its prompt

    plugin = types.SimpleNamespace(prepare_request=prepare_request, __name__="careless")
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}, "max_error_rate": 1.0})
    run(job, plugins=[("careless", plugin)])
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert {r["error_kind"] for r in out.values()} == {"plugin_error"}  # not internal_error, and the ids kept
    assert "plugin 'careless' raised DropResult in prepare_request" in out["a"]["error"] and "SkipRow" in out["a"]["error"]
    assert "plugin 'careless': prepare_request returned a str" in out["b"]["error"]


def test_a_row_failed_by_a_later_sample_is_counted_under_that_samples_kind(tmp_path: Path, capsys) -> None:
    from forge_batch.cli import main

    write_jsonl(tmp_path / "in.jsonl", prompts(3))

    @hookimpl
    def process_result(record, row):
        if row["id"] == "r0001" and record["sample_index"] == 1:
            raise RowError("second sample rejected", "too_short")

    plugin = types.SimpleNamespace(process_result=process_result, __name__="picky")
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}, "max_error_rate": 1.0,
                              "sampling": {"n": 2}})
    result = run(job, plugins=[("picky", plugin)])
    assert result.summary["failed_by_kind"] == {"too_short": 1}
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows_failed"] == 1 and info["failed_by_kind"] == {"too_short": 1}


def test_an_engine_that_does_not_load_leaves_a_failed_summary_not_the_last_runs(tmp_path: Path) -> None:
    job = basic_job(tmp_path, prompts(3))
    assert run(job).status == "completed"

    def broken_engine(job, **kwargs):
        raise ValueError("no such kernel backend")

    with pytest.raises(ValueError, match="no such kernel backend"):
        JobRunner(job, engine_factory=broken_engine, progress="none", install_signal_handlers=False).run()
    summary = json.loads((state_dir_for(tmp_path / "out") / "summary.json").read_text())
    assert summary["status"] == "failed" and "no such kernel backend" in summary["message"] and summary["rows"] == 3


def test_integer_ids_past_int64_are_never_generated_twice(tmp_path: Path) -> None:
    """A JSONL id past int64 cannot go in the int64 id column: bad_id, not written with a null id and so
    generated again on every rerun. A Parquet uint64 id column (hash ids) is written as text."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "a"}, {"id": 2**63 + 5, "prompt": "b"}, {"id": 3, "prompt": "c"}])
    job = make_job(tmp_path, {"input": {"path": "in.jsonl"}, "output": {"path": "out"}, "max_error_rate": 1.0})
    for _ in range(2):
        run(job)
    rows = read_output(tmp_path / "out")
    assert len(rows) == 3 and [r["error_kind"] for r in sorted(rows, key=lambda r: r["row_index"])] == [None, "bad_id", None]
    pq.write_table(pa.table({"id": pa.array([1, 2**63 + 5, 2**64 - 1], pa.uint64()), "prompt": ["a", "b", "c"]}),
                   tmp_path / "in.parquet")
    job = make_job(tmp_path, {"input": {"path": "in.parquet"}, "output": {"path": "out2"}})
    for _ in range(2):
        run(job)
    rows = read_output(tmp_path / "out2")
    assert sorted(r["id"] for r in rows) == sorted(["1", str(2**63 + 5), str(2**64 - 1)]) and all(r["error"] is None for r in rows)


def test_job_named_plugin_file(tmp_path: Path) -> None:
    (tmp_path / "upper.py").write_text(
        "from forge_batch.hookspecs import hookimpl\n\n"
        "@hookimpl\n"
        "def process_result(record):\n"
        "    if record['text']:\n"
        "        record['text'] = record['text'].upper()\n"
    )
    job = basic_job(tmp_path, prompts(3), plugins=["./upper.py"])
    run(job)
    assert all(r["text"].isupper() for r in read_output(tmp_path / "out"))


def test_json_schema_outputs_are_validated(tmp_path: Path) -> None:
    job = basic_job(tmp_path, prompts(3), sampling={"json_schema": {"type": "object"}}, max_error_rate=1.0)
    run(job)
    rows = read_output(tmp_path / "out")
    # the fake engine ignores constraints, so its words are not JSON: each sample is flagged, not written as fine
    assert all(r["error_kind"] == "invalid_output" and "not valid JSON" in r["error"] and r["valid"] is False for r in rows)
    run(basic_job(tmp_path / "plain", prompts(2)))
    assert all(r["valid"] is None for r in read_output(tmp_path / "plain" / "out"))


def test_time_based_flush_commits_parts_before_rows_per_file(tmp_path: Path) -> None:
    job = basic_job(tmp_path, prompts(40), output={"path": "out", "rows_per_file": 10_000, "flush_seconds": 0.05})
    run(job, step_delay=0.01)
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) >= 3
    assert len(read_output(tmp_path / "out")) == 40
