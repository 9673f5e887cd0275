"""When a sample stops and what its finished text says: EOS and stop tokens, stop strings, length, the
grammar of a constrained sample, and whether a constrained sample's text satisfies its constraint.

Plain functions over a ``Sequence``: the engine calls them once per sampled token and once per finished
sample; ``decode`` turns token ids into text (the engine's tokenizer)."""

from __future__ import annotations

from .detokenizer import Decode, IncrementalText
from .outputs import EngineErrorKind
from .sequence import Sequence


def constraint_stop(seq: Sequence, tok: int, eos_token_ids: frozenset[int]) -> bool:
    """Advance the sample's grammar; True when the grammar ends (or broke) the sample here. A constraint
    state that raises (a plugin's) fails the sample alone."""
    try:
        return _advance_grammar(seq, tok, eos_token_ids)
    except Exception as e:  # noqa: BLE001 - the sample fails, with what was raised
        seq.fail(f"the {seq.constraint_name} constraint raised: {type(e).__name__}: {e}")
        return True


def _advance_grammar(seq: Sequence, tok: int, eos_token_ids: frozenset[int]) -> bool:
    state = seq.constraint_state
    if tok in eos_token_ids and state.is_accepting():  # type: ignore[union-attr]
        seq.finish_reason, seq.stop_reason, seq.stop_token = "stop", None, True
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
    is cut there), max_tokens or the model's length. The text of a stop token (EOS included) is left out unless
    include_stop_str_in_output, as vLLM does."""
    p = seq.params
    n_out = len(seq.output_token_ids)
    if n_out > p.min_tokens and ((not p.ignore_eos and tok in eos_token_ids) or tok in p.stop_token_ids):
        # vLLM's stop_reason: the stop token's id, None for EOS
        seq.finish_reason, seq.stop_reason, seq.stop_token = "stop", tok if tok in p.stop_token_ids else None, True
        return True
    if p.stop and cut_at_stop_string(seq, decode):
        return True
    if n_out >= p.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"
        return True
    return False


def cut_at_stop_string(seq: Sequence, decode: Decode) -> bool:
    """True when a stop string ends in the text the latest token added: the sample stops there, its text cut
    (kept up to the stop string's end with include_stop_str_in_output). Also for the token that ends a
    constrained sample's grammar."""
    hit = _stop_string(seq, decode)
    if hit is None:
        return False
    seq.text = seq.detok.text[: hit[0] + (len(hit[1]) if seq.params.include_stop_str_in_output else 0)]  # type: ignore[union-attr]
    seq.finish_reason, seq.stop_reason, seq.stop_token = "stop", hit[1], False
    return True


def _stop_string(seq: Sequence, decode: Decode) -> tuple[int, str] | None:
    """The first stop string that ends in the text the latest token added (where it starts, which), after
    the first min_tokens tokens; one that ends inside their text does not count (vLLM's rule)."""
    p = seq.params
    if seq.detok is None:
        seq.detok = IncrementalText()
    searched = len(seq.detok.text)
    seq.detok.extend(seq.output_token_ids, decode, p.skip_special_tokens)
    if len(seq.output_token_ids) <= p.min_tokens:
        return None
    text = seq.detok.text
    # from len(s) - 1 characters back: a stop string may begin in text an earlier token added
    hits = [(at, s) for s in p.stop if s and (at := text.find(s, max(0, searched - len(s) + 1))) >= 0]
    return min(hits, default=None)


def settle_text(seq: Sequence, decode: Decode) -> None:
    """A finished sample's text (a stop string already cut it) and, under a constraint, its verdict: a
    stopped sample's text is validated, one cut by length is incomplete (both ``invalid_output``)."""
    if seq.finish_reason != "error" and seq.finish_reason is not None and not (
        seq.finish_reason == "stop" and isinstance(seq.stop_reason, str)
    ):
        ids = seq.output_token_ids
        if seq.stop_token and not seq.params.include_stop_str_in_output:
            ids = ids[:-1]
        seq.text = decode(ids, seq.params.skip_special_tokens)
    if seq.constraint is None or seq.finish_reason not in ("stop", "length"):
        return
    if seq.finish_reason == "stop":
        try:
            seq.valid, reason = seq.constraint.validate(seq.text)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - a plugin's constraint: the sample fails, with what was raised
            seq.valid = None
            seq.fail(f"the {seq.constraint_name} constraint's validate raised: {type(e).__name__}: {e}")
            return
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
