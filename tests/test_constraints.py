"""Structured output through the engine on a tiny random model: whatever the weights, output is valid."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from forge_batch import LLM, SamplingParams
from forge_batch.plugins.constraints import ascii_digits

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=16)


PROMPTS = ["Give me a record:", "JSON please", "The quick brown fox", "Numbers: 1 2 3"]


def test_json_schema_outputs_validate_even_at_high_temperature(llm):
    params = SamplingParams(max_tokens=120, temperature=1.2, seed=5, json_schema=SCHEMA, n=3)
    outs = llm.generate(PROMPTS, params)
    finished = [s for o in outs for s in o.samples if s.finish_reason == "stop"]
    assert len(finished) >= 8
    for s in finished:
        jsonschema.validate(json.loads(s.text), SCHEMA)
        assert s.valid is True and s.error is None


def test_regex_outputs_fully_match(llm):
    pattern = r"\d{4}-\d{2}-\d{2}"
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=1.0, seed=2, regex=pattern))
    for o in outs:
        assert o.finish_reason == "stop", o.samples[0]
        assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", o.text), o.text
        assert o.samples[0].valid


def test_choice_output_is_an_option(llm):
    options = ["positive", "negative", "neutral"]
    outs = llm.generate(PROMPTS * 2, SamplingParams(max_tokens=10, temperature=1.0, choice=options))
    assert all(o.text in options and o.finish_reason == "stop" for o in outs)


def test_greedy_constrained_is_deterministic_and_mixes_with_unconstrained(llm):
    c = SamplingParams(max_tokens=60, temperature=0.0, json_schema=SCHEMA)
    free = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], c)[0]
    mixed = llm.generate(PROMPTS, [c, free, c, free])
    assert mixed[0].token_ids == alone.token_ids
    assert mixed[1].samples[0].valid is None and len(mixed[1].token_ids) == 8


def test_uncompilable_constraint_fails_the_request_with_the_engine_message(llm):
    outs = llm.generate(["x", "y", "z"], [SamplingParams(regex="(unclosed"),
                                          SamplingParams(json_schema={"type": "no-such-type"}),
                                          SamplingParams(max_tokens=3)])
    assert outs[0].finish_reason == "error" and "unclosed" in outs[0].error
    assert outs[1].finish_reason == "error" and "JSON Schema" in outs[1].error
    assert outs[2].error is None


def test_max_tokens_before_completion_is_marked_incomplete(llm):
    out = llm.generate(["x"], SamplingParams(max_tokens=3, temperature=0.0, json_schema=SCHEMA))[0]
    s = out.samples[0]
    assert s.finish_reason == "length" and s.valid is False and "incomplete" in s.error


def test_both_json_schema_and_regex_is_an_error():
    with pytest.raises(ValueError, match="mutually exclusive"):
        SamplingParams(json_schema=SCHEMA, regex="a")


def test_plugin_constraint_kind(tiny_model_dir):
    """A third party registers a kind (here a Lark grammar) the same way the built-ins are."""
    from forge_batch.plugins.constraints import LLGuidanceConstraint, _ll

    def lark(spec, tokenizer, vocab_size):
        return LLGuidanceConstraint("lark", _ll().LLMatcher.grammar_from_lark(spec), tokenizer, vocab_size,
                                    lambda text: (text in ("ping", "pong"), None))

    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", constraints={"lark": lark})
    out = llm.generate(["x"], SamplingParams(max_tokens=10, temperature=1.0, constraint={"lark": 'start: "ping" | "pong"'}))[0]
    assert out.text in ("ping", "pong") and out.samples[0].valid


def test_a_plugin_constraint_fills_its_bitmask_with_torch_operations(tiny_model_dir):
    """The bitmask a state's fill_bitmask gets is an ordinary int32 tensor to it: written in place with torch
    (on the engine's mask thread), it decides the tokens."""
    allowed = [5, 7, 40]

    class State:
        def __init__(self) -> None:
            self.n = 0

        def fill_bitmask(self, bitmask, row):
            bitmask[row].zero_()
            for t in allowed:
                bitmask[row, t // 32] |= 1 << (t % 32)

        def advance(self, token_id):
            self.n += 1

        def is_accepting(self):
            return self.n >= 3

        def is_stopped(self):
            return self.n >= 3

        def error(self):
            return None

    class Few:
        kind = "few"

        def new_state(self):
            return State()

        def validate(self, text):
            return True, None

    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", constraints={"few": lambda spec, t, v: Few()})
    outs = llm.generate(["a", "b c"], SamplingParams(max_tokens=8, temperature=1.0, seed=3, constraint={"few": True}))
    for out in outs:
        assert out.error is None, out.error
        assert len(out.token_ids) == 3 and set(out.token_ids) <= set(allowed), out.token_ids


def test_a_plugin_constraint_or_sampler_that_raises_fails_its_rows_alone(tiny_model_dir):
    """A constraint whose state raises computing its mask or advancing, one without validate, a sampler that
    raises: those requests fail (plugin_error, the kind or sampler named), the others in the batch go on."""

    class State:
        def __init__(self, where: str) -> None:
            self.where = where

        def fill_bitmask(self, bitmask, row):
            if self.where == "mask":
                raise RuntimeError("mask boom")

        def advance(self, token_id):
            if self.where == "advance":
                raise RuntimeError("advance boom")

        def is_accepting(self):
            return True

        def is_stopped(self):
            return self.where == "novalidate"

        def error(self):
            return None

    class Rough:  # no validate(): a constraint needs one
        kind = "rough"

        def __init__(self, spec):
            self.spec = spec

        def new_state(self):
            return State(self.spec)

    def boom_sampler(logits, batch):
        raise ValueError("sampler boom")

    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", constraints={"rough": lambda spec, t, v: Rough(spec)},
              samplers={"boom": boom_sampler})
    params = [SamplingParams(max_tokens=4, constraint={"rough": w}) for w in ("mask", "advance", "novalidate")]
    params += [SamplingParams(max_tokens=4, sampler="boom"), SamplingParams(max_tokens=4, temperature=0.0)]
    outs = llm.generate([*PROMPTS, "one more"], params)
    for out, says in zip(outs, ["raised computing its mask: RuntimeError: mask boom", "raised: RuntimeError: advance boom",
                                "validate raised: AttributeError", "sampler 'boom' raised: ValueError: sampler boom"]):
        assert out.finish_reason == "error" and out.samples[0].error_kind == "plugin_error", out
        assert says in out.samples[0].error, out.samples[0].error
    assert all("'rough'" in o.samples[0].error for o in outs[:3])
    assert outs[-1].error is None and len(outs[-1].token_ids) >= 1


def test_a_sampler_returning_ids_outside_the_vocabulary_or_too_few_fails_its_rows_alone(tiny_model_dir):
    """A plugin sampler's return is checked: a token id outside the vocabulary fails that row, the wrong number
    of ids fails the sampler's rows (plugin_error, the sampler named); other rows, its own good ones
    included, go on."""

    def outside(logits, batch):  # the second of its rows gets an id past the vocabulary
        return torch.tensor([5, 10**6][: logits.shape[0]])

    def too_few(logits, batch):
        return torch.zeros(0, dtype=torch.long)

    llm = LLM(str(tiny_model_dir), device="cpu", dtype="float32", samplers={"outside": outside, "few": too_few})
    params = [SamplingParams(max_tokens=3, sampler="outside"), SamplingParams(max_tokens=3, sampler="outside"),
              SamplingParams(max_tokens=3, sampler="few"), SamplingParams(max_tokens=3, temperature=0.0)]
    first, second, few, plain = llm.generate(["a", "b", "c", "d"], params)
    assert first.error is None and first.token_ids == [5, 5, 5]
    assert second.samples[0].error_kind == "plugin_error" and "sampler 'outside' returned token id 1000000" in second.error
    assert few.samples[0].error_kind == "plugin_error" and "sampler 'few' returned (0,) token ids for 1 rows" in few.error
    assert plain.error is None and len(plain.token_ids) == 3


def test_masks_are_computed_beside_the_forward(llm):
    llm.generate(PROMPTS, SamplingParams(max_tokens=10, temperature=0.0, json_schema=SCHEMA))
    stats = llm.stats()
    assert stats["mask_seconds"] > 0 and stats["mask_wait_seconds"] <= stats["mask_seconds"] + 0.05


def test_ascii_digits_rewrite():
    assert ascii_digits(r"\d{2}[\d.]") == "[0-9]{2}[0-9.]"
    assert ascii_digits(r"\\d") == r"\\d"


def _admits(llm: LLM, schema: dict, value: str) -> bool:
    """Whether the compiled grammar accepts ``value`` (as a JSON string) as a complete output."""
    state = llm.compile_constraint("json_schema", schema).new_state()
    for tok in llm.tokenizer.encode(json.dumps(value), add_special_tokens=False):
        state.advance(tok)
        if state.error():
            return False
    return state.is_accepting()


def test_the_valid_column_checks_every_format_it_claims():
    """jsonschema checks a format only when its optional checker package is installed; without one it
    passes every value (``conforms('garbage', 'time')`` is True), so ``valid`` would silently not check."""
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    claimed = {"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"}
    assert claimed <= set(checker.checkers), sorted(claimed - set(checker.checkers))
    for fmt in ("time", "date-time", "duration", "uri", "hostname"):
        assert not checker.conforms("garbage value", fmt), fmt


def test_date_and_time_formats_admit_only_what_jsonschema_accepts(llm):
    """llguidance's own date/time formats are shape-only (2023-02-30, year 0000, second 60 pass); the
    plugin makes them exact so a finished output never fails the jsonschema check that sets ``valid``."""
    from forge_batch.plugins.constraints import EXACT_FORMAT_PATTERNS, exact_formats

    cases = {
        "date": ["2024-02-29", "2000-02-29", "2023-12-31", "2023-02-29", "1900-02-29", "2023-04-31", "0000-01-01",
                 "x2023-01-01"],
        "time": ["23:59:59Z", "10:00:00.5+01:00", "10:00:60Z", "24:00:00Z", "10:00:00"],
        "date-time": ["2024-02-29T23:59:59-05:00", "2023-02-29T00:00:00Z", "2023-01-01 10:00:00Z"],
    }
    checker = jsonschema.Draft202012Validator.FORMAT_CHECKER
    for fmt, values in cases.items():
        for v in values:
            assert _admits(llm, {"type": "string", "format": fmt}, v) == checker.conforms(v, fmt), (fmt, v)
    # The patterns agree with the checker over every day of 2,101 years (all leap-year rules, year 0).
    date = re.compile(EXACT_FORMAT_PATTERNS["date"])
    for year in range(2101):
        for month in range(1, 13):
            for day in (28, 29, 30, 31):
                v = f"{year:04d}-{month:02d}-{day:02d}"
                assert bool(date.fullmatch(v)) == checker.conforms(v, "date"), v
    # A user's own pattern still applies (intersected), and const/enum data is never rewritten.
    assert exact_formats({"enum": [{"format": "date"}]}) == {"enum": [{"format": "date"}]}
    assert _admits(llm, {"type": "string", "format": "date", "pattern": "^2"}, "2023-01-01")
    assert not _admits(llm, {"type": "string", "format": "date", "pattern": "^2"}, "1999-01-01")


def test_apply_bitmask_bans_exactly_the_cleared_bits():
    import torch

    from forge_batch.engine.constraints import apply_bitmask

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, generator=g) * 20
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 3), dtype=torch.int32, generator=g)
    allowed = torch.tensor([[(int(bitmask[r, t // 32]) >> (t % 32)) & 1 for t in range(70)] for r in range(3)],
                           dtype=torch.bool)
    masked = logits.clone()
    apply_bitmask(masked, bitmask)
    assert torch.equal(masked[allowed], logits[allowed])
    probs = masked.softmax(-1)
    assert (probs[~allowed] == 0).all() and torch.allclose(probs.sum(-1), torch.ones(3))
    assert (masked.argmax(-1) == logits.masked_fill(~allowed, float("-inf")).argmax(-1)).all()


def test_apply_bitmask_c_kernel_matches_the_numpy_path_bit_for_bit(monkeypatch):
    """The CPU kernel (kernels/cpu/elementwise.py: ban_masked) and the numpy unpackbits path it replaces give identical
    logits: whole-vocabulary and partial last mask words, all-banned and all-allowed rows, inf/NaN/-0."""
    import torch

    from forge_batch.engine import constraints
    from forge_batch.kernels.cpu import build, elementwise

    if not build.available():
        pytest.skip("no C compiler for the CPU kernels")
    g = torch.Generator().manual_seed(3)
    for vocab in (49152, 1000, 70):
        words = (vocab + 31) // 32
        bitmask = torch.randint(-(2**31), 2**31 - 1, (6, words), dtype=torch.int32, generator=g)
        bitmask[0], bitmask[1], bitmask[2, ::3] = 0, -1, 0
        logits = torch.randn(6, vocab, generator=g) * 30
        logits[3, :3] = torch.tensor([float("-inf"), float("nan"), -0.0])
        assert elementwise.ban_masked_ok(logits, bitmask)
        fast = logits.clone()
        constraints.apply_bitmask(fast, bitmask)
        monkeypatch.setattr(elementwise, "ban_masked_ok", lambda *a: False)
        slow = logits.clone()
        constraints.apply_bitmask(slow, bitmask)
        monkeypatch.undo()
        assert torch.equal(fast.view(torch.int32), slow.view(torch.int32))
        assert (fast[0] < -1e38).all() and torch.equal(fast[1], logits[1])  # all banned; all allowed


def test_engine_names_the_error_kind_of_each_failure(llm):
    """The engine says why a sample failed in error_kind (no caller parses messages): cut short by max_tokens
    -> invalid_output, a spec that does not compile -> constraint_error, an empty prompt -> empty_prompt, a
    bad chat -> bad_messages; a sample that finished well has none."""
    cut = llm.generate(["x"], SamplingParams(max_tokens=2, temperature=0.0, json_schema=SCHEMA))[0]
    assert [(s.finish_reason, s.error_kind) for s in cut.samples] == [("length", "invalid_output")]
    assert cut.error is None and cut.error_kind is None  # the request itself ran
    bad = llm.generate(["x"], SamplingParams(max_tokens=4, regex="(unclosed"))[0]
    assert bad.finish_reason == "error" and bad.error_kind == "constraint_error"
    assert [s.error_kind for s in bad.samples] == ["constraint_error"]
    fine = llm.generate(["x"], SamplingParams(max_tokens=4, temperature=0.0, choice=["yes", "no"]))[0]
    assert fine.samples[0].error is None and fine.samples[0].error_kind is None
    empty = llm.generate([{"prompt_token_ids": []}], SamplingParams(max_tokens=2))[0]
    assert empty.error_kind == "empty_prompt"
    # generate() refuses a malformed prompt outright; a stream (a job's rows) gets it back with its kind
    chat = next(llm.generate_stream([[{"role": "user"}]], SamplingParams(max_tokens=2)))
    assert chat.error_kind == "bad_messages" and "content" in chat.error


def test_result_validation_is_the_engines_check_formats_included():
    """When an engine gives no verdict, the validate plugin judges with the engine's own validator: a date
    the calendar lacks fails a ``format: date`` schema there too, with the same message."""
    from forge_batch.engine.outputs import CompletionOutput, RequestOutput
    from forge_batch.plugins import validate
    from forge_batch.plugins.constraints import json_schema_validator, output_problem

    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]}
    text = '{"d": "2023-02-30"}'
    ok, reason = json_schema_validator(schema)(text)
    assert not ok and output_problem("json_schema", schema, text) == reason
    assert output_problem("json_schema", schema, '{"d": "2024-02-29"}') is None
    out = RequestOutput("r0", 0, None, [1], samples=[CompletionOutput(0, text, [5], "stop")],
                        metadata={"_forge": {"constraint": ("json_schema", schema)}})
    record = {"text": text, "sample_index": 0, "finish_reason": "stop", "error": None}
    validate.process_result(record, out)
    assert record["valid"] is False and record["error_kind"] == "invalid_output" and record["error"] == reason


@pytest.mark.parametrize("pattern,good,bad", [
    ("[[:digit:]]{3}", "934", "93a"),  # Rust's POSIX class: re reads a nested set and only warns
    (r"\p{Lu}[a-z]{2}", "Par", "par"),  # Rust's Unicode class: re cannot read it
    ("[0-9]{3}", "934", "93a"),  # both read it alike: re checks it too
])
def test_regex_in_the_grammars_dialect_is_generated_and_judged_valid(llm, pattern, good, bad, recwarn):
    """Patterns are llguidance's (Rust's) dialect: an output it generates is written as valid, as a regex and as
    a JSON schema's ``pattern``; Python's re judges only the patterns it reads the same way, and says nothing."""
    from forge_batch.plugins.constraints import check_json_schema, output_problem

    schema = {"type": "object", "properties": {"v": {"type": "string", "pattern": f"^{pattern}$"}}, "required": ["v"],
              "additionalProperties": False}
    check_json_schema(schema)  # a pattern re refuses is no reason to refuse the schema
    for kind, spec in (("regex", pattern), ("json_schema", schema)):
        outs = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=24, temperature=0.0, **{kind: spec}))
        for o in outs:
            assert o.finish_reason == "stop" and o.samples[0].valid is True, o.samples[0]
            assert output_problem(kind, spec, o.text) is None
    assert output_problem("regex", pattern, good) is None
    assert output_problem("json_schema", schema, json.dumps({"v": good})) is None
    if pattern == "[0-9]{3}":
        assert output_problem("regex", pattern, bad) is not None
        assert output_problem("json_schema", schema, json.dumps({"v": bad})) is not None
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_a_constraint_no_text_satisfies_is_refused_when_compiled(llm):
    """A regex (or a schema's pattern) whose language is empty compiles in llguidance but allows no first token:
    refused at compile with a plain message, not a sample failing with the parser's state dump."""
    empty_schema = {"type": "object", "properties": {"v": {"type": "string", "pattern": "^[a&&b]$"}}, "required": ["v"]}
    for kind, spec in (("regex", "[a&&b]"), ("json_schema", empty_schema)):
        out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=5, **{kind: spec}))[0]
        assert out.error_kind == "constraint_error" and "<state>" not in out.error, out.error
        assert ("admits no text at all" if kind == "regex" else "unsatisfiable") in out.error  # (llguidance's own check)


def test_a_stop_string_in_the_token_that_ends_the_grammar_still_cuts_the_text(llm):
    """As anywhere else in the output: the text is cut, and what is left is judged (here: no choice)."""
    choice = ["yes.", "no."]
    cut = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0.0, choice=choice, stop=["."]))
    for out in cut:
        assert out.finish_reason == "stop" and out.samples[0].stop_reason == "."
        assert out.text in ("yes", "no") and out.samples[0].valid is False and out.samples[0].error_kind == "invalid_output"
    kept = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0.0, choice=choice, stop=["."],
                                                    include_stop_str_in_output=True))
    assert all(o.text in choice and o.samples[0].valid is True for o in kept)


@pytest.mark.parametrize("fmt", ["iri", "uri-reference", "idn-email", "json-pointer", "binary", "made-up"])
def test_a_format_the_grammar_does_not_know_compiles_and_is_judged_after(fmt):
    """format is an annotation in JSON Schema: the grammar leaves it out, the independent check judges the
    formats jsonschema knows (a uri-reference that is not one is invalid; an unknown format constrains nothing)."""
    from forge_batch.plugins.constraints import check_json_schema, json_schema_validator

    schema = {"type": "object", "properties": {"v": {"type": "string", "format": fmt}}, "required": ["v"]}
    check_json_schema(schema)
    ok, _ = json_schema_validator(schema)(json.dumps({"v": "has spaces and no scheme: ::"}))
    assert ok is (fmt not in ("uri-reference", "idn-email", "json-pointer"))
