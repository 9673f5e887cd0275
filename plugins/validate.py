"""Built-in result validation: constrained outputs are checked before they are written.

A sample generated under ``json_schema`` must parse as JSON and validate (``jsonschema``), under ``regex``
must match it in full, under ``choice`` must be one of the choices. The engine's own verdict
(``CompletionOutput.valid``) is used when it gives one; otherwise (another engine, a plugin kind) the check
runs here. The ``valid`` column records it; a sample that fails (most often because ``max_tokens`` cut it
off) also gets ``error_kind`` ``invalid_output`` and a message saying what is wrong, so a table of results
never holds a silently broken value.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from forge_batch.hookspecs import hookimpl

if TYPE_CHECKING:
    from forge_batch.engine.outputs import RequestOutput


def _problem(kind: str, spec: Any, text: str) -> str | None:
    if kind == "json_schema":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return f"output is not valid JSON: {e}"
        schema = json.loads(spec) if isinstance(spec, str) else spec
        import jsonschema

        try:
            jsonschema.validate(value, schema)
        except jsonschema.ValidationError as e:
            return f"output does not match the JSON schema: {e.message}"
        except jsonschema.SchemaError as e:
            return f"the JSON schema is invalid: {e.message}"
        return None
    if kind == "regex":
        return None if re.fullmatch(spec, text, flags=re.DOTALL) else f"output does not match regex {spec!r}"
    if kind == "choice":
        return None if text in spec else f"output is not one of the choices {list(spec)!r}"
    return None


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
    problem = _problem(kind, spec, record["text"])
    if problem is None and valid is False:
        problem = f"output does not satisfy the {kind} constraint"
    record["valid"] = problem is None
    if problem is not None:
        if record.get("finish_reason") == "length":
            problem += " (generation stopped at max_tokens)"
        record["error"] = problem
        record["error_kind"] = "invalid_output"
