"""Built-in structured-output constraints (``json_schema``, ``regex``, ``choice``) on llguidance.

llguidance runs on a plain ``tokenizers`` JSON (no transformers), computes a token mask in tens of
microseconds, and releases the GIL while doing it, so the engine overlaps mask computation with the
model's forward pass. Registered through ``register_constraints`` like any third-party kind; the engine
gets them from its caller (the job runner, or ``forge_batch.LLM`` through the plugin manager).
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from forge_batch.engine.constraints import ConstraintError
from forge_batch.hookspecs import hookimpl

if TYPE_CHECKING:  # no torch import at load: `forge-batch validate` / `plugins` load every built-in
    import torch

_TOKENIZERS: dict[int, Any] = {}
_EXECUTOR = None


def _ll():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - llguidance is a hard dependency
        raise ConstraintError("structured output needs the llguidance package (pip install llguidance)") from exc
    return llguidance


def ll_tokenizer(tokenizer: Any, vocab_size: int):
    """The llguidance tokenizer for our Tokenizer (built once per tokenizer: it indexes the vocabulary)."""
    key = id(tokenizer)
    if key not in _TOKENIZERS:
        ll = _ll()
        _TOKENIZERS[key] = ll.LLTokenizer(
            tokenizer.to_json_str(), n_vocab=vocab_size, eos_token=sorted(tokenizer.eos_token_ids)
        )
    return _TOKENIZERS[key]


class LLGuidanceState:
    """One sample's matcher."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        self.matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    @staticmethod
    def fill_batch(states: list[LLGuidanceState], rows: list[int], bitmask: torch.Tensor) -> None:
        """All rows at once on llguidance's thread pool (it releases the GIL)."""
        global _EXECUTOR
        if len(states) == 1:
            states[0].fill_bitmask(bitmask, rows[0])
            return
        if _EXECUTOR is None:
            _EXECUTOR = _ll().LLExecutor()
        _EXECUTOR.unsafe_compute_mask_ptr(
            [(s.matcher, r) for s, r in zip(states, rows)], bitmask.data_ptr(), bitmask.shape[1] * 4,
            bitmask.shape[0],
        )

    def advance(self, token_id: int) -> None:
        self.matcher.consume_token(token_id)

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()

    def is_stopped(self) -> bool:
        return self.matcher.is_stopped()

    def error(self) -> str | None:
        # llguidance appends its parser's state and the grammar (dozens of lines): the first line says it
        return self.matcher.get_error().split("\n<state>")[0] if self.matcher.is_error() else None


class LLGuidanceConstraint:
    """A grammar compiled for one tokenizer; ``new_state`` gives each sample its own matcher."""

    def __init__(self, kind: str, grammar: str, tokenizer: Any, vocab_size: int, validator) -> None:
        ll = _ll()
        self.kind = kind
        self._validator = validator
        self._lltok = ll_tokenizer(tokenizer, vocab_size)
        problem = ll.LLMatcher.validate_grammar(grammar, self._lltok)
        if problem and not problem.startswith("WARNING"):
            raise ConstraintError(f"{kind} could not be compiled: {_tidy(problem)}")
        self._grammar = grammar
        self._template = ll.LLMatcher(self._lltok, grammar, log_level=0)
        if self._template.is_error():
            raise ConstraintError(f"{kind} could not be compiled: {self._template.get_error()}")
        if _admits_no_text(self._template.deep_copy()):
            raise ConstraintError(f"{kind} admits no text at all: no output can satisfy it")

    def new_state(self) -> LLGuidanceState:
        return LLGuidanceState(self._template.deep_copy())

    def validate(self, text: str) -> tuple[bool, str | None]:
        return self._validator(text)


# llguidance's own date/time formats are shape-only: they admit 2023-02-30, year 0000 and leap second :60,
# all of which jsonschema's format checker (the ``valid`` column's judge) rejects, so a ``stop`` output
# could come back invalid. These exact patterns encode month lengths and leap years, so every date the
# grammar admits is a real calendar date.
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"  # 0001-9999: there is no year 0
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
    rf"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
# Fractions stop at nanoseconds: an unbounded [0-9]+ lets a small model write zeros until max_tokens.
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?(?:[zZ]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
# Anchored: llguidance gives ``pattern`` JSON Schema's search semantics, so an unanchored one would admit
# any string that merely contains a date.
EXACT_FORMAT_PATTERNS = {"date": f"^{_DATE}$", "time": f"^{_TIME}$", "date-time": f"^{_DATE}[tT]{_TIME}$"}
# The string formats llguidance's JSON-schema grammar knows (1.9; it refuses a schema with any other).
GRAMMAR_FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uri", "uuid"})
# Keywords whose values are data, not subschemas: never rewritten.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "required"})
# Keywords whose values map names to subschemas (the mapping itself is not a schema).
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def exact_formats(node: Any) -> Any:
    """A copy of a JSON schema in which ``format: date / time / date-time`` become exact patterns, and a
    ``format`` the grammar engine does not know (``iri``, ``uri-reference``, a pydantic ``binary``...) is left
    out: JSON Schema makes ``format`` an annotation, so such a schema compiles, and the independent check
    (jsonschema's format checker) judges the finished output against the formats it knows.

    Only the grammar sees the copy; validation still uses the user's schema. Where a subschema already
    has a ``pattern``, the exact one is intersected through ``allOf`` (llguidance supports that).
    """
    if isinstance(node, list):
        return [exact_formats(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA_KEYWORDS:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: exact_formats(sub) for name, sub in value.items()}
        else:
            out[key] = exact_formats(value)
    fmt = out.get("format")
    if isinstance(fmt, str) and fmt not in GRAMMAR_FORMATS and fmt not in EXACT_FORMAT_PATTERNS:
        del out["format"]
    if isinstance(fmt, str) and fmt in EXACT_FORMAT_PATTERNS:
        exact = EXACT_FORMAT_PATTERNS[fmt]
        del out["format"]
        if "pattern" in out:
            out["allOf"] = [*out.get("allOf", []), {"pattern": exact}]
        else:
            out["pattern"] = exact
    return out


def _grammar_problem(kind: str, grammar: str) -> None:
    """Raise ConstraintError when llguidance cannot compile ``grammar``, or when it admits no text at all.
    No model tokenizer is needed, so the job checks (validate, and run before the model loads) ask exactly
    what compiling it for the model would."""
    ll = _ll()
    problem = ll.LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise ConstraintError(f"{kind} could not be compiled: {_tidy(problem)}")
    if _admits_no_text(ll.LLMatcher(_byte_tokenizer(), grammar, log_level=0)):
        raise ConstraintError(f"{kind} admits no text at all: no output can satisfy it")


@functools.lru_cache(maxsize=1)
def _byte_tokenizer() -> Any:
    """The 256 bytes and an EOS. Whether a grammar admits any text does not hang on a model's vocabulary
    (any text is some bytes), so the job checks ask this one."""
    encoder = {bytes([b]): b for b in range(256)}
    return _ll().LLTokenizer.from_tiktoken(encoder=encoder, special_tokens={"<eos>": 256}, pattern=r"[\s\S]",
                                           eos_token=256)


def _admits_no_text(matcher: Any) -> bool:
    """True for a language with no text in it (``[a&&b]``): llguidance finds out at the first mask."""
    matcher.compute_bitmask()
    return matcher.is_error() and not matcher.is_accepting()


def _tidy(problem: str) -> str:
    # llguidance ends with the grammar it built around the user's spec ("   1 | start: /.../" and a caret
    # line): ours, not theirs, so it is left out.
    lines = problem.rstrip().split("\n")
    while lines and (re.match(r"\s*\d+ \| ", lines[-1]) or not lines[-1].strip(" ^")):
        lines.pop()
    return "\n".join(lines)


def _parse_schema(spec: Any) -> tuple[Any, Any]:
    """(schema, its jsonschema validator class); ConstraintError when it is not JSON or not a JSON Schema."""
    import jsonschema

    try:
        schema = json.loads(spec) if isinstance(spec, str) else spec
    except json.JSONDecodeError as exc:
        raise ConstraintError(f"json_schema is a string but not JSON: {exc}") from exc
    if not isinstance(schema, dict | bool):
        raise ConstraintError(f"json_schema must be a JSON object, got {type(schema).__name__}")
    validator_cls = jsonschema.validators.validator_for(schema)
    # check_schema's own, except "format: regex": a pattern is in llguidance's (Rust's) dialect, which the
    # grammar compile judges; Python's re would refuse \p{L} and misread [[:digit:]]
    formats = jsonschema.FormatChecker()
    formats.checkers = {name: check for name, check in formats.checkers.items() if name != "regex"}
    meta = jsonschema.validators.validator_for(validator_cls.META_SCHEMA, default=validator_cls)
    err = jsonschema.exceptions.best_match(meta(validator_cls.META_SCHEMA, format_checker=formats).iter_errors(schema))
    if err is not None:
        raise ConstraintError(f"json_schema is not a valid JSON Schema: {err.message}")
    return schema, validator_cls


def _schema_grammar(schema: Any) -> str:
    if isinstance(schema, bool):  # JSON Schema's true / false; llguidance options need an object around them
        schema = {"anyOf": [schema]}
    return _ll().LLMatcher.grammar_from_json_schema(exact_formats(schema), defaults={"whitespace_flexible": False})


def check_json_schema(spec: Any) -> None:
    """What json_schema_constraint would refuse, without a tokenizer."""
    schema, _ = _parse_schema(spec)
    _grammar_problem("json_schema", _schema_grammar(schema))


Validator = Callable[[str], tuple[bool, str | None]]


def json_schema_validator(spec: Any) -> Validator:
    """The independent check of a finished json_schema output: it parses and validates, formats included."""
    import jsonschema

    schema, validator_cls = _parse_schema(spec)
    validator_cls = jsonschema.validators.extend(validator_cls, {"pattern": _pattern_python_reads_alike})
    checker = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)

    def validate(text: str) -> tuple[bool, str | None]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            return False, f"output is not valid JSON: {exc}"
        err = jsonschema.exceptions.best_match(checker.iter_errors(value))
        return (True, None) if err is None else (False, f"output does not match the JSON schema: {err.message}")

    return validate


def json_schema_constraint(spec: Any, tokenizer: Any, vocab_size: int) -> LLGuidanceConstraint:
    schema, _ = _parse_schema(spec)
    return LLGuidanceConstraint("json_schema", _schema_grammar(schema), tokenizer, vocab_size, json_schema_validator(spec))


def ascii_digits(pattern: str) -> str:
    """Rewrite ``\\d`` as ASCII digits. Rust's (llguidance's) ``\\d`` is Unicode-aware and lets a model
    write e.g. "🯸" for a digit, which is never what a date or phone-number pattern means."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append(("0-9" if in_class else "[0-9]") if nxt == "d" else c + nxt)
            i += 2
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        out.append(c)
        i += 1
    return "".join(out)


def _regex(spec: Any) -> str:
    if not isinstance(spec, str) or not spec:
        raise ConstraintError("regex must be a non-empty string")
    return ascii_digits(spec)


def check_regex(spec: Any) -> None:
    """What regex_constraint would refuse (in llguidance's, i.e. Rust's, regex dialect), without a tokenizer."""
    _grammar_problem("regex", _ll().LLMatcher.grammar_from_regex(_regex(spec)))


@functools.lru_cache(maxsize=256)
def python_regex(pattern: str) -> re.Pattern[str] | None:
    """``pattern`` compiled by Python's re where it reads it as llguidance (Rust's dialect) does, else None
    (the grammar is then the only judge). Rust's class syntax (``[[:digit:]]``, ``[a&&b]``) means something
    else to re, which only warns (FutureWarning) on its first compile, hence the purge of re's cache."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        re.purge()
        try:
            return re.compile(pattern)
        except (re.error, FutureWarning):
            return None


def _pattern_python_reads_alike(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """jsonschema's ``pattern`` keyword (a search), for the patterns :func:`python_regex` reads."""
    import jsonschema

    compiled = python_regex(pattern) if validator.is_type(instance, "string") else None
    if compiled is not None and not compiled.search(instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def regex_validator(spec: Any) -> Validator:
    """The independent check of a finished regex output: a full match of the pattern the grammar used."""
    compiled = python_regex(_regex(spec))

    def validate(text: str) -> tuple[bool, str | None]:
        if compiled is None or compiled.fullmatch(text):
            return True, None
        return False, f"output does not fully match the regex {spec!r}"

    return validate


def regex_constraint(spec: Any, tokenizer: Any, vocab_size: int) -> LLGuidanceConstraint:
    grammar = _ll().LLMatcher.grammar_from_regex(_regex(spec))
    return LLGuidanceConstraint("regex", grammar, tokenizer, vocab_size, regex_validator(spec))


def _choice_lark(spec: Any) -> tuple[list[str], str]:
    if not isinstance(spec, list | tuple) or not spec or not all(isinstance(c, str) and c for c in spec):
        raise ConstraintError("choice must be a non-empty list of non-empty strings")
    options = list(dict.fromkeys(spec))
    return options, "start: " + " | ".join(json.dumps(o) for o in options) + "\n"


def check_choice(spec: Any) -> None:
    """What choice_constraint would refuse, without a tokenizer."""
    _grammar_problem("choice", _ll().LLMatcher.grammar_from_lark(_choice_lark(spec)[1]))


def choice_validator(spec: Any) -> Validator:
    """The independent check of a finished choice output: one of the options."""
    options, _ = _choice_lark(spec)

    def validate(text: str) -> tuple[bool, str | None]:
        return (True, None) if text in options else (False, f"output is not one of the choices {options!r}")

    return validate


def choice_constraint(spec: Any, tokenizer: Any, vocab_size: int) -> LLGuidanceConstraint:
    _, lark = _choice_lark(spec)
    grammar = _ll().LLMatcher.grammar_from_lark(lark)
    return LLGuidanceConstraint("choice", grammar, tokenizer, vocab_size, choice_validator(spec))


# A factory's ``check(spec)`` raises what compiling the spec would, without a model: the job checks call it
# (forge-batch validate, and run before the model loads).
json_schema_constraint.check = check_json_schema  # type: ignore[attr-defined]
regex_constraint.check = check_regex  # type: ignore[attr-defined]
choice_constraint.check = check_choice  # type: ignore[attr-defined]

BUILTIN_CONSTRAINTS = {
    "json_schema": json_schema_constraint,
    "regex": regex_constraint,
    "choice": choice_constraint,
}

OUTPUT_VALIDATORS: dict[str, Callable[[Any], Validator]] = {
    "json_schema": json_schema_validator,
    "regex": regex_validator,
    "choice": choice_validator,
}


def output_problem(kind: str, spec: Any, text: str) -> str | None:
    """Why ``text`` does not satisfy the built-in constraint ``kind``/``spec`` (the same check the engine
    makes when a sample finishes); None when it does, or when ``kind`` is not a built-in."""
    make = OUTPUT_VALIDATORS.get(kind)
    if make is None:
        return None
    try:
        ok, reason = make(spec)(text)
    except ConstraintError as exc:  # the spec itself is broken: say so rather than blame the output
        return str(exc)
    return None if ok else reason


@hookimpl
def register_constraints() -> dict[str, Any]:
    return dict(BUILTIN_CONSTRAINTS)
