"""`forge-batch bench` end to end on a tiny model: every workload, the table's columns, the ratio line
against transformers, and the BENCHMARKS.md section it appends (the speed numbers themselves are only
printed, never asserted)."""

from __future__ import annotations

import json
import re
import time

import pytest

from forge_batch import bench
from forge_batch.kernels.cpu import build

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


def test_bench_repeat_interleaves_rounds_and_reports_medians_and_our_own_ratios(tiny_model_dir, tmp_path, capsys):
    """--repeat N: every engine and workload once per round; the table keeps each one's median round and
    lists every round's figure, and each ratio (against transformers, and the issue's W3 / W1) is the
    median of the per-round ratios with their range."""
    rc = bench.main([
        "--model", str(tiny_model_dir), "--workloads", "W1,W3", "--num-prompts", "2", "--max-tokens", "3",
        "--dtype", "float32", "--against", "transformers", "--hf-batch-sizes", "2", "--repeat", "3",
        "--json", str(tmp_path / "results.json"),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["engine"], r["workload"]) for r in results) == [
        ("forge-batch", "W1"), ("forge-batch", "W3"), ("transformers", "W1")
    ]
    for r in results:  # the reported round is the median of the three listed
        rounds = [float(x) for x in r["extra"]["rounds_tok_s"].split("/")]
        assert len(rounds) == 3
        assert round(r["output_tok_s"]) == sorted(rounds)[1]
    range_ = r"[0-9.]+x \(median of 3 rounds, ([0-9.]+)-([0-9.]+)\)"
    assert re.search(r"W1: forge-batch / transformers = " + range_ + r" \(float32 vs float32\)", printed)
    m = re.search(r"forge-batch W3 / W1 = ([0-9.]+)x \(median of 3 rounds, ([0-9.]+)-([0-9.]+)\)", printed)
    assert m and float(m[2]) <= float(m[1]) <= float(m[3])


COMPILE_S = 3.0  # a stand-in compile: longer than the tiny model's load on a loaded machine


def test_bench_compiles_the_cpu_kernels_before_it_times_the_load(tiny_model_dir, monkeypatch, capsys):
    """A first run on a machine compiles the CPU kernels (seconds, once): the bench does it before its "load to
    first token" clock starts and reports it beside that figure, not inside it."""
    real, built = build.available, []

    def compile_slowly() -> bool:  # the first call compiles; every kernel dispatch asks again later
        if not built:
            time.sleep(COMPILE_S)
            built.append("compiled")
        return real()

    monkeypatch.setattr(build, "available", compile_slowly)
    rc = bench.main(["--model", str(tiny_model_dir), "--workloads", "W1", "--num-prompts", "2", "--max-tokens", "2",
                     "--device", "cpu"])
    assert rc == 0 and len(built) == 1
    m = re.search(r"load to first token ([0-9.]+) s; CPU kernels compiled first, in ([0-9.]+) s", capsys.readouterr().out)
    assert m and float(m[2]) >= COMPILE_S and float(m[1]) < COMPILE_S  # the tiny model loads in well under it
    asked = []
    monkeypatch.setattr(build, "available", lambda: asked.append("cpu kernels") or True)
    assert bench.prepare_cpu_kernels("cuda:0") == 0.0 and asked == []  # off the CPU: nothing to build


def test_bench_ratio_lines_take_each_ratio_within_a_round():
    def result(engine, workload, tok_s):
        return bench.Result(engine, workload, tok_s, tok_s, None, None, None, 1.0, 1.0, {"dtype": "float32"})

    rounds = [
        [result("forge-batch", "W1", 100), result("forge-batch", "W2", 90), result("forge-batch", "W2 (prefix caching off)", 40)],
        [result("forge-batch", "W1", 200), result("forge-batch", "W2", 190), result("forge-batch", "W2 (prefix caching off)", 100)],
    ]
    lines = bench.ratio_lines(rounds, ["W1", "W2"], "float32")
    # per round 0.90 and 0.95 (not 280 / 300 pooled); the lower middle of two is reported
    assert "forge-batch W2 / W1 = 0.90x (median of 2 rounds, 0.90-0.95)" in lines
    assert "forge-batch W2 / W2 (prefix caching off) = 1.90x (median of 2 rounds, 1.90-2.25)" in lines
    assert bench.ratio_lines(rounds[:1], ["W1", "W2"], "float32")[0] == "forge-batch W2 / W1 = 0.90x"


def test_prefix_cache_hit_rate_is_the_workloads_own():
    """The engine's hit counters run over its lifetime; a workload's note counts only its own lookups
    (W1's round 2 showed 0.87 after W2's hits, against W1's own 0.51)."""
    before = {"prefix_cache_hits": 90, "prefix_cache_queries": 100}
    assert bench._delta_rate(before, {"prefix_cache_hits": 90, "prefix_cache_queries": 150}) == 0.0
    assert bench._delta_rate(before, {"prefix_cache_hits": 100, "prefix_cache_queries": 120}) == 0.5
    assert bench._delta_rate(before, before) == 0.0


@pytest.mark.parametrize("args,says", [
    (["--workloads", "W9"], "--workloads takes a comma-separated subset of W0,W1,W2,W3"),
    (["--engine-arg", "max_num_seqs"], "--engine-arg takes KEY=VALUE"),
    (["--hf-batch-sizes", "x"], "--hf-batch-sizes takes"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--engine-arg", "bogus=1"], "the engine refused its options"),
    (["--engine-arg", "block_size=0"], "block_size must be an int >= 1"),
    (["--json", "/nonexistent-folder/b.json"], "--json: /nonexistent-folder is not a folder"),
])
def test_bench_arguments_it_cannot_use_are_a_usage_error(tiny_model_dir, capsys, args, says):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--model", str(tiny_model_dir), "--device", "cpu", *args])
    assert exc.value.code == 2 and says in capsys.readouterr().err



@pytest.mark.parametrize("argv", [
    ["--log-level", "warning", "bench", "--workloads", "W9"],
    ["bench", "--log-format", "json", "--workloads", "W9"],
    ["--log-format=json", "bench", "--log-level", "error", "--workloads", "W9"],
])
def test_the_log_options_go_before_or_after_bench_as_with_every_command(argv, capsys):
    from forge_batch.cli import main

    with pytest.raises(SystemExit) as exc:  # bench's own argument check is reached: the log options were taken
        main(argv)
    assert exc.value.code == 2 and "--workloads takes a comma-separated subset" in capsys.readouterr().err
