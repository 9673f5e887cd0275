"""A sample's text as its tokens arrive, at a constant cost a token (stop strings are searched in it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# The engine's tokenizer: token ids and skip_special_tokens to text.
Decode = Callable[[list[int], bool], str]


@dataclass
class IncrementalText:
    """The text of a growing list of token ids, decoded a short window at a time.

    Decoding the whole output at every token costs O(n) a token, O(n^2) a sample. This decodes only the
    tokens since the last complete piece of text, with one token before them: a tokenizer that drops a
    leading space (SentencePiece) drops it from both decodes, so their difference is the new text. A window
    that ends inside a character (U+FFFD) waits for the next token.
    """

    text: str = ""
    prefix_offset: int = 0  # where the window starts
    read_offset: int = 0  # the tokens before this one are in ``text``

    def extend(self, ids: list[int], decode: Decode, skip_special_tokens: bool) -> str:
        """Catch up with ``ids`` (the whole output so far); returns the text this added."""
        before = decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens)
        window = decode(ids[self.prefix_offset :], skip_special_tokens)
        if len(window) <= len(before) or window.endswith("\ufffd"):
            return ""
        new = window[len(before) :]
        self.text += new
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        return new
