"""Per-request sampling options (the vLLM names, so vLLM users need no new vocabulary)."""

from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The constraint kinds that have their own option; any other kind (a plugin's) goes in ``constraint``.
BUILTIN_CONSTRAINT_KINDS = ("json_schema", "regex", "choice")


def constraints_given(options: Mapping[str, Any]) -> list[str]:
    """The constraint kinds set in sampling options (SamplingParams' or a job's ``sampling`` fields)."""
    given = [k for k in BUILTIN_CONSTRAINT_KINDS if options.get(k) is not None]
    extra = options.get("constraint")
    if extra is not None:
        given += [str(k) for k in extra] if isinstance(extra, Mapping) else ["constraint"]
    return given


def constraint_of(options: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(kind, spec) of the first constraint set in sampling options (see :func:`constraints_given`): a
    built-in kind's own key, else its entry in ``constraint``; None when none is set."""
    given = constraints_given(options)
    if not given:
        return None
    kind = given[0]
    return (kind, options[kind]) if options.get(kind) is not None else (kind, options["constraint"][kind])


def one_constraint_problem(given: Sequence[str]) -> str | None:
    """The rule for structured output, wherever constraints are given (a request, a job's sampling, its
    ``constraint`` block, a row's column): at most one, because two grammars cannot both steer one sample.
    None when ``given`` keeps it, else what is wrong."""
    if len(given) <= 1:
        return None
    return f"constraints are mutually exclusive: give at most one, got {', '.join(given)}"


def constraint_options(kind: str, spec: Any) -> dict[str, Any]:
    """SamplingParams keyword arguments that set exactly the constraint ``kind`` and clear every other."""
    options: dict[str, Any] = {k: None for k in (*BUILTIN_CONSTRAINT_KINDS, "constraint")}
    if kind in BUILTIN_CONSTRAINT_KINDS:
        options[kind] = spec
    else:
        options["constraint"] = {kind: spec}
    return options


def check_vllm_options(options: Mapping[str, Any], table: Mapping[str, tuple[Any, str]], call: str) -> None:
    """Refuse vLLM options this engine cannot honour, naming what to use instead (ValueError), unless given
    vLLM's default, which asks for nothing; an option nobody knows is a TypeError, as for any Python function."""
    for name, value in options.items():
        if name not in table:
            raise TypeError(f"{call}() got an unexpected keyword argument {name!r}")
        default, instead = table[name]
        if value != default and not (default is None and value == {}):
            raise ValueError(f"{call}({name}=...) is vLLM's and not supported here: {instead}")


_STRUCTURED = "give json_schema=, regex= or choice= (or constraint={kind: spec} for a plugin's grammar kind)"
# vLLM's SamplingParams options with no counterpart here (docs/python-api.md lists them as absent), refused
# the same way. best_of is also accepted equal to n (each of the n samples is returned).
VLLM_ONLY_SAMPLING: dict[str, tuple[Any, str]] = {
    "best_of": (None, "ask for n samples and keep the best by cumulative_logprob (logprobs=0 gives it)"),
    "detokenize": (True, "text is always decoded; token_ids are there too"),
    "spaces_between_special_tokens": (True, "decoding is the tokenizer's own"),
    "output_kind": (None, "generate_stream yields each request when it finishes"),
    "stream_interval": (1, "generate_stream yields each request when it finishes"),
    "skip_clone": (False, "clone() always copies"),
    "structured_outputs": (None, _STRUCTURED),
    "guided_decoding": (None, _STRUCTURED),
    "logprob_token_ids": (None, "ask for logprobs=k and pick the ids you need"),
    "prompt_logprob_token_ids": (None, "ask for prompt_logprobs=k and pick the ids you need"),
    "prompt_logprob_start": (None, "ask for prompt_logprobs=k and keep the positions you need"),
    "flat_logprobs": (False, "logprobs come as vLLM's default shape, a dict per position"),
    "skip_reading_prefix_cache": (None, "LLM(enable_prefix_caching=False)"),
    "thinking_token_budget": (None, "max_tokens"),
    "repetition_detection": (None, "repetition_penalty or frequency_penalty"),
    "routed_experts_prompt_start": (None, "there are no MoE models here"),
    "trace_decode_token_ids": (None, "a debugging option of vLLM's RL paths"),
}


@dataclass
class SamplingParams:
    """How tokens are chosen for one request.

    ``temperature == 0`` is greedy. ``seed`` makes a request's samples reproducible whatever else is in
    the batch; without it the engine draws one from its own seed. Stop strings are not included in the
    returned text unless ``include_stop_str_in_output``. ``n`` samples share the prompt's KV blocks through
    the prefix cache.

    ``logprobs=k``: each generated token's log-probability plus the ``k`` most likely tokens at its position
    (``CompletionOutput.logprobs``, ``cumulative_logprob``); ``prompt_logprobs=k`` the same for every prompt
    token after the first (``RequestOutput.prompt_logprobs``; a request asking for it skips the prefix
    cache, because cached positions are never run). Both are the model's own distribution (log-softmax of
    the raw float32 logits, before penalties, bias, temperature, masks and logits processors), as vLLM's
    default. ``allowed_token_ids`` keeps only those tokens; ``bad_words`` bans the token that would complete
    any of the words; ``truncate_prompt_tokens=k`` keeps the prompt's last ``k`` tokens (-1: as many as the
    context holds).
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
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
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
        if isinstance(self.logit_bias, Mapping):  # JSON (an OpenAI body, a row's overrides) names ids as text
            self.logit_bias = {_text_to_int(token): bias for token, bias in self.logit_bias.items()}
        self.validate()

    def _normalize(self) -> None:
        # here, not only at construction: the engine validates again, after a caller may have set a field
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ValueError(f"{name} must be a list, got {value!r}")
            setattr(self, name, list(value or []))
        if self.top_k is None:
            self.top_k = 0

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        self._normalize()
        for name in ("n", "max_tokens", "min_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{name} must be an int, got {value!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a number of tokens, got {self.top_k}")
        self.top_k = max(int(self.top_k), 0)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise ValueError(f"seed must be None or an int, got {self.seed!r}")
        if not all(isinstance(x, str) for x in self.stop):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if "" in self.stop:
            raise ValueError("stop cannot contain an empty string")  # it would end every output at once
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and value in (0, 1):  # 0 / 1 as Python takes them
                setattr(self, name, bool(value))
            elif not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids (ints >= 0), got {self.stop_token_ids!r}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
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
        if self.constraint is not None and (not isinstance(self.constraint, dict) or len(self.constraint) != 1):
            raise ValueError("constraint must be a mapping with exactly one kind, e.g. {'regex': '[0-9]+'}")
        problem = one_constraint_problem(constraints_given(vars(self)))
        if problem is not None:
            raise ValueError(problem)
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one option")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an int >= 0 (the top tokens per position), got {value!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, Mapping):
                raise ValueError(f"logit_bias must map token ids to biases, got {type(self.logit_bias).__name__}")
            for token, bias in self.logit_bias.items():
                if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0:
                    raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {token!r}")
                if isinstance(bias, bool) or not isinstance(bias, numbers.Real) or not math.isfinite(bias):
                    raise ValueError(f"logit_bias[{token}] must be a finite number, got {bias!r}")
        if self.allowed_token_ids is not None:
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids is empty: no token could be generated")
            if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.allowed_token_ids):
                raise ValueError("allowed_token_ids must be token ids (ints >= 0)")
        if self.bad_words is not None and not all(isinstance(w, str) and w for w in self.bad_words):
            raise ValueError("bad_words must be non-empty strings")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not (k >= 1 or k == -1)):
            raise ValueError(f"truncate_prompt_tokens must be >= 1 or -1 (the context length), got {k!r}")

    def clone(self) -> SamplingParams:
        """A deep copy (vLLM's ``clone``); logits processors are shared, not copied, as they may hold models."""
        return copy.deepcopy(self, memo={id(f): f for f in self.logits_processors})

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
        return constraint_of(vars(self))


def _with_vllm_options(init: Callable[..., None]) -> Callable[..., None]:
    """SamplingParams' dataclass __init__ that also takes vLLM's options: ``extra_args`` as ``extra``, those
    in VLLM_ONLY_SAMPLING at vLLM's default (refused by name otherwise)."""

    @functools.wraps(init)
    def __init__(self: SamplingParams, *args: Any, **kwargs: Any) -> None:
        vllm = {name: kwargs.pop(name) for name in list(kwargs) if name in VLLM_ONLY_SAMPLING}
        if vllm.get("best_of") is not None and vllm["best_of"] == kwargs.get("n", 1):
            del vllm["best_of"]
        check_vllm_options(vllm, VLLM_ONLY_SAMPLING, "SamplingParams")
        if "extra_args" in kwargs:
            extra_args = kwargs.pop("extra_args")
            if kwargs.get("extra") and extra_args:
                raise ValueError("give extra= or vLLM's extra_args=, not both")
            kwargs["extra"] = kwargs.get("extra") or dict(extra_args or {})
        init(self, *args, **kwargs)

    return __init__


SamplingParams.__init__ = _with_vllm_options(SamplingParams.__init__)  # type: ignore[method-assign]


def _text_to_int(value: Any) -> Any:
    """``"42"`` as 42; anything else as it is (validate judges it)."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def check_params_for_engine(params: SamplingParams, max_logprobs: int, vocab_size: int,
                            encode: Callable[..., list[int]] | None) -> None:
    """What a request asks that only the engine it is added to can check (raises ValueError): logprobs
    within the engine's limit, token ids inside its vocabulary; tokenizes bad_words with its tokenizer."""
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > max_logprobs:
            raise ValueError(f"{name}={value} is more than this engine's max_logprobs={max_logprobs} "
                             "(raise it with LLM(max_logprobs=...) or engine.max_logprobs in a job)")
    if params.allowed_token_ids is not None and any(t >= vocab_size for t in params.allowed_token_ids):
        raise ValueError(f"allowed_token_ids holds ids outside the vocabulary (size {vocab_size})")
    if params.stop_token_ids and max(params.stop_token_ids) >= vocab_size:
        raise ValueError(f"stop_token_ids holds id {max(params.stop_token_ids)}, outside the vocabulary (size {vocab_size})")
    if params.logit_bias and max(params.logit_bias) >= vocab_size:
        raise ValueError(f"logit_bias names token id {max(params.logit_bias)}, outside the vocabulary (size {vocab_size})")
    if params.bad_words:
        if encode is None:
            raise ValueError("bad_words needs a tokenizer (this engine has random weights and none)")
        # each word alone and after a space, as it is tokenized at the start of a text and inside one
        variants = {tuple(encode(form, add_special_tokens=False))
                    for word in params.bad_words for form in (word, " " + word.lstrip())}
        params._bad_words_token_ids = [list(v) for v in sorted(variants) if v]  # type: ignore[attr-defined]
