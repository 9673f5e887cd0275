"""When a sample stops and what its finished text says: EOS and stop tokens, stop strings, length, the
grammar of a constrained sample, and whether a constrained sample's text satisfies its constraint.

Plain functions over a ``Sequence``: the engine calls them once per sampled token and once per finished
sample; ``decode`` turns token ids into text (the engine's tokenizer)."""

from __future__ import annotations

from collections.abc import Callable

from .outputs import EngineErrorKind
from .sequence import Sequence

Decode = Callable[[list[int], bool], str]


def constraint_stop(seq: Sequence, tok: int, eos_token_ids: frozenset[int]) -> bool:
    """Advance the sample's grammar; True when the grammar ends (or broke) the sample here."""
    state = seq.constraint_state
    if tok in eos_token_ids and state.is_accepting():  # type: ignore[union-attr]
        seq.finish_reason, seq.stop_reason = "stop", tok
        return True
    state.advance(tok)  # type: ignore[union-attr]
    err = state.error()  # type: ignore[union-attr]
    if err:
        seq.finish_reason, seq.error = "error", f"constraint violated: {err}"
        seq.error_kind = EngineErrorKind.CONSTRAINT_ERROR.value
        return True
    if state.is_stopped():  # type: ignore[union-attr]
        seq.finish_reason, seq.stop_reason = "stop", None
        return True
    return False


def check_stop(seq: Sequence, tok: int, eos_token_ids: frozenset[int], max_model_len: int, decode: Decode) -> bool:
    """True when ``tok`` ends the sample: EOS or a stop token (after min_tokens), a stop string (the text
    is cut there), max_tokens or the model's length."""
    p = seq.params
    n_out = len(seq.output_token_ids)
    if n_out > p.min_tokens and ((not p.ignore_eos and tok in eos_token_ids) or tok in p.stop_token_ids):
        seq.finish_reason, seq.stop_reason = "stop", tok
        return True
    if p.stop and n_out >= p.min_tokens:
        text = decode(seq.output_token_ids, p.skip_special_tokens)
        cut = min(((text.find(s), s) for s in p.stop if s and s in text), default=None)
        if cut is not None:
            seq.text = text[: cut[0] + (len(cut[1]) if p.include_stop_str_in_output else 0)]
            seq.finish_reason, seq.stop_reason = "stop", cut[1]
            return True
    if n_out >= p.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"
        return True
    return False


def settle_text(seq: Sequence, decode: Decode) -> None:
    """A finished sample's text (a stop string already cut it) and, under a constraint, its verdict: a
    stopped sample's text is validated, one cut by length is incomplete (both ``invalid_output``)."""
    if seq.finish_reason != "error" and seq.finish_reason is not None and not (
        seq.finish_reason == "stop" and isinstance(seq.stop_reason, str)
    ):
        seq.text = decode(seq.output_token_ids, seq.params.skip_special_tokens)
    if seq.constraint is None or seq.finish_reason not in ("stop", "length"):
        return
    if seq.finish_reason == "stop":
        seq.valid, reason = seq.constraint.validate(seq.text)  # type: ignore[attr-defined]
        if not seq.valid:
            seq.error = f"invalid output: {reason}"
            seq.error_kind = EngineErrorKind.INVALID_OUTPUT.value
    else:
        seq.valid = False
        seq.error_kind = EngineErrorKind.INVALID_OUTPUT.value
        seq.error = (
            f"incomplete: max_tokens reached before the {seq.constraint.kind} constraint "  # type: ignore[attr-defined]
            "was satisfied"
        )
