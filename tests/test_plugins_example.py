"""The worked example plugin (examples/forge-batch-example-plugin): installed with pip (offline, into a
temporary target), found through its `forge_batch` entry point, and used by a job (its `csv` writer and its
`top2` sampler) on the tiny real model."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from runner_helpers import REPO, cli, cli_env, prompts, write_job_file, write_jsonl

from forge_batch.cli import main

EXAMPLE = REPO / "examples" / "forge-batch-example-plugin"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src") / "example"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "out"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(src)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    assert (target / "forge_batch_example").is_dir()
    return target


def env_with(site: Path, **extra: str) -> dict[str, str]:
    env = cli_env(fake=False, **extra)
    env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    return env


@pytest.fixture
def on_path(installed_example: Path, monkeypatch: pytest.MonkeyPatch):
    """The installed example importable (and its entry point visible) in this process."""
    monkeypatch.syspath_prepend(str(installed_example))
    monkeypatch.delenv("FORGE_BATCH_LOAD_PLUGINS", raising=False)
    yield installed_example
    sys.modules.pop("forge_batch_example", None)


def test_example_plugin_is_listed_from_its_entry_point(on_path: Path, capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["plugins", "--json"]) == 0
    infos = {i["name"]: i for i in json.loads(capsys.readouterr().out)}
    ex = infos["example"]
    assert ex["source"].startswith("entry point (forge-batch-example-plugin")
    assert ex["hooks"] == ["register_samplers", "register_writers"]
    assert ex["provides"] == {"samplers": ["top2"], "writers": ["csv"]}
    monkeypatch.setenv("FORGE_BATCH_LOAD_PLUGINS", "")
    assert main(["plugins", "--json"]) == 0
    assert "example" not in {i["name"] for i in json.loads(capsys.readouterr().out)}


def test_job_runs_with_the_example_writer_and_sampler(
    on_path: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_jsonl(tmp_path / "in.jsonl", prompts(6))
    spec = {
        "model": str(tiny_model_dir),
        "input": {"path": "in.jsonl"},
        "output": {"path": "out", "format": "csv"},
        "sampling": {"sampler": "top2", "temperature": 1.0, "max_tokens": 6, "seed": 3},
    }
    job = write_job_file(tmp_path / "job.yaml", spec)
    # without the plugin the job is invalid, and validate says so
    monkeypatch.setenv("FORGE_BATCH_LOAD_PLUGINS", "")
    assert main(["validate", str(job)]) == 2
    err = capsys.readouterr().err
    assert "output.format" in err and "sampling.sampler" in err
    monkeypatch.delenv("FORGE_BATCH_LOAD_PLUGINS")
    # the real thing: a `forge-batch run` process that finds the plugin through its entry point
    result = cli(["run", str(job), "--quiet"], env=env_with(on_path))
    assert result.returncode == 0, result.stderr
    parts = sorted((tmp_path / "out").glob("part-*.csv"))
    rows = [r for p in parts for r in csv.DictReader(p.open())]
    assert sorted(r["id"] for r in rows) == [f"r{i:04d}" for i in range(6)]
    assert all(r["error"] == "" and r["finish_reason"] in ("stop", "length") for r in rows)
    # a plugin's format defines its folder: a file of its own beside the parts does not stop a rerun
    (tmp_path / "out" / "index.txt").write_text("kept by the writer")
    again = cli(["run", str(job), "--quiet"], env=env_with(on_path))
    assert again.returncode == 0, again.stderr


def test_top2_sampler_picks_one_of_the_two_best(on_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from forge_batch_example import top2_sampler

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    batch = type("B", (), {"uniforms": torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))})()
    picks = top2_sampler(logits, batch)
    top2 = torch.topk(logits, 2, dim=-1).indices
    assert bool(((picks == top2[:, 0]) | (picks == top2[:, 1])).all())
    assert bool((picks == top2[:, 1]).any()) and bool((picks == top2[:, 0]).any())
