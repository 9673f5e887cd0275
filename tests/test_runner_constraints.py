"""Structured output from the job file: job-wide, per row from a column, and failures before generation."""

from __future__ import annotations

import json
import re

import jsonschema
import pyarrow.dataset as ds
import pytest
import yaml

from forge_batch.job import JobError, load_job
from forge_batch.runner import JobRunner
from forge_batch.runner.checks import validate_job_file

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["n"], "additionalProperties": False}


def write_job(tmp_path, tiny_model_dir, rows, **extra):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = {
        "model": str(tiny_model_dir),
        "input": {"path": "in.jsonl", "id_field": "id", "prompt_field": "prompt"},
        "output": {"path": "out"},
        "sampling": {"temperature": 0.9, "max_tokens": 40, "seed": 3},
        "engine": {"device": "cpu", "dtype": "float32"},
        **extra,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def read(tmp_path):
    return sorted(ds.dataset(tmp_path / "out", format="parquet").to_table().to_pylist(), key=lambda r: r["id"])


def test_job_wide_json_schema(tmp_path, tiny_model_dir):
    rows = [{"id": i, "prompt": f"record {i}"} for i in range(6)]
    path = write_job(tmp_path, tiny_model_dir, rows, constraint={"json_schema": SCHEMA})
    result = JobRunner(load_job(path), progress="none").run()
    assert result.exit_code == 0, result.message
    out = read(tmp_path)
    assert len(out) == 6
    for r in out:
        if r["finish_reason"] == "stop":
            jsonschema.validate(json.loads(r["text"]), SCHEMA)
            assert r["valid"] is True
        else:
            assert r["valid"] is False and "incomplete" in r["error"]


def test_per_row_constraints_mix_kinds_in_one_job(tmp_path, tiny_model_dir):
    rows = [
        {"id": 0, "prompt": "a", "pattern": r"[0-9]{3}"},
        {"id": 1, "prompt": "b", "pattern": r"(yes|no)"},
        {"id": 2, "prompt": "c", "pattern": None},  # no row constraint: the job-wide one applies
        {"id": 3, "prompt": "d", "pattern": "(unclosed"},  # cannot compile: this row fails alone
        {"id": 4, "prompt": "e", "pattern": ""},  # an empty cell too: the job-wide one
        {"id": 5, "prompt": "f", "pattern": None, "opts": {"regex": "[a-c]{4}"}},  # the row's sampling overrides
        {"id": 6, "prompt": "g", "pattern": None, "opts": {"constraint": {"json_schema": SCHEMA}, "max_tokens": 30}},
    ]
    path = write_job(tmp_path, tiny_model_dir, rows, max_error_rate=0.5,
                     constraint={"regex_field": "pattern", "choice": ["alpha", "beta"]})
    data = yaml.safe_load(path.read_text())
    data["input"]["sampling_field"] = "opts"
    path.write_text(yaml.safe_dump(data))
    result = JobRunner(load_job(path), progress="none").run()
    assert result.exit_code == 0, result.message
    out = read(tmp_path)
    assert re.fullmatch(r"[0-9]{3}", out[0]["text"]) and out[1]["text"] in ("yes", "no")
    assert out[2]["text"] in ("alpha", "beta") and out[4]["text"] in ("alpha", "beta")
    assert out[3]["error_kind"] == "constraint_error" and "unclosed" in out[3]["error"]
    assert re.fullmatch(r"[a-c]{4}", out[5]["text"]) and out[5]["valid"] is True
    assert out[6]["valid"] is True and set(json.loads(out[6]["text"])) == {"n"}


def test_a_choice_column_cell_that_is_no_list_of_text_is_a_constraint_error(tmp_path, tiny_model_dir):
    rows = [{"id": 0, "prompt": "a", "opts": ["x", "y"]}, {"id": 1, "prompt": "b", "opts": []},
            {"id": 2, "prompt": "c", "opts": [1, 2]}, {"id": 3, "prompt": "d", "opts": '["p", "q"]'}]
    path = write_job(tmp_path, tiny_model_dir, rows, max_error_rate=1.0, constraint={"choice_field": "opts"})
    assert JobRunner(load_job(path), progress="none").run().exit_code == 0
    out = read(tmp_path)
    assert out[0]["text"] in ("x", "y") and out[3]["text"] in ("p", "q")
    for row in (out[1], out[2]):  # alike, whatever is wrong with the cell
        assert row["error_kind"] == "constraint_error" and "holds no valid choice" in row["error"], row


def test_uncompilable_job_constraint_fails_before_any_generation(tmp_path, tiny_model_dir):
    path = write_job(tmp_path, tiny_model_dir, [{"id": 0, "prompt": "a"}], constraint={"regex": "(unclosed"})
    with pytest.raises(JobError, match="constraint.regex: regex could not be compiled"):
        JobRunner(load_job(path), progress="none").run()
    assert not (tmp_path / "out").exists()  # refused before the output directory (and the model)


@pytest.mark.parametrize("constraint", [{"regex": "[a&&b]"}, {"regex": "x[^\\s\\S]"}, {"json_schema": "false"}])
def test_a_job_constraint_no_text_satisfies_is_a_validation_problem(tmp_path, tiny_model_dir, constraint):
    path = write_job(tmp_path, tiny_model_dir, [{"id": 0, "prompt": "a"}], constraint=constraint)
    kind = next(iter(constraint))
    _, problems = validate_job_file(path)
    assert [p.path for p in problems] == [f"constraint.{kind}"], problems
    assert "admits no text at all" in problems[0].message or "schema is false" in problems[0].message
    with pytest.raises(JobError, match=f"constraint.{kind}"):
        JobRunner(load_job(path), progress="none").run()
    assert not (tmp_path / "out").exists()


def test_a_true_json_schema_is_any_json(tmp_path, tiny_model_dir):
    path = write_job(tmp_path, tiny_model_dir, [{"id": 0, "prompt": "a"}], constraint={"json_schema": "true"})
    assert validate_job_file(path)[1] == []


def test_a_row_column_under_sampling_constraint_is_the_constraint_blocks(tmp_path, tiny_model_dir):
    """The README writes structured output as ``sampling.constraint``, per job or per row: ``{regex_field: col}``
    there is the ``constraint:`` block's column, beside a job-wide constraint given either way."""
    rows = [{"id": 0, "prompt": "a", "pattern": "[0-9]{3}"}, {"id": 1, "prompt": "b", "pattern": None}]
    forms = {
        "block": {"constraint": {"regex_field": "pattern", "choice": ["alpha", "beta"]}},
        "sampling": {"sampling": {"max_tokens": 40, "temperature": 0.9, "seed": 3,
                                  "constraint": {"regex_field": "pattern", "choice": ["alpha", "beta"]}}},
        "sampling_key": {"sampling": {"max_tokens": 40, "temperature": 0.9, "seed": 3, "choice": ["alpha", "beta"],
                                      "constraint": {"regex_field": "pattern"}}},
    }
    jobs = {}
    for name, extra in forms.items():
        (tmp_path / name).mkdir()
        jobs[name] = load_job(write_job(tmp_path / name, tiny_model_dir, rows, **extra))
        assert jobs[name].constraint.row_field() == ("regex", "pattern"), name
        assert jobs[name].job_constraint() == ("choice", ["alpha", "beta"]), name
    result = JobRunner(jobs["sampling"], progress="none").run()
    assert result.exit_code == 0, result.message
    out = read(tmp_path / "sampling")
    assert re.fullmatch(r"[0-9]{3}", out[0]["text"]) and out[1]["text"] in ("alpha", "beta")


def test_a_row_override_with_two_constraints_names_its_own(tmp_path, tiny_model_dir):
    rows = [{"id": 0, "prompt": "a", "opts": {"regex": "[0-9]", "choice": ["x"]}}]
    path = write_job(tmp_path, tiny_model_dir, rows, constraint={"json_schema": SCHEMA}, max_error_rate=1.0)
    data = yaml.safe_load(path.read_text())
    data["input"]["sampling_field"] = "opts"
    path.write_text(yaml.safe_dump(data))
    JobRunner(load_job(path), progress="none").run()
    row = read(tmp_path)[0]
    assert row["error_kind"] == "bad_sampling" and "got regex, choice" in row["error"], row["error"]


def test_constraint_key_errors(tmp_path, tiny_model_dir):
    path = write_job(tmp_path, tiny_model_dir, [{"id": 0, "prompt": "a"}],
                     constraint={"json_schema": SCHEMA, "regex": "a+"})
    with pytest.raises(JobError, match="mutually exclusive"):
        load_job(path)
    path = write_job(tmp_path, tiny_model_dir, [{"id": 0, "prompt": "a"}], constraint={"regex": "a"},
                     sampling={"regex": "b"})
    with pytest.raises(JobError, match="constraint given twice"):
        load_job(path)
    path = write_job(tmp_path, tiny_model_dir, [{"id": 0, "prompt": "a"}],
                     constraint={"json_schema": {"type": "nope"}})
    _, problems = validate_job_file(path)
    assert [(p.path, "not a valid JSON Schema" in p.message) for p in problems] == [("constraint.json_schema", True)]
