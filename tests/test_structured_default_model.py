"""Structured output on the default model (SmolLM2-135M-Instruct): every finished output is valid.

The tiny-model tests (test_constraints.py) prove the masks hold whatever the weights; this module proves
it on the model users run, over a set of real-world schemas (tests/data/schemas.json), regexes and choices,
greedy and sampled. A 135M model writes poor *content* (that is not under test); what is under test is
that each ``stop`` output parses, validates, and that the engine's ``valid`` flag says so.

Formats. llguidance 1.9 enforces ``date``, ``time``, ``date-time``, ``duration``, ``email``, ``hostname``,
``ipv4``, ``ipv6``, ``uuid`` and ``uri`` in the grammar and refuses any other format name at compile time
("Unknown format"), so a schema never silently loses a format. Its date/time patterns are shape-only
(they admit 2023-02-30 and second 60); the built-in plugin replaces them with exact calendar patterns so
they agree with jsonschema's checker. The check below uses jsonschema's format checker (date, date-time,
time, email, ipv4, ipv6, uuid with the packages installed here) plus an RFC 1123 ``hostname`` check
(jsonschema only checks hostnames when ``fqdn`` is installed): ``grammar_bench.schema_validator``, the
same judge the grammar-engine comparison holds every engine to.

Patterns. llguidance gives ``pattern`` JSON Schema's search semantics (unanchored unless ``^...$``),
like jsonschema, so the schemas anchor theirs.

Cost. Two shared cores: every request of the module goes into ONE ``generate`` call (the fixture below),
so stragglers of one group overlap with the others instead of each test paying its own tail, and torch
runs one thread while generating (see the fixture). Outputs are kept short by the schemas (maxLength /
maxItems / integer fields) and by ``max_tokens``; the module runs in about a minute.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from conftest import requires_default_model

from forge_batch import LLM, SamplingParams
from forge_batch.engine.outputs import CompletionOutput
from forge_batch.grammar_bench import schema_validator

pytestmark = [requires_default_model, pytest.mark.slow]

SCHEMAS: list[dict[str, Any]] = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())

SYSTEM = "You are a data generator. Reply with one compact JSON value and nothing else."

# (name, prompt, pattern). Every quantifier is bounded so a looping model ends by the grammar, not by
# max_tokens; \d is read as ASCII by the engine (see plugins.constraints.ascii_digits) and by re.ASCII below.
REGEXES: list[tuple[str, str, str]] = [
    ("iso_date", "On what date did Apollo 11 land on the Moon? Answer as YYYY-MM-DD.", r"\d{4}-\d{2}-\d{2}"),
    ("email", "Make up an email address for a support team.", r"[a-z0-9._+-]{1,20}@[a-z0-9-]{1,15}\.(com|org|net)"),
    ("us_phone", "Give a US phone number in the form (555) 123-4567.", r"\(\d{3}\) \d{3}-\d{4}"),
    ("intl_phone", "Give an international phone number like +44 207 946 0958.", r"\+\d{1,3} \d{3} \d{3} \d{4}"),
    ("integer", "How many legs does a spider have? Answer with a number.", r"-?(0|[1-9]\d{0,5})"),
    ("negative_integer", "What is 3 minus 10?", r"-[1-9]\d{0,3}"),
    ("price", "How much does a cup of coffee cost in dollars?", r"\d{1,3}\.\d{2}"),
    ("time_24h", "At what time does a typical office open? Use 24-hour HH:MM.", r"([01]\d|2[0-3]):[0-5]\d"),
    ("hex_color", "Give the hex code of a shade of blue.", r"#[0-9a-fA-F]{6}"),
    ("zip_code", "Give a US ZIP code.", r"\d{5}(-\d{4})?"),
    ("ipv4", "Give the IP address of a home router.",
     r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"),
    ("yes_no_reason", "Is the sky blue? Answer yes or no and a short reason.", r"(yes|no), [a-z ]{1,30}\."),
]

# (prompt, options). Includes options sharing a prefix ("New York" / "New Delhi" / "Newcastle").
CHOICES: list[tuple[str, list[str]]] = [
    ("Sentiment of 'I loved every minute of it!'", ["positive", "negative", "neutral"]),
    ("Sentiment of 'The package arrived broken.'", ["positive", "negative", "neutral"]),
    ("Is Paris the capital of France?", ["yes", "no"]),
    ("Which language is 'Guten Morgen'?", ["English", "French", "German", "Spanish"]),
    ("Which city is in India?", ["New York", "New Delhi", "Newcastle"]),
    ("Pick a priority for 'server is down'.", ["P0 - critical", "P1 - high", "P2 - normal", "P3 - low"]),
]

JSON_MAX_TOKENS = 128  # the longest example in schemas.json is 65 tokens; the model's longest ~100
SAMPLED = {"temperature": 0.9, "top_p": 0.95}
MAX_LENGTH_FRACTION = 0.15  # outputs cut by max_tokens are reported; more than this fails the test


def _validator(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """The grammar benchmark's judge: the schema's draft with its own format checker, plus hostname."""
    jsonschema.validators.validator_for(schema).check_schema(schema)
    return schema_validator(schema)


def _chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


def generate_all() -> dict[str, list[tuple[Any, CompletionOutput]]]:
    """Run every request of the module in one batch; results grouped by test: {group: [(case, sample)]}."""
    llm = LLM("smollm2-135m-instruct", device="cpu", dtype="float32", max_num_seqs=128)
    jobs: list[tuple[str, Any, list[dict[str, str]], SamplingParams]] = []
    for case in SCHEMAS:
        jobs.append(("schema", case, _chat(case["prompt"]),
                     SamplingParams(max_tokens=JSON_MAX_TOKENS, temperature=0.0, json_schema=case["schema"])))
    for name, prompt, pattern in REGEXES:
        jobs.append(("regex", (name, pattern), _chat(prompt),
                     SamplingParams(max_tokens=40, temperature=0.0, regex=pattern)))
    for prompt, options in CHOICES:
        jobs.append(("choice", options, _chat(prompt), SamplingParams(max_tokens=12, temperature=0.0, choice=options)))
    for i, case in enumerate(SCHEMAS):
        jobs.append(("schema-sampled", case, _chat(case["prompt"]),
                     SamplingParams(max_tokens=JSON_MAX_TOKENS, seed=1000 + i, json_schema=case["schema"], **SAMPLED)))
    for i, (name, prompt, pattern) in enumerate(REGEXES):
        jobs.append(("regex-sampled", (name, pattern), _chat(prompt),
                     SamplingParams(max_tokens=40, seed=2000 + i, regex=pattern, **SAMPLED)))
    for i, (prompt, options) in enumerate(CHOICES):
        jobs.append(("choice-sampled", options, _chat(prompt),
                     SamplingParams(max_tokens=12, seed=3000 + i, choice=options, **SAMPLED)))

    t0 = time.monotonic()
    outs = llm.generate([j[2] for j in jobs], [j[3] for j in jobs])
    elapsed = time.monotonic() - t0
    stats = llm.stats()
    print(f"\n{len(jobs)} constrained requests, {stats['output_tokens']} output tokens in {elapsed:.1f}s "
          f"({stats['steps']} steps; mask {stats['mask_seconds']:.2f}s, of which waited "
          f"{stats['mask_wait_seconds']:.3f}s)")
    grouped: dict[str, list[tuple[Any, CompletionOutput]]] = {}
    for (group, case, _, _), out in zip(jobs, outs):
        grouped.setdefault(group, []).append((case, out.samples[0]))
    return grouped


@pytest.fixture(scope="module")
def generated() -> Iterator[dict[str, list[tuple[Any, CompletionOutput]]]]:
    """One torch thread while generating: on two cores shared with other processes, two OpenMP threads
    spin-wait on each other and a 32-row decode step is 4-7x slower than with one (measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = generate_all()
    finally:
        torch.set_num_threads(threads)
    yield results


def _report(group: str, results: list[tuple[Any, CompletionOutput]]) -> Counter[str]:
    counts = Counter(s.finish_reason for _, s in results)
    print(f"{group}: {dict(counts)} of {len(results)}")
    return counts


def _check_json(case: dict[str, Any], s: CompletionOutput) -> None:
    """A ``stop`` output parses, validates (formats included), and the engine flagged it valid; a
    ``length`` output is flagged invalid and incomplete; nothing else is acceptable."""
    name = case["name"]
    assert s.finish_reason in ("stop", "length"), (name, s.finish_reason, s.error)
    if s.finish_reason == "length":
        assert s.valid is False and s.error and s.error.startswith("incomplete"), (name, s.error)
        return
    value = json.loads(s.text)
    errors = [e.message for e in _validator(case["schema"]).iter_errors(value)]
    assert not errors, (name, s.text, errors)
    assert s.valid is True and s.error is None, (name, s.text, s.error)


def test_schema_set_covers_real_world_shapes() -> None:
    """The data file holds 30+ valid schemas whose examples validate, covering the shapes the issue names."""
    assert len(SCHEMAS) >= 30
    assert len({c["name"] for c in SCHEMAS}) == len(SCHEMAS)
    text = json.dumps([c["schema"] for c in SCHEMAS])
    for needle in ('"$ref"', '"$defs"', '"anyOf"', '"enum"', '"const"', '"minItems"', '"maxItems"',
                   '"minimum"', '"maximum"', '"exclusiveMinimum"', '"exclusiveMaximum"', '"pattern"',
                   '"prefixItems"', '"additionalProperties": false', '"boolean"', '"null"', '"number"',
                   '"format": "date"', '"format": "date-time"', '"format": "time"', '"format": "email"',
                   '"format": "uuid"', '"format": "ipv4"', '"format": "hostname"'):
        assert needle in text, f"no schema uses {needle}"
    assert any(set(c["schema"].get("required", [])) < set(c["schema"].get("properties", {})) for c in SCHEMAS), \
        "no schema has an optional field"
    for case in SCHEMAS:
        _validator(case["schema"]).validate(case["example"])


def test_json_schema_stop_outputs_all_validate(generated) -> None:
    results = generated["schema"]
    counts = _report("json_schema (greedy)", results)
    for case, s in results:
        _check_json(case, s)
    assert counts["length"] <= MAX_LENGTH_FRACTION * len(results), [
        (c["name"], s.text) for c, s in results if s.finish_reason == "length"
    ]


def test_regex_stop_outputs_fully_match(generated) -> None:
    results = generated["regex"]
    counts = _report("regex (greedy)", results)
    for (name, pattern), s in results:
        assert s.finish_reason in ("stop", "length"), (name, s.error)
        if s.finish_reason == "stop":
            assert re.fullmatch(pattern, s.text, flags=re.ASCII), (name, pattern, s.text)
            assert s.valid is True, (name, s.error)
        else:
            assert s.valid is False
    assert counts["stop"] == len(results), [(c, s.text) for c, s in results if s.finish_reason != "stop"]


def test_choice_output_is_always_an_option(generated) -> None:
    results = generated["choice"]
    _report("choice (greedy)", results)
    for options, s in results:
        assert s.finish_reason == "stop" and s.text in options and s.valid is True, (options, s.text, s.error)


def test_sampling_under_constraints_still_validates(generated) -> None:
    """temperature 0.9 / top_p 0.95, seeded: masks are applied before sampling, so nothing invalid escapes."""
    schema_results = generated["schema-sampled"]
    counts = _report("json_schema (sampled)", schema_results)
    for case, s in schema_results:
        _check_json(case, s)
    assert counts["length"] <= MAX_LENGTH_FRACTION * len(schema_results), [
        (c["name"], s.text) for c, s in schema_results if s.finish_reason == "length"
    ]
    regex_results = generated["regex-sampled"]
    _report("regex (sampled)", regex_results)
    for (name, pattern), s in regex_results:
        assert s.finish_reason in ("stop", "length"), (name, s.error)
        if s.finish_reason == "stop":
            assert re.fullmatch(pattern, s.text, flags=re.ASCII) and s.valid is True, (name, s.text)
    choice_results = generated["choice-sampled"]
    _report("choice (sampled)", choice_results)
    for options, s in choice_results:
        assert s.finish_reason == "stop" and s.text in options and s.valid is True, (options, s.text)
