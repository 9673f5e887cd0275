"""Per-request sampling options (the vLLM names, so vLLM users need no new vocabulary)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    """How tokens are chosen for one request.

    ``temperature == 0`` is greedy. ``seed`` makes a request's samples reproducible whatever else is in
    the batch; without it the engine draws one from its own seed. Stop strings are not included in the
    returned text. ``n`` samples share the prompt's KV blocks through the prefix cache.
    """

    n: int = 1
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    # Structured output: at most one of these (see forge_batch.plugins.constraints). ``constraint`` is the
    # general form, {kind: spec}, for kinds registered by plugins (e.g. {"lark": "..."}).
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    constraint: dict[str, Any] | None = None
    # Name of a registered sampler plugin; None means the built-in vectorised sampler.
    sampler: str | None = None
    # Extra per-request logits processors: f(output_token_ids, logits[V]) -> logits[V] (plugins add these).
    logits_processors: list[Callable[[list[int], Any], Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k is None or self.top_k < 0:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.json_schema is not None and self.regex is not None:
            raise ValueError("json_schema and regex are mutually exclusive: give one constraint per request")
        given = [k for k in ("json_schema", "regex", "choice") if getattr(self, k) is not None]
        if self.constraint is not None:
            if not isinstance(self.constraint, dict) or len(self.constraint) != 1:
                raise ValueError("constraint must be a mapping with exactly one kind, e.g. {'regex': '[0-9]+'}")
            given += list(self.constraint)
        if len(given) > 1:
            raise ValueError(f"give one constraint per request, got {', '.join(given)}")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one option")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )

    @property
    def constraint_spec(self) -> tuple[str, Any] | None:
        """(kind, spec) of the structured-output constraint, or None."""
        if self.json_schema is not None:
            return ("json_schema", self.json_schema)
        if self.regex is not None:
            return ("regex", self.regex)
        if self.choice is not None:
            return ("choice", self.choice)
        if self.constraint:
            return next(iter(self.constraint.items()))
        return None
