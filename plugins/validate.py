"""Built-in result validation: constrained outputs are checked before they are written.

A sample generated under ``json_schema`` must parse as JSON and validate (``jsonschema``), under ``regex``
must match it in full, under ``choice`` must be one of the choices. The engine's own verdict
(``CompletionOutput.valid``) is used when it gives one; otherwise (another engine) the check the engine
makes runs here (``forge_batch.plugins.constraints.output_problem``: one judge for both). The ``valid``
column records it; a sample that fails (most often because ``max_tokens`` cut it off) also gets
``error_kind`` ``invalid_output`` and a message saying what is wrong, so a table of results never holds a
silently broken value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forge_batch.hookspecs import hookimpl
from forge_batch.plugins.constraints import output_problem

if TYPE_CHECKING:
    from forge_batch.engine.outputs import RequestOutput


@hookimpl(tryfirst=True)
def process_result(record: dict[str, Any], output: RequestOutput) -> None:
    if record.get("error") or record.get("text") is None:
        return
    constraint = (output.metadata or {}).get("_forge", {}).get("constraint")
    if not constraint:
        return
    kind, spec = constraint
    index = record.get("sample_index") or 0
    sample = next((s for s in output.samples or [] if s.index == index), None)
    valid = getattr(sample, "valid", None)
    if valid is True:  # the engine already checked it independently (jsonschema / full match / membership)
        return
    problem = output_problem(kind, spec, record["text"])
    if problem is None and valid is False:
        problem = f"output does not satisfy the {kind} constraint"
    record["valid"] = problem is None
    if problem is not None:
        if record.get("finish_reason") == "length":
            problem += " (generation stopped at max_tokens)"
        record["error"] = problem
        record["error_kind"] = "invalid_output"
