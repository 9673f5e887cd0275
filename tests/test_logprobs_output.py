"""Logprobs in a job's output: typed Parquet columns present only when the job asks (fixed for the run),
values equal to the engine's, and OpenAI batch lines answered in the ChatCompletion / Completion shapes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from runner_helpers import read_output, write_jsonl

from forge_batch import LLM, SamplingParams
from forge_batch.io.openai_batch import OpenAIRequestError, sampling_from_body
from forge_batch.io.schema import POSITION_LOGPROBS_TYPE
from forge_batch.job import job_from_dict
from forge_batch.runner import JobRunner

ROWS = [{"id": f"r{i}", "prompt": f"Tell me about item {i}"} for i in range(4)]


def run_job(tmp_path: Path, model: Path, **data: Any):
    job = job_from_dict({"model": str(model), "input": {"path": "in.jsonl"}, "output": {"path": "out"},
                         "engine": {"max_num_seqs": 4}, **data}, base_dir=tmp_path)
    return JobRunner(job, progress="none", install_signal_handlers=False).run()


def test_logprob_columns_are_typed_and_equal_the_engines(tiny_model_dir: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    sampling = {"temperature": 0, "max_tokens": 5, "logprobs": 3, "prompt_logprobs": 2}
    assert run_job(tmp_path, tiny_model_dir, sampling=sampling).status == "completed"
    schema = ds.dataset(str(tmp_path / "out"), format="parquet").schema
    assert schema.field("logprobs").type == pa.list_(POSITION_LOGPROBS_TYPE)
    assert schema.field("prompt_logprobs").type == pa.list_(POSITION_LOGPROBS_TYPE)
    assert schema.field("cumulative_logprob").type == pa.float64()
    assert POSITION_LOGPROBS_TYPE.field("logprob").type == pa.float32()
    assert POSITION_LOGPROBS_TYPE.field("token_id").type == pa.int32()

    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    llm = LLM(str(tiny_model_dir), max_num_seqs=4)
    expected = llm.generate([[{"role": "user", "content": r["prompt"]}] for r in ROWS],
                            SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2))
    for row, e in zip(ROWS, expected):
        got = out[row["id"]]
        sample = e.outputs[0]
        assert [p["token_id"] for p in got["logprobs"]] == sample.token_ids
        for p, d, tok in zip(got["logprobs"], sample.logprobs, sample.token_ids):
            assert p["logprob"] == pytest.approx(d[tok].logprob, abs=1e-6)
            assert p["rank"] == d[tok].rank and p["token"] == d[tok].decoded_token
            assert len(p["top"]) == 3
            assert [t["logprob"] for t in p["top"]] == sorted((t["logprob"] for t in p["top"]), reverse=True)
            assert [t["logprob"] for t in p["top"]] == pytest.approx([d[t["token_id"]].logprob for t in p["top"]], abs=1e-6)
        assert got["cumulative_logprob"] == pytest.approx(sum(p["logprob"] for p in got["logprobs"]), abs=1e-5)
        assert got["prompt_logprobs"][0] is None and len(got["prompt_logprobs"]) == got["prompt_tokens"]
        assert [p["token_id"] for p in got["prompt_logprobs"][1:]] == e.prompt_token_ids[1:]
        assert all(len(p["top"]) == 2 for p in got["prompt_logprobs"][1:])


def test_no_logprob_columns_unless_asked_and_a_row_cannot_ask_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [{**r, "opts": {"logprobs": 2} if i == 1 else None} for i, r in enumerate(ROWS)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    result = run_job(tmp_path, tiny_model_dir, input={"path": "in.jsonl", "sampling_field": "opts"},
                     sampling={"temperature": 0, "max_tokens": 3}, max_error_rate=1.0)
    assert result.status == "completed"
    names = ds.dataset(str(tmp_path / "out"), format="parquet").schema.names
    assert not {"logprobs", "cumulative_logprob", "prompt_logprobs"} & set(names)
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert out["r1"]["error_kind"] == "bad_sampling" and "sampling.logprobs" in out["r1"]["error"]
    assert out["r0"]["error"] is None


def test_a_row_may_ask_for_fewer_when_the_job_has_the_columns(tiny_model_dir: Path, tmp_path: Path) -> None:
    rows = [{**r, "opts": {"logprobs": None} if i == 1 else None} for i, r in enumerate(ROWS)]
    write_jsonl(tmp_path / "in.jsonl", rows)
    run_job(tmp_path, tiny_model_dir, input={"path": "in.jsonl", "sampling_field": "opts"},
            sampling={"temperature": 0, "max_tokens": 3, "logprobs": 1})
    out = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert out["r1"]["logprobs"] is None and out["r1"]["cumulative_logprob"] is None
    assert len(out["r0"]["logprobs"]) == out["r0"]["completion_tokens"]


def test_openai_body_logprobs() -> None:
    assert sampling_from_body({"logprobs": True, "top_logprobs": 4})["logprobs"] == 4
    assert sampling_from_body({"logprobs": True})["logprobs"] == 0
    assert "logprobs" not in sampling_from_body({"logprobs": False})
    assert sampling_from_body({"logprobs": 2}, "/v1/completions")["logprobs"] == 2
    assert sampling_from_body({"prompt_logprobs": 1})["prompt_logprobs"] == 1
    with pytest.raises(OpenAIRequestError, match="logprobs: true"):
        sampling_from_body({"top_logprobs": 2})
    with pytest.raises(OpenAIRequestError, match="true or false"):
        sampling_from_body({"logprobs": 3})


def test_openai_batch_logprobs_in_the_chat_completion_shape(tiny_model_dir: Path, tmp_path: Path) -> None:
    def line(cid: str, url: str = "/v1/chat/completions", **body: Any) -> dict[str, Any]:
        payload = {"prompt": "Numbers: 4"} if url == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
        return {"custom_id": cid, "method": "POST", "url": url,
                "body": {"model": "m", "max_tokens": 4, "temperature": 0, **payload, **body}}

    write_jsonl(tmp_path / "batch.jsonl", [
        line("top2", logprobs=True, top_logprobs=2), line("plain"), line("bad", top_logprobs=2),
        line("legacy", "/v1/completions", logprobs=1), line("prompt", prompt_logprobs=1),
    ])
    job = job_from_dict({"model": str(tiny_model_dir), "input": {"path": "batch.jsonl"},
                         "output": {"path": "results.jsonl", "format": "openai-batch"}, "max_error_rate": 1.0},
                        base_dir=tmp_path)
    assert JobRunner(job, progress="none", install_signal_handlers=False).run().status == "completed"
    by_id = {x["custom_id"]: x for x in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}

    body = by_id["top2"]["response"]["body"]
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] == 4
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode("utf-8")) and entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])  # greedy: the top token
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]

    assert by_id["plain"]["response"]["body"]["choices"][0]["logprobs"] is None
    assert by_id["bad"]["response"]["status_code"] == 400 and "logprobs" in by_id["bad"]["error"]["message"]
    legacy = by_id["legacy"]["response"]["body"]["choices"][0]["logprobs"]
    assert len(legacy["tokens"]) == len(legacy["token_logprobs"]) == len(legacy["top_logprobs"]) == 4
    assert legacy["text_offset"][0] == 0 and all(len(t) == 1 for t in legacy["top_logprobs"])
    prompt = by_id["prompt"]["response"]["body"]
    assert prompt["prompt_logprobs"][0] is None
    assert len(prompt["prompt_logprobs"]) == prompt["usage"]["prompt_tokens"]
    assert prompt["choices"][0]["logprobs"] is None


def test_fingerprint_counts_the_new_sampling_keys_only_when_set(tmp_path: Path) -> None:
    import hashlib

    data = {"model": "m", "input": {"path": "in.jsonl"}, "output": {"path": "out"}, "sampling": {"temperature": 0}}
    job = job_from_dict(data, base_dir=tmp_path)
    # what outputs written before these keys existed were fingerprinted with
    d = job.model_dump(mode="json")
    later = {"include_stop_str_in_output", "logprobs", "prompt_logprobs", "allowed_token_ids", "bad_words",
             "truncate_prompt_tokens"}
    before = {"model": job.model_ref(),
              "input": {k: v for k, v in d["input"].items() if k not in ("path", "batch_size", "limit")},
              "output": {k: d["output"][k] for k in ("format", "keep_fields", "include_prompt")},
              "sampling": {k: v for k, v in d["sampling"].items() if k not in later}}
    assert job.fingerprint() == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    with_logprobs = job_from_dict({**data, "sampling": {"temperature": 0, "logprobs": 2}}, base_dir=tmp_path)
    assert with_logprobs.fingerprint() != job.fingerprint()


def test_a_job_asking_more_logprobs_than_the_engine_allows_is_invalid(tmp_path: Path) -> None:
    from forge_batch.job import JobError

    data = {"model": "m", "input": {"path": "in.jsonl"}, "output": {"path": "out"}, "sampling": {"logprobs": 25}}
    with pytest.raises(JobError, match="max_logprobs"):
        job_from_dict(data, base_dir=tmp_path)
    data["engine"] = {"max_logprobs": 25}
    assert job_from_dict(data, base_dir=tmp_path).sampling.logprobs == 25
