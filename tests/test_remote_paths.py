"""URLs as paths: input read through fsspec (tested on memory:// and file://), a remote output refused before
any work, and never a local folder named after the scheme. On the fake engine."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runner_helpers import make_job, prompts, read_output, run, write_job_file, write_jsonl

from forge_batch.cli import main
from forge_batch.runner.checks import validate_job_file


@pytest.fixture
def memfs():
    fs = fsspec.filesystem("memory")  # one per process: start and leave it without /bucket
    if fs.exists("/bucket"):
        fs.rm("/bucket", recursive=True)
    yield fs
    if fs.exists("/bucket"):
        fs.rm("/bucket", recursive=True)


def put_jsonl(fs, path: str, rows: list[dict], gz: bool = False) -> None:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fs.pipe(path, gzip.compress(data) if gz else data)


def test_memory_url_inputs_file_folder_and_glob(tmp_path: Path, memfs) -> None:
    put_jsonl(memfs, "/bucket/a/part-1.jsonl", prompts(3))
    put_jsonl(memfs, "/bucket/a/part-2.jsonl.gz", prompts(2, start=3), gz=True)
    put_jsonl(memfs, "/bucket/a/_skipped/x.jsonl", prompts(1, start=50))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(prompts(4, start=10)), buf)
    memfs.pipe("/bucket/b/rows.parquet", buf.getvalue())

    for path, ids in [
        ("memory://bucket/a", [f"r{i:04d}" for i in range(5)]),
        ("memory://bucket/a/*.jsonl", [f"r{i:04d}" for i in range(3)]),
        ("memory://bucket/b/rows.parquet", [f"r{i:04d}" for i in range(10, 14)]),
    ]:
        out = tmp_path / path.replace("://", "_").replace("/", "_").replace("*", "x")
        job = make_job(tmp_path, {"input": {"path": path}, "output": {"path": str(out)}})
        assert job.input.path == path  # kept as written, not made a path next to the job
        result = run(job)
        assert result.status == "completed", result.message
        assert sorted(r["id"] for r in read_output(out)) == ids
    assert not (tmp_path / "memory:").exists()


def test_a_memory_url_input_resumes_and_notices_a_changed_file(tmp_path: Path, memfs) -> None:
    put_jsonl(memfs, "/bucket/in.jsonl", prompts(6))
    data = {"input": {"path": "memory://bucket/in.jsonl", "limit": 3}, "output": {"path": "out"}}
    assert run(make_job(tmp_path, data)).status == "completed"
    data["input"].pop("limit")
    result = run(make_job(tmp_path, data))
    assert result.summary["resumed_rows"] == 3 and len(read_output(tmp_path / "out")) == 6
    put_jsonl(memfs, "/bucket/in.jsonl", prompts(7))
    from forge_batch.io.output_dir import OutputDirError

    with pytest.raises(OutputDirError, match="different input"):
        run(make_job(tmp_path, data))


def test_file_urls_are_local_paths(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "in.jsonl", prompts(4))
    job = make_job(tmp_path, {"input": {"path": (tmp_path / "data" / "in.jsonl").as_uri()},
                              "output": {"path": (tmp_path / "results").as_uri()}})
    assert job.output.path == str(tmp_path / "results") and job.input.path == str(tmp_path / "data" / "in.jsonl")
    assert run(job).status == "completed"
    assert len(read_output(tmp_path / "results")) == 4


@pytest.mark.parametrize("url", ["s3://bucket/run1", "gs://bucket/run1", "hf://datasets/org/name/run1", "memory://bucket/run1"])
def test_remote_output_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, url: str) -> None:
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", prompts(2))
    job = write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": "out"}})
    assert main(["run", str(job), "--quiet", "--set", f"output.path={url}"]) == 2
    err = capsys.readouterr().err
    scheme = url.split(":")[0]
    assert f"output.path: Value error, {scheme}:// output is not supported" in err and "atomic rename" in err
    _, problems = validate_job_file(job, [f"output.path={url}"])
    assert [p.path for p in problems] == ["output.path"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "job.yaml"]  # no `s3:` folder, no state


def test_an_input_url_whose_filesystem_is_not_installed_says_what_to_install(tmp_path: Path) -> None:
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("s3fs is installed here")
    job = write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": {"path": "s3://bucket/in.jsonl"}, "output": {"path": "out"}})
    _, problems = validate_job_file(job)
    [problem] = [p for p in problems if p.path == "input.path"]
    assert "cannot read s3://bucket/in.jsonl" in problem.message and "s3fs" in problem.message
    assert not (tmp_path / "s3:").exists()


class _Unreachable(fsspec.AbstractFileSystem):
    """A file system whose server cannot be reached: its network library raises its own error, not an OSError
    (hf:// offline raises httpx's ConnectError)."""

    protocol = "unreachable"

    def _fail(self, *args, **kwargs):
        raise RuntimeError("ConnectError: Name or service not known")

    isdir = isfile = glob = find = info = _fail


def test_an_input_url_that_cannot_be_reached_is_a_problem_not_a_traceback(tmp_path: Path, capsys) -> None:
    fsspec.register_implementation("unreachable", _Unreachable, clobber=True)
    job = write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": {"path": "unreachable://host/x.jsonl"},
                                                 "output": {"path": "out"}})
    _, problems = validate_job_file(job)
    [problem] = [p for p in problems if p.path == "input.path"]
    assert "cannot list unreachable://host/x.jsonl" in problem.message and "Name or service not known" in problem.message
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr()
    assert "Traceback" not in err.out + err.err and "cannot list" in err.out + err.err
