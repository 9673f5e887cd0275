"""What the engine returns: one RequestOutput per prompt, holding one CompletionOutput per sample."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field


class EngineErrorKind(str, enum.Enum):
    """Why the engine failed a sample, named where it happens so that no caller parses messages.

    The values are row error kinds of ``forge_batch.contract.ErrorKind`` (a test keeps them so); the engine
    cannot import the contract, which sits above it."""

    EMPTY_PROMPT = "empty_prompt"
    PROMPT_TOO_LONG = "prompt_too_long"
    BAD_PROMPT = "bad_prompt"  # not text, chat messages or token ids; or text for an engine without tokenizer
    BAD_MESSAGES = "bad_messages"  # a chat message without role or content
    BAD_SAMPLING = "bad_sampling"  # sampling options this engine cannot run (e.g. a token id outside its vocabulary)
    CONSTRAINT_ERROR = "constraint_error"  # the constraint does not compile, or the grammar broke
    INVALID_OUTPUT = "invalid_output"  # a constrained output that does not conform (e.g. cut by max_tokens)
    PLUGIN_ERROR = "plugin_error"  # a request's logits processor raised
    ENGINE_ERROR = "engine_error"

    def __str__(self) -> str:
        return self.value


@dataclass
class Logprob:
    """One token's log-probability at one position (vLLM's shape): ``rank`` is its 1-based place in the
    distribution, ``decoded_token`` its text (None for an engine without tokenizer)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class PositionLogprobs:
    """What the engine records at one position: the chosen token and the top ones (most likely first)."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]

    def as_dict(self, decode: Callable[[int], str | None]) -> dict[int, Logprob]:
        """vLLM's form: the chosen token first, then the top tokens in rank order (k or k + 1 entries)."""
        out = {self.token_id: Logprob(self.logprob, self.rank, decode(self.token_id))}
        for rank, (tok, lp) in enumerate(zip(self.top_ids, self.top_logprobs), start=1):
            if tok not in out:
                out[tok] = Logprob(lp, rank, decode(tok))
        return out


# vLLM's names: one dict per generated token, and per prompt token (None for the first, which has no context).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


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
    # SamplingParams.logprobs set: one dict per generated token (see PositionLogprobs.as_dict) and their sum.
    logprobs: SampleLogprobs | None = None
    cumulative_logprob: float | None = None
    # The same positions in compact form (chosen token, rank, top ids and logprobs), what ``logprobs`` is
    # made from; writers use it because a dict cannot tell whether the chosen token was among the top k.
    position_logprobs: list[PositionLogprobs] | None = field(default=None, repr=False)


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
    # SamplingParams.prompt_logprobs set: None for the first prompt token, then one dict per prompt token.
    prompt_logprobs: PromptLogprobs | None = None
    # Compact form of prompt_logprobs[1:] (see CompletionOutput.position_logprobs).
    prompt_position_logprobs: list[PositionLogprobs] | None = field(default=None, repr=False)

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
