"""`forge-batch validate` catches, before any model load, everything `run` refuses; `run` refuses the same
jobs with the same message before loading the model or creating the output directory.

Through the command line in-process (cli.main). A job that got past the checks would load the tiny model,
so `load_model_files` is replaced by one that fails the test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
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


def job_file(tmp_path: Path, model: str | Path, name: str = "job.yaml", **extra: object) -> Path:
    write_jsonl(tmp_path / "in.jsonl", prompts(3))
    spec = {"model": str(model), "input": {"path": "in.jsonl"}, "output": {"path": "out"},
            "sampling": {"max_tokens": 4}, **extra}
    return write_job_file(tmp_path / name, spec)


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


@pytest.mark.parametrize(
    ("key", "extra", "fragments"),
    [
        ("sampling.json_schema", {"sampling": {"max_tokens": 4, "json_schema": {"type": "nope"}}},
         ["not a valid JSON Schema"]),
        ("sampling.json_schema", {"sampling": {"max_tokens": 4, "json_schema": "{not json"}}, ["not JSON"]),
        ("sampling.regex", {"sampling": {"max_tokens": 4, "regex": "(unclosed"}}, ["unclosed group"]),
        # Python's re accepts a look-behind; the grammar engine's regex dialect does not
        ("constraint.regex", {"constraint": {"regex": "(?<=a)b"}}, ["look-around"]),
        ("constraint.json_schema", {"constraint": {"json_schema": {"type": "object", "required": "n"}}},
         ["not a valid JSON Schema"]),
    ],
    ids=["json_schema", "json_schema_string", "regex", "constraint_regex", "constraint_json_schema"],
)
def test_constraint_refused_before_the_model_loads(
    tmp_path: Path, tiny_model_dir: Path, no_model_load: None, capsys: pytest.CaptureFixture,
    key: str, extra: dict, fragments: list[str],
) -> None:
    assert_refused(job_file(tmp_path, tiny_model_dir, **extra), capsys, key, *fragments)


@pytest.mark.parametrize(
    ("key", "extra", "fragments"),
    [
        ("engine.device", {"engine": {"device": "tpu"}}, ["'tpu'", "auto", "cpu", "cuda"]),
        ("engine.dtype", {"engine": {"dtype": "float8"}}, ["'float8'", "auto", "float32", "bfloat16"]),
        ("engine.kernel_backend", {"engine": {"kernel_backend": "cuda"}}, ["'cuda'", "auto", "reference", "triton"]),
        ("engine.gpu_memory_utilization", {"engine": {"device": "cpu", "gpu_memory_utilization": 0.5}},
         ["a GPU's memory share"]),
        ("output.keep_fields", {"output": {"path": "out", "keep_fields": ["cumulative_logprob"]},
                                "sampling": {"max_tokens": 4, "logprobs": 2}}, ["clash with output columns"]),
        ("output.keep_fields", {"input": {"path": "in.jsonl", "id_field": None},
                                "output": {"path": "out", "keep_fields": ["id"]}}, ["the output's id column"]),
        ("output.compression", {"output": {"path": "out", "compression": "foo"}}, ["not a Parquet compression"]),
        ("output", {"output": {"path": "out", "format": "jsonl", "compression": "gzip"}}, ["Parquet output only"]),
    ],
    ids=["device", "dtype", "kernel_backend", "gpu_memory_on_cpu", "keep_a_logprobs_column", "keep_id_without_id_field",
         "compression", "jsonl_compression"],
)
def test_engine_and_output_options_run_would_refuse_are_refused_before_the_model_loads(
    tmp_path: Path, tiny_model_dir: Path, no_model_load: None, capsys: pytest.CaptureFixture,
    key: str, extra: dict, fragments: list[str],
) -> None:
    assert_refused(job_file(tmp_path, tiny_model_dir, **extra), capsys, key, *fragments)


def test_a_symlinked_state_folder_is_refused_by_validate_as_by_run(
    tmp_path: Path, tiny_model_dir: Path, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".out.forge_batch").symlink_to(tmp_path / "elsewhere")
    assert_refused(job_file(tmp_path, tiny_model_dir), capsys, "output.path", ".out.forge_batch is a symlink")


def test_an_output_folder_holding_other_files_is_refused_by_validate_as_by_run(
    tmp_path: Path, tiny_model_dir: Path, no_model_load: None, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for name in ("notes.txt", ".hidden", "_SUCCESS"):  # readers skip names starting with . or _
        (out / name).write_text("x")
    job = job_file(tmp_path, tiny_model_dir)
    for command in (["validate", str(job)], ["run", str(job), "--progress", "none"]):
        assert main(command) == 2
        assert "- output.path:" in (err := capsys.readouterr().err) and "holds files that are not its parts (notes.txt)" in err
    assert sorted(p.name for p in out.iterdir()) == [".hidden", "_SUCCESS", "notes.txt"]
    (out / "notes.txt").unlink()
    assert validate(job, capsys)[0] == 0


def test_a_kernel_backend_from_the_environment_is_checked_like_the_jobs(
    tmp_path: Path, tiny_model_dir: Path, no_model_load: None, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FORGE_BATCH_KERNELS", "bogus")
    assert_refused(job_file(tmp_path, tiny_model_dir), capsys, "engine.kernel_backend", "FORGE_BATCH_KERNELS='bogus'")


def test_an_engine_factory_naming_nothing_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    job = job_file(tmp_path, "fake")
    for spec, says in (("os:nope", "names no function"), ("nomodule", "must look like package.module:function")):
        monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", spec)
        assert main(["run", str(job), "--progress", "none"]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err


def test_an_empty_choice_is_one_problem(tmp_path: Path, tiny_model_dir: Path, no_model_load: None,
                                        capsys: pytest.CaptureFixture) -> None:
    job = job_file(tmp_path, tiny_model_dir, sampling={"max_tokens": 4, "choice": []})
    assert_refused(job, capsys, "sampling.choice", "non-empty list")
    code, out = validate(job, capsys)
    assert code == 2 and "1 problem(s)" in out and "- sampling:" not in out, out
    # a sampling problem SamplingParams finds after the empty choice is still said
    job = job_file(tmp_path, tiny_model_dir, sampling={"max_tokens": 4, "choice": [], "logit_bias": {-1: 1.0}})
    code, out = validate(job, capsys)
    assert code == 2 and "2 problem(s)" in out and "- sampling.choice:" in out and "logit_bias keys" in out, out


def test_run_reports_every_problem_validate_does(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    job = job_file(tmp_path, tiny_model_dir, sampling={"max_tokens": 0}, input={"path": "nope.jsonl"})
    for command in (["validate", str(job)], ["run", str(job), "--progress", "none"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "2 problem(s)" in err and "- sampling.max_tokens:" in err and "- input.path:" in err, (command, err)


def test_the_triton_backend_without_a_gpu_is_refused_before_the_model_loads(
    tmp_path: Path, tiny_model_dir: Path, no_model_load: None, capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert_refused(job_file(tmp_path, tiny_model_dir, engine={"kernel_backend": "triton", "device": "cpu"}), capsys,
                   "engine.kernel_backend", "needs a CUDA device", "'auto'")


def test_a_valid_constraint_passes(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    job = job_file(tmp_path, tiny_model_dir, constraint={"regex": r"[0-9]{3}"})
    assert validate(job, capsys)[0] == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_cuda_device(tmp_path: Path, tiny_model_dir: Path, no_model_load: None,
                                    capsys: pytest.CaptureFixture) -> None:
    assert_refused(job_file(tmp_path, tiny_model_dir, engine={"device": "cuda"}), capsys, "engine.device", "no CUDA device")


def test_int8_with_a_dtype_that_resolves_to_bfloat16(
    tmp_path: Path, tiny_model_dir: Path, no_model_load: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """The hint says what `auto` chose on this CPU, and the same job validates where auto picks float32."""
    from forge_batch.engine import device

    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: True)
    job = job_file(tmp_path, tiny_model_dir, engine={"device": "cpu", "quantization": "int8"})
    assert_refused(job, capsys, "engine.quantization",
                   "dtype auto resolves to bfloat16 on this CPU; set engine.dtype: float32 to use int8")
    explicit = job_file(tmp_path, tiny_model_dir, "explicit.yaml", engine={"dtype": "bf16", "quantization": "int8"})
    assert_refused(explicit, capsys, "engine.quantization", "engine.dtype is bf16", "set engine.dtype: float32")

    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: False)
    assert validate(job, capsys)[0] == 0


def test_the_engine_gives_the_same_int8_hint(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    from forge_batch import LLM
    from forge_batch.engine import device

    monkeypatch.setattr(device, "cpu_supports_bf16", lambda: True)
    with pytest.raises(ValueError, match="dtype auto resolves to bfloat16 on this CPU; set dtype='float32'"):
        LLM(str(tiny_model_dir), device="cpu", quantization="int8")


def test_empty_model_is_an_error(tmp_path: Path, no_model_load: None, capsys: pytest.CaptureFixture) -> None:
    from test_gguf_loader import write_tiny_gguf

    write_tiny_gguf(tmp_path / "stray.gguf")  # the empty name used to resolve to the job's folder, and this
    assert_refused(job_file(tmp_path, ""), capsys, "model", "empty")


def test_a_model_folder_the_loader_would_refuse_is_refused_before_any_work(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    import json
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "config.json")  # no weights
    assert_refused(job_file(tmp_path, folder), capsys, "model", "no *.safetensors (or pytorch_model*.bin) weight files")
    (folder / "model.safetensors").write_bytes(b"")
    (folder / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    assert_refused(job_file(tmp_path, folder), capsys, "model", "unsupported model architecture (GPT2LMHeadModel)")


# -- broken GGUF files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from test_gguf_loader import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "good.gguf"
    write_tiny_gguf(path)
    return path.read_bytes()


def _corrupt_metadata(data: bytes) -> bytes:
    # the first metadata key's length (right after the 24-byte header) becomes 2**64 - 1
    return data[:24] + b"\xff" * 8 + data[32:]


BROKEN_GGUFS = {
    "random": (lambda data: os.urandom(4096), "not a GGUF file"),
    "corrupt_metadata": (_corrupt_metadata, "corrupt"),
    "half": (lambda data: data[: len(data) // 2], "truncated"),
    "tail_cut": (lambda data: data[:-100], "truncated"),
}


@pytest.mark.parametrize("kind", sorted(BROKEN_GGUFS))
def test_broken_gguf_is_refused_naming_the_file(
    tmp_path: Path, good_gguf: bytes, no_model_load: None, capsys: pytest.CaptureFixture, kind: str
) -> None:
    make, says = BROKEN_GGUFS[kind]
    model = tmp_path / f"{kind}.gguf"
    model.write_bytes(make(good_gguf))
    assert_refused(job_file(tmp_path, model), capsys, "model", str(model), says)


@pytest.mark.parametrize("kind", sorted(BROKEN_GGUFS))
def test_loading_a_broken_gguf_says_what_is_wrong(tmp_path: Path, good_gguf: bytes, kind: str) -> None:
    from forge_batch.models.gguf_loader import load_gguf

    make, says = BROKEN_GGUFS[kind]
    model = tmp_path / f"{kind}.gguf"
    model.write_bytes(make(good_gguf))
    with pytest.raises(ValueError) as exc:
        load_gguf(model)
    assert str(model) in str(exc.value) and says in str(exc.value)


def test_a_good_gguf_validates(tmp_path: Path, good_gguf: bytes, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "good.gguf").write_bytes(good_gguf)
    assert validate(job_file(tmp_path, tmp_path / "good.gguf"), capsys)[0] == 0


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
    # the rest of the file is still checked, as YAML reads it
    job.write_text(job.read_text().replace("input: {path: in.jsonl}", "input: {path: nope.jsonl, prompt_feild: x}"))
    for command in (["validate", str(job)], ["run", str(job), "--progress", "none"]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert all(f"- {key}:" in err for key in ("sampling", "engine.dtype", "input.prompt_feild", "input.path")), err


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


# -- plugins --------------------------------------------------------------------------------------------


def test_validate_does_not_import_job_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    marker = tmp_path / "imported"
    side_effect = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (tmp_path / "fb_side_file.py").write_text(side_effect)
    (tmp_path / "fb_side_pkg").mkdir()
    (tmp_path / "fb_side_pkg" / "__init__.py").write_text(side_effect)
    (tmp_path / "fb_side_pkg" / "hooks.py").write_text(side_effect)
    (tmp_path / "fb_side_module.py").write_text(side_effect)
    plugins = ["./fb_side_file.py", "fb_side_pkg.hooks", "fb_side_module"]
    job = job_file(tmp_path, "fake", plugins=plugins)
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")
    code, out = validate(job, capsys)
    assert code == 0, out
    assert not marker.exists()

    missing = job_file(tmp_path, "fake", "missing.yaml",
                       plugins=[*plugins, "./gone.py", "fb_no_such_module", "fb_side_pkg.nope"])
    code, out = validate(missing, capsys)
    assert code == 2
    assert "- plugins[3]:" in out and "gone.py" in out
    assert "- plugins[4]:" in out and "fb_no_such_module" in out
    assert "- plugins[5]:" in out and "fb_side_pkg.nope" in out
    assert not marker.exists()
    # run imports the plugins, so it reports the same three at the same key paths
    assert main(["run", str(missing), "--quiet"]) == 2
    out = capsys.readouterr().err
    assert all(f"- plugins[{i}]:" in out for i in (3, 4, 5))
    assert not (tmp_path / "out").exists()

    assert main(["run", str(job), "--quiet"]) == 0
    assert set(marker.read_text().split()) == {"fb_side_module", "fb_side_pkg", "fb_side_pkg.hooks",
                                               "forge_batch_job_plugin_fb_side_file"}
    for name in ("fb_side_module", "fb_side_pkg", "fb_side_pkg.hooks", "forge_batch_job_plugin_fb_side_file"):
        sys.modules.pop(name, None)


def test_names_a_job_plugin_may_register_are_not_errors_for_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """validate cannot know what an unimported job plugin registers: it says so instead of failing."""
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")
    (tmp_path / "tsv_plugin.py").write_text(
        "from forge_batch.hookspecs import hookimpl\n"
        "from forge_batch.plugins.writers import JsonlWriter\n\n"
        "class TsvWriter(JsonlWriter):\n    extension = '.tsv'\n\n"
        "@hookimpl\ndef register_writers():\n    return {'tsv': TsvWriter()}\n"
    )
    job = job_file(tmp_path, "fake", plugins=["./tsv_plugin.py"])
    text = job.read_text().replace("path: out", "path: out\n  format: tsv")
    job.write_text(text)
    code, out = validate(job, capsys)
    assert code == 0, out
    assert "warning" in out and "output.format" in out and "'tsv'" in out and "tsv_plugin.py" in out
    assert main(["run", str(job), "--quiet"]) == 0
    assert list((tmp_path / "out").glob("part-*.tsv"))


def test_an_input_only_a_job_plugins_reader_knows_is_a_warning_for_validate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")
    (tmp_path / "tsv_plugin.py").write_text(
        "from forge_batch.contract import RawRow\n"
        "from forge_batch.hookspecs import hookimpl\n\n"
        "class TsvReader:\n    name = 'tsv'\n    extensions = ('.tsv',)\n"
        "    def schema(self, path):\n        return None\n"
        "    def count(self, path, spec):\n        return None\n"
        "    def read(self, path, spec):\n"
        "        rows = [dict(zip(('id', 'prompt'), line.rstrip('\\n').split('\\t'))) for line in open(path)]\n"
        "        yield [RawRow(r) for r in rows]\n\n"
        "@hookimpl\ndef register_readers():\n    return {'tsv': TsvReader()}\n"
    )
    (tmp_path / "in.tsv").write_text("a\thello\nb\tworld\n")
    job = write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": {"path": "in.tsv"}, "output": {"path": "out"},
                                                  "plugins": ["./tsv_plugin.py"]})
    code, out = validate(job, capsys)
    assert code == 0 and "warning" in out and "in.tsv" in out and "tsv_plugin.py" in out, out
    assert main(["run", str(job), "--quiet"]) == 0


def test_load_plugins_naming_no_installed_plugin_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("FORGE_BATCH_LOAD_PLUGINS", "nosuch")
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")
    job = job_file(tmp_path, "fake")
    for command in (["validate", str(job)], ["plugins"], ["run", str(job), "--quiet"]):
        assert main(command) == 0
        err = capsys.readouterr().err
        assert "warning" in err and "FORGE_BATCH_LOAD_PLUGINS" in err and "'nosuch'" in err, (command, err)
