"""Resume refuses to mix outputs: a changed engine (model content, dtype, kernels, ...) or changed input
files since the committed rows stop the run with a clear message unless --force-resume; the output records
the engine as resolved (never "auto"). Through the CLI on a tiny real model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from runner_helpers import cli, cli_env, prompts, read_output, write_job_file, write_jsonl
from tiny_models import make_tiny_model

from forge_batch.io.output_dir import state_dir_for


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    make_tiny_model(tmp_path / "model")
    write_jsonl(tmp_path / "in.jsonl", prompts(6))
    write_job_file(
        tmp_path / "job.yaml",
        {"model": "model", "input": {"path": "in.jsonl"}, "output": {"path": "out", "rows_per_file": 2},
         "sampling": {"temperature": 0, "max_tokens": 4}, "engine": {"max_num_seqs": 2, "dtype": "float32"}},
    )
    return tmp_path


def run(job_dir: Path, *args: str):
    return cli(["run", str(job_dir / "job.yaml"), "--quiet", *args], env=cli_env(fake=False))


def test_output_records_the_resolved_engine(job_dir: Path) -> None:
    r = run(job_dir, "--set", "engine.dtype=auto")
    assert r.returncode == 0, r.stderr
    part = sorted((job_dir / "out").glob("part-*.parquet"))[0]
    engine = json.loads(pq.read_schema(part).metadata[b"forge_batch.engine"])
    assert engine["dtype"] in ("float32", "bfloat16")
    assert engine["device"] == "cpu"
    assert engine["kernel_path"] in ("cpu-c", "torch")
    assert engine["model_digest"].startswith("blake2b:")
    summary = json.loads((state_dir_for(job_dir / "out") / "summary.json").read_text())
    assert summary["engine"] == engine
    manifest = json.loads((state_dir_for(job_dir / "out") / "manifest.json").read_text())
    assert manifest["engine"] == engine and manifest["input"]["files"] == ["in.jsonl"]


def test_a_changed_dtype_is_refused_unless_forced(job_dir: Path) -> None:
    assert run(job_dir, "--limit", "2").returncode == 0
    r = run(job_dir, "--set", "engine.dtype=bfloat16")
    assert r.returncode == 2, r.stderr
    assert "different engine" in r.stderr and "dtype: 'float32' -> 'bfloat16'" in r.stderr and "--force-resume" in r.stderr
    assert len(read_output(job_dir / "out")) == 2  # nothing written by the refused run
    r = run(job_dir, "--set", "engine.dtype=bfloat16", "--force-resume")
    assert r.returncode == 0, r.stderr
    assert sorted(row["id"] for row in read_output(job_dir / "out")) == sorted(p["id"] for p in prompts(6))
    manifest = json.loads((state_dir_for(job_dir / "out") / "manifest.json").read_text())
    assert manifest["engine"]["dtype"] == "bfloat16"
    assert manifest["forced_resumes"][0]["kind"] == "engine"


def test_a_changed_block_size_is_refused(job_dir: Path) -> None:
    """Decode attention sums a row's keys block by block: in bfloat16 another block size rounds differently."""
    assert run(job_dir, "--limit", "2").returncode == 0
    r = cli(["run", str(job_dir / "job.yaml"), "--progress", "none", "--set", "engine.block_size=8"],
            env=cli_env(fake=False))
    assert r.returncode == 2 and "block_size: 16 -> 8" in r.stderr, r.stderr
    assert "already committed, skipping them" not in r.stdout + r.stderr  # refused, not resumed
    assert run(job_dir, "--set", "engine.max_num_seqs=3").returncode == 0  # what changes no token is not compared


def test_a_changed_model_file_under_the_same_path_is_refused(job_dir: Path) -> None:
    assert run(job_dir, "--limit", "2").returncode == 0
    shutil.rmtree(job_dir / "model")
    make_tiny_model(job_dir / "model", seed=1)
    r = run(job_dir)
    assert r.returncode == 2 and "model_digest" in r.stderr, r.stderr


def test_other_prompts_under_the_same_ids_are_refused(job_dir: Path) -> None:
    assert run(job_dir, "--limit", "2").returncode == 0
    other = [{**p, "prompt": p["prompt"] + " Answer in French."} for p in prompts(6)]
    write_jsonl(job_dir / "other.jsonl", other)
    r = run(job_dir, "--set", "input.path=other.jsonl")
    assert r.returncode == 2, r.stderr
    assert "different input" in r.stderr and "in.jsonl" in r.stderr and "other.jsonl" in r.stderr
    # The same rows moved to another file are the same input: they resume.
    shutil.copy(job_dir / "in.jsonl", job_dir / "moved.jsonl")
    r = run(job_dir, "--set", "input.path=moved.jsonl")
    assert r.returncode == 0, r.stderr
    assert len(read_output(job_dir / "out")) == 6


def test_an_engine_on_another_gemm_library_or_instruction_set_is_refused(job_dir: Path) -> None:
    """Two machines whose GEMM library or instruction set differ (oneDNN on AMX or on AVX512-BF16, MKL or
    oneDNN in float32) sum a product in different orders: resuming on one the rows of the other is refused.
    Rows committed before the engine recorded `matmul` resume without that check."""
    assert run(job_dir, "--limit", "2").returncode == 0
    manifest_path = state_dir_for(job_dir / "out") / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    here = manifest["engine"]["matmul"]
    library, _, isa = here.partition(" on ")
    assert library in ("onednn", "mkl", "torch") and isa, here
    manifest["engine"]["matmul"] = "onednn on amx" if isa != "amx" else "onednn on avx512_bf16"
    manifest_path.write_text(json.dumps(manifest))
    r = run(job_dir, "--limit", "4")
    assert r.returncode == 2 and f"matmul: '{manifest['engine']['matmul']}' -> '{here}'" in r.stderr, r.stderr
    del manifest["engine"]["matmul"]  # as an older version recorded it
    manifest_path.write_text(json.dumps(manifest))
    r = run(job_dir, "--limit", "4")
    assert r.returncode == 0, r.stderr
    assert len(read_output(job_dir / "out")) == 4
    assert json.loads(manifest_path.read_text())["engine"]["matmul"] == here
