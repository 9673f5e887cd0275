"""`forge-batch bench` end to end on a tiny model: every workload, the table's columns, the ratio line
against transformers, and the BENCHMARKS.md section it appends (the speed numbers themselves are only
printed, never asserted)."""

from __future__ import annotations

import json
import re

from forge_batch import bench

COLUMNS = ["output tok/s", "total tok/s", "TTFT p50 s", "TTFT p99 s", "ITL p50 ms", "wall s", "peak RSS MB"]


def test_bench_prints_every_workload_and_appends_a_history_section(tiny_model_dir, tmp_path, capsys):
    history = tmp_path / "BENCHMARKS.md"
    history.write_text("# Benchmarks\n")
    rc = bench.main([
        "--model", str(tiny_model_dir), "--workloads", "W0,W1,W3", "--num-prompts", "3", "--max-tokens", "4",
        "--against", "transformers", "--hf-batch-sizes", "2,3", "--append-to", str(history),
        "--json", str(tmp_path / "results.json"),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    assert all(c in printed for c in COLUMNS)
    rows = {(r["engine"], r["workload"]) for r in json.loads((tmp_path / "results.json").read_text())}
    # W2's ~420-word system prompt does not fit the tiny model's context; it runs in BENCHMARKS.md's runs
    assert {("forge-batch", w) for w in ("W0", "W1", "W3")} <= rows
    assert {("transformers", w) for w in ("W0", "W1")} <= rows  # W3: transformers has no JSON schema
    assert "W1: forge-batch / transformers = " in printed
    text = history.read_text()
    assert text.startswith("# Benchmarks\n") and "commit" in text and "| forge-batch | W1 |" in text


def test_bench_runs_transformers_in_another_dtype_when_asked(tiny_model_dir, tmp_path, capsys):
    rc = bench.main([
        "--model", str(tiny_model_dir), "--workloads", "W1", "--num-prompts", "2", "--max-tokens", "3",
        "--dtype", "float32", "--against", "transformers", "--hf-batch-sizes", "2", "--hf-dtype", "bfloat16",
        "--json", str(tmp_path / "results.json"),
    ])
    assert rc == 0
    results = json.loads((tmp_path / "results.json").read_text())
    hf = next(r for r in results if r["engine"] == "transformers")
    assert hf["extra"]["dtype"] == "bfloat16"
    assert re.search(r"W1: forge-batch / transformers = [0-9.]+x \(float32 vs bfloat16\)", capsys.readouterr().out)
