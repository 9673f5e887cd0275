"""The job runner: reader -> prepare hooks -> engine -> result hooks -> writer, resumable and bounded.

Rows are read lazily in batches and turned into requests one at a time as the engine asks for them
(``generate_stream`` keeps at most ``engine.max_in_flight`` unfinished), results are written as they finish,
and a part file is committed every ``output.rows_per_file`` rows or ``output.flush_seconds`` seconds. So a
job over millions of rows runs in bounded memory and an interruption costs at most one part's work.

Nothing lost, nothing twice:

* every committed sample is in the run's ledger (``ledger/`` in the output's state folder); a rerun skips committed ids and
  only generates the rest;
* every row's seed derives from the job seed and the row id (:func:`row_seed`), so a resumed run writes
  what an uninterrupted one would;
* a bad row (malformed JSON, missing or empty prompt, duplicate id, prompt longer than the context, template
  error, a plugin that raised) is written with an ``error`` naming the problem, never skipped, never fatal;
  ``max_error_rate`` turns a flood of them into a failed run.

Ctrl-C / SIGTERM stop admitting rows and let in-flight ones finish (a second signal, or ``grace_seconds``
later, drops them), commit what is done and exit non-zero saying how to resume.

The parts, each usable without a model (a second executor reuses them):

* ``checks``: the job checked once against its plugins (:func:`prepare_job` -> :class:`CheckedJob`);
* ``inputs``: the reader of each file, the effective input options, batches, row count, output schema;
* ``requests``: rows -> engine requests (ids, resume, duplicates, overrides, seeds, prepare hooks, tokens);
* ``records``: engine results -> output records (error kinds, result hooks, ledger entries);
* ``commit``: the buffer, part commits and the error budget;
* ``signals``: Ctrl-C / SIGTERM and the grace period;
* ``summary``: the outcome, ``summary.json`` and the printed summary;
* ``engine_factory``: which engine runs the job;
* ``job_runner``: :class:`JobRunner`, which calls them in order (the local executor);
* ``ray_executor``: the same parts with the rows run on a Ray Data actor pool (``executor: {kind: ray}``).
"""

from typing import Any

from forge_batch.job import JobSpec
from forge_batch.runner.checks import CheckedJob, check_job_with_plugins, prepare_job, validate_job_file
from forge_batch.runner.commit import EARLY_ABORT_MIN_FAILURES
from forge_batch.runner.engine_factory import (
    ENGINE_FACTORY_ENV,
    ENGINE_IDENTITY,
    default_engine_factory,
    load_engine_factory,
)
from forge_batch.runner.inputs import input_identity
from forge_batch.runner.job_runner import JobRunner, RunInterrupted, RunResult
from forge_batch.runner.requests import row_seed
from forge_batch.runner.summary import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, format_summary


def runner_for(job: JobSpec | CheckedJob, **kwargs: Any) -> JobRunner:
    """The runner of the job's ``executor``: :class:`JobRunner` (``local``) or the Ray executor's (``ray``),
    with :class:`JobRunner`'s arguments."""
    spec = job.job if isinstance(job, CheckedJob) else job
    if spec.executor.kind == "ray":
        from forge_batch.runner.ray_executor import RayJobRunner

        return RayJobRunner(job, **kwargs)
    return JobRunner(job, **kwargs)


__all__ = [
    "EARLY_ABORT_MIN_FAILURES",
    "ENGINE_FACTORY_ENV",
    "ENGINE_IDENTITY",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "CheckedJob",
    "JobRunner",
    "RunInterrupted",
    "RunResult",
    "check_job_with_plugins",
    "default_engine_factory",
    "format_summary",
    "input_identity",
    "load_engine_factory",
    "prepare_job",
    "row_seed",
    "runner_for",
    "validate_job_file",
]
