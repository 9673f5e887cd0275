"""Where a `forge-batch run` spends its time before the first token: a timeline, in seconds since the process
started, of the driver's phases and (under `executor: {kind: ray}`) of the replica's.

    python scripts/ray_start_timeline.py run job.yaml --progress none [--set executor.kind=ray ...]

Arguments are `forge-batch`'s. The driver's phases are timed by wrapping the runner's methods; the replica's by
a subclass of the engine replica that Ray ships by value, so nothing in the package changes. BENCHMARKS.md
("the Ray executor's fixed start cost") has what it showed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any


def process_start(pid: str = "self") -> float:
    """When the process started, as a Unix time (from /proc: Linux only)."""
    with open(f"/proc/{pid}/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as f:
        boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
    return boot + ticks / os.sysconf("SC_CLK_TCK")


T0 = process_start()


def mark(what: str, at: float | None = None) -> None:
    print(f"[timeline] {(time.time() if at is None else at) - T0:7.2f}  {what}", file=sys.stderr, flush=True)


def timed(owner: Any, name: str, label: str) -> None:
    inner = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        mark(f"{label} starts")
        try:
            return inner(*args, **kwargs)
        finally:
            mark(f"{label} ends")

    setattr(owner, name, wrapper)


def first_output(stream: Any, on_first: Any) -> Any:
    first = True
    for item in stream:
        if first:
            on_first()
            first = False
        yield item


def main(argv: list[str]) -> int:
    mark("python started")
    from forge_batch import cli
    from forge_batch.runner import job_runner, ray_executor, ray_session

    mark("forge_batch imported")
    timed(job_runner.JobRunner, "_open", "opening the output directory")
    timed(job_runner.JobRunner, "_load_engine", "local: loading the engine")
    timed(ray_session, "connect_ray", "ray: ray.init (a thread)")
    timed(ray_executor, "quiet_ray_data", "ray: importing Ray Data")
    timed(ray_executor.RayJobRunner, "_start_pipeline", "ray: starting the pipeline")
    timed(job_runner.JobRunner, "_finish", "summary")
    generate = job_runner.JobRunner._generate

    def generate_timed(self: Any, run: Any, *args: Any, **kwargs: Any) -> Any:  # the local engine's first output
        stream = run.engine.generate_stream
        run.engine.generate_stream = lambda *a, **k: first_output(stream(*a, **k), lambda: mark("local: first output"))
        return generate(self, run, *args, **kwargs)

    job_runner.JobRunner._generate = generate_timed  # type: ignore[method-assign]
    trace = tempfile.NamedTemporaryFile(prefix="replica-timeline-", suffix=".jsonl", delete=False).name

    class TimedReplica(ray_executor.EngineReplica):  # shipped by value: defined in __main__
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            events = [(process_start(), "replica: process started"), (time.time(), "replica: __init__ (Ray Data imported)")]
            super().__init__(*args, **kwargs)
            events.append((time.time(), "replica: engine loaded"))
            stream = self.engine.generate_stream
            self.engine.generate_stream = lambda *a, **k: first_output(  # type: ignore[method-assign]
                stream(*a, **k), lambda: events.append((time.time(), "replica: first output")))
            self.events = events

        def __call__(self, batch: Any) -> Any:
            out = super().__call__(batch)
            with open(trace, "a") as f:
                f.write(json.dumps(self.events) + "\n")
            return out

    ray_executor.EngineReplica = TimedReplica  # type: ignore[misc]
    try:
        return cli.main(argv)
    finally:
        mark("run returned")
        with open(trace) as f:
            seen: set[str] = set()
            for line in f:
                for at, what in json.loads(line):
                    if what not in seen:  # the first shard's events are the start's
                        seen.add(what)
                        mark(what, at)
        os.unlink(trace)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
