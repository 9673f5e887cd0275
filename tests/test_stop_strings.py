"""Stop strings: searched in the text each token adds (linear in the output), not inside min_tokens, and the
incremental text the search runs on equals a whole decode."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from test_tokenizer import _write_spm_gguf
from tiny_models import build_tokenizer

from forge_batch.engine.detokenizer import IncrementalText
from forge_batch.engine.sampling_params import SamplingParams
from forge_batch.engine.sequence import Sequence
from forge_batch.engine.stopping import check_stop, settle_text
from forge_batch.models.gguf_file import GGUFFile
from forge_batch.models.tokenizer import Tokenizer


class CountingDecode:
    """Token id i is the character chr(ord('a') + i); counts the tokens it decodes."""

    def __init__(self) -> None:
        self.tokens = 0

    def __call__(self, ids: list[int], skip_special_tokens: bool) -> str:
        self.tokens += len(ids)
        return "".join(chr(ord("a") + i) for i in ids)


def _run(text: str, eos: str = "", **params) -> tuple[Sequence, CountingDecode]:
    """Feed ``text``'s characters as tokens until check_stop ends the sample (``eos``: the EOS characters)."""
    decode = CountingDecode()
    seq = Sequence(seq_id=0, request_id="r", sample_index=0, prompt_token_ids=[0], params=SamplingParams(**params), seed=0)
    eos_ids = frozenset(ord(ch) - ord("a") for ch in eos)
    for ch in text:
        seq.output_token_ids.append(ord(ch) - ord("a"))
        if check_stop(seq, seq.output_token_ids[-1], eos_ids, 1 << 20, decode):
            break
    settle_text(seq, decode)
    return seq, decode


def test_stop_string_cuts_the_text_at_its_first_occurrence() -> None:
    seq, _ = _run("abcxyzdefxyz", stop=["xyz"], max_tokens=100)
    assert (seq.finish_reason, seq.stop_reason, seq.text) == ("stop", "xyz", "abc")
    seq, _ = _run("abcxyzdef", stop=["xyz"], include_stop_str_in_output=True, max_tokens=100)
    assert seq.text == "abcxyz"
    seq, _ = _run("abcdef", stop=["zz", "cd", "bcd"], max_tokens=100)
    assert (seq.stop_reason, seq.text) == ("bcd", "a")  # the earliest start wins


def test_a_stop_string_inside_min_tokens_does_not_cut_the_text() -> None:
    # "xy" is out by token 3, min_tokens is 5: the text must not end before the tokens min_tokens promises
    seq, _ = _run("axyzbxyzc", stop=["xy"], min_tokens=5, max_tokens=100)
    assert (seq.finish_reason, seq.text, len(seq.output_token_ids)) == ("stop", "axyzb", 7)
    seq, _ = _run("axyzbcdef", stop=["xy"], min_tokens=5, max_tokens=9)
    assert (seq.finish_reason, seq.text) == ("length", "axyzbcdef")
    # one that ends with the token after the first min_tokens counts, even if it began among them (vLLM's rule)
    seq, _ = _run("abcxyz", stop=["xyz"], min_tokens=5, max_tokens=100)
    assert (seq.finish_reason, seq.text, len(seq.output_token_ids)) == ("stop", "abc", 6)
    seq, _ = _run("abcxyzd", stop=["xyz"], min_tokens=6, max_tokens=7)
    assert seq.finish_reason == "length"
    seq, _ = _run("xyz", stop=["x"], min_tokens=1, max_tokens=3)  # a stop string in the first token, min_tokens 1
    assert seq.finish_reason == "length"


def test_a_stop_tokens_text_is_left_out_and_eos_has_no_stop_reason() -> None:
    """vLLM's rules: the token that stopped the sample stays in its token ids, its text is not in the text
    (unless include_stop_str_in_output); stop_reason is the stop token's id, None for EOS."""
    c = ord("c") - ord("a")
    seq, _ = _run("abcd", stop_token_ids=[c], max_tokens=10)
    assert (seq.finish_reason, seq.stop_reason, seq.text, len(seq.output_token_ids)) == ("stop", c, "ab", 3)
    seq, _ = _run("abcd", stop_token_ids=[c], include_stop_str_in_output=True, max_tokens=10)
    assert seq.text == "abc"
    seq, _ = _run("abcd", eos="c", max_tokens=10)
    assert (seq.finish_reason, seq.stop_reason, seq.text, len(seq.output_token_ids)) == ("stop", None, "ab", 3)
    seq, _ = _run("abcd", eos="c", stop_token_ids=[c], max_tokens=10)  # asked for by id: its id
    assert seq.stop_reason == c
    seq, _ = _run("abcd", eos="c", max_tokens=4, ignore_eos=True)
    assert (seq.finish_reason, seq.text) == ("length", "abcd")


def test_the_stop_string_search_is_linear_in_the_output() -> None:
    n = 4000
    seq, decode = _run("ab" * (n // 2) + "zq", stop=["zq", "qqq"], max_tokens=10 * n)
    assert seq.text == "ab" * (n // 2)
    # a whole decode at every token would be ~n^2 / 2 = 8 million tokens
    assert decode.tokens < 10 * n


def _spm_tokenizer(tmp_path: Path) -> Tokenizer:
    _write_spm_gguf(tmp_path / "spm.gguf")
    with GGUFFile(tmp_path / "spm.gguf") as f:
        return Tokenizer.from_gguf_metadata(f.metadata)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_incremental_text_equals_a_whole_decode(kind: str, tmp_path: Path) -> None:
    if kind == "byte-level":
        backend = build_tokenizer()
        decode = lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)  # noqa: E731
        encode = lambda text: backend.encode(text).ids  # noqa: E731
    else:
        tok = _spm_tokenizer(tmp_path)
        decode = lambda ids, skip: tok.decode(ids, skip_special_tokens=skip)  # noqa: E731
        encode = lambda text: tok.encode(text)  # noqa: E731
    words = ["hello", " world", "abc", "  ", "\n", "ü", "😀", "日本語", "</s>", "<s>", "JSON: {\"a\": 1}"]
    rng = random.Random(0)
    for _ in range(200):
        ids = encode("".join(rng.choice(words) for _ in range(rng.randrange(1, 10))))
        for skip in (True, False):
            text = IncrementalText()
            pieces = [text.extend(ids[:n], decode, skip) for n in range(1, len(ids) + 1)]
            assert text.text == "".join(pieces) == decode(ids, skip)
