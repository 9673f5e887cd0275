"""``forge-batch``: run, validate and inspect batch jobs; list plugins.

    forge-batch run jobs/quickstart.yaml [--set sampling.temperature=0] [--quiet] [--overwrite]
    forge-batch run-batch -i batch.jsonl -o results.jsonl --model M   # an OpenAI batch file, no job file
    forge-batch validate jobs/quickstart.yaml      # every problem at once; runs nothing
    forge-batch inspect out/quickstart             # summary of a run from its output files
    forge-batch report out/quickstart [--html r.html]   # one self-contained HTML page with charts
    forge-batch plugins [--job job.yaml] [--json]  # every plugin, where it came from, its hooks

Exit codes: 0 done, 1 the run failed (too many bad rows, engine error, disk full; for ``inspect``: a damaged
file), 2 the job or command is invalid (or the output directory is unusable: another job's, locked, read-only,
holding a symlink), 130 / 143 interrupted by Ctrl-C / SIGTERM (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from forge_batch.io.base import DamagedOutputError
from forge_batch.job import JobError, Problem

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


log = logging.getLogger("forge_batch.cli")  # also when run as python -m forge_batch.cli (__main__)
# Set by main() for --log-format json: what the command says on stderr goes out as log events (one JSON
# object a line) instead of plain lines, so a scheduler's log parser sees nothing else.
_LOG_EVENTS = False


def _err(msg: str, level: int = logging.ERROR) -> None:
    if _LOG_EVENTS:
        log.log(level, msg.removeprefix("forge-batch: "))
    else:
        print(msg, file=sys.stderr, flush=True)


def _print_problems(source: str, problems: list[Problem]) -> None:
    if _LOG_EVENTS:  # one event a problem, its key path and message as fields a log pipeline can match
        for p in problems:
            log.error("%s: %s", source, p, extra={"fields": {"source": source, "path": p.path, "message": p.message}})
        return
    _err(f"{source}: {len(problems)} problem(s):")
    for p in problems:
        # a multi-line message (a regex error with its caret) stays under its item
        _err("  - " + str(p).replace("\n", "\n    "))


def _print_warnings(warnings: list[str]) -> None:
    for w in warnings:
        _err(f"forge-batch: warning: {w}", logging.WARNING)


class _Terminated(BaseException):
    """SIGTERM before the runner installed its own handlers (while importing, reading the job)."""


# The run's exit code once its outcome is final (summary written): a SIGTERM after that, while the result is
# printed or the process winds down (threads, torch), exits with it at once rather than as killed (143),
# which a scheduler would read as a run that did not finish.
_final_exit_code: int | None = None


def _raise_terminated(signum: int, frame: Any) -> None:
    if _final_exit_code is not None:
        _exit_now(_final_exit_code)
    raise _Terminated()


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


def cmd_run(args: argparse.Namespace) -> int:
    return _until_the_runner_takes_over(_cmd_run, args)


def cmd_run_batch(args: argparse.Namespace) -> int:
    return _until_the_runner_takes_over(_cmd_run_batch, args)


def _until_the_runner_takes_over(command: Any, args: argparse.Namespace) -> int:
    # Until the runner takes over signals, SIGTERM would kill the process without a word: say what happened.
    global _final_exit_code
    _final_exit_code = None
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _final_exit_code = command(args)
    except (_Terminated, KeyboardInterrupt) as e:
        name, _final_exit_code = ("SIGTERM", 143) if isinstance(e, _Terminated) else ("SIGINT", 130)
        _err(f"forge-batch: interrupted by {name} before the run started; nothing was committed this run; "
             "rerun the same command to resume")
    finally:
        signal.signal(signal.SIGTERM, previous)
    code, _final_exit_code = _final_exit_code, None
    return code


def _cmd_run(args: argparse.Namespace) -> int:
    from forge_batch.job import load_job
    from forge_batch.runner.checks import validate_job_file

    def load(overrides: list[str]) -> Any:
        try:
            return load_job(args.job, overrides)
        except JobError as e:  # every problem at once, as validate reports them, not only the options'
            problems = validate_job_file(args.job, overrides)[1]
            raise JobError(problems or e.problems, source=e.source) from None

    return _load_and_run(args, args.job, load)


def _cmd_run_batch(args: argparse.Namespace) -> int:
    """``forge-batch run-batch -i in.jsonl -o out.jsonl --model M``: an OpenAI batch file in, its results out,
    as ``vllm run-batch`` does (paths relative to the current folder). A failed request is a result line
    with its error, not a failed run, unless ``--set max_error_rate=...`` says otherwise."""
    from forge_batch.job import job_from_dict

    data: dict[str, Any] = {
        "input": {"path": args.input_file, "format": "openai-batch"},
        "output": {"path": args.output_file, "format": "openai-batch"},
        "max_error_rate": 1.0,
    }
    if args.model is not None:
        data["model"] = args.model
    source = f"run-batch -i {args.input_file}"
    return _load_and_run(args, source, lambda overrides: job_from_dict(data, base_dir=Path.cwd(), overrides=overrides, source=source))


def _load_and_run(args: argparse.Namespace, source: str, load: Any) -> int:
    from forge_batch.io.safe_fs import OutputDirError
    from forge_batch.runner import RunInterrupted, format_summary, runner_for
    from forge_batch.runner.checks import prepare_loaded_job

    overrides = list(args.set or [])
    if args.limit is not None:
        overrides.append(f"input.limit={args.limit}")
    warnings: list[str] = []
    try:
        checked = prepare_loaded_job(load(overrides), source=source, warnings=warnings)
    except JobError as e:
        _print_warnings(warnings)
        _print_problems(e.source or source, e.problems)
        return EXIT_USAGE
    _print_warnings(warnings)
    try:
        runner = runner_for(
            checked, progress="none" if args.quiet else args.progress, quiet=args.quiet, overwrite=args.overwrite,
            force_resume=args.force_resume, grace_seconds=args.grace, log_interval=args.log_interval,
            log_events=_LOG_EVENTS,
        )
    except ValueError as e:  # FORGE_BATCH_ENGINE_FACTORY naming nothing usable
        _err(f"forge-batch: {e}")
        return EXIT_USAGE
    try:
        result = runner.run()
        global _final_exit_code
        _final_exit_code = result.exit_code
    except OutputDirError as e:
        _err(f"forge-batch: {e}")
        return EXIT_USAGE
    except JobError as e:
        _print_problems(e.source or source, e.problems)
        return EXIT_USAGE
    except RunInterrupted as e:
        if _LOG_EVENTS:  # the record a log pipeline matches, as for a run that generated
            log.error("run interrupted: %s", e, extra={"fields": {"summary": e.summary}})
        else:
            _err(f"forge-batch: {e}")
        return e.exit_code
    except Exception as e:
        _err(f"forge-batch: {type(e).__name__}: {e}")
        return EXIT_FAILED
    if _LOG_EVENTS:
        level = logging.INFO if result.status == "completed" else logging.ERROR
        log.log(level, "run %s: %s", result.status, result.message,
                extra={"fields": {"summary_path": str(result.summary_path) if result.summary_path else None,
                                  "summary": result.summary}})
        return result.exit_code
    if not args.quiet:
        print(format_summary(result.summary), flush=True)
        if result.summary_path is not None:
            print(f"  summary:    {result.summary_path}", flush=True)
    if result.status != "completed":
        _err(f"forge-batch: {result.message}")
    return result.exit_code


def cmd_validate(args: argparse.Namespace) -> int:
    from forge_batch.runner.checks import validate_job_file

    warnings: list[str] = []
    facts: dict[str, Any] = {}
    job, problems = validate_job_file(args.job, list(args.set or []), warnings=warnings, facts=facts)
    _print_warnings(warnings)
    if problems:
        _print_problems(args.job, problems)
        return EXIT_USAGE
    assert job is not None
    print(f"{args.job}: OK (model {job.model_ref()}, input {job.input.path}, output {job.output.path} as {job.output.format})")
    for line in _validate_facts(job, facts):
        print(f"  {line}")
    return EXIT_OK


def _validate_facts(job: Any, facts: dict[str, Any]) -> list[str]:
    """What validate learned from the input's first rows: rows, a prompt-token estimate, where output goes."""
    from forge_batch.io.output_dir import state_dir_for

    lines = []
    rows = facts.get("rows")
    sampled = facts.get("sampled_rows")
    if sampled:
        lines.append(f"rows:          {rows:,}" if rows is not None else "rows:          not counted (a large or remote line-based input)")
        per_row = facts.get("prompt_chars_per_row") or 0.0
        # a token is about 4 characters of English text; the chat template and special tokens come on top
        estimate = f"about {per_row / 4 * rows:,.0f} ({per_row / 4:,.0f} a row)" if rows else f"about {per_row / 4:,.0f} a row"
        lines.append(f"prompt tokens: {estimate}, estimated as characters / 4 over the first {sampled:,} rows, chat template not counted")
    n = job.sampling.n
    lines.append(f"samples:       {n} per row; at most {job.sampling.max_tokens:,} completion tokens each")
    state = state_dir_for(job.output.path)
    if job.output.single_file():
        lines.append(f"output:        {job.output.path} (one {job.output.format} file, written when every row is done; parts and state in {state})")
    else:
        lines.append(f"output:        {job.output.path} ({job.output.format} parts; state in {state})")
    return lines


def _read_parquet_file(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DamagedOutputError(f"{path} is corrupt or truncated, not a readable Parquet file ({e})") from e


def inspect_output(path: str | Path) -> dict[str, Any]:
    """Summarise a run's output directory from its files (Parquet parts when there are, else the ledger).

    Raises DamagedOutputError naming the first file that cannot be read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from forge_batch.io.meta import META_JOB, META_VERSION
    from forge_batch.io.output_dir import LEDGER_DIR, MANIFEST, SUMMARY, parts_dir_for
    from forge_batch.io.output_stats import locate_output, read_state_json, run_status

    out, state = locate_output(path)
    info: dict[str, Any] = {"output": str(out)}
    saved = read_state_json(state / SUMMARY)
    manifest = read_state_json(state / MANIFEST) or {}
    # no summary yet, or parts committed after it: a run goes on (or was killed); the summary is an earlier run's
    info["status"], notes = run_status(saved, manifest, [])
    if saved is not None:
        info["message"] = "; ".join(notes) if notes else saved.get("message")
        info["wall_time_s"] = saved.get("wall_time_s")
        info["throughput"] = saved.get("throughput")
        for key in ("latency", "kv_cache", "preemptions", "prefix_cache"):  # the last run's (see summary.json)
            if saved.get(key) is not None:
                info[key] = saved[key]
    parts_dir = parts_dir_for(out)
    parts = sorted(parts_dir.glob("part-*.parquet"))
    info["parts"] = len(sorted(p for p in parts_dir.glob("part-*") if p.is_file()))
    if parts:
        # part by part (not one dataset) so that a damaged file is named
        tables = [_read_parquet_file(p) for p in parts]
        meta = tables[0].schema.metadata or {}
        table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
        if META_JOB.encode() in meta:
            job = json.loads(meta[META_JOB.encode()])
            info["model"] = job.get("model")
            info["job"] = job.get("name") or Path(job.get("output", {}).get("path", str(out))).name
        info["tool_version"] = meta.get(META_VERSION.encode(), b"").decode() or None
        samples = table.num_rows
        errors = table.column("error")
        failed_mask = pc.is_valid(errors)
        rows_all = table.column("row_index")
        info["samples"] = samples
        info["rows"] = len(pc.unique(rows_all))
        failed_rows = pc.unique(pc.filter(rows_all, failed_mask))
        row_kind: dict[int, tuple[int, str]] = {}  # a row's kind: its first failed sample's, as the run counts it
        for r, s, k in zip(rows_all.to_pylist(), table.column("sample_index").to_pylist(),
                           table.column("error_kind").to_pylist()):
            if k and (r not in row_kind or s < row_kind[r][0]):
                row_kind[r] = (s, k)
        kinds = Counter(k for _, k in row_kind.values())
        info["rows_skipped"] = kinds.pop("skipped", 0)
        info["rows_failed"] = len(failed_rows) - info["rows_skipped"]
        info["rows_ok"] = info["rows"] - len(failed_rows)
        info["failed_by_kind"] = dict(sorted(kinds.items()))
        info["finish_reasons"] = dict(Counter(table.column("finish_reason").to_pylist()).most_common())
        info["prompt_tokens"] = int(pc.sum(pc.filter(table.column("prompt_tokens"), pc.equal(table.column("sample_index"), 0))).as_py() or 0)
        info["completion_tokens"] = int(pc.sum(table.column("completion_tokens")).as_py() or 0)
        lat = table.filter(pc.invert(failed_mask)).column("latency_s").drop_null()  # the rows that generated
        if len(lat):
            q = pc.quantile(lat, q=[0.5, 0.95]).to_pylist()
            info["latency_s"] = {"p50": round(q[0], 4), "p95": round(q[1], 4)}
        ok = table.filter(pc.invert(failed_mask)).slice(0, 3)
        info["examples"] = [t[:200] for t in ok.column("text").to_pylist()]
    else:
        from forge_batch.io.ledger import Tally

        ledgers = sorted((state / LEDGER_DIR).glob("part-*.parquet"))
        tally = Tally()
        for ledger in ledgers:
            tally.add_ledger(_read_parquet_file(ledger).to_pylist())
        info.update(tally.to_dict())
        job = manifest.get("job") or {}  # the parts carry no metadata here
        if job.get("model"):
            info["model"] = job["model"]
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_output(args.output)
    except FileNotFoundError as e:
        _err(f"forge-batch: {e}")
        return EXIT_USAGE
    except DamagedOutputError as e:
        _err(f"forge-batch: {e}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    kinds = info.get("failed_by_kind") or {}
    kind_text = f" ({', '.join(f'{k} {v}' for k, v in kinds.items())})" if kinds else ""
    print(f"{info['output']}: {info.get('status') or 'unknown status'}" + (f", model {info['model']}" if info.get("model") else ""))
    print(
        f"  rows:     {info.get('rows', 0):,} ({info.get('rows_ok', 0):,} ok, {info.get('rows_failed', 0):,} failed{kind_text}, "
        f"{info.get('rows_skipped', 0):,} skipped) in {info.get('parts', 0)} part file(s)"
    )
    if "samples" in info:  # a JSONL or openai-batch output is summed from the ledger, which has no finish reasons
        finish = info.get("finish_reasons")
        print(f"  samples:  {info['samples']:,}" + (f"; finish reasons {finish}" if finish else ""))
    print(f"  tokens:   {info.get('prompt_tokens', 0):,} prompt, {info.get('completion_tokens', 0):,} completion")
    if info.get("latency_s"):
        print(f"  latency:  p50 {info['latency_s']['p50']} s, p95 {info['latency_s']['p95']} s")
    if info.get("throughput"):
        tp = info["throughput"]
        print(f"  last run: {tp.get('rows_per_s', 0):,.2f} rows/s, {tp.get('output_tokens_per_s', 0):,.1f} output tok/s, wall {info.get('wall_time_s')} s")
    for line in _last_run_figures(info):
        print(f"  {line}")
    for text in info.get("examples") or []:
        print(f"  example:  {text!r}")
    return EXIT_OK


def _quantiles(d: dict[str, Any] | None) -> str | None:
    if not d or not d.get("count"):
        return None
    return f"p50 {d['p50']:.4g} / p90 {d['p90']:.4g} / p99 {d['p99']:.4g} s"


def _last_run_figures(info: dict[str, Any]) -> list[str]:
    """The last run's latency quantiles and engine figures from summary.json, one line each."""
    lines = []
    latency = info.get("latency") or {}
    for key, name in (("ttft_s", "ttft:     "), ("itl_s", "itl:      ")):
        text = _quantiles(latency.get(key))
        if text:
            lines.append(f"{name}{text} (last run)")
    kv, prefix = info.get("kv_cache"), info.get("prefix_cache")
    engine = []
    if kv and kv.get("peak_blocks") is not None:
        engine.append(f"KV peak {kv['peak_blocks']:,}/{kv['blocks_total']:,} blocks ({100 * (kv.get('peak_ratio') or 0):.0f}%)")
    if info.get("preemptions") is not None:
        engine.append(f"{info['preemptions']:,} preemptions")
    if prefix and prefix.get("queries"):
        engine.append(f"prefix cache {100 * (prefix.get('hit_rate') or 0):.0f}% of {prefix['queries']:,} blocks")
    if engine:
        lines.append(f"engine:   {', '.join(engine)} (last run)")
    return lines


def cmd_report(args: argparse.Namespace) -> int:
    from forge_batch.io.output_stats import UnreadableFormatError
    from forge_batch.report import write_report

    try:
        path = write_report(args.output, args.html)
    except (FileNotFoundError, UnreadableFormatError, IsADirectoryError, ValueError) as e:
        _err(f"forge-batch: {e}")
        return EXIT_USAGE
    except DamagedOutputError as e:
        _err(f"forge-batch: {e}")
        return EXIT_FAILED
    print(path)
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from forge_batch.job import load_job
    from forge_batch.plugin_manager import PluginLoadError, get_plugin_manager, list_plugins

    job_plugins: list[str] = []
    search: list[str] = []
    if args.job:
        try:
            job = load_job(args.job)
        except JobError as e:
            _print_problems(e.source or args.job, e.problems)
            return EXIT_USAGE
        job_plugins, search = job.plugins, job.plugin_search_paths()
    try:
        pm = get_plugin_manager(job_plugins, search_paths=search)
    except PluginLoadError as e:
        for name, msg in e.failures:
            _err(f"forge-batch: plugin {name!r}: {msg}")
        return EXIT_USAGE
    _print_warnings(getattr(pm, "forge_warnings", []))
    infos = list_plugins(pm)
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return EXIT_OK
    for info in infos:
        print(f"{info.name}  [{info.source}]")
        print(f"    module: {info.module}")
        print(f"    hooks:  {', '.join(info.hooks) or '-'}")
        for kind, names in info.provides.items():
            print(f"    {kind}: {', '.join(names)}")
    return EXIT_OK


def _add_run_options(run: argparse.ArgumentParser) -> None:
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a job option, e.g. sampling.temperature=0")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress and no summary (errors only)")
    run.add_argument("--overwrite", action="store_true", help="discard committed parts instead of resuming")
    run.add_argument(
        "--force-resume", action="store_true",
        help="resume even though the input files or the engine (model, dtype, kernels) changed since the committed rows",
    )
    run.add_argument("--limit", type=int, help="only the first N input rows (same as --set input.limit=N)")
    run.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto", help="progress display (auto: bar on a terminal)")
    run.add_argument("--log-interval", type=_seconds, default=10.0, help="seconds between progress lines when not on a terminal")
    run.add_argument("--grace", type=_seconds, default=30.0, help="seconds in-flight rows may finish after Ctrl-C / SIGTERM")


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # (NaN too)
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _log_options(parser: argparse.ArgumentParser, default: Any) -> None:
    from forge_batch.logs import FORMATS, LEVELS, LOG_LEVEL_ENV

    parser.add_argument("--log-level", type=str.lower, choices=LEVELS, default=default,
                        help=f"the least severe log records shown (default: ${LOG_LEVEL_ENV}, else info)")
    parser.add_argument("--log-format", choices=FORMATS, default=default,
                        help="text (default) or json: one JSON object a line (time, level, event, fields), for schedulers")


def build_parser() -> argparse.ArgumentParser:
    from forge_batch.io.meta import tool_version

    parser = argparse.ArgumentParser(
        prog="forge-batch", description="Batch LLM generation: a job file in, a table of generations out."
    )
    parser.add_argument("--version", action="version", version=f"forge-batch {tool_version()}")
    _log_options(parser, None)
    # the same options after the command (`forge-batch run job.yaml --log-format json`); unset there, they
    # leave what was given before it
    common = argparse.ArgumentParser(add_help=False)
    _log_options(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    real_add_parser = sub.add_parser

    def add_parser(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if kwargs.get("add_help", True):
            kwargs.setdefault("parents", [common])
        return real_add_parser(name, **kwargs)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    run = sub.add_parser("run", help="run (or resume) a job")
    run.add_argument("job", help="job file (YAML)")
    _add_run_options(run)
    run.set_defaults(func=cmd_run)

    batch = sub.add_parser(
        "run-batch", help="run an OpenAI batch file without a job file, like `vllm run-batch` (resumable)",
        description="An OpenAI Batch API request file in, its result lines out. -o results.jsonl writes one file "
                    "in input order when every request is done (parts wait in .results.jsonl.forge_batch/ next to "
                    "it meanwhile); any other -o is a directory of part files. Rerun to resume.",
    )
    batch.add_argument("-i", "--input-file", required=True, help="the batch request file (.jsonl)")
    batch.add_argument("-o", "--output-file", required=True, help="results.jsonl (one file) or a directory")
    batch.add_argument("--model", help="the model: an alias, a .gguf, a model directory or an HF repo id (org/name)")
    _add_run_options(batch)
    batch.set_defaults(func=cmd_run_batch)

    val = sub.add_parser("validate", help="check a job file and report every problem; runs nothing (not even the job's plugins)")
    val.add_argument("job")
    val.add_argument("--set", action="append", metavar="KEY=VALUE")
    val.set_defaults(func=cmd_validate)

    ins = sub.add_parser("inspect", help="summarise a run from its output directory")
    ins.add_argument("output")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    rep = sub.add_parser("report", help="write one self-contained HTML page (charts, errors, engine, resumes) about a run")
    rep.add_argument("output", help="the run's output directory (output.path)")
    rep.add_argument("--html", help="where to write the page (default report.html in the output's state folder, .NAME.forge_batch next to it)")
    rep.set_defaults(func=cmd_report)

    plg = sub.add_parser("plugins", help="list plugins, where they come from and their hooks")
    plg.add_argument("--job", help="also load the plugins a job names")
    plg.add_argument("--json", action="store_true")
    plg.set_defaults(func=cmd_plugins)

    # Parsed by forge_batch.bench itself (see main); declared here so it shows in --help.
    sub.add_parser("bench", help="fixed workloads on the default model, optionally against transformers",
                   add_help=False)
    return parser


def _bench_arguments(args: list[str]) -> tuple[argparse.Namespace, list[str]] | None:
    """For ``forge-batch [log options] bench ...``: (the log options, given before or after ``bench``, and
    bench's own arguments); None for any other command."""
    if "bench" not in args:
        return None
    at = args.index("bench")
    logs = argparse.ArgumentParser(add_help=False)
    _log_options(logs, None)
    before, others = logs.parse_known_args(args[:at])
    if others:  # another command (`run bench`) or another option before it
        return None
    after, bench_args = logs.parse_known_args(args[at + 1 :])
    for name in ("log_level", "log_format"):
        if getattr(after, name) is None:
            setattr(after, name, getattr(before, name))
    return after, bench_args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``forge-batch`` command."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    from forge_batch.logs import LOG_LEVEL_ENV, LoggingState, configure_logging

    bench_args = _bench_arguments(args_list)
    if bench_args is not None:  # bench parses its own arguments; the log options are the command's
        from forge_batch.bench import main as bench_main

        log_options, rest = bench_args
        state = LoggingState()
        try:
            configure_logging(log_options.log_level, log_options.log_format or "text")
        except ValueError as e:
            build_parser().error(str(e))
        try:
            return bench_main(rest)
        finally:
            state.restore()

    global _LOG_EVENTS
    parser = build_parser()
    args = parser.parse_args(args_list)
    state = LoggingState()
    level = args.log_level
    if level is None and getattr(args, "quiet", False) and not os.environ.get(LOG_LEVEL_ENV):
        level = "warning"  # --quiet: errors and warnings only, unless a level is asked for
    try:
        configure_logging(level, args.log_format or "text")
    except ValueError as e:  # FORGE_BATCH_LOG_LEVEL names no level
        parser.error(str(e))
    _LOG_EVENTS = args.log_format == "json"
    try:
        code = int(args.func(args))
        if argv is None and args.command in ("run", "run-batch"):
            # the process's own command: its outcome is final and it only winds down from here, where Python's
            # shutdown puts its handlers back to the default (a SIGTERM: killed, 143); an ignored signal stays so
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return code
    except BrokenPipeError:  # `forge-batch plugins | head`: not an error
        sys.stderr.close()
        return EXIT_OK
    finally:
        _LOG_EVENTS = False
        state.restore()  # in-process callers (tests, notebooks) get their logging back


if __name__ == "__main__":
    sys.exit(main())
