"""The driver's connection to Ray for the Ray executor (docs/scale-out.md).

Starting a local Ray instance takes many seconds on a small machine (its own processes import Ray), most of a
short job's overhead, so :class:`RayStart` runs it on a thread while the driver opens the output directory,
reads the input and imports Ray Data. On a thread, ``ray.init`` also leaves the run's SIGTERM handler in place
(on the main thread it replaces it with one that exits at once, without committing what came back).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from forge_batch.job import RAY_EXTRA, ExecutorSpec, JobError, Problem, ray_missing_problem


class _QuietStart(logging.Filter):
    """Drops two of ``ray.init``'s warnings that say nothing wrong: that it set no SIGTERM handler (not setting
    one is why it runs on a thread), and that the local instance it starts uses token authentication (Ray's
    default, kept)."""

    NOTICES = ("SIGTERM handler is not set", "Token authentication is enabled for this Ray cluster")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


# the loggers of those two warnings
_START_LOGGERS = ("ray._private.worker", "ray._private.authentication.authentication_token_setup")


def connect_ray(executor: ExecutorSpec) -> bool:
    """Connect to (or start) Ray as ``executor.address`` says; True when this call started the connection
    (the caller then shuts it down). An already connected process (a test, a notebook) is used as it is."""
    problem = ray_missing_problem()
    if problem is not None:
        raise JobError([Problem("executor.kind", problem)])
    try:
        import ray
    except ImportError as e:  # installed but not importable (a missing or broken dependency)
        raise JobError([Problem("executor.kind", f"executor kind ray cannot import Ray ({e}); reinstall it with {RAY_EXTRA}")]) from e

    if ray.is_initialized():
        return False
    # No dashboard, and the replicas' log lines stay in Ray's log files: one progress line for the job.
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if executor.address is not None:
        kwargs["address"] = executor.address
    quiet = _QuietStart()
    for name in _START_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        ray.init(**kwargs)
    finally:
        for name in _START_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)
    return True


def placement_problem(executor: ExecutorSpec) -> str | None:
    """Why no replica could be placed: no live node of the connected cluster has a replica's CPUs (and GPUs).
    Ray would wait for such a node without a word. None when one has them."""
    import ray

    need = {"CPU": float(executor.num_cpus_per_replica), "GPU": float(executor.num_gpus_per_replica or 0)}
    nodes = [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]
    if any(all(node.get(k, 0.0) >= v for k, v in need.items() if v) for node in nodes):
        return None
    largest = max(nodes, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
    wanted = ", ".join(f"{v:g} {k}" for k, v in need.items() if v)
    return (f"a replica asks for {wanted} (executor.num_cpus_per_replica / num_gpus_per_replica), and no node of the "
            f"Ray cluster has that many (the largest: {largest.get('CPU', 0.0):g} CPU, {largest.get('GPU', 0.0):g} GPU)")


class _NoBarsNotice(logging.Filter):
    """Drops Ray Data's notice that its progress bars are off: they are, for the job's own."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Progress bars disabled" not in record.getMessage()


class _EndedRunErrors(logging.Filter):
    """Ray Data's errors from the tasks a run's end stops with it (its read task, whose shard queue the run
    closed, raises ActorDiedError): a page of traceback after the run's own message, which says what happened."""

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and record.name.startswith("ray.data") and record.levelno >= logging.ERROR)


_ENDED_RUN_ERRORS = _EndedRunErrors()


def mute_ray_data_errors(mute: bool = True) -> None:
    """From now (the run's pipeline is being stopped) Ray Data's errors are not printed; ``mute=False`` (a new
    run) prints them again. On the handlers: a record from Ray Data's modules reaches them through ``ray``'s."""
    _ENDED_RUN_ERRORS.active = mute
    for name in ("ray.data", "ray", ""):
        for handler in logging.getLogger(name).handlers:
            if _ENDED_RUN_ERRORS not in handler.filters:
                handler.addFilter(_ENDED_RUN_ERRORS)


def quiet_ray_data() -> None:
    """One progress bar / log line for the job: Ray Data's own bars and execution logs off (its warnings
    stay: a replica that cannot be placed says so)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    bars_log = logging.getLogger("ray.data._internal.progress")  # a filter sees only its own logger's records
    if not any(isinstance(f, _NoBarsNotice) for f in bars_log.filters):
        bars_log.addFilter(_NoBarsNotice())
    mute_ray_data_errors(False)  # a run's errors are shown until it ends


def _autoscaler_monitor_ends_at_once() -> None:
    """Make the coming ``ray.shutdown`` of the local instance this run started skip its one slow step.

    ``ray.shutdown`` sends SIGTERM to each of Ray's processes in turn and gives each a second before SIGKILL;
    all but one exit in milliseconds, but the autoscaler's monitor sits out its whole second (measured: 1.02 of
    the 1.35 s a shutdown takes here, all of it after the job's last commit). So its process killer is wrapped
    to SIGKILL the monitor (it keeps no state for a local instance) before Ray's own sequence runs, once the
    driver has disconnected. A private hook: where Ray lays it out otherwise, the plain shutdown runs."""
    try:
        from ray._private import worker as ray_worker

        node = ray_worker._global_node
        if node is None or not node.is_head() or not isinstance(node.all_processes, dict):
            return
        kill_all = node.kill_all_processes
    except Exception:  # noqa: BLE001 - Ray's internals moved: keep its shutdown as it is
        return

    def monitor_first_then_kill_all(*args: Any, **kwargs: Any) -> Any:
        try:
            for info in node.all_processes.get("monitor", ()):
                if info.process is not None and info.process.poll() is None:
                    info.process.kill()
        except Exception:  # noqa: BLE001 - Ray's sequence below ends it as it always does
            pass
        return kill_all(*args, **kwargs)

    node.kill_all_processes = monitor_first_then_kill_all


class RayStart:
    """:func:`connect_ray` on a thread, begun at construction; :meth:`wait` for it, :meth:`close` at the end.

    A Ray instance this thread starts lives as long as the thread: Ray's processes get the parent-death
    signal when the thread that spawned them ends (Linux ties it to the thread, not the process), so the
    thread stays, waiting, until :meth:`close` has shut Ray down."""

    def __init__(self, executor: ExecutorSpec) -> None:
        self.started = False
        self._error: BaseException | None = None
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._connect, args=(executor,), name="forge-batch-ray-start", daemon=True)
        self._thread.start()

    def _connect(self, executor: ExecutorSpec) -> None:
        try:
            self.started = connect_ray(executor)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread by wait()
            self._error = e
        finally:
            self._connected.set()
        if self.started:
            self._closed.wait()

    def wait(self) -> None:
        """Until Ray is connected; raises what stopped it. Short waits, so a signal's handler runs meanwhile."""
        while not self._connected.wait(0.1):
            pass
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Shut Ray down if this run started it (after a start still under way: a run stopped early)."""
        self._connected.wait()
        try:
            if self.started:
                import ray

                _autoscaler_monitor_ends_at_once()
                ray.shutdown()
                self.started = False
        finally:
            self._closed.set()
            self._thread.join()
