"""`model: org/name` resolves through the Hugging Face cache (a cache layout built here, no network):
the snapshot that refs/main names, a revision (`@rev` or `model_revision`), HF_HUB_OFFLINE, and errors that
say where they looked. A path that exists still wins over a repo id of the same spelling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runner_helpers import write_job_file, write_jsonl

from forge_batch.job import JobError, load_job
from forge_batch.models.registry import (
    ModelNotCachedError,
    check_model,
    model_digest,
    resolve_model_path,
    split_repo_id,
)
from forge_batch.runner.checks import validate_job_file

MAIN = "a" * 40
TAGGED = "b" * 40


@pytest.fixture
def hf_cache(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_CACHE with tiny-org/tiny-llama: main -> one snapshot, tag v1 -> another (a config that
    differs, so the two have other digests). Offline, so nothing can reach the network."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    for commit in (MAIN, TAGGED):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    config = json.loads((repo / "snapshots" / TAGGED / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (repo / "snapshots" / TAGGED / "config.json").write_text(json.dumps(config))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(TAGGED)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    return cache


def test_repo_ids_are_told_from_paths() -> None:
    assert split_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    assert split_repo_id("org/name@v1.0") == ("org/name", "v1.0")
    for not_a_repo in ("./org/name", "/abs/org/name", "~/models/x", "name", "a/b/c", "org/model.gguf", "org/"):
        assert split_repo_id(not_a_repo) is None, not_a_repo


def test_a_repo_id_resolves_to_its_cached_snapshot_and_revision(hf_cache: Path) -> None:
    snapshots = hf_cache / "models--tiny-org--tiny-llama" / "snapshots"
    assert resolve_model_path("tiny-org/tiny-llama") == snapshots / MAIN
    assert resolve_model_path("tiny-org/tiny-llama@v1") == snapshots / TAGGED
    assert resolve_model_path(f"tiny-org/tiny-llama@{TAGGED}") == snapshots / TAGGED
    assert model_digest("tiny-org/tiny-llama") != model_digest("tiny-org/tiny-llama@v1")


def test_a_missing_repo_says_where_it_looked(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelNotCachedError) as e:
        resolve_model_path("tiny-org/absent")
    message = str(e.value)
    assert str(hf_cache) in message and "models--tiny-org--absent" in message and "HF_HUB_OFFLINE" in message
    assert str(hf_cache.parent / "tiny-org" / "absent") in message  # and the path it would have been
    with pytest.raises(ModelNotCachedError, match="revision v9"):
        resolve_model_path("tiny-org/tiny-llama@v9")
    # validate offline: a problem at `model`; online it would download at run time, so validate lets it be
    with pytest.raises(ModelNotCachedError):
        check_model("tiny-org/absent")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert check_model("tiny-org/absent") is None  # no network touched: download=False


def test_a_path_that_exists_wins_over_the_repo_id(hf_cache: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "jobs" / "tiny-org" / "tiny-llama"
    shutil.copytree(tiny_model_dir, local)
    job = write_job_file(tmp_path / "jobs" / "job.yaml", {"model": "tiny-org/tiny-llama", "input": {"path": "in.jsonl"},
                                                          "output": {"path": "out"}})
    assert load_job(job).model == str(local)  # next to the job file: a path, as before
    shutil.rmtree(local)
    assert load_job(job).model == "tiny-org/tiny-llama"  # nothing there: the repo id, kept as written


def test_model_revision_key(hf_cache: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    base = {"model": "tiny-org/tiny-llama", "input": {"path": "in.jsonl"}, "output": {"path": "out"}}
    job = load_job(write_job_file(tmp_path / "a.yaml", {**base, "model_revision": "v1"}))
    assert job.model_ref() == "tiny-org/tiny-llama@v1"
    assert job.fingerprint() != load_job(write_job_file(tmp_path / "b.yaml", base)).fingerprint()
    with pytest.raises(JobError, match="revision given twice"):
        load_job(write_job_file(tmp_path / "c.yaml", {**base, "model": "tiny-org/tiny-llama@v1", "model_revision": "v1"}))
    with pytest.raises(JobError, match="model_revision is for a Hugging Face repo id"):
        load_job(write_job_file(tmp_path / "d.yaml", {**base, "model": "smollm2-135m-instruct", "model_revision": "v1"}))
    _, problems = validate_job_file(write_job_file(tmp_path / "e.yaml", {**base, "model_revision": "v7"}))
    assert [p.path for p in problems] == ["model"] and "revision v7" in problems[0].message


def test_a_job_runs_a_cached_repo_id_model(hf_cache: Path, tmp_path: Path) -> None:
    from runner_helpers import read_output

    from forge_batch.cli import main

    write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": f"Count to {i}"} for i in range(3)])
    job = write_job_file(tmp_path / "job.yaml", {
        "model": "tiny-org/tiny-llama", "model_revision": "v1", "input": {"path": "in.jsonl"},
        "output": {"path": "out"}, "sampling": {"max_tokens": 4, "temperature": 0},
    })
    assert main(["run", str(job), "--quiet"]) == 0
    rows = read_output(tmp_path / "out")
    assert len(rows) == 3 and all(r["error"] is None for r in rows)
    manifest = json.loads((tmp_path / ".out.forge_batch" / "manifest.json").read_text())
    assert manifest["engine"]["model_digest"] == model_digest("tiny-org/tiny-llama@v1")
