"""Readers, the fixed output schema, the OpenAI batch format and the atomic, resumable output directory."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forge_batch.io.openai_batch import OpenAIRequestError, parse_request, response_line, sampling_from_body
from forge_batch.io.output_dir import OutputDir, OutputDirError, state_dir_for
from forge_batch.io.schema import output_schema, records_to_table
from forge_batch.job import InputSpec
from forge_batch.plugins.readers import JsonlReader, OpenAIBatchReader, ParquetReader


def spec(**kw) -> InputSpec:
    return InputSpec(path="x", **kw)


# ---- readers --------------------------------------------------------------------------------------------


def test_jsonl_reader_batches_and_bad_lines(tmp_path: Path) -> None:
    p = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": i, "prompt": f"p{i}"}) for i in range(5)]
    lines.insert(2, "{broken")
    lines.insert(4, "")
    lines.append("[1, 2]")
    p.write_text("\n".join(lines) + "\n")
    reader = JsonlReader()
    batches = list(reader.read(str(p), spec(batch_size=3)))
    assert [len(b) for b in batches] == [3, 3, 1]
    rows = [r for b in batches for r in b]
    assert [r.error_kind for r in rows] == [None, None, "malformed_json", None, None, None, "malformed_json"]
    assert "in.jsonl:3" in rows[2].error and "malformed JSON" in rows[2].error
    assert "not an object" in rows[-1].error
    assert reader.count(str(p), spec()) == 7


def test_parquet_reader(tmp_path: Path) -> None:
    p = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(10)), "prompt": [f"p{i}" for i in range(10)]}), p)
    reader = ParquetReader()
    batches = list(reader.read(str(p), spec(batch_size=4)))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert batches[1][0].data == {"id": 4, "prompt": "p4"}
    assert reader.count(str(p), spec()) == 10
    assert reader.schema(str(p)).field("id").type == pa.int64()


def test_openai_batch_reader(tmp_path: Path) -> None:
    p = tmp_path / "batch.jsonl"
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,
                  "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
                  "logit_bias": {"10": -100}}},
        {"custom_id": "b", "url": "/v1/completions", "body": {"prompt": "Once", "max_tokens": 3, "seed": 4}},
        {"custom_id": "c", "url": "/v1/embeddings", "body": {"input": "x"}},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    reader = OpenAIBatchReader()
    assert reader.sniff(str(p)) and not JsonlReader().sniff(str(p))
    rows = [r for b in reader.read(str(p), spec()) for r in b]
    assert rows[0].data["messages"] == [{"role": "user", "content": "hi"}]
    assert rows[0].data["sampling"] == {
        "max_tokens": 5, "temperature": 0, "json_schema": {"type": "object"}, "logit_bias": {10: -100.0}
    }
    assert rows[1].data["prompt"] == "Once" and rows[1].data["_forge_chat"] is False
    assert rows[1].data["sampling"] == {"max_tokens": 3, "seed": 4}
    assert rows[2].error_kind == "bad_request" and "not supported" in rows[2].error
    assert rows[2].data == {"custom_id": "c"}
    with pytest.raises(OpenAIRequestError):
        sampling_from_body({"tools": [{}]})
    with pytest.raises(OpenAIRequestError):
        parse_request({"custom_id": "x", "url": "/v1/chat/completions"})
    # an absent custom_id is absent (the row is a missing_id "missing"), not null
    assert "custom_id" not in parse_request({"url": "/v1/completions", "body": {"prompt": "x"}})


def test_openai_body_fields_that_change_the_output_are_run_or_refused_never_dropped() -> None:
    """vLLM's extra sampling fields run as SamplingParams; its fields this tool cannot honour are accepted at
    vLLM's default only, so a request never succeeds without what it asked for."""
    body = {"include_stop_str_in_output": True, "allowed_token_ids": [4, 5], "bad_words": ["x"],
            "truncate_prompt_tokens": 8, "structured_outputs": {"choice": ["a", "b"], "backend": "auto"},
            "echo": False, "best_of": 2, "n": 2, "add_generation_prompt": True, "priority": 3}
    assert sampling_from_body(body) == {"include_stop_str_in_output": True, "allowed_token_ids": [4, 5],
                                        "bad_words": ["x"], "truncate_prompt_tokens": 8, "choice": ["a", "b"], "n": 2}
    assert sampling_from_body({"structured_outputs": {"json": {"type": "object"}}}) == {"json_schema": {"type": "object"}}
    assert sampling_from_body({"structured_outputs": {"json_object": True}}) == {"json_schema": {"type": "object"}}
    assert sampling_from_body({"add_special_tokens": True}, "/v1/completions") == {}
    refused = [({"guided_grammar": 'root ::= "no"'}, "guided_grammar"), ({"structured_outputs": {"grammar": "g"}}, "grammar"),
               ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"), ({"add_generation_prompt": False}, "add_generation_prompt"),
               ({"continue_final_message": True}, "continue_final_message"), ({"suffix": "end"}, "suffix"),
               ({"use_beam_search": True}, "use_beam_search"), ({"chat_template": "{{ x }}"}, "chat_template"),
               ({"add_special_tokens": True}, "add_special_tokens")]
    for fields, named in refused:
        with pytest.raises(OpenAIRequestError, match=named):
            sampling_from_body(fields)


def test_openai_response_line_shapes() -> None:
    now = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    base = {"custom_id": "r1", "row_index": 0, "prompt_tokens": 4, "finished_at": now, "extra_obj": {}}
    ok = response_line(
        [
            {**base, "sample_index": 0, "text": "a", "finish_reason": "stop", "completion_tokens": 2, "error": None},
            {**base, "sample_index": 1, "text": "b", "finish_reason": "length", "completion_tokens": 3, "error": None},
        ],
        "custom_id",
        "tiny",
    )
    assert set(ok) == {"id", "custom_id", "response", "error"} and ok["error"] is None
    assert ok["custom_id"] == "r1" and ok["response"]["status_code"] == 200
    body = ok["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert [c["message"]["content"] for c in body["choices"]] == ["a", "b"]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    bad = response_line(
        [{**base, "sample_index": 0, "text": None, "finish_reason": "error", "completion_tokens": 0,
          "error": "prompt too long", "error_kind": "prompt_too_long"}],
        "custom_id",
        "tiny",
    )
    assert bad["response"]["status_code"] == 400 and bad["error"]["code"] == "prompt_too_long"
    assert bad["response"]["body"]["error"]["message"] == "prompt too long"
    comp = response_line(
        [{**base, "extra_obj": {"openai_url": "/v1/completions"}, "sample_index": 0, "text": "x",
          "finish_reason": "stop", "completion_tokens": 1, "error": None}],
        "custom_id",
        "tiny",
    )
    assert comp["response"]["body"]["object"] == "text_completion"
    assert comp["response"]["body"]["choices"][0]["text"] == "x"
    # a constrained output cut by max_tokens is an answer, as vLLM returns it: 200, finish_reason length
    cut = response_line(
        [{**base, "sample_index": 0, "text": '{"a": ', "finish_reason": "length", "completion_tokens": 3,
          "error": "incomplete: max_tokens reached", "error_kind": "invalid_output"}],
        "custom_id",
        "tiny",
    )
    assert cut["response"]["status_code"] == 200 and cut["error"] is None
    choice = cut["response"]["body"]["choices"][0]
    assert choice["message"]["content"] == '{"a": ' and choice["finish_reason"] == "length"
    assert choice["error"]["code"] == "invalid_output"


# ---- schema ---------------------------------------------------------------------------------------------


def test_all_null_error_column_is_still_string() -> None:
    schema = output_schema("id", pa.string(), [("topic", pa.string())], include_prompt=False)
    table = records_to_table([{"id": "a", "row_index": 0, "sample_index": 0, "text": "x"}], schema)
    assert table.schema.field("error").type == pa.string()
    assert table.schema.field("finished_at").type == pa.timestamp("us", tz="UTC")
    assert table.column("error").null_count == 1


def test_a_kept_column_of_no_known_type_holds_json_text() -> None:
    schema = output_schema("id", pa.int64(), [("note", None), ("score", pa.null()), ("tag", pa.string())],
                           include_prompt=False)
    recs = [{"id": i, "row_index": i, "sample_index": 0, "note": v, "score": v, "tag": v, "text": "ok"}
            for i, v in enumerate([None, "s", 3, [1, 2]])]
    table = records_to_table(recs, schema)
    assert table.column("note").to_pylist() == table.column("score").to_pylist() == [None, "s", "3", "[1, 2]"]
    # a column typed from the input keeps its type: a value of another type is a type_mismatch
    assert table.column("tag").to_pylist() == [None, "s", None, None]
    assert table.column("error_kind").to_pylist() == [None, None, "type_mismatch", "type_mismatch"]


def test_records_that_do_not_fit_get_an_error_not_a_crash() -> None:
    schema = output_schema("id", pa.int64(), [("score", pa.int64())], include_prompt=False)
    recs = [
        {"id": 1, "row_index": 0, "sample_index": 0, "score": 3, "text": "ok"},
        {"id": 2, "row_index": 1, "sample_index": 0, "score": "high", "text": "ok"},
    ]
    table = records_to_table(recs, schema)
    assert table.column("score").to_pylist() == [3, None]
    assert table.column("error_kind").to_pylist() == [None, "type_mismatch"]
    assert "score" in table.column("error").to_pylist()[1]


def test_a_value_arrow_would_change_to_fit_is_a_type_mismatch_not_written_changed() -> None:
    """pyarrow cuts 1000.75 to 1000 in an int64 column and drops a struct key the type lacks, silently: such a
    value is null with type_mismatch, as any other that does not fit. A wider type is no change."""
    struct = pa.struct([("a", pa.int64()), ("b", pa.string())])
    schema = output_schema("id", pa.int64(), [("score", pa.int64()), ("meta", struct), ("ratio", pa.float64())],
                           include_prompt=False)
    base = {"row_index": 0, "sample_index": 0, "text": "ok"}
    recs = [{**base, "id": 1, "score": 1000, "meta": {"a": 1}, "ratio": 2},  # a missing key, an int in floats: fine
            {**base, "id": 2, "score": 1000.75, "meta": {"a": 1}, "ratio": 0.5},
            {**base, "id": 3, "score": 7, "meta": {"a": 1, "c": "lost"}, "ratio": float("nan")}]
    table = records_to_table(recs, schema)
    assert table.column("score").to_pylist() == [1000, None, 7]
    assert table.column("meta").to_pylist() == [{"a": 1, "b": None}, {"a": 1, "b": None}, None]
    assert table.column("error_kind").to_pylist() == [None, "type_mismatch", "type_mismatch"]
    assert "1000.75" in table.column("error").to_pylist()[1]
    assert table.column("ratio").to_pylist()[:2] == [2.0, 0.5]


def test_first_values_that_do_not_tell_a_type_make_a_text_column() -> None:
    from forge_batch.io.schema import infer_type

    assert infer_type([[], []]) is None and infer_type([{"a": None, "b": 1}]) is None  # list<null>, struct<a: null>
    assert infer_type([[1], []]) == pa.list_(pa.int64()) and infer_type([{"a": 1}]) == pa.struct([("a", pa.int64())])


# ---- output directory -----------------------------------------------------------------------------------

ID = pa.string()


def ledger(ids: list[str], start: int = 0) -> list[dict]:
    return [
        {"id": i, "row_index": start + k, "sample_index": 0, "status": "ok", "error_kind": None, "row_status": "ok",
         "prompt_tokens": 1, "completion_tokens": 1}
        for k, i in enumerate(ids)
    ]


def write_parquet(ids: list[str]):
    def write(path: str) -> None:
        pq.write_table(pa.table({"id": ids, "text": ["t"] * len(ids)}), path)

    return write


def open_dir(path: Path, fp: str = "fp") -> tuple[OutputDir, object]:
    out = OutputDir(path, ".parquet")
    state = out.open(fp, {"model": "m"}, "parquet")
    return out, state


def test_commit_is_atomic_and_resume_reads_ledgers(tmp_path: Path) -> None:
    out, state = open_dir(tmp_path / "o")
    assert not state.resumed and state.next_part == 0
    out.commit_part(0, write_parquet(["a", "b"]), ledger(["a", "b"]), ID)
    out.commit_part(1, write_parquet(["c"]), ledger(["c"], 2), ID)
    out.close()
    names = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert names == ["part-00000.parquet", "part-00001.parquet"]  # the state is next to the directory
    assert (tmp_path / ".o.forge_batch" / "manifest.json").is_file()
    out, state = open_dir(tmp_path / "o")
    assert state.done_ids == {"a", "b", "c"} and state.next_part == 2 and state.tally.rows == 3
    out.close()


def test_crash_leftovers_are_cleaned(tmp_path: Path) -> None:
    out, _ = open_dir(tmp_path / "o")
    out.commit_part(0, write_parquet(["a"]), ledger(["a"]), ID)
    out.close()
    root = tmp_path / "o"
    # a part being written when the process died (where this version and older ones write them), and a
    # ledger whose part never got renamed into place
    (state_dir_for(root) / ".part-00001.parquet.tmp").write_bytes(b"garbage")
    (root / ".part-00001.parquet.tmp").write_bytes(b"garbage")
    pq.write_table(
        pa.Table.from_pylist(ledger(["b"], 1)).replace_schema_metadata({"part_file": "part-00001.parquet"}),
        state_dir_for(root) / "ledger" / "part-00001.parquet",
    )
    out, state = open_dir(root)
    assert state.done_ids == {"a"}
    assert not (root / ".part-00001.parquet.tmp").exists()
    assert not (state_dir_for(root) / ".part-00001.parquet.tmp").exists()
    assert not (state_dir_for(root) / "ledger" / "part-00001.parquet").exists()
    out.close()


def test_other_jobs_output_and_locks_are_refused(tmp_path: Path) -> None:
    out, _ = open_dir(tmp_path / "o", fp="one")
    out.commit_part(0, write_parquet(["a"]), ledger(["a"]), ID)
    with pytest.raises(OutputDirError, match="another run"):
        open_dir(tmp_path / "o", fp="one")
    out.close()
    with pytest.raises(OutputDirError, match="different options"):
        open_dir(tmp_path / "o", fp="two")
    out = OutputDir(tmp_path / "o", ".parquet")
    state = out.open("two", {}, "parquet", overwrite=True)
    assert not state.resumed and not list((tmp_path / "o").glob("part-*"))
    out.close()


def test_stray_part_without_ledger_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "o"
    root.mkdir()
    pq.write_table(pa.table({"id": ["a"]}), root / "part-00000.parquet")
    with pytest.raises(OutputDirError, match="ledger"):
        open_dir(root)


def test_directory_readable_by_every_engine_mid_run(tmp_path: Path) -> None:
    """Committed parts + a half-written part + the state folder + the lock held: every reader sees the committed
    rows, reading the directory itself (tests/test_output_readers.py adds HF datasets and a real run)."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    out, _ = open_dir(tmp_path / "o")
    out.commit_part(0, write_parquet(["a", "b"]), ledger(["a", "b"]), ID)
    out.write_summary({"status": "running"})
    root = tmp_path / "o"
    (state_dir_for(root) / ".part-00001.parquet.tmp").write_bytes(b"PAR1 half written")
    assert ds.dataset(root, format="parquet").to_table().num_rows == 2
    assert len(pd.read_parquet(root)) == 2
    assert pl.read_parquet(root).height == 2 and pl.scan_parquet(root).collect().height == 2
    assert duckdb.sql(f"select count(*) from read_parquet('{root}')").fetchall()[0][0] == 2
    assert duckdb.sql(f"select count(*) from read_parquet('{root}/**/*.parquet')").fetchall()[0][0] == 2
    out.close()


# ---- progress ---------------------------------------------------------------------------------------------


class _Tty:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_rows_tokens_and_engine_state() -> None:
    from forge_batch.io.progress import Progress

    tty = _Tty()
    p = Progress(total=10, initial=2, mode="auto", stream=tty, desc="job")
    assert p.mode == "bar"
    p._last_refresh = -1.0
    p.update(3, 120, lambda: {"running": 4, "waiting": 7, "kv_blocks_used": 12, "kv_blocks_total": 64})
    p.close()
    assert "5/10" in tty.text and "tok/s" in tty.text and "run 4 wait 7" in tty.text and "kv 12/64" in tty.text


def test_progress_logs_plain_lines_when_not_a_terminal() -> None:
    import io

    from forge_batch.io.progress import Progress

    buf = io.StringIO()
    p = Progress(total=None, mode="auto", stream=buf, log_interval=0, desc="job")
    assert p.mode == "log"
    p.update(4, 10, lambda: {"running": 1, "waiting": 0})
    p.close()
    assert "\r" not in buf.getvalue() and "job: 4 rows" in buf.getvalue()
