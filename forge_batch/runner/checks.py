"""Checking a job before it runs: the job file's own checks (``forge_batch.job``) plus those that need the
plugins (registered formats, samplers, constraint kinds, whether the job-wide constraint compiles).

``forge-batch run`` calls :func:`prepare_job` once and hands the :class:`CheckedJob` to the runner, which
then checks nothing again; ``forge-batch validate`` calls :func:`validate_job_file`, which does not import
the job's own plugins (importing runs their code).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pluggy import PluginManager

from forge_batch.engine.sampling_params import BUILTIN_CONSTRAINT_KINDS
from forge_batch.job import (
    JobError,
    JobSpec,
    Problem,
    check_job,
    check_parquet_columns,
    input_files,
    load_job,
)
from forge_batch.plugin_manager import PluginLoadError, collect_registry, find_plugin, get_plugin_manager
from forge_batch.runner.engine_factory import ENGINE_FACTORY_ENV
from forge_batch.runner.inputs import reader_for_file


@dataclass(frozen=True)
class CheckedJob:
    """A job that passed every check, with the plugin manager it was checked against."""

    job: JobSpec
    plugin_manager: PluginManager


def model_is_checked() -> bool:
    """Whether ``model`` must name a model this tool can load: not when a custom engine factory (from the
    environment) decides what the name means."""
    return not os.environ.get(ENGINE_FACTORY_ENV)


def prepare_job(path: str | os.PathLike[str], overrides: Iterable[str] = (), *,
                warnings: list[str] | None = None) -> CheckedJob:
    """Load a job file, load its plugins and check the job: everything ``run`` does before running.

    Raises :class:`JobError` with every problem (a plugin that cannot load is one, at ``plugins[i]``).
    Plugin warnings (installed plugins skipped) are appended to ``warnings``."""
    job = load_job(path, overrides)
    try:
        pm = get_plugin_manager(job.plugins, search_paths=job.plugin_search_paths())
    except PluginLoadError as e:
        raise JobError([
            Problem(f"plugins[{job.plugins.index(n)}]", m) if n in job.plugins else Problem("plugins", f"{n}: {m}")
            for n, m in e.failures
        ], str(path)) from None
    if warnings is not None:
        warnings.extend(getattr(pm, "forge_warnings", []))
    return check_loaded_job(job, pm, check_model=model_is_checked(), source=str(path))


def check_loaded_job(job: JobSpec, pm: PluginManager, *, check_model: bool = True,
                     source: str | None = None) -> CheckedJob:
    """``job`` checked against ``pm``; raises :class:`JobError` with every problem."""
    problems = check_job_with_plugins(job, pm, check_model=check_model)
    if problems:
        raise JobError(problems, source)
    return CheckedJob(job, pm)


def check_job_with_plugins(job: JobSpec, pm: PluginManager, *, check_model: bool = True,
                           unloaded_plugins: Sequence[str] = (), warnings: list[str] | None = None) -> list[Problem]:
    """Every problem that stops ``job`` from running, found without running anything.

    ``unloaded_plugins``: the job's plugins that ``pm`` does not hold (validate does not import them); a name
    no loaded plugin registers may be theirs, so it is a warning (appended to ``warnings``), not a problem."""
    problems = check_job(job, check_model=check_model)
    files = input_files(job.input.path)

    def unknown(path: str, what: str, name: str, known: Iterable[str]) -> None:
        if not unloaded_plugins:
            problems.append(Problem(path, f"unknown {what} {name!r}; known: {', '.join(sorted(known))}"))
        elif warnings is not None:
            warnings.append(
                f"{path}: {what} {name!r} is not registered by a built-in or installed plugin; it may come "
                f"from {', '.join(unloaded_plugins)}, which validate does not import (run will tell)"
            )

    readers = collect_registry(pm, "register_readers")
    writers = collect_registry(pm, "register_writers")
    kinds = collect_registry(pm, "register_constraints")
    # Only when a sampler is named: collecting samplers imports the engine (torch), which validate avoids.
    samplers = collect_registry(pm, "register_samplers") if job.sampling.sampler is not None else {}
    if job.input.format != "auto" and job.input.format not in readers:
        unknown("input.format", "input format", job.input.format, ["auto", *readers])
    elif job.input.format == "auto":
        unreadable = next((f for f in files if reader_for_file(f, readers) is None), None)
        if unreadable is not None:
            problems.append(Problem("input.path", f"cannot tell the format of {unreadable} from its extension; set input.format"))
    if job.output.format not in writers:
        unknown("output.format", "output format", job.output.format, writers)
    for where, kind in _constraint_kinds_named(job):
        if kinds and kind not in kinds:
            unknown(where, "constraint kind", kind, kinds)
    problems.extend(_check_job_constraint(job, kinds))
    if job.sampling.sampler is not None and samplers and job.sampling.sampler not in samplers:
        unknown("sampling.sampler", "sampler", job.sampling.sampler, samplers)
    if job.input.format == "parquet" or (job.input.format == "auto" and files and files[0].endswith(".parquet")):
        problems.extend(check_parquet_columns(job, files))
    return problems


def _constraint_kinds_named(job: JobSpec) -> list[tuple[str, str]]:
    """(where, kind) of every plugin constraint kind the job names."""
    named = [(f"sampling.constraint.{kind}", kind) for kind in job.sampling.constraint or {}]
    for key in (job.constraint.model_extra or {}) if job.constraint is not None else {}:
        named.append((f"constraint.{key}", key[: -len("_field")] if key.endswith("_field") else key))
    return named


def _check_job_constraint(job: JobSpec, kinds: Mapping[str, Any]) -> list[Problem]:
    """The job-wide constraint compiled as the engine will compile it, minus the model: a constraint kind's
    factory may have a ``check(spec)`` that raises what compiling would (the built-ins do)."""
    level = job.job_constraint()
    if level is None:
        return []
    kind, spec = level
    check = getattr(kinds.get(kind), "check", None)
    if check is None:
        return []
    if job.constraint is not None and job.constraint.job_level() is not None:
        where = f"constraint.{kind}"
    else:
        where = f"sampling.{kind}" if kind in BUILTIN_CONSTRAINT_KINDS else f"sampling.constraint.{kind}"
    try:
        check(spec)
    except Exception as e:  # ConstraintError from the built-ins; a plugin's kind may raise anything
        return [Problem(where, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")]
    return []


def validate_job_file(
    path: str | os.PathLike[str],
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    warnings: list[str] | None = None,
) -> tuple[JobSpec | None, list[Problem]]:
    """Everything ``forge-batch validate`` reports: schema problems, then (if it parses) file-system and
    plugin checks. The job's own plugins are found but not imported (importing runs their code): one that
    cannot be found is a problem at ``plugins[i]``. Warnings (installed plugins skipped, names an unloaded
    job plugin may register) are appended to ``warnings``."""
    try:
        job = load_job(path, overrides, env)
    except JobError as e:
        return None, e.problems
    problems: list[Problem] = []
    found = []
    for i, name in enumerate(job.plugins):
        missing = find_plugin(name, job.plugin_search_paths())
        if missing is None:
            found.append(name)
        else:
            problems.append(Problem(f"plugins[{i}]", missing))
    try:
        pm = get_plugin_manager([])  # built-ins and installed plugins
    except PluginLoadError as e:
        problems.extend(Problem("plugins", f"{name}: {msg}") for name, msg in e.failures)
        return job, problems
    if warnings is not None:
        warnings.extend(getattr(pm, "forge_warnings", []))
    problems.extend(check_job_with_plugins(job, pm, check_model=model_is_checked(), unloaded_plugins=found,
                                           warnings=warnings))
    return job, problems
