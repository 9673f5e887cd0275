"""``JobRunner``: one job from input to committed output, calling the runner's parts in order."""

from __future__ import annotations

import datetime as _dt
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pluggy import PluginManager

from forge_batch.contract import RawRow, RunContext, Writer
from forge_batch.io.ledger import ResumeState, Tally
from forge_batch.io.meta import file_metadata
from forge_batch.io.output_dir import SUMMARY, OutputDir
from forge_batch.io.progress import Progress
from forge_batch.io.safe_fs import CommitError, describe_os_error
from forge_batch.io.schema import id_column_name
from forge_batch.job import InputSpec, JobError, JobSpec, Problem, compile_template
from forge_batch.plugin_manager import (
    PluginHookError,
    call_impl,
    collect_registry,
    iter_impls,
)
from forge_batch.runner.checks import CheckedJob, prepare_loaded_job
from forge_batch.runner.commit import Committer
from forge_batch.runner.engine_factory import ENGINE_IDENTITY, default_engine_factory, engine_factory_from_env
from forge_batch.runner.inputs import InputPlan
from forge_batch.runner.records import Group, RecordBuilder, ResultObservers
from forge_batch.runner.requests import RequestBuilder, has_chat_template
from forge_batch.runner.run_figures import RunFigures
from forge_batch.runner.signals import Abort, FinishInterrupted, RunFlags, SignalHandlers, StartInterrupted
from forge_batch.runner.summary import (
    EXIT_FAILED,
    Outcome,
    RunEnd,
    Timings,
    build_summary,
    decide_outcome,
    signal_exit_code,
)

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """The outcome of a run: ``status`` is ``completed``, ``failed`` or ``interrupted``."""

    status: str
    exit_code: int
    message: str
    summary: dict[str, Any]
    output_dir: Path
    summary_path: Path | None = None


class RunInterrupted(Exception):
    """Ctrl-C / SIGTERM arrived before generation started (reading the input, loading the model): nothing was
    committed by this run; or again while it finished. ``exit_code`` is 130 (SIGINT) or 143 (SIGTERM);
    ``summary`` what summary.json says of it (None where none was written)."""

    def __init__(self, message: str, exit_code: int, summary: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.summary = summary


@dataclass
class _Run:
    """What one run has opened and built, handed from one phase to the next."""

    job: JobSpec
    pm: PluginManager
    plan: InputPlan
    out: OutputDir
    resume: ResumeState
    writer: Writer
    started_at: _dt.datetime
    t_start: float
    engine: Any = None
    engine_info: dict[str, Any] | None = None
    load_s: float = 0.0
    total: int | None = None
    figures: RunFigures | None = None  # built when generation starts
    observers: ResultObservers | None = None  # the result_recorded hooks, once the run context exists
    engine_metrics: dict[str, Any] | None = None  # the engine's figures where run.engine cannot say (Ray's replicas)
    context: RunContext | None = None  # once the job_start hooks are called
    started_plugins: set[str] = field(default_factory=set)  # whose job_start returned

    def observe(self, group: Group) -> None:
        """A finished row handed to the output: the run's figures and the result_recorded hooks see it."""
        if self.figures is not None:
            self.figures.observe(group.records)
        if self.observers is not None:
            self.observers(group)


class JobRunner:
    """Runs one job. ``run()`` returns a :class:`RunResult`; it raises only for problems before the first
    row (invalid job, unusable output directory, engine that cannot load).

    ``job``: a :class:`CheckedJob` (from :func:`forge_batch.runner.checks.prepare_job`: not checked again) or
    a bare ``JobSpec`` (checked here, against ``plugin_manager`` or the job's own plugins).
    ``progress``: ``auto`` (bar on a terminal, log lines otherwise), ``bar``, ``log``, ``events`` or ``none``.
    ``overwrite`` discards committed parts instead of resuming. ``grace_seconds`` bounds how long in-flight
    rows may finish after the first Ctrl-C / SIGTERM. ``log_events``: messages and progress go out as log
    records (any ``progress`` but ``none`` becomes ``events``) instead of lines on ``stream``, for
    ``--log-format json``."""

    def __init__(
        self,
        job: JobSpec | CheckedJob,
        *,
        engine_factory: Callable[..., Any] | None = None,
        plugin_manager: PluginManager | None = None,
        progress: str = "auto",
        quiet: bool = False,
        overwrite: bool = False,
        force_resume: bool = False,
        grace_seconds: float = 30.0,
        install_signal_handlers: bool = True,
        stream: TextIO | None = None,
        log_interval: float = 10.0,
        log_events: bool = False,
    ) -> None:
        self.checked = job if isinstance(job, CheckedJob) else None
        self.job = job.job if isinstance(job, CheckedJob) else job
        self.pm = job.plugin_manager if isinstance(job, CheckedJob) else plugin_manager
        self.engine_factory = engine_factory or engine_factory_from_env()
        self.log_events = log_events
        if log_events and progress != "none":
            progress = "events"  # a progress record a JSON log parser can read (a bar would be lines it cannot)
        self.progress_mode = "none" if quiet else progress
        self.quiet = quiet
        self.overwrite = overwrite
        self.force_resume = force_resume
        self.stream = stream or sys.stderr
        self.log_interval = log_interval
        self.flags = RunFlags()
        self.signals = SignalHandlers(self.flags, grace_seconds, self._say, self._first_stop, install_signal_handlers)
        self._progress: Progress | None = None

    def _say(self, text: str) -> None:
        if self.quiet:
            return
        if self.log_events:
            text = text.removeprefix("forge-batch: ")
            if text.startswith("warning: "):
                log.warning(text.removeprefix("warning: "))
            else:
                log.info(text)
            return
        if self._progress is not None and self._progress.mode == "bar":
            self._progress.message(text)
        else:
            print(text, file=self.stream, flush=True)

    def run(self) -> RunResult:
        """Run the job to completion, failure or interruption (see the package docstring).

        Raises :class:`RunInterrupted` for Ctrl-C / SIGTERM before generation started."""
        self.signals.install()
        summary: dict[str, Any] | None = None
        try:
            run = self._open()
            try:
                return self._run(run)
            except (Exception, StartInterrupted) as e:
                if run.figures is None:  # before generation: summary.json says so, not what the last run did
                    summary = _summarize_start_failure(run, e)
                    self._end_hooks(run, summary)
                raise
            finally:
                run.out.close()
        except StartInterrupted as e:
            raise RunInterrupted(
                f"interrupted by {e.signal_name} while {e.phase}; nothing was committed this run; "
                "rerun the same command to resume", signal_exit_code(e.signal_name), summary,
            ) from None
        except FinishInterrupted as e:
            raise RunInterrupted(
                f"interrupted by {e.signal_name} while finishing the run: every row it handled is committed, but "
                "what comes after them (a single-file output, the job_end hooks, summary.json) may not be written; "
                "rerun the same command to finish", signal_exit_code(e.signal_name),
            ) from None
        finally:
            self.signals.restore()

    def _run(self, run: _Run) -> RunResult:
        """The job flow, top-down: input -> schema -> engine -> hooks -> generate and commit -> summary."""
        job = run.job
        run.total = run.plan.total_rows()
        batches = run.plan.batches()
        first, batches = run.plan.first_batches(batches)
        schema = run.resume.schema if run.resume.schema is not None else run.plan.output_schema(job, _rows(first))
        run.out.set_schema(schema)
        self._load_engine(run)
        file_meta = file_metadata(job, run.engine_info)
        context = self._context(run)
        self._start_hooks(run, context)
        id_column = id_column_name(run.plan.spec.id_field)
        committer = Committer(
            job, run.out, run.writer, run.resume, schema.with_metadata({k.encode(): v.encode() for k, v in file_meta.items()}),
            file_meta, id_column, self.flags, self._say,
        )
        records = RecordBuilder(job, id_column, set(schema.names), context)
        requests = RequestBuilder(job, run.plan.spec, schema.field(id_column).type, run.resume, context, self.flags,
                                  output_columns=set(schema.names))
        self._progress = Progress(
            run.total, initial=run.resume.tally.rows, mode=self.progress_mode, stream=self.stream,
            log_interval=self.log_interval, desc=job.display_name(),
        )
        t_gen = time.monotonic()
        run.figures = RunFigures()
        run.observers = ResultObservers(run.pm, context, self._say)
        end = self._generate(run, requests.requests(_chain(first, batches)), records, committer, self._progress)
        gen_s = time.monotonic() - t_gen
        return self._finish(run, committer, end, gen_s)

    # ---- phases ---------------------------------------------------------------------------------------
    def _open(self) -> _Run:
        """Check the job (unless already checked), plan the input and open the output directory."""
        t_start, started_at = time.monotonic(), _dt.datetime.now(_dt.timezone.utc)
        job = self.job
        if self.checked is None:
            self.checked = prepare_loaded_job(job, pm=self.pm, check_model=self.engine_factory is default_engine_factory)
        pm = self.checked.plugin_manager
        plan = InputPlan.for_job(job, collect_registry(pm, "register_readers"))
        writer: Writer = collect_registry(pm, "register_writers")[job.output.format]
        out = OutputDir(job.output.path, writer.extension, single_file=job.output.single_file())
        resume = out.open(job.fingerprint(), job.model_dump(mode="json"), job.output.format, overwrite=self.overwrite)
        try:
            out.check_identity("input", plan.identity(), compare=("digest",), force=self.force_resume)
        except BaseException:
            out.close()
            raise
        return _Run(job, pm, plan, out, resume, writer, started_at, t_start)

    def _load_engine(self, run: _Run) -> None:
        """Build the engine (the samplers and constraints are the engine's too) and check it can resume and
        compile the job-wide constraint."""
        job = run.job
        self.flags.starting = "loading the model"
        samplers = collect_registry(run.pm, "register_samplers")
        constraints = collect_registry(run.pm, "register_constraints")
        t_load = time.monotonic()
        run.engine = self.engine_factory(job, samplers=samplers, constraints=constraints)
        self.flags.starting = "starting generation"
        run.load_s = time.monotonic() - t_load
        run.engine_info = getattr(run.engine, "engine_info", None)
        if run.engine_info is not None:
            run.out.check_identity("engine", run.engine_info, compare=ENGINE_IDENTITY, force=self.force_resume)
        if run.resume.tally.rows:  # said once the engine may resume them (a refusal is said instead)
            self._say(f"forge-batch: resuming {job.output.path}: {run.resume.tally.rows} rows already committed, skipping them")
        job_constraint = job.job_constraint()
        compile_constraint = getattr(run.engine, "compile_constraint", None)
        if job_constraint is not None and compile_constraint is not None:
            # A job-wide constraint that cannot compile would fail every row: fail the job before generating.
            try:
                compile_constraint(*job_constraint)
            except Exception as e:
                where = "constraint" if job.constraint is not None else f"sampling.{job_constraint[0]}"
                raise JobError([Problem(where, f"cannot compile the {job_constraint[0]} constraint: {e}")]) from e

    def _context(self, run: _Run) -> RunContext:
        return run_context(run.job, run.pm, run.plan.spec, run.engine, run.resume.tally.rows)

    def _generate(self, run: _Run, requests: Iterator[Any], records: RecordBuilder, committer: Committer,
                  progress: Progress) -> RunEnd:
        """Stream results from the engine into the committer until the input ends, a signal or the error
        budget stops admitting rows, or something breaks; commit what is done in every case."""
        engine, flags, job = run.engine, self.flags, run.job
        end = RunEnd(committed_rows=0)
        max_in_flight = job.engine.max_in_flight or (2 * job.engine.max_num_seqs if job.engine.max_num_seqs else None)
        stream = None
        flags.starting = None  # from here a first signal lets in-flight rows finish
        try:
            stream = engine.generate_stream(requests, max_in_flight=max_in_flight)
            for out in stream:
                group = records.group_for(out)
                committer.add(group)
                flags.in_flight -= 1
                run.observe(group)
                progress.update(1, sum(r.get("completion_tokens") or 0 for r in group.records), getattr(engine, "stats", None))
                if committer.should_commit(more_coming=getattr(engine, "outputs_waiting", 0) > 0):
                    committer.commit()
                committer.check_error_rate(run.total)
                if flags.drop_now:
                    raise Abort()
        except (Abort, KeyboardInterrupt):
            flags.stop_now()
        except CommitError as e:
            end.commit_error = e
        except Exception as e:  # the engine or a reader broke: keep what is done, say how to resume
            end.error_message = f"run stopped by an error: {type(e).__name__}: {e}"
        finally:
            _close_quietly(stream)
            flags.critical += 1
            try:
                committer.commit()
            except CommitError as e:
                end.commit_error = end.commit_error or e
            finally:
                flags.critical -= 1
                self.signals.finishing()  # restored when run() returns
                progress.close()
        end.committed_rows = committer.run_tally.rows
        end.signal_name, end.dropped_in_flight = flags.signal_name, flags.drop_now
        end.stopped_early = flags.abort_reason == "error_rate"
        return end

    def _executor_summary(self) -> dict[str, Any]:
        """What summary.json says of where the rows ran."""
        return {"kind": "local"}

    def _first_stop(self, signal_name: str) -> str:
        """What a first signal during generation does, said."""
        return (f"forge-batch: {signal_name}: admitting no new rows; finishing {self.flags.in_flight} in-flight rows "
                f"(up to {self.signals.grace_seconds:g}s; signal again to stop now)")

    def _start_hooks(self, run: _Run, context: RunContext) -> None:
        """The job_start hooks, one plugin at a time; the run remembers whose returned."""
        run.context = context
        for impl in iter_impls(run.pm, "job_start"):
            call_impl(impl, "job_start", {"job": run.job, "context": context})
            run.started_plugins.add(impl.plugin_name)

    def _end_hooks(self, run: _Run, summary: dict[str, Any]) -> None:
        """The job_end hooks, once the job_start hooks were called: every plugin but those whose job_start
        did not return (one raised, ending the run before generating: the later ones never started)."""
        if run.context is None:
            return
        starting = {impl.plugin_name for impl in iter_impls(run.pm, "job_start")}
        for impl in iter_impls(run.pm, "job_end"):
            if impl.plugin_name in starting and impl.plugin_name not in run.started_plugins:
                continue
            try:
                call_impl(impl, "job_end", {"job": run.job, "context": run.context, "summary": summary})
            except PluginHookError as e:
                self._say(f"forge-batch: warning: {e}")

    def _finish(self, run: _Run, committer: Committer, end: RunEnd, gen_s: float) -> RunResult:
        """Decide the outcome, tell the job_end hooks, write the summary. A second signal while finishing
        (FinishInterrupted) cuts the single-file output or the hooks short; the summary is written all the same."""
        job = run.job
        failed, counted = committer.failed_rows()
        total_tally = run.resume.tally.merged(committer.run_tally)
        outcome = decide_outcome(end, failed, counted, job.max_error_rate, total_tally)
        cut = False  # a second signal stopped finishing
        try:
            if run.out.single_file:
                every_row_done = (end.commit_error is None and end.signal_name is None and end.error_message is None
                                  and not end.stopped_early)
                outcome = _write_single_file(run, every_row_done, outcome)
        except FinishInterrupted as e:
            outcome, cut = _cut_short(outcome, e, f"{job.output.path} is not written: rerun the same command to write it"), True
        summary = build_summary(
            job, outcome, engine_info=run.engine_info, total=total_tally, this_run=committer.run_tally,
            input_rows=run.total, failed=failed, counted=counted, resumed_rows=run.resume.tally.rows,
            parts=len(run.out.part_files()),
            timings=Timings(run.started_at, time.monotonic() - run.t_start, run.load_s, gen_s),
            figures=(run.figures or RunFigures()).summary(run.engine, gen_s, measured=run.engine_metrics),
        )
        summary["executor"] = self._executor_summary()
        if not cut:
            try:
                self._end_hooks(run, summary)
            except FinishInterrupted as e:
                outcome, cut = _cut_short(outcome, e, "the job_end hooks were cut short"), True
        if not cut and self.flags.late_signal is not None:
            outcome = Outcome(outcome.status, outcome.exit_code,
                              f"{outcome.message} ({self.flags.late_signal} came after every row was committed)")
        summary.update(status=outcome.status, message=outcome.message)
        summary_path: Path | None = None
        self.flags.critical += 1  # a signal now is noted, not raised: the summary is written whole
        try:
            summary_path = run.out.write_summary(summary)
        except OSError as e:  # e.g. the disk filled up with the last part: the parts are fine, say so
            outcome = _summary_not_written(outcome, f"could not write {run.out.state_dir / SUMMARY}: {describe_os_error(e)}")
            summary.update(status=outcome.status, message=outcome.message)
        finally:
            self.flags.critical -= 1
        return RunResult(outcome.status, outcome.exit_code, outcome.message, summary, Path(job.output.path), summary_path)


def _cut_short(outcome: Outcome, e: FinishInterrupted, what: str) -> Outcome:
    """The outcome of a run whose finishing a second signal stopped: every row it handled is committed."""
    return Outcome("interrupted", signal_exit_code(e.signal_name),
                   f"{outcome.message}; interrupted by {e.signal_name} while finishing the run: every row it handled "
                   f"is committed, {what}")


def _summarize_start_failure(run: _Run, error: BaseException) -> dict[str, Any]:
    """Write (and return) the summary of a run that ended before generating (the engine did not load, a signal
    came while it loaded, a job_start hook raised): ``failed`` or ``interrupted``, the output's counts as they
    were."""
    if isinstance(error, StartInterrupted):
        outcome = Outcome("interrupted", signal_exit_code(error.signal_name),
                          f"interrupted by {error.signal_name} while {error.phase}; nothing was committed this run")
    else:
        outcome = Outcome("failed", EXIT_FAILED, f"{type(error).__name__}: {error}; nothing was committed this run")
    summary = build_summary(
        run.job, outcome, engine_info=run.engine_info, total=run.resume.tally, this_run=Tally(), input_rows=run.total,
        failed=0, counted=0, resumed_rows=run.resume.tally.rows, parts=len(run.out.part_files()),
        timings=Timings(run.started_at, time.monotonic() - run.t_start, run.load_s, 0.0),
    )
    try:
        run.out.write_summary(summary)
    except OSError:  # the error being raised says more than this one
        pass
    return summary


def run_context(job: JobSpec, pm: PluginManager, spec: InputSpec, engine: Any, resumed_rows: int) -> RunContext:
    """What the hooks of a run see; ``engine`` is the one that runs the rows (None where the rows run elsewhere:
    an executor's driver)."""
    tokenizer = getattr(engine, "tokenizer", None)
    chat = job.input.apply_chat_template if job.input.apply_chat_template is not None else has_chat_template(tokenizer)
    if job.input.system_prompt and not chat and engine is not None:
        log.warning("input.system_prompt reaches only rows with a chat (messages_field): plain prompts go to the model "
                    "as they are, without a chat template (%s)", "apply_chat_template is false"
                    if job.input.apply_chat_template is False else "the model has none")
    return RunContext(
        job=job,
        input=spec,
        plugin_manager=pm,
        output_dir=Path(job.output.path),
        engine=engine,
        tokenizer=tokenizer,
        max_model_len=getattr(engine, "max_model_len", None),
        chat=bool(chat),
        template=compile_template(spec.template) if spec.template is not None else None,
        resumed_rows=resumed_rows,
    )


def _write_single_file(run: _Run, every_row_done: bool, outcome: Outcome) -> Outcome:
    """A single-file output (``results.jsonl``) is written when every row is committed; until then its
    parts wait in the state folder. Returns the run's outcome, amended."""
    path = run.job.output.path
    if not every_row_done:
        return Outcome(outcome.status, outcome.exit_code, f"{outcome.message}; {path} is written once every row is done")
    try:
        run.out.finalize()
    except (OSError, ValueError) as e:
        reason = describe_os_error(e) if isinstance(e, OSError) else str(e)
        return Outcome("failed", EXIT_FAILED,
                       f"{outcome.message}, but {path} could not be written: {reason}; rerun the same command to write it")
    return outcome


def _summary_not_written(outcome: Outcome, note: str) -> Outcome:
    if outcome.status == "completed":
        return Outcome("failed", EXIT_FAILED,
                       f"{outcome.message} and committed, but {note}; free some space and rerun the same command to write it")
    return Outcome(outcome.status, outcome.exit_code, f"{outcome.message}; also {note}")


def _close_quietly(stream: Any) -> None:
    if stream is not None and hasattr(stream, "close"):
        try:
            stream.close()
        except BaseException:  # noqa: BLE001 - closing a broken generator must not mask the result
            pass


def _chain(first: list[list[RawRow]], rest: Iterator[list[RawRow]]) -> Iterator[list[RawRow]]:
    yield from first
    yield from rest


def _rows(batches: list[list[RawRow]]) -> list[RawRow]:
    return [row for batch in batches for row in batch]

