"""`forge-batch run` as a real subprocess, killed with SIGKILL / SIGTERM / SIGINT mid-run, then rerun:
every id exactly once per sample and the same texts as an uninterrupted run. On FakeLLM (selected with
FORGE_BATCH_ENGINE_FACTORY) so the timing is controllable; the real-engine version is in
test_runner_engine.py."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
from runner_helpers import cli_env, make_job, popen, prompts, read_output, run, write_job_file, write_jsonl

from forge_batch.io.output_dir import state_dir_for
from forge_batch.job import load_job

N_ROWS = 240


def job_file(tmp_path: Path, out: str = "out") -> Path:
    write_jsonl(tmp_path / "in.jsonl", prompts(N_ROWS))
    return write_job_file(
        tmp_path / "job.yaml",
        {
            "model": "fake",
            "input": {"path": "in.jsonl"},
            "output": {"path": out, "rows_per_file": 8, "flush_seconds": 0.2, "keep_fields": ["topic"]},
            "sampling": {"n": 2, "temperature": 0.8, "seed": 5, "max_tokens": 6},
            "engine": {"max_num_seqs": 4},
        },
    )


def wait_for_parts(out: Path, n: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(out.glob("part-*.parquet"))) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {n} parts: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for parts")


def reference(tmp_path: Path) -> dict:
    job = make_job(tmp_path, {
        "input": {"path": "in.jsonl"}, "output": {"path": "ref"},
        "sampling": {"n": 2, "temperature": 0.8, "seed": 5, "max_tokens": 6},
    })
    run(job)
    return {(r["id"], r["sample_index"]): r["text"] for r in read_output(tmp_path / "ref")}


def assert_exactly_once_and_equal(tmp_path: Path, out: Path) -> None:
    rows = read_output(out)
    counts = Counter((r["id"], r["sample_index"]) for r in rows)
    assert len(counts) == 2 * N_ROWS and set(counts.values()) == {1}
    assert {(r["id"], r["sample_index"]): r["text"] for r in rows} == reference(tmp_path)


def test_kill_9_mid_run_then_resume_exactly_once(tmp_path: Path) -> None:
    path = job_file(tmp_path)
    out = tmp_path / "out"
    slow = cli_env(FAKE_STEP_DELAY="0.01")
    for parts in (3, 9):  # kill twice, at different points
        proc = popen(["run", str(path), "--quiet"], slow)
        wait_for_parts(out, parts, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        # readable right after the kill, committed rows only
        rows = read_output(out)
        assert rows and len({(r["id"], r["sample_index"]) for r in rows}) == len(rows)
    # the rerun resumes (in-process on the same fake engine: a third subprocess would only add import time)
    done = run(load_job(path))
    assert done.exit_code == 0 and done.summary["resumed_rows"] > 0
    assert_exactly_once_and_equal(tmp_path, out)
    assert not list(out.glob(".*"))  # no temp files left behind


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_commit_and_say_how_to_resume(tmp_path: Path, sig: int, code: int) -> None:
    path = job_file(tmp_path)
    out = tmp_path / "out"
    proc = popen(["run", str(path), "--progress", "log", "--grace", "0.5"], cli_env(FAKE_STEP_DELAY="0.02"))
    wait_for_parts(out, 2, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert "interrupted" in stderr and "resume" in stderr
    partial = read_output(out)
    assert 0 < len(partial) < 2 * N_ROWS
    summary = (state_dir_for(out) / "summary.json").read_text()
    assert '"status": "interrupted"' in summary
    done = run(load_job(path))
    assert done.exit_code == 0 and done.summary["resumed_rows"] == len({r["row_index"] for r in partial})
    assert_exactly_once_and_equal(tmp_path, out)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_while_loading_the_model_says_so_and_exits(tmp_path: Path, sig: int, code: int) -> None:
    path = job_file(tmp_path)
    out = tmp_path / "out"
    started = tmp_path / "loading"
    proc = popen(["run", str(path)], cli_env(FAKE_LOAD_DELAY="60", FAKE_LOAD_STARTED=str(started)))
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    assert f"interrupted by {signal.Signals(sig).name} while loading the model" in stderr
    assert "nothing was committed this run" in stderr and "rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert not list(out.glob("part-*")) and not list(out.glob(".*.tmp"))
    summary = json.loads((state_dir_for(out) / "summary.json").read_text())  # not an earlier run's, nor none
    assert summary["status"] == "interrupted" and "while loading the model" in summary["message"]
    done = run(load_job(path))
    assert done.exit_code == 0
    assert_exactly_once_and_equal(tmp_path, out)


SIGNAL_IN_JOB_END = """
import os
import signal
import time
from forge_batch.hookspecs import hookimpl

@hookimpl
def job_end(summary):
    for _ in range(int(os.environ["SIGNALS_IN_JOB_END"])):  # a scheduler stopping the job as it finishes
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
"""


@pytest.mark.parametrize("signals", [1, 2])
def test_a_signal_while_the_run_finishes_is_not_taken_for_one_before_it_started(tmp_path: Path, signals: int) -> None:
    """Every row committed, the job_end hooks running: a first SIGTERM is noted and the run finishes (summary
    and all); a second stops it, saying the rows are committed. Never "nothing was committed"."""
    path = job_file(tmp_path)
    (tmp_path / "sigplug.py").write_text(SIGNAL_IN_JOB_END)
    data = json.loads(json.dumps(load_job(path).model_dump(mode="json")))
    write_job_file(path, {**{k: data[k] for k in ("model", "input", "output", "sampling", "engine")},
                          "plugins": ["sigplug"]})
    proc = popen(["run", str(path), "--progress", "none"], cli_env(SIGNALS_IN_JOB_END=str(signals)))
    _, stderr = proc.communicate(timeout=120)
    assert "nothing was committed" not in stderr and "before the run started" not in stderr, stderr
    assert "every row is handled and committed; finishing" in stderr
    summary = json.loads((state_dir_for(tmp_path / "out") / "summary.json").read_text())
    if signals == 1:
        assert proc.returncode == 0, stderr
        assert summary["status"] == "completed" and "SIGTERM came after every row was committed" in summary["message"]
    else:
        assert proc.returncode == 143, stderr
        assert "interrupted by SIGTERM while finishing the run: every row it handled is committed" in stderr
        assert summary["status"] == "interrupted" and "job_end hooks were cut short" in summary["message"]
    assert_exactly_once_and_equal(tmp_path, tmp_path / "out")


def test_a_json_log_of_a_run_interrupted_while_loading_carries_its_summary(tmp_path: Path) -> None:
    path = job_file(tmp_path)
    started = tmp_path / "loading"
    proc = popen(["--log-format", "json", "run", str(path)], cli_env(FAKE_LOAD_DELAY="60", FAKE_LOAD_STARTED=str(started)))
    deadline = time.monotonic() + 60
    while not started.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    last = json.loads(stderr.strip().splitlines()[-1])
    assert last["event"].startswith("run interrupted: interrupted by SIGTERM while loading the model"), last
    assert last["fields"]["summary"]["status"] == "interrupted"


def test_sigterm_after_the_run_completed_exits_with_its_outcome(tmp_path: Path) -> None:
    """A scheduler stopping a job that already printed "completed" (while it winds down) must not read it as
    killed: the exit code stays the run's own."""
    path = job_file(tmp_path)
    proc = popen(["run", str(path), "--progress", "none"], cli_env(FAKE_EXIT_DELAY="3"))
    first = proc.stdout.readline()  # the summary's first line, printed once the outcome is final
    assert first.startswith("forge-batch: completed"), (first, proc.communicate())
    time.sleep(0.5)  # printing done: the process is in its (slow) exit
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
