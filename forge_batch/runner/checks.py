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
from pathlib import Path
from typing import Any

import pyarrow as pa
from pluggy import PluginManager

from forge_batch.engine.sampling_params import BUILTIN_CONSTRAINT_KINDS, SamplingParams
from forge_batch.io import job_identity
from forge_batch.io.base import hidden_from_readers
from forge_batch.io.ledger import PART_RE
from forge_batch.io.output_dir import MANIFEST, state_dir_for
from forge_batch.io.output_stats import read_state_json
from forge_batch.io.safe_fs import OutputDirError, symlink_error
from forge_batch.job import (
    UNCHECKED_OUTPUT,
    InputSpec,
    JobError,
    JobSpec,
    PrintedValueError,
    Problem,
    check_job,
    compile_template,
    input_files,
    load_job,
    load_job_for_checks,
    sampling_problem,
)
from forge_batch.plugin_manager import (
    PluginHookError,
    PluginLoadError,
    collect_registry,
    find_plugin,
    get_plugin_manager,
)
from forge_batch.runner.engine_factory import ENGINE_FACTORY_ENV
from forge_batch.runner.inputs import (
    TYPED_ROWS,
    InputFileError,
    InputPlan,
    count_rows,
    effective_input,
    input_identity,
    reader_for_file,
)
from forge_batch.runner.requests import sampling_with_override


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
    return prepare_loaded_job(load_job(path, overrides), source=str(path), warnings=warnings)


def prepare_loaded_job(
    job: JobSpec,
    *,
    source: str | None = None,
    warnings: list[str] | None = None,
    pm: PluginManager | None = None,
    check_model: bool | None = None,
) -> CheckedJob:
    """:func:`prepare_job` for a job already loaded (``run-batch`` builds one from its arguments).

    ``pm``: plugins already loaded by the caller (the job's are then not loaded again); ``check_model``:
    whether ``model`` must be a model this tool loads (default: :func:`model_is_checked`)."""
    if pm is None:
        try:
            pm = get_plugin_manager(job.plugins, search_paths=job.plugin_search_paths())
        except PluginLoadError as e:
            raise JobError([
                Problem(f"plugins[{job.plugins.index(n)}]", m) if n in job.plugins else Problem("plugins", f"{n}: {m}")
                for n, m in e.failures
            ], source) from None
    if warnings is not None:
        warnings.extend(getattr(pm, "forge_warnings", []))
    check_model = model_is_checked() if check_model is None else check_model
    return check_loaded_job(job, pm, check_model=check_model, source=source)


def check_loaded_job(job: JobSpec, pm: PluginManager, *, check_model: bool = True,
                     source: str | None = None) -> CheckedJob:
    """``job`` checked against ``pm``; raises :class:`JobError` with every problem."""
    problems = check_job_with_plugins(job, pm, check_model=check_model)
    if problems:
        raise JobError(problems, source)
    return CheckedJob(job, pm)


def _state_folder_problem(out: Path) -> str | None:
    """Why run would refuse the output's state folder (see forge_batch.io.output_dir): a symlink, or not a folder."""
    try:
        state = state_dir_for(out)
    except OutputDirError as e:
        return str(e)
    if state.is_symlink():
        return str(symlink_error(state))
    if state.exists() and not state.is_dir():
        return f"{state} (the run's state folder) is not a directory"
    return None


def _other_files_problem(out: Path) -> str | None:
    """Why an output folder would not read back as its rows: entries that are not its part files. Readers of
    a folder (pyarrow, pandas, polars, DuckDB) take every file and subfolder in it for data, skipping only
    names that start with '.' or '_'."""
    try:
        names = sorted(entry.name for entry in os.scandir(out))
    except OSError:  # not there yet (made by the run), or not a folder (check_job says so)
        return None
    others = [name for name in names if not hidden_from_readers(name) and not PART_RE.match(name)]
    if not others:
        return None
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (f"{out} holds files that are not its parts ({shown}): readers of the folder (pyarrow, pandas, DuckDB) "
            "would take them for data; give the output a folder of its own, or move them out")


def check_job_with_plugins(job: JobSpec, pm: PluginManager, *, check_model: bool = True,
                           unloaded_plugins: Sequence[str] = (), warnings: list[str] | None = None,
                           facts: dict[str, Any] | None = None) -> list[Problem]:
    """Every problem that stops ``job`` from running, found without running anything.

    ``unloaded_plugins``: the job's plugins that ``pm`` does not hold (validate does not import them); a name
    no loaded plugin registers may be theirs, so it is a warning (appended to ``warnings``), not a problem.
    ``facts`` receives what reading the input's first rows found (see :func:`_check_input_rows`)."""
    problems = check_job(job, check_model=check_model)
    out = Path(job.output.path)
    # (a plugin's writer may keep files of its own beside its parts: the folder is its format's to define)
    builtin_folder = not job.output.single_file() and job.output.format in ("parquet", "jsonl", "openai-batch")
    out_problem = _state_folder_problem(out) or (_other_files_problem(out) if builtin_folder else None)
    if out_problem is not None and not any(p.path == "output.path" for p in problems):
        problems.append(Problem("output.path", out_problem))
    try:
        files = input_files(job.input.path)
    except OSError:  # reported by check_job
        files = []

    def unknown(path: str, what: str, name: str, known: Iterable[str]) -> None:
        if not unloaded_plugins:
            problems.append(Problem(path, f"unknown {what} {name!r}; known: {', '.join(sorted(known))}"))
        elif warnings is not None:
            warnings.append(
                f"{path}: {what} {name!r} is not registered by a built-in or installed plugin; it may come "
                f"from {', '.join(unloaded_plugins)}, which validate does not import (run will tell)"
            )

    try:
        readers = collect_registry(pm, "register_readers")
        writers = collect_registry(pm, "register_writers")
        kinds = collect_registry(pm, "register_constraints")
        # Only when a sampler is named: collecting samplers imports the engine (torch), which validate avoids.
        samplers = collect_registry(pm, "register_samplers") if job.sampling.sampler is not None else {}
    except PluginHookError as e:  # the job's own plugin (an installed one is left out, see collect_registry)
        problems.append(Problem("plugins", str(e)))
        return problems
    unreadable = None  # an input file no reader known here reads
    if job.input.format != "auto" and job.input.format not in readers:
        unknown("input.format", "input format", job.input.format, ["auto", *readers])
    elif job.input.format == "auto":
        unreadable = next((f for f in files if reader_for_file(f, readers) is None), None)
        if unreadable is not None and not unloaded_plugins:
            problems.append(Problem("input.path", f"cannot tell the format of {unreadable} from its extension; set input.format"))
        elif unreadable is not None and warnings is not None:
            warnings.append(f"input.path: no built-in or installed reader knows {unreadable}; one of "
                            f"{', '.join(unloaded_plugins)}, which validate does not import, may (run will tell)")
    if job.output.format not in writers:
        unknown("output.format", "output format", job.output.format, writers)
    for where, kind in _constraint_kinds_named(job):
        if kinds and kind not in kinds:
            unknown(where, "constraint kind", kind, kinds)
    constraint_problems = _check_job_constraint(job, kinds)
    if constraint_problems:  # SamplingParams may have refused the same constraint first, less precisely
        sampling = sampling_problem(job, with_constraint=False)
        problems[:] = [p for p in problems if p.path != "sampling"] + ([sampling] if sampling is not None else [])
    problems.extend(constraint_problems)
    if job.sampling.sampler is not None and samplers and job.sampling.sampler not in samplers:
        unknown("sampling.sampler", "sampler", job.sampling.sampler, samplers)
    readable = unreadable is None and (job.input.format == "auto" or job.input.format in readers)
    if files and readable and not any(p.path == "input.path" for p in problems):
        problems.extend(_check_input_rows(job, files, readers, facts))
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


# Rows validate reads to check fields and the template, and to estimate prompt tokens: those that type the output.
SAMPLE_ROWS = TYPED_ROWS


def _prompt_chars(row: dict[str, Any], spec: InputSpec, template: Any) -> int:
    if template is not None:
        return len(template.render({**row, "row": row}))
    messages = row.get(spec.messages_field)
    if messages is not None:
        if isinstance(messages, str):
            return len(messages)
        total = 0
        for m in messages if isinstance(messages, list) else []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
        return total
    prompt = row.get(spec.prompt_field)
    return len(str(prompt)) if prompt is not None else 0


def _read_sample(reader: Any, path: str, spec: InputSpec) -> tuple[Any, list[dict[str, Any]], str | None]:
    """(schema or None, the first readable rows up to SAMPLE_ROWS, the first unreadable row's error)."""
    schema = reader.schema(path)
    sample: list[dict[str, Any]] = []
    first_error: str | None = None
    read_spec = spec.model_copy(update={"batch_size": min(spec.batch_size, SAMPLE_ROWS)})
    batches = reader.read(path, read_spec)
    try:
        for batch in batches:
            for raw in batch:
                if raw.data is not None and raw.error is None:
                    sample.append(raw.data)
                elif first_error is None:
                    first_error = raw.error
            if len(sample) >= SAMPLE_ROWS:
                break
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    return schema, sample, first_error


def _prompt_not_text(field: str, schema: Any, sample: list[dict[str, Any]], where: str) -> str | None:
    """Why every row's prompt would be a bad_prompt: a Parquet column that is not text, or first rows whose
    prompts are all something else (numbers); None otherwise (single odd rows are their own errors)."""
    if schema is not None:
        kind = schema.field(field).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            return (f"{field!r} is a column of {kind} in {where}, not text (render it with input.template, e.g. "
                    "'{{ " + field + " }}'): every row would be a bad_prompt")
        return None
    given = [row[field] for row in sample if row.get(field) is not None]
    if given and not any(isinstance(v, str) for v in given):
        return (f"{field!r} is not text in any of the first {len(sample)} rows of {where} (e.g. {given[0]!r}; "
                "render it with input.template): every row would be a bad_prompt")
    return None


def _render_some_row(template: Any, sample: list[dict[str, Any]]) -> None:
    """Render the template on the first row, or on the first of the others, when a value it prints is null
    there (a row's own problem): raises what the first row raised when none renders."""
    try:
        template.render({**sample[0], "row": sample[0]})
    except PrintedValueError:
        for row in sample[1:]:
            try:
                template.render({**row, "row": row})
                return
            except PrintedValueError:
                continue
        raise


def _first_rows(job: JobSpec, files: list[str], readers: Mapping[str, Any]
                ) -> tuple[str, str, InputSpec, Any, list[dict[str, Any]]] | list[Problem]:
    """(file, its format, its input options, its schema or None, its first rows) of the first file with a row (an empty
    shard of a folder holds none to check), or the problems that say why there is none."""
    for where in files:
        fmt = reader_for_file(where, readers, job.input.format)
        if fmt is None:
            return []  # an unknown format is reported (or warned about) by check_job
        reader = readers[fmt]
        spec = effective_input(job.input, reader)
        try:
            schema, sample, first_error = _read_sample(reader, where, spec)
        except Exception as e:  # a reader that cannot open the file: run would stop on it too
            return [Problem("input.path", f"cannot read {where}: {type(e).__name__}: {e}")]
        if sample:
            return where, fmt, spec, schema, sample
        if first_error is not None:
            break
    return [Problem("input.path", f"no readable row at the start of {where}" + (f": {first_error}" if first_error else ""))]


def _bad_overrides(job: JobSpec, spec: InputSpec, sample: list[dict[str, Any]], where: str) -> str | None:
    """What run would say of the first rows' sampling overrides it refuses (each such row is a bad_sampling
    row, not a job problem), or None: how many, and the first one's reason."""
    base = job.sampling_dict()
    bad: list[tuple[Any, str]] = []
    for i, row in enumerate(sample):
        value = row.get(spec.sampling_field)
        if value is None:
            continue
        try:
            SamplingParams(**sampling_with_override(base, value)[0])
        except (TypeError, ValueError) as e:
            bad.append((row.get(spec.id_field) if spec.id_field is not None else f"#{i + 1}", str(e)))
    if not bad:
        return None
    first_id, reason = bad[0]
    return (f"{len(bad)} of the first {len(sample)} rows of {where} have sampling overrides run refuses (each a "
            f"bad_sampling row), e.g. row {first_id!r}: {reason}")


def _id_column_problem(field: str, kind: Any, where: str) -> str:
    # every row would be a bad_id (3.0 and "3" must not collide); pandas makes integers with nulls float64
    return (f"{field!r} is a column of {kind} in {where}: ids must be text or integers (a pandas column of integers "
            "with nulls is float64: write it as Int64, or cast it)")


def _check_input_rows(job: JobSpec, files: list[str], readers: Mapping[str, Any], facts: dict[str, Any] | None) -> list[Problem]:
    """What ``run`` would hit on the first rows: the id, prompt, kept and sampling fields missing (from the
    Parquet schema, or from every one of the first SAMPLE_ROWS JSON rows), the template failing on the first
    row. Fills ``facts`` with the row count (when cheap) and a prompt-token estimate (chars / 4)."""
    first = _first_rows(job, files, readers)
    if isinstance(first, list):
        return first
    where, fmt, spec, schema, sample = first
    if schema is not None:
        names = set(schema.names)
        listed = f"{where} (columns: {', '.join(sorted(names))})"
        lacks, neither_in = f"is not a column of {listed}", f"is a column of {listed}"
    else:
        names = set().union(*(row.keys() for row in sample))
        listed = f"the first {len(sample)} rows of {where} (fields: {', '.join(sorted(map(str, names)))})"
        lacks, neither_in = f"is in none of {listed}", f"is in any of {listed}"
    problems: list[Problem] = []
    if spec.id_field is not None and spec.id_field not in names:
        problems.append(Problem("input.id_field", f"{spec.id_field!r} {lacks}; name the id field, or id_field: null for row positions"))
    elif spec.id_field is not None and schema is not None:
        kind = schema.field(spec.id_field).type
        kind = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            problems.append(Problem("input.id_field", _id_column_problem(spec.id_field, kind, where)))
    for i, name in enumerate(job.output.keep_fields):
        if name not in names:
            problems.append(Problem(f"output.keep_fields[{i}]", f"{name!r} {lacks}"))
    if spec.sampling_field is not None and spec.sampling_field not in names:
        problems.append(Problem("input.sampling_field", f"{spec.sampling_field!r} {lacks}"))
    row_constraint = job.constraint.row_field() if job.constraint is not None else None
    if row_constraint is not None and row_constraint[1] not in names:  # else every row would run unconstrained
        problems.append(Problem(f"constraint.{row_constraint[0]}_field", f"{row_constraint[1]!r} {lacks}"))
    template = None
    if spec.template is not None:
        try:
            template = compile_template(spec.template)
            _render_some_row(template, sample)
        except Exception as e:  # a syntax error is reported by check_job already
            if template is not None:
                fields = ", ".join(sorted(map(str, sample[0])))
                problems.append(Problem("input.template", f"does not render on the first row of {where}: {type(e).__name__}: {e} (fields: {fields})"))
            template = None
    elif spec.prompt_field not in names and spec.messages_field not in names:
        problems.append(Problem(
            "input.prompt_field",
            f"neither {spec.prompt_field!r} nor {spec.messages_field!r} {neither_in}; "
            "set input.prompt_field, input.messages_field or input.template",
        ))
    elif spec.prompt_field in names and spec.messages_field not in names and facts is not None:
        # run writes each such row as a bad_prompt (so does a JSONL number among text); validate says it first
        facts["prompt_not_text"] = _prompt_not_text(spec.prompt_field, schema, sample, where)
    if facts is not None and spec.sampling_field is not None and spec.sampling_field in names:
        facts["bad_overrides"] = _bad_overrides(job, spec, sample, where)
    if facts is not None:
        chars = []
        for row in sample:
            try:
                chars.append(_prompt_chars(row, spec, template))
            except Exception:  # a row the template fails on: it becomes an error row, no prompt
                pass
        facts["reader"] = fmt
        facts["sampled_rows"] = len(sample)
        facts["prompt_chars_per_row"] = sum(chars) / len(chars) if chars else 0.0
        try:
            plan = InputPlan.for_job(job, readers)
            facts["rows"] = count_rows(plan.files, plan.spec)  # the run's own count: each file by its reader
        except InputFileError as e:  # a file past the first that its reader cannot read: the run would stop there
            problems.append(Problem("input.path", str(e)))
            facts["rows"] = None
        except Exception:  # counting is a courtesy; the checks above are what matter
            facts["rows"] = None
    return problems


def _resume_refusal(job: JobSpec) -> str | None:
    """What run would say, resuming into the output's committed rows, if they came from a job with other
    options or from another input (run refuses them unless --overwrite / --force-resume); None when it
    would resume, or starts afresh. A warning: the flags run is given decide."""
    out = Path(job.output.path)
    try:
        manifest = read_state_json(state_dir_for(out) / MANIFEST) or {}
    except Exception:  # a damaged manifest: run says so
        return None
    if not manifest.get("parts"):
        return None
    try:
        job_identity.refuse_other_job(out, manifest, job.fingerprint(), job.model_dump(mode="json"), job.output.format)
        job_identity.check_identity(out, manifest, True, "input", input_identity(input_files(job.input.path)),
                                    compare=("digest",))
    except (OutputDirError, OSError) as e:
        return f"{e} (run would refuse to resume)"
    return None


def _small_cache_problem(job: JobSpec, facts: dict[str, Any]) -> str | None:
    """Why an ``engine.num_blocks`` KV cache would fail most rows: it holds fewer tokens than a row's prompt
    (estimated from the first rows; the engine lowers max_model_len to the cache, so they are prompt_too_long)."""
    e = job.engine
    chars = facts.get("prompt_chars_per_row")
    if e.num_blocks is None or not chars:
        return None
    block = e.block_size or 16  # the engine's default
    tokens = e.num_blocks * block
    if tokens > chars / 4:
        return None
    return (f"the KV cache holds {tokens} tokens ({e.num_blocks} blocks of {block}), no more than a "
            f"prompt of the first rows (about {chars / 4:.0f} tokens): most rows would be prompt_too_long")


def validate_job_file(
    path: str | os.PathLike[str],
    overrides: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    warnings: list[str] | None = None,
    facts: dict[str, Any] | None = None,
) -> tuple[JobSpec | None, list[Problem]]:
    """Everything ``forge-batch validate`` reports: schema problems, then (if it parses) file-system and
    plugin checks. The job's own plugins are found but not imported (importing runs their code): one that
    cannot be found is a problem at ``plugins[i]``. Warnings (installed plugins skipped, names an unloaded
    job plugin may register) are appended to ``warnings``; what reading the input found goes to ``facts``."""
    job, problems = load_job_for_checks(path, overrides, env)
    if job is None:
        return None, problems
    parsed = not problems  # else the rest is checked as if the keys at fault were not given
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
        return (job if parsed else None), problems
    if warnings is not None:
        warnings.extend(getattr(pm, "forge_warnings", []))
    facts = {} if facts is None else facts
    stand_in = Path(job.output.path).name == UNCHECKED_OUTPUT  # the output.path given was refused already
    problems.extend(p for p in check_job_with_plugins(job, pm, check_model=model_is_checked(), unloaded_plugins=found,
                                                      warnings=warnings, facts=facts)
                    if not (stand_in and p.path == "output.path"))
    resume = _resume_refusal(job) if parsed and not problems else None
    if resume is not None and warnings is not None:
        warnings.append(f"output.path: {resume}")
    cache_problem = _small_cache_problem(job, facts)
    if cache_problem is not None and warnings is not None:
        warnings.append(f"engine.num_blocks: {cache_problem}")
    if facts.get("bad_overrides") and warnings is not None:
        warnings.append(f"input.sampling_field: {facts['bad_overrides']}")
    if facts.get("prompt_not_text") and job.max_error_rate < 1 and warnings is not None:
        # a warning, not a problem: run does not refuse it, it writes each such row as a bad_prompt
        warnings.append(f"input.prompt_field: {facts['prompt_not_text']}, more than max_error_rate "
                        f"{job.max_error_rate:g} allows, so the run will fail")
    return (job if parsed else None), problems
