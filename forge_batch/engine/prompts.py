"""A prompt -> its token ids: the one place the engine turns text, chats and token ids into model input."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .request import GenerationRequest

if TYPE_CHECKING:
    from forge_batch.models.tokenizer import Tokenizer

# A prompt: text, a chat conversation (a list of {"role", "content"} messages), or token ids as vLLM's
# TokensPrompt, {"prompt_token_ids": [...]}.
PromptType = str | list[dict[str, Any]] | dict[str, Any]


def prompt_token_ids(tokenizer: Tokenizer | None, request: GenerationRequest) -> tuple[list[int], str | None]:
    """The request's prompt as token ids, and the text they encode (None when ids were given).

    Text is encoded with the tokenizer's special tokens; a chat is rendered with the model's chat template
    (generation prompt added) and encoded without them, since the template writes its own. Raises
    ValueError on a prompt of no known shape, or text without a tokenizer."""
    if request.prompt_token_ids is not None:
        return list(request.prompt_token_ids), None
    prompt = request.prompt
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, int) for i in ids):
            raise ValueError("prompt_token_ids must be a list of ints")
        return list(ids), None
    if tokenizer is None:
        raise ValueError("this engine has no tokenizer (random weights): give prompt_token_ids")
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True), prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        for m in prompt:
            if "role" not in m or "content" not in m:
                raise ValueError(f"chat message needs 'role' and 'content', got keys {sorted(m)}")
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False), text
    raise ValueError(
        "prompt must be a string, a list of chat messages or {'prompt_token_ids': [...]}, got "
        f"{type(prompt).__name__}"
    )
