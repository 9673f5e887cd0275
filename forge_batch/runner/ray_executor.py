"""The Ray executor: the same job on ``executor.replicas`` engines, through Ray Data (docs/scale-out.md).

The driver (this process) does what needs the whole job in one place, with the local executor's parts:

* starts (or joins) Ray on a thread (:class:`RayStart`) while it opens the output directory and reads;
* reads the input with the job's readers (:class:`InputPlan`), so ids, row positions and unreadable rows are
  exactly the local executor's (Ray Data's own JSON reader would fail a whole block on one malformed line);
* admits rows (:meth:`RequestBuilder.admitted`): committed ids are left out first (resume), duplicates and bad
  ids fail on their row, as locally;
* packs the admitted rows into shards of ``executor.batch_rows`` rows, numbered in input order, on a thread
  (:class:`ShardFeed`), a window of shards ahead of the commits: the driver never holds the whole input;
* streams them to Ray Data (:class:`~forge_batch.runner.ray_source.ShardSource`) and runs ``map_batches``
  over an actor pool of :class:`EngineReplica` (one shard per call), each replica one engine with the job's
  engine options, plugins, samplers and constraints, building requests (seeds from the job seed and the row
  id, never from where a row runs) and records with the same parts as the local runner;
* commits what comes back through the same :class:`Committer` and :class:`OutputDir`: one part per shard,
  named after the shard, with its ledger, by rename. Only the driver writes, so a task Ray retries (a replica
  killed mid-shard, restarted) cannot write a row twice: a shard is committed once, when its result reaches
  the driver, and the ledger stays the single truth of what is done.
"""

from __future__ import annotations

import inspect
import itertools
import os
import pickle
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from forge_batch.io.meta import file_metadata
from forge_batch.io.output_dir import CommitError, OutputDirError, ResumeState
from forge_batch.io.progress import Progress
from forge_batch.io.schema import id_column_name, schema_from_str, schema_to_str
from forge_batch.job import RAY_EXTRA, InputSpec, JobError, JobSpec, Problem, ray_missing_problem
from forge_batch.plugin_manager import collect_registry, get_plugin_manager
from forge_batch.runner.commit import Committer
from forge_batch.runner.engine_factory import (
    ENGINE_FACTORY_ENV,
    ENGINE_IDENTITY,
    default_engine_factory,
    load_engine_factory,
)
from forge_batch.runner.job_runner import (
    JobRunner,
    RunResult,
    _chain,
    _close_quietly,
    _rows,
    _Run,
    run_context,
)
from forge_batch.runner.ray_session import (
    RayStart,
    connect_ray,
    mute_ray_data_errors,
    placement_problem,
    quiet_ray_data,
)
from forge_batch.runner.records import Group, RecordBuilder, ResultObservers
from forge_batch.runner.requests import AdmittedRow, RequestBuilder
from forge_batch.runner.run_figures import RunFigures, merged_engine_metrics, replica_engine_figures
from forge_batch.runner.shard_feed import Shard, ShardFeed, shards
from forge_batch.runner.signals import Abort, RunFlags
from forge_batch.runner.summary import RunEnd


class EngineReplica:
    """One engine in a Ray actor: builds the job's engine (its plugins, samplers and constraints loaded here)
    once, then turns each shard into the records of its rows. Ray Data calls it with a batch of shards."""

    def __init__(self, job: JobSpec, spec: InputSpec, schema: str, engine_factory: str | None = None) -> None:
        # Everything the engine does runs on one thread of its own. OpenMP gives each thread that starts a
        # parallel region its own team, and libgomp throttles every team's spin-wait to almost nothing once
        # its threads outnumber the cores: with the engine loaded on Ray's creation thread and called on
        # its task thread, the two teams made every kernel's workers sleep and wake: W1's replica used ~170% of
        # 2 cores and generated in 20.2-21.1 s; on one thread, 200% and 19.0-19.3 s (local: ~18.2 s).
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-batch-engine")
        self._engine_thread.submit(self._load, job, spec, schema, engine_factory).result()

    def _load(self, job: JobSpec, spec: InputSpec, schema: str, engine_factory: str | None) -> None:
        t_load = time.monotonic()
        self.job = job
        pm = get_plugin_manager(job.plugins, search_paths=job.plugin_search_paths())
        factory = load_engine_factory(engine_factory) if engine_factory else default_engine_factory
        self.engine = factory(job, samplers=collect_registry(pm, "register_samplers"),
                              constraints=collect_registry(pm, "register_constraints"))
        self.engine_info = getattr(self.engine, "engine_info", None)
        out_schema = schema_from_str(schema)
        id_column = id_column_name(spec.id_field)
        context = run_context(job, pm, spec, self.engine, 0)
        # The replica only builds requests of rows the driver admitted: no resume state, no signals here.
        self.requests = RequestBuilder(job, spec, out_schema.field(id_column).type, ResumeState(), context, RunFlags())
        self.records = RecordBuilder(job, id_column, set(out_schema.names), context)
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.batches_done = 0  # orders this replica's figures: Ray Data may hand its results back out of order
        self.load_s = time.monotonic() - t_load
        e = job.engine
        self.max_in_flight = e.max_in_flight or (2 * e.max_num_seqs if e.max_num_seqs else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._engine_thread.submit(self._generate, batch).result()

    def _generate(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batches_done += 1
        keys, results, busy = [], [], []
        for key, payload in zip(batch["shard"], batch["rows"]):
            t0 = time.monotonic()
            rows: list[AdmittedRow] = pickle.loads(payload)
            stream = self.engine.generate_stream((self.requests.build(r) for r in rows), max_in_flight=self.max_in_flight)
            groups = [self.records.group_for(out) for out in stream]
            keys.append(int(key))
            results.append(pickle.dumps(groups, protocol=pickle.HIGHEST_PROTOCOL))
            busy.append(time.monotonic() - t0)
        n = len(keys)
        return {
            "shard": np.array(keys, dtype=np.int64),
            "groups": np.array(results, dtype=object),
            "busy_s": np.array(busy, dtype=np.float64),
            "replica": np.array([self.replica] * n, dtype=object),
            "load_s": np.array([self.load_s] * n, dtype=np.float64),
            "engine_info": np.array([_json(self.engine_info)] * n, dtype=object),
            # the figures after the batch, on each of its results (the driver keeps a replica's latest)
            "engine_figures": np.array([pickle.dumps((self.batches_done, replica_engine_figures(self.engine)))] * n,
                                       dtype=object),
        }


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


@dataclass
class ReplicaStats:
    """What one replica did this run (summary.json's ``executor.per_replica``)."""

    shards: int = 0
    rows: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    engine_load_s: float = 0.0

    def to_dict(self, name: str) -> dict[str, Any]:
        return {
            "replica": name, "shards": self.shards, "rows": self.rows, "completion_tokens": self.completion_tokens,
            "busy_s": round(self.busy_s, 3), "engine_load_s": round(self.engine_load_s, 3),
            "output_tokens_per_s": round(self.completion_tokens / self.busy_s, 3) if self.busy_s > 0 else 0.0,
        }


@dataclass
class _Driver:
    """The driver's state while results come back."""

    part_base: int
    committer: Committer | None = None
    engine_info: dict[str, Any] | None = None
    committed_shards: set[int] = field(default_factory=set)
    replicas: dict[str, ReplicaStats] = field(default_factory=dict)
    # each replica's engine figures as of its latest batch (they count from the engine's start: this run's),
    # after the number of batches it had done then
    engine_figures: dict[str, tuple[int, tuple[dict[str, Any], Any]]] = field(default_factory=dict)

    def keep_figures(self, replica: str, batch_number: int, figures: tuple[dict[str, Any], Any]) -> None:
        """A replica's figures after its ``batch_number``-th batch, kept unless a later batch's came first."""
        kept = self.engine_figures.get(replica)
        if kept is None or batch_number > kept[0]:
            self.engine_figures[replica] = (batch_number, figures)

    def merged_figures(self) -> dict[str, Any] | None:
        """The replicas' latest figures as one engine's (``merged_engine_metrics``)."""
        return merged_engine_metrics([figures for _, figures in self.engine_figures.values()])


@dataclass
class _Pipeline:
    """A run's way through Ray: the driver's shard feed, the queue it fills, the results coming back."""

    feed: ShardFeed
    queue: Any
    results: Any


def _stop_pipeline(pipeline: _Pipeline) -> None:
    """The feed stops packing, its queue goes (a put waiting on it returns), Ray Data's execution ends (its
    errors about the tasks that end with it muted)."""
    mute_ray_data_errors()
    pipeline.feed.stop()
    try:
        if pipeline.queue is not None:
            pipeline.queue.close()
    except Exception:  # noqa: BLE001 - Ray already gone
        pass
    _close_quietly(pipeline.results)
    pipeline.feed.join(timeout=5)


def _read_shards(source: Any) -> Any:
    """The relay's dataset: one read task reserving no CPU (an argument of its own since Ray 2.4x, before in
    ``ray_remote_args``)."""
    import ray.data

    if "num_cpus" in inspect.signature(ray.data.read_datasource).parameters:
        return ray.data.read_datasource(source, override_num_blocks=1, num_cpus=0)
    return ray.data.read_datasource(source, override_num_blocks=1, ray_remote_args={"num_cpus": 0})


def _shard_items(packed: list[Shard]) -> Any:
    """Shards packed at once as a dataset of items, one block each."""
    import ray.data

    items = [{"shard": s.key, "rows": pickle.dumps(s.rows, protocol=pickle.HIGHEST_PROTOCOL)} for s in packed]
    return ray.data.from_items(items, override_num_blocks=len(items))


def _result_rows(dataset: Any) -> Iterator[dict[str, Any]]:
    """The results as they come: one block at a time and no prefetch, which would hold each result back
    until the next one arrived (the last until the end)."""
    batches = iter(dataset.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"))
    try:
        for batch in batches:
            for i in range(len(batch["shard"])):
                yield {name: column[i] for name, column in batch.items()}
    finally:
        _close_quietly(batches)


def _feed_problem(feed: ShardFeed) -> str | None:
    """Why a run whose results stopped coming is not complete: the input's reader failed, or shards sent to
    Ray never came back (both leave their rows for a rerun), or None."""
    if feed.error is not None:
        return f"run stopped by an error: {type(feed.error).__name__}: {feed.error}"
    if not feed.finished:
        return f"{feed.out} shards sent to Ray did not come back; rerun the same command to run their rows"
    return None


class RayJobRunner(JobRunner):
    """:class:`JobRunner` with the rows run on a Ray Data actor pool (see the module docstring); opening the
    output directory, checks, the outcome and the summary are the local runner's."""

    # Shards packed and not yet committed, at most (None: two per replica): what the driver holds of the input.
    shards_in_flight: int | None = None

    def __init__(self, job: Any, **kwargs: Any) -> None:
        super().__init__(job, **kwargs)
        self._replica_stats: dict[str, ReplicaStats] = {}
        self._ray: RayStart | None = None

    def _first_stop(self, signal_name: str) -> str:
        return (f"forge-batch: {signal_name}: sending no new shards; stopping after the result at hand (the shards "
                "still on the replicas run again on the rerun; signal again to stop now)")

    def _executor_summary(self) -> dict[str, Any]:
        ex = self.job.executor
        return {
            "kind": "ray", "replicas": ex.replicas, "batch_rows": ex.batch_rows,
            "num_gpus_per_replica": ex.num_gpus_per_replica, "num_cpus_per_replica": ex.num_cpus_per_replica,
            "per_replica": [s.to_dict(name) for name, s in sorted(self._replica_stats.items())],
        }

    def _run(self, run: _Run) -> RunResult:
        run.total = run.plan.total_rows()
        # Ray's processes start while the driver reads; not when the ledger already holds every input row.
        if run.total is None or run.resume.tally.rows < run.total:
            self._ray = RayStart(run.job.executor)
        try:
            return self._run_rows(run)
        finally:
            if self._ray is not None:
                self._ray.close()
                self._ray = None

    def _run_rows(self, run: _Run) -> RunResult:
        job = run.job
        batches = run.plan.batches()
        first, batches = run.plan.first_batches(batches)
        schema = run.resume.schema if run.resume.schema is not None else run.plan.output_schema(job, _rows(first))
        run.out.set_schema(schema)
        context = run_context(job, run.pm, run.plan.spec, None, run.resume.tally.rows)
        self._start_hooks(run, context)
        run.observers = ResultObservers(run.pm, context, self._say)
        id_column = id_column_name(run.plan.spec.id_field)
        admitter = RequestBuilder(job, run.plan.spec, schema.field(id_column).type, run.resume, context, self.flags)
        self.flags.starting = "reading the input"
        rows = admitter.admitted(_chain(first, batches))
        first_row = next(rows, None)  # None: every row is committed, no Ray needed
        pipeline = self._start_pipeline(run, schema, itertools.chain([first_row], rows)) if first_row is not None else None
        driver = _Driver(part_base=run.resume.next_part)
        self._progress = Progress(
            run.total, initial=run.resume.tally.rows, mode=self.progress_mode, stream=self.stream,
            log_interval=self.log_interval, desc=job.display_name(),
        )
        t_gen = time.monotonic()
        run.figures = RunFigures()
        end = self._generate_on_ray(run, schema, id_column, pipeline, driver)
        gen_s = time.monotonic() - t_gen
        run.engine_metrics = driver.merged_figures()
        run.engine_info = driver.engine_info
        run.load_s = max((s.engine_load_s for s in driver.replicas.values()), default=0.0)
        self._replica_stats = driver.replicas
        committer = driver.committer or self._committer(run, schema, id_column, None)
        return self._finish(run, committer, end, gen_s)

    def _start_pipeline(self, run: _Run, schema: pa.Schema, rows: Any) -> _Pipeline:
        """Read the input's first window, wait for Ray, start packing shards and plan the dataset (it runs
        when its results are asked for)."""
        ray_start = self._ray = self._ray or RayStart(run.job.executor)
        ex = run.job.executor
        window = self.shards_in_flight or 2 * ex.replicas
        head: list[AdmittedRow] = []
        head_error = None
        try:
            head.extend(itertools.islice(rows, window * ex.batch_rows + 1))  # one row more: does the input go on?
        except Exception as e:  # noqa: BLE001 - a reader that fails: what it read runs, then the run says so
            head_error = e
        self.flags.starting = "starting Ray"
        quiet_ray_data()  # imports Ray Data here while Ray starts on its thread
        ray_start.wait()
        problem = placement_problem(ex)
        if problem is not None and ray_start.started:  # the Ray this run started: no node will join it
            raise JobError([Problem("executor", f"{problem}: the replicas could never start")])
        if problem is not None:  # a cluster's autoscaler may add such a node; until then Ray waits
            self._say(f"forge-batch: warning: {problem}; the replicas wait until a node that has them joins")
        self.flags.starting = "starting the Ray replicas"
        if head_error is not None or len(head) <= window * ex.batch_rows:
            # All of it fits in the window: Ray Data gets the shards as items, no queue and no relay task (two
            # worker processes fewer to start, which is most of a short job's wait on a small machine).
            packed = list(shards(iter(head), ex.batch_rows))
            feed = ShardFeed.all_packed([shard.key for shard in packed])
            feed.error = head_error
            return _Pipeline(feed, None, _result_rows(self._dataset(run, schema, lambda: _shard_items(packed))))
        from forge_batch.runner.ray_source import ShardQueueClient, ShardSource

        queue = ShardQueueClient(f"forge-batch-shards-{uuid.uuid4().hex}")
        feed = ShardFeed(shards(itertools.chain(head, rows), ex.batch_rows), window, queue.put)
        feed.start()
        try:
            # The relay reserves no CPU: the replicas may take them all.
            results = _result_rows(self._dataset(run, schema, lambda: _read_shards(ShardSource(queue.name))))
        except BaseException:
            _stop_pipeline(_Pipeline(feed, queue, None))
            raise
        return _Pipeline(feed, queue, results)

    def _committer(self, run: _Run, schema: pa.Schema, id_column: str, engine_info: dict[str, Any] | None) -> Committer:
        file_meta = file_metadata(run.job, engine_info)
        return Committer(
            run.job, run.out, run.writer, run.resume,
            schema.with_metadata({k.encode(): v.encode() for k, v in file_meta.items()}),
            file_meta, id_column, self.flags, self._say,
        )

    def _dataset(self, run: _Run, schema: pa.Schema, source: Callable[[], Any]) -> Any:
        """The replicas' ``map_batches`` over the shards ``source()`` makes into a dataset."""
        import ray.data

        ex = run.job.executor
        remote_args: dict[str, Any] = {"num_cpus": ex.num_cpus_per_replica}
        if ex.num_gpus_per_replica:
            remote_args["num_gpus"] = ex.num_gpus_per_replica
        # Every shard and every result its own block, passed on at once: Ray Data would otherwise gather small
        # blocks up to its target size, holding shards back while the driver waits for their results. A
        # dataset keeps the context it was made in, so the setting is the run's alone.
        context = ray.data.DataContext.get_current()
        target = context.target_max_block_size
        context.target_max_block_size = 1
        try:
            return source().map_batches(
                EngineReplica,
                batch_size=1,
                batch_format="numpy",
                # two shards per replica at most: one running, one waiting, so no replica takes the whole window
                compute=ray.data.ActorPoolStrategy(size=ex.replicas, max_tasks_in_flight_per_actor=2),
                fn_constructor_kwargs={"job": run.job, "spec": run.plan.spec, "schema": schema_to_str(schema),
                                       "engine_factory": self._engine_factory_name()},
                **remote_args,
            )
        finally:
            context.target_max_block_size = target

    def _engine_factory_name(self) -> str | None:
        """How a replica finds this run's engine factory: by ``module:function`` (None: the default engine),
        since a replica runs in another process, perhaps on another machine."""
        factory = self.engine_factory
        if factory is default_engine_factory:
            return None
        name = f"{factory.__module__}:{factory.__qualname__}"
        if "<locals>" in name or not hasattr(factory, "__module__"):
            raise ValueError(f"the Ray executor's replicas load the engine factory by name; {name} is not importable "
                             f"(set {ENGINE_FACTORY_ENV}=module:function to a module-level function)")
        return name

    def _generate_on_ray(self, run: _Run, schema: pa.Schema, id_column: str, pipeline: _Pipeline | None,
                         driver: _Driver) -> RunEnd:
        """Commit each shard's result as it comes back, until every shard is done, a signal or the error
        budget stops the run, or something breaks."""
        flags, end = self.flags, RunEnd(committed_rows=0)
        progress = self._progress
        assert progress is not None
        try:
            flags.starting = None  # from here a first signal stops the run after the result at hand
            if pipeline is not None and pipeline.results is not None:
                feed = pipeline.feed
                for result in pipeline.results:
                    self._commit_result(run, schema, id_column, driver, result, progress, feed)
                    if driver.committer is not None:
                        driver.committer.check_error_rate(run.total)
                    # every shard committed: done, without waiting for Ray Data to wind down
                    if flags.stop_admitting or feed.finished:
                        break
                if not flags.stop_admitting:
                    end.error_message = _feed_problem(feed)
        except (Abort, KeyboardInterrupt):
            flags.stop_now()
        except (CommitError, OutputDirError, JobError) as e:
            if isinstance(e, CommitError):
                end.commit_error = e
            else:
                end.error_message = str(e)
        except Exception as e:  # a replica that cannot start, Ray lost: keep what is committed
            end.error_message = f"run stopped by an error: {type(e).__name__}: {_last_line(e)}"
        finally:
            if pipeline is not None:
                _stop_pipeline(pipeline)  # stops Ray Data's execution when the run ends early
            self.signals.finishing()  # restored when run() returns
            progress.close()
        committer = driver.committer
        end.committed_rows = committer.run_tally.rows if committer is not None else 0
        end.signal_name, end.dropped_in_flight = flags.signal_name, flags.drop_now or flags.signal_name is not None
        end.stopped_early = flags.abort_reason == "error_rate"
        return end

    def _commit_result(self, run: _Run, schema: pa.Schema, id_column: str, driver: _Driver, result: dict[str, Any],
                       progress: Progress, feed: ShardFeed) -> None:
        key = int(result["shard"])
        if key in driver.committed_shards:  # a second result for one shard (a retried task): already written
            return
        info = _loads_json(result["engine_info"])
        if driver.committer is None:
            if info is not None:
                run.out.check_identity("engine", info, compare=ENGINE_IDENTITY, force=self.force_resume)
            driver.engine_info = info
            driver.committer = self._committer(run, schema, id_column, info)
        elif info is not None and driver.engine_info is not None:
            differs = [k for k in ENGINE_IDENTITY if info.get(k) != driver.engine_info.get(k)]
            if differs:
                raise OutputDirError(
                    f"replicas resolved different engines ({', '.join(f'{k}: {driver.engine_info.get(k)!r} vs {info.get(k)!r}' for k in differs)}); "
                    "their rows would not match: give every replica the same device kind (engine.device / engine.dtype)"
                )
        committer = driver.committer
        groups: list[Group] = pickle.loads(result["groups"])
        flags = self.flags
        flags.critical += 1
        try:
            for group in groups:
                committer.add(group)
            committer.commit(part_index=driver.part_base + key)
            driver.committed_shards.add(key)
            feed.committed(key)
        finally:
            flags.critical -= 1
        for group in groups:  # as the local runner does with each finished row
            run.observe(group)
        if result.get("engine_figures") is not None:
            driver.keep_figures(str(result["replica"]), *pickle.loads(result["engine_figures"]))
        tokens = sum(r.get("completion_tokens") or 0 for g in groups for r in g.records)
        stats = driver.replicas.setdefault(str(result["replica"]), ReplicaStats())
        stats.shards += 1
        stats.rows += len(groups)
        stats.completion_tokens += tokens
        stats.busy_s += float(result["busy_s"])
        stats.engine_load_s = float(result["load_s"])
        progress.update(len(groups), tokens)


def _loads_json(text: Any) -> Any:
    import json

    return json.loads(text) if isinstance(text, str) and text else None


def _last_line(e: BaseException) -> str:
    """The error itself: a remote error's text is its traceback, which ends with it."""
    text = str(e).strip()
    return text.splitlines()[-1] if text else ""


def ray_available() -> bool:
    return ray_missing_problem() is None


__all__ = ["RAY_EXTRA", "EngineReplica", "RayJobRunner", "ReplicaStats", "Shard", "ShardFeed", "connect_ray", "ray_available",
           "shards"]
