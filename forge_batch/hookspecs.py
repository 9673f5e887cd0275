"""The plugin contract: every hook a forge-batch plugin can implement, documented where it is declared.

A plugin is a module (or any object) with functions decorated by ``hookimpl`` (``from
forge_batch.hookspecs import hookimpl``) whose names are hook names below. Implementations may accept any subset of a hook's arguments, by name. Plugins are found
through the ``forge_batch`` entry-point group, through ``plugins:`` in a job, and the built-ins
(``forge_batch.plugins.*``) are registered through these very hooks.

Kinds of hook:

* **collect** (``register_*``, ``logits_processors``): every implementation is called and the results merged.
  A later-registered plugin's name wins over a built-in one with the same name.
* **chain** (``prepare_request``, ``process_result``): implementations run one after the other on the same
  object, built-ins first (``tryfirst``); each may modify it in place or return a replacement.
* **broadcast** (``job_start``, ``job_end``): every implementation is told; return values are ignored.

Row-level hooks (``prepare_request``, ``logits_processors``, ``process_result``) never stop a job: an
exception fails that row (or that sample) with the plugin's name (for a logits processor that raises while
generating: the processor's name) in its ``error`` column.

docs/plugins.md documents each hook with its exact signature; tests/test_plugins_docs.py fails when a hook is
added here without its documentation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

# Plugins import these from here (as docs/plugins.md shows); they live in the contract.
from forge_batch.contract import DropResult, RowError, SkipRow

__all__ = ["DropResult", "RowError", "SkipRow", "hookimpl", "hookspec"]

if TYPE_CHECKING:
    from collections.abc import Callable

    from forge_batch.contract import JobSpec, Reader, RunContext, Writer
    from forge_batch.engine.outputs import RequestOutput
    from forge_batch.engine.request import GenerationRequest

PROJECT_NAME = "forge_batch"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)








@hookspec
def register_samplers() -> dict[str, Callable[..., Any]]:
    """Return samplers by name, e.g. ``{"greedy": greedy_sampler}``.

    A sampler is ``f(logits: torch.Tensor[S, V], batch: forge_batch.engine.sampler.SamplingBatch) ->
    torch.Tensor[S]`` (int64 token ids); the engine calls it after logit bias, penalties and constraint masks
    are applied. ``logits`` is the engine's for this step only (its memory holds the next step's): copy what
    must outlive the call. A request picks one with ``sampling.sampler: <name>`` (job) or a per-row override.
    """


@hookspec
def register_constraints() -> dict[str, Callable[..., Any]]:
    """Return structured-output constraint factories by name (``json_schema``, ``regex``, ``choice``, ...).

    A factory turns the constraint's spec (from SamplingParams) into the engine's constraint object. The
    collected mapping is handed to the engine (``LLM(constraints=...)``) when the engine accepts it.
    """


@hookspec
def register_readers() -> dict[str, Reader]:
    """Return input readers by format name, e.g. ``{"jsonl": JsonlReader()}``.

    A reader (see :class:`forge_batch.io.base.Reader`) streams one input file as batches of
    :class:`forge_batch.io.base.RawRow`; ``extensions`` lets ``input.format: auto`` pick it.
    """


@hookspec
def register_writers() -> dict[str, Writer]:
    """Return output writers by format name, e.g. ``{"parquet": ParquetWriter()}``.

    A writer (see :class:`forge_batch.io.base.Writer`) writes one complete part file from an Arrow table with
    the run's fixed schema; the runner makes it atomic (temp name, then rename) and keeps the manifest.
    """


@hookspec
def logits_processors(
    request: GenerationRequest, row: dict[str, Any], context: RunContext
) -> list[Callable[[list[int], Any], Any]] | None:
    """Return extra logits processors for one request (or None).

    Each is ``f(output_token_ids: list[int], logits: torch.Tensor[V]) -> torch.Tensor[V]``; they are appended
    to ``request.params.logits_processors`` after ``prepare_request``. Raising here fails the row; a processor
    that raises while generating fails that sample alone (``plugin_error``, the error names the processor and
    the exception), and the other rows of the batch go on unchanged.
    """


@hookspec
def prepare_request(
    request: GenerationRequest, row: dict[str, Any], context: RunContext
) -> GenerationRequest | None:
    """Turn an input row into the request the engine runs (chain; may skip the row).

    ``request`` arrives with its id, the job's sampling (plus the row's overrides and its derived seed) and
    ``metadata``; the built-in ``prepare`` plugin (``tryfirst``) sets ``request.prompt`` from the template,
    the messages field or the prompt field. Later implementations see that prompt and may change the prompt,
    the params or the metadata in place, or return a new request. Setting ``request.prompt_token_ids`` skips
    tokenization. Raise :class:`SkipRow` to skip the row with a reason; any other exception fails the row.
    """


@hookspec
def process_result(
    record: dict[str, Any], output: RequestOutput, row: dict[str, Any], context: RunContext
) -> dict[str, Any] | None:
    """Validate, score or drop one output record (one sample) before it is written (chain).

    ``record`` maps output columns to values (``text``, ``finish_reason``, ``error``, ``error_kind``, ...).
    Modify it in place or return a replacement; keys that are not output columns are stored in the
    ``extra`` JSON column (e.g. ``record["score"] = 0.9``). To fail a sample set ``record["error"]`` (and
    ``record["error_kind"]``). Raise :class:`DropResult` to leave the sample out; any other exception fails
    that sample with the plugin's name in the error.
    """


@hookspec
def result_recorded(record: dict[str, Any], context: RunContext) -> None:
    """Watch one output record (one sample) as the runner hands it to the output, after ``process_result``.

    Called where the output is written: in the runner's process for the local executor and on the Ray
    driver (``process_result`` runs on the replicas there), so counters kept in ``context.state`` (the
    built-in metrics plugin's) see every record of the run. Observation only: changing ``record`` changes
    nothing written. Exceptions are reported once as a warning and never fail a row or the job.
    """


@hookspec
def job_start(job: JobSpec, context: RunContext) -> None:
    """Called once before the first row is prepared (after resume state is loaded, the engine is built and the
    input's first rows are read, which type the output's columns).

    ``context.resumed_rows`` tells how many rows earlier runs already committed. Raising aborts the job
    before anything is generated; the implementations after the one that raised never start.
    """


@hookspec
def job_end(job: JobSpec, context: RunContext, summary: dict[str, Any]) -> None:
    """Called once when the job stops, whether it completed, failed or was interrupted, once the job_start
    hooks were called; if a job_start raised, on the plugins whose job_start returned and those without one.

    ``summary`` is what ``summary.json`` holds (``status``, row counts by kind, tokens, throughput, wall
    time). Exceptions are reported but do not change the job's result.
    """
