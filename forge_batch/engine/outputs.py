"""What the engine returns: one RequestOutput per prompt, holding one CompletionOutput per sample."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EngineErrorKind(str, enum.Enum):
    """Why the engine failed a sample, named where it happens so that no caller parses messages.

    The values are row error kinds of ``forge_batch.contract.ErrorKind`` (a test keeps them so); the engine
    cannot import the contract, which sits above it."""

    EMPTY_PROMPT = "empty_prompt"
    PROMPT_TOO_LONG = "prompt_too_long"
    BAD_PROMPT = "bad_prompt"  # not text, chat messages or token ids; or text for an engine without tokenizer
    BAD_MESSAGES = "bad_messages"  # a chat message without role or content
    CONSTRAINT_ERROR = "constraint_error"  # the constraint does not compile, or the grammar broke
    INVALID_OUTPUT = "invalid_output"  # a constrained output that does not conform (e.g. cut by max_tokens)
    PLUGIN_ERROR = "plugin_error"  # a request's logits processor raised
    ENGINE_ERROR = "engine_error"

    def __str__(self) -> str:
        return self.value


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
    # Set with ``error``: why the sample failed (an EngineErrorKind value).
    error_kind: str | None = None


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
    # Set with ``error``: why the request failed (an EngineErrorKind value).
    error_kind: str | None = None
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
