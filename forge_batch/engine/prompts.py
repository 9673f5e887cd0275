"""Prompt -> token ids: the one place that knows how text, a chat and vLLM's TokensPrompt become the ids a
model reads. The engine and the job runner both call it, so a row tokenized ahead of time (to check its
length against the context) gets exactly the ids the engine would have made.
"""

from __future__ import annotations

import operator
from typing import Any

from forge_batch.models.chat_template import CHAT_ROLES

from .outputs import EngineErrorKind

# A prompt: text (or vLLM's TextPrompt, {"prompt": "..."}), a chat conversation (a list of {"role",
# "content"} messages), or token ids as vLLM's TokensPrompt, {"prompt_token_ids": [...]}.
PromptType = str | list[dict[str, Any]] | dict[str, Any]


class PromptError(ValueError):
    """A prompt that cannot become token ids; ``kind`` (an EngineErrorKind value) says why."""

    def __init__(self, message: str, kind: EngineErrorKind) -> None:
        super().__init__(message)
        self.kind = kind.value


def check_prompt(prompt: Any, *, has_tokenizer: bool, vocab_size: int | None = None) -> None:
    """Raise :class:`PromptError` for a prompt of a shape :func:`prompt_token_ids` refuses, without
    tokenizing it (the offline API checks every prompt before running any); token ids given as the prompt
    must lie in ``vocab_size``'s range."""
    _check_prompt_keys(prompt)
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        ids, _ = prompt_token_ids(prompt, None)
        if vocab_size is not None:
            check_token_ids(ids, vocab_size)
        return
    if isinstance(prompt, str) or (isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str)):
        if not has_tokenizer:
            raise PromptError("this engine has no tokenizer (random weights): give prompt_token_ids",
                              EngineErrorKind.BAD_PROMPT)
        return
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        checked_messages(prompt)
        if not has_tokenizer:
            raise PromptError("this engine has no tokenizer (random weights): give prompt_token_ids",
                              EngineErrorKind.BAD_PROMPT)
        return
    raise _bad_prompt(prompt)


def checked_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with each content as text (see :func:`content_text`), as the chat template reads them.
    Raises :class:`PromptError` (bad_messages) for a message without role and content, with a role the chat
    templates do not share (a job's rows are held to the same roles), or content that is not text."""
    checked = []
    for i, m in enumerate(messages):
        if "role" not in m or "content" not in m:
            raise PromptError(f"chat message needs 'role' and 'content', got keys {sorted(m)}",
                              EngineErrorKind.BAD_MESSAGES)
        if m["role"] not in CHAT_ROLES:
            raise PromptError(f"chat message {i} has role {m['role']!r}; allowed roles: {', '.join(CHAT_ROLES)}",
                              EngineErrorKind.BAD_MESSAGES)
        checked.append({**m, "content": content_text(m["content"], f"message {i} content")})
    return checked


def content_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or OpenAI's content parts (``[{"type": "text", "text": ...}]``,
    joined with newlines as vLLM joins them). Other part types (images, audio) have no meaning here: a
    :class:`PromptError` (bad_messages) names them."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "input_text") or not isinstance(part.get("text"), str):
                got = f"type {kind!r}" if kind is not None else type(part).__name__
                raise PromptError(f"{where}[{j}] is not a text part ({got}); only text content parts are supported",
                                  EngineErrorKind.BAD_MESSAGES)
            texts.append(part["text"])
        return "\n".join(texts)
    raise PromptError(f"{where} must be text or a list of text parts, got {type(content).__name__}",
                      EngineErrorKind.BAD_MESSAGES)


def _unicode_text(text: str, where: str) -> str:
    """``text``, if a tokenizer can take it: JSON may escape half of a UTF-16 pair ("\\ud800"), which is no
    text; a :class:`PromptError` (bad_prompt) says where, instead of the tokenizer's TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the prompt is not valid Unicode: a lone surrogate {text[e.start]!r} at character {e.start} "
                          f"of {where} (half of a UTF-16 pair, as JSON can escape it)", EngineErrorKind.BAD_PROMPT) from None
    return text


def given_token_ids(ids: Any) -> list[int]:
    """Token ids given as a prompt (a list or tuple of ints; numpy's integers too) as a list of ints; raises
    :class:`PromptError` (bad_prompt) for anything else."""
    if isinstance(ids, (list, tuple)) and not any(isinstance(i, bool) for i in ids):
        try:
            return [operator.index(i) for i in ids]
        except TypeError:
            pass
    raise PromptError("prompt_token_ids must be a list of ints", EngineErrorKind.BAD_PROMPT)


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Raise :class:`PromptError` (bad_prompt) for a token id outside the model's vocabulary: the embedding
    would fail on it for the whole step, not for this prompt alone."""
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise PromptError(f"prompt token id {bad} is outside the model's vocabulary (ids 0 to {vocab_size - 1})",
                          EngineErrorKind.BAD_PROMPT)


# vLLM's TextPrompt / TokensPrompt keys this engine reads; cache_salt only separates prefix-cache entries, which
# changes no output, so it is accepted and has no effect.
PROMPT_KEYS = frozenset({"prompt", "prompt_token_ids", "cache_salt"})


def _check_prompt_keys(prompt: Any) -> None:
    if isinstance(prompt, dict) and ("prompt" in prompt or "prompt_token_ids" in prompt):
        unknown = sorted(set(prompt) - PROMPT_KEYS)
        if unknown:  # multi_modal_data, mm_processor_kwargs, lora_request...: never dropped silently
            raise PromptError(f"prompt key(s) {', '.join(map(repr, unknown))} not supported: only text or token-id "
                              "prompts ({'prompt': ...} or {'prompt_token_ids': [...]})", EngineErrorKind.BAD_PROMPT)


def _bad_prompt(prompt: Any) -> PromptError:
    return PromptError(
        "prompt must be a string, {'prompt': '...'}, a list of chat messages or {'prompt_token_ids': [...]}, got "
        + (f"a dict with keys {sorted(prompt)}" if isinstance(prompt, dict)
           else "an empty list (a chat with no message)" if isinstance(prompt, list) and not prompt
           else type(prompt).__name__),
        EngineErrorKind.BAD_PROMPT,
    )


def prompt_token_ids(prompt: Any, tokenizer: Any) -> tuple[list[int], str | None]:
    """The token ids of ``prompt`` and the text they encode (None when the prompt is token ids already).

    ``prompt``: text (encoded with the tokenizer's special tokens, e.g. BOS), a chat (a list of ``{role,
    content}``, rendered with the chat template, whose text already holds them) or ``{"prompt_token_ids":
    [...]}``. Raises :class:`PromptError`."""
    _check_prompt_keys(prompt)
    if isinstance(prompt, dict) and "prompt" in prompt and "prompt_token_ids" not in prompt:
        if not isinstance(prompt["prompt"], str):  # vLLM's TextPrompt
            raise PromptError("{'prompt': ...} must hold a string", EngineErrorKind.BAD_PROMPT)
        prompt = prompt["prompt"]
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return given_token_ids(prompt["prompt_token_ids"]), None
    if tokenizer is None:
        raise PromptError("this engine has no tokenizer (random weights): give prompt_token_ids", EngineErrorKind.BAD_PROMPT)
    if isinstance(prompt, str):
        return list(tokenizer.encode(_unicode_text(prompt, "the prompt"), add_special_tokens=True)), prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        messages = checked_messages(prompt)
        for i, m in enumerate(messages):
            _unicode_text(m["content"], f"message {i}'s content")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False)), text
    raise _bad_prompt(prompt)
