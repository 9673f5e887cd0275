"""Shared helpers for the job-runner tests (in-process runs on FakeLLM, subprocess runs of the CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import yaml
from fakes import FakeLLM

from forge_batch.job import JobSpec, job_from_dict
from forge_batch.plugin_manager import get_plugin_manager
from forge_batch.runner import JobRunner, RunResult

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def write_jsonl(path: Path, rows: Iterable[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def prompts(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"r{i:04d}", "prompt": f"Tell me about item {i}", "topic": ["a", "b", "c"][i % 3]} for i in range(start, start + n)]


def make_job(tmp_path: Path, data: dict[str, Any], overrides: Iterable[str] = ()) -> JobSpec:
    data = {"model": "fake", **data}
    return job_from_dict(data, base_dir=tmp_path, overrides=overrides)


def fake_factory(holder: list[FakeLLM] | None = None, **kwargs: Any):
    max_model_len = kwargs.pop("max_model_len", None)

    def factory(job: JobSpec, *, samplers: dict, constraints: dict) -> FakeLLM:
        engine = FakeLLM(
            max_model_len=max_model_len or job.engine.max_model_len or 512,
            max_num_seqs=job.engine.max_num_seqs or 8,
            samplers=samplers,
            seed=job.sampling.seed,
            **kwargs,
        )
        if holder is not None:
            holder.append(engine)
        return engine

    return factory


def run(job: JobSpec, *, plugins: Iterable[tuple[str, Any]] = (), holder: list | None = None, overwrite: bool = False,
        **engine_kwargs: Any) -> RunResult:
    pm = get_plugin_manager(job.plugins, entry_points=False, extra_plugins=list(plugins))
    runner = JobRunner(
        job, engine_factory=fake_factory(holder, **engine_kwargs), plugin_manager=pm, progress="none",
        install_signal_handlers=False, overwrite=overwrite,
    )
    return runner.run()


def read_output(path: Path | str) -> list[dict[str, Any]]:
    """All rows of an output directory, sorted by (row_index, sample_index)."""
    table = ds.dataset(str(path), format="parquet").to_table()
    rows = table.to_pylist()
    return sorted(rows, key=lambda r: (r["row_index"], r["sample_index"]))


def write_job_file(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli_env(fake: bool = True, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "2")
    if fake:
        env["FORGE_BATCH_ENGINE_FACTORY"] = "fakes:make_fake_llm"
    else:
        env.pop("FORGE_BATCH_ENGINE_FACTORY", None)
    env.update(extra)
    return env


def cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "forge_batch.cli", *args], capture_output=True, text=True, env=env or cli_env(), timeout=timeout, **kw
    )


def popen(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "forge_batch.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
