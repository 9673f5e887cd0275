"""The Ray executor (``executor: {kind: ray}``) on a local Ray instance with 2 CPUs and the tiny random-weight
model: the same rows, texts and bad-row records as the local executor; every id exactly once when a replica
is killed mid-run or the whole job process is killed and rerun; the executor block checked by validate, and a
missing Ray named with its extra before any work.

Ray starts once for the module (it takes seconds); the tests that need no Ray run where it is not installed."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from runner_helpers import cli_env, popen, prompts, read_output, write_job_file, write_jsonl

from forge_batch.io.output_dir import state_dir_for
from forge_batch.job import JobError, job_from_dict
from forge_batch.runner import JobRunner, prepare_job, runner_for, validate_job_file
from forge_batch.runner.commit import Committer
from forge_batch.runner.inputs import InputPlan

COMPARED = ("id", "row_index", "sample_index", "text", "finish_reason", "completion_tokens", "prompt_tokens", "error",
            "error_kind")


@pytest.fixture(scope="module")
def ray_address() -> Any:
    """A local Ray instance for the module's jobs (the runner uses a connected process as it is); its GCS
    address lets a `forge-batch run` subprocess join it instead of starting a second one."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def run_job(job, **kw):
    return runner_for(job, progress="none", install_signal_handlers=False, **kw).run()


def rows_of(path: Path, compared: tuple[str, ...] = COMPARED) -> list[tuple]:
    return sorted((tuple(r[k] for k in compared) for r in read_output(path)), key=lambda t: (t[1], t[2]))


def mixed_input(path: Path, n: int) -> Path:
    """``n`` good rows, half of them greedy through a per-row override and half seeded, then bad rows of
    every kind the driver or a replica finds: malformed JSON, a missing id, a duplicate id, an empty prompt,
    a prompt longer than the context."""
    rows: list[Any] = []
    for i in range(n):
        row = {"id": f"r{i:04d}", "prompt": f"Tell me about item {i}"}
        if i % 2:
            row["opts"] = {"temperature": 0}
        rows.append(row)
    rows += ['{"id": "bad", "prompt": ', {"prompt": "no id here"}, {"id": "r0001", "prompt": "again"},
             {"id": "empty", "prompt": ""}, {"id": "long", "prompt": "word " * 200}]
    return write_jsonl(path, rows)


def job_data(model: Path, out: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": str(model), "input": {"path": "in.jsonl", "sampling_field": "opts"},
        "output": {"path": out, "rows_per_file": 4},
        "sampling": {"temperature": 0.9, "seed": 7, "n": 2, "max_tokens": 6},
        "engine": {"max_num_seqs": 4, "max_model_len": 128}, "max_error_rate": 0.5, **extra,
    }


RAY = {"kind": "ray", "replicas": 2, "batch_rows": 4}


def test_two_replicas_write_what_the_local_executor_writes(ray_address: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    mixed_input(tmp_path / "in.jsonl", 14)
    local = run_job(job_from_dict(job_data(tiny_model_dir, "local"), base_dir=tmp_path))
    assert local.status == "completed", local.message
    # 19 rows in shards of 5 fit in the window (two shards per replica): Ray Data gets them as items here;
    # the other tests stream theirs
    executor = {**RAY, "batch_rows": 5}
    prom = tmp_path / "ray.prom"
    result = run_job(job_from_dict(job_data(tiny_model_dir, "ray", executor=executor, metrics={"textfile": str(prom)}),
                                   base_dir=tmp_path))
    assert result.status == "completed", result.message
    # the figures the replicas' engines and rows give: as the local run's, the caches added up
    for key in ("ttft_s", "latency_s", "itl_s"):
        assert result.summary["latency"][key]["count"] == local.summary["latency"][key]["count"] > 0, key
    kv, local_kv = result.summary["kv_cache"], local.summary["kv_cache"]
    replicas_that_ran = len(result.summary["executor"]["per_replica"])  # Ray Data may give one replica every shard
    assert kv["blocks_total"] == replicas_that_ran * local_kv["blocks_total"] and kv["peak_blocks"] > 0
    assert result.summary["preemptions"] == 0 and result.summary["prefix_cache"]["queries"] > 0
    ttft_count = next(line for line in prom.read_text().splitlines() if line.startswith("forge_batch_ttft_seconds_count"))
    assert float(ttft_count.split()[-1]) == local.summary["latency"]["ttft_s"]["count"]
    ray_rows, local_rows = rows_of(tmp_path / "ray"), rows_of(tmp_path / "local")
    assert ray_rows == local_rows
    # greedy and seeded rows both ran; the bad rows carry the local executor's kinds
    by_id = {(r[0], r[1]): r for r in ray_rows}
    assert {r[8] for r in ray_rows if r[8]} == {"malformed_json", "missing_id", "duplicate_id", "empty_prompt", "prompt_too_long"}
    assert by_id[("r0001", 1)][3] is not None and by_id[("r0002", 2)][3] is not None
    for key in ("rows", "rows_ok", "rows_failed", "failed_by_kind", "samples", "completion_tokens"):
        assert result.summary[key] == local.summary[key], key
    ex = result.summary["executor"]
    assert ex["kind"] == "ray" and ex["replicas"] == 2 and local.summary["executor"] == {"kind": "local"}
    assert sum(r["rows"] for r in ex["per_replica"]) == result.summary["rows"] == 19
    assert sum(r["completion_tokens"] for r in ex["per_replica"]) == result.summary["completion_tokens"] > 0
    assert any(r["output_tokens_per_s"] > 0 for r in ex["per_replica"])
    # data files only: one part per shard of 5 rows, readable as a dataset
    names = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert names == [f"part-{i:05d}.parquet" for i in range(4)]
    summary = json.loads((state_dir_for(tmp_path / "ray") / "summary.json").read_text())
    assert summary["executor"]["per_replica"] == ex["per_replica"]
    # a rerun has nothing left to do
    again = run_job(job_from_dict(job_data(tiny_model_dir, "ray", executor=executor), base_dir=tmp_path))
    assert again.status == "completed" and again.summary["this_run"]["rows"] == 0
    assert rows_of(tmp_path / "ray") == local_rows


def test_the_driver_keeps_each_replicas_latest_figures_whatever_order_its_results_arrive_in() -> None:
    # a replica's figures count from its engine's start; two tasks in flight per replica may return out of order
    from forge_batch.engine.histogram import LogHistogram
    from forge_batch.runner.ray_executor import _Driver

    def figures(itls: int, queries: int) -> tuple[dict[str, Any], LogHistogram]:
        hist = LogHistogram()
        for _ in range(itls):
            hist.add(0.01)
        return {"prefix_cache_queries": queries, "prefix_cache_hits": 0}, hist

    driver = _Driver(part_base=0)
    driver.keep_figures("a", 2, figures(70, 8))
    driver.keep_figures("a", 1, figures(35, 4))  # the first batch's result, after the second's
    driver.keep_figures("b", 1, figures(14, 2))
    merged = driver.merged_figures()
    assert merged is not None
    assert merged["itl_s"]["count"] == 84 and merged["prefix_cache_queries"] == 10


def test_a_replica_no_node_can_hold_is_named_not_waited_for_in_silence(ray_address: str) -> None:
    from forge_batch.job import ExecutorSpec
    from forge_batch.runner.ray_session import placement_problem

    assert placement_problem(ExecutorSpec(kind="ray", replicas=2, num_cpus_per_replica=1)) is None
    problem = placement_problem(ExecutorSpec(kind="ray", replicas=1, num_cpus_per_replica=4))
    assert problem is not None and "asks for 4 CPU" in problem and "the largest: 2 CPU, 0 GPU" in problem


KILL_ONCE = """
import os
import ray
from forge_batch.hookspecs import hookimpl

@hookimpl
def prepare_request(request, row, context):
    # the first replica to reach this row kills its own actor, mid-shard (Ray restarts it, retries the shard)
    marker = {marker!r}
    if row.get("id") == "r0009" and not os.path.exists(marker):
        open(marker, "w").close()
        ray.kill(ray.get_runtime_context().current_actor, no_restart=False)
    return None
"""


def test_a_replica_killed_mid_run_loses_and_repeats_nothing(ray_address: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    mixed_input(tmp_path / "in.jsonl", 16)
    marker = tmp_path / "killed"
    (tmp_path / "kill_once.py").write_text(KILL_ONCE.format(marker=str(marker)))
    result = run_job(job_from_dict(job_data(tiny_model_dir, "ray", executor=RAY, plugins=["./kill_once.py"]),
                                   base_dir=tmp_path))
    assert marker.exists()  # the replica was killed
    assert result.status == "completed", result.message
    out = read_output(tmp_path / "ray")
    counts = Counter((r["row_index"], r["sample_index"]) for r in out)
    assert set(counts.values()) == {1} and len({r["row_index"] for r in out}) == 21
    run_job(job_from_dict(job_data(tiny_model_dir, "local"), base_dir=tmp_path))
    assert rows_of(tmp_path / "ray") == rows_of(tmp_path / "local")


def test_the_end_of_the_shards_is_sent_without_waiting_for_the_queue_that_the_relay_drops(ray_address: str) -> None:
    """On END the relay task ends and drops its queue, which Ray destroys, at times before the driver's put of
    END has its reply: waiting for it reported a dead queue in a run whose every shard was committed. Here a
    queue that dies the moment END reaches it: the shards' puts are waited for, END's is not, and nothing
    raises (a put that waited would raise ActorDiedError)."""
    import ray

    from forge_batch.runner.ray_source import ShardQueueClient
    from forge_batch.runner.shard_feed import END

    @ray.remote(num_cpus=0)
    class QueueGoneAtEnd:
        def __init__(self) -> None:
            self.items: list = []

        def put(self, item: Any) -> None:
            if item is END:
                ray.actor.exit_actor()
            self.items.append(item)

        def seen(self) -> list:
            return self.items

    name = f"test-shards-{time.monotonic_ns()}"
    queue = QueueGoneAtEnd.options(name=name).remote()
    client = ShardQueueClient(name)
    for key in range(3):
        client.put((key, b"rows"))
    assert ray.get(queue.seen.remote()) == [(0, b"rows"), (1, b"rows"), (2, b"rows")]
    client.put(END)
    with pytest.raises(ray.exceptions.RayActorError):  # the queue is gone, as a relay's queue goes at END
        ray.get(queue.seen.remote(), timeout=60)
    client.close()


def test_the_driver_packs_a_window_of_shards_ahead_of_its_commits(ray_address: str, tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver reads and packs shards while results come back, never more than ``shards_in_flight``
    (and one row) ahead of what it committed: it does not hold the whole input (the rows its reader has
    handed out are counted at each commit). (The rows that type the output, read first, are one here.)"""
    from forge_batch.runner import inputs

    monkeypatch.setattr(inputs, "TYPED_ROWS", 1)
    write_jsonl(tmp_path / "in.jsonl", prompts(24))
    data = job_data(tiny_model_dir, "ray", executor={"kind": "ray", "replicas": 1, "batch_rows": 2})
    data["input"] = {"path": "in.jsonl", "batch_size": 1}
    read = Counter()
    real_batches = InputPlan.batches

    def counted_batches(self: InputPlan) -> Any:
        for batch in real_batches(self):
            read["rows"] += len(batch)
            yield batch

    at_commit: list[tuple[int, int]] = []  # (rows read so far, rows committed before this part)
    real_commit = Committer.commit

    def counted_commit(self: Committer, part_index: int | None = None) -> None:
        at_commit.append((read["rows"], self.run_tally.rows))
        real_commit(self, part_index)

    monkeypatch.setattr(InputPlan, "batches", counted_batches)
    monkeypatch.setattr(Committer, "commit", counted_commit)
    runner = runner_for(job_from_dict(data, base_dir=tmp_path), progress="none", install_signal_handlers=False)
    runner.shards_in_flight = 2
    result = runner.run()
    assert result.status == "completed", result.message
    assert result.summary["rows"] == 24 and len(at_commit) == 12
    # two shards of two rows ahead of the commits at most, and the row that tells the input goes on;
    # packing everything first would have read all 24
    assert max(rows_read - committed for rows_read, committed in at_commit) <= 2 * 2 + 1
    assert at_commit[0][0] <= 5


SLOW = """
import os
import time
from forge_batch.hookspecs import hookimpl

@hookimpl
def prepare_request(request, row, context):
    if os.path.exists({flag!r}):
        time.sleep(0.25)
    return None
"""


def wait_for_parts(proc: subprocess.Popen, ledger: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.is_dir() and len(list(ledger.glob("part-*.parquet"))) >= n:
            return
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()


@pytest.mark.slow
def test_a_stopped_or_killed_job_process_resumes_exactly_once(ray_address: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    """`forge-batch run` starting its own Ray instance is stopped by SIGTERM after its first parts (it commits
    what came back, stops its Ray and exits 143 saying to rerun), a rerun joining the module's Ray instance is
    SIGKILLed after more parts, and the last rerun generates only the rest: the output is what the local
    executor writes."""
    mixed_input(tmp_path / "in.jsonl", 30)
    flag = tmp_path / "slow"
    flag.touch()
    (tmp_path / "slow_rows.py").write_text(SLOW.format(flag=str(flag)))
    executor = {"kind": "ray", "replicas": 1, "batch_rows": 2}
    data = job_data(tiny_model_dir, "ray", executor=executor, plugins=["./slow_rows.py"])
    job_file = write_job_file(tmp_path / "job.yaml", data)
    ledger = state_dir_for(tmp_path / "ray") / "ledger"
    own_ray = cli_env(fake=False)
    own_ray.pop("RAY_ADDRESS", None)
    stopped = popen(["run", str(job_file), "--progress", "none"], own_ray)
    wait_for_parts(stopped, ledger, 2)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 143, err
    assert "SIGTERM" in err and "rerun" in err, err
    # what the first signal does here (no grace period for rows on the replicas), and no Ray Data traceback
    assert "sending no new shards; stopping after the result at hand" in err and "Traceback" not in err, err
    after_stop = len(read_output(tmp_path / "ray"))
    assert 0 < after_stop < 35 * 2
    killed = popen(["run", str(job_file), "--progress", "none", "--set", f"executor.address={ray_address}"],
                   cli_env(fake=False))
    wait_for_parts(killed, ledger, len(list(ledger.glob("part-*.parquet"))) + 2)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    committed = len(read_output(tmp_path / "ray"))
    assert after_stop < committed < 35 * 2
    flag.unlink()
    result = run_job(prepare_job(job_file))
    assert result.status == "completed", result.message
    assert 0 < result.summary["resumed_rows"] < result.summary["rows"] == 35
    run_job(job_from_dict(job_data(tiny_model_dir, "local"), base_dir=tmp_path))
    # the error messages aside: a duplicate's first occurrence is "an earlier run" after a resume, locally too
    compared = tuple(k for k in COMPARED if k != "error")
    assert rows_of(tmp_path / "ray", compared) == rows_of(tmp_path / "local", compared)


# ---- the executor block, checked without Ray -------------------------------------------------------------
@pytest.mark.parametrize(
    ("executor", "where", "says"),
    [
        ({"kind": "dask"}, "executor.kind", "'local' or 'ray'"),
        ({"kind": "ray", "replicas": 0}, "executor.replicas", "greater than or equal to 1"),
        ({"kind": "ray", "batch_rows": 0}, "executor.batch_rows", "greater than or equal to 1"),
        ({"kind": "ray", "num_cpus_per_replica": 0}, "executor.num_cpus_per_replica", "greater than 0"),
        ({"kind": "ray", "address": "my cluster"}, "executor.address", "ray://host:port"),
        ({"kind": "ray", "replica": 2}, "executor.replica", "unknown key"),
        ({"replicas": 4}, "executor", "replicas only apply to kind: ray"),
    ],
)
def test_validate_refuses_a_bad_executor_block(tmp_path: Path, executor: dict, where: str, says: str) -> None:
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    job_file = write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": {"path": "in.jsonl"},
                                                      "output": {"path": "out"}, "executor": executor})
    _, problems = validate_job_file(job_file, env={})
    assert any(p.path == where and says in p.message for p in problems), problems


def test_a_ray_job_without_ray_fails_before_any_work_naming_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    job_file = write_job_file(tmp_path / "job.yaml", {"model": "fake", "input": {"path": "in.jsonl"},
                                                      "output": {"path": "out"}, "executor": {"kind": "ray"}})
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")
    _, problems = validate_job_file(job_file)
    assert [p.path for p in problems] == ["executor.kind"]
    assert 'pip install "forge-batch[ray]"' in problems[0].message
    with pytest.raises(JobError) as e:
        prepare_job(job_file)
    assert "forge-batch[ray]" in str(e.value)
    assert not (tmp_path / "out").exists()
    # the local executor needs no Ray
    local = job_from_dict({"model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": "out"}}, base_dir=tmp_path)
    assert type(runner_for(local)) is JobRunner


def test_replicas_load_the_engine_factory_by_name(tmp_path: Path) -> None:
    """A replica runs in another process: the run's engine factory goes to it as module:function, and one
    that cannot be imported by name is refused with what to do instead."""
    from fakes import make_fake_llm

    from forge_batch.runner import default_engine_factory
    from forge_batch.runner.ray_executor import RayJobRunner

    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    job = job_from_dict({"model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": "out"},
                         "executor": {"kind": "ray"}}, base_dir=tmp_path)
    assert RayJobRunner(job, engine_factory=default_engine_factory)._engine_factory_name() is None
    assert RayJobRunner(job, engine_factory=make_fake_llm)._engine_factory_name() == "fakes:make_fake_llm"
    with pytest.raises(ValueError, match="FORGE_BATCH_ENGINE_FACTORY"):
        RayJobRunner(job, engine_factory=lambda job, **kw: None)._engine_factory_name()


def test_engine_devices_are_the_replicas_not_the_drivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster's driver (the head node) may have no GPU: `engine.device: cuda` is checked where the engine
    runs, so under Ray validate does not refuse it for this machine."""
    import torch

    pytest.importorskip("ray.data")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: nothing to refuse locally")
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")
    write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    data = {"model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": "out"}, "engine": {"device": "cuda"}}
    _, local = validate_job_file(write_job_file(tmp_path / "local.yaml", data))
    assert [p.path for p in local] == ["engine.device"]
    _, on_ray = validate_job_file(write_job_file(tmp_path / "ray.yaml", {**data, "executor": {"kind": "ray", "num_gpus_per_replica": 1}}))
    assert on_ray == []
