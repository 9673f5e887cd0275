"""A sequence: one sample of one request as it moves through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .detokenizer import IncrementalText
from .outputs import EngineErrorKind, PositionLogprobs
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token state and KV bookkeeping of one generation.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; everything past it is still to be
    run (the prompt's rest while prefilling, the last sampled token while decoding). After preemption by
    recompute it drops to zero and the prompt plus the output so far is prefilled again.
    """

    seq_id: int
    request_id: str
    sample_index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: int = 0  # admission order, for FCFS and preemption priority
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    stop_token: bool = False  # it ended on EOS or a stop token (whose text is not part of its text)
    error: str | None = None
    error_kind: str | None = None  # an EngineErrorKind value, set with ``error``
    text: str = ""
    detok: IncrementalText | None = None  # the output's text so far, kept where stop strings are searched
    num_preemptions: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None  # when its latest token was sampled (inter-token latency)
    # Structured output: the compiled constraint and this sample's position in it (None if unconstrained).
    constraint: object | None = None
    constraint_state: object | None = None
    valid: bool | None = None
    # SamplingParams.logprobs / prompt_logprobs: what each generated token / prompt position recorded.
    # ``prompt_logprobs[p]`` is for prompt token p + 1 (the distribution at position p).
    output_logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs] = field(default_factory=list)

    def fail(self, error: str, kind: EngineErrorKind = EngineErrorKind.PLUGIN_ERROR) -> None:
        """Mark the sample failed (the step finishes it without its sampled token), unless it already is."""
        if self.finish_reason != "error":
            self.finish_reason, self.error, self.error_kind = "error", error, kind.value

    @property
    def constraint_name(self) -> str:
        """The sample's constraint kind as messages name it (``'json_schema'``)."""
        spec = self.params.constraint_spec
        return repr(spec[0]) if spec is not None else "request's"

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt positions still to be scored (they must run, not come from the prefix cache)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_at(self, i: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]
