"""What the engine returns: one RequestOutput per prompt, holding one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One sample of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "error"
    error: str | None = None
    # Set when generation stopped on a stop string or stop token: which one.
    stop_reason: str | int | None = None
    # Structured output only: whether the finished text passed the independent check (jsonschema for
    # json_schema, a full regex match, membership for choice); None for unconstrained requests.
    valid: bool | None = None


@dataclass
class RequestOutput:
    """The result for one prompt. ``text``/``token_ids``/``finish_reason``/``error`` are the first sample's;
    ``samples`` (alias ``outputs``) holds all ``n`` of them."""

    request_id: str
    index: int  # position of the prompt in the input
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[CompletionOutput] = field(default_factory=list)
    error: str | None = None
    # Timings in seconds (arrival, first_token, finished) and token counts.
    metrics: dict[str, float] = field(default_factory=dict)
    # GenerationRequest.metadata, passed through untouched.
    metadata: dict = field(default_factory=dict)

    @property
    def outputs(self) -> list[CompletionOutput]:
        return self.samples

    @property
    def text(self) -> str:
        return self.samples[0].text if self.samples else ""

    @property
    def token_ids(self) -> list[int]:
        return self.samples[0].token_ids if self.samples else []

    @property
    def finish_reason(self) -> str:
        if self.error is not None or not self.samples:
            return "error"
        return self.samples[0].finish_reason

    @property
    def finished(self) -> bool:
        return True
