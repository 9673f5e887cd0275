"""`validate` reads the input's first rows (or its Parquet schema) and refuses what `run` would hit: a prompt,
id, kept or sampling field that is not there, a template that fails on the first row. It prints the rows, a
prompt-token estimate and where the output goes. `--set` values keep the type of their key."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runner_helpers import prompts, read_output, run, write_job_file, write_jsonl

from forge_batch.cli import main
from forge_batch.job import load_job
from forge_batch.runner import inputs as inputs_module
from forge_batch.runner.checks import validate_job_file


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")  # the model is not the point here


def job_file(tmp_path: Path, input_: dict, output: dict | None = None, **extra: object) -> Path:
    return write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": input_, "output": output or {"path": "out"}, **extra})


@pytest.mark.parametrize(
    ("input_", "output", "key", "fragment"),
    [
        ({"prompt_field": "question"}, None, "input.prompt_field",
         "neither 'question' nor 'messages' is in any of the first 5 rows"),
        ({"id_field": "uid"}, None, "input.id_field", "'uid' is in none of the first 5 rows"),
        ({}, {"path": "out", "keep_fields": ["topic", "lang"]}, "output.keep_fields[1]", "'lang' is in none of the first 5 rows"),
        ({"sampling_field": "params"}, None, "input.sampling_field", "'params' is in none"),
        ({"template": "Q: {{ question }}"}, None, "input.template", "does not render on the first row"),
        ({"template": "{{ prompt }}"}, None, "constraint.json_schema_field", "'schemaa' is in none of the first 5 rows"),
    ],
    ids=["prompt_field", "id_field", "keep_fields", "sampling_field", "template", "constraint_field"],
)
def test_a_field_run_would_miss_is_refused_by_validate_and_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, input_: dict, output: dict | None, key: str, fragment: str
) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(5))
    extra = {"constraint": {"json_schema_field": "schemaa"}} if key.startswith("constraint") else {}
    job = job_file(tmp_path, {"path": "in.jsonl", **input_}, output, **extra)
    for command in (["validate", str(job)], ["run", str(job), "--quiet"]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert f"- {key}: " in err and fragment in err and "fields: id, prompt, topic" in err, err
    assert not (tmp_path / "out").exists()


def test_parquet_is_checked_against_its_schema(tmp_path: Path) -> None:
    pq.write_table(pa.table({"uid": [1, 2], "text": ["a", "b"]}), tmp_path / "in.parquet")
    job = job_file(tmp_path, {"path": "in.parquet", "id_field": "uid", "prompt_field": "prompt"}, {"path": "out", "keep_fields": ["topic"]})
    _, problems = validate_job_file(job)
    assert {p.path: p.message for p in problems} == {
        "input.prompt_field": f"neither 'prompt' nor 'messages' is a column of {tmp_path / 'in.parquet'} (columns: text, uid); "
                              "set input.prompt_field, input.messages_field or input.template",
        "output.keep_fields[0]": f"'topic' is not a column of {tmp_path / 'in.parquet'} (columns: text, uid)",
    }


def test_a_parquet_id_column_that_is_neither_text_nor_integers_is_refused(tmp_path: Path) -> None:
    """pandas writes a column of integers with a null as float64: every row would be a bad_id."""
    pq.write_table(pa.table({"id": [1.0, 2.0, None], "prompt": ["a", "b", "c"]}), tmp_path / "in.parquet")
    _, problems = validate_job_file(job_file(tmp_path, {"path": "in.parquet"}))
    assert [(p.path, "is a column of double" in p.message and "write it as Int64" in p.message) for p in problems] == [
        ("input.id_field", True)]
    for ids in (pa.array([1, 2, None], pa.int64()), pa.array(["a", "b", None]).dictionary_encode()):
        pq.write_table(pa.table({"id": ids, "prompt": ["a", "b", "c"]}), tmp_path / "in.parquet")
        assert validate_job_file(job_file(tmp_path, {"path": "in.parquet"}))[1] == []


def test_a_field_some_rows_have_is_fine_and_a_good_template_renders(tmp_path: Path) -> None:
    rows = prompts(4)
    rows[2]["extra_note"] = "only here"
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = job_file(tmp_path, {"path": "in.jsonl", "template": "About {{ topic }}: {{ prompt }}"},
                   {"path": "out", "keep_fields": ["extra_note"]})
    assert validate_job_file(job)[1] == []


def test_an_openai_batch_file_is_read_with_its_own_fields(tmp_path: Path) -> None:
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 40}]}]}}
    write_jsonl(tmp_path / "batch.jsonl", [line, {**line, "custom_id": "b"}])
    facts: dict = {}
    job = job_file(tmp_path, {"path": "batch.jsonl"}, {"path": "results.jsonl", "format": "openai-batch"})
    assert validate_job_file(job, facts=facts)[1] == []
    assert facts["reader"] == "openai-batch" and facts["rows"] == 2 and facts["prompt_chars_per_row"] == 40


def test_a_template_prints_bytes_as_text_and_fails_a_row_whose_printed_value_is_null(tmp_path: Path) -> None:
    """A binary prompt column rendered with '{{ prompt }}' (what validate's warning suggests) gives its text, not
    "b'...'"; a null it would print fails that row (template_error) instead of generating from "None"."""
    from runner_helpers import read_output

    pq.write_table(pa.table({"id": [1, 2, 3], "prompt": pa.array([None, b"Hi", b"\xff\xfe"], pa.binary())}),
                   tmp_path / "in.parquet")
    job = job_file(tmp_path, {"path": "in.parquet", "template": "Q: {{ prompt }}"},
                   {"path": "out", "include_prompt": True}, max_error_rate=1.0)
    assert validate_job_file(job)[1] == []  # the first row's null is that row's problem, the second renders
    assert main(["run", str(job), "--quiet"]) == 0
    rows = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert rows[2]["error"] is None and "Q: Hi" in rows[2]["prompt"] and "b'" not in rows[2]["prompt"]
    assert rows[1]["error_kind"] == "template_error" and "null" in rows[1]["error"]
    assert rows[3]["error_kind"] == "template_error" and "not UTF-8" in rows[3]["error"]


def test_validate_warns_of_first_rows_whose_sampling_overrides_run_would_refuse(tmp_path: Path) -> None:
    rows: list = [{"id": "a", "prompt": "x", "opts": {"temperature": 0}},
            {"id": "b", "prompt": "x", "opts": {"temperature": -1}},
            {"id": "c", "prompt": "x", "opts": '{"nosuch": 1}'},
            {"id": "d", "prompt": "x", "opts": {"regex": "[0-9]+"}}]  # its own constraint replaces the job's
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = job_file(tmp_path, {"path": "in.jsonl", "sampling_field": "opts"}, sampling={"choice": ["x", "y"]})
    warnings: list[str] = []
    assert validate_job_file(job, warnings=warnings)[1] == []
    assert len(warnings) == 1 and warnings[0].startswith("input.sampling_field: 2 of the first 4 rows of ")
    assert "e.g. row 'b': temperature must be >= 0" in warnings[0]
    assert main(["run", str(job), "--quiet", "--set", "max_error_rate=1"]) == 0  # run agrees, row by row
    bad = {r["id"] for r in read_output(tmp_path / "out") if r["error_kind"] == "bad_sampling"}
    assert bad == {"b", "c"}  # (the fake engine follows no constraint: a and d are invalid_output there)


def test_validate_warns_of_a_kv_cache_smaller_than_the_prompts(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": "word " * 40} for i in range(3)])  # ~50 tokens
    warnings: list[str] = []
    validate_job_file(job_file(tmp_path, {"path": "in.jsonl"}, engine={"num_blocks": 2}), warnings=warnings)
    assert [w.split(":")[0] for w in warnings] == ["engine.num_blocks"] and "holds 32 tokens" in warnings[0]
    warnings.clear()
    validate_job_file(job_file(tmp_path, {"path": "in.jsonl"}, engine={"num_blocks": 64}), warnings=warnings)
    assert warnings == []


def test_an_empty_first_file_of_an_input_folder_is_skipped_for_the_first_rows(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jsonl").write_text("")  # an empty shard
    write_jsonl(folder / "b.jsonl", prompts(2))
    facts: dict = {}
    assert validate_job_file(job_file(tmp_path, {"path": "in"}), facts=facts)[1] == [] and facts["rows"] == 2
    (folder / "b.jsonl").write_text("not json\n")  # a file whose rows cannot be read is still named
    problems = validate_job_file(job_file(tmp_path, {"path": "in"}))[1]
    assert [p.path for p in problems] == ["input.path"] and "b.jsonl" in problems[0].message


def test_validate_warns_when_run_would_refuse_to_resume_the_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    job = job_file(tmp_path, {"path": "in.jsonl"}, sampling={"max_tokens": 4})
    assert main(["run", str(job), "--quiet"]) == 0
    warnings: list[str] = []
    assert validate_job_file(job, warnings=warnings)[1] == [] and warnings == []  # it would resume: nothing to say
    validate_job_file(job, ["sampling.temperature=0.5"], warnings=warnings)
    assert len(warnings) == 1 and "different options" in warnings[0] and "run would refuse to resume" in warnings[0]
    write_jsonl(tmp_path / "in.jsonl", prompts(4))
    warnings.clear()
    validate_job_file(job, warnings=warnings)
    assert len(warnings) == 1 and "different input" in warnings[0], warnings
    assert main(["run", str(job), "--quiet"]) == 2 and "different input" in capsys.readouterr().err  # as run says


def test_validate_prints_rows_a_token_estimate_and_the_output(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"id": i, "prompt": "x" * (40 * (i + 1))} for i in range(4)]  # 40, 80, 120, 160 characters
    write_jsonl(tmp_path / "in.jsonl", rows)
    job = job_file(tmp_path, {"path": "in.jsonl"}, {"path": "out/run1"}, sampling={"n": 3, "max_tokens": 50})
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert "rows:          4" in out
    assert "prompt tokens: about 100 (25 a row), estimated as characters / 4 over the first 4 rows" in out
    assert "samples:       3 per row; at most 50 completion tokens each" in out
    assert f"output:        {tmp_path / 'out' / 'run1'} (parquet parts; state in {tmp_path / 'out' / '.run1.forge_batch'})" in out
    monkeypatch.setattr(inputs_module, "COUNT_JSONL_BYTES", 10)  # a JSONL too big to scan: not counted
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert "rows:          not counted" in out and "about 25 a row" in out


def test_set_values_keep_the_type_of_their_key(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    job = job_file(tmp_path, {"path": "in.jsonl"})
    loaded = load_job(job, ["name=2024-06-01", "sampling.temperature=0", "sampling.stop=2024-01-01",
                            "input.id_field=null", "sampling.ignore_eos=true", "sampling.stop_token_ids=[1, 2]"])
    assert loaded.name == "2024-06-01" and loaded.sampling.stop == "2024-01-01"
    assert loaded.sampling.temperature == 0 and loaded.input.id_field is None and loaded.sampling.ignore_eos is True
    assert loaded.sampling.stop_token_ids == [1, 2]
    assert validate_job_file(job, ["name=2024-06-01"])[1] == []


def test_every_problem_is_reported_at_once_even_beside_a_key_that_does_not_parse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown key or a bad option does not hide the model, input and output checks: they run as if the keys
    at fault were not given, and validate reports everything in one go."""
    monkeypatch.delenv("FORGE_BATCH_ENGINE_FACTORY")  # the model is checked here
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    job = write_job_file(tmp_path / "job.yaml", {
        "model": str(tmp_path / "no-such-model.gguf"), "unknown_top": 1,
        "input": {"path": "in.jsonl", "id_field": "idx", "prompt_field": "promptx"},
        "output": {"path": "out", "keep_fields": ["nosuch"]}, "engine": {"dtype": "float8"},
    })
    job_spec, problems = validate_job_file(job)
    assert job_spec is None
    assert {p.path for p in problems} == {"unknown_top", "engine.dtype", "model", "input.id_field", "input.prompt_field",
                                          "output.keep_fields[0]"}
    # a refused output.path (required) is stood in for, so the rest is still checked; nothing is said of the stand-in
    job = write_job_file(tmp_path / "job2.yaml", {
        "model": str(tmp_path / "no-such-model.gguf"), "input": {"path": "missing.jsonl"},
        "output": {"path": "s3://bucket/out", "format": "csv"},
    })
    problems = validate_job_file(job)[1]
    assert {p.path for p in problems} == {"output.path", "model", "input.path", "output.format"}
    assert "s3:// output is not supported" in next(p.message for p in problems if p.path == "output.path")


def test_an_output_run_could_not_create_and_a_missing_metrics_folder_are_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    (tmp_path / "afile").write_text("not a folder")
    job = job_file(tmp_path, {"path": "in.jsonl"}, {"path": "afile/sub/out"},
                   metrics={"textfile": str(tmp_path / "nope" / "x.prom")})
    problems = {p.path: p.message for p in validate_job_file(job)[1]}
    assert problems.keys() == {"output.path", "metrics.textfile"}
    assert "afile is a file, not a folder" in problems["output.path"] and "nope is not a folder" in problems["metrics.textfile"]


def test_a_prompt_column_that_is_not_text_is_a_warning_unless_every_row_may_fail(tmp_path: Path) -> None:
    """run writes each such row as a bad_prompt; with max_error_rate below 1 it would then fail, so validate warns
    first (a warning: run does not refuse the job). An int64 Parquet column, and JSONL numbers in every first row
    (one text among them is fine)."""
    pq.write_table(pa.table({"uid": [1, 2], "prompt": pa.array([7, 8], pa.int64())}), tmp_path / "in.parquet")
    write_jsonl(tmp_path / "nums.jsonl", [{"id": "a", "prompt": 1}, {"id": "b", "prompt": 2.5}])
    write_jsonl(tmp_path / "mixed.jsonl", [{"id": "a", "prompt": 1}, {"id": "b", "prompt": "text"}])
    for path, message in (("in.parquet", "'prompt' is a column of int64"), ("nums.jsonl", "not text in any of the first 2 rows")):
        warnings: list[str] = []
        problems = validate_job_file(job_file(tmp_path, {"path": path, "id_field": "uid" if "parquet" in path else "id"}),
                                     warnings=warnings)[1]
        assert problems == [] and len(warnings) == 1 and warnings[0].startswith("input.prompt_field: ")
        assert message in warnings[0] and "max_error_rate 0.1" in warnings[0]
        warnings.clear()
        assert validate_job_file(job_file(tmp_path, {"path": path, "id_field": "uid" if "parquet" in path else "id"},
                                          max_error_rate=1.0), warnings=warnings)[1] == [] and warnings == []
    warnings = []
    assert validate_job_file(job_file(tmp_path, {"path": "mixed.jsonl"}), warnings=warnings)[1] == [] and warnings == []


def test_an_input_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x", "y"]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"id": ["c", "d"], "prompt": ["x", "y"]}), tmp_path / "in" / "b.parquet")
    data = (tmp_path / "in" / "b.parquet").read_bytes()
    (tmp_path / "in" / "b.parquet").write_bytes(data[: len(data) // 2])
    problems = validate_job_file(job_file(tmp_path, {"path": "in"}))[1]
    assert [p.path for p in problems] == ["input.path"]
    assert f"cannot read input file {tmp_path / 'in' / 'b.parquet'}" in problems[0].message
    result = run(load_job(tmp_path / "job.yaml"))
    assert result.exit_code == 1 and f"cannot read input file {tmp_path / 'in' / 'b.parquet'}" in result.message


def test_rows_of_a_folder_mixing_jsonl_and_parquet_are_counted_each_by_its_reader(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", prompts(2))
    write_jsonl(tmp_path / "in" / "b.jsonl", prompts(2, start=2))
    pq.write_table(pa.table({"id": ["p1", "p2"], "prompt": ["x", "y"]}), tmp_path / "in" / "c.parquet")
    facts: dict = {}
    assert validate_job_file(job_file(tmp_path, {"path": "in"}), facts=facts)[1] == []
    assert facts["rows"] == 6


@pytest.mark.parametrize(("input_path", "output_path", "says"), [
    (".", ".", "holds input files"),
    ("data", "data/out", "is inside the input folder"),
    ("data/in.jsonl", "data", "holds input files"),
    ("data", "", "output.path is empty"),
])
def test_an_output_among_the_inputs_is_refused(tmp_path: Path, input_path: str, output_path: str, says: str) -> None:
    """Parts written among the inputs would be read as input by the next run (or make it refuse a "different
    input"): refused before any work. A folder named _x or .x inside an input folder is skipped when listing."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "in.jsonl", prompts(2))
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    problems = validate_job_file(job_file(tmp_path, {"path": input_path}, {"path": output_path}))[1]
    assert [p.path for p in problems] == ["output.path"] and says in problems[0].message
    assert validate_job_file(job_file(tmp_path, {"path": "data"}, {"path": "data/_out"}))[1] == []
