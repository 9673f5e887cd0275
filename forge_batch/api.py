"""The Python API's ``LLM``: the engine's offline front with the built-in plugins' constraint kinds.

The engine takes constraint factories from its caller and imports no plugin; this module sits above it
and the plugin manager, so ``forge_batch.LLM(...)`` understands ``json_schema``, ``regex`` and
``choice`` out of the box, exactly as a job does (the job runner passes its own plugin manager's).
"""

from __future__ import annotations

import functools
from typing import Any

from forge_batch.engine.constraints import ConstraintFactory
from forge_batch.engine.llm import LLM as EngineLLM
from forge_batch.plugin_manager import CONSTRAINT_PLUGINS, collect_registry, get_plugin_manager


def builtin_constraints() -> dict[str, ConstraintFactory]:
    """The constraint kinds the built-in plugins register (installed plugins are not loaded here)."""
    return dict(_builtin_constraints())


@functools.cache
def _builtin_constraints() -> dict[str, ConstraintFactory]:
    # only the built-ins that register kinds: the readers and writers would import pyarrow for nothing
    return collect_registry(get_plugin_manager(entry_points=False, builtins=CONSTRAINT_PLUGINS),
                            "register_constraints")


class LLM(EngineLLM):
    """:class:`forge_batch.engine.llm.LLM` with the built-in constraint kinds; ``constraints`` adds
    (or replaces) kinds by name."""

    def __init__(self, model: Any = "smollm2-135m-instruct", *,
                 constraints: dict[str, ConstraintFactory] | None = None, **kwargs: Any) -> None:
        super().__init__(model, constraints={**builtin_constraints(), **(constraints or {})}, **kwargs)
