"""A request as the engine receives it (the job runner builds these from rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .sampling_params import SamplingParams

# A chat: [{"role": "user", "content": "..."}, ...]
Messages = list[dict[str, Any]]


@dataclass
class GenerationRequest:
    """One prompt to generate for.

    Exactly one of ``prompt`` (a string used as is, or a chat rendered with the model's chat template)
    and ``prompt_token_ids`` is used. A request created with ``error`` set is not run: it comes back
    at once as a failed RequestOutput carrying that message (so a runner can pass bad rows through the
    same stream and keep output order logic in one place).
    """

    request_id: str
    prompt: str | Messages | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_token_ids: list[int] | None = None
    error: str | None = None
    # Free-form data carried through to RequestOutput.metadata (row fields, timings, ...).
    metadata: dict[str, Any] = field(default_factory=dict)
