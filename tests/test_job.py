"""The job file: one pydantic model, unknown keys are errors with paths, ${ENV}, --set, relative paths,
and `validate` reporting every problem at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forge_batch.job import (
    JobError,
    apply_overrides,
    interpolate_env,
    job_from_dict,
    load_job,
    parse_override,
)
from forge_batch.runner.checks import validate_job_file


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    d = tmp_path / "jobs"
    write(d / "prompts.jsonl", json.dumps({"id": 1, "prompt": "hi"}) + "\n")
    return d


def test_a_yaml_boolean_where_text_is_due_says_to_quote_it(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("model: m\ninput: {path: in.jsonl}\noutput: {path: out}\nsampling: {choice: [yes, no]}\n")
    with pytest.raises(JobError) as err:
        load_job(job)
    assert [p.path for p in err.value.problems] == ["sampling.choice[0]", "sampling.choice[1]"]
    assert all("got True" in p.message or "got False" in p.message for p in err.value.problems)
    assert "unquoted as booleans: quote it" in err.value.problems[0].message


def test_minimal_job_defaults_and_relative_paths(job_dir: Path) -> None:
    path = write(job_dir / "job.yaml", "input: {path: prompts.jsonl}\noutput: {path: out/run1}\n")
    job = load_job(path)
    assert job.model == "smollm2-135m-instruct"
    assert job.input.path == str(job_dir / "prompts.jsonl")
    assert job.output.path == str(job_dir / "out" / "run1")
    assert job.input.id_field == "id"
    assert job.output.format == "parquet" and job.output.rows_per_file == 10_000
    assert job.max_error_rate == 0.1
    assert job.sampling.n == 1 and job.sampling.seed == 0


def test_relative_model_dir_resolves_against_job_folder(job_dir: Path) -> None:
    (job_dir / "models" / "tiny").mkdir(parents=True)
    path = write(job_dir / "job.yaml", "model: models/tiny\ninput: {path: prompts.jsonl}\noutput: {path: out}\n")
    assert load_job(path).model == str(job_dir / "models" / "tiny")


def test_unknown_keys_are_errors_with_their_path(job_dir: Path) -> None:
    path = write(
        job_dir / "job.yaml",
        "modle: x\ninput: {path: prompts.jsonl, promt_field: p}\noutput: {path: out}\nsampling: {temprature: 0.5}\n",
    )
    with pytest.raises(JobError) as exc:
        load_job(path)
    paths = {p.path for p in exc.value.problems}
    assert {"modle", "input.promt_field", "sampling.temprature"} <= paths
    assert all("unknown key" in p.message for p in exc.value.problems)


def test_every_problem_reported_at_once(job_dir: Path) -> None:
    path = write(
        job_dir / "job.yaml",
        "input: {path: prompts.jsonl, batch_size: 0}\nsampling: {temperature: -1, n: two}\nmax_error_rate: 3\nfoo: 1\n",
    )
    with pytest.raises(JobError) as exc:
        load_job(path)
    paths = {p.path for p in exc.value.problems}
    assert {"output", "input.batch_size", "sampling.temperature", "sampling.n", "max_error_rate", "foo"} <= paths
    text = str(exc.value)
    assert "output: required key is missing" in text


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "job.yaml", "input:\n  path: [unclosed\noutput: {path: out}\n")
    with pytest.raises(JobError) as exc:
        load_job(path)
    assert "line" in str(exc.value) and "${VAR}" not in str(exc.value)
    # an environment variable inside flow braces: YAML's own message, and how to write it
    path = write(tmp_path / "job.yaml", "model: m\ninput: {path: ${DATA}}\noutput: {path: out}\n")
    with pytest.raises(JobError) as exc:
        load_job(path)
    assert "line 2" in str(exc.value) and 'quote a ${VAR} inside braces ("${VAR}")' in str(exc.value)


def test_env_interpolation() -> None:
    problems: list = []
    data = {"a": "${X}/y", "b": ["${MISSING:-dflt}", "$${LITERAL}"], "c": {"d": "${NOPE}"}}
    out = interpolate_env(data, {"X": "/data"}, "", problems)
    assert out == {"a": "/data/y", "b": ["dflt", "${LITERAL}"], "c": {"d": "${NOPE}"}}
    assert [p.path for p in problems] == ["c.d"] and "NOPE" in problems[0].message
    # as the shell's :-, a variable set but empty takes the default (systemd's Environment=NAME=); without one
    # it is the empty text
    assert interpolate_env({"n": "${NAME:-job}", "m": "x${NAME}y"}, {"NAME": ""}, "", problems) == {"n": "job", "m": "xy"}


def test_env_interpolation_in_job(job_dir: Path) -> None:
    path = write(job_dir / "job.yaml", "input: {path: prompts.jsonl}\noutput: {path: '${OUT_DIR}/run'}\n")
    job = load_job(path, env={"OUT_DIR": "/tmp/x"})
    assert job.output.path == "/tmp/x/run"
    with pytest.raises(JobError) as exc:
        load_job(path, env={})
    assert exc.value.problems[0].path == "output.path"


def test_set_overrides(job_dir: Path) -> None:
    assert parse_override("sampling.temperature=0") == (["sampling", "temperature"], 0)
    assert parse_override("sampling.stop=[a, b]") == (["sampling", "stop"], ["a", "b"])
    assert parse_override("name=hello world") == (["name"], "hello world")
    with pytest.raises(ValueError):
        parse_override("no-equals-sign")
    with pytest.raises(ValueError, match="not a valid YAML list or mapping"):  # a typo, not the text "[a, b"
        parse_override("sampling.stop=[a, b")
    assert parse_override("sampling.stop='[a, b'") == (["sampling", "stop"], "[a, b")
    path = write(job_dir / "job.yaml", "input: {path: prompts.jsonl}\noutput: {path: out}\n")
    job = load_job(path, ["sampling.temperature=0", "engine.max_num_seqs=4", "output.keep_fields=[topic]"])
    assert job.sampling.temperature == 0.0 and job.engine.max_num_seqs == 4 and job.output.keep_fields == ["topic"]
    with pytest.raises(JobError) as exc:
        load_job(path, ["sampling.temprature=0"])
    assert exc.value.problems[0].path == "sampling.temprature"


def test_apply_overrides_reports_non_mapping() -> None:
    data = {"model": "x"}
    problems = apply_overrides(data, ["model.name=y"])
    assert problems and problems[0].path == "model"


def test_reserved_keep_fields_and_sampling_checks(tmp_path: Path) -> None:
    with pytest.raises(JobError) as exc:
        job_from_dict(
            {
                "input": {"path": "x"},
                "output": {"path": "o", "keep_fields": ["text"]},
                "sampling": {"json_schema": {"type": "object"}, "regex": "a+"},
            },
            base_dir=tmp_path,
        )
    paths = {p.path for p in exc.value.problems}
    assert {"output.keep_fields", "sampling"} <= paths


@pytest.mark.parametrize("kind,spec", [("json_schema", {"type": "integer"}), ("regex", "[0-9]+"), ("choice", ["a", "b"])])
def test_sampling_constraint_with_a_builtin_kind_is_that_kind(tmp_path: Path, kind: str, spec: object) -> None:
    """The README's ``sampling.constraint: {json_schema: {...}}`` (or regex, choice) means ``sampling.json_schema``."""
    base = {"input": {"path": "x"}, "output": {"path": "o"}}
    job = job_from_dict({**base, "sampling": {"constraint": {kind: spec}}}, base_dir=tmp_path)
    assert job.job_constraint() == (kind, spec) and job.sampling_dict()[kind] == spec
    assert job.fingerprint() == job_from_dict({**base, "sampling": {kind: spec}}, base_dir=tmp_path).fingerprint()
    with pytest.raises(JobError, match="mutually exclusive"):
        job_from_dict({**base, "sampling": {"constraint": {kind: spec}, "json_schema" if kind != "json_schema" else "regex": "a"}},
                      base_dir=tmp_path)


def test_fingerprint_tracks_output_affecting_options(tmp_path: Path) -> None:
    base = {"input": {"path": "x"}, "output": {"path": "o"}}
    a = job_from_dict(base, base_dir=tmp_path)
    b = job_from_dict(base, base_dir=tmp_path, overrides=["engine.max_num_seqs=3", "output.rows_per_file=5"])
    c = job_from_dict(base, base_dir=tmp_path, overrides=["sampling.temperature=0"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_validate_lists_every_problem_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FORGE_BATCH_ENGINE_FACTORY", raising=False)
    path = write(
        tmp_path / "job.yaml",
        """
model: ./no-such-model.gguf
input:
  path: missing.jsonl
  template: "{{ unclosed"
output:
  path: out
  format: xlsx
sampling: {sampler: nope}
plugins: [no_such_plugin_module_xyz]
""",
    )
    job, problems = validate_job_file(path)
    assert job is not None
    paths = {p.path for p in problems}
    assert {"model", "input.path", "input.template", "output.format", "sampling.sampler", "plugins[0]"} <= paths
    assert not (tmp_path / "out").exists()


def test_validate_ok_for_shipped_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")  # model presence is not the point here
    jobs = Path(__file__).resolve().parents[1] / "jobs"
    for name in ("quickstart.yaml", "nightly_dataset.yaml", "openai_batch.yaml"):
        job, problems = validate_job_file(jobs / name)
        assert problems == [], (name, problems)


def test_parquet_columns_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")
    pq.write_table(pa.table({"uid": [1], "text": ["a"]}), tmp_path / "in.parquet")
    path = write(tmp_path / "job.yaml", "input: {path: in.parquet}\noutput: {path: out, keep_fields: [topic]}\n")
    _, problems = validate_job_file(path)
    paths = {p.path for p in problems}
    assert {"input.id_field", "output.keep_fields[0]", "input.prompt_field"} <= paths


def test_sampling_options_are_the_engines() -> None:
    """Every job sampling option is a SamplingParams field (so a job option can never be silently dropped)."""
    from forge_batch.engine.sampling_params import SamplingParams
    from forge_batch.job import SamplingSpec

    assert set(SamplingSpec.model_fields) <= set(SamplingParams.__dataclass_fields__)


def test_engine_option_names_are_the_engines() -> None:
    """The job accepts exactly the kernel backends, devices and dtypes the engine does."""
    import typing

    from forge_batch.engine.device import resolve_device, resolve_dtype
    from forge_batch.job import EngineSpec
    from forge_batch.kernels import dispatch

    literal = typing.get_args(EngineSpec.model_fields["kernel_backend"].annotation)[0]
    assert set(typing.get_args(literal)) == set(dispatch.BACKENDS)
    for bad in ("tpu", "cuda:x", "float8"):
        with pytest.raises(ValueError):
            resolve_device(bad) if bad != "float8" else resolve_dtype(bad, resolve_device("cpu"))
        field = "dtype" if bad == "float8" else "device"
        with pytest.raises(ValueError, match=field):
            EngineSpec.model_validate({field: bad})
    assert EngineSpec(device="cuda:1", dtype="bf16").device == "cuda:1"


def test_the_jobs_kernel_backends_are_the_engines() -> None:
    """job.py spells them again (the engine's module imports torch, which validate does not): the two agree."""
    from typing import get_args

    from forge_batch.job import KERNEL_BACKENDS, EngineSpec
    from forge_batch.kernels.dispatch import BACKENDS

    assert KERNEL_BACKENDS == BACKENDS
    assert set(get_args(get_args(EngineSpec.model_fields["kernel_backend"].annotation)[0])) == set(BACKENDS)
